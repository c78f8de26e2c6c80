# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Property-based tests (hypothesis) of preprocessing, refit, measurement and input checks.

Random valid stamps (1-3 objects, 1-3 bands, 16 or 32 pixels, finite values of moderate
range) and valid PSFs (odd sizes up to the stamp, positive, peak at the centre) must never
give NaN or inf; the operations that are linear, flux-conserving or translation-equivariant
must be so; and every class of invalid input must raise its documented `PSFDeconvError`
subclass (docs/robustness.rst lists them).

Every test runs a fixed, derandomized set of examples (no example database), so CI sees the
same inputs on every run; the whole module takes a few seconds.
"""

import numpy as np
import pytest
from astropy import units as u
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv._fourier import convolve_same
from psfdeconv.deconvolve import refit_amplitude, validate_stamps
from psfdeconv.exceptions import (
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    PixelScaleError,
    PSFDeconvError,
    ShapeMismatchError,
)
from psfdeconv.features import KINDS, make_channels, make_cube
from psfdeconv.measure import image_moments

#: One settings object for the module: small, reproducible (derandomize, no database), no
#: per-example deadline (the first FFT plans of a run are slow on a loaded CI machine).
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

STAMP_SIZES = (16, 32)

#: Pixel values: zero or magnitudes in [1e-3, 1e3] of either sign. Magnitudes far below
#: float32's range (1e-300) are not "moderate": the float32 channels would underflow to 0.
MODERATE = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))
NON_NEGATIVE = st.one_of(st.just(0.0), st.floats(1e-3, 1e3))
SEEDS = st.integers(0, 2**32 - 1)


# --- strategies ------------------------------------------------------------------------------


def _blobs(rng, shape, *, n_blobs, flux_scale):
    """Sum of elliptical Gaussian blobs at random positions, shape (..., ny, nx), >= 0."""
    ny, nx = shape[-2:]
    y, x = np.mgrid[0:ny, 0:nx]
    images = np.zeros(shape)
    for index in np.ndindex(shape[:-2]):
        for _ in range(n_blobs):
            x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
            sigma_x, sigma_y = rng.uniform(0.5, nx / 4, 2)
            theta = rng.uniform(0, np.pi)
            c, s = np.cos(theta), np.sin(theta)
            major = c * (x - x0) + s * (y - y0)
            minor = -s * (x - x0) + c * (y - y0)
            images[index] += rng.uniform(0.1, 1.0) * flux_scale * np.exp(
                -0.5 * ((major / sigma_x)**2 + (minor / sigma_y)**2))
    return images


@st.composite
def images(draw, shape, *, non_negative=False):
    """Finite float64 images of ``shape``: hypothesis-drawn pixels (mostly one fill value
    with a few others: constants, spikes, all-zero), or seeded noise and/or Gaussian
    sources with a random overall scale."""
    kind = draw(st.sampled_from(['pixels', 'sources', 'noise']))
    if kind == 'pixels':
        return draw(hnp.arrays(np.float64, shape,
                               elements=NON_NEGATIVE if non_negative else MODERATE))
    rng = np.random.default_rng(draw(SEEDS))
    scale = draw(st.floats(1e-2, 1e3))
    out = _blobs(rng, shape, n_blobs=draw(st.integers(1, 3)), flux_scale=scale)
    if kind == 'noise':
        noise = rng.normal(0, draw(st.floats(1e-3, 1.0)) * scale, shape)
        out = np.abs(out + noise) if non_negative else out + noise
    return out


@st.composite
def stamp_shapes(draw):
    """(n, n_bands, size, size) with n, n_bands in 1-3 and size 16 or 32."""
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
            *(2 * [draw(st.sampled_from(STAMP_SIZES))]))


def _profile(kind, size, rng):
    """A positive, centred, unit-sum PSF image of odd ``size`` with its maximum at the
    centre pixel: elliptical Gaussian, elliptical Moffat, or any positive array."""
    centre = size // 2
    y, x = np.mgrid[0:size, 0:size] - centre
    if kind == 'positive':
        psf = rng.uniform(1e-3, 1.0, (size, size))
        psf[centre, centre] = 1.5
        return psf / psf.sum()
    width = rng.uniform(0.3, 5.0)
    axis_ratio = rng.uniform(0.3, 1.0)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    r2 = ((c * x + s * y) / width)**2 + ((-s * x + c * y) / (axis_ratio * width))**2
    if kind == 'gaussian':
        psf = np.exp(-0.5 * r2)
    else:
        psf = (1.0 + r2) ** (-rng.uniform(1.5, 5.0))
    return psf / psf.sum()


@st.composite
def psf_stacks(draw, n, n_bands, max_size, *, sizes=None):
    """Valid PSFs (n, n_bands, k, k), k odd <= max_size (or one of ``sizes``): each a
    Gaussian, a Moffat or any positive array, peaked at the centre pixel, unit sum."""
    size = draw(st.sampled_from(sizes or list(range(1, max_size + 1, 2))))
    rng = np.random.default_rng(draw(SEEDS))
    kinds = draw(st.lists(st.sampled_from(['gaussian', 'moffat', 'positive']),
                          min_size=n * n_bands, max_size=n * n_bands))
    psfs = np.stack([_profile(kind, size, rng) for kind in kinds])
    return psfs.reshape(n, n_bands, size, size)


@st.composite
def valid_inputs(draw, *, min_psf_size=1):
    """(stamps, psfs, pixel_scale) that `validate_stamps` accepts: PSFs of any positive sum,
    pixel scales a scalar or one per object."""
    shape = draw(stamp_shapes())
    n, n_bands, size, _ = shape
    stamps = draw(images(shape))
    psfs = draw(psf_stacks(n, n_bands, size, sizes=list(range(min_psf_size, size + 1, 2))))
    psfs = psfs * draw(st.floats(1e-3, 1e3))
    scales = st.floats(0.02, 1.0)
    pixel_scale = draw(st.one_of(scales, hnp.arrays(np.float64, (n,), elements=scales)))
    return stamps, psfs, pixel_scale


KIND_SUBSETS = st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True)


# --- features: channels and cube -------------------------------------------------------------


@PROPERTY
@given(inputs=valid_inputs(), kinds=KIND_SUBSETS)
def test_channels_and_cube_are_finite_and_scaled(inputs, kinds):
    stamps, psfs, pixel_scale = inputs
    _, psfs, pixel_scale = validate_stamps(stamps, psfs, pixel_scale)
    channels = make_channels(stamps, psfs, pixel_scale=pixel_scale, kinds=kinds)
    n, n_bands, ny, nx = stamps.shape
    assert channels.shape == (n, len(kinds), n_bands, ny, nx)
    assert np.isfinite(channels).all()

    cube, scale = make_cube(stamps, psfs, pixel_scale=pixel_scale, kinds=kinds)
    assert cube.shape == (n, ny, nx, len(kinds) * n_bands)
    assert cube.dtype == np.float32
    assert np.isfinite(cube).all() and np.isfinite(scale).all() and (scale > 0).all()
    for i in range(n):
        if np.any(channels[i] != 0):
            # x / x is exactly 1 in IEEE arithmetic: the maximum is 1, not merely close.
            assert np.abs(cube[i]).max() == 1.0
        else:
            assert_array_equal(cube[i], 0.0)
            assert scale[i] == 1.0
    # The cube is the channels divided by the scale, kind-major along the last axis.
    restacked = channels.reshape(n, len(kinds) * n_bands, ny, nx).transpose(0, 2, 3, 1)
    assert_allclose(cube * scale[:, None, None, None], restacked, rtol=1e-6,
                    atol=1e-6 * np.abs(channels).max())


@PROPERTY
@given(data=st.data(), kinds=KIND_SUBSETS,
       a=st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3),
       b=st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3))
def test_channels_are_linear_in_the_stamps(data, kinds, a, b):
    shape = data.draw(stamp_shapes())
    first = data.draw(images(shape))
    second = data.draw(images(shape))
    psfs = data.draw(psf_stacks(shape[0], shape[1], shape[2]))
    pixel_scale = data.draw(st.floats(0.02, 1.0))

    def channels(stamps):
        return make_channels(stamps, psfs, pixel_scale=pixel_scale, kinds=kinds).astype(float)

    c1, c2 = channels(first), channels(second)
    combined = channels(a * first + b * second)
    # The channels are float32 (relative rounding 6e-8 per value) of float64 FFTs whose
    # rounding is relative to the largest input (~1e-15 x the filter gain, <= ~1e3 for the
    # iPSF1 inverse): 1e-5 of the terms' magnitudes plus 1e-9 of the stamps' bounds both.
    atol = (1e-5 * (abs(a) * np.abs(c1).max() + abs(b) * np.abs(c2).max())
            + 1e-9 * (abs(a) * np.abs(first).max() + abs(b) * np.abs(second).max()))
    assert_allclose(combined, a * c1 + b * c2, rtol=0, atol=atol)


@PROPERTY
@given(data=st.data(), dy=st.integers(-4, 4), dx=st.integers(-4, 4))
def test_psf_channel_is_translation_equivariant(data, dy, dx):
    """A source away from the edges, shifted by whole pixels, gives the shifted PSF
    channel: the 'psf' kind is a linear convolution, and nothing reaches the border."""
    n, n_bands, size, _ = data.draw(stamp_shapes())
    psfs = data.draw(psf_stacks(n, n_bands, size // 2 - 1))
    # The source lies in the central box; the PSF (half width h) and the shift together
    # stay within the stamp: margin = h + 4 pixels.
    margin = psfs.shape[-1] // 2 + 4
    inner = data.draw(images((n, n_bands, size - 2 * margin, size - 2 * margin)))
    stamps = np.zeros((n, n_bands, size, size))
    stamps[..., margin:size - margin, margin:size - margin] = inner
    shifted = np.roll(stamps, (dy, dx), axis=(-2, -1))

    channels = make_channels(np.stack([stamps, shifted]).reshape(2 * n, n_bands, size, size),
                             np.concatenate([psfs, psfs]), pixel_scale=0.2, kinds=['psf'])
    expected = np.roll(channels[:n], (dy, dx), axis=(-2, -1))
    assert_allclose(channels[n:], expected, rtol=0,
                    atol=1e-6 * max(np.abs(channels).max(), 1e-300))


# --- convolve_same ---------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), kernel_size=st.integers(0, 20).map(lambda k: 2 * k + 1))
def test_convolve_same_with_a_delta_kernel_is_the_identity(data, kernel_size):
    image = data.draw(images(data.draw(stamp_shapes())))
    delta = np.zeros((kernel_size, kernel_size))
    delta[kernel_size // 2, kernel_size // 2] = 1.0
    out = convolve_same(image, delta)
    assert out.shape == image.shape
    # FFT round-off only: ~1e-16 x log(N) of the largest pixel.
    assert_allclose(out, image, rtol=0, atol=1e-12 * np.abs(image).max())


@PROPERTY
@given(data=st.data())
def test_convolve_same_conserves_the_sum_away_from_the_edges(data):
    n, n_bands, size, _ = data.draw(stamp_shapes())
    kernels = data.draw(psf_stacks(n, n_bands, size - 2))
    kernels = kernels * data.draw(st.floats(1e-3, 1e3))
    half = kernels.shape[-1] // 2
    # Everything the kernel spreads the image into lies on the stamp.
    image = np.zeros((n, n_bands, size, size))
    image[..., half:size - half, half:size - half] = data.draw(
        images((n, n_bands, size - 2 * half, size - 2 * half)))
    out = convolve_same(image, kernels)
    assert np.isfinite(out).all()
    expected = image.sum(axis=(-2, -1)) * kernels.sum(axis=(-2, -1))
    bound = np.abs(image).sum(axis=(-2, -1)) * np.abs(kernels).sum(axis=(-2, -1))
    assert_allclose(out.sum(axis=(-2, -1)), expected, rtol=0, atol=1e-10 * bound.max())


# --- amplitude refit -------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_refit_amplitude_of_a_scaled_reconvolution_is_exact(data):
    shape = data.draw(stamp_shapes())
    n, n_bands, size, _ = shape
    model = data.draw(images(shape))
    # Non-zero model images (a zero image has no amplitude by definition).
    blank = ~np.any(model != 0, axis=(-2, -1))
    model[blank, size // 2, size // 2] = 1.0
    psfs = data.draw(psf_stacks(n, n_bands, size))
    amplitude_true = data.draw(hnp.arrays(np.float64, (n, n_bands),
                                          elements=st.floats(1e-3, 1e3)))
    observed = amplitude_true[..., None, None] * convolve_same(model, psfs)

    amplitude, amplitude_err, noise_sigma = refit_amplitude(model, observed, psfs,
                                                            noise_sigma=1.0)
    # sum(P~ (a P~)) / sum(P~^2): every term is a P~^2 to one rounding, so the ratio is a.
    assert_allclose(amplitude, amplitude_true, rtol=1e-8)
    assert np.isfinite(amplitude_err).all() and (amplitude_err > 0).all()
    # With the noise estimated from the (zero) residuals: still exact and finite.
    amplitude, amplitude_err, noise_sigma = refit_amplitude(model, observed, psfs)
    assert_allclose(amplitude, amplitude_true, rtol=1e-8)
    assert np.isfinite(noise_sigma).all() and (noise_sigma >= 0).all()
    assert np.isfinite(amplitude_err).all()


# --- measure.image_moments -------------------------------------------------------------------


def _image_stacks(*, non_negative=True, size=None):
    return st.tuples(st.integers(1, 4), st.sampled_from(STAMP_SIZES)).flatmap(
        lambda shape: images((shape[0], size or shape[1], size or shape[1]),
                             non_negative=non_negative))


@PROPERTY
@given(stack=_image_stacks())
def test_image_moments_ellipticity_is_bounded_for_non_negative_images(stack):
    m = image_moments(stack)
    positive = stack.sum(axis=(-2, -1)) > 0
    # Where the flux is positive the centroid is on the stamp and the moments are finite
    # (a single bright pixel has zero second moments: NaN shapes are allowed there).
    assert np.isfinite(m['x'][positive]).all() and np.isfinite(m['y'][positive]).all()
    assert (m['x'][positive] >= 0).all() and (m['x'][positive] <= stack.shape[-1] - 1).all()
    assert (m['y'][positive] >= 0).all() and (m['y'][positive] <= stack.shape[-2] - 1).all()
    assert np.isnan(m['e1'][~positive]).all()
    for key in ('e1', 'e2', 'e'):
        values = m[key][np.isfinite(m[key])]
        # |e| <= 1 by Cauchy-Schwarz (Mxy^2 <= Mxx Myy); 1e-12 of room for rounding.
        assert (np.abs(values) <= 1 + 1e-12).all(), (key, values)
    sizes = m['size'][np.isfinite(m['size'])]
    assert (sizes >= 0).all()
    assert np.isinf(m['flux']).sum() == 0


@PROPERTY
@given(stack=_image_stacks(non_negative=False), factor=st.floats(1e-3, 1e3))
def test_image_moments_flux_is_linear(stack, factor):
    base = image_moments(stack)
    scaled = image_moments(factor * stack)
    # Rounding of a sum of N terms is relative to the sum of their magnitudes.
    bound = np.abs(stack).sum(axis=(-2, -1)).max()
    assert_allclose(scaled['flux'], factor * base['flux'], rtol=0, atol=1e-12 * factor * bound)
    assert_allclose(image_moments(-stack)['flux'], -base['flux'], rtol=0, atol=0)


@PROPERTY
@given(stack=_image_stacks(), factor=st.floats(1e-3, 1e3))
def test_image_moments_shape_is_invariant_under_positive_scaling(stack, factor):
    base = image_moments(stack)
    scaled = image_moments(factor * stack)
    for key in ('x', 'y'):
        assert_allclose(scaled[key], base[key], rtol=1e-10, atol=1e-9)
    # Sizes and shapes where the second moments exist: single-pixel images have none
    # (see test_image_moments_of_a_single_pixel_have_no_shape).
    resolved = np.count_nonzero(stack, axis=(-2, -1)) >= 2
    for key in ('size', 'e1', 'e2'):
        assert_allclose(scaled[key][resolved], base[key][resolved], rtol=1e-9, atol=1e-9)


@PROPERTY
@given(data=st.data(), dy=st.integers(-5, 5), dx=st.integers(-5, 5))
def test_image_moments_are_translation_equivariant(data, dy, dx):
    """np.roll-ed images (nothing wraps: the content is 5 pixels from the edges) move the
    centroid by exactly the shift and leave size and shape unchanged."""
    n, size = data.draw(st.integers(1, 4)), data.draw(st.sampled_from(STAMP_SIZES))
    stack = np.zeros((n, size, size))
    stack[:, 5:size - 5, 5:size - 5] = data.draw(images((n, size - 10, size - 10),
                                                        non_negative=True))
    base = image_moments(stack)
    moved = image_moments(np.roll(stack, (dy, dx), axis=(-2, -1)))
    assert_allclose(moved['flux'], base['flux'], rtol=1e-12)
    assert_allclose(moved['x'], base['x'] + dx, rtol=0, atol=1e-9)
    assert_allclose(moved['y'], base['y'] + dy, rtol=0, atol=1e-9)
    # Sizes and shapes where the second moments exist (two pixels or more, as above).
    resolved = np.count_nonzero(stack, axis=(-2, -1)) >= 2
    for key in ('size', 'e1', 'e2'):
        assert_allclose(moved[key][resolved], base[key][resolved], rtol=1e-9, atol=1e-9)


@PROPERTY
@given(value=st.floats(1e-3, 1e3), y=st.integers(0, 31), x=st.integers(0, 31))
def test_image_moments_of_a_single_pixel_have_no_shape(value, y, x):
    """All the flux in one pixel: Mxx = Myy = Mxy = 0, for which image_moments documents
    NaN ellipticities and size, whatever the pixel's value and position."""
    image = np.zeros((32, 32))
    image[y, x] = value
    m = image_moments(image)
    assert m['flux'] == value
    assert_allclose([m['x'], m['y']], [x, y], rtol=0, atol=1e-12)
    # Rounding in the centroid (e.g. 0.1 * 3 / 0.1 = 3.0000000000000004) must not turn the
    # zero second moments into a size of 1e-15 pixel and an |e| = 1 "shape".
    assert np.isnan(m['e1']) and np.isnan(m['e2']) and np.isnan(m['e']), m
    assert np.isnan(m['size']) or m['size'] == 0, m


