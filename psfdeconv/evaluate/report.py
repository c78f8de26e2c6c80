# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The evaluation of a model on simulations, and its report.

`evaluate_predictions` computes every metric of `psfdeconv.evaluate.metrics`
for a model and the baselines; `write_report` writes the tables and
`read_report` reads them back; `evaluate_simulation` runs it all on a
simulation file (``psfdeconv evaluate``).
"""

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import QTable

from .._fourier import convolve_same
from .._validation import (
    as_image_stack,
    as_stamps_and_psfs,
    broadcast_pixel_scale,
    check_band_names,
)
from ..exceptions import (
    InvalidInputError,
    OutputExistsError,
    ShapeMismatchError,
)
from ..measure import image_moments, snr
from .baselines import baseline_predictions
from .metrics import (
    CLASS_NAMES,
    DIFFERENCE_DESCRIPTIONS,
    DIFFERENCE_UNITS,
    QUANTITIES,
    classification_summary,
    confusion_matrix,
    ellipticity_correlation,
    flux_bias_table,
    flux_bin_edges,
    flux_classes,
    image_quality,
    moment_differences,
    summarize_differences,
)

__all__ = ['evaluate_predictions', 'write_report', 'read_report', 'evaluate_simulation']



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
    truth = as_image_stack(truth, 'truth')
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
        data = as_image_stack(images, f'predictions[{name!r}]')
        if data.shape != truth.shape:
            msg = (f'predictions[{name!r}] has shape {data.shape}, '
                   f'but truth has shape {truth.shape}; they must match.')
            raise ShapeMismatchError(msg)
        preds[str(name)] = data
    psf_data = as_image_stack(psfs, 'psfs')
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
        _, unit_psfs = as_stamps_and_psfs(truth, psf_data)
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
        (name, source & (true_class == k)) for k, name in enumerate(CLASS_NAMES) if k > 0)

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
            for key in QUANTITIES:
                column = f'd_{key}_{band}'
                objects[column] = diffs[key][:, j] * DIFFERENCE_UNITS[key]
                objects[column].info.description = DIFFERENCE_DESCRIPTIONS[key]
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
    from ..measure import hsm_moments

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
        for k, name in enumerate(CLASS_NAMES):
            rows.append((method, name, *(int(v) for v in cm[k])))
    return QTable(rows=rows, names=('method', 'true_class',
                                    *(f'pred_{name}' for name in CLASS_NAMES)))


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

    from ..io import atomic_path, check_writable

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


def evaluate_simulation(path, *, model=None, n_objects=None,
                        baselines=('observed', 'wiener', 'richardson_lucy'),
                        report_dir=None, overwrite=False, precision='float32'):
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
    precision : {'float32', 'bfloat16', 'auto'}, optional
        Arithmetic of the network (`~psfdeconv.inference.resolve_precision`);
        float32 by default, in which the card's metrics were measured.

    Returns
    -------
    dict
        `evaluate_predictions` results plus ``'flux_bias'`` (the model's
        flux bias per truth-flux class, `flux_bias_table`),
        ``'summary_text'`` (Tables 1, 2 and 3 and the flux bias as
        Markdown) and ``'report_files'`` if written.
    """
    from ..deconvolve import deconvolve_stamps
    from ..model import load_model
    from ..simulate import read_simulation

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
        from ..train import split_bands

        sims = split_bands(sims)
    model = load_model(n_bands=sims['observed'].shape[1]) if model is None else model
    images, details = deconvolve_stamps(
        sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
        model=model, return_details=True, precision=precision)
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


def read_report(report_dir):
    """Read back the tables of an evaluation report for the ``plot_*`` functions.

    Parameters
    ----------
    report_dir : str or `~pathlib.Path`
        A directory written by `~psfdeconv.evaluate.write_report`
        (``psfdeconv evaluate --report``).

    Returns
    -------
    dict
        The tables found (``'objects'``, ``'table1'``, ``'table2'``,
        ``'table3'``, ``'correlations'``, ... as `~astropy.table.QTable`),
        ``'confusion'`` as a dict of method -> 4x4 int array, and
        ``'edges'`` (from the objects table's meta) when present: the
        layout of `~psfdeconv.evaluate.evaluate_predictions`.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the directory holds no ``.ecsv`` table.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from psfdeconv.evaluate import write_report
    >>> from psfdeconv.evaluate import read_report
    >>> directory = tempfile.mkdtemp()
    >>> _ = write_report({'confusion': {'model': np.eye(4, dtype=int)}}, directory)
    >>> print(read_report(directory)['confusion']['model'].trace())
    4
    """
    from astropy.table import QTable

    report_dir = Path(report_dir)
    paths = sorted(report_dir.glob('*.ecsv')) if report_dir.is_dir() else []
    if not paths:
        raise InvalidInputError(f'{report_dir} holds no .ecsv table; give a directory '
                                f'written by psfdeconv evaluate --report.')
    results = {}
    for path in paths:
        results[path.stem] = QTable.read(path, format='ascii.ecsv')
    if 'confusion' in results:
        table = results.pop('confusion')
        columns = [f'pred_{name}' for name in CLASS_NAMES]
        confusion = {}
        for method in dict.fromkeys(np.asarray(table['method']).tolist()):
            rows = table[np.asarray(table['method']) == method]
            order = [np.asarray(rows['true_class']).tolist().index(name)
                     for name in CLASS_NAMES]
            confusion[method] = np.array([[int(rows[c][i]) for c in columns]
                                          for i in order])
        results['confusion'] = confusion
    if 'objects' in results and 'edges' in results['objects'].meta:
        results['edges'] = np.asarray(results['objects'].meta['edges'], dtype=float)
    return results
