# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Deconvolution of stamps: network, amplitude refit, flux-bias correction.

`deconvolve_stamps` is the public stamp API. It checks the inputs, builds
the input cube (`~psfdeconv.features.make_cube`), runs the network and
refits each band's amplitude by maximum likelihood against the observed
stamp (paper section III.3, Eq. 2):

.. math::

    A_b = \\frac{\\sum \\tilde{P}_b N_b}{\\sum \\tilde{P}_b^2},
    \\qquad \\tilde{P}_b = O_b \\ast \\mathrm{PSF}_b ,
    \\qquad \\sigma_{A_b} = \\frac{\\sigma_b}{\\sqrt{\\sum \\tilde{P}_b^2}} ,

with O the network output, N the observed stamp and sigma the per-pixel
noise. The deconvolved image is A O, in the input's flux units, so its
sum is the flux.

The remaining flux bias ("sources are still biased low at a few percent",
section IV.1) is removed by a quadratic fitted on simulations
(`fit_flux_bias`, `correct_flux_bias`). The paper fits the true flux as a
quadratic of the measured flux, which depends on the flux unit; psfdeconv
fits the ratio true/measured as a quadratic in log10 of the measured
flux's signal-to-noise ratio, which is unit-free and so applies to any
survey's units.

Further steps, beyond the paper, are calibrated on the same simulations
and recorded in the model card: the network output is the average over
the symmetries of the square (the network run on flipped and rotated
copies of the input, `symmetric_output`), the ellipticity the network
leaves from the PSF is removed by a small counter-shear
(`fit_psf_leakage`, `correct_psf_leakage`), and the size bias of faint
galaxies by a dilation that depends on the signal-to-noise ratio
(`fit_size_bias`, `correct_size_bias`).
"""

import numpy as np

from ._fourier import convolve_same
from .exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    PixelScaleError,
    ShapeMismatchError,
)

__all__ = ['deconvolve_stamps', 'refit_amplitude', 'fit_flux_bias',
           'correct_flux_bias', 'calibrate_flux_bias', 'validate_stamps',
           'detection_snr', 'fit_detection_threshold', 'calibrate_card',
           'remove_output_floor', 'symmetric_output', 'psf_ellipticity',
           'shear_images', 'fit_psf_leakage', 'correct_psf_leakage',
           'dilate_images', 'fit_size_bias', 'correct_size_bias',
           'outside_training_range', 'psf_fwhm',
           'normalize_psfs',
           'estimate_noise_sigma']


def validate_stamps(stamps, psfs, pixel_scale):
    """Check stamps, PSFs and pixel scales at the public boundary.

    Returns
    -------
    stamps : `~numpy.ndarray`
        float64 (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        float64 (n, n_bands, py, px), each normalised to unit sum.
    pixel_scale : `~numpy.ndarray`
        float64 (n,) in arcsec/pixel.

    Raises
    ------
    `~psfdeconv.exceptions.InvalidInputError`
        The subclass for the problem (`~psfdeconv.exceptions.ShapeMismatchError`,
        `~psfdeconv.exceptions.InvalidPixelsError`,
        `~psfdeconv.exceptions.InvalidPSFError`,
        `~psfdeconv.exceptions.PixelScaleError`), with the offending index
        and value in its message.
    """
    if np.ma.isMaskedArray(stamps) and np.ma.getmaskarray(stamps).any():
        raise InvalidPixelsError(
            f'stamps has {int(np.ma.getmaskarray(stamps).sum())} masked '
            f'pixel(s); fill them (e.g. with the local background) and flag '
            f'those objects before deconvolution.')
    stamps = np.asarray(np.ma.getdata(stamps))
    psfs = np.asarray(psfs)
    if stamps.ndim != 4:
        raise ShapeMismatchError(f'stamps must have shape (n, n_bands, ny, '
                                 f'nx), got {stamps.shape}.')
    if psfs.ndim != 4 or psfs.shape[:2] != stamps.shape[:2]:
        raise ShapeMismatchError(
            f'psfs must have shape (n, n_bands, py, px) with (n, n_bands) = '
            f'{stamps.shape[:2]} as the stamps, got {psfs.shape}.')
    if not np.issubdtype(stamps.dtype, np.number) or \
            np.iscomplexobj(stamps):
        raise InvalidPixelsError(f'stamps must be real numbers, got dtype '
                                 f'{stamps.dtype}.')
    stamps = stamps.astype(np.float64)
    bad = ~np.isfinite(stamps)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidPixelsError(
            f'stamps contain {int(bad.sum())} non-finite pixel(s), the first '
            f'at index {index} = {stamps[index]}; replace them (e.g. by the '
            f'local background) and flag those objects.')
    py, px = psfs.shape[-2:]
    ny, nx = stamps.shape[-2:]
    if py % 2 == 0 or px % 2 == 0:
        raise InvalidPSFError(f'PSF images must have odd sizes so that they '
                              f'have a centre pixel, got {(py, px)}; crop or '
                              f'resample them to an odd size.')
    if py > ny or px > nx:
        raise InvalidPSFError(f'PSF images {(py, px)} are larger than the '
                              f'stamps {(ny, nx)}; crop them.')
    psfs = psfs.astype(np.float64)
    sums = psfs.sum(axis=(-2, -1))
    bad = ~np.isfinite(sums) | (sums <= 0)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidPSFError(
            f'psfs[{index[0]}, {index[1]}] sums to {sums[index]}; a PSF must '
            f'have a positive, finite sum.')
    psfs = psfs / sums[..., None, None]
    peak = psfs.reshape(psfs.shape[:2] + (-1,)).argmax(axis=-1)
    peak_y, peak_x = np.divmod(peak, px)
    off = (np.abs(peak_y - py // 2) > 1) | (np.abs(peak_x - px // 2) > 1)
    if off.any():
        i, b = (int(v) for v in np.argwhere(off)[0])
        raise InvalidPSFError(
            f'psfs[{i}, {b}] peaks at pixel (y, x) = ({peak_y[i, b]}, '
            f'{peak_x[i, b]}), not at its centre ({py // 2}, {px // 2}); '
            f'recentre the PSF.')

    pixel_scale = _pixel_scale_array(pixel_scale, stamps.shape[0])
    return stamps, psfs, pixel_scale


def normalize_psfs(psfs):
    """PSFs divided by their sums (shape (..., py, px))."""
    psfs = np.asarray(psfs, dtype=np.float64)
    return psfs / psfs.sum(axis=(-2, -1), keepdims=True)


def _pixel_scale_array(pixel_scale, n):
    from .measure import _pixel_scale_arcsec

    scale = _pixel_scale_arcsec(pixel_scale)
    if scale.ndim == 0:
        scale = np.full(n, float(scale))
    if scale.shape != (n,):
        raise ShapeMismatchError(f'pixel_scale must be a scalar or have shape '
                                 f'({n},), got {scale.shape}.')
    bad = ~np.isfinite(scale) | (scale <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise PixelScaleError(f'pixel_scale[{i}] = {scale[i]}; pixel scales '
                              f'must be positive and finite (arcsec/pixel).')
    return scale


def estimate_noise_sigma(residuals):
    """Robust per-image noise standard deviation (`~astropy.stats.mad_std`).

    Parameters
    ----------
    residuals : `~numpy.ndarray`
        Shape (..., ny, nx): observed minus model, or a blank region.

    Returns
    -------
    `~numpy.ndarray`
        Shape (...).
    """
    from astropy.stats import mad_std

    return mad_std(residuals, axis=(-2, -1))


def refit_amplitude(model_images, observed, psfs, *, noise_sigma=None):
    """Maximum-likelihood amplitude of model images against observations.

    Parameters
    ----------
    model_images : `~numpy.ndarray`
        PSF-free images O, shape (..., ny, nx).
    observed : `~numpy.ndarray`
        Observed images N, same shape.
    psfs : `~numpy.ndarray`
        Unit-sum centred odd PSFs, shape (..., py, px).
    noise_sigma : `~numpy.ndarray`, optional
        Per-pixel noise standard deviation, shape (...); estimated from
        the fit residuals if not given.

    Returns
    -------
    amplitude, amplitude_err, noise_sigma : `~numpy.ndarray`
        Shape (...) each; the amplitude is 0 (error inf) where the model
        image is zero.

    Examples
    --------
    A noiseless stamp that is 2.5 times the model re-convolved with the
    PSF gives back exactly 2.5:

    >>> import numpy as np
    >>> from psfdeconv.deconvolve import refit_amplitude
    >>> from psfdeconv._fourier import convolve_same
    >>> yy, xx = np.mgrid[:32, :32]
    >>> model = np.exp(-((xx - 16)**2 + (yy - 15)**2) / 8.0)
    >>> psf = np.exp(-((np.mgrid[:9, :9] - 4)**2).sum(0) / 4.0)
    >>> psf /= psf.sum()
    >>> observed = 2.5 * convolve_same(model, psf)
    >>> a, err, sigma = refit_amplitude(model, observed, psf, noise_sigma=1.0)
    >>> print(f'{float(a):.6f}')
    2.500000
    """
    reconvolved = convolve_same(model_images, psfs)
    power = (reconvolved ** 2).sum(axis=(-2, -1))
    cross = (reconvolved * observed).sum(axis=(-2, -1))
    with np.errstate(divide='ignore', invalid='ignore'):
        amplitude = np.where(power > 0, cross / power, 0.0)
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma(
            observed - amplitude[..., None, None] * reconvolved)
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, float),
                                  amplitude.shape)
    with np.errstate(divide='ignore'):
        amplitude_err = np.where(power > 0, noise_sigma / np.sqrt(power),
                                 np.inf)
    return amplitude, amplitude_err, noise_sigma


def _log_snr(flux, flux_err):
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.log10(np.clip(flux / flux_err, 1e-3, None))


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
    noise then leave the faint ones biased high at fixed true flux (+1.7 %
    in the faintest third of the test galaxies); the binned fit is
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
    >>> from psfdeconv.deconvolve import fit_flux_bias
    >>> flux = np.logspace(1.1, 2.9, 60)
    >>> fit = fit_flux_bias(flux, np.ones(60), 1.02 * flux)
    >>> np.round(fit['coefficients'], 6).tolist()
    [1.02, 0.0, 0.0]
    """
    from scipy.optimize import least_squares

    flux = np.ravel(flux)
    flux_err = np.ravel(flux_err)
    true_flux = np.ravel(true_flux)
    log_snr = _log_snr(flux, flux_err)
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
        As for `deconvolve_stamps`, from simulations not used in training.
    truth : `~numpy.ndarray`
        The simulations' truth, (n, n_bands, ny, nx).
    noise_sigma : `~numpy.ndarray`, optional
        Known per-band noise, (n, n_bands).

    Returns
    -------
    dict
        As `fit_flux_bias`, pooled over bands and non-blank objects, plus
        for a multi-band model ``'per_band_coefficients'``: one fit per
        output band ([c0, c1, c2] each), which `correct_flux_bias` uses.
        The network's flux bias can differ between its output bands by a
        few per cent, which a pooled fit leaves in.
    """
    _, details = deconvolve_stamps(observed, psfs, pixel_scale=pixel_scale,
                                   model=model, noise_sigma=noise_sigma,
                                   batch_size=batch_size, return_details=True)
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


def detection_snr(flux, flux_err):
    """Signal-to-noise ratio of a stamp's source, all bands together.

    ``sum(flux) / sqrt(sum(flux_err**2))`` over the last (band) axis: the
    significance of the amplitude refit. On a blank stamp the network
    still draws something from the noise, and its refit is biased
    positive (the template was made from that noise), so the threshold
    that separates blanks is calibrated on simulations
    (`fit_detection_threshold`), not taken from a normal distribution.

    Parameters
    ----------
    flux, flux_err : `~numpy.ndarray`
        Shape (..., n_bands).

    Returns
    -------
    `~numpy.ndarray`
        Shape (...); NaN where the errors are not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import detection_snr
    >>> float(detection_snr(np.array([30.0, 40.0]), np.array([3.0, 4.0])))
    14.0
    """
    flux = np.asarray(flux, dtype=float)
    flux_err = np.asarray(flux_err, dtype=float)
    with np.errstate(invalid='ignore', divide='ignore'):
        snr = flux.sum(axis=-1) / np.sqrt((flux_err ** 2).sum(axis=-1))
    return np.where(np.isfinite(snr), snr, np.nan)


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
        `detection_snr` of simulated objects the weights never trained on,
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
    >>> from psfdeconv.deconvolve import fit_detection_threshold
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


def _apply_detection(images, snr, detection):
    """Empty (in place) the images of stamps whose `detection_snr` is below
    the threshold of a card's ``detection`` (None: no gate); returns which
    were detected."""
    if not detection:
        return np.ones(snr.shape, dtype=bool)
    # No significant source: the deconvolved image is empty, not the
    # network's rendering of the noise.
    detected = snr >= detection['snr_threshold']
    images[~detected] = 0.0
    return detected


def calibrate_card(model, observed, psfs, pixel_scale, truth, is_blank, *,
                   noise_sigma=None, batch_size=128,
                   blank_recall=DETECTION_BLANK_RECALL,
                   max_sources_below=DETECTION_MAX_SOURCES_BELOW,
                   return_images=False):
    """Fit a model card's PSF-leakage, size-bias and flux-bias corrections
    and detection threshold.

    One deconvolution of simulated objects the weights never trained on
    (the validation split), with the card's ``symmetries``; then, in the
    order `deconvolve_stamps` applies them, an amplitude refit and
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
                                   batch_size=batch_size, return_details=True)
    stamps, unit_psfs, _ = validate_stamps(observed, psfs, pixel_scale)
    is_blank = np.asarray(is_blank, dtype=bool)
    output = details['network_output']
    noise = details['noise_sigma'] if noise_sigma is not None else None
    first = _refit(output, stamps, unit_psfs, noise)
    size_bias = fit_size_bias(output[~is_blank], truth[~is_blank],
                              first['flux'][~is_blank], first['flux_err'][~is_blank])
    output = correct_size_bias(output, first['flux'], first['flux_err'], size_bias)
    # The leakage is measured on the images as the size correction leaves them:
    # the dilation moves the unweighted moments it is defined with.
    psf_leakage = fit_psf_leakage(output[~is_blank], truth[~is_blank],
                                  unit_psfs[~is_blank])
    output = correct_psf_leakage(output, unit_psfs, psf_leakage)
    fit = _refit(output, stamps, unit_psfs, noise)
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
    _apply_detection(images, fit['detection_snr'], detection)
    return calibration, images


