# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.deconvolve: input checks, amplitude refit, flux bias, the stamp API."""

import warnings

import numpy as np
import pytest
from _images import elliptical_gaussian as gaussian
from astropy import units as u
from numpy.testing import assert_allclose, assert_array_equal
from scipy.signal import fftconvolve

from psfdeconv.calibrate import fit_flux_bias, fit_psf_leakage, fit_size_bias
from psfdeconv.deconvolve import (
    correct_flux_bias,
    correct_psf_leakage,
    correct_size_bias,
    deconvolve_stamps,
    estimate_noise_sigma,
    light_radius,
    normalize_psfs,
    psf_ellipticity,
    refit_amplitude,
    residual_flux,
    symmetric_output,
    validate_stamps,
)
from psfdeconv.exceptions import (
    BandCountError,
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    OutsideTrainingRangeWarning,
    PixelScaleError,
    ShapeMismatchError,
)
from psfdeconv.measure import image_moments
from psfdeconv.simulate import read_simulation
from psfdeconv.transforms import dilate_images, shear_images


@pytest.fixture(scope='module')
def valid_inputs():
    """2 objects x 3 bands of 32x32 noise stamps and 9x9 Gaussian PSFs."""
    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(2, 3, 32, 32))
    psfs = np.broadcast_to(gaussian((9, 9), 1.5, 1.2, 0.3, 4, 4), (2, 3, 9, 9)).copy()
    return stamps, psfs


@pytest.fixture(scope='module')
def test_stamps(tiny_simulation_path):
    """The first 12 objects of the shared simulation (inside the tiny model's training range)."""
    return read_simulation(tiny_simulation_path, 0, 12)


# --- amplitude refit -------------------------------------------------------------------------


def test_refit_amplitude_exact_on_noiseless_stamps():
    n, n_bands = 2, 3
    model = np.stack([[gaussian((32, 32), 2.0 + b, 1.5, 0.2 * i, 15.2, 16.7)
                       for b in range(n_bands)] for i in range(n)])
    psfs = np.stack([[gaussian((9, 9), 1.0 + 0.2 * b, 1.3, 0.5, 4, 4) for b in range(n_bands)]
                     for i in range(n)])
    scales = np.array([[2.5, 0.3, 17.0], [1e-3, 1.0, 400.0]])
    # Independent forward model: scipy's 'same' convolution (odd kernels are centred).
    reconvolved = np.stack([[fftconvolve(model[i, b], psfs[i, b], mode='same')
                             for b in range(n_bands)] for i in range(n)])
    observed = scales[..., None, None] * reconvolved
    sigma = np.array([[0.5, 1.0, 2.0], [0.1, 0.2, 0.3]])
    amplitude, amplitude_err, noise_sigma = refit_amplitude(model, observed, psfs,
                                                            noise_sigma=sigma)
    # Noiseless: the least-squares amplitude is the scale exactly, up to float64 rounding.
    assert_allclose(amplitude, scales, rtol=1e-10)
    # Eq. 2: sigma_A = sigma / sqrt(sum P~^2), P~ = model convolved with the PSF.
    assert_allclose(amplitude_err, sigma / np.sqrt((reconvolved**2).sum(axis=(-2, -1))),
                    rtol=1e-10)
    assert_array_equal(noise_sigma, sigma)


