# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Metrics of deconvolved images against their truth (the paper's Tables 1-3
and Fig. 7).

* Image quality: `image_quality` (PSNR and SSIM of Table 1, paper-spec
  5.4).
* Moments: `moment_differences` and `summarize_differences` (Table 2,
  paper-spec 5.1-5.2).
* Shear response: `ellipticity_correlation` (C_PSF and C_true of Fig. 7,
  paper-spec 5.3).
* Detection: `flux_bin_edges`, `flux_classes`, `confusion_matrix` and
  `classification_summary` (Table 3, paper-spec 5.5), and `flux_bias_table`.

Images are arrays of shape ``(n, n_bands, ny, nx)`` (channel first).
"""


import numpy as np
from astropy import units as u
from astropy.table import QTable

from .._validation import as_image_stack
from ..exceptions import (
    ConfigError,
    InvalidInputError,
    ShapeMismatchError,
)

__all__ = ['CLASS_NAMES', 'QUANTITIES', 'DIFFERENCE_UNITS', 'DIFFERENCE_DESCRIPTIONS',
           'image_quality', 'moment_differences', 'summarize_differences',
           'ellipticity_correlation', 'flux_bin_edges', 'flux_classes', 'confusion_matrix',
           'classification_summary', 'flux_bias_table']


# Table 2 row order (paper-spec 5.2) and the unit of each difference.
QUANTITIES = ('flux', 'x', 'y', 'e1', 'e2', 'e', 'size')


DIFFERENCE_UNITS = {'flux': u.percent, 'x': u.pix, 'y': u.pix,
                     'e1': u.one, 'e2': u.one, 'e': u.one, 'size': u.percent}


DIFFERENCE_DESCRIPTIONS = {
    'flux': '100 (M0_pred - M0_true) / M0_true',
    'x': 'x_pred - x_true (centroid, pixels)',
    'y': 'y_pred - y_true (centroid, pixels)',
    'e1': 'e1_pred - e1_true',
    'e2': 'e2_pred - e2_true',
    'e': '|e|_pred - |e|_true',
    'size': '100 (size_pred - size_true) / size_true',
}


CLASS_NAMES = ('blank', 'low', 'medium', 'high')


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

    truth = as_image_stack(truth, 'truth')
    prediction = as_image_stack(prediction, 'prediction')
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
    missing = [key for key in QUANTITIES if key not in moments]
    if missing:
        msg = (f'{name} lacks the key(s) {missing}; pass the dict returned '
               f'by psfdeconv.measure.image_moments.')
        raise InvalidInputError(msg)
    return {key: np.asarray(moments[key], dtype=float) for key in QUANTITIES}


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
    for key in QUANTITIES:
        if truth[key].shape != pred[key].shape:
            msg = (f"truth_moments['{key}'] has shape {truth[key].shape} "
                   f"but pred_moments['{key}'] has shape "
                   f'{pred[key].shape}; measure the same objects.')
            raise ShapeMismatchError(msg)
    out = {}
    with np.errstate(divide='ignore', invalid='ignore'):
        for key in QUANTITIES:
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
    unknown = [key for key in differences if key not in QUANTITIES]
    if unknown:
        msg = (f'differences has unknown key(s) {unknown}; the known '
               f'quantities are {list(QUANTITIES)}.')
        raise InvalidInputError(msg)
    rows = {'quantity': [], 'unit': [], 'mean': [], 'rms': [], 'n': []}
    for key in QUANTITIES:
        if key not in differences:
            continue
        values = np.asarray(differences[key], dtype=float)
        use = np.isfinite(values)
        if mask is not None:
            use &= _object_mask(mask, values.shape)
        selected = values[use]
        rows['quantity'].append(key)
        rows['unit'].append(DIFFERENCE_UNITS[key].to_string())
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
    for k, name in enumerate(CLASS_NAMES[1:], start=1):
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
    selections = [(name, classes == k) for k, name in enumerate(CLASS_NAMES) if k > 0]
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
