# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The float32 per-stamp work of deconvolve_stamps (shared PSF transforms, float32
channels and refits, skipped splines) against float64 references."""

import numpy as np
import pytest
import scipy.fft
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv._fourier import KernelTransforms, convolve_same
from psfdeconv.deconvolve import (
    SHEAR_TOLERANCE,
    SIZE_FACTOR_TOLERANCE,
    correct_psf_leakage,
    correct_size_bias,
    deconvolve_stamps,
    refit_amplitude,
    validate_stamps,
)
from psfdeconv.features import make_channels
from psfdeconv.simulate import simulate_stamps


@pytest.fixture(scope='module')
def sims():
    """16 seeded simulated stamps, validated (float64, unit-sum PSFs)."""
    data = simulate_stamps(16, seed=21)
    stamps, psfs, scale = validate_stamps(data['observed'], data['psf'], data['pixel_scale'])
    return stamps, psfs, scale


def reference_channels(stamps, psfs, pixel_scale, r=1e-3, r1=1e-6, sigma_arcsec=1.0):
    """The PSF, iPSF and iPSF1 channels in float64 with numpy's plain 2-D FFTs."""
    ny, nx = stamps.shape[-2:]
    py, px = psfs.shape[-2:]
    shape = tuple(scipy.fft.next_fast_len(n + k - 1, real=True) for n, k in ((ny, py), (nx, px)))
    padded = np.zeros(psfs.shape[:-2] + shape)
    padded[..., :py, :px] = psfs
    p = np.fft.rfft2(np.roll(padded, (-(py // 2), -(px // 2)), axis=(-2, -1)))
    s = np.fft.rfft2(stamps, s=shape)
    power = np.abs(p) ** 2
    k2 = np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None, :] ** 2
    sigma = sigma_arcsec / np.asarray(pixel_scale)[:, None, None, None]
    gaussian = np.exp(-2 * np.pi**2 * sigma**2 * k2)
    filters = [p, np.conj(p) / (power + r * power.max(axis=(-2, -1), keepdims=True)),
               gaussian * np.conj(p) / (power + r1 * power.max(axis=(-2, -1), keepdims=True))]
    return np.stack([np.fft.irfft2(s * f, s=shape)[..., :ny, :nx] for f in filters], axis=1)


def test_float32_channels_match_float64_reference(sims):
    stamps, psfs, scale = sims
    reference = reference_channels(stamps, psfs, scale)
    channels = make_channels(stamps.astype(np.float32), psfs, pixel_scale=scale)
    # float32 transforms: errors of a few 1e-7 of each object's largest channel value
    # (the iPSF's amplification of high frequencies makes it ~1e-6); 1e-5 is a bound
    # an error in a filter (a wrong sign, scale or shift) exceeds by orders of magnitude.
    peak = np.abs(reference).max(axis=(1, 2, 3, 4), keepdims=True)
    assert np.all(np.abs(channels - reference) <= 1e-5 * peak)
    # float64 stamps keep the float64 path (rounded to float32 at the end).
    assert np.all(np.abs(make_channels(stamps, psfs, pixel_scale=scale) - reference)
                  <= 1e-6 * peak)
    # Shared transforms give the same channels as transforms made from the PSFs.
    shared = KernelTransforms(psfs, stamps.shape[-2:])
    assert_array_equal(make_channels(stamps.astype(np.float32), None, pixel_scale=scale,
                                     psf_transforms=shared), channels)


def test_shared_transforms_convolve_like_convolve_same(sims):
    stamps, psfs, _ = sims
    transforms = KernelTransforms(psfs, stamps.shape[-2:])
    reference = convolve_same(stamps, psfs)
    result = transforms.convolve(stamps)
    assert result.dtype == np.float32
    assert_allclose(result, reference, rtol=0, atol=1e-6 * np.abs(reference).max())
    # A slice of the transforms is the transforms of the slice.
    assert_allclose(transforms[3:5].convolve(stamps[3:5]), reference[3:5], rtol=0,
                    atol=1e-6 * np.abs(reference).max())


def test_float32_refit_matches_float64(sims):
    stamps, psfs, _ = sims
    # Positive model images of the right size: the stamps themselves, clipped.
    model = np.clip(stamps, 0, None)
    reference = refit_amplitude(model, stamps, psfs)
    fast = refit_amplitude(model.astype(np.float32), stamps.astype(np.float32), None,
                           psf_transforms=KernelTransforms(psfs, stamps.shape[-2:]))
    # The sums run in float64: amplitudes within 1e-6 and the noise (medians of float32
    # residuals) within 1e-5; an unaccumulated float32 sum of 4096 pixels, or one of the
    # old float64 temporaries dropped wrongly, would show at 1e-4.
    assert_allclose(fast[0], reference[0], rtol=1e-6)
    assert_allclose(fast[1], reference[1], rtol=1e-5)
    assert_allclose(fast[2], reference[2], rtol=1e-5)
    assert all(value.dtype == np.float64 for value in fast)


def test_deconvolve_stamps_matches_float64_chain(sims):
    """deconvolve_stamps (float32 work, shared transforms) against the same steps
    called one by one in float64 with the shipped model and its corrections."""
    import psfdeconv
    from psfdeconv.deconvolve import refit_images, remove_output_floor
    from psfdeconv.features import make_cube

    stamps, psfs, scale = sims
    model = psfdeconv.load_model()
    images, details = deconvolve_stamps(stamps, psfs, pixel_scale=scale, model=model,
                                        symmetries=1, return_details=True,
                                        precision='float32')
    cube, _ = make_cube(stamps, psfs, pixel_scale=scale, kinds=model.kinds,
                        **model.feature_options)
    output = remove_output_floor(model.predict(cube), model.card['output_floor'])
    first = refit_images(output, stamps, psfs, None)
    output = correct_size_bias(output, first['flux'], first['flux_err'],
                               model.card['size_bias'])
    output = correct_psf_leakage(output, psfs, model.card['psf_leakage'])
    fit = refit_images(output, stamps, psfs, None)
    significant = fit['flux'] / fit['flux_err'] > 5
    assert significant.sum() > 10
    assert_allclose(details['flux'][significant], fit['flux'][significant], rtol=1e-4)
    assert_allclose(details['flux_err'][significant], fit['flux_err'][significant], rtol=1e-4)
    assert images.dtype == np.float32
    detected = details['detected']
    assert_allclose(images[detected], fit['images'][detected], rtol=0,
                    atol=1e-4 * np.abs(fit['images']).max())


def round_source(size=48, sigma=3.0):
    y, x = np.mgrid[:size, :size]
    return np.exp(-0.5 * ((x - 23.6) ** 2 + (y - 24.3) ** 2) / sigma**2)


def test_size_factor_within_tolerance_skips_the_spline():
    image = round_source()[None, None]
    size_bias = {'coefficients': [1.0, 0.0, 0.0], 'log_snr_range': [1.0, 3.0]}
    flux, flux_err = np.array([[100.0]]), np.array([[1.0]])
    # A factor of exactly 1 + tolerance / 2: the image comes back untouched.
    size_bias['coefficients'][0] = 1 + SIZE_FACTOR_TOLERANCE / 2
    assert_array_equal(correct_size_bias(image, flux, flux_err, size_bias), image)
    # Twice the tolerance: dilated, so the pixels change.
    size_bias['coefficients'][0] = 1 + 2 * SIZE_FACTOR_TOLERANCE
    assert not np.array_equal(correct_size_bias(image, flux, flux_err, size_bias), image)


def test_shear_within_tolerance_skips_the_spline():
    image = round_source()[None, None]
    e_psf = 0.1
    psf = np.exp(-0.5 * (((np.mgrid[:15, :15] - 7) ** 2) * np.array([1 - e_psf, 1 + e_psf])
                         [:, None, None]).sum(0) / 2.0**2)[None, None]
    e1 = abs(float(__import__('psfdeconv').measure.image_moments(psf)['e1'][0, 0]))
    # |g| = alpha e / 2: alpha chosen to put it at half and at twice the tolerance.
    small = {'alpha': SHEAR_TOLERANCE / e1}
    assert_array_equal(correct_psf_leakage(image, psf, small), image)
    large = {'alpha': 4 * SHEAR_TOLERANCE / e1}
    assert not np.array_equal(correct_psf_leakage(image, psf, large), image)


def test_separable_dilation_matches_scipy_affine_transform():
    """dilate_images maps all images at once with matrix products; each must equal
    scipy's cubic spline about its centroid (mode 'constant', edges included)."""
    from scipy import ndimage

    from psfdeconv.measure import image_moments
    from psfdeconv.transforms import dilate_images

    rng = np.random.default_rng(8)
    y, x = np.mgrid[:40, :40]
    # Off-centre sources, so that the edges (mirrored coefficients, zeros outside) matter.
    images = np.stack([np.exp(-0.5 * ((x - 12 - 2 * i) ** 2 + (y - 25 + i) ** 2) / (1 + i) ** 2)
                       for i in range(6)]) + rng.uniform(0, 1e-2, (6, 40, 40))
    dilation = np.array([-0.3, -0.05, 0.0, 0.02, 0.25, 0.6])
    result = dilate_images(images, dilation)
    moments = image_moments(images)
    for image, d, out, cy, cx in zip(images, dilation, result, moments['y'], moments['x'],
                                     strict=True):
        matrix = np.eye(2) / (1 + d)
        centre = np.array([cy, cx])
        expected = ndimage.affine_transform(image, matrix, offset=centre - matrix @ centre,
                                            order=3, mode='constant') / (1 + d) ** 2
        expected = np.clip(expected if d else image, 0, None)
        assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_psf_fwhm_matches_galsim():
    """The vectorised FWHM is GalSim's calculateFWHM of the symmetrised PSF, also for
    PSFs whose half maximum lies beyond the innermost 256 pixels."""
    import galsim

    from psfdeconv.deconvolve import psf_fwhm
    from psfdeconv.transforms import square_symmetry

    y, x = np.mgrid[:41, :41] - 20
    psfs = np.stack([np.exp(-0.5 * (x**2 / s**2 + y**2 / (1.3 * s) ** 2))
                     for s in (0.4, 1.0, 2.7, 9.0, 15.0)])
    round_psfs = np.mean([square_symmetry(psfs, t) for t in range(8)], axis=0)
    expected = [galsim.Image(np.ascontiguousarray(p), scale=1.0).calculateFWHM() * 0.2
                for p in round_psfs]
    assert_allclose(psf_fwhm(psfs, 0.2), expected, rtol=1e-12)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('n', [4096, 4095, 2, 1])
def test_median_rows_is_numpy_median(dtype, n):
    """One selection per row gives np.median's values exactly, ties and NaN included."""
    from psfdeconv.deconvolve import _median_rows

    rng = np.random.default_rng(n)
    for scale in (1e-4, 1.0, 3e5):
        values = (rng.normal(size=(40, n)) * scale).astype(dtype)
        for rows in (values, np.round(values)):
            expected = np.median(rows, axis=-1)
            got = _median_rows(rows.copy())
            assert got.dtype == expected.dtype
            assert_array_equal(got, expected)
    values[3, 0] = np.nan
    values[5, -1] = np.inf
    assert_array_equal(_median_rows(values.copy()), np.median(values, axis=-1))