def correct_flux_bias(flux, flux_err, flux_bias):
    """Apply a fitted flux-bias correction (see `fit_flux_bias`).

    Parameters
    ----------
    flux, flux_err : `~numpy.ndarray` or `~astropy.units.Quantity`
        Recovered fluxes and errors.
    flux_bias : dict or None
        From `fit_flux_bias` or `calibrate_flux_bias` (a model card's
        ``flux_bias``); `None` returns the flux unchanged. With
        ``'per_band_coefficients'`` and a last axis of that many bands,
        each band gets its own correction.

    Returns
    -------
    `~numpy.ndarray` or `~astropy.units.Quantity`
        The corrected flux (non-positive fluxes are left unchanged).

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import correct_flux_bias
    >>> bias = {'coefficients': [1.05, 0.0, 0.0], 'log_snr_range': [1, 3]}
    >>> print(f'{correct_flux_bias(100.0, 5.0, bias):.1f}')
    105.0
    >>> bias['per_band_coefficients'] = [[1.0, 0, 0], [1.1, 0, 0]]
    >>> np.round(correct_flux_bias(np.array([[100.0, 100.0]]), 5.0, bias),
    ...          6).tolist()
    [[100.0, 110.0]]
    """
    if not flux_bias:
        return flux
    c0, c1, c2 = flux_bias['coefficients']
    per_band = flux_bias.get('per_band_coefficients')
    if per_band is not None and np.ndim(flux) >= 1 and \
            np.shape(flux)[-1] == len(per_band):
        # Along the last (band) axis, one fit per band.
        c0, c1, c2 = np.asarray(per_band, dtype=float).T
    low, high = flux_bias['log_snr_range']
    ratio_values = np.asarray(getattr(flux, 'value', flux), dtype=float)
    err_values = np.asarray(getattr(flux_err, 'value', flux_err),
                            dtype=float)
    log_snr = np.clip(_log_snr(ratio_values, err_values), low, high)
    factor = np.where(ratio_values > 0, c0 + c1 * log_snr + c2 * log_snr**2,
                      1.0)
    return flux * factor