def test_refit_amplitude_estimates_noise_and_handles_zero_models():
    rng = np.random.default_rng(1)
    model = gaussian((64, 64), 3.0, 2.0, 0.0, 32, 32, flux=1000.0)
    psf = gaussian((15, 15), 1.5, 1.5, 0.0, 7, 7)
    observed = 2.0 * fftconvolve(model, psf, mode='same') + rng.normal(0, 0.7, (64, 64))
    amplitude, amplitude_err, noise_sigma = refit_amplitude(model, observed, psf)
    # Estimated from the residuals (MAD of 4096 pixels: ~2% error); 5% bound.
    assert_allclose(noise_sigma, 0.7, rtol=0.05)
    # The amplitude is within a few of its own errors of the truth (seeded: 4 sigma).
    assert abs(amplitude - 2.0) < 4 * amplitude_err

    # A zero model image has no amplitude: 0 with an infinite error, no warning.
    zero = np.zeros((1, 2, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        amplitude, amplitude_err, _ = refit_amplitude(
            zero, rng.normal(size=(1, 2, 16, 16)), np.ones((1, 2, 3, 3)) / 9, noise_sigma=1.0)
    assert_array_equal(amplitude, 0.0)
    assert np.isinf(amplitude_err).all()


def test_estimate_noise_sigma():
    rng = np.random.default_rng(2)
    sigma = np.array([0.5, 2.5, 10.0])
    noise = rng.normal(size=(3, 128, 128)) * sigma[:, None, None] + 7.0
    # 1.4826 MAD of 16384 pixels has a relative error of ~1.2%: 5% is a 4-sigma bound;
    # a constant background does not bias it.
    assert_allclose(estimate_noise_sigma(noise), sigma, rtol=0.05)
    assert estimate_noise_sigma(noise).shape == (3,)


def test_estimate_noise_sigma_batch_equals_each_image():
    # Large batches take their medians in threads: the same values as one
    # image at a time, and a float64 scalar for a single image.
    rng = np.random.default_rng(5)
    noise = (rng.standard_t(3, size=(300, 2, 16, 16)) + 1).astype(np.float32)
    batch = estimate_noise_sigma(noise)
    assert batch.shape == (300, 2) and batch.dtype == np.float64
    each = np.array([[estimate_noise_sigma(image) for image in row] for row in noise])
    assert_array_equal(batch, each)
    assert isinstance(estimate_noise_sigma(noise[0, 0]), np.float64)


# --- input validation ------------------------------------------------------------------------


def check_error(error, match, stamps, psfs, pixel_scale=0.2):
    with pytest.raises(error, match=match) as info:
        validate_stamps(stamps, psfs, pixel_scale)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidInputError)
    assert info.value.exit_code == 3
    return str(info.value)


def test_validate_stamps_valid(valid_inputs):
    stamps, psfs = valid_inputs
    out_stamps, out_psfs, scale = validate_stamps(stamps.astype(np.float32), 3 * psfs, 0.2)
    assert out_stamps.dtype == np.float64
    assert_allclose(out_psfs.sum(axis=(-2, -1)), 1.0, rtol=1e-12)
    assert_allclose(out_psfs, psfs / psfs.sum(axis=(-2, -1), keepdims=True), rtol=1e-12)
    assert_array_equal(scale, [0.2, 0.2])
    # An unmasked masked array is fine.
    validate_stamps(np.ma.masked_array(stamps), psfs, [0.2, 0.3])


def test_nan_pixel(valid_inputs):
    stamps, psfs = valid_inputs
    bad = stamps.copy()
    bad[1, 2, 3, 4] = np.nan
    message = check_error(InvalidPixelsError, 'non-finite', bad, psfs)
    assert '(1, 2, 3, 4)' in message
    bad[1, 2, 3, 4] = np.inf
    check_error(InvalidPixelsError, r'\(1, 2, 3, 4\)', bad, psfs)


def test_masked_array(valid_inputs):
    stamps, psfs = valid_inputs
    mask = np.zeros(stamps.shape, dtype=bool)
    mask[0, 1, 5, 5] = True
    check_error(InvalidPixelsError, 'masked', np.ma.masked_array(stamps, mask=mask), psfs)


def test_complex_stamps(valid_inputs):
    stamps, psfs = valid_inputs
    check_error(InvalidPixelsError, 'real numbers', stamps + 1j, psfs)


@pytest.mark.parametrize('value, shown', [(0.0, '0.0'), (-1.0, '-1.0'), (np.nan, 'nan')])
def test_psf_with_bad_sum(valid_inputs, value, shown):
    stamps, psfs = valid_inputs
    bad = psfs.copy()
    if np.isnan(value):
        bad[1, 2, 0, 0] = np.nan
    else:
        bad[1, 2] *= value  # zero or negative sum
    message = check_error(InvalidPSFError, r'psfs\[1, 2\] sums to', stamps, bad)
    assert shown in message
    assert 'positive, finite sum' in message


def test_psf_even_size(valid_inputs):
    stamps, _ = valid_inputs
    psfs = np.ones((2, 3, 8, 8)) / 64
    check_error(InvalidPSFError, 'odd sizes', stamps, psfs)


def test_psf_larger_than_stamp():
    stamps = np.zeros((1, 1, 8, 8))
    psfs = np.zeros((1, 1, 9, 9))
    psfs[..., 4, 4] = 1.0
    check_error(InvalidPSFError, 'larger than the stamps', stamps, psfs)


def test_psf_off_centre(valid_inputs):
    stamps, psfs = valid_inputs
    bad = psfs.copy()
    bad[0, 1] = gaussian((9, 9), 1.0, 1.0, 0.0, 7, 1)
    message = check_error(InvalidPSFError, r'psfs\[0, 1\] peaks at pixel', stamps, bad)
    assert '(4, 4)' in message  # the centre it should peak at
    # A peak one pixel off (a centring convention) is accepted.
    ok = psfs.copy()
    ok[0, 1] = gaussian((9, 9), 1.0, 1.0, 0.0, 5, 3)
    validate_stamps(stamps, ok, 0.2)


def test_shape_mismatches(valid_inputs):
    stamps, psfs = valid_inputs
    check_error(ShapeMismatchError, r'psfs must have shape', stamps, psfs[:1])
    check_error(ShapeMismatchError, r'psfs must have shape', stamps, psfs[:, :2])
    check_error(ShapeMismatchError, r'psfs must have shape', stamps, psfs[0])
    check_error(ShapeMismatchError, r'stamps must have shape \(n, n_bands, ny, nx\)',
                stamps[0], psfs)


@pytest.mark.parametrize('pixel_scale', [0.0, -0.2, np.nan, np.inf, [0.2, 0.0]])
def test_bad_pixel_scale(valid_inputs, pixel_scale):
    stamps, psfs = valid_inputs
    check_error(PixelScaleError, 'positive and finite', stamps, psfs, pixel_scale)


@pytest.mark.parametrize('pixel_scale, message', [
    (0.2 * u.m, r'pixel_scale = 0.2 m; give an angle per pixel'),
    ('fine', r"pixel_scale = 'fine'; give arcsec per pixel")])
def test_pixel_scale_of_wrong_kind(valid_inputs, pixel_scale, message):
    # The same conversion and messages as the measurements (_validation.pixel_scale_arcsec).
    stamps, psfs = valid_inputs
    check_error(PixelScaleError, message, stamps, psfs, pixel_scale)


def test_pixel_scale_of_wrong_shape(valid_inputs):
    stamps, psfs = valid_inputs
    check_error(ShapeMismatchError, r'pixel_scale must be a scalar or have shape \(2,\)',
                stamps, psfs, [0.2, 0.2, 0.2])


@pytest.mark.parametrize('pixel_scale', [0.2 * u.arcsec / u.pix, 0.2 * u.arcsec,
                                         (0.2 / 3600) * u.deg / u.pix,
                                         [0.2, 0.2] * u.arcsec / u.pix])
def test_pixel_scale_quantity(valid_inputs, pixel_scale):
    stamps, psfs = valid_inputs
    _, _, scale = validate_stamps(stamps, psfs, pixel_scale)
    assert type(scale) is np.ndarray
    assert_allclose(scale, [0.2, 0.2], rtol=1e-12)


def test_normalize_psfs():
    psfs = np.arange(1, 19, dtype=float).reshape(2, 1, 3, 3)
    assert_allclose(normalize_psfs(psfs).sum(axis=(-2, -1)), 1.0)
    assert_allclose(normalize_psfs(5 * psfs), normalize_psfs(psfs))


# --- the stamp API with the tiny model -------------------------------------------------------


def test_deconvolve_stamps_shapes_and_fluxes(tiny_model, test_stamps):
    sims = test_stamps
    images, details = deconvolve_stamps(sims['observed'], sims['psf'],
                                        pixel_scale=sims['pixel_scale'], model=tiny_model,
                                        return_details=True)
    assert images.shape == (12, 3, 64, 64)
    for key in ('amplitude', 'amplitude_err', 'flux', 'flux_err', 'flux_corrected',
                'flux_residual', 'flux_residual_err', 'noise_sigma'):
        assert details[key].shape == (12, 3), key
    assert np.all(details['flux_residual_err'] >= details['flux_err'])
    assert details['network_output'].shape == (12, 3, 64, 64)
    # The image is amplitude x network output, so its sum is the flux (float32 images).
    assert_allclose(images.sum(axis=(-2, -1), dtype=np.float64), details['flux'], rtol=1e-5)
    assert_allclose(images, details['network_output'] * details['amplitude'][..., None, None],
                    rtol=1e-6)
    # The card has no flux-bias correction: corrected == measured.
    assert_array_equal(details['flux_corrected'], details['flux'])
    # Without return_details: the same images.
    only = deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                             model=tiny_model)
    assert_array_equal(only, images)
    # A known noise is passed through (and used for the errors).
    _, known = deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                                 model=tiny_model, noise_sigma=sims['noise_sigma'],
                                 return_details=True)
    assert_allclose(known['noise_sigma'], sims['noise_sigma'])
    assert_allclose(known['flux'], details['flux'], rtol=1e-10)


