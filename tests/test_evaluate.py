# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.evaluate: metrics, baselines, tables and the report."""

import warnings

import numpy as np
import pytest
from _images import elliptical_gaussian as gaussian
from astropy import units as u
from astropy.table import QTable
from numpy.testing import assert_allclose, assert_array_equal
from scipy.signal import fftconvolve

from psfdeconv import evaluate
from psfdeconv.exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    OutputExistsError,
    ShapeMismatchError,
)
from psfdeconv.measure import image_moments


@pytest.fixture(scope='module')
def convolved_gaussian():
    """A noiseless 64x64 galaxy, its odd 25x25 PSF and the observation
    (linear convolution; both Gaussians end > 7 sigma from the edges)."""
    truth = gaussian((64, 64), 4.0, 2.5, 0.3, 31.3, 32.6, flux=1000.0)
    psf = gaussian((25, 25), 2.0, 1.7, 0.5, 12, 12)
    observed = fftconvolve(truth, psf, mode='same')
    return truth, psf, observed


@pytest.fixture(scope='module')
def synthetic_set():
    """30 objects (9 blank), 2 bands, 32x32 stamps, Gaussian galaxies and
    elliptical Gaussian PSFs, noise sigma 0.05 (SNR ~ 100-1000)."""
    rng = np.random.default_rng(42)
    n, n_bands = 30, 2
    is_blank = np.zeros(n, dtype=bool)
    is_blank[rng.choice(n, 9, replace=False)] = True
    truth = np.zeros((n, n_bands, 32, 32))
    psfs = np.zeros((n, n_bands, 11, 11))
    for i in range(n):
        for b in range(n_bands):
            psfs[i, b] = gaussian((11, 11), 1.6, 1.1, rng.uniform(0, np.pi), 5, 5)
            if not is_blank[i]:
                truth[i, b] = gaussian((32, 32), rng.uniform(1.5, 3.0), rng.uniform(1.0, 1.5),
                                       rng.uniform(0, np.pi), 15.5 + rng.uniform(-1, 1),
                                       15.5 + rng.uniform(-1, 1), flux=rng.uniform(50, 500))
    sigma = 0.05
    observed = np.stack([[fftconvolve(truth[i, b], psfs[i, b], mode='same')
                          for b in range(n_bands)] for i in range(n)])
    observed += sigma * rng.normal(size=observed.shape)
    return truth, psfs, observed, is_blank, sigma


# --- image quality ----------------------------------------------------------------------