@PROPERTY
@given(stack=_image_stacks(non_negative=False), data=st.data(),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_image_moments_rejects_non_finite_pixels(stack, data, value):
    index = tuple(data.draw(st.integers(0, s - 1)) for s in stack.shape)
    stack[index] = value
    with pytest.raises(InvalidPixelsError, match='non-finite') as info:
        image_moments(stack)
    assert_input_error(info.value)
    assert str(index) in str(info.value)


# --- validate_stamps: every invalid class raises its documented error ------------------------


def assert_input_error(error):
    """Every bad-input error is a ValueError and a PSFDeconvError with exit code 3."""
    assert isinstance(error, ValueError)
    assert isinstance(error, PSFDeconvError)
    assert isinstance(error, InvalidInputError)
    assert error.exit_code == 3


def check_refused(error_class, match, stamps, psfs, pixel_scale):
    with pytest.raises(error_class, match=match) as info:
        validate_stamps(stamps, psfs, pixel_scale)
    assert_input_error(info.value)
    return str(info.value)


@PROPERTY
@given(inputs=valid_inputs())
def test_validate_stamps_accepts_valid_inputs(inputs):
    stamps, psfs, pixel_scale = inputs
    out_stamps, out_psfs, out_scale = validate_stamps(stamps, psfs, pixel_scale)
    assert_array_equal(out_stamps, stamps)
    assert_allclose(out_psfs.sum(axis=(-2, -1)), 1.0, rtol=1e-12)
    assert out_scale.shape == (stamps.shape[0],)


@PROPERTY
@given(inputs=valid_inputs(), data=st.data(),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_validate_stamps_rejects_a_non_finite_pixel(inputs, data, value):
    stamps, psfs, pixel_scale = inputs
    index = tuple(data.draw(st.integers(0, s - 1), label=f'index{k}')
                  for k, s in enumerate(stamps.shape))
    stamps = stamps.copy()
    stamps[index] = value
    message = check_refused(InvalidPixelsError, 'non-finite', stamps, psfs, pixel_scale)
    assert str(index) in message


@PROPERTY
@given(inputs=valid_inputs(), data=st.data())
def test_validate_stamps_rejects_masked_pixels(inputs, data):
    stamps, psfs, pixel_scale = inputs
    mask = data.draw(hnp.arrays(bool, stamps.shape).filter(np.any))
    check_refused(InvalidPixelsError, f'{int(mask.sum())} masked',
                  np.ma.masked_array(stamps, mask=mask), psfs, pixel_scale)


@PROPERTY
@given(inputs=valid_inputs(), data=st.data(),
       how=st.sampled_from(['zero', 'negative', 'nan', 'inf', '-inf']))
def test_validate_stamps_rejects_a_psf_without_positive_finite_sum(inputs, data, how):
    stamps, psfs, pixel_scale = inputs
    psfs = psfs.copy()
    i = data.draw(st.integers(0, psfs.shape[0] - 1), label='object')
    b = data.draw(st.integers(0, psfs.shape[1] - 1), label='band')
    if how == 'zero':
        psfs[i, b] = 0.0
    elif how == 'negative':
        psfs[i, b] *= -data.draw(st.floats(1e-3, 1e3))
    else:
        y = data.draw(st.integers(0, psfs.shape[2] - 1), label='y')
        x = data.draw(st.integers(0, psfs.shape[3] - 1), label='x')
        psfs[i, b, y, x] = float(how)
    message = check_refused(InvalidPSFError, rf'psfs\[{i}, {b}\] sums to', stamps, psfs,
                            pixel_scale)
    assert 'positive, finite sum' in message


@PROPERTY
@given(inputs=valid_inputs(), data=st.data())
def test_validate_stamps_rejects_an_even_psf_size(inputs, data):
    stamps, _, pixel_scale = inputs
    n, n_bands, size, _ = stamps.shape
    shape = data.draw(st.tuples(st.integers(2, size), st.integers(2, size)).filter(
        lambda s: s[0] % 2 == 0 or s[1] % 2 == 0))
    psfs = np.ones((n, n_bands) + shape)
    message = check_refused(InvalidPSFError, 'odd sizes', stamps, psfs, pixel_scale)
    assert str(shape) in message


@PROPERTY
@given(inputs=valid_inputs(), data=st.data())
def test_validate_stamps_rejects_a_psf_larger_than_the_stamp(inputs, data):
    stamps, _, pixel_scale = inputs
    n, n_bands, size, _ = stamps.shape
    odd = st.integers(0, size // 2 + 5).map(lambda k: 2 * k + 1)
    shape = data.draw(st.tuples(odd, odd).filter(lambda s: max(s) > size))
    psfs = np.zeros((n, n_bands) + shape)
    psfs[..., shape[0] // 2, shape[1] // 2] = 1.0
    message = check_refused(InvalidPSFError, 'larger than the stamps', stamps, psfs,
                            pixel_scale)
    assert str(shape) in message


@PROPERTY
@given(inputs=valid_inputs(min_psf_size=5), data=st.data())
def test_validate_stamps_rejects_an_off_centre_psf_peak(inputs, data):
    stamps, psfs, pixel_scale = inputs
    psfs = psfs.copy()
    k = psfs.shape[-1]
    i = data.draw(st.integers(0, psfs.shape[0] - 1), label='object')
    b = data.draw(st.integers(0, psfs.shape[1] - 1), label='band')
    # More than one pixel from the centre on some axis (one pixel off is accepted).
    y, x = data.draw(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)).filter(
        lambda p: max(abs(p[0] - k // 2), abs(p[1] - k // 2)) > 1))
    psfs[i, b, y, x] = 2 * psfs[i, b].max()
    message = check_refused(InvalidPSFError, rf'psfs\[{i}, {b}\] peaks at pixel', stamps,
                            psfs, pixel_scale)
    assert f'({y}, {x})' in message and f'({k // 2}, {k // 2})' in message


@PROPERTY
@given(inputs=valid_inputs(), data=st.data(),
       how=st.sampled_from(['objects', 'bands', 'psf ndim', 'stamp ndim', 'scale length']))
def test_validate_stamps_rejects_mismatched_shapes(inputs, data, how):
    stamps, psfs, pixel_scale = inputs
    n, n_bands = stamps.shape[:2]
    other = data.draw(st.integers(1, 4))
    if how == 'objects':
        psfs = np.repeat(psfs[:1], other if other != n else n + 1, axis=0)
        match = 'psfs must have shape'
    elif how == 'bands':
        psfs = np.repeat(psfs[:, :1], other if other != n_bands else n_bands + 1, axis=1)
        match = 'psfs must have shape'
    elif how == 'psf ndim':
        psfs = psfs[0]
        match = 'psfs must have shape'
    elif how == 'stamp ndim':
        stamps = stamps[0] if data.draw(st.booleans()) else stamps[None]
        match = r'stamps must have shape \(n, n_bands, ny, nx\)'
    else:
        pixel_scale = np.full(other if other != n else n + 1, 0.2)
        match = 'pixel_scale must be a scalar or have shape'
    check_refused(ShapeMismatchError, match, stamps, psfs, pixel_scale)


@PROPERTY
@given(inputs=valid_inputs(), data=st.data(),
       bad=st.one_of(st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf]),
                     st.floats(-1e3, -1e-6)),
       form=st.sampled_from(['scalar', 'array', 'quantity']))
def test_validate_stamps_rejects_a_bad_pixel_scale(inputs, data, bad, form):
    stamps, psfs, _ = inputs
    n = stamps.shape[0]
    i = 0
    if form == 'scalar':
        pixel_scale = bad
    else:
        i = data.draw(st.integers(0, n - 1), label='object')
        pixel_scale = np.full(n, 0.2)
        pixel_scale[i] = bad
        if form == 'quantity':
            pixel_scale = pixel_scale * u.arcsec / u.pix
    message = check_refused(PixelScaleError, 'must be positive and finite', stamps, psfs,
                            pixel_scale)
    assert f'pixel_scale[{i}] = ' in message