#: Ways to remove the network output's floor (`remove_output_floor`).
OUTPUT_FLOORS = (None, 'median', 'outer')


def remove_output_floor(output, method):
    """Subtract the floor of network outputs (softplus never reaches 0).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs, shape (..., ny, nx).
    method : {None, 'median', 'outer'}
        None leaves the output unchanged; 'median' subtracts each image's
        median; 'outer' the median of its pixels farther than 7/16 of the
        stamp side from the centre (the corners and the middle of the
        edges). A large galaxy fills more than half of the stamp above the
        floor, so the whole-stamp median takes a slice of its wings (3-4 %
        of the flux of galaxies with half-light radii of 6-8 pixels on
        64-pixel stamps); the outer pixels are the stamp's empty sky.

    Returns
    -------
    `~numpy.ndarray`
        The outputs minus their floors, clipped at 0.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.full((1, 16, 16), 0.1)
    >>> image[0, 2:14, 2:14] += 1.0  # a source covering most of the stamp
    >>> float(remove_output_floor(image, 'median').sum())
    0.0
    >>> round(float(remove_output_floor(image, 'outer').sum()), 6)
    144.0
    """
    if method is None:
        return output
    if method not in OUTPUT_FLOORS:
        raise ConfigError(f'output_floor must be one of {OUTPUT_FLOORS}, got '
                          f'{method!r}.')
    if method == 'median':
        floor = np.median(output, axis=(-2, -1), keepdims=True)
    else:
        ny, nx = output.shape[-2:]
        yy, xx = np.mgrid[:ny, :nx]
        outer = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) > 7 / 16 * min(ny, nx)
        floor = np.median(output[..., outer], axis=-1)[..., None, None]
    return np.clip(output - floor, 0.0, None)


