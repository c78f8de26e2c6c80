# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Figures of stamps, catalogues, trainings and evaluations (matplotlib).

* `plot_stamp_grid`: the paper's Figure 5, one object per row: the
  observed stamp, its PSF / iPSF / iPSF1 input channels, the truth when
  known and the deconvolved image, with rows picked per SNR bin.
* `plot_catalog_overview`: a `~psfdeconv.pipeline.deconvolve_catalog`
  table: measured against bias-corrected flux, and ellipticity whiskers
  on the exposure.
* `plot_training_history`: loss and validation loss per epoch.
* `plot_flux_histogram`, `plot_ellipticity_correlations` (the paper's
  Figure 7) and `plot_confusion_matrix`: the results of
  `~psfdeconv.evaluate.evaluate_predictions` or
  `~psfdeconv.evaluate.evaluate_simulation`, or of a report read back with
  `~psfdeconv.evaluate.read_report`.

Every ``plot_*`` function returns a `matplotlib.figure.Figure` made with
the object API, so no GUI backend (and no pyplot state) is needed; pass
``ax`` or ``fig`` to draw into your own. `save_figure` writes a PNG
atomically and refuses to replace an existing file unless asked to, as
every writer of the package does; `write_run_plots`,
`write_evaluation_plots` and `write_training_plots` write the standard
figures of ``psfdeconv run``, ``evaluate`` and ``train``.

