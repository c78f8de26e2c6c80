# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Metrics, classical baselines and the paper's evaluation tables.

* Image quality: `image_quality` (PSNR and SSIM of Table 1, paper-spec
  5.4).
* Moments: `moment_differences` and `summarize_differences` (Table 2,
  paper-spec 5.1-5.2).
* Shear response: `ellipticity_correlation` (C_PSF and C_true of Fig. 7,
  paper-spec 5.3).
* Detection: `flux_bin_edges`, `flux_classes`, `confusion_matrix` and
  `classification_summary` (Table 3, paper-spec 5.5).
* Baselines: `wiener_deconvolve` and `richardson_lucy_deconvolve`.
* Everything at once: `evaluate_predictions` and `write_report`.
* What the noise allows: `shape_information_floor` (Cramer-Rao and
  posterior-mean floors of the ellipticity and size errors).
* Exposure catalogues against simulated truth: `match_truth` and
  `exposure_accuracy`.

Images are arrays of shape ``(n, n_bands, ny, nx)`` (channel first); PSFs
are odd-sized, centred arrays of shape ``(n, n_bands, py, px)``.
"""

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import QTable

from ._fourier import convolve_same, kernel_fft
from ._validation import as_image_array, broadcast_pixel_scale, check_band_names, check_psfs
from .exceptions import (
    ConfigError,
    InvalidInputError,
    OutputExistsError,
    ShapeMismatchError,
)
from .flags import unusable_bits
from .measure import image_moments, snr

__all__ = [
    'image_quality',
    'moment_differences',
    'summarize_differences',
    'ellipticity_correlation',
    'flux_bin_edges',
    'flux_classes',
    'confusion_matrix',
    'classification_summary',
    'flux_bias_table',
    'wiener_deconvolve',
    'richardson_lucy_deconvolve',
    'evaluate_predictions',
    'write_report',
    'baseline_predictions',
    'evaluate_simulation',
    'shape_information_floor',
    'match_truth',
    'exposure_accuracy',
]

# Table 2 row order (paper-spec 5.2) and the unit of each difference.
_QUANTITIES = ('flux', 'x', 'y', 'e1', 'e2', 'e', 'size')
_DIFFERENCE_UNITS = {'flux': u.percent, 'x': u.pix, 'y': u.pix,
                     'e1': u.one, 'e2': u.one, 'e': u.one, 'size': u.percent}
_DIFFERENCE_DESCRIPTIONS = {
    'flux': '100 (M0_pred - M0_true) / M0_true',
    'x': 'x_pred - x_true (centroid, pixels)',
    'y': 'y_pred - y_true (centroid, pixels)',
    'e1': 'e1_pred - e1_true',
    'e2': 'e2_pred - e2_true',
    'e': '|e|_pred - |e|_true',
    'size': '100 (size_pred - size_true) / size_true',
}
_CLASS_NAMES = ('blank', 'low', 'medium', 'high')

# Stamps per FFT block: bounds the memory of the padded transforms
# (~70 MB per complex array for 64x64 stamps).
_FFT_BLOCK = 512

# Richardson-Lucy works on stamps scaled to unit peak; the pedestal added
# after lifting the minimum to zero keeps every pixel strictly positive.
_RL_PEDESTAL = 1e-4


def _check_4d(images, name):
    data, _ = as_image_array(images, name)
    if data.ndim != 4:
        msg = (f'{name} must have shape (n, n_bands, ny, nx), got '
               f'{data.shape}; add a band axis with {name}[:, None] for '
               f'single-band stamps.')
        raise ShapeMismatchError(msg)
    return data


def image_quality(truth, prediction):
    """PSNR and SSIM of each object, on images scaled by the truth peak.

    Both images of an object are divided by the maximum of its truth
    (over bands and pixels), so that the truth lies in [0, 1], and
    compared with `skimage.metrics.peak_signal_noise_ratio` and
    `skimage.metrics.structural_similarity` with ``data_range=1.0``
    (paper-spec 5.4; the SSIM treats the bands as channels and uses the
    default 7x7 window). The absolute PSNR depends on this
    normalisation: compare methods, not papers.

    Parameters
    ----------
    truth : array_like
        Truth images, shape ``(n, n_bands, ny, nx)``, ``ny, nx >= 7``.
    prediction : array_like
        Predicted images in the same flux units, same shape.

    Returns
    -------
    quality : dict of `~numpy.ndarray`
        ``'psnr'`` (dB; ``inf`` for identical images) and ``'ssim'``,
        each of shape ``(n,)``, NaN for blank truths (maximum <= 0).

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the shapes differ, are not 4-D or the images are smaller than
        7x7.
    psfdeconv.exceptions.InvalidPixelsError
        If either array has NaN or inf pixels.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import image_quality
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.uniform(size=(2, 3, 16, 16))
    >>> truth[1] = 0.0  # a blank
    >>> q = image_quality(truth, truth + rng.normal(0, 0.1, truth.shape))
    >>> print(np.round(q['psnr'], 1), np.round(q['ssim'], 3))
    [19.7  nan] [0.936   nan]
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    truth = _check_4d(truth, 'truth')
    prediction = _check_4d(prediction, 'prediction')
    if truth.shape != prediction.shape:
        msg = (f'truth has shape {truth.shape} but prediction has shape '
               f'{prediction.shape}; they must match.')
        raise ShapeMismatchError(msg)
    if min(truth.shape[-2:]) < 7:
        msg = (f'images of {truth.shape[-2:]} pixels are smaller than the '
               f'7x7 SSIM window; use stamps at least 7 pixels on a side.')
        raise ShapeMismatchError(msg)

    n = truth.shape[0]
    psnr = np.full(n, np.nan)
    ssim = np.full(n, np.nan)
    peak = truth.max(axis=(1, 2, 3))
    for i in np.flatnonzero(peak > 0):
        scaled_truth = truth[i] / peak[i]
        scaled_prediction = prediction[i] / peak[i]
        # Identical images have zero error: PSNR = inf without a warning.
        with np.errstate(divide='ignore'):
            psnr[i] = peak_signal_noise_ratio(scaled_truth, scaled_prediction,
                                              data_range=1.0)
        ssim[i] = structural_similarity(scaled_truth, scaled_prediction,
                                        data_range=1.0, channel_axis=0)
    return {'psnr': psnr, 'ssim': ssim}


def _check_moment_dict(moments, name):
    if not isinstance(moments, dict):
        msg = (f'{name} must be a dict as returned by image_moments, got '
               f'{type(moments).__name__}.')
        raise InvalidInputError(msg)
    missing = [key for key in _QUANTITIES if key not in moments]
    if missing:
        msg = (f'{name} lacks the key(s) {missing}; pass the dict returned '
               f'by psfdeconv.measure.image_moments.')
        raise InvalidInputError(msg)
    return {key: np.asarray(moments[key], dtype=float) for key in _QUANTITIES}


def moment_differences(truth_moments, pred_moments):
    """Per-object differences between predicted and true moments.

    Parameters
    ----------
    truth_moments, pred_moments : dict
        Outputs of `~psfdeconv.measure.image_moments` for the truth and
        the prediction, with arrays of equal shapes (and sizes in the same
        unit).

    Returns
    -------
    differences : dict of `~numpy.ndarray`
        Same shapes. ``'flux'``: relative difference
        ``100 (pred - true) / true`` in percent; ``'x'``, ``'y'``:
        ``pred - true`` in pixels; ``'e1'``, ``'e2'``, ``'e'``:
        ``pred - true``; ``'size'``: relative difference in percent.
        Relative differences are NaN where the true value is not
        positive (blanks).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If a dict lacks one of the keys.
    psfdeconv.exceptions.ShapeMismatchError
        If the arrays of the two dicts have different shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.measure import image_moments
    >>> from psfdeconv.evaluate import moment_differences
    >>> y, x = np.mgrid[0:32, 0:32]
    >>> truth = np.exp(-0.5 * ((x - 15)**2 + (y - 16)**2) / 4.0)
    >>> d = moment_differences(image_moments(truth), image_moments(1.1 * truth))
    >>> print(f"{d['flux']:.1f} {d['x']:.1f} {d['size']:.1f}")
    10.0 0.0 0.0
    """
    truth = _check_moment_dict(truth_moments, 'truth_moments')
    pred = _check_moment_dict(pred_moments, 'pred_moments')
    for key in _QUANTITIES:
        if truth[key].shape != pred[key].shape:
            msg = (f"truth_moments['{key}'] has shape {truth[key].shape} "
                   f"but pred_moments['{key}'] has shape "
                   f'{pred[key].shape}; measure the same objects.')
            raise ShapeMismatchError(msg)
    out = {}
    with np.errstate(divide='ignore', invalid='ignore'):
        for key in _QUANTITIES:
            if key in ('flux', 'size'):
                positive = truth[key] > 0
                ratio = 100.0 * (pred[key] - truth[key]) / np.where(positive, truth[key], 1.0)
                out[key] = np.where(positive, ratio, np.nan)
            else:
                out[key] = pred[key] - truth[key]
    return out