#: Numbers of symmetries of the square `symmetric_output` can average.
SYMMETRY_COUNTS = (1, 2, 4, 8)
# The transforms each count averages: t % 4 quarter turns, then for t >= 4
# a left-right flip (as `~psfdeconv.train.augment_batch`).
_SYMMETRY_TRANSFORMS = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def _check_symmetries(symmetries, model=None):
    """The number of symmetries to average over: ``symmetries``, or the
    model card's (1 for a card without one) if None; a
    `~psfdeconv.exceptions.ConfigError` unless it is 1, 2, 4 or 8."""
    if symmetries is None and model is not None:
        symmetries = model.card.get('symmetries') or 1
    if symmetries not in SYMMETRY_COUNTS:
        raise ConfigError(f'symmetries must be one of {SYMMETRY_COUNTS}, got '
                          f'{symmetries!r}.')
    return symmetries


def _square_symmetry(array, transform, *, inverse=False):
    """Symmetry ``transform`` (0-7) of the square on the last two axes."""
    if inverse:
        if transform >= 4:
            array = array[..., ::-1]
        return np.rot90(array, k=-(transform % 4), axes=(-2, -1))
    array = np.rot90(array, k=transform % 4, axes=(-2, -1))
    return array[..., ::-1] if transform >= 4 else array