def test_deconvolve_stamps_in_overlapped_steps_is_one_pass(tiny_model, test_stamps,
                                                          monkeypatch):
    """The network of one step runs in a worker thread beside the cube of the
    next and the corrections of the one before: every image and detail is
    the same as in one step in one thread, with each card correction on."""
    import json
    import threading

    import psfdeconv.deconvolve as deconvolve_module
    from psfdeconv.model import DeconvolutionModel, default_model_path

    shipped = json.loads(default_model_path().with_suffix('.json').read_text())
    card = dict(tiny_model.card, **{key: shipped[key] for key in (
        'output_floor', 'size_bias', 'psf_leakage', 'flux_bias', 'shear_response')})
    model = DeconvolutionModel(tiny_model.keras_model, card, path=tiny_model.path)
    sims = test_stamps
    network_threads = []
    predict = deconvolve_module._symmetric_predict

    def spy(*args, **kwargs):
        network_threads.append(threading.current_thread().name)
        return predict(*args, **kwargs)

    def run(step, cpus):
        monkeypatch.setattr(deconvolve_module, '_PIPELINE_STEP', step)
        monkeypatch.setattr(deconvolve_module, 'cpu_share', lambda: cpus)
        network_threads.clear()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return deconvolve_stamps(sims['observed'], sims['psf'] * 3.0,
                                     pixel_scale=sims['pixel_scale'], model=model,
                                     noise_sigma=sims['noise_sigma'] * [1, 1.1, 0.9],
                                     target_psf=0.6, symmetries=2, return_details=True)

    monkeypatch.setattr(deconvolve_module, '_symmetric_predict', spy)
    images, details = run(100, 1)
    assert network_threads == [threading.current_thread().name]
    stepped_images, stepped = run(5, 2)
    # 12 objects in steps of 5: three network calls, none in this thread.
    assert len(network_threads) == 3
    assert threading.current_thread().name not in network_threads
    assert_array_equal(stepped_images, images)
    assert stepped.keys() == details.keys() and 'shear_g1' in details
    for key, value in details.items():
        assert_array_equal(stepped[key], value, err_msg=key)
    # The card's flux-bias correction ran in the steps.
    assert not np.array_equal(details['flux_corrected'], details['flux'])


def test_deconvolve_psfs_of_any_positive_sum(tiny_model, test_stamps):
    sims = test_stamps
    # float32: bfloat16 rounds the two slightly different cubes differently.
    reference = deconvolve_stamps(sims['observed'], sims['psf'], precision='float32',
                                  pixel_scale=sims['pixel_scale'], model=tiny_model)
    scaled = deconvolve_stamps(sims['observed'], 7 * sims['psf'], precision='float32',
                               pixel_scale=sims['pixel_scale'], model=tiny_model)
    # Normalising psf and 7 psf differs by float rounding only.
    assert_allclose(scaled, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())


def test_deconvolve_pixel_scale_quantity(tiny_model, test_stamps):
    sims = test_stamps
    reference = deconvolve_stamps(sims['observed'], sims['psf'],
                                  pixel_scale=sims['pixel_scale'], model=tiny_model)
    with_units = deconvolve_stamps(sims['observed'], sims['psf'],
                                   pixel_scale=sims['pixel_scale'] * u.arcsec / u.pix,
                                   model=tiny_model)
    assert_array_equal(with_units, reference)


def test_deconvolve_band_count_mismatch(tiny_model, test_stamps):
    sims = test_stamps
    with pytest.raises(BandCountError, match='2 band'):
        deconvolve_stamps(sims['observed'][:, :2], sims['psf'][:, :2],
                          pixel_scale=sims['pixel_scale'], model=tiny_model)


def test_deconvolve_wrong_stamp_size(tiny_model, test_stamps):
    sims = test_stamps
    with pytest.raises(ShapeMismatchError, match='trained on 64x64'):
        deconvolve_stamps(sims['observed'][..., 8:40, 8:40], sims['psf'][..., 5:36, 5:36],
                          pixel_scale=sims['pixel_scale'], model=tiny_model)


def test_deconvolve_rejects_bad_input_before_running(tiny_model, test_stamps):
    sims = test_stamps
    observed = sims['observed'].copy()
    observed[3, 1, 10, 10] = np.nan
    with pytest.raises(InvalidPixelsError, match=r'\(3, 1, 10, 10\)'):
        deconvolve_stamps(observed, sims['psf'], pixel_scale=sims['pixel_scale'],
                          model=tiny_model)


def test_outside_training_range_warning(tiny_model, test_stamps):
    sims = test_stamps
    low, high = tiny_model.card['training']['simulation_config']['pixel_scale_range']
    scale = sims['pixel_scale'].copy()
    scale[[2, 5]] = [low / 2, 2 * high]
    with pytest.warns(OutsideTrainingRangeWarning, match='2 stamp'):
        deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=scale, model=tiny_model)
    # Inside the range: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                          model=tiny_model)