def test_image_quality_identical_images():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(3, 2, 16, 16))
    truth[2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        q = evaluate.image_quality(truth, truth.copy())
    assert np.all(np.isinf(q['psnr'][:2])) and np.all(q['psnr'][:2] > 0)
    assert_allclose(q['ssim'][:2], 1.0)
    assert np.isnan(q['psnr'][2]) and np.isnan(q['ssim'][2])


def test_image_quality_scaled_by_truth_peak():
    # A constant offset of 1% of the truth peak has MSE 1e-4 after
    # scaling: PSNR = 40 dB exactly, whatever the object's flux scale.
    truth = np.zeros((2, 1, 16, 16))
    truth[:, 0] = gaussian((16, 16), 2.0, 2.0, 0.0, 8, 8)
    truth[1] *= 1e6
    prediction = truth + 0.01 * truth.max(axis=(1, 2, 3), keepdims=True)
    q = evaluate.image_quality(truth, prediction)
    assert_allclose(q['psnr'], 40.0, rtol=1e-12)
    assert_allclose(q['ssim'][0], q['ssim'][1], rtol=1e-10)
    assert np.all(q['ssim'] < 1)


def test_image_quality_errors():
    with pytest.raises(ShapeMismatchError, match=r'prediction has shape \(2, 1, 16, 16\)'):
        evaluate.image_quality(np.ones((1, 1, 16, 16)), np.ones((2, 1, 16, 16)))
    with pytest.raises(ShapeMismatchError, match='smaller than the 7x7 SSIM window'):
        evaluate.image_quality(np.ones((1, 1, 5, 5)), np.ones((1, 1, 5, 5)))
    with pytest.raises(ShapeMismatchError, match=r'shape \(n, n_bands, ny, nx\)'):
        evaluate.image_quality(np.ones((16, 16)), np.ones((16, 16)))
    bad = np.ones((1, 1, 16, 16))
    bad[0, 0, 3, 3] = np.inf
    with pytest.raises(InvalidPixelsError, match='prediction has 1 non-finite'):
        evaluate.image_quality(np.ones((1, 1, 16, 16)), bad)


# --- moment differences -----------------------------------------------------------------

def test_moment_differences_known_changes():
    truth = np.stack([gaussian((64, 64), 3.0, 2.0, 0.4, 31.0, 32.0, flux=10.0),
                      np.zeros((64, 64))])
    prediction = np.stack([1.1 * gaussian((64, 64), 3.0, 2.0, 0.4, 32.0, 31.5, flux=10.0),
                           np.ones((64, 64))])
    d = evaluate.moment_differences(image_moments(truth), image_moments(prediction))
    assert set(d) == {'flux', 'x', 'y', 'e1', 'e2', 'e', 'size'}
    assert_allclose(d['flux'][0], 10.0, rtol=1e-9)
    assert_allclose([d['x'][0], d['y'][0]], [1.0, -0.5], atol=1e-9)
    assert_allclose([d['e1'][0], d['e2'][0], d['e'][0], d['size'][0]], 0.0, atol=1e-9)
    for key in d:  # the blank truth gives NaN
        assert np.isnan(d[key][1])


def test_moment_differences_size_percent():
    truth = gaussian((64, 64), 3.0, 3.0, 0.0, 32, 32)
    wider = gaussian((64, 64), 3.3, 3.3, 0.0, 32, 32)
    d = evaluate.moment_differences(image_moments(truth), image_moments(wider))
    assert_allclose(d['size'], 10.0, rtol=1e-9)


def test_moment_differences_errors():
    m = image_moments(np.ones((2, 8, 8)))
    with pytest.raises(InvalidInputError, match=r"pred_moments lacks the key\(s\) \['size'\]"):
        evaluate.moment_differences(m, {k: v for k, v in m.items() if k != 'size'})
    with pytest.raises(InvalidInputError, match='must be a dict as returned by image_moments'):
        evaluate.moment_differences([1, 2], m)
    with pytest.raises(ShapeMismatchError, match=r"pred_moments\['flux'\] has shape \(3,\)"):
        evaluate.moment_differences(m, image_moments(np.ones((3, 8, 8))))


# --- summaries --------------------------------------------------------------------------

def test_summarize_differences_mean_rms_mask():
    d = {'flux': np.array([[1.0, 3.0], [5.0, np.nan], [100.0, 100.0]]),
         'e1': np.array([[0.1, -0.1], [0.2, -0.2], [np.nan, np.nan]])}
    t = evaluate.summarize_differences(d, mask=np.array([True, True, False]))
    assert isinstance(t, QTable)
    assert t['quantity'].tolist() == ['flux', 'e1']
    assert t['unit'].tolist() == ['%', '']
    assert_allclose(t['mean'], [3.0, 0.0], atol=1e-15)
    assert_allclose(t['rms'], [np.sqrt(35.0 / 3.0), np.sqrt(0.025)])
    assert t['n'].tolist() == [3, 4]


def test_summarize_differences_empty_row_is_nan():
    t = evaluate.summarize_differences({'x': np.array([np.nan, 1.0])},
                                       mask=np.array([True, False]))
    assert np.isnan(t['mean'][0]) and np.isnan(t['rms'][0]) and t['n'][0] == 0


def test_summarize_differences_errors():
    with pytest.raises(InvalidInputError, match='non-empty dict'):
        evaluate.summarize_differences({})
    with pytest.raises(InvalidInputError, match=r"unknown key\(s\) \['psnr'\]"):
        evaluate.summarize_differences({'psnr': np.ones(3)})
    with pytest.raises(InvalidInputError, match='mask must be a boolean array, got dtype int'):
        evaluate.summarize_differences({'x': np.ones(3)}, mask=np.ones(3, dtype=int))
    with pytest.raises(ShapeMismatchError, match=r'mask of shape \(2,\) does not match'):
        evaluate.summarize_differences({'x': np.ones(3)}, mask=np.ones(2, dtype=bool))


# --- ellipticity correlations -----------------------------------------------------------

def test_ellipticity_correlation_self_and_scaled():
    rng = np.random.default_rng(5)
    e1, e2 = rng.normal(0, 0.3, (2, 200, 3))
    value, error = evaluate.ellipticity_correlation(e1, e2, e1, e2)
    assert value == pytest.approx(1.0, abs=1e-14)
    assert error < 1e-12
    value, _ = evaluate.ellipticity_correlation(0.5 * e1 + 0.1 * e2, 0.5 * e2 - 0.1 * e1, e1, e2)
    # the rotation part is orthogonal in the spin-2 sense: only 0.5 survives
    assert value == pytest.approx(0.5, abs=1e-12)


def test_ellipticity_correlation_independent_is_null():
    rng = np.random.default_rng(11)
    e1, e2, r1, r2 = rng.normal(0, 0.3, (4, 2000))
    value, error = evaluate.ellipticity_correlation(e1, e2, r1, r2)
    assert 0 < error < 0.1
    assert abs(value) < 3 * error


def test_ellipticity_correlation_bootstrap_error_is_calibrated():
    # The bootstrap error should match the scatter of C over independent
    # realisations (30 of them: the scatter itself is known to ~13%).
    rng = np.random.default_rng(2)
    values, errors = [], []
    for k in range(30):
        e1, e2, r1, r2 = rng.normal(0, 0.3, (4, 300))
        value, error = evaluate.ellipticity_correlation(e1 + 0.2 * r1, e2 + 0.2 * r2, r1, r2,
                                                        n_bootstrap=100, seed=k)
        values.append(value)
        errors.append(error)
    assert abs(np.mean(values) - 0.2) < 3 * np.std(values) / np.sqrt(30)
    assert 0.6 < np.std(values, ddof=1) / np.mean(errors) < 1.6


def test_ellipticity_correlation_nan_and_seed():
    rng = np.random.default_rng(8)
    e1, e2, r1, r2 = rng.normal(0, 0.3, (4, 50))
    value, error = evaluate.ellipticity_correlation(e1, e2, r1, r2, seed=3)
    e1_nan = np.append(e1, np.nan)
    others = [np.append(a, 0.5) for a in (e2, r1, r2)]
    assert evaluate.ellipticity_correlation(e1_nan, *others, seed=3) == (value, error)
    assert evaluate.ellipticity_correlation(e1, e2, r1, r2, seed=4)[1] != error
    assert all(np.isnan(evaluate.ellipticity_correlation([np.nan], [0.1], [0.1], [0.1])))


def test_ellipticity_correlation_errors():
    with pytest.raises(ShapeMismatchError, match='must have one shape'):
        evaluate.ellipticity_correlation(np.ones(3), np.ones(3), np.ones(3), np.ones(4))
    with pytest.raises(ConfigError, match='n_bootstrap must be an integer >= 2, got 1'):
        evaluate.ellipticity_correlation(np.ones(3), np.ones(3), np.ones(3), np.ones(3),
                                         n_bootstrap=1)


# --- flux classes and the confusion matrix ----------------------------------------------

def test_flux_bin_edges_tertiles():
    flux = np.concatenate([np.zeros(4), np.arange(1.0, 10.0)])
    edges = evaluate.flux_bin_edges(flux)
    assert_allclose(edges, [1.0, np.quantile(np.arange(1.0, 10.0), 1 / 3),
                            np.quantile(np.arange(1.0, 10.0), 2 / 3)])
    classes = evaluate.flux_classes(flux, edges)
    assert_array_equal(np.bincount(classes), [4, 3, 3, 3])
    # is_blank overrides flux <= 0; blank_threshold replaces the minimum
    is_blank = flux < 3
    edges = evaluate.flux_bin_edges(flux, is_blank=is_blank, blank_threshold=2.5)
    assert_allclose(edges, [2.5, *np.quantile(np.arange(3.0, 10.0), [1 / 3, 2 / 3])])


def test_flux_classes_boundaries():
    edges = [1.0, 2.0, 3.0]
    flux = np.array([[-5.0, 0.999, 1.0, 1.5], [2.0, 2.999, 3.0, np.inf]])
    assert_array_equal(evaluate.flux_classes(flux, edges), [[0, 0, 1, 1], [2, 2, 3, 0]])
    assert evaluate.flux_classes(np.nan, edges) == 0


def test_confusion_matrix_constructed():
    true_class = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    pred_class = [0, 0, 1, 0, 1, 2, 3, 3, 3, 2]
    cm = evaluate.confusion_matrix(true_class, pred_class)
    expected = np.array([[2, 1, 0, 0],
                         [1, 1, 0, 0],
                         [0, 0, 1, 1],
                         [0, 0, 1, 2]])
    assert_array_equal(cm, expected)
    s = evaluate.classification_summary(cm)
    assert (s['n_true_blank'], s['n_true_sources']) == (3, 7)
    assert (s['n_predicted_blank'], s['n_predicted_sources']) == (3, 7)
    assert s['blank_recall'] == pytest.approx(2 / 3)
    assert s['blank_precision'] == pytest.approx(2 / 3)
    assert s['sources_called_blank'] == pytest.approx(1 / 7)
    assert s['predicted_blank_ratio'] == pytest.approx(1.0)
    assert s['accuracy'] == pytest.approx(0.6)
    assert s['recall_high'] == pytest.approx(2 / 3)


def test_classification_summary_empty_rows_are_nan():
    cm = np.zeros((4, 4), dtype=int)
    cm[1, 1] = 5
    s = evaluate.classification_summary(cm)
    assert np.isnan(s['blank_recall']) and np.isnan(s['recall_medium'])
    assert s['recall_low'] == 1.0


def test_classification_errors():
    with pytest.raises(InvalidInputError, match='needs at least 3 non-blank objects'):
        evaluate.flux_bin_edges([0.0, 1.0, 2.0])
    with pytest.raises(InvalidInputError, match=r'finite 1-D array .* 1 non-finite'):
        evaluate.flux_bin_edges([1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ConfigError, match='blank_threshold must be finite and at most'):
        evaluate.flux_bin_edges(np.arange(1.0, 10.0), blank_threshold=50.0)
    with pytest.raises(ShapeMismatchError, match=r'is_blank of shape \(2,\)'):
        evaluate.flux_bin_edges(np.arange(1.0, 10.0), is_blank=np.ones(2, dtype=bool))
    with pytest.raises(InvalidInputError, match=r'three finite non-decreasing .* \[3.0, 2.0'):
        evaluate.flux_classes([1.0], [3.0, 2.0, 4.0])
    with pytest.raises(ShapeMismatchError, match=r'pred_class has shape \(2,\)'):
        evaluate.confusion_matrix([0, 1, 2], [0, 1])
    with pytest.raises(InvalidInputError, match='pred_class must hold classes 0 .* got 4'):
        evaluate.confusion_matrix([0, 1], [0, 4])
    with pytest.raises(InvalidInputError, match='true_class must hold classes'):
        evaluate.confusion_matrix([0.5, 1], [0, 1])
    with pytest.raises(InvalidInputError, match=r'4x4 array .* got shape \(3, 3\)'):
        evaluate.classification_summary(np.zeros((3, 3), dtype=int))


# --- Wiener baseline --------------------------------------------------------------------

def test_wiener_delta_psf_is_identity():
    rng = np.random.default_rng(1)
    stamps = rng.normal(size=(2, 3, 20, 24))
    delta = np.zeros((2, 3, 5, 5))
    delta[..., 2, 2] = 1.0
    assert_allclose(evaluate.wiener_deconvolve(stamps, delta, balance=0.0), stamps,
                    atol=1e-12)
    assert_allclose(evaluate.wiener_deconvolve(stamps, delta, noise_sigma=0.0), stamps,
                    atol=1e-12)


def test_wiener_undoes_an_offset_psf(convolved_gaussian):
    # A delta PSF 1 row down and 2 columns right of the centre shifts the
    # image; deconvolving must shift it back (checks PSF centring and the
    # conjugate).
    truth = convolved_gaussian[0]
    psf = np.zeros((5, 5))
    psf[3, 4] = 1.0
    observed = fftconvolve(truth, psf, mode='same')
    assert_allclose(image_moments(observed)['x'], 31.3 + 2, atol=1e-9)
    out = evaluate.wiener_deconvolve(observed, psf, balance=0.0)
    assert_allclose(out, truth, atol=1e-12)


def test_wiener_matches_skimage(convolved_gaussian):
    from skimage.restoration import wiener

    _, psf, observed = convolved_gaussian
    stamp = observed + np.random.default_rng(4).normal(0, 0.5, observed.shape)
    ours = evaluate.wiener_deconvolve(stamp, psf, balance=0.01)
    # skimage filters circularly without padding and with a Laplacian
    # regulariser by default: give it our zero-padded 128x128 grid and a
    # unit (delta) regulariser. The algebra is then identical and only
    # float64 FFT rounding differs (~1e-15 relative), hence 1e-10.
    padded = np.zeros((128, 128))
    padded[:64, :64] = stamp
    reference = wiener(padded, psf, 0.01, reg=np.ones((1, 1)), clip=False)[:64, :64]
    assert_allclose(ours, reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())


def test_wiener_recovers_a_convolved_gaussian(convolved_gaussian):
    truth, psf, observed = convolved_gaussian
    out = evaluate.wiener_deconvolve(observed[None, None], psf[None, None], balance=1e-4)
    m_truth, m_obs, m_out = (image_moments(a) for a in (truth, observed, out[0, 0]))
    error_observed = abs(m_obs['size'] - m_truth['size'])
    error_wiener = abs(m_out['size'][()] - m_truth['size'])
    assert error_observed > 0.1 * m_truth['size']
    assert error_wiener < 0.01 * error_observed
    assert_allclose([m_out['x'][()], m_out['y'][()]], [31.3, 32.6], atol=1e-3)
    assert_allclose(m_out['flux'], 1000.0, rtol=1e-3)
    # the PSFs are normalised internally: a PSF with sum 2 changes nothing
    assert_allclose(evaluate.wiener_deconvolve(observed, 2 * psf, balance=1e-4), out[0, 0],
                    atol=1e-12)


def test_wiener_noise_sigma_uses_documented_k(convolved_gaussian):
    _, psf, observed = convolved_gaussian
    rng = np.random.default_rng(6)
    sigma = np.array([0.2, 2.0])
    stamps = observed + sigma[:, None, None] * rng.normal(size=(2, 64, 64))
    noise_power = 64 * 64 * sigma**2
    k = noise_power / (np.sum(stamps**2, axis=(-2, -1)) - noise_power)
    ours = evaluate.wiener_deconvolve(stamps, psf, noise_sigma=sigma)
    assert_allclose(ours, evaluate.wiener_deconvolve(stamps, psf, balance=k), atol=1e-12)


def test_wiener_blocks_match_one_pass(monkeypatch):
    # Stamps are filtered in blocks of _FFT_BLOCK; block edges must not
    # mix up stamps, PSFs or K values.
    rng = np.random.default_rng(12)
    stamps = rng.normal(size=(7, 2, 16, 16))
    psfs = rng.uniform(0.1, 1.0, (7, 2, 5, 5))
    balance = rng.uniform(0.01, 0.1, (7, 2))
    one_pass = evaluate.wiener_deconvolve(stamps, psfs, balance=balance)
    monkeypatch.setattr(evaluate.baselines, '_FFT_BLOCK', 3)
    assert_allclose(evaluate.wiener_deconvolve(stamps, psfs, balance=balance), one_pass,
                    atol=1e-13)


def test_wiener_pure_noise_is_damped():
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 1.0, (1, 1, 32, 32))
    psf = gaussian((9, 9), 1.5, 1.5, 0.0, 4, 4)[None, None]
    # sum(noise^2) < n_pix sigma^2 here, so K hits its cap of 1e3
    out = evaluate.wiener_deconvolve(noise, psf, noise_sigma=1.1)
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() < 1e-2 * np.abs(noise).max()


def test_wiener_errors():
    stamps = np.ones((1, 1, 16, 16))
    psf = np.ones((1, 1, 3, 3))
    with pytest.raises(ConfigError, match='give exactly one of noise_sigma'):
        evaluate.wiener_deconvolve(stamps, psf)
    with pytest.raises(ConfigError, match='give exactly one of noise_sigma'):
        evaluate.wiener_deconvolve(stamps, psf, noise_sigma=1.0, balance=0.1)
    with pytest.raises(ConfigError, match=r'balance must be finite and >= 0, got -0.1'):
        evaluate.wiener_deconvolve(stamps, psf, balance=-0.1)
    with pytest.raises(ConfigError, match='noise_sigma must be finite and >= 0'):
        evaluate.wiener_deconvolve(stamps, psf, noise_sigma=np.nan)
    with pytest.raises(ShapeMismatchError, match=r'balance of shape \(3,\) does not broadcast'):
        evaluate.wiener_deconvolve(stamps, psf, balance=[0.1, 0.2, 0.3])
    with pytest.raises(InvalidPSFError, match=r'odd sizes.* got \(4, 3\)'):
        evaluate.wiener_deconvolve(stamps, np.ones((1, 1, 4, 3)), balance=0.1)
    with pytest.raises(InvalidPSFError,
                       match=r'PSF images \(17, 17\) are larger than the stamps \(16, 16\)'):
        evaluate.wiener_deconvolve(stamps, np.ones((17, 17)), balance=0.1)
    with pytest.raises(InvalidPSFError, match=r'psfs\[0, 0\] sums to 0.0; a PSF must'):
        evaluate.wiener_deconvolve(stamps, np.zeros((1, 1, 3, 3)), balance=0.1)
    with pytest.raises(ShapeMismatchError, match='psfs of shape .* do not match stamps'):
        evaluate.wiener_deconvolve(stamps, np.ones((2, 1, 3, 3)), balance=0.1)


# --- Richardson-Lucy baseline -----------------------------------------------------------

def test_richardson_lucy_delta_psf_is_identity():
    rng = np.random.default_rng(9)
    stamps = rng.normal(size=(2, 1, 16, 16))
    delta = np.zeros((2, 1, 3, 3))
    delta[..., 1, 1] = 1.0
    assert_allclose(evaluate.richardson_lucy_deconvolve(stamps, delta, num_iter=5), stamps,
                    atol=1e-12)


def test_richardson_lucy_recovers_gaussian_size(convolved_gaussian):
    truth, psf, observed = convolved_gaussian
    out = evaluate.richardson_lucy_deconvolve(observed[None, None], psf[None, None])[0, 0]
    m_truth, m_obs, m_out = (image_moments(a) for a in (truth, observed, out))
    assert m_obs['size'] > 1.1 * m_truth['size']
    assert_allclose(m_out['size'], m_truth['size'], rtol=0.02)
    assert_allclose(m_out['flux'], 1000.0, rtol=1e-3)
    assert_allclose([m_out['x'], m_out['y']], [31.3, 32.6], atol=0.01)


def test_richardson_lucy_noise_and_blanks_stay_finite(convolved_gaussian):
    _, psf, observed = convolved_gaussian
    rng = np.random.default_rng(10)
    stamps = np.stack([observed + rng.normal(0, 2.0, observed.shape),  # negative pixels
                       rng.normal(0, 1.0, observed.shape),             # pure noise
                       np.zeros_like(observed)])[:, None]               # blank
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = evaluate.richardson_lucy_deconvolve(stamps, psf, num_iter=30)
    assert out.shape == stamps.shape
    assert np.all(np.isfinite(out))
    assert_array_equal(out[2], 0.0)
    # Flux is conserved on the padded grid; cropping loses what the edge
    # noise spread into the padding (here ~40 of ~700, the noise sum over
    # the stamp being +-128), so only a loose check.
    assert_allclose(out[0].sum(), stamps[0].sum(), rtol=0.1)


@pytest.mark.parametrize('num_iter', [0, 2.5, True])
def test_richardson_lucy_errors(num_iter):
    with pytest.raises(ConfigError, match='num_iter must be a positive integer'):
        evaluate.richardson_lucy_deconvolve(np.ones((16, 16)), np.ones((3, 3)),
                                            num_iter=num_iter)


# --- evaluate_predictions and write_report ----------------------------------------------

@pytest.fixture(scope='module')
def results(synthetic_set):
    truth, psfs, observed, is_blank, sigma = synthetic_set
    predictions = {'perfect': truth.copy(), 'observed': observed,
                   'wiener': evaluate.wiener_deconvolve(observed, psfs, noise_sigma=sigma)}
    return evaluate.evaluate_predictions(truth, predictions, psfs=psfs, pixel_scale=0.2,
                                         is_blank=is_blank, noise_sigma=sigma,
                                         bands=('g', 'r'), n_bootstrap=50)


def test_evaluate_predictions_tables(results, synthetic_set):
    is_blank = synthetic_set[3]
    assert set(results) >= {'objects', 'table1', 'table2', 'table3', 'correlations',
                            'confusion', 'edges'}
    methods = ['perfect', 'observed', 'wiener']

    objects = results['objects']
    assert len(objects) == 30 * len(methods)
    assert objects['d_flux_g'].unit == u.percent and objects['d_x_r'].unit == u.pix
    assert 'snr_r' in objects.colnames

    table1 = results['table1']
    assert table1['method'].tolist() == methods
    assert np.isinf(table1['psnr_mean'][0]) and table1['one_minus_ssim_mean'][0] == 0
    assert table1['n'].tolist() == [21, 21, 21]
    assert table1['one_minus_ssim_median'][1] > 0

    table2 = results['table2']
    assert table2['quantity'].tolist() == ['flux', 'x', 'y', 'e1', 'e2', 'e', 'size']
    assert table2.colnames == ['quantity', 'unit', 'perfect_mean', 'perfect_rms',
                               'observed_mean', 'observed_rms', 'wiener_mean', 'wiener_rms']
    assert_allclose(table2['perfect_rms'], 0.0)
    # convolution makes every source larger: the observed size bias is positive
    assert table2['observed_mean'][6] > 10.0

    confusion = results['confusion']
    assert_array_equal(np.diag(confusion['perfect']), [9, 7, 7, 7])
    for cm in confusion.values():
        assert cm.sum() == 30 and cm[0].sum() == is_blank.sum()
    table3 = results['table3']
    assert table3['blank_recall'][0] == 1.0 and table3['n_pred_blank'][0] == 9
    assert len(results['edges']) == 3


def test_evaluate_predictions_correlations(results):
    corr = results['correlations']
    assert len(corr) == 4 * 4  # truth + 3 methods, bins all/low/medium/high
    assert corr['snr_bin'][:4].tolist() == ['all', 'low', 'medium', 'high']
    truth_rows = corr[corr['method'] == 'truth']
    perfect_rows = corr[corr['method'] == 'perfect']
    assert_allclose(truth_rows['c_true'], 1.0)
    assert_allclose(perfect_rows['c_psf'], truth_rows['c_psf'])
    assert_array_equal(truth_rows['n'], [21, 7, 7, 7])
    observed = corr[(corr['method'] == 'observed') & (corr['snr_bin'] == 'all')][0]
    truth_all = truth_rows[0]
    # the observed images carry the PSF ellipticity: leakage above the null level
    assert observed['c_psf'] > truth_all['c_psf'] + 2 * observed['c_psf_err']
    assert observed['c_true'] < 1 - 3 * observed['c_true_err']
    # The leakage of the errors is 0 for a perfect method, whatever the truth's chance
    # correlation with the PSFs, and the observed images' excess over that chance level.
    assert_allclose(perfect_rows['c_psf_residual'], 0.0, atol=1e-12)
    assert_allclose(truth_rows['c_psf_residual'], 0.0, atol=1e-12)
    assert_allclose(observed['c_psf_residual'], observed['c_psf'] - truth_all['c_psf'],
                    atol=1e-9)


def test_flux_bias_table():
    rng = np.random.default_rng(4)
    true = rng.uniform(10, 1000, (90, 2))
    true_class = np.repeat([1, 2, 3], 30)
    true_class[:5] = 0  # blanks are left out
    measured = true * np.where(true_class == 1, 1.05, 1.0)[:, None]
    table = evaluate.flux_bias_table(measured, true, true, true_class)
    assert table['class'].tolist() == ['low', 'medium', 'high', 'all']
    assert table['n'].tolist() == [50, 60, 60, 170]
    assert_allclose(table['measured_median'].to_value(u.percent), [5, 0, 0, 0], atol=1e-9)
    assert_allclose(table['corrected_mean'].to_value(u.percent), 0, atol=1e-9)
    with pytest.raises(ShapeMismatchError, match='true_class shape'):
        evaluate.flux_bias_table(measured, true, true, true_class[:-1])


def test_evaluate_predictions_errors(synthetic_set):
    truth, psfs, observed, is_blank, _ = synthetic_set
    kwargs = {'psfs': psfs, 'pixel_scale': 0.2, 'is_blank': is_blank}
    with pytest.raises(InvalidInputError, match='predictions must be a non-empty dict'):
        evaluate.evaluate_predictions(truth, {}, **kwargs)
    with pytest.raises(InvalidInputError, match="may not use the name 'truth'"):
        evaluate.evaluate_predictions(truth, {'truth': truth}, **kwargs)
    with pytest.raises(ShapeMismatchError, match=r"predictions\['bad'\] has shape"):
        evaluate.evaluate_predictions(truth, {'bad': observed[:5]}, **kwargs)
    with pytest.raises(ShapeMismatchError, match=r'psfs must have shape \(30, 2, py, px\)'):
        evaluate.evaluate_predictions(truth, {'o': observed}, psfs=psfs[:, :1],
                                      pixel_scale=0.2, is_blank=is_blank)
    with pytest.raises(ShapeMismatchError, match=r'is_blank must be a boolean array of shape'):
        evaluate.evaluate_predictions(truth, {'o': observed}, psfs=psfs, pixel_scale=0.2,
                                      is_blank=is_blank.astype(int))


def test_write_report(results, tmp_path):
    paths = evaluate.write_report(results, tmp_path / 'report')
    names = sorted(p.name for p in paths)
    assert names == ['confusion.ecsv', 'correlations.ecsv', 'objects.ecsv', 'report.md',
                     'table1.ecsv', 'table2.ecsv', 'table3.ecsv']
    assert sorted(p.name for p in (tmp_path / 'report').iterdir()) == names  # no temp files
    table2 = QTable.read(tmp_path / 'report' / 'table2.ecsv', format='ascii.ecsv')
    assert_allclose(table2['observed_rms'], results['table2']['observed_rms'])
    objects = QTable.read(tmp_path / 'report' / 'objects.ecsv', format='ascii.ecsv')
    assert objects['d_size_g'].unit == u.percent
    confusion = QTable.read(tmp_path / 'report' / 'confusion.ecsv', format='ascii.ecsv')
    assert len(confusion) == 12
    report = (tmp_path / 'report' / 'report.md').read_text()
    assert '## table2' in report and '| quantity | unit |' in report
    assert 'Flux bin edges' in report


def test_write_report_refuses_to_overwrite(results, tmp_path):
    evaluate.write_report(results, tmp_path)
    before = (tmp_path / 'table1.ecsv').read_text()
    (tmp_path / 'report.md').write_text('keep me')
    with pytest.raises(OutputExistsError, match='exists; pass overwrite=True') as info:
        evaluate.write_report(results, tmp_path)
    assert isinstance(info.value, FileExistsError)
    assert (tmp_path / 'report.md').read_text() == 'keep me'
    assert (tmp_path / 'table1.ecsv').read_text() == before
    evaluate.write_report(results, tmp_path, overwrite=True)
    assert (tmp_path / 'report.md').read_text().startswith('# psfdeconv evaluation report')


def test_write_report_errors(tmp_path):
    with pytest.raises(InvalidInputError, match='results holds no table'):
        evaluate.write_report({'edges': [1, 2, 3]}, tmp_path)
    with pytest.raises(InvalidInputError, match='results must be the dict'):
        evaluate.write_report([], tmp_path)


# --- shape_information_floor -----------------------------------------------------------

def _gaussian_population(n, seed, sigma=3.0, flux=1000.0, n_bands=1):
    """n Gaussian galaxies of one size and random distortions |e| < 0.4,
    identical in every band, and a round Gaussian PSF (sigma 2 px)."""
    rng = np.random.default_rng(seed)
    e = rng.uniform(0, 0.4, n)
    angle = rng.uniform(0, np.pi, n)
    # Axis ratio q from the distortion e = (1 - q^2) / (1 + q^2).
    q = np.sqrt((1 - e) / (1 + e))
    truth = np.stack([gaussian((48, 48), sigma / np.sqrt(qi), sigma * np.sqrt(qi), t,
                               24.0, 24.0, flux=flux) for qi, t in zip(q, angle, strict=True)])
    truth = np.repeat(truth[:, None], n_bands, axis=1)
    psf = gaussian((25, 25), 2.0, 2.0, 0.0, 12, 12)
    return truth, np.broadcast_to(psf, (n, n_bands, 25, 25))


def test_information_floor_bands_share_the_shear():
    # Two identical bands with equal noise carry twice the information
    # about the shared shear: the bound shrinks by sqrt(2).
    truth, psfs = _gaussian_population(4, seed=1, n_bands=2)
    two = evaluate.shape_information_floor(truth, psfs, np.full((4, 2), 0.5))
    one = evaluate.shape_information_floor(truth[:, :1], psfs[:, :1], np.full((4, 1), 0.5))
    band0 = np.asarray(two['band']) == 0
    assert_allclose(two['crb_e1'][band0], one['crb_e1'] / np.sqrt(2), rtol=1e-6)
    # The round galaxy's analytic bound, 4 sqrt(pi) s_obs^3 noise / (F s^2),
    # holds for the elliptical ones to within their shape's effect.
    expected = 4 * np.sqrt(np.pi) * np.sqrt(13.0) ** 3 * 0.5 / (1000 * 9)
    assert_allclose(one['crb_e1'], expected, rtol=0.25)
    assert_array_equal(one['id'], np.arange(4))
    assert one['crb_size'].unit == u.percent


def test_information_floor_shrinks_to_the_population():
    truth, psfs = _gaussian_population(40, seed=2)
    faint = evaluate.shape_information_floor(truth, psfs, np.full((40, 1), 20.0))
    bright = evaluate.shape_information_floor(truth, psfs, np.full((40, 1), 0.05))
    prior_rms = np.sqrt(np.mean(np.concatenate([faint['truth_e1'], faint['truth_e2']]) ** 2))
    faint_floor = np.sqrt(np.mean(np.concatenate([faint['floor_e1'], faint['floor_e2']]) ** 2))
    # Noise far above the spread of shapes: nothing better than the
    # population itself (its spread, widened by the kernel density).
    assert np.all(faint['crb_e1'] > 3 * prior_rms)
    assert 0.8 * prior_rms < faint_floor < 1.3 * prior_rms
    # Noise far below it: the posterior mean is the measurement.
    assert_allclose(bright['floor_e1'], bright['crb_e1'], rtol=0.5)
    assert np.median(bright['floor_e1'] / bright['crb_e1']) > 0.8
    # The same draws with the same seed.
    again = evaluate.shape_information_floor(truth, psfs, np.full((40, 1), 20.0))
    assert_array_equal(again['floor_e1'], faint['floor_e1'])


def test_information_floor_through_a_target_psf():
    # A Gaussian target of sigma t widens a Gaussian galaxy of sigma s to
    # sqrt(s^2 + t^2) and scales its distortion's response to a shear by
    # s^2 / (s^2 + t^2); the observed stamps, hence the Fisher information,
    # are the same.
    truth, psfs = _gaussian_population(4, seed=5)
    noise = np.full((4, 1), 0.5)
    plain = evaluate.shape_information_floor(truth, psfs, noise)
    y, x = np.mgrid[-10:11, -10:11]
    target = np.exp(-0.5 * (x**2 + y**2) / 2.0**2)
    through = evaluate.shape_information_floor(truth, psfs, noise, target_psf=target)
    assert_allclose(through['truth_size'].value, np.hypot(plain['truth_size'].value, 2.0),
                    rtol=0.02)
    ratio = 9.0 / (9.0 + 4.0)
    assert_allclose(through['crb_e1'], plain['crb_e1'] * ratio, rtol=0.05)
    assert_allclose(through['truth_e1'], plain['truth_e1'] * ratio, rtol=0.05, atol=1e-3)
    # A one-pixel target changes nothing; a FWHM needs the pixel scale.
    delta = evaluate.shape_information_floor(truth, psfs, noise, target_psf=np.ones((1, 1)))
    assert_allclose(delta['crb_e1'], plain['crb_e1'], rtol=1e-9)
    fwhm = evaluate.shape_information_floor(truth, psfs, noise, target_psf=0.4 * u.arcsec,
                                            pixel_scale=0.2)
    assert np.all(fwhm['truth_size'] > plain['truth_size'])
    with pytest.raises(InvalidInputError, match='needs pixel_scale'):
        evaluate.shape_information_floor(truth, psfs, noise, target_psf=0.4)


def test_information_floor_leaves_out_blanks_and_checks_inputs():
    truth, psfs = _gaussian_population(5, seed=3)
    is_blank = np.array([False, True, False, False, False])
    table = evaluate.shape_information_floor(truth, psfs, np.full((5, 1), 0.5),
                                             is_blank=is_blank)
    assert_array_equal(table['id'], [0, 2, 3, 4])
    with pytest.raises(ShapeMismatchError, match='psfs must have shape'):
        evaluate.shape_information_floor(truth, psfs[:4], np.full((5, 1), 0.5))
    with pytest.raises(InvalidInputError, match='noise_sigma must be positive'):
        evaluate.shape_information_floor(truth, psfs, np.zeros((5, 1)))
    with pytest.raises(ShapeMismatchError, match='is_blank'):
        evaluate.shape_information_floor(truth, psfs, 0.5, is_blank=is_blank[:3])
    with pytest.raises(InvalidInputError, match='at least 3'):
        evaluate.shape_information_floor(truth, psfs, 0.5, is_blank=~is_blank)