def symmetric_output(model, stamps, psfs, pixel_scale, *, symmetries=8,
                     batch_size=128):
    """Network output averaged over symmetries of the square.

    The network runs on flipped and rotated copies of each stamp and its
    PSF, and each output is turned back before averaging (test-time
    augmentation). The input channels are convolutions with centred
    kernels, which commute with these symmetries, so every copy is an
    equally valid view of the same object; averaging them removes the part
    of the network's error that is not symmetric (on the held-out test set,
    8 symmetries lower the ellipticity RMS by 3 %, raise the PSNR by
    0.3 dB and cut the HSM failures from 6.7 to 6.0 %), for that many
    network calls.

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        The network.
    stamps, psfs, pixel_scale
        As returned by `validate_stamps`.
    symmetries : {1, 2, 4, 8}, optional
        1: the stamp as given; 2: and its mirror image; 4: its four
        quarter turns; 8: all eight symmetries.
    batch_size : int, optional
        Objects per network call.

    Returns
    -------
    `~numpy.ndarray`
        float32 (n, n_bands, ny, nx), in the network's scaled units.
    """
    from .features import make_cube

    transforms = _SYMMETRY_TRANSFORMS[_check_symmetries(symmetries)]
    n = stamps.shape[0]
    output = np.zeros(stamps.shape, dtype=np.float32)
    # Features in chunks keep the FFT buffers bounded for large n.
    for start in range(0, n, 4 * batch_size):
        sl = slice(start, start + 4 * batch_size)
        cube, _ = make_cube(stamps[sl], psfs[sl], pixel_scale=pixel_scale[sl],
                            kinds=model.kinds, **model.feature_options)
        # The cube of a flipped or turned stamp and PSF is the flipped or
        # turned cube: built once, turned for each view.
        planes = np.moveaxis(cube, -1, 1)
        for transform in transforms:
            view = np.ascontiguousarray(np.moveaxis(_square_symmetry(planes, transform), 1, -1))
            output[sl] += _square_symmetry(model.predict(view, batch_size=batch_size),
                                           transform, inverse=True)
    output /= len(transforms)
    return output


def psf_ellipticity(psfs):
    """Unweighted-moment ellipticity (distortion) of PSF images.

    Parameters
    ----------
    psfs : `~numpy.ndarray`
        (..., py, px), positive sums.

    Returns
    -------
    e1, e2 : `~numpy.ndarray`
        Shape (...), as `~psfdeconv.measure.image_moments`.
    """
    from .measure import image_moments

    moments = image_moments(psfs)
    return moments['e1'], moments['e2']


def shear_images(images, g1, g2):
    """Shear images about their centroids (an area-preserving shear).

    Each image ``I`` becomes ``I(S^-1 x)`` with the area-preserving shear
    ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - g1**2 - g2**2)`` (x along
    columns) about its light centroid, by cubic-spline interpolation,
    clipped at 0. A round image acquires the distortion ``2 g / (1 + g**2)``.
    Images with no positive flux are returned unchanged.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    g1, g2 : `~numpy.ndarray` or float
        Reduced shear per image, broadcastable to ``images.shape[:-2]``,
        ``g1**2 + g2**2 < 1``.

    Returns
    -------
    `~numpy.ndarray`
        The sheared images, same shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import shear_images
    >>> from psfdeconv.measure import image_moments
    >>> y, x = np.mgrid[:48, :48]
    >>> round_image = np.exp(-0.5 * ((x - 24)**2 + (y - 24)**2) / 3.0**2)
    >>> sheared = shear_images(round_image, 0.05, 0.0)
    >>> round(float(image_moments(sheared)['e1']), 3)  # 2 g / (1 + g^2)
    0.1
    """
    images = np.asarray(images)
    leading = images.shape[:-2]
    g1 = np.broadcast_to(np.asarray(g1, dtype=float), leading)
    g2 = np.broadcast_to(np.asarray(g2, dtype=float), leading)
    if np.any(g1**2 + g2**2 >= 1):
        raise InvalidInputError('shear_images needs g1**2 + g2**2 < 1.')
    # The inverse shear S(-g) in (row, column) order, (..., 2, 2).
    inverse = np.stack([np.stack([1 + g1, -g2], axis=-1),
                        np.stack([-g2, 1 - g1], axis=-1)], axis=-2)
    inverse /= np.sqrt(1 - g1**2 - g2**2)[..., None, None]
    return _transform_about_centroids(images, inverse, np.ones(leading))


def _transform_about_centroids(images, inverse, flux_scale):
    """``flux_scale * I(A^-1 (x - c) + c)`` about each image's light centroid
    ``c``, cubic spline, clipped at 0.

    ``inverse`` (..., 2, 2) is ``A^-1`` in (row, column) order, as
    `scipy.ndimage.affine_transform` maps output to input positions;
    images whose ``inverse`` is the identity, or without a centroid, are
    returned unchanged.
    """
    from scipy import ndimage

    from .measure import image_moments

    moments = image_moments(images)
    out = np.array(images, copy=True)
    identity = np.eye(2)
    for index in np.ndindex(images.shape[:-2]):
        centre = np.array([moments['y'][index], moments['x'][index]])
        if not np.all(np.isfinite(centre)) or np.array_equal(inverse[index], identity):
            continue
        out[index] = ndimage.affine_transform(images[index], inverse[index],
                                              offset=centre - inverse[index] @ centre,
                                              order=3, mode='constant') * flux_scale[index]
    return np.clip(out, 0, None)