def _object_mask(mask, shape, name='mask'):
    """Boolean mask broadcast to ``shape``; 1-D masks select objects."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        msg = f'{name} must be a boolean array, got dtype {mask.dtype}.'
        raise InvalidInputError(msg)
    if mask.ndim == 1 and len(shape) > 1 and mask.shape[0] == shape[0]:
        mask = mask.reshape((-1,) + (1,) * (len(shape) - 1))
    try:
        return np.broadcast_to(mask, shape)
    except ValueError as exc:
        msg = (f'{name} of shape {mask.shape} does not match the objects '
               f'of shape {shape}; give one value per object (n,) or per '
               f'entry.')
        raise ShapeMismatchError(msg) from exc


def summarize_differences(differences, *, mask=None):
    """Mean and RMS of moment differences (the layout of Table 2).

    For each quantity the statistics run over all finite entries
    selected by ``mask``, objects and bands pooled (the paper's averages
    over the three bands). The RMS is :math:`\\sqrt{\\langle d^2
    \\rangle}`, the scatter including the mean.

    Parameters
    ----------
    differences : dict of array_like
        Output of `moment_differences`; the rows follow the keys present,
        in the order flux, x, y, e1, e2, e, size.
    mask : array_like of bool, optional
        True for the entries to use: shape ``(n,)`` (objects, e.g.
        ``~is_blank``) or the shape of the differences.

    Returns
    -------
    table : `~astropy.table.QTable`
        Columns ``quantity``, ``unit`` (of mean and rms: percent, pix or
        blank), ``mean``, ``rms``, ``n`` (entries used). Rows with no
        finite entry give NaN and ``n = 0``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``differences`` has no known key or an unknown one, or
        ``mask`` is not boolean.
    psfdeconv.exceptions.ShapeMismatchError
        If ``mask`` does not broadcast to the differences.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import summarize_differences
    >>> d = {'e1': np.array([0.1, -0.1, 0.3, np.nan])}
    >>> t = summarize_differences(d, mask=np.array([True, True, False, True]))
    >>> print(t['quantity'][0], f"{t['mean'][0]:.2f} {t['rms'][0]:.2f}", t['n'][0])
    e1 0.00 0.10 2
    """
    if not isinstance(differences, dict) or not differences:
        msg = ('differences must be a non-empty dict as returned by '
               'moment_differences.')
        raise InvalidInputError(msg)
    unknown = [key for key in differences if key not in _QUANTITIES]
    if unknown:
        msg = (f'differences has unknown key(s) {unknown}; the known '
               f'quantities are {list(_QUANTITIES)}.')
        raise InvalidInputError(msg)
    rows = {'quantity': [], 'unit': [], 'mean': [], 'rms': [], 'n': []}
    for key in _QUANTITIES:
        if key not in differences:
            continue
        values = np.asarray(differences[key], dtype=float)
        use = np.isfinite(values)
        if mask is not None:
            use &= _object_mask(mask, values.shape)
        selected = values[use]
        rows['quantity'].append(key)
        rows['unit'].append(_DIFFERENCE_UNITS[key].to_string())
        rows['n'].append(selected.size)
        if selected.size:
            rows['mean'].append(selected.mean())
            rows['rms'].append(np.sqrt(np.mean(selected**2)))
        else:
            rows['mean'].append(np.nan)
            rows['rms'].append(np.nan)
    table = QTable(rows)
    table['n'] = np.asarray(rows['n'], dtype=int)
    table['quantity'].info.description = 'Moment quantity (paper-spec 5.2 row order)'
    table['unit'].info.description = 'Unit of mean and rms'
    table['mean'].info.description = 'Mean of prediction - truth'
    table['rms'].info.description = 'Root mean square of prediction - truth'
    table['n'].info.description = 'Number of finite entries used'
    return table


def ellipticity_correlation(e1, e2, ref_e1, ref_e2, *, n_bootstrap=200, seed=0):
    r"""Spin-2 correlation of ellipticities with reference ellipticities.

    .. math::

        C = \frac{\sum_i \mathbf{e}_i \cdot \mathbf{r}_i}
                 {\sum_i \mathbf{r}_i \cdot \mathbf{r}_i}, \qquad
        \mathbf{a} \cdot \mathbf{b} = a_1 b_1 + a_2 b_2,

    the least-squares slope of :math:`\mathbf{e}` on :math:`\mathbf{r}`
    (paper-spec 5.3, the project's reading of HW23 Eqs. 29-30). With
    :math:`\mathbf{r}` the PSF ellipticity it is the PSF leakage
    :math:`C_{\rm PSF}` (ideal 0; the truth's value is the null level);
    with :math:`\mathbf{r}` the true ellipticity it is the response
    :math:`C_{\rm true}` (ideal 1). The error is the standard deviation
    over bootstrap resamplings of the entries.

    Parameters
    ----------
    e1, e2, ref_e1, ref_e2 : array_like
        Arrays of one shape (e.g. ``(n, n_bands)``, the entries pooled).
        Entries where any of the four is NaN are dropped.
    n_bootstrap : int, optional
        Number of bootstrap resamplings, at least 2.
    seed : int or `~numpy.random.Generator`, optional
        Seed of the bootstrap.

    Returns
    -------
    value : float
        :math:`C`; NaN if no entry is finite or the references are all
        zero.
    error : float
        Bootstrap standard deviation of :math:`C`; NaN with fewer than
        two entries.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the four arrays differ in shape.
    psfdeconv.exceptions.ConfigError
        If ``n_bootstrap`` is not an integer >= 2.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import ellipticity_correlation
    >>> rng = np.random.default_rng(1)
    >>> r1, r2 = rng.normal(0, 0.2, (2, 1000))
    >>> value, error = ellipticity_correlation(0.5 * r1, 0.5 * r2, r1, r2)
    >>> print(f'{value:.3f} {error:.3f}')
    0.500 0.000
    """
    arrays = [np.asarray(a, dtype=float) for a in (e1, e2, ref_e1, ref_e2)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        msg = (f'e1, e2, ref_e1, ref_e2 must have one shape, got '
               f'{[a.shape for a in arrays]}.')
        raise ShapeMismatchError(msg)
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 2:
        msg = f'n_bootstrap must be an integer >= 2, got {n_bootstrap!r}.'
        raise ConfigError(msg)
    a1, a2, b1, b2 = (a.ravel() for a in arrays)
    finite = np.isfinite(a1) & np.isfinite(a2) & np.isfinite(b1) & np.isfinite(b2)
    dot = (a1 * b1 + a2 * b2)[finite]
    norm = (b1 * b1 + b2 * b2)[finite]
    if norm.sum() <= 0:
        return np.nan, np.nan
    value = dot.sum() / norm.sum()
    if dot.size < 2:
        return float(value), np.nan
    from scipy.stats import bootstrap

    def ratio(dot, norm, axis=-1):
        with np.errstate(divide='ignore', invalid='ignore'):
            return dot.sum(axis=axis) / norm.sum(axis=axis)

    # Only the standard error is used: the percentile method skips BCa's
    # jackknife, which costs n evaluations of the statistic.
    result = bootstrap((dot, norm), ratio, n_resamples=int(n_bootstrap), paired=True,
                       vectorized=True, method='percentile',
                       rng=np.random.default_rng(seed))
    error = result.standard_error
    return float(value), float(error)


def flux_bin_edges(truth_flux, *, is_blank=None, blank_threshold=None):
    """Flux bin edges of the four classes blank / low / medium / high.

    The paper uses the truth flux :math:`M_0` as the SNR proxy and splits
    the non-blank test objects into tertiles (paper-spec 5.5). A flux
    below the lower edge of the low bin counts as blank ("the threshold
    ... defined as the boundary values for the low, medium and high SNR
    bins").

    Parameters
    ----------
    truth_flux : array_like
        True flux of each object, shape ``(n,)`` (for multi-band stamps
        e.g. the sum over bands).
    is_blank : array_like of bool, optional
        Shape ``(n,)``, True for blank objects. Default: objects with
        ``truth_flux <= 0``.
    blank_threshold : float, optional
        Lower edge of the low bin. Default: the smallest non-blank truth
        flux (so every true source is at least "low").

    Returns
    -------
    edges : `~numpy.ndarray`
        Shape ``(3,)``: ``[blank_threshold, low/medium, medium/high]``,
        the latter two the 1/3 and 2/3 quantiles of the non-blank truth
        flux.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``truth_flux`` is not 1-D and finite or has fewer than 3
        non-blank objects.
    psfdeconv.exceptions.ConfigError
        If ``blank_threshold`` is not finite or exceeds the low/medium
        edge.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import flux_bin_edges
    >>> flux = np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    >>> print(flux_bin_edges(flux))
    [1. 3. 5.]
    """
    flux = np.asarray(truth_flux, dtype=float)
    if flux.ndim != 1 or not np.all(np.isfinite(flux)):
        msg = (f'truth_flux must be a finite 1-D array (one flux per '
               f'object), got shape {flux.shape} with '
               f'{int(np.sum(~np.isfinite(flux)))} non-finite value(s).')
        raise InvalidInputError(msg)
    if is_blank is None:
        source = flux > 0
    else:
        source = ~_object_mask(is_blank, flux.shape, 'is_blank')
    source_flux = flux[source]
    if source_flux.size < 3:
        msg = (f'flux_bin_edges needs at least 3 non-blank objects to form '
               f'tertiles, got {source_flux.size}.')
        raise InvalidInputError(msg)
    low_medium, medium_high = np.quantile(source_flux, [1.0 / 3.0, 2.0 / 3.0])
    lower = source_flux.min() if blank_threshold is None else blank_threshold
    if not np.isfinite(lower) or lower > low_medium:
        msg = (f'blank_threshold must be finite and at most the low/medium '
               f'edge {low_medium:.6g}, got {blank_threshold!r}.')
        raise ConfigError(msg)
    return np.array([lower, low_medium, medium_high], dtype=float)


def flux_classes(flux, edges):
    """Classify fluxes as 0 blank, 1 low, 2 medium, 3 high.

    Parameters
    ----------
    flux : array_like
        Fluxes, any shape.
    edges : array_like
        The three non-decreasing edges from `flux_bin_edges`. A flux
        below ``edges[0]`` is blank, ``edges[0] <= flux < edges[1]`` low,
        ``edges[1] <= flux < edges[2]`` medium, above high. Non-finite
        fluxes count as blank.

    Returns
    -------
    classes : `~numpy.ndarray` of int
        Shape of ``flux``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``edges`` are not three finite non-decreasing numbers.

    Examples
    --------
    >>> from psfdeconv.evaluate import flux_classes
    >>> print(flux_classes([0.0, 1.0, 2.5, 9.0, float('nan')], [1.0, 2.0, 3.0]))
    [0 1 2 3 0]
    """
    edges = np.asarray(edges, dtype=float)
    if edges.shape != (3,) or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) < 0):
        msg = (f'edges must be three finite non-decreasing numbers '
               f'[blank/low, low/medium, medium/high] as returned by '
               f'flux_bin_edges, got {edges.tolist()}.')
        raise InvalidInputError(msg)
    flux = np.asarray(flux, dtype=float)
    classes = np.searchsorted(edges, np.where(np.isfinite(flux), flux, -np.inf), side='right')
    return classes.astype(int)


def confusion_matrix(true_class, pred_class):
    """Confusion matrix of the classes blank / low / medium / high.

    Parameters
    ----------
    true_class, pred_class : array_like of int
        Classes 0-3 from `flux_classes`, one shape.

    Returns
    -------
    matrix : `~numpy.ndarray` of int
        Shape ``(4, 4)``; rows are the true class, columns the predicted
        class.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the shapes differ.
    psfdeconv.exceptions.InvalidInputError
        If a class is not an integer in 0-3.

    Examples
    --------
    >>> from psfdeconv.evaluate import confusion_matrix
    >>> print(confusion_matrix([0, 0, 1, 3], [0, 1, 1, 3]))
    [[1 1 0 0]
     [0 1 0 0]
     [0 0 0 0]
     [0 0 0 1]]
    """
    true_class = np.asarray(true_class)
    pred_class = np.asarray(pred_class)
    if true_class.shape != pred_class.shape:
        msg = (f'true_class has shape {true_class.shape} but pred_class '
               f'has shape {pred_class.shape}; they must match.')
        raise ShapeMismatchError(msg)
    for name, classes in (('true_class', true_class), ('pred_class', pred_class)):
        valid = np.isin(classes, np.arange(4))
        if not np.all(valid):
            bad = classes[~valid].ravel()[0].item()
            msg = (f'{name} must hold classes 0 (blank) to 3 (high), got '
                   f'{bad!r}; use flux_classes to make them.')
            raise InvalidInputError(msg)
    index = 4 * true_class.astype(int).ravel() + pred_class.astype(int).ravel()
    return np.bincount(index, minlength=16).reshape(4, 4)


def classification_summary(matrix):
    """Blank-detection statistics from a 4x4 confusion matrix.

    Parameters
    ----------
    matrix : array_like of int
        Shape ``(4, 4)``, rows truth, columns prediction (classes blank,
        low, medium, high), from `confusion_matrix`.

    Returns
    -------
    summary : dict
        ``'n_true_blank'``, ``'n_true_sources'``, ``'n_predicted_blank'``,
        ``'n_predicted_sources'`` (int, the Table 3 layout);
        ``'blank_recall'`` (true blanks called blank / true blanks);
        ``'blank_precision'`` (true blanks among those called blank);
        ``'sources_called_blank'`` (fraction of true sources called
        blank); ``'predicted_blank_ratio'`` (called blank / true blanks,
        the paper-spec 5.5 column); ``'accuracy'`` (diagonal fraction);
        ``'recall_low'``, ``'recall_medium'``, ``'recall_high'``. Ratios
        with an empty denominator are NaN.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``matrix`` is not a 4x4 array of non-negative integers.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import classification_summary
    >>> cm = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    >>> s = classification_summary(cm)
    >>> print(s['blank_recall'], s['sources_called_blank'], s['n_predicted_blank'])
    0.8 0.03333333333333333 9
    """
    cm = np.asarray(matrix)
    if (cm.shape != (4, 4) or not np.issubdtype(cm.dtype, np.integer)
            or np.any(cm < 0)):
        msg = (f'matrix must be a 4x4 array of non-negative integers from '
               f'confusion_matrix, got shape {cm.shape} and dtype '
               f'{cm.dtype}.')
        raise InvalidInputError(msg)

    def ratio(a, b):
        return float(a) / float(b) if b > 0 else np.nan

    n_true_blank = int(cm[0].sum())
    n_predicted_blank = int(cm[:, 0].sum())
    summary = {
        'n_true_blank': n_true_blank,
        'n_true_sources': int(cm[1:].sum()),
        'n_predicted_blank': n_predicted_blank,
        'n_predicted_sources': int(cm[:, 1:].sum()),
        'blank_recall': ratio(cm[0, 0], n_true_blank),
        'blank_precision': ratio(cm[0, 0], n_predicted_blank),
        'sources_called_blank': ratio(cm[1:, 0].sum(), cm[1:].sum()),
        'predicted_blank_ratio': ratio(n_predicted_blank, n_true_blank),
        'accuracy': ratio(np.trace(cm), cm.sum()),
    }
    for k, name in enumerate(_CLASS_NAMES[1:], start=1):
        summary[f'recall_{name}'] = ratio(cm[k, k], cm[k].sum())
    return summary


def flux_bias_table(flux, flux_corrected, true_flux, true_class):
    """Flux bias per truth-flux class, before and after the bias correction.

    The done-means of the paper's flux correction (section III.3): the
    bias of the corrected flux at fixed true flux, in the low, medium and
    high classes of Table 3 (tertiles of the non-blank truth flux).

    Parameters
    ----------
    flux, flux_corrected, true_flux : array_like
        Per object and band, shape ``(n, n_bands)``: the amplitude-refit
        flux, the corrected flux (`~psfdeconv.deconvolve.correct_flux_bias`)
        and the truth.
    true_class : array_like of int
        Shape ``(n,)``: 0 blank (left out), 1 low, 2 medium, 3 high
        (`flux_classes`).

    Returns
    -------
    `~astropy.table.QTable`
        Rows ``low``, ``medium``, ``high``, ``all``: ``n`` (object-bands),
        and in percent the median and mean of ``flux / true - 1``
        (``measured_*``) and of ``flux_corrected / true - 1``
        (``corrected_*``), with the standard error of the corrected mean.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import flux_bias_table
    >>> true = np.array([[100.0], [200.0], [400.0], [0.0]])
    >>> table = flux_bias_table(1.1 * true, true, true, np.array([1, 2, 3, 0]))
    >>> table['measured_median'].value.round(6).tolist()
    [10.0, 10.0, 10.0, 10.0]
    >>> table['corrected_mean'].value.tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    flux, corrected, true = (np.asarray(getattr(a, 'value', a), dtype=float)
                             for a in (flux, flux_corrected, true_flux))
    true_class = np.asarray(true_class)
    if not flux.shape == corrected.shape == true.shape or \
            true_class.shape != flux.shape[:1]:
        raise ShapeMismatchError(
            f'flux, flux_corrected and true_flux must have one shape (n, n_bands) '
            f'and true_class shape (n,), got {flux.shape}, {corrected.shape}, '
            f'{true.shape} and {true_class.shape}.')
    rows = []
    classes = np.broadcast_to(true_class[:, None], flux.shape)
    selections = [(name, classes == k) for k, name in enumerate(_CLASS_NAMES) if k > 0]
    for name, select in selections + [('all', classes > 0)]:
        select = select & (true > 0)
        measured = flux[select] / true[select] - 1
        fixed = corrected[select] / true[select] - 1
        n = int(select.sum())
        stats = [100 * f(v) if n else np.nan
                 for v in (measured, fixed) for f in (np.median, np.mean)]
        sem = 100 * fixed.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
        rows.append((name, n, *stats, sem))
    table = QTable(rows=rows, names=('class', 'n', 'measured_median', 'measured_mean',
                                     'corrected_median', 'corrected_mean',
                                     'corrected_mean_err'))
    for name in table.colnames[2:]:
        table[name].unit = u.percent
    table.meta['description'] = (
        'Flux bias of the model per truth-flux class (object-bands): flux / true - 1 '
        'before and after the flux-bias correction')
    return table


def _check_stamps_psfs(stamps, psfs):
    """Validate stamps ``(..., ny, nx)`` and odd, centred PSFs; return
    float arrays with the PSFs normalised to unit sum."""
    stamps, _ = as_image_array(stamps, 'stamps')
    psfs, _ = as_image_array(psfs, 'psfs')
    try:
        leading = np.broadcast_shapes(stamps.shape[:-2], psfs.shape[:-2])
    except ValueError:
        leading = None
    if leading != stamps.shape[:-2]:
        msg = (f'psfs of shape {psfs.shape} do not match stamps of shape '
               f'{stamps.shape}; give one PSF per stamp, (..., py, px) with '
               f'the stamps\' leading shape.')
        raise ShapeMismatchError(msg)
    return stamps, check_psfs(psfs, stamps.shape[-2:])


def _per_stamp(value, leading, name):
    value = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(value) & (value >= 0)):
        msg = f'{name} must be finite and >= 0, got {value.tolist()!r}.'
        raise ConfigError(msg)
    try:
        return np.broadcast_to(value, leading)
    except ValueError as exc:
        msg = (f'{name} of shape {value.shape} does not broadcast to the '
               f'stamps\' leading shape {leading}.')
        raise ShapeMismatchError(msg) from exc


def wiener_deconvolve(stamps, psfs, *, noise_sigma=None, balance=None):
    r"""Deconvolve stamps with a Fourier Wiener filter (a baseline).

    .. math::

        \hat T = \mathcal{F}^{-1}\left[\frac{P^*}{|P|^2 + K}
        \mathcal{F}(N)\right],

    with :math:`P` the PSF transform and :math:`K` the noise-to-signal
    power ratio, taken constant over frequency (a flat-spectrum Wiener,
    or Tikhonov, filter). The stamps are zero-padded to twice their size
    to avoid wrap-around and cropped back; where :math:`|P|^2 + K = 0`
    the filter is set to 0.

    With ``noise_sigma`` :math:`\sigma` the ratio is estimated per stamp
    from Parseval's theorem: white noise has power
    :math:`n_{\rm pix}\sigma^2` at every frequency and a flat signal
    spectrum has power :math:`\sum T^2`, estimated as
    :math:`\sum N^2 - n_{\rm pix}\sigma^2` (the observed power minus the
    noise), so :math:`K = n_{\rm pix}\sigma^2 / (\sum N^2 -
    n_{\rm pix}\sigma^2)`. The observed power is that of the convolved
    image, a lower bound of the true image's, so :math:`K` errs towards
    more regularisation; a stamp consistent with pure noise is capped at
    :math:`K = 10^3` (it is returned nearly zeroed). A flat :math:`K`
    also damps the zero frequency, so the total flux is multiplied by
    :math:`1 / (1 + K)`: the baseline is biased low at low SNR, as the
    Wiener filter should be.

    Parameters
    ----------
    stamps : array_like
        Observed images, shape ``(..., ny, nx)``, e.g.
        ``(n, n_bands, ny, nx)``, background-subtracted.
    psfs : array_like
        Odd-sized centred PSFs, shape ``(..., py, px)`` with ``py <= ny``,
        ``px <= nx`` and leading axes broadcasting to the stamps'. They
        are normalised to unit sum, so the flux units are kept.
    noise_sigma : float or array_like, optional
        Per-pixel noise standard deviation, broadcastable to the leading
        shape, in the units of the stamps (>= 0; 0 gives the plain
        inverse filter).
    balance : float or array_like, optional
        A fixed :math:`K` (>= 0), broadcastable to the leading shape; the
        ``balance`` of `skimage.restoration.wiener` with a unit
        regulariser. Give exactly one of ``noise_sigma`` and ``balance``.

    Returns
    -------
    deconvolved : `~numpy.ndarray`
        Shape of ``stamps``, same flux units.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        If neither or both of ``noise_sigma`` and ``balance`` are given,
        or one is negative or not finite.
    psfdeconv.exceptions.InvalidPSFError
        If a PSF has even dimensions, is larger than the stamp or has a
        non-positive sum.
    psfdeconv.exceptions.ShapeMismatchError
        If the PSFs do not match the stamps.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import wiener_deconvolve
    >>> stamp = np.zeros((1, 1, 16, 16)); stamp[0, 0, 8, 7] = 5.0
    >>> delta = np.zeros((1, 1, 3, 3)); delta[0, 0, 1, 1] = 1.0
    >>> out = wiener_deconvolve(stamp, delta, balance=0.0)
    >>> print(f'{out[0, 0, 8, 7]:.3f} {abs(out).sum():.3f}')
    5.000 5.000
    """
    if (noise_sigma is None) == (balance is None):
        msg = ('give exactly one of noise_sigma (K estimated per stamp) '
               'and balance (fixed K), got '
               f'noise_sigma={noise_sigma!r}, balance={balance!r}.')
        raise ConfigError(msg)
    stamps, psfs = _check_stamps_psfs(stamps, psfs)
    leading = stamps.shape[:-2]
    ny, nx = stamps.shape[-2:]
    fft_shape = (2 * ny, 2 * nx)
    if balance is not None:
        k = _per_stamp(balance, leading, 'balance')
    else:
        sigma = _per_stamp(noise_sigma, leading, 'noise_sigma')
        noise_power = ny * nx * sigma**2
        signal_power = np.sum(stamps**2, axis=(-2, -1)) - noise_power
        with np.errstate(divide='ignore', invalid='ignore'):
            k = np.where(noise_power > 0,
                         np.minimum(noise_power / np.maximum(signal_power, 0.0), 1e3),
                         0.0)

    flat_stamps = stamps.reshape((-1, ny, nx))
    flat_psfs = np.broadcast_to(psfs, leading + psfs.shape[-2:]).reshape(
        (-1,) + psfs.shape[-2:])
    flat_k = np.asarray(k, dtype=float).reshape(-1)
    out = np.empty_like(flat_stamps)
    for start in range(0, flat_stamps.shape[0], _FFT_BLOCK):
        block = slice(start, start + _FFT_BLOCK)
        stamp_ft = np.fft.rfft2(flat_stamps[block], s=fft_shape, axes=(-2, -1))
        psf_ft = kernel_fft(flat_psfs[block], fft_shape)
        denominator = np.abs(psf_ft)**2 + flat_k[block, None, None]
        with np.errstate(divide='ignore', invalid='ignore'):
            wiener = np.where(denominator > 0, np.conj(psf_ft) / denominator, 0.0)
        deconvolved = np.fft.irfft2(wiener * stamp_ft, s=fft_shape, axes=(-2, -1))
        out[block] = deconvolved[:, :ny, :nx]
    return out.reshape(stamps.shape)


def richardson_lucy_deconvolve(stamps, psfs, *, num_iter=50):
    """Deconvolve stamps with Richardson-Lucy iterations (a baseline).

    Runs `skimage.restoration.richardson_lucy` with ``clip=False`` on each
    2-D stamp. Richardson-Lucy assumes non-negative data, while
    background-subtracted stamps have negative noise, so each stamp is

    1. divided by its largest absolute value (skimage starts from 0.5 and
       adds 1e-12 to denominators, which assumes values of order 1);
    2. lifted by a pedestal ``-min + 1e-4`` so that every pixel is
       strictly positive (a constant is a fixed point of the iteration
       for a unit-sum PSF);
    3. zero-padded by the PSF size and filled with the pedestal there
       too, because skimage convolves with zero boundaries: without the
       padding the constant pedestal would fall off at the stamp edges and
       leave artefacts that bias the unweighted sizes;

    and after the iterations the padding is cropped, the pedestal
    subtracted and the scale restored. All-zero stamps are returned as
    zeros. The pedestal slows the convergence of faint structure and the
    non-negativity of the iteration biases noise slightly positive.

    Parameters
    ----------
    stamps : array_like
        Observed images, shape ``(..., ny, nx)``, e.g.
        ``(n, n_bands, ny, nx)``.
    psfs : array_like
        Odd-sized centred PSFs ``(..., py, px)`` matching the stamps,
        normalised to unit sum internally.
    num_iter : int, optional
        Number of iterations (>= 1).

    Returns
    -------
    deconvolved : `~numpy.ndarray`
        Shape of ``stamps``, same flux units; finite.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        If ``num_iter`` is not a positive integer.
    psfdeconv.exceptions.InvalidPSFError
        If a PSF has even dimensions, is larger than the stamp or has a
        non-positive sum.
    psfdeconv.exceptions.ShapeMismatchError
        If the PSFs do not match the stamps.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import richardson_lucy_deconvolve
    >>> stamp = np.zeros((1, 1, 16, 16)); stamp[0, 0, 8, 7] = 5.0
    >>> delta = np.zeros((1, 1, 3, 3)); delta[0, 0, 1, 1] = 1.0
    >>> out = richardson_lucy_deconvolve(stamp, delta, num_iter=10)
    >>> print(f'{out[0, 0, 8, 7]:.3f} {out.sum():.3f}')
    5.000 5.000
    """
    from skimage.restoration import richardson_lucy

    if isinstance(num_iter, bool) or int(num_iter) != num_iter or num_iter < 1:
        msg = f'num_iter must be a positive integer, got {num_iter!r}.'
        raise ConfigError(msg)
    stamps, psfs = _check_stamps_psfs(stamps, psfs)
    psfs = np.broadcast_to(psfs, stamps.shape[:-2] + psfs.shape[-2:])
    ny, nx = stamps.shape[-2:]
    pad = max(psfs.shape[-2:])
    flat_stamps = stamps.reshape((-1, ny, nx))
    flat_psfs = psfs.reshape((-1,) + psfs.shape[-2:])
    out = np.zeros_like(flat_stamps)
    for i, (stamp, psf) in enumerate(zip(flat_stamps, flat_psfs, strict=True)):
        scale = np.abs(stamp).max()
        if scale == 0:
            continue
        scaled = stamp / scale
        pedestal = max(0.0, -scaled.min()) + _RL_PEDESTAL
        lifted = np.pad(scaled, pad) + pedestal
        estimate = richardson_lucy(lifted, psf, num_iter=int(num_iter), clip=False)
        out[i] = (estimate[pad:pad + ny, pad:pad + nx] - pedestal) * scale
    return out.reshape(stamps.shape)


def _noiseless_observed(truth, psfs):
    """Truth convolved with the PSFs (linear, zero-padded FFT)."""
    return convolve_same(truth, psfs)


def _finite_stats(values):
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.nan, np.nan
    return float(np.mean(values)), float(np.median(values))


def evaluate_predictions(truth, predictions, *, psfs, pixel_scale, is_blank,
                         noise_sigma=None, bands=None, n_bootstrap=200, seed=0,
                         hsm=False):
    """Evaluate deconvolved images against the truth: the paper's tables.

    Every method in ``predictions`` is measured with the same unweighted
    moments as the truth (`~psfdeconv.measure.image_moments`).

    * Table 1: PSNR and 1 - SSIM over non-blank objects
      (`image_quality`).
    * Table 2: mean and RMS of the moment differences over non-blank
      objects, bands pooled (`moment_differences`,
      `summarize_differences`).
    * Correlations: :math:`C_{\\rm PSF}` (prediction vs PSF ellipticity,
      ideal 0), the same for the prediction's ellipticity error
      (``c_psf_residual``, the PSF leakage, ideal 0) and
      :math:`C_{\\rm true}` (prediction vs truth, ideal 1) per SNR (truth
      flux) bin, with the truth's :math:`C_{\\rm PSF}` as the null level
      (`ellipticity_correlation`).
    * Table 3: blank / low / medium / high classification of all objects.
      The per-object flux is the sum of :math:`M_0` over bands (a project
      choice); the edges are the tertiles of the non-blank truth flux
      with the smallest one as the blank threshold (`flux_bin_edges`).

    Parameters
    ----------
    truth : array_like
        True images, shape ``(n, n_bands, ny, nx)``; blanks are all zero.
    predictions : dict
        Method name -> images of the truth's shape in the same flux
        units, e.g. ``{'model': ..., 'observed': ..., 'wiener': ...,
        'richardson_lucy': ...}``.
    psfs : array_like
        PSFs ``(n, n_bands, py, px)``, odd, centred.
    pixel_scale : float, array_like or `~astropy.units.Quantity`
        Arcsec/pixel: scalar, per object ``(n,)`` or ``(n, n_bands)``.
    is_blank : array_like of bool
        Shape ``(n,)``, True for blank objects (at least 3 non-blank).
    noise_sigma : float or array_like, optional
        Per-pixel noise, broadcastable to ``(n, n_bands)``; if given, the
        objects table gets ``snr_<band>`` (`~psfdeconv.measure.snr` of
        the truth convolved with its PSF).
    bands : sequence of str, optional
        Band names for column suffixes; default ``('b0', 'b1', ...)``.
    n_bootstrap : int, optional
        Bootstrap resamplings of the correlation errors.
    seed : int, optional
        Seed of the bootstrap.
    hsm : bool, optional
        Also compare GalSim HSM adaptive moments (``'table2_hsm'``):
        weighted moments are far less sensitive to noise than the
        paper's unweighted ones, so they compare noisy baselines fairly.

    Returns
    -------
    results : dict
        ``'objects'`` (QTable, one row per method and object: classes,
        PSNR, SSIM and the differences per band), ``'table1'``,
        ``'table2'`` (rows flux, x, y, e1, e2, e, size; columns
        ``<method>_mean``, ``<method>_rms``), ``'table3'``
        (classification counts and rates), ``'correlations'`` (method,
        SNR bin ``snr_bin``, C_PSF, C_PSF of the errors and C_true with
        bootstrap errors; the first rows
        are the truth), ``'confusion'`` (dict method -> 4x4 int array,
        rows truth) and ``'edges'`` (the three flux edges).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``predictions`` is empty, not a dict or has a method named
        ``'truth'``, or fewer than 3 objects are non-blank.
    psfdeconv.exceptions.ShapeMismatchError
        If a prediction, ``psfs`` or ``is_blank`` does not match
        ``truth``.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import evaluate_predictions
    >>> rng = np.random.default_rng(0)
    >>> y, x = np.mgrid[0:16, 0:16]
    >>> widths = rng.uniform(1.5, 3.0, 9)
    >>> truth = np.exp(-0.5 * ((x - 8)**2 + (y - 8)**2) / widths[:, None, None, None]**2)
    >>> truth = truth * rng.uniform(1, 10, (9, 1, 1, 1)); truth[0] = 0.0
    >>> psfs = np.zeros((9, 1, 3, 3)); psfs[:, :, 1, 1] = 1.0
    >>> res = evaluate_predictions(truth, {'copy': truth.copy()}, psfs=psfs,
    ...                            pixel_scale=0.2, is_blank=np.arange(9) == 0,
    ...                            n_bootstrap=10)
    >>> print(res['table2']['quantity'].tolist())
    ['flux', 'x', 'y', 'e1', 'e2', 'e', 'size']
    >>> print(res['confusion']['copy'].trace())
    9
    """
    truth = _check_4d(truth, 'truth')
    n, n_bands = truth.shape[:2]
    if not isinstance(predictions, dict) or not predictions:
        msg = ('predictions must be a non-empty dict of method name -> '
               f'images, got {type(predictions).__name__}.')
        raise InvalidInputError(msg)
    if 'truth' in predictions:
        msg = ("predictions may not use the name 'truth', which labels the "
               "truth's own rows in the correlation table; rename it, e.g. "
               "to 'reference'.")
        raise InvalidInputError(msg)
    preds = {}
    for name, images in predictions.items():
        data = _check_4d(images, f'predictions[{name!r}]')
        if data.shape != truth.shape:
            msg = (f'predictions[{name!r}] has shape {data.shape}, '
                   f'but truth has shape {truth.shape}; they must match.')
            raise ShapeMismatchError(msg)
        preds[str(name)] = data
    psf_data = _check_4d(psfs, 'psfs')
    if psf_data.shape[:2] != (n, n_bands):
        msg = (f'psfs must have shape ({n}, {n_bands}, py, px) to match '
               f'truth, got {psf_data.shape}.')
        raise ShapeMismatchError(msg)
    blank = np.asarray(is_blank)
    if blank.dtype != bool or blank.shape != (n,):
        msg = (f'is_blank must be a boolean array of shape ({n},), got '
               f'shape {blank.shape} and dtype {blank.dtype}.')
        raise ShapeMismatchError(msg)
    band_names = check_band_names(bands, n_bands)
    scale = broadcast_pixel_scale(pixel_scale, (n, n_bands), per_object=True)

    truth_m = image_moments(truth, pixel_scale=scale)
    psf_m = image_moments(psf_data)
    truth_flux = truth_m['flux'].sum(axis=1)
    edges = flux_bin_edges(truth_flux, is_blank=blank)
    true_class = np.where(blank, 0, flux_classes(truth_flux, edges))
    source = ~blank
    snr_values = None
    if noise_sigma is not None:
        _, unit_psfs = _check_stamps_psfs(truth, psf_data)
        observed = _noiseless_observed(truth, unit_psfs)
        sigma = np.asarray(noise_sigma, dtype=float)
        if sigma.ndim == 1 and sigma.shape[0] == n:
            sigma = sigma[:, None]
        snr_values = snr(observed, sigma)

    object_tables = []
    table1_rows = []
    table2 = QTable()
    table3_rows = []
    confusion = {}
    corr_rows = []
    bins = (('all', source),) + tuple(
        (name, source & (true_class == k)) for k, name in enumerate(_CLASS_NAMES) if k > 0)

    def correlation_rows(method, moments):
        for bin_name, select in bins:
            c_psf = ellipticity_correlation(
                moments['e1'][select], moments['e2'][select],
                psf_m['e1'][select], psf_m['e2'][select],
                n_bootstrap=n_bootstrap, seed=seed)
            c_true = ellipticity_correlation(
                moments['e1'][select], moments['e2'][select],
                truth_m['e1'][select], truth_m['e2'][select],
                n_bootstrap=n_bootstrap, seed=seed)
            # The leakage of the errors: free of the truth's chance
            # correlation with the PSFs, so 0 for a perfect method.
            c_residual = ellipticity_correlation(
                moments['e1'][select] - truth_m['e1'][select],
                moments['e2'][select] - truth_m['e2'][select],
                psf_m['e1'][select], psf_m['e2'][select],
                n_bootstrap=n_bootstrap, seed=seed)
            corr_rows.append((method, bin_name, int(select.sum()), *c_psf,
                              *c_residual, *c_true))

    correlation_rows('truth', truth_m)
    for method, images in preds.items():
        pred_m = image_moments(images, pixel_scale=scale)
        diffs = moment_differences(truth_m, pred_m)
        quality = image_quality(truth, images)
        pred_flux = pred_m['flux'].sum(axis=1)
        pred_class = flux_classes(pred_flux, edges)
        cm = confusion_matrix(true_class, pred_class)
        confusion[method] = cm

        objects = QTable()
        objects['method'] = np.full(n, method)
        objects['id'] = np.arange(n)
        objects['is_blank'] = blank
        objects['true_class'] = true_class
        objects['pred_class'] = pred_class
        objects['psnr'] = quality['psnr'] * u.dB
        objects['ssim'] = quality['ssim']
        for j, band in enumerate(band_names):
            for key in _QUANTITIES:
                column = f'd_{key}_{band}'
                objects[column] = diffs[key][:, j] * _DIFFERENCE_UNITS[key]
                objects[column].info.description = _DIFFERENCE_DESCRIPTIONS[key]
            if snr_values is not None:
                objects[f'snr_{band}'] = snr_values[:, j]
                objects[f'snr_{band}'].info.description = (
                    'Matched-filter SNR of the noiseless observed truth')
        object_tables.append(objects)

        psnr_mean, psnr_median = _finite_stats(quality['psnr'][source])
        dssim_mean, dssim_median = _finite_stats(1.0 - quality['ssim'][source])
        table1_rows.append((method, psnr_mean, psnr_median, dssim_mean, dssim_median,
                            int(np.sum(~np.isnan(quality['ssim'][source])))))

        summary = summarize_differences(diffs, mask=source)
        if 'quantity' not in table2.colnames:
            table2['quantity'] = summary['quantity']
            table2['unit'] = summary['unit']
        table2[f'{method}_mean'] = summary['mean']
        table2[f'{method}_rms'] = summary['rms']

        stats = classification_summary(cm)
        table3_rows.append((method, stats['n_predicted_sources'], stats['n_predicted_blank'],
                            stats['blank_recall'], stats['sources_called_blank'],
                            stats['predicted_blank_ratio'], stats['accuracy']))
        correlation_rows(method, pred_m)

    results_hsm = {}
    if hsm:
        results_hsm['table2_hsm'] = _hsm_table(truth, preds, scale, source)

    from astropy.table import vstack
    objects = vstack(object_tables, metadata_conflicts='silent')
    objects.meta = {'bands': list(band_names), 'edges': edges.tolist()}

    table1 = QTable(rows=table1_rows, names=('method', 'psnr_mean', 'psnr_median',
                                             'one_minus_ssim_mean',
                                             'one_minus_ssim_median', 'n'))
    table1['psnr_mean'].unit = u.dB
    table1['psnr_median'].unit = u.dB
    table1.meta['description'] = ('Table 1: PSNR and 1 - SSIM on images scaled by the '
                                  'truth peak, non-blank objects')
    table2.meta['description'] = ('Table 2: mean and RMS of prediction - truth over '
                                  'non-blank objects, bands pooled')
    table3 = QTable(rows=table3_rows, names=('method', 'n_pred_sources', 'n_pred_blank',
                                             'blank_recall', 'sources_called_blank',
                                             'predicted_blank_ratio', 'accuracy'))
    table3.meta['description'] = 'Table 3: blank / low / medium / high classification'
    table3.meta['edges'] = edges.tolist()
    correlations = QTable(rows=corr_rows, names=('method', 'snr_bin', 'n', 'c_psf',
                                                 'c_psf_err', 'c_psf_residual',
                                                 'c_psf_residual_err', 'c_true',
                                                 'c_true_err'))
    correlations.meta['description'] = (
        'C_PSF = sum(e.e_psf)/sum(e_psf.e_psf) (ideal 0; the truth rows are the null '
        'level); C_PSF_residual = the same for e - e_true (ideal 0, the PSF leakage); '
        'C_true = sum(e.e_true)/sum(e_true.e_true) (ideal 1); bootstrap errors')
    return {'objects': objects, 'table1': table1, 'table2': table2, 'table3': table3,
            'correlations': correlations, 'confusion': confusion, 'edges': edges,
            **results_hsm}


def _hsm_table(truth, predictions, scale, source):
    """Mean and RMS of HSM adaptive-moment differences, non-blank objects.

    Objects where HSM fails on the truth or the prediction are left out;
    the failure fraction of each method is reported.
    """
    from .measure import hsm_moments

    truth_h = hsm_moments(truth[source], pixel_scale=scale[source])
    truth_ok = truth_h['hsm_status'] == 0
    table = QTable()
    table['quantity'] = ['e1', 'e2', 'e', 'size', 'failed']
    table['unit'] = ['', '', '', '%', 'fraction']
    for method, images in predictions.items():
        pred_h = hsm_moments(images[source], pixel_scale=scale[source])
        ok = truth_ok & (pred_h['hsm_status'] == 0)
        e_true = np.hypot(truth_h['hsm_e1'], truth_h['hsm_e2'])
        e_pred = np.hypot(pred_h['hsm_e1'], pred_h['hsm_e2'])
        diffs = [pred_h['hsm_e1'] - truth_h['hsm_e1'],
                 pred_h['hsm_e2'] - truth_h['hsm_e2'],
                 e_pred - e_true,
                 100.0 * (pred_h['hsm_sigma'] / truth_h['hsm_sigma'] - 1.0)]
        means = [float(np.mean(d[ok])) for d in diffs]
        rms = [float(np.sqrt(np.mean(d[ok] ** 2))) for d in diffs]
        failed = float(1.0 - ok.sum() / max(truth_ok.sum(), 1))
        table[f'{method}_mean'] = [*means, failed]
        table[f'{method}_rms'] = [*rms, np.nan]
    table.meta['description'] = (
        'HSM adaptive moments (galsim.hsm.FindAdaptiveMom): mean and RMS of '
        'prediction - truth over non-blank objects where HSM succeeds on both, '
        'bands pooled; size is the adaptive sigma; "failed" is the fraction of '
        'objects where HSM fails on the prediction but not on the truth')
    return table


def _markdown_table(table):
    """A QTable as a GitHub Markdown table, floats to 4 significant digits."""
    header = []
    for name in table.colnames:
        unit = getattr(table[name], 'unit', None)
        header.append(f'{name} [{unit}]' if unit not in (None, u.one) else name)
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---' for _ in header) + '|']
    for row in table:
        cells = []
        for name in table.colnames:
            value = row[name]
            if isinstance(value, u.Quantity):
                value = value.value
            if isinstance(value, (float, np.floating)):
                cells.append(f'{value:.4g}')
            else:
                cells.append(str(value))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _confusion_table(confusion):
    rows = []
    for method, cm in confusion.items():
        for k, name in enumerate(_CLASS_NAMES):
            rows.append((method, name, *(int(v) for v in cm[k])))
    return QTable(rows=rows, names=('method', 'true_class',
                                    *(f'pred_{name}' for name in _CLASS_NAMES)))


def write_report(results, directory, *, overwrite=False):
    """Write the results of `evaluate_predictions` to a directory.

    Each table becomes ``<name>.ecsv`` (``objects``, ``table1``,
    ``table2``, ``table3``, ``correlations``, and ``confusion`` from the
    confusion matrices) and a Markdown summary ``report.md`` collects the
    small tables. Every file is written to a temporary name in the same
    directory and moved into place with `os.replace`, so a crash never
    leaves half a file. Nothing is written if any target exists and
    ``overwrite`` is False.

    Parameters
    ----------
    results : dict
        Output of `evaluate_predictions` (any subset of its keys with at
        least one table).
    directory : str or `~pathlib.Path`
        Output directory, created if missing.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    paths : list of `~pathlib.Path`
        The files written, ``report.md`` last.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If a target file exists and ``overwrite`` is False.
    psfdeconv.exceptions.InvalidInputError
        If ``results`` holds no table.

    Examples
    --------
    >>> import tempfile
    >>> from astropy.table import QTable
    >>> from psfdeconv.evaluate import write_report
    >>> table1 = QTable({'method': ['model'], 'psnr_mean': [75.2]})
    >>> paths = write_report({'table1': table1}, tempfile.mkdtemp())
    >>> print([p.name for p in paths])
    ['table1.ecsv', 'report.md']
    """
    from pathlib import Path

    from .io import atomic_path, check_writable

    if not isinstance(results, dict):
        msg = (f'results must be the dict returned by evaluate_predictions, '
               f'got {type(results).__name__}.')
        raise InvalidInputError(msg)
    tables = {name: value for name, value in results.items() if isinstance(value, QTable)}
    if results.get('confusion'):
        tables['confusion'] = _confusion_table(results['confusion'])
    if not tables:
        msg = ('results holds no table to write; pass the dict returned by '
               'evaluate_predictions.')
        raise InvalidInputError(msg)

    directory = Path(directory)
    targets = {name: directory / f'{name}.ecsv' for name in tables}
    report_path = directory / 'report.md'
    for path in (*targets.values(), report_path):
        try:
            check_writable(path, overwrite=overwrite)
        except OutputExistsError as exc:
            msg = (f'{path} exists; pass overwrite=True to replace the '
                   f'report in {directory}, or choose another directory.')
            raise OutputExistsError(msg) from exc

    written = []
    for name, table in tables.items():
        with atomic_path(targets[name], overwrite=overwrite) as tmp:
            table.write(tmp, format='ascii.ecsv', overwrite=True)
        written.append(targets[name])

    lines = ['# psfdeconv evaluation report', '']
    if 'edges' in results:
        edges = np.asarray(results['edges'], dtype=float)
        lines += [f'Flux bin edges (blank/low, low/medium, medium/high): '
                  f'{", ".join(f"{e:.6g}" for e in edges)}', '']
    for name, table in tables.items():
        if name == 'objects':
            lines += ['## objects', '', f'{len(table)} rows in `objects.ecsv`.', '']
            continue
        lines += [f'## {name}', '']
        if 'description' in table.meta:
            lines += [str(table.meta['description']), '']
        lines += [_markdown_table(table), '']
    with atomic_path(report_path, overwrite=overwrite) as tmp:
        tmp.write_text('\n'.join(lines))
    written.append(report_path)
    return written


#: Baselines `baseline_predictions` knows, by name.
BASELINES = ('observed', 'wiener', 'richardson_lucy', 'ipsf', 'ipsf1')


def baseline_predictions(observed, psfs, *, pixel_scale, noise_sigma,
                         baselines=BASELINES):
    """Classical deconvolutions of the same stamps, for comparison.

    Parameters
    ----------
    observed : `~numpy.ndarray`
        Stamps (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        Unit-sum PSFs (n, n_bands, py, px).
    pixel_scale : `~numpy.ndarray`
        Arcsec/pixel, (n,).
    noise_sigma : `~numpy.ndarray`
        Per-pixel noise (n, n_bands), for the Wiener filter.
    baselines : sequence of str, optional
        Any of ``'observed'`` (no deconvolution), ``'wiener'``
        (`wiener_deconvolve`), ``'richardson_lucy'`` (50 iterations of
        `richardson_lucy_deconvolve`), ``'ipsf'`` and ``'ipsf1'`` (the
        network's regularised-inverse input channels alone; iPSF1 is
        matched to a 1-arcsec Gaussian, not PSF-free).

    Returns
    -------
    dict
        Name -> images (n, n_bands, ny, nx) in the input's flux units.
    """
    from .features import make_channels

    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f'unknown baselines {unknown}; choose among '
                          f'{list(BASELINES)}.')
    out = {}
    for name in baselines:
        if name == 'observed':
            out[name] = np.asarray(observed)
        elif name == 'wiener':
            out[name] = wiener_deconvolve(observed, psfs,
                                          noise_sigma=noise_sigma)
        elif name == 'richardson_lucy':
            out[name] = richardson_lucy_deconvolve(observed, psfs,
                                                   num_iter=50)
        else:
            out[name] = make_channels(observed, psfs, pixel_scale=pixel_scale,
                                      kinds=(name,))[:, 0]
    return out


def evaluate_simulation(path, *, model=None, n_objects=None,
                        baselines=('observed', 'wiener', 'richardson_lucy'),
                        report_dir=None, overwrite=False):
    """Evaluate a model and baselines on a simulation file with truth.

    Deconvolves the stamps with the model (`~psfdeconv.deconvolve_stamps`,
    amplitude refit included), runs the baselines on the same stamps
    (`baseline_predictions`) and computes the paper's tables
    (`evaluate_predictions`); optionally writes them (`write_report`).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Simulation file (`~psfdeconv.simulate.write_simulation`) that the
        model was not trained on.
    model : `~psfdeconv.model.DeconvolutionModel`, optional
        The shipped default if `None`. A single-band model given
        multi-band simulations is evaluated on each band of each object
        as a 1-band object.
    n_objects : int, optional
        Use the first ``n_objects`` objects only.
    baselines : sequence of str, optional
        See `baseline_predictions`.
    report_dir : str or `~pathlib.Path`, optional
        Write the report there.
    overwrite : bool, optional
        Replace an existing report.

    Returns
    -------
    dict
        `evaluate_predictions` results plus ``'flux_bias'`` (the model's
        flux bias per truth-flux class, `flux_bias_table`),
        ``'summary_text'`` (Tables 1, 2 and 3 and the flux bias as
        Markdown) and ``'report_files'`` if written.
    """
    from .deconvolve import deconvolve_stamps
    from .model import load_model
    from .simulate import read_simulation

    if report_dir is not None:
        for name in ('report.md', 'table1.ecsv'):
            check_writable_report = Path(report_dir) / name
            if check_writable_report.exists() and not overwrite:
                raise OutputExistsError(
                    f'{check_writable_report} exists; pass overwrite=True '
                    f'(--overwrite) or choose another report directory.')
    sims = read_simulation(path, 0, n_objects)
    if model is not None and model.n_bands == 1 < sims['observed'].shape[1]:
        # A single-band model is evaluated on every band of every object.
        from .train import split_bands

        sims = split_bands(sims)
    model = load_model(n_bands=sims['observed'].shape[1]) if model is None else model
    images, details = deconvolve_stamps(
        sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
        model=model, return_details=True)
    predictions = {'model': images}
    predictions.update(baseline_predictions(
        sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
        noise_sigma=sims['noise_sigma'], baselines=baselines))
    results = evaluate_predictions(
        sims['truth'], predictions, psfs=sims['psf'],
        pixel_scale=sims['pixel_scale'], is_blank=sims['is_blank'],
        noise_sigma=sims['noise_sigma'], hsm=True)
    # The truth's classes of Table 3, as the objects table holds them.
    objects = results['objects']
    true_class = np.asarray(objects['true_class'][objects['method'] == 'model'])
    results['flux_bias'] = flux_bias_table(
        details['flux'], details['flux_corrected'],
        sims['truth'].sum(axis=(-2, -1), dtype=np.float64), true_class)
    results['summary_text'] = '\n\n'.join(
        _markdown_table(results[name])
        for name in ('table1', 'table2', 'table2_hsm', 'table3', 'flux_bias'))
    if report_dir is not None:
        results['report_files'] = write_report(results, report_dir,
                                               overwrite=overwrite)
    return results


# --- Information floor of shape measurement ------------------------------------------

#: Parameters of the shape-floor Fisher matrix shared by the bands: shear
#: (g1, g2), centroid (x, y) and dilation (log size); one flux per band.
_FLOOR_SHARED = ('g1', 'g2', 'x', 'y', 'k')


def _shift_images(images, dy, dx):
    from scipy import ndimage

    out = np.empty(images.shape, dtype=float)
    for index in np.ndindex(images.shape[:-2]):
        out[index] = ndimage.shift(images[index], (dy, dx), order=3, mode='constant')
    return out


def _transformed(images, name, step):
    """``images`` sheared, shifted or dilated by ``step`` of parameter ``name``."""
    from .transforms import dilate_images, shear_images

    if name == 'g1':
        return shear_images(images, step, 0.0)
    if name == 'g2':
        return shear_images(images, 0.0, step)
    if name == 'x':
        return _shift_images(images, 0.0, step)
    if name == 'y':
        return _shift_images(images, step, 0.0)
    return dilate_images(images, step)


def _gaussian_mixture_floor(values, covariances, *, n_draws, rng):
    """Expected error of the posterior mean under the sample's own prior.

    ``values`` (m, d) are the true values, ``covariances`` (m, d, d) the
    Gaussian measurement covariance of each. The prior of object ``i`` is
    a Gaussian kernel density of the other objects' values (Silverman
    width); its posterior mean is exact for that mixture prior.
    """
    m, dim = values.shape
    width = np.std(values, axis=0).mean() * (4.0 / (dim + 2)) ** (1.0 / (dim + 4)) \
        * max(m - 1, 1) ** (-1.0 / (dim + 4))
    errors = np.full((m, dim), np.nan)
    for i in range(m):
        prior = np.delete(values, i, axis=0)
        total = covariances[i] + width**2 * np.eye(dim)
        total_inv = np.linalg.inv(total)
        gain = width**2 * total_inv
        measured = values[i] + rng.standard_normal((n_draws, dim)) @ \
            np.linalg.cholesky(covariances[i]).T
        offsets = measured[:, None, :] - prior[None, :, :]  # (draws, m-1, d)
        log_w = -0.5 * np.einsum('dkj,jl,dkl->dk', offsets, total_inv, offsets)
        weights = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        means = prior[None] + offsets @ gain.T
        estimate = np.einsum('dk,dkj->dj', weights, means)
        errors[i] = np.sqrt(np.mean((estimate - values[i]) ** 2, axis=0))
    return errors


def shape_information_floor(truth, psfs, noise_sigma, *, is_blank=None,
                            n_draws=16, seed=0, step=0.01):
    """Smallest ellipticity and size errors the noise allows (estimate).

    For each non-blank object the Fisher information of the observed
    stamps (truth convolved with the known PSF, white Gaussian noise) is
    computed for a shear (g1, g2), a centroid shift and a dilation shared
    by the bands and one flux per band, by central differences of
    cubic-spline transforms of the truth. Its inverse, marginalised over
    the centroid and the fluxes and propagated through the response of
    each band's HSM ellipticity and size (`~psfdeconv.measure.hsm_moments`
    of the transformed truth), is the Cramer-Rao bound (``crb_*``) of an
    unbiased estimator. Faint galaxies are better estimated by shrinking
    towards the population: ``floor_*`` is the RMS error of the exact
    posterior mean given a Gaussian measurement with the Cramer-Rao
    covariance and a prior equal to the kernel density of the other
    objects' true values (per band), averaged over ``n_draws`` noise draws.

    The floor is optimistic, a target no method can beat: it assumes the
    galaxy's light profile known up to shear, size, position and flux
    (knots and bulge included), the same shear in every band, and the
    population of the test set known. Errors are HSM distortions as in
    `evaluate_predictions` (``table2_hsm``); sizes are percent of the
    HSM sigma.

    Parameters
    ----------
    truth : `~numpy.ndarray`
        PSF-free images (n, n_bands, ny, nx), non-negative.
    psfs : `~numpy.ndarray`
        PSFs (n, n_bands, py, px), any positive sums (normalised here).
    noise_sigma : array-like
        Per-pixel noise of the observed stamps, shape (n, n_bands).
    is_blank : array-like of bool, optional
        (n,); blank objects get no rows.
    n_draws : int, optional
        Noise draws per object for the posterior-mean floor.
    seed : int, optional
        Seed of those draws.
    step : float, optional
        Finite-difference step of the shear and the dilation, and of the
        shifts in pixels.

    Returns
    -------
    `~astropy.table.QTable`
        One row per non-blank object and band where HSM succeeds on the
        truth: ``id``, ``band``, ``snr`` (matched-filter SNR of the noiseless
        observed stamp), ``truth_e1``, ``truth_e2``, ``truth_size`` (HSM
        sigma, pixels), ``crb_e1``, ``crb_e2``, ``crb_size`` (percent) and
        ``floor_e1``, ``floor_e2``, ``floor_size``. ``meta['n_failed']``
        counts the rows left out because HSM fails on the truth.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the shapes of ``truth``, ``psfs``, ``noise_sigma`` or
        ``is_blank`` disagree.
    psfdeconv.exceptions.InvalidInputError
        If ``noise_sigma`` is not positive and finite or fewer than three
        rows remain.

    Examples
    --------
    A round Gaussian galaxy (sigma 3 px) seen through a Gaussian PSF
    (sigma 2 px): the Cramer-Rao bound of its ellipticity is
    ``4 sqrt(pi) sigma_obs**3 noise / (flux sigma**2)``.

    >>> import numpy as np
    >>> from psfdeconv.evaluate import shape_information_floor
    >>> y, x = np.mgrid[:48, :48] - 24.0
    >>> def gaussian(sigma, e1=0.0):
    ...     q = (x**2 / (1 + e1) + y**2 / (1 - e1)) / sigma**2
    ...     return np.exp(-0.5 * q) / (2 * np.pi * sigma**2)
    >>> truth = np.stack([1000 * gaussian(3.0, e1) for e1 in (0.0, 0.2, -0.2)])[:, None]
    >>> ky, kx = np.mgrid[-12:13, -12:13]
    >>> psf = np.exp(-0.5 * (kx**2 + ky**2) / 2.0**2)
    >>> psfs = np.broadcast_to(psf, (3, 1) + psf.shape)
    >>> floor = shape_information_floor(truth, psfs, np.full((3, 1), 0.5))
    >>> expected = 4 * np.sqrt(np.pi) * np.sqrt(13.0)**3 * 0.5 / (1000 * 9)
    >>> print(f"{floor['crb_e1'][0]:.4f} {expected:.4f}")
    0.0185 0.0185
    """
    from .measure import hsm_moments

    truth = np.asarray(_check_4d(truth, 'truth'), dtype=float)
    n, n_bands = truth.shape[:2]
    psfs = np.asarray(psfs, dtype=float)
    if psfs.ndim != 4 or psfs.shape[:2] != (n, n_bands):
        raise ShapeMismatchError(f'psfs must have shape ({n}, {n_bands}, py, px) '
                                 f'like truth, got {psfs.shape}.')
    psfs = psfs / psfs.sum(axis=(-2, -1), keepdims=True)
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=float), (n, n_bands))
    if not np.all(np.isfinite(noise_sigma) & (noise_sigma > 0)):
        raise InvalidInputError('noise_sigma must be positive and finite.')
    is_blank = np.zeros(n, bool) if is_blank is None else np.asarray(is_blank, bool)
    if is_blank.shape != (n,):
        raise ShapeMismatchError(f'is_blank must have shape ({n},), got {is_blank.shape}.')
    ids = np.flatnonzero(~is_blank)
    truth, psfs, noise_sigma = truth[ids], psfs[ids], noise_sigma[ids]

    observed = convolve_same(truth, psfs)
    # d(observed) / d(parameter) of the shared parameters, (m, 5, bands, ny, nx),
    # and, from the same transformed truths, the response of each band's HSM
    # (e1, e2, log sigma) to (g1, g2, k).
    derivatives = []
    response = np.zeros((len(ids), n_bands, 3, 3))
    for name in _FLOOR_SHARED:
        plus = _transformed(truth, name, step)
        minus = _transformed(truth, name, -step)
        derivatives.append(convolve_same(plus - minus, psfs) / (2 * step))
        if name in ('g1', 'g2', 'k'):
            column = ('g1', 'g2', 'k').index(name)
            plus, minus = hsm_moments(plus), hsm_moments(minus)
            response[..., 0, column] = (plus['hsm_e1'] - minus['hsm_e1']) / (2 * step)
            response[..., 1, column] = (plus['hsm_e2'] - minus['hsm_e2']) / (2 * step)
            response[..., 2, column] = np.log(plus['hsm_sigma'] / minus['hsm_sigma']) / (2 * step)
    shared = np.stack(derivatives, axis=1)
    # Fisher matrix: the shared parameters, then one flux per band (whose
    # derivative is that band's observed stamp over its flux).
    weight = 1.0 / noise_sigma**2
    n_shared = len(_FLOOR_SHARED)
    fisher = np.zeros((len(ids), n_shared + n_bands, n_shared + n_bands))
    fisher[:, :n_shared, :n_shared] = np.einsum('mpbyx,mqbyx,mb->mpq', shared, shared,
                                                weight, optimize=True)
    cross = np.einsum('mpbyx,mbyx,mb->mpb', shared, observed, weight, optimize=True)
    fisher[:, :n_shared, n_shared:] = cross
    fisher[:, n_shared:, :n_shared] = np.swapaxes(cross, 1, 2)
    fisher[:, n_shared:, n_shared:] = np.einsum(
        'mb,bc->mbc', weight * np.sum(observed**2, axis=(-2, -1)), np.eye(n_bands))
    # The marginal covariance of (g1, g2, k); pinv: a blank-looking band
    # (no flux) carries no information rather than failing.
    covariance = np.linalg.pinv(fisher)[:, [0, 1, 4]][:, :, [0, 1, 4]]

    reference = hsm_moments(truth)
    crb = response @ covariance[:, None] @ np.swapaxes(response, -1, -2)
    ok = (reference['hsm_status'] == 0) & np.all(np.isfinite(crb), axis=(-2, -1))

    rows = {key: [] for key in ('id', 'band', 'snr', 'truth_e1', 'truth_e2', 'truth_size',
                                'crb_e1', 'crb_e2', 'crb_size',
                                'floor_e1', 'floor_e2', 'floor_size')}
    rng = np.random.default_rng(seed)
    signal = np.sqrt(np.sum(observed**2, axis=(-2, -1))) / noise_sigma
    for band in range(n_bands):
        keep = ok[:, band]
        if keep.sum() < 3:
            continue
        cov = crb[keep, band]
        e_true = np.stack([reference['hsm_e1'][keep, band],
                           reference['hsm_e2'][keep, band]], axis=-1)
        floor_e = _gaussian_mixture_floor(e_true, cov[:, :2, :2], n_draws=n_draws, rng=rng)
        log_size = np.log(reference['hsm_sigma'][keep, band])[:, None]
        floor_size = _gaussian_mixture_floor(log_size, cov[:, 2:, 2:], n_draws=n_draws,
                                             rng=rng)[:, 0]
        rows['id'].append(ids[keep])
        rows['band'].append(np.full(keep.sum(), band))
        rows['snr'].append(signal[keep, band])
        rows['truth_e1'].append(e_true[:, 0])
        rows['truth_e2'].append(e_true[:, 1])
        rows['truth_size'].append(reference['hsm_sigma'][keep, band])
        rows['crb_e1'].append(np.sqrt(cov[:, 0, 0]))
        rows['crb_e2'].append(np.sqrt(cov[:, 1, 1]))
        rows['crb_size'].append(100.0 * np.sqrt(cov[:, 2, 2]))
        rows['floor_e1'].append(floor_e[:, 0])
        rows['floor_e2'].append(floor_e[:, 1])
        rows['floor_size'].append(100.0 * floor_size)
    if not rows['id'] or sum(len(r) for r in rows['id']) < 3:
        raise InvalidInputError('shape_information_floor needs at least 3 '
                                'non-blank objects where HSM succeeds on the truth.')
    table = QTable({key: np.concatenate(value) for key, value in rows.items()})
    table['truth_size'].unit = u.pix
    for key in ('crb_size', 'floor_size'):
        table[key].unit = u.percent
    table.meta['n_failed'] = int((~ok).sum())
    table.meta['description'] = (
        'Cramer-Rao bounds (crb_*) and posterior-mean floors (floor_*) of the HSM '
        'ellipticity and size errors: profile known up to shear, size, position and '
        'flux, shear shared by the bands, prior = the other objects\' true values')
    return table


