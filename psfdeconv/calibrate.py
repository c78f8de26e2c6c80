# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Calibration of a trained model on simulations: the model card's corrections.

The corrections `~psfdeconv.deconvolve.deconvolve_stamps` applies are fitted
here, on simulated objects the weights never trained on (the validation
split): the size bias of faint galaxies (`fit_size_bias`), the PSF
ellipticity the network leaves in its output (`fit_psf_leakage`), the
remaining flux bias (`fit_flux_bias`, paper section III.3) and the
detection threshold that separates blank stamps (`fit_detection_threshold`).
`calibrate_card` fits them all in the order they are applied;
`calibrate_model` does what ``psfdeconv train`` does after training: the
calibrations, the card's validation metrics and training ranges;
`recalibrate_model` refits the card of a saved model (e.g. for another
number of symmetries) without training (``psfdeconv calibrate``).
`calibrate_shear` adds the shear response of a ring test
(`psfdeconv.shear`) to a card (``psfdeconv calibrate-shear``), fitted on one
seed and validated on another.

This module fits; `psfdeconv.deconvolve` applies (``correct_*``).
"""

import numpy as np

from .deconvolve import (
    apply_detection,
    correct_psf_leakage,
    correct_size_bias,
    deconvolve_stamps,
    float32_work,
    log10_snr,
    psf_ellipticity,
    refit_images,
    validate_stamps,
)
from .exceptions import ConfigError, InvalidInputError, ShapeMismatchError
from .transforms import shear_images

__all__ = ['fit_flux_bias', 'calibrate_flux_bias',
           'fit_detection_threshold', 'fit_size_bias', 'fit_psf_leakage',
           'calibrate_card', 'validation_metrics', 'calibrate_model',
           'recalibrate_model', 'calibrate_shear', 'write_shear_response',
           'DETECTION_BLANK_RECALL', 'DETECTION_MAX_SOURCES_BELOW']


#: Bins of true signal-to-noise ratio `fit_flux_bias` nulls the median bias in.
_FLUX_BIAS_BINS = 12


def fit_flux_bias(flux, flux_err, true_flux, *, snr_range=(1.0, 3.0)):
    """Fit the flux-bias correction on simulations (paper section III.3).

    The correction multiplies the flux by ``c0 + c1 L + c2 L**2`` with
    ``L = log10(flux / flux_err)`` clipped to ``snr_range`` (it is not
    extrapolated). The coefficients are chosen so that the median of
    corrected / true flux is 1 in each of up to 12 bins (quantiles) of the
    true signal-to-noise ratio ``true_flux / flux_err``, least squares over
    the bins, using the objects whose ``L`` lies within ``snr_range``.

    Why binned by the truth: a fit of true / measured against the measured
    ``L`` answers "given what I measured", and objects scattered up by the
    noise then leave the faint ones biased high at fixed true flux; the
    binned fit is
    unbiased at fixed true brightness, which is what a flux comparison
    with the truth (or with another survey) sees, and still depends on
    measured quantities only, so it applies to real data.

    Parameters
    ----------
    flux, flux_err, true_flux : `~numpy.ndarray`
        Same shape; recovered flux, its 1-sigma error and the truth.
    snr_range : tuple of float, optional
        log10(SNR) range used for the fit and to which L is clipped.

    Returns
    -------
    dict
        ``{'coefficients': [c0, c1, c2], 'log_snr_range': [lo, hi],
        'n_objects': n, 'n_bins': k, 'form': ...}``, ready for a model card.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.calibrate import fit_flux_bias
    >>> flux = np.logspace(1.1, 2.9, 60)
    >>> fit = fit_flux_bias(flux, np.ones(60), 1.02 * flux)
    >>> np.round(fit['coefficients'], 6).tolist()
    [1.02, 0.0, 0.0]
    """
    from scipy.optimize import least_squares

    flux = np.ravel(flux)
    flux_err = np.ravel(flux_err)
    true_flux = np.ravel(true_flux)
    log_snr = log10_snr(flux, flux_err)
    use = (np.isfinite(log_snr) & (flux > 0) & (true_flux > 0)
           & (log_snr >= snr_range[0]) & (log_snr <= snr_range[1]))
    if use.sum() < 10:
        raise InvalidInputError(
            f'only {int(use.sum())} object(s) have positive fluxes and '
            f'log10(SNR) within {tuple(snr_range)}; the flux-bias fit needs '
            f'at least 10: simulate more validation objects.')
    log_snr = log_snr[use]
    measured_over_true = flux[use] / true_flux[use]
    true_snr = true_flux[use] / flux_err[use]
    n_bins = int(np.clip(use.sum() // 20, 3, _FLUX_BIAS_BINS))
    edges = np.quantile(true_snr, np.linspace(0, 1, n_bins + 1))
    index = np.clip(np.searchsorted(edges, true_snr, side='right') - 1, 0, n_bins - 1)
    bins = [index == k for k in range(n_bins)]
    powers = log_snr[:, None] ** np.arange(3)

    def median_bias(coefficients):
        ratio = (powers @ coefficients) * measured_over_true - 1.0
        return np.array([np.median(ratio[b]) for b in bins])

    # Start from the linear least-squares fit of the bins' mean ratios,
    # then null the medians, which noise peaks fitted as faint sources
    # cannot pull.
    design = np.array([(powers[b] * measured_over_true[b, None]).mean(axis=0)
                       for b in bins])
    start = np.linalg.lstsq(design, np.ones(n_bins), rcond=None)[0]
    fit = least_squares(median_bias, start, xtol=1e-12, ftol=1e-12)
    coefficients = fit.x if np.sum(fit.fun**2) < np.sum(median_bias(start)**2) else start
    return {'coefficients': [float(c) for c in coefficients],
            'log_snr_range': [float(v) for v in snr_range],
            'n_objects': int(use.sum()),
            'n_bins': n_bins,
            'form': 'true/measured = c0 + c1 L + c2 L^2, '
                    'L = log10(flux / flux_err) clipped to log_snr_range; '
                    'median corrected/true = 1 in bins of true flux / flux_err'}


def calibrate_flux_bias(model, observed, psfs, pixel_scale, truth, *,
                        noise_sigma=None, batch_size=128):
    """Deconvolve simulated stamps and fit the model's flux-bias correction.

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        The trained model (its card's ``flux_bias`` is not used).
    observed, psfs, pixel_scale
        As for `~psfdeconv.deconvolve.deconvolve_stamps`, from simulations not used in training.
    truth : `~numpy.ndarray`
        The simulations' truth, (n, n_bands, ny, nx).
    noise_sigma : `~numpy.ndarray`, optional
        Known per-band noise, (n, n_bands).

    Returns
    -------
    dict
        As `fit_flux_bias`, pooled over bands and non-blank objects, plus
        for a multi-band model ``'per_band_coefficients'``: one fit per
        output band ([c0, c1, c2] each), which `~psfdeconv.deconvolve.correct_flux_bias` uses.
        The network's flux bias can differ between its output bands by a
        few per cent, which a pooled fit leaves in.
    """
    _, details = deconvolve_stamps(observed, psfs, pixel_scale=pixel_scale,
                                   model=model, noise_sigma=noise_sigma,
                                   batch_size=batch_size, return_details=True,
                                   # Calibrations are fitted, and hold, in float32.
                                   precision='float32')
    return _fit_band_flux_bias(details['flux'], details['flux_err'],
                               truth.sum(axis=(-2, -1), dtype=np.float64))


def _fit_band_flux_bias(flux, flux_err, true_flux):
    """`fit_flux_bias` pooled over the bands, plus one fit per band."""
    result = fit_flux_bias(flux, flux_err, true_flux)
    n_bands = true_flux.shape[-1]
    if n_bands > 1:
        result['per_band_coefficients'] = [
            fit_flux_bias(flux[:, b], flux_err[:, b], true_flux[:, b])['coefficients']
            for b in range(n_bands)]
    return result


#: Fraction of the validation blanks that the detection threshold of
#: `fit_detection_threshold` keeps below it by default.
DETECTION_BLANK_RECALL = 0.995


#: Largest fraction of the validation sources it may put below it.
DETECTION_MAX_SOURCES_BELOW = 0.01


#: Fewest blanks a detection threshold is fitted on.
_MIN_BLANKS = 100


def fit_detection_threshold(snr, is_blank, *, blank_recall=DETECTION_BLANK_RECALL,
                            max_sources_below=DETECTION_MAX_SOURCES_BELOW):
    """The detection threshold that calls ``blank_recall`` of blanks blank,
    unless that calls more than ``max_sources_below`` of sources blank.

    The threshold is the lower of two quantiles: the ``blank_recall``
    quantile of the blanks' SNR and the ``max_sources_below`` quantile of
    the sources'. Where blanks and faint sources overlap (a single band
    holds less signal than three), the sources win.

    Parameters
    ----------
    snr : `~numpy.ndarray`
        `~psfdeconv.deconvolve.detection_snr` of simulated objects the weights never trained on,
        shape (n,).
    is_blank : `~numpy.ndarray`
        bool (n,), True for the blank stamps.
    blank_recall : float, optional
        Fraction of the blanks whose SNR should fall below the threshold.
    max_sources_below : float, optional
        Largest fraction of the sources whose SNR may fall below it.

    Returns
    -------
    dict
        ``{'snr_threshold', 'blank_recall', 'sources_below', 'n_blank',
        'n_sources', 'target_blank_recall', 'max_sources_below'}``, ready
        for a model card: the threshold, the fractions of blanks and of
        sources below it on these objects, and the two targets.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        With fewer than 100 blanks (the quantile would be noise).

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.calibrate import fit_detection_threshold
    >>> rng = np.random.default_rng(0)
    >>> snr = np.concatenate([rng.normal(1, 1.5, 1000), rng.uniform(8, 300, 3000)])
    >>> is_blank = np.arange(4000) < 1000
    >>> fit = fit_detection_threshold(snr, is_blank, blank_recall=0.99)
    >>> 4 < fit['snr_threshold'] < 6, fit['sources_below']
    (True, 0.0)
    """
    snr = np.ravel(np.asarray(snr, dtype=float))
    is_blank = np.ravel(np.asarray(is_blank, dtype=bool))
    if snr.shape != is_blank.shape:
        raise ShapeMismatchError(f'snr and is_blank must have one shape, got '
                                 f'{snr.shape} and {is_blank.shape}.')
    if not 0 < blank_recall < 1:
        raise ConfigError(f'blank_recall must be in (0, 1), got {blank_recall!r}.')
    # A blank whose refit has no finite SNR (zero output) is blank anyway.
    blank_snr = np.where(np.isfinite(snr[is_blank]), snr[is_blank], -np.inf)
    if blank_snr.size < _MIN_BLANKS:
        raise InvalidInputError(
            f'only {blank_snr.size} blank object(s); the detection threshold '
            f'needs at least {_MIN_BLANKS}: simulate more validation objects (or '
            f'a larger blank_fraction).')
    if not 0 <= max_sources_below < 1:
        raise ConfigError(f'max_sources_below must be in [0, 1), got '
                          f'{max_sources_below!r}.')
    threshold = float(np.quantile(blank_snr, blank_recall, method='higher'))
    threshold = np.nextafter(threshold, np.inf)  # the quantile itself is blank
    source_snr = snr[~is_blank]
    source_snr = np.where(np.isfinite(source_snr), source_snr, -np.inf)
    if source_snr.size:
        threshold = min(threshold, float(np.quantile(source_snr, max_sources_below,
                                                     method='lower')))
    return {'snr_threshold': float(threshold),
            'blank_recall': float(np.mean(blank_snr < threshold)),
            'sources_below': float(np.mean(~(source_snr >= threshold)))
            if source_snr.size else None,
            'n_blank': int(blank_snr.size), 'n_sources': int(source_snr.size),
            'target_blank_recall': float(blank_recall),
            'max_sources_below': float(max_sources_below),
            'form': 'images set to 0 where sum(flux) / sqrt(sum(flux_err^2)) '
                    '< snr_threshold'}


def calibrate_card(model, observed, psfs, pixel_scale, truth, is_blank, *,
                   noise_sigma=None, batch_size=128,
                   blank_recall=DETECTION_BLANK_RECALL,
                   max_sources_below=DETECTION_MAX_SOURCES_BELOW,
                   size_bias=True, return_images=False):
    """Fit a model card's PSF-leakage, size-bias and flux-bias corrections
    and detection threshold.

    One deconvolution of simulated objects the weights never trained on
    (the validation split), with the card's ``symmetries``; then, in the
    order `~psfdeconv.deconvolve.deconvolve_stamps` applies them, an amplitude refit and
    `fit_size_bias` (on the sources' network outputs), `fit_psf_leakage`
    (on the sources' dilated outputs), the amplitude refit of the
    corrected outputs, the flux-bias fits of `calibrate_flux_bias` (on the
    sources) and `fit_detection_threshold` (on the blanks and sources).

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        The trained model (its card's ``psf_leakage``, ``flux_bias`` and
        ``detection`` are not used).
    observed, psfs, pixel_scale, truth, noise_sigma, batch_size
        As for `calibrate_flux_bias`.
    is_blank : `~numpy.ndarray`
        bool (n,), True for blank stamps.
    blank_recall, max_sources_below : float, optional
        As for `fit_detection_threshold`.
    size_bias : bool, optional
        Fit the size-bias correction; with False the card gets none
        (``size_bias`` None) and the leakage is fitted on the network outputs
        as they are.
    return_images : bool, optional
        Also return the deconvolved images as the calibrated card gives
        them, e.g. to measure the card's metrics without deconvolving the
        objects again.

    Returns
    -------
    dict
        ``{'psf_leakage': ..., 'size_bias': ..., 'flux_bias': ...,
        'detection': ...}``;
        ``detection`` is None (no detection gate) with fewer than 100
        blanks.
    images : `~numpy.ndarray`
        Only if ``return_images``.
    """
    card = dict(model.card)
    for key in ('psf_leakage', 'size_bias', 'detection'):
        card.pop(key, None)
    bare = type(model)(model.keras_model, card, path=model.path)
    _, details = deconvolve_stamps(observed, psfs, pixel_scale=pixel_scale,
                                   model=bare, noise_sigma=noise_sigma,
                                   batch_size=batch_size, return_details=True,
                                   # Calibrations are fitted, and hold, in float32.
                                   precision='float32')
    stamps, unit_psfs, _ = validate_stamps(observed, psfs, pixel_scale)
    # The refits as deconvolve_stamps does them, so that the calibrated card
    # gives these images exactly.
    stamps, transforms = float32_work(stamps, unit_psfs)
    is_blank = np.asarray(is_blank, dtype=bool)
    output = details['network_output']
    noise = details['noise_sigma'] if noise_sigma is not None else None
    if size_bias:
        first = refit_images(output, stamps, unit_psfs, noise, psf_transforms=transforms)
        size_bias = fit_size_bias(output[~is_blank], truth[~is_blank],
                                  first['flux'][~is_blank], first['flux_err'][~is_blank])
        output = correct_size_bias(output, first['flux'], first['flux_err'], size_bias)
    else:
        size_bias = None
    # The leakage is measured on the images as the size correction leaves them:
    # the dilation moves the unweighted moments it is defined with.
    psf_leakage = fit_psf_leakage(output[~is_blank], truth[~is_blank],
                                  unit_psfs[~is_blank])
    output = correct_psf_leakage(output, unit_psfs, psf_leakage)
    fit = refit_images(output, stamps, unit_psfs, noise, psf_transforms=transforms)
    flux_bias = _fit_band_flux_bias(fit['flux'], fit['flux_err'],
                                    truth.sum(axis=(-2, -1), dtype=np.float64))
    if is_blank.sum() < _MIN_BLANKS:
        # Too few blanks to place the threshold: no gate (the card says so).
        detection = None
    else:
        detection = fit_detection_threshold(fit['detection_snr'], is_blank,
                                            blank_recall=blank_recall,
                                            max_sources_below=max_sources_below)
    calibration = {'psf_leakage': psf_leakage, 'size_bias': size_bias,
                   'flux_bias': flux_bias, 'detection': detection}
    if not return_images:
        return calibration
    images = fit['images']
    apply_detection(images, fit['detection_snr'], detection)
    return calibration, images


#: Bins of true signal-to-noise ratio `fit_size_bias` nulls the mean size bias in.
_SIZE_BIAS_BINS = 12


#: Fewest measurable objects a size-bias correction is fitted on.
_MIN_SIZE_OBJECTS = 100


def fit_size_bias(output, truth, flux, flux_err, *, snr_range=(1.0, 3.0)):
    """Fit the size-bias correction on simulations.

    The network draws faint galaxies too large. The correction dilates
    each band image about its centroid by ``f = c0 + c1 L + c2 L**2`` with
    ``L = log10(flux / flux_err)`` of the amplitude refit clipped to
    ``snr_range``; the coefficients are chosen, as in `fit_flux_bias`, so
    that the mean ratio of the corrected to the true HSM size (adaptive
    sigma, `~psfdeconv.measure.hsm_moments`) is 1 in each of up to 12 bins
    (quantiles) of the true signal-to-noise ratio ``true flux / flux_err``
    (least squares over the bins; a dilation by ``f`` scales that ratio by
    ``f``).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Deconvolved images of simulated sources (n, n_bands, ny, nx), any
        amplitude.
    truth : `~numpy.ndarray`
        Their true images, same shape.
    flux, flux_err : `~numpy.ndarray`
        (n, n_bands), the amplitude refit's flux and error of ``output``.
    snr_range : tuple of float, optional
        Range of ``L`` the correction uses (and clips to).

    Returns
    -------
    dict or None
        ``{'coefficients': [c0, c1, c2], 'log_snr_range': [...], 'form':
        ..., 'n_objects': ..., 'n_bins': ...}``, or None where fewer than
        100 object-bands have an HSM size on both images.

    Examples
    --------
    Images drawn 20 % too large at every signal-to-noise ratio:

    >>> import numpy as np
    >>> from psfdeconv.calibrate import fit_size_bias
    >>> from psfdeconv.transforms import dilate_images
    >>> rng = np.random.default_rng(0)
    >>> y, x = np.mgrid[:32, :32]
    >>> sigma = rng.uniform(2.0, 4.0, (150, 1))
    >>> truth = np.exp(-0.5 * ((x - 16)**2 + (y - 16)**2) / sigma[..., None, None]**2)
    >>> flux = rng.uniform(10, 1000, (150, 1))
    >>> bias = fit_size_bias(dilate_images(truth, 0.2), truth, flux, np.ones((150, 1)))
    >>> c0, c1, c2 = bias['coefficients']
    >>> print(f'{c0 + c1 * 2 + c2 * 4:.2f}')  # the factor at SNR 100: 1 / 1.2
    0.83
    """
    from .measure import hsm_moments

    flux = np.asarray(flux, dtype=float)
    flux_err = np.asarray(flux_err, dtype=float)
    measured = hsm_moments(output)
    true = hsm_moments(truth)
    ratio = measured['hsm_sigma'] / true['hsm_sigma']
    true_flux = truth.sum(axis=(-2, -1), dtype=np.float64)
    log_snr = log10_snr(flux, flux_err)
    use = (np.isfinite(ratio) & np.isfinite(log_snr) & (flux > 0) &
           (true_flux > 0) & (flux_err > 0))
    if use.sum() < _MIN_SIZE_OBJECTS:
        return None
    ratio, flux_err, true_flux = ratio[use], flux_err[use], true_flux[use]
    log_snr = np.clip(log_snr[use], *snr_range)
    true_log_snr = log10_snr(true_flux, flux_err)
    n_bins = min(_SIZE_BIAS_BINS, max(1, use.sum() // 30))
    edges = np.quantile(true_log_snr, np.linspace(0, 1, n_bins + 1))
    index = np.clip(np.searchsorted(edges, true_log_snr, side='right') - 1,
                    0, n_bins - 1)
    design = np.array([[np.mean(ratio[index == k] * log_snr[index == k] ** p)
                        for p in range(3)] for k in range(n_bins)
                       if np.any(index == k)])
    coefficients = np.linalg.lstsq(design, np.ones(len(design)), rcond=None)[0]
    return {
        'coefficients': [float(c) for c in coefficients],
        'log_snr_range': [float(v) for v in snr_range],
        'form': ('images dilated about their centroids by f = c0 + c1 L + c2 L^2, '
                 'L = log10(flux / flux_err) clipped to log_snr_range; mean corrected / '
                 'true HSM size = 1 in bins of true flux / flux_err'),
        'n_objects': int(use.sum()),
        'n_bins': int(len(design)),
    }


def fit_psf_leakage(output, truth, psfs):
    """Fit the PSF ellipticity that deconvolved images keep (leakage).

    The leakage is the slope of the ellipticity error against the PSF's
    ellipticity, :math:`\\alpha = \\sum (e - e_{\\rm true}) \\cdot e_{\\rm PSF} /
    \\sum e_{\\rm PSF} \\cdot e_{\\rm PSF}` (unweighted moments, spin-2 dot
    product, bands pooled), the additive PSF bias of weak-lensing shear
    calibration. `~psfdeconv.deconvolve.correct_psf_leakage` shears each band image by
    :math:`g = -\\alpha' e_{\\rm PSF} / 2`; the response of the moments to
    that shear is measured by applying it once and refitting, so
    :math:`\\alpha'` is the shear that nulls the leakage (linear
    response).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs (floor removed) of simulated sources, (n, n_bands,
        ny, nx); no blanks.
    truth : `~numpy.ndarray`
        Their true images, same shape.
    psfs : `~numpy.ndarray`
        Their PSFs, (n, n_bands, py, px).

    Returns
    -------
    dict
        ``{'alpha': alpha', 'measured_leakage': alpha, 'residual_leakage':
        ..., 'n_objects': ..., 'form': ...}`` for a model card's
        ``psf_leakage``.
    """
    from .measure import image_moments

    psf_e1, psf_e2 = (np.nan_to_num(e) for e in psf_ellipticity(psfs))
    true = image_moments(truth)

    def leakage(alpha):
        # sum((e - e_true) . e_PSF) / sum(e_PSF . e_PSF) over the objects with
        # finite moments, after the shear of alpha; 0 where the PSFs are all
        # round (ellipticities of 1e-6 are rounding noise): no correction.
        pred = image_moments(output if alpha == 0 else
                             shear_images(output, -alpha * psf_e1 / 2, -alpha * psf_e2 / 2))
        d1 = pred['e1'] - true['e1']
        d2 = pred['e2'] - true['e2']
        ok = np.isfinite(d1) & np.isfinite(d2)
        norm = np.sum(psf_e1[ok]**2 + psf_e2[ok]**2)
        if not norm > 1e-12 * ok.sum():
            return 0.0, int(ok.sum())
        return float(np.sum(d1[ok] * psf_e1[ok] + d2[ok] * psf_e2[ok]) / norm), int(ok.sum())

    measured, n_objects = leakage(0.0)
    if n_objects < 10:
        raise InvalidInputError(f'only {n_objects} object(s) have finite moments; '
                                f'the PSF-leakage fit needs at least 10.')
    once = leakage(measured)[0]
    # The shear changed the leakage by (measured - once); scale it to null it.
    response = (measured - once) / measured if measured else 1.0
    alpha = measured / response if response > 0 else measured
    residual = leakage(alpha)[0]
    return {'alpha': float(alpha), 'measured_leakage': float(measured),
            'residual_leakage': float(residual), 'n_objects': n_objects,
            'form': 'each band image sheared by g = -alpha e_PSF / 2 about its '
                    'centroid, e_PSF the unweighted-moment distortion of the '
                    'band PSF'}


def _mean_rms(values):
    values = values[np.isfinite(values)]
    return {'mean': round(float(values.mean()), 5),
            'rms': round(float(np.sqrt((values ** 2).mean())), 5)}


def validation_metrics(images, truth, is_blank):
    """The model card's ``metrics``: mean and RMS of the moment differences
    of deconvolved validation objects.

    Parameters
    ----------
    images, truth : `~numpy.ndarray`
        Deconvolved and true images, (n, n_bands, ny, nx).
    is_blank : `~numpy.ndarray`
        bool (n,); blanks are left out.

    Returns
    -------
    dict
        ``e1``, ``e2``, ``e`` (differences), ``flux_percent``,
        ``size_percent`` (100 (pred / true - 1)) and ``centroid_pixels``
        (offset), each ``{'mean', 'rms'}`` over finite values rounded to 5
        decimals, and ``n_objects``.
    """
    from .measure import image_moments

    source = ~np.asarray(is_blank, dtype=bool)
    true = image_moments(truth[source])
    pred = image_moments(images[source])
    metrics = {}
    for key in ('e1', 'e2', 'e'):
        metrics[key] = _mean_rms(pred[key] - true[key])
    for key in ('flux', 'size'):
        metrics[f'{key}_percent'] = _mean_rms(100.0 * (pred[key] / true[key] - 1.0))
    metrics['centroid_pixels'] = _mean_rms(np.hypot(pred['x'] - true['x'],
                                                    pred['y'] - true['y']))
    metrics['n_objects'] = int(source.sum())
    return metrics


def calibrate_model(keras_model, card, simulation_path, *, size_bias=True):
    """The complete model card of a trained network, as ``psfdeconv train``
    writes it.

    The calibrations of `calibrate_card`, the validation ``metrics``
    (`validation_metrics`) and the training ranges, all on the validation
    objects of the run (`~psfdeconv.train.validation_objects`: the same
    seeded split, which the weights never trained on).

    Parameters
    ----------
    keras_model : `keras.Model`
        The trained network, as `~psfdeconv.train.train_model` returns it.
    card : dict
        The card `~psfdeconv.train.train_model` returns (its ``training``
        section gives the configuration and the split); a ``name`` may be
        added first.
    simulation_path : str or `~pathlib.Path`
        The simulation file the network was trained on.
    size_bias : bool, optional
        Fit the size-bias correction (`calibrate_card`).

    Returns
    -------
    dict
        A new card: ``card`` plus ``psf_leakage``, ``size_bias``,
        ``flux_bias``, ``detection``, ``metrics``, ``pixel_scale_range``,
        ``psf_fwhm_range_arcsec`` and ``n_validation_objects``, ready for
        `~psfdeconv.model.save_model`.

    Examples
    --------
    Training, calibration and saving, as ``psfdeconv train`` does them::

        from psfdeconv.calibrate import calibrate_model
        from psfdeconv.model import save_model
        from psfdeconv.train import TrainConfig, train_model

        keras_model, card = train_model('sims.h5', 'run', config=TrainConfig())
        card = calibrate_model(keras_model, dict(card, name='mymodel'), 'sims.h5')
        save_model(keras_model, 'run/mymodel.keras', card)
    """
    from .model import DeconvolutionModel, calibrated_card
    from .train import TrainConfig, validation_objects

    config = TrainConfig.from_dict(card['training']['config'])
    model = DeconvolutionModel(keras_model, card)
    val = validation_objects(simulation_path, config)
    calibration, images = calibrate_card(
        model, val['observed'], val['psf'], val['pixel_scale'], val['truth'],
        val['is_blank'], size_bias=size_bias, return_images=True)
    return calibrated_card(card, calibration,
                           validation_metrics(images, val['truth'], val['is_blank']))


#: Keys `calibrate_model` writes; `recalibrate_model` drops the old ones first.
_CALIBRATION_KEYS = ('psf_leakage', 'size_bias', 'flux_bias', 'detection', 'metrics',
                     'pixel_scale_range', 'psf_fwhm_range_arcsec', 'n_validation_objects',
                     'shear_response')


def recalibrate_model(model_path, simulation_path, *, out, symmetries=None,
                      size_bias=None, overwrite=False):
    """Refit the card of a saved model without training it again.

    The calibrations and validation metrics of `calibrate_model`, fitted
    on the validation objects of the card's training run
    (`~psfdeconv.train.validation_objects`, the split its training
    configuration gives), e.g. after changing the number of
    ``symmetries`` the network output is averaged over: the corrections
    are fitted on the outputs as they will be used. The ``.keras`` file is
    copied unchanged, so its ``file_sha256``, ``weights_sha256`` and
    ``config_sha256`` stay; the new card is signed
    (`~psfdeconv.model.sign_card`).

    Parameters
    ----------
    model_path : str or `~pathlib.Path`
        A ``.keras`` file with its card (checked by
        `~psfdeconv.model.load_model`).
    simulation_path : str or `~pathlib.Path`
        The simulation file the network was trained on (the card's
        ``training.simulation_file``); its length and the card's training
        configuration give the validation split.
    out : str or `~pathlib.Path`
        The new ``.keras`` file; its card goes beside it. May be
        ``model_path`` itself (with ``overwrite``): only the card changes.
    symmetries : int, optional
        Symmetries to average over (1, 2, 4 or 8), recorded in the card and
        in its training configuration (which ``psfdeconv train`` would use to
        rebuild it); the card's own if None.
    size_bias : bool, optional
        Fit the size-bias correction; if None, only if the card has one
        (a card without one stays without).
    overwrite : bool, optional
        Replace an existing ``out`` and its card.

    Returns
    -------
    dict
        The new card as written.

    Raises
    ------
    `~psfdeconv.exceptions.ConfigError`
        If the simulation file does not hold as many objects as the card's
        training run (training plus validation objects): the split would
        not be the run's.

    Examples
    --------
    Refit the shipped card for one network pass per stamp::

        from psfdeconv.calibrate import recalibrate_model
        recalibrate_model('psfdeconv/data/unet_psf_ipsf_ipsf1.keras', 'train_v3_s5.h5',
                          symmetries=1, out='one_pass/unet_psf_ipsf_ipsf1.keras')
    """
    import json
    import shutil
    from pathlib import Path

    from .deconvolve import check_symmetries
    from .io import atomic_path
    from .io.files import check_writable
    from .model import load_model, sign_card
    from .simulate import SimulationFile

    model_path, out = Path(model_path), Path(out)
    # Refuse before the fit, not after it.
    check_writable(out, overwrite=overwrite)
    check_writable(out.with_suffix('.json'), overwrite=overwrite)
    model = load_model(model_path)
    card = json.loads(json.dumps(model.card))
    training = card.get('training') or {}
    if 'config' not in training:
        raise ConfigError(f'the card of {model_path} has no training configuration: '
                          f'its validation split is unknown.')
    with SimulationFile(simulation_path) as sims:
        n_objects = len(sims)
    # n_train and n_validation count objects (split_bands or not); the split is
    # seeded on the file's length, so another length gives another split.
    expected = training.get('n_train', 0) + training.get('n_validation', 0)
    if expected != n_objects:
        raise ConfigError(f'{simulation_path} holds {n_objects} objects; the training run '
                          f'of {model_path} had {expected}: not its simulation file.')
    if symmetries is not None:
        check_symmetries(symmetries)
        card['symmetries'] = int(symmetries)
        training['config']['symmetries'] = int(symmetries)
    if size_bias is None:
        size_bias = bool(card.get('size_bias'))
    had_size_bias = 'size_bias' in card
    for key in _CALIBRATION_KEYS + ('card_sha256',):
        card.pop(key, None)
    card = calibrate_model(model.keras_model, card, simulation_path, size_bias=size_bias)
    if card.get('size_bias') is None and not had_size_bias:
        # Keep the layout of a card that never had the key.
        card.pop('size_bias', None)
    if not (out.exists() and out.resolve() == model_path.resolve()):
        with atomic_path(out, overwrite=overwrite) as tmp:
            shutil.copyfile(model_path, tmp)
    with atomic_path(out.with_suffix('.json'), overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + '\n')
    return sign_card(out)


def write_shear_response(model_path, response, *, validation=None, out=None,
                         overwrite=False):
    """Store a shear response (and its held-out validation) in a model card.

    Parameters
    ----------
    model_path : str or `~pathlib.Path`
        A ``.keras`` file with its card (checked by
        `~psfdeconv.model.load_model`).
    response : dict
        From `~psfdeconv.shear.fit_shear_response`.
    validation : dict, optional
        From `~psfdeconv.shear.fit_shear_bias` on another seed (the
        calibrated m, c, alpha and their errors), stored as
        ``shear_response['validation']``.
    out : str or `~pathlib.Path`, optional
        The new ``.keras`` file (a copy of ``model_path``); ``model_path``
        itself (its card is rewritten, the weights are untouched) if None.
    overwrite : bool, optional
        Replace an existing ``out`` (other than ``model_path``).

    Returns
    -------
    dict
        The card as written and signed (`~psfdeconv.model.sign_card`).

    Raises
    ------
    psfdeconv.exceptions.ModelFileError
        If the response is malformed or not finite
        (`~psfdeconv.shear.check_shear_response`).
    """
    import json
    import shutil
    from pathlib import Path

    from .io import atomic_path
    from .io.files import check_writable
    from .model import load_model, sign_card
    from .shear_response import check_shear_response

    model_path = Path(model_path)
    out = model_path if out is None else Path(out)
    same = out.exists() and out.resolve() == model_path.resolve()
    if not same:
        check_writable(out, overwrite=overwrite)
        check_writable(out.with_suffix('.json'), overwrite=overwrite)
    entry = json.loads(json.dumps(response))
    if validation is not None:
        entry['validation'] = json.loads(json.dumps(validation))
    check_shear_response(entry)
    card = json.loads(json.dumps(load_model(model_path).card))
    card['shear_response'] = entry
    card.pop('card_sha256', None)
    if not same:
        with atomic_path(out, overwrite=overwrite) as tmp:
            shutil.copyfile(model_path, tmp)
    with atomic_path(out.with_suffix('.json'), overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + '\n')
    return sign_card(out)


def calibrate_shear(model_path, *, n_galaxies=1000, seed=1, test_galaxies=1000,
                    test_seed=2, shear=0.02, snr_range=(10.0, 300.0), out=None,
                    tables=None, n_bootstrap=200, overwrite=False, log=None):
    """Fit a card's shear response on a ring test and validate it on another.

    Runs `~psfdeconv.shear.ring_test_table` (the whole
    `~psfdeconv.deconvolve.deconvolve_stamps` path with the card's own
    symmetries and corrections) on ``seed``, fits
    `~psfdeconv.shear.fit_shear_response` on it, then measures the
    calibrated m, c and alpha (`~psfdeconv.shear.fit_shear_bias`, also per
    SNR bin) on ``test_seed``, and writes both into the card
    (`write_shear_response`).

    Parameters
    ----------
    model_path : str or `~pathlib.Path`
        A ``.keras`` file with its card.
    n_galaxies, seed : int, optional
        Galaxies (8 stamps each) and seed of the fit.
    test_galaxies, test_seed : int, optional
        Galaxies and seed of the held-out validation (``test_seed`` must
        differ from ``seed``).
    shear : float, optional
        Input shear of the ring test.
    snr_range : tuple of float, optional
        As for `~psfdeconv.shear.simulate_ring_test`.
    out : str or `~pathlib.Path`, optional
        As for `write_shear_response`.
    tables : str or `~pathlib.Path`, optional
        Directory keeping the per-chunk tables (``seed<seed>/``,
        ``seed<test_seed>/``), reused when they exist.
    n_bootstrap : int, optional
        Bootstrap resamplings of the validation errors.
    overwrite : bool, optional
        As for `write_shear_response`.
    log : callable, optional
        Called with a line of progress.

    Returns
    -------
    dict
        The card as written.
    """
    from pathlib import Path

    from .model import load_model
    from .shear import fit_shear_bias, fit_shear_response, ring_test_table
    from .simulate import SimulationConfig

    if seed == test_seed:
        raise ConfigError(f'the validation seed must differ from the fit seed, both are '
                          f'{seed}: a calibration validated on its own stamps says nothing.')
    model = load_model(model_path)
    # The model's band count; the other ranges of the default simulation.
    config = SimulationConfig(n_bands=int(model.card['n_bands']))

    def table(n, s):
        directory = None if tables is None else Path(tables) / f'seed{s}'
        return ring_test_table(n, seed=s, shear=shear, snr_range=snr_range, model=model,
                               config=config, directory=directory, log=log)

    response = fit_shear_response(table(n_galaxies, seed), seed=seed)
    test = table(test_galaxies, test_seed)
    validation = fit_shear_bias(test, estimator='calibrated', response=response,
                                snr_edges=_SHEAR_SNR_EDGES, n_bootstrap=n_bootstrap,
                                seed=test_seed)
    validation['seed'] = int(test_seed)
    return write_shear_response(model_path, response, validation=validation, out=out,
                                overwrite=overwrite)


#: Bins of matched-filter SNR the card's shear validation is reported in.
_SHEAR_SNR_EDGES = (10.0, 20.0, 40.0, 80.0, 1e4)