def dilate_images(images, dilation):
    """Dilate images about their centroids, conserving their sums.

    Each image ``I`` becomes ``I((x - c) / f + c) / f**2`` with
    ``f = 1 + dilation`` about its light centroid ``c``, by cubic-spline
    interpolation, clipped at 0: every size scales by ``f``. Images with no
    positive flux, or a dilation of 0, are returned unchanged.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    dilation : `~numpy.ndarray` or float
        ``f - 1`` per image, broadcastable to ``images.shape[:-2]``,
        ``f > 0``.

    Returns
    -------
    `~numpy.ndarray`
        The dilated images, same shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import dilate_images
    >>> from psfdeconv.measure import image_moments
    >>> y, x = np.mgrid[:48, :48]
    >>> round_image = np.exp(-0.5 * ((x - 24)**2 + (y - 24)**2) / 3.0**2)
    >>> larger = dilate_images(round_image, 0.2)
    >>> ratio = image_moments(larger)['size'] / image_moments(round_image)['size']
    >>> print(f'{float(ratio):.3f}')
    1.200
    """
    images = np.asarray(images)
    leading = images.shape[:-2]
    factor = 1.0 + np.broadcast_to(np.asarray(dilation, dtype=float), leading)
    if np.any(~(factor > 0)):
        raise InvalidInputError('dilate_images needs dilation > -1.')
    inverse = np.eye(2) / factor[..., None, None]
    return _transform_about_centroids(images, inverse, 1.0 / factor**2)


#: Bins of true signal-to-noise ratio `fit_size_bias` nulls the mean size bias in.
_SIZE_BIAS_BINS = 12
#: Fewest measurable objects a size-bias correction is fitted on.
_MIN_SIZE_OBJECTS = 100
#: Range of the size correction factor (it is not extrapolated beyond).
_SIZE_FACTOR_RANGE = (0.5, 2.0)


def _size_factor(flux, flux_err, size_bias):
    c0, c1, c2 = size_bias['coefficients']
    low, high = size_bias['log_snr_range']
    log_snr = np.clip(_log_snr(flux, flux_err), low, high)
    factor = np.clip(c0 + c1 * log_snr + c2 * log_snr**2, *_SIZE_FACTOR_RANGE)
    return np.where(np.asarray(flux) > 0, factor, 1.0)


def fit_size_bias(output, truth, flux, flux_err, *, snr_range=(1.0, 3.0)):
    """Fit the size-bias correction on simulations.

    The network draws faint galaxies too large (by a third, on average,
    for the faintest twelfth of the test galaxies, true signal-to-noise
    ratio below about 7). The correction dilates each band image
    about its centroid by ``f = c0 + c1 L + c2 L**2`` with
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
    >>> from psfdeconv.deconvolve import dilate_images, fit_size_bias
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
    log_snr = _log_snr(flux, flux_err)
    use = (np.isfinite(ratio) & np.isfinite(log_snr) & (flux > 0) &
           (true_flux > 0) & (flux_err > 0))
    if use.sum() < _MIN_SIZE_OBJECTS:
        return None
    ratio, flux_err, true_flux = ratio[use], flux_err[use], true_flux[use]
    log_snr = np.clip(log_snr[use], *snr_range)
    true_log_snr = _log_snr(true_flux, flux_err)
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


def correct_size_bias(output, flux, flux_err, size_bias):
    """Apply a fitted size-bias correction (see `fit_size_bias`).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Deconvolved images (n, n_bands, ny, nx).
    flux, flux_err : `~numpy.ndarray`
        (n, n_bands), the amplitude refit's flux and error of ``output``.
    size_bias : dict or None
        A model card's ``size_bias``; `None` returns ``output`` unchanged.

    Returns
    -------
    `~numpy.ndarray`
        The dilated images (sums conserved); bands without positive flux
        unchanged.
    """
    if not size_bias:
        return output
    factor = _size_factor(np.asarray(flux, float), np.asarray(flux_err, float),
                          size_bias)
    return dilate_images(output, factor - 1.0)


def fit_psf_leakage(output, truth, psfs):
    """Fit the PSF ellipticity that deconvolved images keep (leakage).

    The leakage is the slope of the ellipticity error against the PSF's
    ellipticity, :math:`\\alpha = \\sum (e - e_{\\rm true}) \\cdot e_{\\rm PSF} /
    \\sum e_{\\rm PSF} \\cdot e_{\\rm PSF}` (unweighted moments, spin-2 dot
    product, bands pooled), the additive PSF bias of weak-lensing shear
    calibration. `correct_psf_leakage` shears each band image by
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


def correct_psf_leakage(output, psfs, psf_leakage):
    """Remove the PSF ellipticity the network leaves in its output.

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs, (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        PSFs, (n, n_bands, py, px).
    psf_leakage : dict or None
        From `fit_psf_leakage` (a model card's ``psf_leakage``); None
        returns ``output`` unchanged.

    Returns
    -------
    `~numpy.ndarray`
        The output, each band sheared by ``-alpha e_PSF / 2``.
    """
    if not psf_leakage:
        return output
    # A PSF without defined moments gets no correction.
    psf_e1, psf_e2 = (np.nan_to_num(e) for e in psf_ellipticity(psfs))
    alpha = psf_leakage['alpha']
    return shear_images(output, -alpha * psf_e1 / 2, -alpha * psf_e2 / 2)