# --- Exposure catalogues against their truth ----------------------------------------

def match_truth(catalog, truth, *, max_separation=0.5 * u.arcsec, kind='galaxy'):
    """Match a catalogue of `~psfdeconv.pipeline.deconvolve_catalog` to the
    truth table of `~psfdeconv.simulate.simulate_exposure`.

    Each truth source of ``kind`` is matched to its nearest catalogue source
    on the sky; pairs farther apart than ``max_separation`` are dropped.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        With a ``sky_centroid`` column.
    truth : `~astropy.table.Table`
        With ``ra``, ``dec`` (degrees) and ``kind`` columns.
    max_separation : `~astropy.units.Quantity`, optional
        Largest separation of a match.
    kind : str or None, optional
        Truth sources to match ('galaxy', 'star' or None for all).

    Returns
    -------
    `~astropy.table.QTable`
        One row per match: ``truth_index``, ``catalog_index`` and
        ``separation`` (arcsec).
    """
    from astropy.coordinates import SkyCoord

    if 'sky_centroid' not in catalog.colnames:
        raise InvalidInputError('the catalogue has no sky_centroid column; give '
                                'the catalogue of deconvolve_catalog.')
    rows = np.arange(len(truth))
    if kind is not None:
        rows = rows[np.asarray(truth['kind']) == kind]
    sky = SkyCoord(u.Quantity(truth['ra'][rows], u.deg),
                   u.Quantity(truth['dec'][rows], u.deg))
    matches = QTable({'truth_index': np.zeros(0, int), 'catalog_index': np.zeros(0, int),
                      'separation': np.zeros(0) * u.arcsec})
    if rows.size == 0 or len(catalog) == 0:
        return matches
    index, separation, _ = sky.match_to_catalog_sky(catalog['sky_centroid'])
    keep = separation <= max_separation
    matches = QTable({'truth_index': rows[keep], 'catalog_index': index[keep],
                      'separation': separation[keep].to(u.arcsec)})
    return matches