# --- flux bias -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def flux_bias_data():
    """Fluxes whose true/measured ratio is exactly c0 + c1 L + c2 L^2 for L in (1, 3), plus
    outliers outside the fitted SNR range (L < 1 and L > 3) with an absurd ratio."""
    rng = np.random.default_rng(3)
    coefficients = np.array([1.08, -0.04, 0.006])
    log_snr = rng.uniform(1.05, 2.95, 300)
    flux_err = rng.uniform(0.5, 5.0, 300)
    flux = 10**log_snr * flux_err
    ratio = coefficients[0] + coefficients[1] * log_snr + coefficients[2] * log_snr**2
    true_flux = ratio * flux
    outside_err = np.ones(20)
    outside_flux = np.concatenate([np.full(10, 3.0), np.full(10, 5000.0)])  # L=0.48, 3.7
    return (np.concatenate([flux, outside_flux]), np.concatenate([flux_err, outside_err]),
            np.concatenate([true_flux, 10 * outside_flux]), coefficients)


def test_fit_flux_bias_recovers_coefficients(flux_bias_data):
    flux, flux_err, true_flux, coefficients = flux_bias_data
    fit = fit_flux_bias(flux, flux_err, true_flux)
    # Exact quadratic data: least squares recovers it to rounding.
    assert_allclose(fit['coefficients'], coefficients, rtol=1e-8, atol=1e-10)
    assert fit['log_snr_range'] == [1.0, 3.0]
    assert 250 <= fit['n_objects'] <= 300  # the 20 out-of-range objects are not used
    # 2-d input (objects x bands) is pooled.
    fit2 = fit_flux_bias(flux.reshape(-1, 2), flux_err.reshape(-1, 2), true_flux.reshape(-1, 2))
    assert_allclose(fit2['coefficients'], coefficients, rtol=1e-8, atol=1e-10)


def test_fit_flux_bias_constant_ratio():
    # A perfectly unbiased model (ratio exactly 1): c = (1, 0, 0).
    flux = np.logspace(1.1, 2.9, 50)
    fit = fit_flux_bias(flux, np.ones(50), flux)
    assert_allclose(fit['coefficients'], [1.0, 0.0, 0.0], atol=1e-10)


def test_fit_flux_bias_needs_enough_objects():
    # Two objects cannot fix a quadratic: refuse with a clear message rather than return an
    # ill-conditioned fit (numpy's RankWarning is an error in this suite).
    flux = np.array([100.0, 300.0, 1e6])
    with pytest.raises(InvalidInputError):
        fit_flux_bias(flux, np.ones(3), 1.1 * flux)


def test_fit_flux_bias_is_unbiased_at_fixed_true_flux():
    # A bias that falls with SNR plus noise: at fixed true flux the corrected flux must be
    # right, although the correction only sees the measured flux and its error.
    rng = np.random.default_rng(8)
    true = 10**rng.uniform(1.0, 3.0, 20000)
    flux_err = np.ones_like(true)
    flux = true * (1 + 0.3 / np.sqrt(true)) + rng.normal(0, 1, true.size)
    corrected = correct_flux_bias(flux, flux_err, fit_flux_bias(flux, flux_err, true))
    quartile = np.digitize(true, np.quantile(true, [0.25, 0.5, 0.75]))
    raw_bias = [np.median(flux[quartile == k] / true[quartile == k]) - 1 for k in range(4)]
    bias = [np.median(corrected[quartile == k] / true[quartile == k]) - 1 for k in range(4)]
    assert raw_bias[0] > 0.02  # the faintest quarter starts 2-3 % high
    assert_allclose(bias, 0, atol=0.003)


def test_correct_flux_bias(flux_bias_data):
    flux, flux_err, true_flux, coefficients = flux_bias_data
    bias = fit_flux_bias(flux, flux_err, true_flux)
    corrected = correct_flux_bias(flux, flux_err, bias)
    log_snr = np.clip(np.log10(flux / flux_err), 1.0, 3.0)
    factor = coefficients[0] + coefficients[1] * log_snr + coefficients[2] * log_snr**2
    assert_allclose(corrected, flux * factor, rtol=1e-9)
    # Inside the range the correction gives back the truth.
    inside = slice(0, 300)
    assert_allclose(corrected[inside], true_flux[inside], rtol=1e-9)
    # None or an empty correction: unchanged (the same object).
    assert correct_flux_bias(flux, flux_err, None) is flux
    # Non-positive fluxes are left alone.
    assert_array_equal(correct_flux_bias(np.array([-5.0, 0.0]), np.ones(2), bias), [-5.0, 0.0])


def test_correct_flux_bias_quantity():
    bias = {'coefficients': [1.05, 0.01, 0.0], 'log_snr_range': [1.0, 3.0]}
    flux = [100.0, 1e5] * u.nJy
    flux_err = [10.0, 1.0] * u.nJy  # L = 1 and 5 (clipped to 3)
    corrected = correct_flux_bias(flux, flux_err, bias)
    assert isinstance(corrected, u.Quantity)
    assert corrected.unit == u.nJy
    assert_allclose(corrected.value, [100.0 * 1.06, 1e5 * 1.08], rtol=1e-12)


def test_output_floor_removal(tiny_model, tiny_simulation_path):
    # A card asking for output_floor='median' removes each band's median (the softplus
    # floor over the empty sky) and clips at zero before the amplitude refit.
    from psfdeconv.model import DeconvolutionModel

    data = read_simulation(tiny_simulation_path, 0, 6)
    args = (data['observed'], data['psf'])
    _, plain = deconvolve_stamps(*args, pixel_scale=data['pixel_scale'], model=tiny_model,
                                 return_details=True)
    floored_model = DeconvolutionModel(tiny_model.keras_model,
                                       {**tiny_model.card, 'output_floor': 'median'})
    images, floored = deconvolve_stamps(*args, pixel_scale=data['pixel_scale'],
                                        model=floored_model, return_details=True)
    raw = plain['network_output']
    expected = np.clip(raw - np.median(raw, axis=(-2, -1), keepdims=True), 0, None)
    assert_allclose(floored['network_output'], expected, rtol=1e-6, atol=1e-8)
    # Every pixel below the median (half of them, 64x64 being even) is now zero.
    assert np.all((floored['network_output'] == 0).mean(axis=(-2, -1)) >= 0.5)
    # The refit then scales the floored output, so the image sums are still the fluxes.
    assert_allclose(images.sum(axis=(-2, -1)), floored['flux'], rtol=1e-5)