matplotlib is imported inside the functions, so that ``import psfdeconv``
and ``import psfdeconv.plotting`` stay light.
"""

import json
from pathlib import Path

import numpy as np

from .evaluate.metrics import CLASS_NAMES
from .exceptions import InvalidInputError, ShapeMismatchError

__all__ = [
    'plot_stamp_grid',
    'plot_catalog_overview',
    'plot_training_history',
    'plot_flux_histogram',
    'plot_ellipticity_correlations',
    'plot_confusion_matrix',
    'save_figure',
    'write_run_plots',
    'write_evaluation_plots',
    'write_training_plots',
]

#: SNR bins of the correlation table, in plotting order.
_SNR_BINS = ('low', 'medium', 'high', 'all')
#: Side of one stamp panel, inches.
_PANEL_INCHES = 1.5
#: Resolution of the figures, dots per inch (a PNG is figsize x dpi pixels).
DEFAULT_DPI = 100

# File names written by the write_*_plots helpers.
RUN_PLOTS = ('catalog_overview.png', 'stamps.png')
EVALUATION_PLOTS = ('flux_histogram.png', 'ellipticity_correlations.png',
                    'confusion_matrix.png')
TRAINING_PLOTS = ('training_history.png',)


# --- helpers -----------------------------------------------------------------------------

def _new_figure(fig, figsize):
    """``fig`` if given, else a new constrained-layout figure of ``figsize`` inches."""
    if fig is not None:
        return fig
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DEFAULT_DPI, layout='constrained')


def _values(column):
    """A column or array as a float ndarray, without its unit."""
    return np.asarray(getattr(column, 'value', column), dtype=float)


def _unit_label(column):
    unit = getattr(column, 'unit', None)
    return '' if unit is None or str(unit) == '' else f' [{unit}]'


def _display_limits(images):
    """Colour limits that show faint structure without clipping the peak."""
    finite = np.concatenate([np.ravel(image)[np.isfinite(np.ravel(image))]
                             for image in images])
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, 0.5), finite.max()
    return (low, high) if high > low else (low, low + 1.0)


def _check_images(array, name):
    array = np.asarray(array, dtype=float)
    if array.ndim != 4:
        raise ShapeMismatchError(
            f'{name} must have shape (n, n_bands, ny, nx), got {array.shape}; add a band '
            f'axis with {name}[:, None] for single-band stamps.')
    return array


def _pick_rows(n_objects, snr, rows_per_bin, n_rows):
    """Object indices and row labels: per SNR tertile if ``snr`` is given."""
    if snr is None:
        rows = np.arange(min(n_rows, n_objects))
        return rows, [f'#{i}' for i in rows]
    usable = np.flatnonzero(np.isfinite(snr) & (snr > 0))
    if usable.size == 0:
        raise InvalidInputError('snr has no finite positive value; pass snr=None to '
                                'show the first objects instead.')
    ordered = usable[np.argsort(snr[usable], kind='stable')]
    rows, labels = [], []
    for name, members in zip(('low', 'medium', 'high'), np.array_split(ordered, 3),
                             strict=True):
        if members.size == 0:
            continue
        # The centres of rows_per_bin equal slices of the bin (its median for one row).
        take = np.unique(np.floor((np.arange(rows_per_bin) + 0.5) * members.size
                                  / rows_per_bin).astype(int))
        for k in take:
            index = int(members[k])
            rows.append(index)
            labels.append(f'{name} SNR\n#{index}, SNR {snr[index]:.3g}')
    return np.asarray(rows), labels


def _load_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'{what} {path} does not exist.')
    return json.loads(path.read_text())


# --- stamps --------------------------------------------------------------------------------

def plot_stamp_grid(observed, psfs, deconvolved, *, pixel_scale=None, truth=None, snr=None,
                    band=0, indices=None, rows_per_bin=1, n_rows=4, stretch='asinh',
                    feature_options=None, fig=None):
    """Observed stamps, input channels, truth and deconvolved images (paper Figure 5).

    One row per object, one band. The columns are the observed stamp
    :math:`N`, the network's input channels PSF (:math:`N \\ast P`), iPSF
    (:math:`N \\ast P^{-1}`) and iPSF1 (:math:`N \\ast P^{-1} \\ast G`,
    from `~psfdeconv.features.make_channels`), the truth when known and
    the deconvolved image. The truth and the deconvolved image share one
    colour scale (they are in the same flux units); every other panel has
    its own, from its 0.5th percentile to its maximum.

    Parameters
    ----------
    observed : array_like or None
        Observed stamps, shape (n, n_bands, ny, nx); `None` leaves the
        column out (then ``psfs`` must be `None` too).
    psfs : array_like or None
        Centred, odd-sized PSFs, shape (n, n_bands, py, px), any positive
        sum; `None` leaves the three channel columns out.
    deconvolved : array_like
        Deconvolved images, shape (n, n_bands, ny, nx), e.g. from
        `~psfdeconv.deconvolve.deconvolve_stamps`.
    pixel_scale : float or array_like, optional
        Arcsec/pixel, scalar or (n,); needed with ``psfs`` (the iPSF1
        Gaussian is 1 arcsec).
    truth : array_like, optional
        True images, shape (n, n_bands, ny, nx), for simulations.
    snr : array_like, optional
        SNR of each object, (n,) or (n, n_bands) (the ``band`` column is
        used): the objects are split into low/medium/high tertiles of the
        finite positive values (blanks drop out) and ``rows_per_bin``
        objects are shown per bin. Without it, the first ``n_rows``
        objects.
    band : int, optional
        Index of the band shown.
    indices : sequence of int, optional
        Show exactly these objects (overrides ``snr`` and ``n_rows``).
    rows_per_bin : int, optional
        Objects per SNR bin, evenly spaced within the bin.
    n_rows : int, optional
        Objects shown without ``snr``.
    stretch : {'asinh', 'linear'}, optional
        Colour stretch of every panel; ``'asinh'`` shows the faint
        outskirts and the noise next to the peak.
    feature_options : dict, optional
        Regularisation options of `~psfdeconv.features.make_channels`
        (e.g. a model's ``feature_options``).
    fig : `matplotlib.figure.Figure`, optional
        An empty figure to draw on.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the arrays are not 4-D or differ in (n, n_bands, ny, nx).
    psfdeconv.exceptions.InvalidInputError
        If ``band`` or ``indices`` are out of range, ``psfs`` come without
        ``observed`` or ``pixel_scale``, or ``snr`` has no usable value.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.plotting import plot_stamp_grid
    >>> rng = np.random.default_rng(0)
    >>> observed = rng.normal(size=(3, 1, 32, 32))
    >>> psfs = np.zeros((3, 1, 5, 5)); psfs[..., 2, 2] = 1.0
    >>> fig = plot_stamp_grid(observed, psfs, np.abs(observed), pixel_scale=0.2)
    >>> len(fig.axes)  # 3 rows x (observed, PSF, iPSF, iPSF1, deconvolved)
    15
    """
    from astropy.visualization import AsinhStretch, ImageNormalize, LinearStretch

    from .features import KINDS, make_channels

    if stretch not in ('asinh', 'linear'):
        raise InvalidInputError(f"stretch must be 'asinh' or 'linear', got {stretch!r}.")
    deconvolved = _check_images(deconvolved, 'deconvolved')
    n, n_bands = deconvolved.shape[:2]
    arrays = {'deconvolved': deconvolved}
    for name, value in (('observed', observed), ('truth', truth)):
        if value is not None:
            arrays[name] = _check_images(value, name)
            if arrays[name].shape != deconvolved.shape:
                raise ShapeMismatchError(
                    f'{name} has shape {arrays[name].shape} but deconvolved has shape '
                    f'{deconvolved.shape}; they must match.')
    if psfs is not None:
        if observed is None:
            raise InvalidInputError('psfs need the observed stamps to make the input '
                                    'channels; give observed, or psfs=None.')
        if pixel_scale is None:
            raise InvalidInputError('pixel_scale (arcsec/pixel) is needed with psfs: the '
                                    'iPSF1 channel is matched to a 1-arcsec Gaussian.')
        psfs = _check_images(psfs, 'psfs')
        if psfs.shape[:2] != (n, n_bands):
            raise ShapeMismatchError(f'psfs must have shape ({n}, {n_bands}, py, px) to '
                                     f'match the stamps, got {psfs.shape}.')
    if not 0 <= band < n_bands:
        raise InvalidInputError(f'band must be an index in 0..{n_bands - 1}, got {band}.')

    if indices is not None:
        rows = np.asarray(indices, dtype=int).ravel()
        if rows.size == 0 or rows.min() < -n or rows.max() >= n:
            raise InvalidInputError(f'indices must select objects among the {n} given, '
                                    f'got {rows.tolist()}.')
        labels = [f'#{i % n}' for i in rows]
    else:
        if snr is not None:
            snr = np.asarray(getattr(snr, 'value', snr), dtype=float)
            snr = snr[:, band] if snr.ndim == 2 else snr
            if snr.shape != (n,):
                raise ShapeMismatchError(f'snr must have shape ({n},) or ({n}, {n_bands}), '
                                         f'got {snr.shape}.')
        rows, labels = _pick_rows(n, snr, max(int(rows_per_bin), 1), max(int(n_rows), 1))

    columns = []  # (title, images of the rows, shared-scale group)
    if observed is not None:
        columns.append(('observed', arrays['observed'][rows, band], None))
    if psfs is not None:
        scale = np.broadcast_to(np.asarray(getattr(pixel_scale, 'value', pixel_scale),
                                           dtype=float), (n,))
        unit_psfs = psfs[rows] / psfs[rows].sum(axis=(-2, -1), keepdims=True)
        channels = make_channels(arrays['observed'][rows], unit_psfs,
                                 pixel_scale=scale[rows], **(feature_options or {}))
        titles = {'psf': 'PSF channel', 'ipsf': 'iPSF channel', 'ipsf1': 'iPSF1 channel'}
        for k, kind in enumerate(KINDS):
            columns.append((titles[kind], channels[:, k, band], None))
    if truth is not None:
        columns.append(('truth', arrays['truth'][rows, band], 'model'))
    columns.append(('deconvolved', deconvolved[rows, band], 'model'))

    shared = [images for _, images, group in columns if group == 'model']
    shared_limits = [_display_limits([row[i] for row in shared]) for i in range(len(rows))]

    fig = _new_figure(fig, (_PANEL_INCHES * len(columns),
                            _PANEL_INCHES * len(rows) + 0.3))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i in range(len(rows)):
        for j, (title, images, group) in enumerate(columns):
            ax = axes[i, j]
            vmin, vmax = (shared_limits[i] if group == 'model'
                          else _display_limits([images[i]]))
            norm = ImageNormalize(vmin=vmin, vmax=vmax,
                                  stretch=AsinhStretch(0.1) if stretch == 'asinh'
                                  else LinearStretch())
            ax.imshow(images[i], origin='lower', cmap='viridis', norm=norm,
                      interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize='small')
        axes[i, 0].set_ylabel(labels[i], fontsize='x-small')
    fig.suptitle(f'band {band}', fontsize='small')
    return fig


# --- catalogue -----------------------------------------------------------------------------

def _catalog_band(catalog, band):
    """The band to plot and the bands the catalogue has."""
    bands = list(catalog.meta.get('bands') or
                 [name[len('flux_corrected_'):] for name in catalog.colnames
                  if name.startswith('flux_corrected_')])
    if not bands:
        raise InvalidInputError('catalog has no flux_corrected_<band> column; pass the '
                                'table of psfdeconv.pipeline.deconvolve_catalog.')
    if band is None:
        band = catalog.meta.get('reference_band') or bands[0]
    if band not in bands:
        raise InvalidInputError(f'band {band!r} is not in the catalog, whose bands are '
                                f'{bands}.')
    return band


def _require_columns(table, names, hint):
    missing = [name for name in names if name not in table.colnames]
    if missing:
        raise InvalidInputError(f'the table lacks the column(s) {missing}; {hint}')


def _image_array(image):
    """Pixels of an array or NDData, masked pixels as NaN."""
    data = np.array(getattr(image, 'data', image), dtype=float)
    mask = getattr(image, 'mask', None)
    if mask is not None and data.shape == np.shape(mask):
        data[np.asarray(mask, dtype=bool)] = np.nan
    if data.ndim != 2:
        raise ShapeMismatchError(f'image must be 2-D (one band of an exposure), got shape '
                                 f'{data.shape}.')
    return data


def plot_catalog_overview(catalog, *, image=None, band=None, ellipticity='moments',
                          whisker_length=None, fig=None):
    """Fluxes and shapes of a deconvolved catalogue at a glance.

    Left: the ratio of the flux after the model's bias correction,
    ``flux_corrected_<band>``, to the flux from the amplitude refit,
    ``flux_<band>``, against the latter (positive fluxes; the dashed line
    is no correction). Right: one
    whisker per source at its ``x``, ``y`` position, of length
    proportional to the ellipticity :math:`|e|` and at the position angle
    :math:`\\frac{1}{2}\\arctan(e_2/e_1)`, over the exposure when
    ``image`` is given.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        The table of `~psfdeconv.pipeline.deconvolve_catalog` (or
        `~psfdeconv.io.read_catalog`): columns ``x``, ``y`` (pixels
        of the reference band), ``flux_<band>``, ``flux_corrected_<band>``
        and ``e1_<band>``, ``e2_<band>`` (or ``hsm_e1_<band>``,
        ``hsm_e2_<band>``).
    image : `~numpy.ndarray` or `~astropy.nddata.NDData`, optional
        The reference band's exposure (2-D, the pixel grid of ``x``,
        ``y``), shown with a zscale stretch; masked pixels are blank.
    band : str, optional
        The band whose fluxes and shapes are shown; default the
        catalogue's ``meta['reference_band']``, else its first band.
    ellipticity : {'moments', 'hsm'}, optional
        Unweighted moments (``e1_<band>``, the paper's) or GalSim HSM
        adaptive moments (``hsm_e1_<band>``).
    whisker_length : float, optional
        Whisker length in pixels for :math:`|e| = 1`; default 10% of the
        image's (or the sources' spread's) larger side.
    fig : `matplotlib.figure.Figure`, optional
        An empty figure to draw on.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If a column is missing, ``band`` is not in the catalogue or
        ``ellipticity`` is unknown.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import QTable
    >>> from psfdeconv.plotting import plot_catalog_overview
    >>> catalog = QTable({'x': [10.0, 40.0], 'y': [20.0, 30.0],
    ...                   'flux_r': [100.0, 250.0], 'flux_corrected_r': [104.0, 255.0],
    ...                   'e1_r': [0.2, -0.1], 'e2_r': [0.0, 0.3]}, meta={'bands': ['r']})
    >>> fig = plot_catalog_overview(catalog, image=np.zeros((50, 60)))
    >>> [ax.get_title(loc='left') for ax in fig.axes[:2]]
    ['r: flux bias correction', 'r: ellipticity (moments)']
    """
    from astropy.visualization import (
        AsinhStretch,
        AsymmetricPercentileInterval,
        ImageNormalize,
    )
    from matplotlib.ticker import NullFormatter

    if ellipticity not in ('moments', 'hsm'):
        raise InvalidInputError(f"ellipticity must be 'moments' or 'hsm', got "
                                f'{ellipticity!r}.')
    band = _catalog_band(catalog, band)
    prefix = 'hsm_' if ellipticity == 'hsm' else ''
    flux_name, corrected_name = f'flux_{band}', f'flux_corrected_{band}'
    e1_name, e2_name = f'{prefix}e1_{band}', f'{prefix}e2_{band}'
    _require_columns(catalog, ('x', 'y', flux_name, corrected_name, e1_name, e2_name),
                     'pass the table of psfdeconv.pipeline.deconvolve_catalog.')

    fig = _new_figure(fig, (10.0, 4.6))
    ax_flux, ax_shape = fig.subplots(1, 2, width_ratios=(1.0, 1.3))

    flux, corrected = _values(catalog[flux_name]), _values(catalog[corrected_name])
    positive = (flux > 0) & (corrected > 0)
    ax_flux.scatter(flux[positive], corrected[positive] / flux[positive], s=12, alpha=0.7)
    ax_flux.axhline(1.0, color='k', ls='--', lw=0.8, label='no correction')
    if positive.any():
        ax_flux.set_xscale('log')
        # Minor tick labels of a log axis spanning less than a decade overlap.
        ax_flux.xaxis.set_minor_formatter(NullFormatter())
    ax_flux.legend(loc='best', fontsize='small')
    left_out = int(np.sum(~positive))
    ax_flux.set_xlabel(f'{flux_name}{_unit_label(catalog[flux_name])}')
    ax_flux.set_ylabel(f'{corrected_name} / {flux_name}')
    ax_flux.set_title(f'{band}: flux bias correction', loc='left', fontsize='medium')
    if left_out:
        ax_flux.text(0.98, 0.02, f'{left_out} non-positive or NaN left out',
                     transform=ax_flux.transAxes, ha='right', va='bottom',
                     fontsize='x-small')

    x, y = _values(catalog['x']), _values(catalog['y'])
    e1, e2 = _values(catalog[e1_name]), _values(catalog[e2_name])
    if image is not None:
        pixels = _image_array(image)
        finite = pixels[np.isfinite(pixels)]
        # An asinh stretch from the sky to the brightest sources shows the
        # galaxies' shapes under their whiskers (zscale would saturate them).
        norm = ImageNormalize(finite if finite.size else np.zeros(1),
                              interval=AsymmetricPercentileInterval(1.0, 99.9),
                              stretch=AsinhStretch(0.05))
        ax_shape.imshow(pixels, origin='lower', cmap='gray', norm=norm,
                        interpolation='nearest')
        extent = max(pixels.shape)
    else:
        ax_shape.set_aspect('equal')
        finite = np.isfinite(x) & np.isfinite(y)
        spread = np.ptp(np.concatenate([x[finite], y[finite]])) if finite.any() else 0.0
        extent = max(spread, 10.0)
    length = 0.1 * extent if whisker_length is None else float(whisker_length)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(e1) & np.isfinite(e2)
    modulus = np.hypot(e1[ok], e2[ok])
    angle = 0.5 * np.arctan2(e2[ok], e1[ok])
    # Headless arrows centred on the source, length |e| x whisker_length pixels.
    whiskers = ax_shape.quiver(x[ok], y[ok], modulus * np.cos(angle), modulus * np.sin(angle),
                               angles='xy', scale_units='xy', scale=1.0 / length,
                               pivot='middle', headwidth=0, headlength=0, headaxislength=0,
                               color='tab:orange', width=0.003)
    ax_shape.quiverkey(whiskers, 0.97, 1.03, 0.5, '|e| = 0.5', labelpos='W',
                       coordinates='axes', fontproperties={'size': 'x-small'})
    if image is None and ok.any():
        margin = 0.6 * length
        ax_shape.set_xlim(x[ok].min() - margin, x[ok].max() + margin)
        ax_shape.set_ylim(y[ok].min() - margin, y[ok].max() + margin)
    ax_shape.set_xlabel('x [pix]')
    ax_shape.set_ylabel('y [pix]')
    ax_shape.set_title(f'{band}: ellipticity ({ellipticity})', loc='left', fontsize='medium')
    return fig


# --- training ------------------------------------------------------------------------------

def _history_list(history):
    """The per-epoch list from a list, a state, a card or a JSON file of them."""
    if isinstance(history, (str, Path)):
        history = _load_json(history, 'history file')
    if isinstance(history, dict):
        if 'training' in history:  # a model card
            history = history['training']
        if 'history' not in history:
            raise InvalidInputError("history must be a list of per-epoch dicts, a training "
                                    "state (state.json) or a model card; this dict has "
                                    f"neither 'history' nor 'training' (keys "
                                    f"{sorted(history)}).")
        history = history['history']
    history = list(history)
    if not history or not all(isinstance(row, dict) and 'loss' in row for row in history):
        raise InvalidInputError("history must be a non-empty list of dicts with 'epoch', "
                                "'loss' and 'val_loss', as in a training run's state.json.")
    return history


def plot_training_history(history, *, ax=None):
    """Training and validation loss per epoch.

    Parameters
    ----------
    history : list of dict, dict, str or `~pathlib.Path`
        The per-epoch records (``epoch``, ``loss``, ``val_loss``) of a
        training run: the ``history`` list itself, a run's ``state.json``
        (or its path), or a model card (or its path), whose
        ``card['training']['history']`` is used.
    ax : `matplotlib.axes.Axes`, optional
        Axes to draw into; a new figure if `None`.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``history`` holds no per-epoch record.

    Examples
    --------
    >>> from psfdeconv.plotting import plot_training_history
    >>> history = [{'epoch': 1, 'loss': 0.0046, 'val_loss': 0.0022},
    ...            {'epoch': 2, 'loss': 0.0022, 'val_loss': 0.0021}]
    >>> fig = plot_training_history(history)
    >>> [line.get_label() for line in fig.axes[0].get_lines()][:2]
    ['loss', 'val_loss']
    """
    from matplotlib.ticker import MaxNLocator

    history = _history_list(history)
    epochs = np.array([row.get('epoch', k + 1) for k, row in enumerate(history)], dtype=float)
    loss = np.array([row['loss'] for row in history], dtype=float)
    val_loss = np.array([np.nan if row.get('val_loss') is None else row['val_loss']
                         for row in history], dtype=float)

    fig = _new_figure(None, (5.5, 3.8)) if ax is None else ax.figure
    if ax is None:
        ax = fig.subplots()
    ax.plot(epochs, loss, 'o-', label='loss')
    ax.plot(epochs, val_loss, 's-', label='val_loss')
    if np.isfinite(val_loss).any():
        best = int(np.nanargmin(val_loss))
        ax.plot(epochs[best], val_loss[best], '*', color='k', markersize=12,
                label=f'best (epoch {epochs[best]:.0f})')
    values = np.concatenate([loss, val_loss])
    if np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale('log')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel('loss (binary cross-entropy)')
    ax.legend(fontsize='small')
    ax.set_title('training history')
    return fig


# --- evaluation ----------------------------------------------------------------------------

def _results_table(results, name):
    if not isinstance(results, dict) or name not in results:
        raise InvalidInputError(
            f"results must be the dict of psfdeconv.evaluate.evaluate_predictions (or "
            f"read_report) with a {name!r} entry; got "
            f"{sorted(results) if isinstance(results, dict) else type(results).__name__}.")
    return results[name]


def _methods(available, methods):
    available = list(dict.fromkeys(available))
    if methods is None:
        return available
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in available]
    if unknown or not methods:
        raise InvalidInputError(f'methods {unknown or methods} are not in the results, '
                                f'which hold {available}.')
    return methods


def plot_flux_histogram(results, *, methods=None, band=None, truth_flux=None, bins=40,
                        percent_range=(-60.0, 60.0), fig=None):
    """2-D histograms of measured against true flux, one panel per method.

    Non-blank objects only. With ``truth_flux`` the axes are the true flux
    and the measured flux :math:`M_0^{\\rm true}(1 + d/100)`, with
    :math:`d` the ``d_flux_<band>`` column (percent) of the objects table,
    both logarithmic, and the dashed line is equality. Without it the
    objects table holds no absolute flux, so the axes are the true
    matched-filter SNR (``snr_<band>``, present when the evaluation had the
    noise levels, as `~psfdeconv.evaluate.evaluate_simulation` does) and
    the relative flux error :math:`d` in percent, with the median per SNR
    bin as a line: the flux bias of paper Appendix B as a function of SNR.

    Parameters
    ----------
    results : dict
        Output of `~psfdeconv.evaluate.evaluate_predictions` or
        `~psfdeconv.evaluate.read_report`; its ``'objects'`` table is used.
    methods : str or sequence of str, optional
        The methods to show; default all of the objects table.
    band : str, optional
        A band name (``'b0'``, ...); default all bands pooled.
    truth_flux : array_like, optional
        True flux of each object, shape (n, n_bands) (or (n,) with
        ``band``), in the order of the objects table, e.g.
        ``image_moments(truth)['flux']``.
    bins : int, optional
        Histogram bins per axis.
    percent_range : tuple of float, optional
        Range of the relative flux error shown, percent (SNR mode).
    fig : `matplotlib.figure.Figure`, optional
        An empty figure to draw on.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the objects table lacks the columns, or a method or band is
        unknown.
    psfdeconv.exceptions.ShapeMismatchError
        If ``truth_flux`` does not match the objects.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import QTable
    >>> from psfdeconv.plotting import plot_flux_histogram
    >>> rng = np.random.default_rng(0)
    >>> objects = QTable({'method': ['model'] * 50, 'is_blank': np.zeros(50, bool),
    ...                   'd_flux_b0': rng.normal(0, 5, 50),
    ...                   'snr_b0': rng.uniform(5, 300, 50)})
    >>> fig = plot_flux_histogram({'objects': objects})
    >>> fig.axes[0].get_xlabel()
    'true SNR'
    """
    from matplotlib.colors import LogNorm

    objects = _results_table(results, 'objects')
    methods = _methods(np.asarray(objects['method']).tolist(), methods)
    bands = [name[len('d_flux_'):] for name in objects.colnames if name.startswith('d_flux_')]
    if band is not None and band not in bands:
        raise InvalidInputError(f'band {band!r} is not in the results, whose bands are '
                                f'{bands}.')
    chosen = bands if band is None else [band]
    if not chosen:
        raise InvalidInputError('the objects table has no d_flux_<band> column; pass the '
                                'results of psfdeconv.evaluate.evaluate_predictions.')
    if truth_flux is None:
        _require_columns(objects, [f'snr_{b}' for b in chosen],
                         'evaluate with noise_sigma (evaluate_predictions) to get the SNR, '
                         'or give truth_flux.')

    def select(method):
        rows = (np.asarray(objects['method']) == method)
        table = objects[rows]
        source = ~np.asarray(table['is_blank'], dtype=bool)
        d = np.stack([_values(table[f'd_flux_{b}']) for b in chosen], axis=1)
        if truth_flux is None:
            x = np.stack([_values(table[f'snr_{b}']) for b in chosen], axis=1)
            y = d
        else:
            flux = np.asarray(getattr(truth_flux, 'value', truth_flux), dtype=float)
            if flux.ndim == 1:
                flux = flux[:, None]
            if flux.shape[1] == len(bands) and len(chosen) < len(bands):
                flux = flux[:, [bands.index(b) for b in chosen]]
            if flux.shape != d.shape:
                raise ShapeMismatchError(
                    f'truth_flux has shape {np.shape(truth_flux)} but the {method!r} rows '
                    f'need ({len(table)}, {len(bands)}) (or ({len(table)},) with band).')
            x, y = flux, flux * (1.0 + d / 100.0)
        x, y = x[source].ravel(), y[source].ravel()
        keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
        if truth_flux is not None:
            keep &= y > 0
        return x[keep], y[keep]

    data = {method: select(method) for method in methods}
    x_all = np.concatenate([x for x, _ in data.values()])
    y_all = np.concatenate([y for _, y in data.values()])
    if x_all.size == 0:
        raise InvalidInputError('no non-blank object with a finite positive flux or SNR '
                                'to histogram.')
    x_edges = np.geomspace(x_all.min(), x_all.max() * 1.0001, bins + 1)
    if truth_flux is None:
        y_edges = np.linspace(*percent_range, bins + 1)
    else:
        y_edges = np.geomspace(min(x_all.min(), y_all.min()),
                               max(x_all.max(), y_all.max()) * 1.0001, bins + 1)
        x_edges = y_edges

    fig = _new_figure(fig, (3.6 * len(methods) + 0.8, 3.6))
    axes = fig.subplots(1, len(methods), sharex=True, sharey=True, squeeze=False)[0]
    counts = {m: np.histogram2d(x, y, bins=(x_edges, y_edges))[0] for m, (x, y) in data.items()}
    peak = max(max(c.max() for c in counts.values()), 1.0)
    norm = LogNorm(vmin=1.0, vmax=max(peak, 2.0))
    mesh = None
    for ax, method in zip(axes, methods, strict=True):
        x, y = data[method]
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_equal(counts[method].T, 0),
                             norm=norm, cmap='viridis')
        ax.set_xscale('log')
        if truth_flux is None:
            ax.axhline(0.0, color='k', lw=0.8, ls='--')
            index = np.digitize(x, x_edges) - 1
            centres, medians = [], []
            for k in range(bins):
                members = y[index == k]
                if members.size >= 10:
                    centres.append(np.sqrt(x_edges[k] * x_edges[k + 1]))
                    medians.append(np.median(members))
            ax.plot(centres, medians, color='tab:red', lw=1.5, label='median')
            ax.set_ylim(*percent_range)
            outside = int(np.sum((y < percent_range[0]) | (y > percent_range[1])))
            ax.set_title(f'{method}: {outside} of {y.size} off the plot', fontsize='small')
        else:
            ax.set_yscale('log')
            ax.plot(x_edges[[0, -1]], x_edges[[0, -1]], 'k--', lw=0.8)
            ax.set_title(method, fontsize='small')
        ax.set_xlabel('true SNR' if truth_flux is None else 'true flux')
    axes[0].set_ylabel('100 (measured - true) / true flux [%]' if truth_flux is None
                       else 'measured flux')
    if truth_flux is None:
        axes[0].legend(loc='upper right', fontsize='x-small')
    fig.colorbar(mesh, ax=list(axes), label='objects', shrink=0.9)
    return fig


def plot_ellipticity_correlations(results, *, methods=None, yscale='auto', fig=None):
    """Ellipticity correlations with the PSF and with the truth per SNR bin (paper Figure 7).

    Left: :math:`C_{\\rm PSF}`, the spin-2 slope of the measured
    ellipticities on the PSF's (ideal 0; the truth's own value, in grey,
    is the null level); right: :math:`C_{\\rm true}`, the slope on the true
    ellipticities (ideal 1), both per SNR (true flux) bin and over all
    objects, with bootstrap error bars (see
    `~psfdeconv.evaluate.ellipticity_correlation`).

    Parameters
    ----------
    results : dict
        Output of `~psfdeconv.evaluate.evaluate_predictions` or
        `~psfdeconv.evaluate.read_report`; its ``'correlations'`` table is used.
    methods : str or sequence of str, optional
        The methods to show (``'truth'`` is the null level); default all.
    yscale : {'auto', 'linear', 'symlog'}, optional
        ``'auto'`` is linear unless a point or error bar passes 3 in
        absolute value (as the unweighted moments of noisy baselines do),
        then symmetric-logarithmic with a linear range of +-1.
    fig : `matplotlib.figure.Figure`, optional
        An empty figure to draw on.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If there is no correlations table or a method is unknown.

    Examples
    --------
    >>> from astropy.table import QTable
    >>> from psfdeconv.plotting import plot_ellipticity_correlations
    >>> table = QTable(rows=[('truth', 'low', 9, 0.01, 0.05, 1.0, 0.0),
    ...                      ('model', 'low', 9, 0.03, 0.02, 0.9, 0.05)],
    ...                names=('method', 'snr_bin', 'n', 'c_psf', 'c_psf_err',
    ...                       'c_true', 'c_true_err'))
    >>> fig = plot_ellipticity_correlations({'correlations': table})
    >>> fig.axes[1].get_title()
    'correlation with the true ellipticity'
    """
    if yscale not in ('auto', 'linear', 'symlog'):
        raise InvalidInputError(f"yscale must be 'auto', 'linear' or 'symlog', got "
                                f'{yscale!r}.')
    table = _results_table(results, 'correlations')
    methods = _methods(np.asarray(table['method']).tolist(), methods)
    method_column = np.asarray(table['method'])
    bin_column = np.asarray(table['snr_bin'])
    snr_bins = [b for b in _SNR_BINS if b in set(bin_column.tolist())]

    fig = _new_figure(fig, (10.0, 4.0))
    axes = fig.subplots(1, 2)
    panels = (('c_psf', r'$C_{\rm PSF}$', 0.0, 'ideal 0'),
              ('c_true', r'$C_{\rm true}$', 1.0, 'ideal 1'))
    for ax, (column, label, ideal, ideal_label) in zip(axes, panels, strict=True):
        shown = [m for m in methods if not (column == 'c_true' and m == 'truth')]
        width = 0.6 / max(len(shown), 1)
        extreme = abs(ideal)
        for k, method in enumerate(shown):
            positions, values, errors = [], [], []
            for b, bin_name in enumerate(snr_bins):
                rows = np.flatnonzero((method_column == method) & (bin_column == bin_name))
                if rows.size:
                    positions.append(b + (k - (len(shown) - 1) / 2) * width)
                    values.append(float(table[column][rows[0]]))
                    errors.append(float(table[f'{column}_err'][rows[0]]))
            values, errors = np.array(values), np.nan_to_num(np.array(errors))
            style = dict(color='0.5', marker='s') if method == 'truth' else dict(marker='o')
            ax.errorbar(positions, values, yerr=errors, ls='none', capsize=3,
                        label='truth (null level)' if method == 'truth' else method, **style)
            finite = np.isfinite(values)
            if finite.any():
                extreme = max(extreme, np.max(np.abs(values[finite]) + errors[finite]))
        ax.axhline(ideal, color='k', lw=0.8, ls='--', label=ideal_label)
        if yscale == 'symlog' or (yscale == 'auto' and extreme > 3):
            ax.set_yscale('symlog', linthresh=1.0)
        ax.set_xticks(range(len(snr_bins)), [f'{b} SNR' if b != 'all' else 'all'
                                             for b in snr_bins])
        ax.set_ylabel(label)
        ax.legend(fontsize='x-small')
    axes[0].set_title('correlation with the PSF ellipticity', fontsize='small')
    axes[1].set_title('correlation with the true ellipticity', fontsize='small')
    return fig


def plot_confusion_matrix(results, *, methods=None, fig=None):
    """Blank / low / medium / high classification matrices, one panel per method.

    Rows are the true class (from the true flux), columns the class of the
    measured flux with the same bin edges (paper Table 3,
    `~psfdeconv.evaluate.confusion_matrix`). The colour is the fraction of
    the row (recall); the numbers are object counts.

    Parameters
    ----------
    results : dict
        Output of `~psfdeconv.evaluate.evaluate_predictions` or
        `~psfdeconv.evaluate.read_report`; its ``'confusion'`` dict (method -> 4x4 counts) is
        used.
    methods : str or sequence of str, optional
        The methods to show; default all.
    fig : `matplotlib.figure.Figure`, optional
        An empty figure to draw on.

    Returns
    -------
    `matplotlib.figure.Figure`

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If there is no confusion entry, a matrix is not 4x4 or a method is
        unknown.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.plotting import plot_confusion_matrix
    >>> matrix = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 0, 10, 0], [0, 0, 1, 9]])
    >>> fig = plot_confusion_matrix({'confusion': {'model': matrix}})
    >>> fig.axes[0].get_title()
    'model (accuracy 0.90)'
    """
    confusion = _results_table(results, 'confusion')
    methods = _methods(list(confusion), methods)
    fig = _new_figure(fig, (3.3 * len(methods) + 0.8, 3.4))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods, strict=True):
        counts = np.asarray(confusion[method])
        if counts.shape != (4, 4):
            raise InvalidInputError(f'confusion[{method!r}] must be a 4x4 matrix, got shape '
                                    f'{counts.shape}.')
        totals = counts.sum(axis=1, keepdims=True)
        fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        image = ax.imshow(fraction, cmap='Blues', vmin=0.0, vmax=1.0)
        for i in range(4):
            for j in range(4):
                ax.text(j, i, f'{int(counts[i, j])}', ha='center', va='center',
                        fontsize='small', color='white' if fraction[i, j] > 0.6 else 'black')
        ax.set_xticks(range(4), CLASS_NAMES, fontsize='small')
        ax.set_yticks(range(4), CLASS_NAMES, fontsize='small')
        ax.set_xlabel('measured class')
        accuracy = np.trace(counts) / counts.sum() if counts.sum() else np.nan
        ax.set_title(f'{method} (accuracy {accuracy:.2f})', fontsize='small')
    axes[0].set_ylabel('true class')
    fig.colorbar(image, ax=list(axes), label='fraction of the true class', shrink=0.9)
    return fig


# --- files ---------------------------------------------------------------------------------

def save_figure(fig, path, *, overwrite=False, dpi=None):
    """Write a figure to a PNG file, atomically.

    The PNG is written to a temporary file beside ``path`` and renamed
    into place (`psfdeconv.io.atomic_path`), so a crash leaves no half
    image.

    Parameters
    ----------
    fig : `matplotlib.figure.Figure`
        The figure.
    path : str or `~pathlib.Path`
        The PNG file (written as PNG whatever its extension).
    overwrite : bool, optional
        Replace an existing file.
    dpi : float, optional
        Resolution; default the figure's (100 for the figures of this
        module), so the PNG has ``figsize * dpi`` pixels.

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from psfdeconv.plotting import plot_training_history, save_figure
    >>> fig = plot_training_history([{'epoch': 1, 'loss': 0.5, 'val_loss': 0.4}])
    >>> path = save_figure(fig, pathlib.Path(tempfile.mkdtemp()) / 'history.png')
    >>> path.stat().st_size > 0
    True
    """
    from . import __version__
    from .io import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        # The temporary name ends in .tmp: the format must be explicit.
        fig.savefig(tmp, format='png', dpi=fig.dpi if dpi is None else dpi,
                    metadata={'Software': f'psfdeconv {__version__}'})
    return path


def _write_all(out_dir, figures, overwrite):
    """Check every target first (nothing written if one exists), then write.

    ``figures`` maps file names to callables making the figures, so a figure
    is only drawn once its file is known to be writable.
    """
    from .io import check_writable

    out_dir = Path(out_dir)
    targets = {name: out_dir / name for name in figures}
    for target in targets.values():
        check_writable(target, overwrite=overwrite)
    written = []
    for name, make in figures.items():
        written.append(save_figure(make(), targets[name], overwrite=overwrite))
    return written


def _observed_cutouts(exposure, stamps, size):
    """Reference-band cutouts of the exposure at each stamp's ``meta['origin']``
    (NaN off the image), block-summed like the stamp where it was cut from a
    block-summed exposure (``meta['block_factor']``)."""
    from astropy.nddata import block_reduce

    pixels = _image_array(exposure)
    cutouts = np.full((len(stamps), size, size), np.nan)
    for k, stamp in enumerate(stamps):
        factor = int(stamp.meta.get('block_factor', 1) or 1)
        x0, y0 = (factor * int(v) for v in stamp.meta.get('origin', (0, 0)))
        side = factor * size
        region = np.full((side, side), np.nan)
        ys = slice(max(y0, 0), min(y0 + side, pixels.shape[0]))
        xs = slice(max(x0, 0), min(x0 + side, pixels.shape[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            region[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = pixels[ys, xs]
        cutouts[k] = region if factor == 1 else block_reduce(region, factor, np.sum)
    return cutouts


def write_run_plots(out_dir, catalog, *, stamps=None, exposure=None, overwrite=False):
    """Write the figures of a ``psfdeconv run``.

    ``catalog_overview.png`` (`plot_catalog_overview` of the reference
    band, over the exposure when given) and, with ``stamps``,
    ``stamps.png`` (`plot_stamp_grid` of the reference band: observed
    cutouts of the exposure when given, and the deconvolved stamps, two
    usable sources per SNR tertile). Nothing is written if a target exists and
    ``overwrite`` is False.

    Parameters
    ----------
    out_dir : str or `~pathlib.Path`
        Output directory, created if missing.
    catalog : `~astropy.table.QTable`
        The table of `~psfdeconv.pipeline.deconvolve_catalog`.
    stamps : list of `~astropy.nddata.NDData`, optional
        The stamps of `~psfdeconv.pipeline.deconvolve_catalog` (or
        `~psfdeconv.io.read_stamps`), in the catalogue's row order.
    exposure : `~astropy.nddata.NDData`, `~numpy.ndarray`, str, `~pathlib.Path` or dict, optional
        The reference band's exposure (in memory, or a FITS file read with
        `~psfdeconv.io.read_exposure`), or the mapping band -> exposure
        given to `~psfdeconv.pipeline.deconvolve_catalog`.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    list of `~pathlib.Path`
        The PNG files written.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If a target exists and ``overwrite`` is False.
    """
    band = _catalog_band(catalog, None)
    if isinstance(exposure, dict):
        exposure = exposure[band] if band in exposure else next(iter(exposure.values()))
    if isinstance(exposure, (str, Path)):
        from .io import read_exposure

        exposure = read_exposure(exposure, require_wcs=False)

    def overview():
        return plot_catalog_overview(catalog, image=exposure, band=band)

    def stamp_grid():
        bands = list(catalog.meta.get('bands') or stamps[0].meta.get('bands') or [band])
        index = bands.index(band) if band in bands else 0
        deconvolved = np.stack([np.asarray(s.data, dtype=float) for s in stamps])
        deconvolved = deconvolved[:, [index]]
        observed = (None if exposure is None else
                    _observed_cutouts(exposure, stamps, deconvolved.shape[-1])[:, None])
        snr_name = f'snr_{band}'
        snr = _values(catalog[snr_name]) if snr_name in catalog.colnames else None
        if snr is not None and 'usable' in catalog.colnames:
            # The usable rows only (NaN drops a row out of the SNR bins).
            snr = np.where(np.asarray(catalog['usable'], dtype=bool), snr, np.nan)
        figure = plot_stamp_grid(observed, None, deconvolved, snr=snr, rows_per_bin=2)
        figure.suptitle(f'band {band}', fontsize='small')
        return figure

    figures = {RUN_PLOTS[0]: overview}
    if stamps:
        figures[RUN_PLOTS[1]] = stamp_grid
    return _write_all(out_dir, figures, overwrite)


def write_evaluation_plots(report_dir, results=None, *, overwrite=False):
    """Write the evaluation figures beside a report.

    ``flux_histogram.png`` (`plot_flux_histogram`, when the objects table
    has ``snr_<band>`` columns), ``ellipticity_correlations.png``
    (`plot_ellipticity_correlations`) and ``confusion_matrix.png``
    (`plot_confusion_matrix`), each for every method. Nothing is written
    if a target exists and ``overwrite`` is False.

    Parameters
    ----------
    report_dir : str or `~pathlib.Path`
        Output directory, created if missing (usually the ``--report``
        directory).
    results : dict, optional
        Output of `~psfdeconv.evaluate.evaluate_simulation` or
        `~psfdeconv.evaluate.evaluate_predictions`; default: the report
        tables already in ``report_dir`` (`~psfdeconv.evaluate.read_report`).
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    list of `~pathlib.Path`
        The PNG files written.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If a target exists and ``overwrite`` is False.
    """
    from .evaluate import read_report

    results = read_report(report_dir) if results is None else results
    figures = {}
    objects = results.get('objects')
    if objects is not None and any(name.startswith('snr_') for name in objects.colnames):
        figures[EVALUATION_PLOTS[0]] = lambda: plot_flux_histogram(results)
    if 'correlations' in results:
        figures[EVALUATION_PLOTS[1]] = lambda: plot_ellipticity_correlations(results)
    if results.get('confusion'):
        figures[EVALUATION_PLOTS[2]] = lambda: plot_confusion_matrix(results)
    return _write_all(report_dir, figures, overwrite)


def write_training_plots(out_dir, history, *, overwrite=False):
    """Write ``training_history.png`` (`plot_training_history`).

    Parameters
    ----------
    out_dir : str or `~pathlib.Path`
        Output directory, created if missing (usually the training run's).
    history : list of dict, dict, str or `~pathlib.Path`
        As for `plot_training_history`: the history list, a run's
        ``state.json`` or a model card (or their paths).
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    list of `~pathlib.Path`
        The PNG file written.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If the target exists and ``overwrite`` is False.
    """
    return _write_all(out_dir, {TRAINING_PLOTS[0]: lambda: plot_training_history(history)},
                      overwrite)