def _noise_median_abs(relative_error, n_draws=1000, seed=0):
    """The median |dF/F| that the catalogue's own flux errors alone give:
    the median over objects of |N(0, relative_error)|, averaged over seeded
    draws (None for no objects)."""
    relative_error = np.asarray(relative_error, float)
    if relative_error.size == 0:
        return None
    draws = np.random.default_rng(seed).normal(size=(n_draws, relative_error.size))
    return float(np.mean(np.median(np.abs(draws * relative_error), axis=1)))


def exposure_accuracy(catalog, truth, *, min_snr=20.0,
                      max_separation=0.5 * u.arcsec):
    """Accuracy of an exposure catalogue against its simulated truth.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        From `~psfdeconv.pipeline.deconvolve_catalog`.
    truth : `~astropy.table.Table`
        From `~psfdeconv.simulate.simulate_exposure` (with the ``*_true``
        shape columns).
    min_snr : float, optional
        Flux accuracy is taken over matches with ``snr_<band>`` above this.
    max_separation : `~astropy.units.Quantity`, optional
        Matching radius (`match_truth`).

    Returns
    -------
    dict
        ``n_truth``, ``n_matched``, ``n_unflagged`` (matches without flags),
        ``position_arcsec`` (median and max separation), and per band
        ``flux`` (the median of ``|flux_corrected / true - 1|`` and the bias,
        the median of ``flux_corrected / true - 1``, over matches above
        ``min_snr``, with their count, and ``noise_median_abs``: the median
        that the catalogue's flux errors alone would give, the floor set by
        the photometric noise), ``e1``, ``e2`` (RMS and mean of the unweighted
        ellipticity difference), ``hsm_e1``, ``hsm_e2`` (same, adaptive
        moments, finite values only) and ``size_percent`` (mean and RMS of
        100 (size / size_true - 1)). Statistics use the matches without a
        flag that makes the measurement unusable
        (`~psfdeconv.flags.UNUSABLE_FLAGS`); ``n_unflagged`` counts them.
    """
    matches = match_truth(catalog, truth, max_separation=max_separation)
    n_truth = int(np.sum(np.asarray(truth['kind']) == 'galaxy'))
    cat = catalog[matches['catalog_index']]
    tru = truth[matches['truth_index']]
    # The catalogue's own name -> bit mapping, read with the registry's
    # unusable names.
    unusable = unusable_bits(catalog.meta.get('flag_bits', {}))
    good = (np.asarray(cat['flags']) & (unusable or ~0)) == 0
    sep = matches['separation'].to_value(u.arcsec)
    result = {'n_truth': n_truth, 'n_matched': len(matches),
              'n_unflagged': int(good.sum()),
              'position_arcsec': {'median': float(np.median(sep)) if sep.size else None,
                                  'max': float(np.max(sep)) if sep.size else None}}

    def stats(diff):
        diff = np.asarray(diff, float)
        diff = diff[np.isfinite(diff)]
        if diff.size == 0:
            return {'n': 0, 'mean': None, 'rms': None}
        return {'n': int(diff.size), 'mean': float(diff.mean()),
                'rms': float(np.sqrt(np.mean(diff ** 2)))}

    for band in catalog.meta.get('bands', []):
        flux = np.asarray(u.Quantity(cat[f'flux_corrected_{band}']).value)
        true_flux = np.asarray(u.Quantity(tru[f'flux_{band}']).value)
        snr_ok = good & (np.asarray(cat[f'snr_{band}']) > min_snr)
        ratio = flux[snr_ok] / true_flux[snr_ok] - 1.0
        entry = {'flux': {'n': int(ratio.size),
                          'median_abs': float(np.median(np.abs(ratio)))
                          if ratio.size else None,
                          'median': float(np.median(ratio)) if ratio.size else None,
                          'noise_median_abs': _noise_median_abs(
                              np.asarray(u.Quantity(cat[f'flux_err_{band}']).value)[snr_ok]
                              / true_flux[snr_ok])}}
        for name in ('e1', 'e2', 'hsm_e1', 'hsm_e2'):
            if f'{name}_true' in tru.colnames:
                entry[name] = stats(np.asarray(cat[f'{name}_{band}'])[good]
                                    - np.asarray(tru[f'{name}_true'])[good])
        if 'size_true' in tru.colnames:
            size = u.Quantity(cat[f'size_{band}']).to_value(u.arcsec)[good]
            size_true = u.Quantity(tru['size_true']).to_value(u.arcsec)[good]
            entry['size_percent'] = stats(100.0 * (size / size_true - 1.0))
        result[band] = entry
    return result