def test_correct_flux_bias_per_band():
    bias = {'coefficients': [1.0, 0.0, 0.0], 'log_snr_range': [1.0, 3.0],
            'per_band_coefficients': [[0.97, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.02, 0.0]]}
    flux = np.full((4, 3), 100.0)
    flux_err = np.full((4, 3), 1.0)  # log10 SNR = 2
    corrected = correct_flux_bias(flux, flux_err, bias)
    np.testing.assert_allclose(corrected, [[97.0, 100.0, 104.0]] * 4)
    # Another band count than the fits: the pooled correction.
    np.testing.assert_allclose(correct_flux_bias(flux[:, :2], flux_err[:, :2], bias), 100.0)


def test_calibrate_flux_bias_fits_each_band(tiny_model_path, tiny_simulation_path):
    from psfdeconv.calibrate import calibrate_flux_bias
    from psfdeconv.model import load_model
    from psfdeconv.simulate import read_simulation

    sims = read_simulation(tiny_simulation_path)
    fit = calibrate_flux_bias(load_model(tiny_model_path), sims['observed'], sims['psf'],
                              sims['pixel_scale'], sims['truth'])
    per_band = np.asarray(fit['per_band_coefficients'])
    assert per_band.shape == (3, 3) and np.all(np.isfinite(per_band))
    # Each band's fit is its own: not the pooled coefficients repeated.
    assert not np.allclose(per_band, np.asarray(fit['coefficients'])[None])


# --- residual flux ------------------------------------------------------------------------


def test_light_radius_of_a_gaussian():
    sigma = 3.0
    image = gaussian((65, 65), sigma, sigma, 0.0, 32, 32)
    # Enclosed fraction of a circular Gaussian: 1 - exp(-r^2 / 2 sigma^2).
    for fraction in (0.5, 0.9):
        expected = sigma * np.sqrt(-2 * np.log(1 - fraction))
        assert abs(light_radius(image, fraction) - expected) < 0.6
    stack = np.stack([image, 0 * image, -image])
    assert_array_equal(light_radius(stack, 0.9)[1:], 0.0)