def _refit(output, stamps, psfs, noise_sigma):
    """The amplitude refit of `deconvolve_stamps`: images and fluxes."""
    amplitude, amplitude_err, noise_sigma = refit_amplitude(
        output, stamps, psfs, noise_sigma=noise_sigma)
    total = output.sum(axis=(-2, -1), dtype=np.float64)
    flux = amplitude * total
    flux_err = amplitude_err * total
    return {'images': output * amplitude[..., None, None],
            'amplitude': amplitude, 'amplitude_err': amplitude_err,
            'noise_sigma': noise_sigma, 'flux': flux, 'flux_err': flux_err,
            'detection_snr': detection_snr(flux, flux_err)}


def deconvolve_stamps(stamps, psfs, *, pixel_scale, model=None,
                      noise_sigma=None, batch_size=128, symmetries=None,
                      return_details=False, strict=False):
    """Remove the PSF from multi-band stamps.

    Parameters
    ----------
    stamps : array-like
        Observed, background-subtracted stamps of shape (n, n_bands, ny,
        nx) in any flux unit; ny and nx must equal the model's stamp size.
    psfs : array-like
        PSF images of shape (n, n_bands, py, px): odd sizes, centred, any
        positive sum (they are normalised here), py, px <= ny, nx.
    pixel_scale : float, `~astropy.units.Quantity` or array-like
        Pixel scale in arcsec/pixel: a scalar, or one value per object
        (shape (n,)).
    model : `~psfdeconv.model.DeconvolutionModel`, optional
        A loaded model; the shipped default if `None`.
    noise_sigma : array-like, optional
        Per-pixel noise standard deviation, shape (n, n_bands) or
        broadcastable; estimated from the refit residuals if not given.
    batch_size : int, optional
        Objects per network call.
    symmetries : {1, 2, 4, 8}, optional
        Average the network over this many symmetries of the square
        (`symmetric_output`); default: the model card's ``symmetries``
        (1 if it has none). The card's calibrations were fitted with its
        own value; fewer run faster.
    return_details : bool, optional
        Also return a dict with ``'amplitude'``, ``'amplitude_err'``,
        ``'flux'``, ``'flux_err'``, ``'flux_corrected'`` and
        ``'noise_sigma'`` (each (n, n_bands)), ``'network_output'`` (the
        template refitted: the network output with its floor removed and,
        where the card has ``psf_leakage``, `correct_psf_leakage` applied),
        ``'outside_training'`` (n,), True where the pixel scale or a PSF's
        FWHM lies outside the model's training range
        (`outside_training_range`), ``'detection_snr'`` (n,) (`detection_snr`)
        and ``'detected'`` (n,): False where it is below the card's
        ``detection`` threshold, whose images are set to 0 (fluxes are
        still reported).
    strict : bool, optional
        Refuse stamps outside the training range
        (`~psfdeconv.exceptions.PixelScaleError`) instead of warning
        (`~psfdeconv.exceptions.OutsideTrainingRangeWarning`).

    Returns
    -------
    images : `~numpy.ndarray`
        Deconvolved images (n, n_bands, ny, nx) in the input's flux units,
        after the amplitude refit: the sum of an image is its flux. Where
        the model's card has a ``detection`` threshold and a stamp's
        `detection_snr` lies below it, the images are 0 (no significant
        source).
    details : dict
        Only if ``return_details``.

    Raises
    ------
    `~psfdeconv.exceptions.InvalidInputError`
        Subclasses for non-finite pixels, bad PSFs, shape or band-count
        mismatches and invalid pixel scales (and, with ``strict``, pixel
        scales or PSFs outside the training range).

    Examples
    --------
    >>> import psfdeconv
    >>> from psfdeconv.simulate import simulate_stamps
    >>> sims = simulate_stamps(4, seed=7)
    >>> images = psfdeconv.deconvolve_stamps(
    ...     sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'])
    >>> images.shape
    (4, 3, 64, 64)
    """
    from .model import load_model

    stamps, psfs, pixel_scale = validate_stamps(stamps, psfs, pixel_scale)
    if model is None:
        model = load_model(n_bands=stamps.shape[1])
    model.check_bands(stamps.shape[1])
    if stamps.shape[-2:] != (model.stamp_size, model.stamp_size):
        raise ShapeMismatchError(
            f'stamps are {stamps.shape[-2:]} pixels but the model was trained '
            f'on {model.stamp_size}x{model.stamp_size}; cut stamps of that '
            f'size.')
    outside = _check_training_range(model, pixel_scale, psfs, strict=strict)
    output = symmetric_output(model, stamps, psfs, pixel_scale,
                              symmetries=_check_symmetries(symmetries, model),
                              batch_size=batch_size)
    output = remove_output_floor(output, model.card.get('output_floor'))
    if noise_sigma is not None:
        noise_sigma = np.broadcast_to(np.asarray(noise_sigma, float),
                                      stamps.shape[:2])
    size_bias = model.card.get('size_bias')
    if size_bias:
        # The dilation depends on the refit's SNR; the images are refitted after it.
        first = _refit(output, stamps, psfs, noise_sigma)
        output = correct_size_bias(output, first['flux'], first['flux_err'], size_bias)
    output = correct_psf_leakage(output, psfs, model.card.get('psf_leakage'))
    fit = _refit(output, stamps, psfs, noise_sigma)
    images = fit.pop('images')
    detected = _apply_detection(images, fit['detection_snr'],
                                model.card.get('detection'))
    if not return_details:
        return images
    details = {
        **fit,
        'flux_corrected': correct_flux_bias(fit['flux'], fit['flux_err'],
                                            model.card.get('flux_bias')),
        'network_output': output,
        'outside_training': outside,
        'detected': detected,
    }
    return images, details


