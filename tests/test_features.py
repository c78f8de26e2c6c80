# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.features: the PSF / iPSF / iPSF1 channels and the input cube."""

import numpy as np
import pytest
from _images import elliptical_gaussian as gaussian
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage

from psfdeconv._fourier import convolve_same, kernel_fft
from psfdeconv.exceptions import ConfigError
from psfdeconv.features import (
    KINDS,
    cube_scale,
    inverse_filter_fft,
    make_channels,
    make_cube,
)


def moffat(size, fwhm, beta):
    """Circular Moffat profile on an odd ``size`` grid, centred, unit sum."""
    y, x = np.mgrid[0:size, 0:size] - size // 2
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    image = (1 + (x**2 + y**2) / alpha**2) ** (-beta)
    return image / image.sum()


def delta_psfs(n, n_bands, size=5):
    psfs = np.zeros((n, n_bands, size, size))
    psfs[..., size // 2, size // 2] = 1.0
    return psfs


@pytest.fixture(scope='module')
def noiseless():
    """A 64x64 galaxy (elliptical Gaussian, centre near the middle, > 8 sigma from the edges),
    two 25x25 PSFs (a Gaussian and a Moffat) and the noiseless observations (linear
    convolution): arrays (truth (64, 64), psfs (2, 25, 25), observed (2, 64, 64))."""
    truth = gaussian((64, 64), 3.0, 2.0, 0.4, 31.6, 32.3, flux=500.0)
    psfs = np.stack([gaussian((25, 25), 1.5, 1.5, 0.0, 12, 12), moffat(25, 3.0, 3.5)])
    observed = convolve_same(truth[None], psfs)
    return truth, psfs, observed


# --- the three kinds on analytic cases -------------------------------------------------------


def test_delta_psf_is_identity_for_psf_channel():
    stamps = np.random.default_rng(0).normal(size=(2, 3, 16, 16))
    channels = make_channels(stamps, delta_psfs(2, 3), pixel_scale=0.2)
    assert channels.shape == (2, 3, 3, 16, 16)
    assert channels.dtype == np.float32
    # float32 output: 1e-6 absolute on unit-variance data is a few ulps.
    assert_allclose(channels[:, 0], stamps, atol=1e-6)
    # With a delta PSF |P^| = 1 at every frequency, so the Tikhonov inverse is exactly
    # 1 / (1 + r): the iPSF channel is the stamp divided by 1 + 1e-3.
    assert_allclose(channels[:, 1], stamps / (1 + 1e-3), atol=1e-6)


def test_ipsf_channel_reproduces_truth(noiseless):
    truth, psfs, observed = noiseless
    rms = {}
    for r in (1e-3, 1e-6):
        channels = make_channels(observed[:, None], psfs[:, None], pixel_scale=0.25,
                                 kinds=['ipsf'], regularization=r)
        ipsf = channels[:, 0, 0].astype(np.float64)
        # The zero frequency is damped by exactly |P(0)|^2 / (|P(0)|^2 + r) = 1 / (1 + r)
        # (unit-sum PSF, and max |P|^2 is at k = 0): the flux is truth / (1 + r).
        assert_allclose(ipsf.sum(axis=(-2, -1)), truth.sum() / (1 + r), rtol=1e-5)
        rms[r] = np.sqrt(((ipsf - truth) ** 2).mean(axis=(-2, -1))) / truth.max()
    # Tikhonov bias: frequencies are multiplied by |P|^2 / (|P|^2 + r max|P|^2) instead
    # of 1, so the residual is of order r times the truth's power where the PSF is weak.
    # Measured RMS / max(truth): 2.0e-4 (Gaussian) and 1.9e-4 (Moffat) at r = 1e-3,
    # 3.7e-7 and 1.9e-7 at r = 1e-6. Bounds: 2.5x the measured values.
    assert (rms[1e-3] < 5e-4).all(), rms
    assert (rms[1e-6] < 1e-6).all(), rms
    # ... and the residual shrinks with the regularisation (roughly in proportion to it).
    assert (rms[1e-6] < rms[1e-3] / 100).all(), rms


@pytest.mark.parametrize('pixel_scale', [0.25, np.array([0.25, 0.2])])
def test_ipsf1_channel_is_truth_convolved_with_1_arcsec_gaussian(noiseless, pixel_scale):
    truth, psfs, observed = noiseless
    channels = make_channels(observed[:, None], psfs[:, None], pixel_scale=pixel_scale,
                             kinds=['ipsf1'])
    scales = np.broadcast_to(pixel_scale, (2,))
    for i in range(2):
        # Independent reference: scipy's sampled Gaussian of sigma 1 arcsec in pixels
        # (4 and 5 px: aliasing of the analytic transform is ~exp(-79), negligible), with
        # zero padding as in our linear convolution.
        expected = ndimage.gaussian_filter(truth, 1.0 / scales[i], mode='constant',
                                           truncate=10)
        # The inverse filter (r = 1e-6) is exact wherever |P|^2 >> 1e-6, i.e. at all
        # frequencies the 4-5 px Gaussian lets through; what remains is the 1 / (1 + 1e-6)
        # at k = 0 and float32 rounding: measured max |diff| / max = 1.3e-6.
        assert_allclose(channels[i, 0, 0], expected, rtol=0, atol=1e-5 * expected.max())


def test_inverse_filter_matches_photutils_wiener_kernel():
    # photutils' make_wiener_kernel (penalty=None) is
    #     K = ifft[ T S* / (|S|^2 + r max|S|^2) ],  normalised to unit sum,
    # with S, T the FFTs of the source and target PSFs on the PSF's own grid. For a delta
    # target at the centre, T S* = S0* with S0 the FFT of the PSF centred at index 0, so K is
    # our inverse_filter_fft(S0, r) transformed back and normalised (its sum is 1 / (1 + r)).
    from photutils.psf_matching import make_wiener_kernel

    psf = gaussian((25, 25), 2.0, 1.4, 0.6, 12, 12)
    target = np.zeros_like(psf)
    target[12, 12] = 1.0
    for r in (1e-3, 1e-4):
        expected = make_wiener_kernel(psf, target, regularization=r)
        transform = inverse_filter_fft(kernel_fft(psf, psf.shape), r)
        ours = np.fft.fftshift(np.fft.irfft2(transform, s=psf.shape))
        assert_allclose(ours.sum(), 1 / (1 + r), rtol=1e-10)
        # Same float64 arithmetic up to FFT rounding.
        assert_allclose(ours / ours.sum(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_inverse_filter_fft_formula():
    rng = np.random.default_rng(3)
    transform = rng.normal(size=(2, 8, 5)) + 1j * rng.normal(size=(2, 8, 5))
    result = inverse_filter_fft(transform, 0.1)
    for i in range(2):
        epsilon = 0.1 * (np.abs(transform[i]) ** 2).max()
        expected = np.conj(transform[i]) / (np.abs(transform[i]) ** 2 + epsilon)
        assert_allclose(result[i], expected, rtol=1e-12)


# --- kinds -----------------------------------------------------------------------------------


@pytest.mark.parametrize('kinds', [
    ['psf'], ['ipsf'], ['ipsf1'], ['ipsf1', 'psf'], ['ipsf', 'psf'], ['ipsf1', 'ipsf'],
    ['ipsf1', 'psf', 'ipsf'],
])
def test_kind_subsets_are_stacked_in_canonical_order(kinds):
    rng = np.random.default_rng(1)
    stamps = rng.normal(size=(2, 3, 16, 16))
    psfs = np.broadcast_to(gaussian((5, 5), 1.0, 0.8, 0.2, 2, 2), (2, 3, 5, 5))
    full = make_channels(stamps, psfs, pixel_scale=0.2)
    subset = make_channels(stamps, psfs, pixel_scale=0.2, kinds=kinds)
    canonical = [k for k in KINDS if k in kinds]
    assert subset.shape == (2, len(kinds), 3, 16, 16)
    assert_array_equal(subset, full[:, [KINDS.index(k) for k in canonical]])

    cube, scale = make_cube(stamps, psfs, pixel_scale=0.2, kinds=kinds)
    assert cube.shape == (2, 16, 16, 3 * len(kinds))
    # Kind-major channel order: channel k * n_bands + b is kind k, band b.
    for k, kind in enumerate(canonical):
        for b in range(3):
            assert_allclose(cube[..., k * 3 + b] * scale[:, None, None],
                            full[:, KINDS.index(kind), b], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kinds', [[], ['psf', 'bogus'], ['PSF'], ['psf', 'psf'], 'ipsf2'])
def test_invalid_kinds(kinds):
    stamps = np.zeros((1, 1, 8, 8))
    with pytest.raises(ConfigError, match='kinds must be distinct values among') as info:
        make_channels(stamps, delta_psfs(1, 1, 3), pixel_scale=0.2, kinds=kinds)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        make_cube(stamps, delta_psfs(1, 1, 3), pixel_scale=0.2, kinds=kinds)


# --- scaling, linearity, translation ---------------------------------------------------------


def test_make_cube_scale_is_max_abs_per_object():
    rng = np.random.default_rng(2)
    stamps = rng.normal(size=(4, 3, 16, 16)) * np.array([1.0, 10.0, 0.01, 300.0])[:, None,
                                                                                 None, None]
    psfs = np.broadcast_to(gaussian((7, 7), 1.2, 1.0, 0.0, 3, 3), (4, 3, 7, 7))
    channels = make_channels(stamps, psfs, pixel_scale=0.3)
    cube, scale = make_cube(stamps, psfs, pixel_scale=0.3)
    assert cube.dtype == np.float32
    assert_allclose(np.abs(cube).reshape(4, -1).max(axis=1), 1.0, rtol=1e-6)
    assert_allclose(scale, np.abs(channels).reshape(4, -1).max(axis=1), rtol=1e-6)
    assert_allclose(scale, cube_scale(channels))
    assert cube.flags['C_CONTIGUOUS']


def test_cube_scale_of_all_zero_object_is_one():
    channels = np.zeros((2, 3, 3, 8, 8), dtype=np.float32)
    channels[1, 0, 0, 2, 2] = -4.0
    assert_array_equal(cube_scale(channels), [1.0, 4.0])
    cube, scale = make_cube(np.zeros((1, 1, 8, 8)), delta_psfs(1, 1, 3), pixel_scale=0.2)
    assert_array_equal(scale, [1.0])
    assert_array_equal(cube, 0.0)


def test_channels_are_linear_in_the_stamps():
    rng = np.random.default_rng(4)
    stamps = rng.normal(size=(3, 3, 32, 32))
    other = rng.normal(size=(3, 3, 32, 32))
    psfs = np.broadcast_to(moffat(9, 2.5, 3.0), (3, 3, 9, 9))
    single = make_channels(stamps, psfs, pixel_scale=0.2)
    # float32 output of float64 arithmetic: 1e-5 relative to the channel's range.
    atol = 1e-5 * np.abs(single).max()
    assert_allclose(make_channels(2 * stamps, psfs, pixel_scale=0.2), 2 * single,
                    rtol=0, atol=2 * atol)
    assert_allclose(make_channels(stamps + other, psfs, pixel_scale=0.2),
                    single + make_channels(other, psfs, pixel_scale=0.2), rtol=0, atol=2 * atol)
    # The cube is scale-invariant: the factor goes into `scale`.
    cube, scale = make_cube(stamps, psfs, pixel_scale=0.2)
    cube3, scale3 = make_cube(3 * stamps, psfs, pixel_scale=0.2)
    assert_allclose(cube3, cube, atol=1e-6)
    assert_allclose(scale3, 3 * scale, rtol=1e-6)


def test_channels_are_translation_equivariant():
    psf = gaussian((25, 25), 2.0, 1.6, 0.3, 12, 12)
    centred = gaussian((64, 64), 3.0, 2.0, 0.4, 32, 32, flux=500.0)
    shifted = gaussian((64, 64), 3.0, 2.0, 0.4, 35, 30, flux=500.0)  # dx = +3, dy = -2
    observed = convolve_same(np.stack([centred, shifted])[:, None], psf)
    channels = make_channels(observed, psf, pixel_scale=0.2)
    rolled = np.roll(channels[0], (-2, 3), axis=(-2, -1))
    # Away from the edges (where the roll wraps and the stamp crops) the channels of the
    # shifted source are the shifted channels; the wrapped-around tails of the iPSF
    # kernels reach ~3e-6 of the peak at the borders, ~1e-13 in the inner 40x40 pixels.
    inner = (..., slice(12, 52), slice(12, 52))
    for k in range(3):
        peak = np.abs(channels[0, k]).max()
        assert_allclose(channels[1, k][inner], rolled[k][inner], rtol=0, atol=1e-6 * peak)
    # and the channels are not trivially translation invariant.
    assert not np.allclose(channels[1], channels[0], atol=1e-3 * np.abs(channels[0]).max())


def test_pixel_scale_broadcast_per_object():
    rng = np.random.default_rng(5)
    stamps = rng.normal(size=(2, 1, 32, 32))
    psfs = delta_psfs(2, 1, 3)
    per_object = make_channels(stamps, psfs, pixel_scale=np.array([0.2, 0.4]), kinds=['ipsf1'])
    first = make_channels(stamps, psfs, pixel_scale=0.2, kinds=['ipsf1'])
    second = make_channels(stamps, psfs, pixel_scale=0.4, kinds=['ipsf1'])
    assert_array_equal(per_object[0], first[0])
    assert_array_equal(per_object[1], second[1])
    assert not np.allclose(first[1], second[1])


@pytest.mark.parametrize('kernel_size', [1, 3, 7])
def test_kernel_fft_puts_the_centre_at_the_origin(kernel_size):
    # The reference: the kernel at [:k, :k] rolled by its centre (ifftshift-like).
    import scipy.fft

    rng = np.random.default_rng(kernel_size)
    kernels = rng.normal(size=(2, 3, kernel_size, kernel_size))
    for fft_shape in [(12, 12), (15, 10)]:
        padded = np.zeros((2, 3) + fft_shape)
        padded[..., :kernel_size, :kernel_size] = kernels
        padded = np.roll(padded, (-(kernel_size // 2), -(kernel_size // 2)), axis=(-2, -1))
        np.testing.assert_allclose(kernel_fft(kernels, fft_shape),
                                   scipy.fft.rfft2(padded, axes=(-2, -1)), atol=1e-12)