@pytest.mark.parametrize('shape', [(64, 64), (9, 12), (1, 1)])
def test_light_radius_counts_whole_annuli(shape):
    # Against the light within each radius summed pixel by pixel, in float32
    # and float64, on positive images of irregular light.
    rng = np.random.default_rng(3)
    images = rng.uniform(0.0, 1.0, (4, 2) + shape) ** 8
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    annulus = np.ceil(np.hypot(yy - ny // 2, xx - nx // 2))
    for dtype in (np.float32, np.float64):
        stack = images.astype(dtype)
        for fraction in (0.3, 0.5, 0.9):
            enclosed = np.stack([stack[..., annulus <= r].sum(-1, dtype=np.float64)
                                 for r in range(int(annulus.max()) + 1)], axis=-1)
            expected = np.argmax(enclosed >= fraction * enclosed[..., -1:], axis=-1)
            assert_array_equal(light_radius(stack, fraction), expected)


def _missing_wings(n, noise, seed):
    """Stamps of an exponential galaxy (1000 counts) and models that lack its
    light beyond 4 pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] - 32
    radius = np.hypot(yy, xx)
    galaxy = np.exp(-radius / 2.0)
    galaxy /= galaxy.sum()
    psf = gaussian((15, 15), 2.0, 2.0, 0.0, 7, 7)
    noiseless = 1000.0 * fftconvolve(galaxy, psf, mode='same')
    stamps = noiseless + noise * rng.normal(size=(n, 1, 64, 64))
    model = 1000.0 * np.where(radius < 4, galaxy, 0.0)
    models = np.broadcast_to(model, stamps.shape).copy()
    psfs = np.broadcast_to(psf, (n, 1) + psf.shape)
    flux = np.full((n, 1), model.sum())
    return models, stamps, psfs, flux, np.full((n, 1), noise), 1000.0


def test_residual_flux_recovers_missing_wings_where_the_noise_allows():
    # Bright: the 45 % missing comes back but for what lies beyond the aperture.
    models, stamps, psfs, flux, sigma, true = _missing_wings(20, 0.05, seed=1)
    assert flux[0, 0] < 0.6 * true
    total, err, weight = residual_flux(models, stamps, psfs, flux, np.zeros_like(flux),
                                       sigma)
    assert np.all(weight > 0.99)
    assert abs(np.median(total) / true - 1) < 0.05
    # Its error (the models have none here) is its scatter over noise realisations.
    assert 0.7 < np.std(total) / np.median(err) < 1.3
    # Faint: the residual is mostly noise, and is shrunk.
    models, stamps, psfs, flux, sigma, true = _missing_wings(200, 20.0, seed=2)
    total, err, weight = residual_flux(models, stamps, psfs, flux, 0.05 * flux, sigma)
    assert np.all(weight < 0.1)
    # The whole residual (a prior so wide that k = 1) is ten times noisier.
    unweighted = residual_flux(models, stamps, psfs, flux, 0.05 * flux, sigma,
                               mismatch=1e6)[0]
    assert np.std(total) < 0.1 * np.std(unweighted)
    # Faint stamps keep the card's correction: the expected profile error
    # (here the truth's) replaces the noisy residual.
    corrected = np.full_like(flux, true)
    total, err, weight = residual_flux(models, stamps, psfs, corrected, 0.05 * flux, sigma)
    assert abs(np.median(total) / true - 1) < 0.01
    assert np.std(total) < 0.1 * np.std(unweighted)
    # No prior, or an empty model: the corrected flux as given.
    total, err, weight = residual_flux(models, stamps, psfs, corrected, 0.05 * flux, sigma,
                                       mismatch=0.0)
    assert_array_equal(total, corrected)
    assert_array_equal(err, 0.05 * flux)
    total, err, weight = residual_flux(0 * models, stamps, psfs, 0 * flux, 0 * flux, sigma)
    assert_array_equal(total, 0.0)
    assert_array_equal(weight, 0.0)


def test_residual_flux_takes_the_refits_reconvolution(tiny_model, test_stamps):
    from psfdeconv.deconvolve import float32_work, refit_images

    sims = test_stamps
    stamps32, transforms = float32_work(sims['observed'], normalize_psfs(sims['psf']))
    output = np.abs(sims['truth']).astype(np.float32) + 1e-3
    fit = refit_images(output, stamps32, sims['psf'], None, psf_transforms=transforms,
                       return_reconvolved=True)
    assert_allclose(fit['reconvolved'], transforms.convolve(fit['images']),
                    rtol=1e-5, atol=1e-6 * np.abs(fit['reconvolved']).max())
    assert 'reconvolved' not in refit_images(output, stamps32, sims['psf'], None,
                                             psf_transforms=transforms)
    args = (fit['images'], stamps32, sims['psf'], fit['flux'], fit['flux_err'],
            fit['noise_sigma'])
    given = residual_flux(*args, reconvolved=fit['reconvolved'])
    computed = residual_flux(*args, psf_transforms=transforms)
    for a, b in zip(given, computed, strict=True):
        assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_residual_flux_of_a_right_model_is_unbiased():
    yy, xx = np.mgrid[:64, :64] - 32
    galaxy = gaussian((64, 64), 3.0, 2.0, 0.3, 32, 32, flux=500.0)
    psf = gaussian((15, 15), 2.0, 2.0, 0.0, 7, 7)
    rng = np.random.default_rng(3)
    stamps = fftconvolve(galaxy, psf, mode='same') + rng.normal(size=(400, 1, 64, 64))
    models = np.broadcast_to(galaxy, stamps.shape)
    psfs = np.broadcast_to(psf, (400, 1, 15, 15))
    flux = np.full((400, 1), 500.0)
    total, err, weight = residual_flux(models, stamps, psfs, flux, np.zeros_like(flux),
                                       np.ones_like(flux))
    # Residual = noise only: mean 0 within 3 errors of the mean, scatter = error.
    assert abs(np.mean(total) - 500.0) < 3 * np.std(total) / np.sqrt(400)
    assert 0.85 < np.std(total) / np.median(err) < 1.15


# --- Detection gate -------------------------------------------------------------------

def test_fit_detection_threshold_and_its_errors():
    from psfdeconv.calibrate import fit_detection_threshold
    from psfdeconv.deconvolve import detection_snr
    from psfdeconv.exceptions import ConfigError, InvalidInputError, ShapeMismatchError

    rng = np.random.default_rng(5)
    blank = rng.normal(1.0, 2.0, 2000)
    source = rng.uniform(8.0, 200.0, 2000)
    snr = np.concatenate([blank, source, [np.nan]])
    is_blank = np.arange(snr.size) < 2000
    is_blank[-1] = True   # a blank with no finite SNR counts as blank
    fit = fit_detection_threshold(snr, is_blank, blank_recall=0.99)
    assert fit['blank_recall'] >= 0.99 and fit['n_blank'] == 2001
    assert_allclose(fit['snr_threshold'], np.quantile(blank, 0.99), atol=0.2)
    assert fit['sources_below'] == pytest.approx(np.mean(source < fit['snr_threshold']))
    # Where blanks and sources overlap, at most max_sources_below of the sources
    # fall below: the sources' quantile wins over the blanks'.
    faint = np.concatenate([blank, rng.uniform(0.0, 10.0, 2000)])
    overlap = fit_detection_threshold(faint, np.arange(4000) < 2000, blank_recall=0.99,
                                      max_sources_below=0.02)
    assert overlap['sources_below'] <= 0.02 and overlap['blank_recall'] < 0.99
    assert overlap['snr_threshold'] < fit['snr_threshold']
    assert overlap['max_sources_below'] == 0.02 and overlap['target_blank_recall'] == 0.99
    # Bands: sum of fluxes over the root sum of squared errors.
    assert_allclose(detection_snr([[3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]),
                    [7 / np.sqrt(2), 0.0])
    with pytest.raises(InvalidInputError, match='at least 100'):
        fit_detection_threshold(snr[1990:], is_blank[1990:])
    with pytest.raises(ShapeMismatchError):
        fit_detection_threshold(snr, is_blank[:-1])
    with pytest.raises(ConfigError, match='blank_recall'):
        fit_detection_threshold(snr, is_blank, blank_recall=1.0)
    with pytest.raises(ConfigError, match='max_sources_below'):
        fit_detection_threshold(snr, is_blank, max_sources_below=-0.1)


def test_detection_gate_empties_the_images_below_the_threshold(tiny_model):
    from psfdeconv.model import DeconvolutionModel
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(12, seed=21)
    kwargs = {'pixel_scale': sims['pixel_scale']}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ungated, details = deconvolve_stamps(sims['observed'], sims['psf'], model=tiny_model,
                                             return_details=True, **kwargs)
        assert details['detected'].all() and details['detection_snr'].shape == (12,)
        threshold = float(np.median(details['detection_snr']))
        card = dict(tiny_model.card, detection={'snr_threshold': threshold})
        gated_model = DeconvolutionModel(tiny_model.keras_model, card, path=tiny_model.path)
        gated, gated_details = deconvolve_stamps(sims['observed'], sims['psf'],
                                                 model=gated_model, return_details=True,
                                                 **kwargs)
    below = details['detection_snr'] < threshold
    assert below.any() and not below.all()
    assert_array_equal(gated_details['detected'], ~below)
    assert (gated[below] == 0).all()
    assert_allclose(gated[~below], ungated[~below])
    # The fluxes are still measured (forced photometry of the stamp).
    assert_allclose(gated_details['flux'], details['flux'])


def test_calibrate_card_skips_the_gate_without_enough_blanks(tiny_model, tiny_simulation_path):
    from psfdeconv.calibrate import calibrate_card

    sims = read_simulation(tiny_simulation_path, 0, 60)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fit = calibrate_card(tiny_model, sims['observed'], sims['psf'], sims['pixel_scale'],
                             sims['truth'], sims['is_blank'])
    assert fit['detection'] is None and sims['is_blank'].sum() < 100
    assert len(fit['flux_bias']['coefficients']) == 3


@pytest.mark.slow
def test_calibrate_card_images_are_what_the_calibrated_card_gives(
        tiny_model, tiny_simulation_path, monkeypatch):
    import psfdeconv.calibrate as calibrate_module
    from psfdeconv.calibrate import calibrate_card
    from psfdeconv.model import DeconvolutionModel

    sims = read_simulation(tiny_simulation_path, 0, 160)
    # The tiny simulation has a few dozen blanks; the shipped cards were fitted on 1,355.
    monkeypatch.setattr(calibrate_module, '_MIN_BLANKS', 10)
    args = (tiny_model, sims['observed'], sims['psf'], sims['pixel_scale'], sims['truth'],
            sims['is_blank'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fit, images = calibrate_card(*args, blank_recall=0.9, max_sources_below=0.2,
                                     return_images=True)
        card = dict(tiny_model.card, **fit)
        calibrated = DeconvolutionModel(tiny_model.keras_model, card, path=tiny_model.path)
        # float32, in which the calibration runs.
        expected, details = deconvolve_stamps(sims['observed'], sims['psf'],
                                              pixel_scale=sims['pixel_scale'],
                                              model=calibrated, return_details=True,
                                              precision='float32')
    assert fit['detection'] is not None and not details['detected'].all()
    assert fit['size_bias'] is not None and fit['size_bias']['n_objects'] >= 100
    assert_array_equal(images, expected)
    assert calibrate_card(*args, blank_recall=0.9, max_sources_below=0.2) == fit


# --- symmetries of the square and PSF leakage ------------------------------------------

def _quarter_turn(array):
    return np.ascontiguousarray(np.rot90(array, 1, axes=(-2, -1)))


def test_symmetric_output_is_equivariant(tiny_model, tiny_simulation_path):
    from psfdeconv.features import make_cube

    sims = read_simulation(tiny_simulation_path, 0, 6)
    stamps, psfs, scale = validate_stamps(sims['observed'], sims['psf'], sims['pixel_scale'])
    # One symmetry is the network on the cube as given.
    single = symmetric_output(tiny_model, stamps, psfs, scale, symmetries=1)
    cube, _ = make_cube(stamps, psfs, pixel_scale=scale, kinds=tiny_model.kinds)
    assert_allclose(single, tiny_model.predict(cube))
    # Averaged over all 8, turning the input turns the output, which the network alone
    # does not do.
    average = symmetric_output(tiny_model, stamps, psfs, scale, symmetries=8)
    turned = symmetric_output(tiny_model, _quarter_turn(stamps), _quarter_turn(psfs), scale,
                              symmetries=8)
    assert_allclose(turned, _quarter_turn(average), rtol=1e-4, atol=1e-6)
    single_turned = symmetric_output(tiny_model, _quarter_turn(stamps), _quarter_turn(psfs),
                                     scale, symmetries=1)
    assert not np.allclose(single_turned, _quarter_turn(single), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r'symmetries must be one of \(1, 2, 4, 8\), got 3'):
        symmetric_output(tiny_model, stamps, psfs, scale, symmetries=3)


def test_shear_images():
    round_image = gaussian((48, 48), 3.0, 3.0, 0.0, 23.0, 25.0, flux=50.0)
    sheared = shear_images(round_image, 0.1, 0.05)
    moments = image_moments(sheared)
    g = np.hypot(0.1, 0.05)
    assert_allclose(np.hypot(moments['e1'], moments['e2']), 2 * g / (1 + g**2), rtol=2e-3)
    assert_allclose(moments['e2'] / moments['e1'], 0.5, rtol=2e-3)
    # About the centroid, area-preserving: position and flux stay.
    assert_allclose([moments['x'], moments['y']], [23.0, 25.0], atol=1e-3)
    assert_allclose(sheared.sum(), 50.0, rtol=1e-3)
    assert_array_equal(shear_images(round_image, 0.0, 0.0), round_image)
    empty = np.zeros((16, 16))
    assert_array_equal(shear_images(empty, 0.1, 0.0), empty)
    with pytest.raises(InvalidInputError, match='g1\\*\\*2 \\+ g2\\*\\*2 < 1'):
        shear_images(round_image, 0.8, 0.7)


def test_shear_images_in_threads_equals_one_at_a_time():
    # A stack large enough for several threads gives each image's own result.
    rng = np.random.default_rng(4)
    n = 300
    images = np.stack([gaussian((32, 32), rng.uniform(1.5, 4), rng.uniform(1.5, 4),
                                rng.uniform(0, np.pi), 15.5 + rng.normal(), 16.0, flux=10.0)
                       for _ in range(n)]).astype(np.float32)
    g1, g2 = rng.uniform(-0.1, 0.1, n), rng.uniform(-0.1, 0.1, n)
    together = shear_images(images, g1, g2)
    for i in range(0, n, 37):
        assert_array_equal(together[i], shear_images(images[i], g1[i], g2[i]))


def test_fit_and_correct_psf_leakage():
    # Deconvolved images that keep 10 % of their PSFs' ellipticity.
    rng = np.random.default_rng(5)
    n = 80
    galaxies = zip(rng.uniform(2, 4, n), rng.uniform(1.5, 3, n), rng.uniform(0, np.pi, n),
                   strict=True)
    truth = np.stack([gaussian((48, 48), a, b, t, 24, 24, flux=100.0)[None]
                      for a, b, t in galaxies])
    stars = zip(rng.uniform(1.6, 2.0, n), np.full(n, 1.6), rng.uniform(0, np.pi, n), strict=True)
    psfs = np.stack([gaussian((15, 15), a, b, t, 7, 7)[None] for a, b, t in stars])
    psf_e1, psf_e2 = psf_ellipticity(psfs)
    leaky = shear_images(truth, 0.1 * psf_e1 / 2, 0.1 * psf_e2 / 2)
    fit = fit_psf_leakage(leaky, truth, psfs)
    assert 0.07 < fit['measured_leakage'] < 0.13
    assert abs(fit['residual_leakage']) < 0.1 * fit['measured_leakage']
    corrected = correct_psf_leakage(leaky, psfs, fit)
    true_m, leaky_m, corrected_m = (image_moments(a) for a in (truth, leaky, corrected))
    error = [np.hypot(m['e1'] - true_m['e1'], m['e2'] - true_m['e2']) for m in (leaky_m,
                                                                              corrected_m)]
    assert np.sqrt(np.mean(error[1]**2)) < 0.2 * np.sqrt(np.mean(error[0]**2))
    assert correct_psf_leakage(leaky, psfs, None) is leaky
    # Round PSFs leave nothing to measure: no correction, and no warning.
    round_psfs = np.broadcast_to(gaussian((15, 15), 1.8, 1.8, 0.0, 7, 7), psfs.shape)
    round_fit = fit_psf_leakage(leaky, truth, round_psfs)
    assert round_fit['alpha'] == 0.0 and round_fit['measured_leakage'] == 0.0
    assert_allclose(correct_psf_leakage(leaky, round_psfs, round_fit), leaky)
    with pytest.raises(InvalidInputError, match='at least 10'):
        fit_psf_leakage(leaky[:5], truth[:5], psfs[:5])


# --- size bias ----------------------------------------------------------------------------

def test_dilate_images():
    image = gaussian((48, 48), 3.0, 2.0, 0.4, 23.0, 25.0, flux=50.0)
    larger = dilate_images(image, 0.25)
    before, after = image_moments(image), image_moments(larger)
    assert_allclose(after['size'] / before['size'], 1.25, rtol=2e-3)
    assert_allclose([after['e1'], after['e2']], [before['e1'], before['e2']], atol=2e-3)
    assert_allclose([after['x'], after['y']], [23.0, 25.0], atol=1e-3)
    assert_allclose(larger.sum(), 50.0, rtol=1e-3)
    # One factor per image; 0 and empty images unchanged.
    stack = dilate_images(np.stack([image, image]), np.array([0.0, -0.2]))
    assert_array_equal(stack[0], image)
    assert_allclose(image_moments(stack[1])['size'] / before['size'], 0.8, rtol=2e-3)
    empty = np.zeros((16, 16))
    assert_array_equal(dilate_images(empty, 0.3), empty)
    with pytest.raises(InvalidInputError, match='dilation > -1'):
        dilate_images(image, -1.0)


def _size_bias_data(n=400, seed=6):
    """Round Gaussian galaxies and a deconvolution that draws them 40 % too large at
    log10 SNR 1 and right above log10 SNR 2."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(2.0, 3.5, (n, 1))
    y, x = np.mgrid[:40, :40]
    truth = 100 * np.exp(-0.5 * ((x - 20)**2 + (y - 20)**2) / sigma[..., None, None]**2)
    log_snr = rng.uniform(0.8, 2.8, (n, 1))
    flux_err = truth.sum(axis=(-2, -1)) / 10**log_snr
    inflation = 1 + 0.4 * np.clip(2 - log_snr, 0, None)
    return truth, dilate_images(truth, inflation - 1), flux_err, log_snr


def test_fit_and_correct_size_bias():
    from psfdeconv.measure import hsm_moments

    truth, output, flux_err, log_snr = _size_bias_data()
    flux = output.sum(axis=(-2, -1))
    fit = fit_size_bias(output, truth, flux, flux_err)
    assert fit['n_objects'] == len(truth) and fit['n_bins'] == 12
    corrected = correct_size_bias(output, flux, flux_err, fit)
    ratio = [hsm_moments(a)['hsm_sigma'] / hsm_moments(truth)['hsm_sigma']
             for a in (output, corrected)]
    faint, bright = log_snr < 1.4, log_snr > 2.2
    assert np.mean(ratio[0][faint]) > 1.25
    # Unbiased within 3 % wherever the bias was, and the bright ones kept.
    assert abs(np.mean(ratio[1][faint]) - 1) < 0.03
    assert abs(np.mean(ratio[1]) - 1) < 0.01
    assert abs(np.mean(ratio[1][bright]) - 1) < 0.03
    assert_allclose(corrected.sum(axis=(-2, -1)), flux, rtol=1e-3)
    assert correct_size_bias(output, flux, flux_err, None) is output
    # A band without flux is left as it is.
    zero = correct_size_bias(output[:2], np.zeros((2, 1)), flux_err[:2], fit)
    assert_array_equal(zero, output[:2])
    assert fit_size_bias(output[:50], truth[:50], flux[:50], flux_err[:50]) is None


def test_deconvolve_stamps_applies_the_cards_size_bias(tiny_model, test_stamps):
    from psfdeconv.measure import hsm_moments
    from psfdeconv.model import DeconvolutionModel

    stamps, psfs, scale = (test_stamps[key] for key in ('observed', 'psf', 'pixel_scale'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        plain, details = deconvolve_stamps(stamps, psfs, pixel_scale=scale, model=tiny_model,
                                           return_details=True)
        bias = {'coefficients': [0.8, 0.0, 0.0], 'log_snr_range': [1.0, 3.0]}
        card = dict(tiny_model.card, size_bias=bias)
        smaller_model = DeconvolutionModel(tiny_model.keras_model, card, path=tiny_model.path)
        smaller, smaller_details = deconvolve_stamps(stamps, psfs, pixel_scale=scale,
                                                     model=smaller_model, return_details=True)
    plain_hsm, smaller_hsm = hsm_moments(plain), hsm_moments(smaller)
    ok = (details['flux'] > 0) & (plain_hsm['hsm_status'] == 0) & \
        (smaller_hsm['hsm_status'] == 0)
    ratio = smaller_hsm['hsm_sigma'] / plain_hsm['hsm_sigma']
    assert ok.sum() > 5
    assert_allclose(np.median(ratio[ok]), 0.8, rtol=0.05)
    # The amplitudes are refitted to the dilated images: the fluxes barely move.
    assert_allclose(np.median(smaller_details['flux'][ok] / details['flux'][ok]), 1.0,
                    atol=0.1)