def psf_fwhm(psfs, pixel_scale):
    """FWHM of PSF images in arcsec (`galsim.Image.calculateFWHM`).

    The radius at which the pixel values, sorted by their distance from the
    image's light centroid, fall below half the peak, interpolated between
    pixels: it resolves sub-pixel differences of FWHM (2.0, 2.3 and 2.6
    pixels), where counting the pixels above half the peak cannot. It
    measures the pixelated image, so a PSF only a few pixels wide comes out
    broader than its intrinsic profile by up to a quarter of a pixel.

    Parameters
    ----------
    psfs : array-like
        Shape (..., py, px), positive sums.
    pixel_scale : float or array-like
        arcsec/pixel, broadcastable to ``psfs.shape[:-2]``.

    Returns
    -------
    `~numpy.ndarray`
        Shape ``psfs.shape[:-2]``, arcsec.

    Examples
    --------
    >>> import galsim
    >>> from psfdeconv.deconvolve import psf_fwhm
    >>> image = galsim.Moffat(beta=3, fwhm=0.8).drawImage(nx=41, ny=41, scale=0.1)
    >>> print(f'{psf_fwhm(image.array, 0.1):.1f}')
    0.8
    """
    import galsim

    psfs = np.asarray(psfs, dtype=np.float64)
    ny, nx = psfs.shape[-2:]
    yy, xx = np.mgrid[:ny, :nx]
    fwhm_pixels = np.empty(psfs.shape[:-2])
    for index in np.ndindex(psfs.shape[:-2]):
        psf = psfs[index]
        total = psf.sum()
        # GalSim's pixel centres are 1-based.
        centre = galsim.PositionD((psf * xx).sum() / total + 1, (psf * yy).sum() / total + 1)
        fwhm_pixels[index] = galsim.Image(psf, scale=1.0).calculateFWHM(center=centre)
    return fwhm_pixels * np.asarray(pixel_scale, dtype=np.float64)


def outside_training_range(model, pixel_scale, psfs=None):
    """Which stamps lie outside the model's training range.

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        Its card's ``training.simulation_config`` gives the ranges of the
        pixel scale and of the PSF FWHM.
    pixel_scale : array-like
        arcsec/pixel, shape (n,).
    psfs : array-like, optional
        PSF images (n, n_bands, py, px); their FWHM (`psf_fwhm`) is checked
        too, with a leeway for the error of the estimate (15 %, or a pixel
        for PSFs only a few pixels wide).

    Returns
    -------
    outside : `~numpy.ndarray` of bool
        Shape (n,).
    reasons : list of str
        One sentence per range that is left, naming a value and the range.
    """
    sim = model.card.get('training', {}).get('simulation_config', {}) or {}
    pixel_scale = np.atleast_1d(np.asarray(pixel_scale, dtype=np.float64))
    outside = np.zeros(pixel_scale.shape, dtype=bool)
    reasons = []
    low, high = sim.get('pixel_scale_range', (None, None))
    if low is not None:
        bad = (pixel_scale < low) | (pixel_scale > high)
        if bad.any():
            outside |= bad
            reasons.append(f'{int(bad.sum())} stamp(s) have pixel scales outside '
                           f'the trained range [{low}, {high}] arcsec/pixel (e.g. '
                           f'{pixel_scale[bad][0]:.3f})')
    low, high = sim.get('psf_fwhm_range', (None, None))
    if low is not None and psfs is not None:
        scale = pixel_scale[:, None]
        fwhm = psf_fwhm(psfs, scale)
        # The leeway covers the pixelisation of the estimate (up to a
        # quarter of a pixel) and elliptical PSFs, whose FWHM lies between
        # their axes'.
        bad_band = ((fwhm < low - np.maximum(0.15 * low, scale)) |
                    (fwhm > high + np.maximum(0.15 * high, scale)))
        bad = bad_band.any(axis=1)
        if bad.any():
            outside |= bad
            reasons.append(f'{int(bad.sum())} stamp(s) have PSFs with FWHM outside '
                           f'the trained range [{low}, {high}] arcsec (e.g. '
                           f'{fwhm[bad_band][0]:.2f})')
    return outside, reasons


def _check_training_range(model, pixel_scale, psfs, *, strict):
    import warnings

    from .exceptions import OutsideTrainingRangeWarning

    outside, reasons = outside_training_range(model, pixel_scale, psfs)
    if reasons and strict:
        raise PixelScaleError('; '.join(reasons) + '. Use a model trained on '
                              'such data (psfdeconv train), or drop strict '
                              '(--strict) to deconvolve them with a warning and '
                              'a flag.')
    if reasons:
        warnings.warn('; '.join(reasons) + '; results there are extrapolations.',
                      OutsideTrainingRangeWarning, stacklevel=3)
    return outside
