# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Batches of exposure groups on dask: a manifest in, one output directory per
group and a summary table out, resumable after a crash.

A **manifest** (CSV or ECSV, `read_manifest`) lists the exposure groups, one
row each: an ``id`` (the name of the group's output directory), one column
per band holding the path of that band's FITS exposure (the columns' order
is the bands' order, the order the model was trained on), an optional
``catalog`` column (a table of source positions; empty: detect them) and
optional ``psf_<band>`` columns (a PSF specification as for ``psfdeconv run
--psf``, or the path of a PSF FITS file; empty: the batch's default), and
optional ``weight_<band>`` (inverse variance), ``variance_<band>``,
``mask_<band>`` (non-zero = bad) and ``unit_<band>`` (where BUNIT is
missing) columns, as ``psfdeconv run --weight/--variance/--mask/--unit``.
FITS paths may name an HDU in CFITSIO style (``decam.fits[1]``,
``decam.fits[SCI]``, ``decam.fits[SCI,2]``).
Relative paths are relative to the manifest's directory::

    id,g,r,i,catalog,psf_r
    field001,field001/g.fits,field001/r.fits,field001/i.fits,,
    field002,field002/g.fits,field002/r.fits,field002/i.fits,field002/sources.ecsv,psf_r.fits

`run_batch` runs each group as one dask task (`dask.delayed`), on a local
process pool (the default for a model given as a file: one group per
process, each process's TensorFlow limited to CPUs / workers threads),
local threads (the default for a model in memory), or a ``dask.distributed``
cluster, through `psfdeconv.pipeline.run_exposure_set`, which writes the
group's ``catalog.fits``, ``stamps.fits`` and ``psf_<band>.fits`` into
``OUT/<id>/`` (each atomically) and keeps memory bounded by deconvolving
the sources in chunks. The group's completion marker ``OUT/<id>/done.json``
is written last, atomically: a group is finished exactly when its marker
exists. ``OUT/summary.fits`` (`read_summary`) has one row per group with its
status, counts, time and error; it is rewritten (atomically) each time a
group finishes, so a batch killed at any moment leaves a valid summary.

**Failures.** A group that raises is recorded as ``failed`` with its error
and the others go on; when every group has run, `run_batch` raises
`~psfdeconv.exceptions.BatchFailureError` (exit code 6) if any failed.

**Resuming.** ``resume=True`` (``--resume``) skips the groups whose marker
exists (status ``skipped``, their counts taken from the marker) and runs the
others again, failed or interrupted ones included, replacing whatever
partial outputs they left. Without it, an existing summary (or group
outputs) is refused unless ``overwrite=True``, which redoes every group.

**The model** is loaded once per worker process and kept in a per-process
cache; the network is called under a per-process lock, so threads that share
it take turns for the forward pass (which TensorFlow already spreads over
the CPU's cores) while the other threads cut, refit and measure.
"""

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from functools import partial
from pathlib import Path

from ._cpus import usable_cpus
from ._units import unit_text
from ._validation import check_output_location, exception_text, is_band_name, positive_int
from .exceptions import (
    BatchFailureError,
    ConfigError,
    InvalidInputError,
    ModelFileError,
    OutputExistsError,
)

__all__ = ['read_manifest', 'run_batch', 'read_summary', 'read_group_exposures',
           'MARKER_NAME', 'SUMMARY_NAME']

log = logging.getLogger('psfdeconv')

#: Name of a group's completion marker in ``OUT/<id>/``, written last.
MARKER_NAME = 'done.json'
#: Name of the batch's summary table in ``OUT/``.
SUMMARY_NAME = 'summary.fits'
#: The schedulers that run on this machine (anything else is the address of
#: a ``dask.distributed`` scheduler).
LOCAL_SCHEDULERS = ('threads', 'processes', 'synchronous')

#: A group id: the name of its output directory, portable to every file
#: system (letters, digits, '.', '_' and '-', starting with a letter or digit).
_SAFE_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}')
#: Columns of a manifest that are not bands.
_RESERVED_COLUMNS = ('id', 'catalog')
#: Per-band manifest columns ``<prefix><band>``: the PSF, and how the band's
#: exposure is read (`psfdeconv.io.read_exposure`): an inverse-variance or
#: variance image, a bad-pixel mask (FITS paths, FILE[HDU] allowed) and the
#: data unit where BUNIT is missing.
_BAND_PREFIXES = ('psf_', 'weight_', 'variance_', 'mask_', 'unit_')
#: The per-band columns holding FITS paths, and the read_exposure role of each.
_PLANE_PREFIXES = {'weight_': 'weight', 'variance_': 'variance', 'mask_': 'mask'}
#: PSF specifications understood by `psfdeconv.psf.psf_from_spec` (anything
#: else in a ``psf_<band>`` cell is the path of a PSF file).
_PSF_SPEC_KINDS = ('epsf', 'moffat')
#: Outputs a finished group must still have for its marker to count.
_GROUP_OUTPUTS = ('catalog.fits', 'stamps.fits')


# --- Manifests ---------------------------------------------------------------------

def _cell(column, row):
    """A manifest cell as a stripped str ('' when empty or masked)."""
    value = column[row]
    if getattr(column, 'mask', None) is not None and column.mask[row]:
        return ''
    return str(value).strip()


def _resolve(base, text):
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def read_manifest(path):
    """Read and check a batch manifest.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        A CSV file (header line, comma-separated; every value read as text)
        or an ECSV file (recognised by its ``# %ECSV`` first line) with the
        columns ``id``, one per band (the band's FITS exposure), and
        optionally ``catalog``, ``psf_<band>``, ``weight_<band>``,
        ``variance_<band>``, ``mask_<band>`` and ``unit_<band>`` (see the
        module docstring).

    Returns
    -------
    manifest : `~astropy.table.Table`
        One row per group, in the file's order: ``id`` (str), one column
        per band with the absolute path of the exposure, ``catalog`` (the
        absolute path, or '' to detect the sources) and ``psf_<band>`` for
        every band (a PSF specification with any file made absolute,
        ``'psf=/abs/path.fits'``, or '' for the batch's default), and
        those of ``weight_<band>``, ``variance_<band>``, ``mask_<band>``
        (absolute paths with any ``[HDU]``, or '') and ``unit_<band>`` (or
        '') that the manifest has. ``meta``
        holds ``bands`` (in column order) and ``manifest`` (the path read).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the manifest, or a file it names, does not exist or cannot be
        read (exit code 3); the message names the row's id and the column.
    psfdeconv.exceptions.ConfigError
        For a manifest without ``id`` or band columns, a ``psf_<band>``
        column of no band, an empty cell where a path is needed, or an id
        that is repeated (case-insensitively, as on macOS and Windows file
        systems) or is not a safe directory name (exit code 2).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from psfdeconv.batch import read_manifest
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ('g.fits', 'r.fits'):
    ...     _ = (directory / name).write_bytes(b'')
    >>> _ = (directory / 'batch.csv').write_text('id,g,r\\nfield1,g.fits,r.fits\\n')
    >>> manifest = read_manifest(directory / 'batch.csv')
    >>> manifest.meta['bands'], manifest['r'][0] == str(directory / 'r.fits')
    (['g', 'r'], True)
    """
    from astropy.io import ascii
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'manifest {path} does not exist; give a CSV or ECSV '
                                f'table with the columns id, one per band (e.g. g, '
                                f'r, i) and optionally catalog and psf_<band>.')
    try:
        # 'utf-8-sig' drops the byte-order mark of spreadsheets' "CSV UTF-8"
        # files (else the first column is '\ufeffid'); universal newlines
        # turn their CRLF line ends into LF.
        with path.open(encoding='utf-8-sig', newline=None) as stream:
            lines = stream.read().splitlines()
        if lines and lines[0].startswith('# %ECSV'):
            table = Table.read(lines, format='ascii.ecsv')
        else:
            # Every value as text: ids such as 007 keep their zeros.
            table = Table.read(lines, format='ascii.csv',
                               converters={'*': [ascii.convert_numpy(str)]})
    except Exception as exc:  # astropy raises many types for unreadable tables
        raise InvalidInputError(f'manifest {path} cannot be read as a CSV or ECSV '
                                f'table ({exception_text(exc)}); write a '
                                f'header line (id,g,r,i,...) and one line per '
                                f'group.') from None
    columns = {name.strip(): table[name] for name in table.colnames}
    where = f'manifest {path}'
    if 'id' not in columns:
        raise ConfigError(f'{where} has no id column (its columns are '
                          f'{list(columns)}); add one naming each group (the name '
                          f'of its output directory).')
    bands = [name for name in columns
             if name not in _RESERVED_COLUMNS and not name.startswith(_BAND_PREFIXES)]
    if not bands:
        raise ConfigError(f'{where} has no band columns (its columns are '
                          f'{list(columns)}); add one column per band, named by the '
                          f'band (e.g. g, r, i), holding the FITS paths.')
    bad = [band for band in bands if not is_band_name(band)]
    if bad:
        raise ConfigError(f'{where}: band column(s) {bad} are not identifiers; name '
                          f'bands with ASCII letters, digits and underscores (they become '
                          f'catalogue columns such as flux_<band>).')
    orphans = {name: name.split('_', 1)[1] for name in columns
               if name.startswith(_BAND_PREFIXES) and name.split('_', 1)[1] not in bands}
    if orphans:
        raise ConfigError(f'{where} has column(s) {list(orphans)} but no band '
                          f'column(s) {list(orphans.values())}; the bands are {bands}: '
                          f'add the band column or rename the per-band column.')
    if len(table) == 0:
        raise ConfigError(f'{where} has no rows; add one line per exposure group.')

    base = path.resolve().parent
    out = {'id': []}
    out.update({band: [] for band in bands})
    out['catalog'] = []
    out.update({f'psf_{band}': [] for band in bands})
    # The reading columns only where the manifest has them.
    out.update({name: [] for prefix in _BAND_PREFIXES[1:] for band in bands
                if (name := f'{prefix}{band}') in columns})
    seen = {}
    for row in range(len(table)):
        line = f'{where}, row {row + 1}'
        group = _cell(columns['id'], row)
        if not _SAFE_ID.fullmatch(group) or group.lower() == SUMMARY_NAME:
            raise ConfigError(f'{line}: id {group!r} is not a safe directory name; '
                              f'use letters, digits, ".", "_" and "-" (up to 128, '
                              f'starting with a letter or digit, not '
                              f'{SUMMARY_NAME!r}).')
        if group.lower() in seen:
            raise ConfigError(f'{line}: id {group!r} repeats the id of row '
                              f'{seen[group.lower()] + 1} (ids are compared '
                              f'ignoring case); give each group its own id.')
        seen[group.lower()] = row
        out['id'].append(group)
        line = f'{where}, row {row + 1} (id {group!r})'
        for band in bands:
            text = _cell(columns[band], row)
            if not text:
                raise ConfigError(f'{line}: column {band!r} is empty; give the path '
                                  f'of the group\'s {band} exposure.')
            out[band].append(_fits_cell(text, base, f'{line}, column {band!r}',
                                        'exposure'))
        text = _cell(columns['catalog'], row) if 'catalog' in columns else ''
        if text:
            catalog = _resolve(base, text)
            if not catalog.is_file():
                raise InvalidInputError(f'{line}, column \'catalog\': source table '
                                        f'{catalog} does not exist; fix the path or '
                                        f'leave the cell empty to detect the '
                                        f'sources.')
            text = str(catalog)
        out['catalog'].append(text)
        for band in bands:
            name = f'psf_{band}'
            text = _cell(columns[name], row) if name in columns else ''
            out[name].append(_psf_cell(text, base, f'{line}, column {name!r}'))
            for prefix, role in _PLANE_PREFIXES.items():
                name = f'{prefix}{band}'
                if name in columns:
                    text = _cell(columns[name], row)
                    out[name].append(text and _fits_cell(
                        text, base, f'{line}, column {name!r}', role))
            if all(out.get(f'{prefix}{band}', [''])[-1] for prefix in
                   ('weight_', 'variance_')):
                raise ConfigError(f'{line}: both weight_{band} and variance_{band} '
                                  f'are given; give one of them (they describe the '
                                  f'same noise).')
            name = f'unit_{band}'
            if name in columns:
                text = _cell(columns[name], row)
                out[name].append(text and unit_text(text, f'{line}, column {name!r}'))
    return Table(out, meta={'bands': bands, 'manifest': str(path)})


def _fits_text(path, hdu):
    """``path`` with its HDU in CFITSIO style (FILE[1], FILE[SCI], FILE[SCI,2])."""
    if hdu is None:
        return str(path)
    inner = ','.join(map(str, hdu)) if isinstance(hdu, tuple) else str(hdu)
    return f'{path}[{inner}]'


def _fits_cell(text, base, where, role):
    """A FITS path cell (with an optional HDU) made absolute, checked to exist."""
    from .io import parse_fits_spec

    try:
        path, hdu = parse_fits_spec(text, role=role, must_exist=False)
    except InvalidInputError as exc:
        raise InvalidInputError(f'{where}: {exc}') from None
    if not path.is_absolute() and not (base / path).is_file() and \
            (base / text).is_file():
        path, hdu = Path(text), None  # a relative file name with brackets
    path = _resolve(base, str(path))
    if not path.is_file():
        raise InvalidInputError(f'{where}: {role} {path} does not exist; fix the path '
                                f'(relative paths are relative to the manifest\'s '
                                f'directory {base}).')
    return _fits_text(path, hdu)


def _psf_cell(text, base, where):
    """A ``psf_<band>`` cell as a specification with any file made absolute."""
    if not text:
        return ''
    kind = text.split(':', 1)[0].strip().lower()
    if kind in _PSF_SPEC_KINDS:
        return text
    file_text = text[4:] if text.lower().startswith('psf=') else text
    psf_path = _resolve(base, file_text.strip())
    if not psf_path.is_file():
        raise InvalidInputError(f'{where}: PSF file {psf_path} does not exist; give '
                                f'an existing PSF FITS file, a specification '
                                f'(epsf, moffat:fwhm=0.8arcsec,beta=3) or leave it '
                                f'empty for the default.')
    return f'psf={psf_path}'


# --- Summaries ---------------------------------------------------------------------

#: Summary columns: name -> (numpy kind, unit, description).
_SUMMARY_COLUMNS = {
    'id': (str, None, 'Group id (its output directory is OUT/<id>/)'),
    'status': (str, None, 'ok (done in this run), skipped (done by an earlier run), '
                          'failed, or pending (not finished yet)'),
    'n_sources': (int, None, 'Rows of the group\'s catalog.fits (-1: none written)'),
    'n_flagged': (int, None, 'Rows with any flag set but NEIGHBOURS (-1: none '
                             'written)'),
    'seconds': (float, 's', 'Wall-clock time of the group on its worker'),
    'error': (str, None, 'The error of a failed group (type: message)'),
    'worker': (str, None, 'host:pid of the process that ran the group'),
    'finished': (str, None, 'UTC time the group finished (ISO 8601)'),
}


def _row(group, status='pending', **values):
    row = {'id': group, 'status': status, 'n_sources': -1, 'n_flagged': -1,
           'seconds': float('nan'), 'error': '', 'worker': '', 'finished': ''}
    row.update(values)
    return row


def _summary_table(rows, meta):
    import astropy.units as u
    import numpy as np
    from astropy.table import QTable

    table = QTable(meta=dict(meta))
    for name, (kind, unit, description) in _SUMMARY_COLUMNS.items():
        values = np.array([row[name] for row in rows], dtype=kind)
        table[name] = values * u.Unit(unit) if unit else values
        table[name].info.description = description
    counts = {status: sum(row['status'] == status for row in rows)
              for status in ('ok', 'skipped', 'failed', 'pending')}
    table.meta['counts'] = counts
    return table


def _write_summary(table, path):
    """Write the summary atomically, its meta as JSON in the header."""
    from .io import write_table_with_meta

    meta = table.meta
    keywords = {}
    if (meta.get('model') or {}).get('weights_sha256'):
        keywords['MODELSHA'] = str(meta['model']['weights_sha256'])
    if meta.get('psfdeconv_version'):
        keywords['PSFDVER'] = str(meta['psfdeconv_version'])
    return write_table_with_meta(table, path, keywords=keywords, overwrite=True)


def read_summary(path):
    """Read a batch's ``summary.fits`` (`run_batch`) with its ``meta``.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The summary file, or the batch's output directory.

    Returns
    -------
    `~astropy.table.QTable`
        One row per group: ``id``, ``status`` (``ok``, ``skipped``,
        ``failed`` or, in the summary of a batch still running or killed,
        ``pending``), ``n_sources``, ``n_flagged``, ``seconds``, ``error``,
        ``worker`` and ``finished``. ``meta`` holds ``counts`` (per status),
        ``model`` (name, path, ``weights_sha256``), ``versions``,
        ``psfdeconv_version``, ``manifest``, ``bands``, ``scheduler``,
        ``workers``, ``started`` and ``updated``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the file does not exist or is not a summary.
    """
    import numpy as np

    from .io import read_table_with_meta

    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_NAME
    if not path.is_file():
        raise InvalidInputError(f'batch summary {path} does not exist; give the '
                                f'summary.fits of a psfdeconv batch (or its output '
                                f'directory).')
    try:
        table = read_table_with_meta(path, required=True)
    except Exception as exc:  # astropy raises many types for unreadable files
        raise InvalidInputError(f'{path} is not a psfdeconv batch summary '
                                f'({exception_text(exc)}).') from None
    for name in ('id', 'status', 'error', 'worker', 'finished'):
        # FITS stores '' as a null string, which astropy reads as masked.
        column = table[name]
        if getattr(column, 'mask', None) is not None:
            column = column.filled('')
        table[name] = np.asarray(column, dtype=str)
        table[name].info.description = _SUMMARY_COLUMNS[name][2]
    return table


def _read_marker(group_dir):
    """The summary row saved in a finished group's marker, or None (no
    marker, or outputs that were removed or changed since: the run's
    completion marker, `~psfdeconv.io.run_is_complete`, must list them with
    their sizes and SHA-256)."""
    from .io import run_is_complete

    if not all((group_dir / name).is_file() for name in _GROUP_OUTPUTS):
        return None
    if not run_is_complete(group_dir, check_hashes=True):
        return None
    try:
        return json.loads((group_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


# --- Workers ---------------------------------------------------------------------

#: Models loaded in this process: (path, weights SHA-256) -> `_SerialModel`.
_MODELS = {}
_MODELS_LOCK = threading.Lock()
#: Serialises the network calls of the threads of one process (re-entrant,
#: so a model wrapped twice cannot deadlock).
_NETWORK_LOCK = threading.RLock()
_THREADS_CONFIGURED = []
#: Model class -> its `_serial_model` subclass.
_SERIAL_CLASSES = {}


def _serial_model(model):
    """A shallow copy of a `~psfdeconv.model.DeconvolutionModel` whose
    ``predict`` holds this process's network lock.

    A Keras model may be called from several threads (TensorFlow's eager
    kernels are thread-safe), but concurrent forward passes only compete for
    the cores that TensorFlow's own thread pool already spreads each pass
    over, and hold their activations at the same time; taking turns keeps
    each pass fast and one batch of activations in memory.
    """
    base = type(model)
    if base not in _SERIAL_CLASSES:
        def predict(self, *args, **kwargs):
            with _NETWORK_LOCK:
                return base.predict(self, *args, **kwargs)

        _SERIAL_CLASSES[base] = type(f'Serial{base.__name__}', (base,),
                                     {'predict': predict, '__doc__': base.__doc__})
    serial = object.__new__(_SERIAL_CLASSES[base])
    serial.__dict__.update(model.__dict__)
    return serial


def _worker_model(path, sha256, n_bands, verify=True, threads=None, precision=None):
    """The model of a batch in this process, loaded on first use (after
    `_configure_threads`), with its runner at ``precision`` built: under a
    lock, before the group's own work, because TensorFlow's import (where
    the network is not cached for OpenVINO) is not safe beside other
    threads' imports."""
    from .inference import get_runner, use_default_network_cache
    from .model import load_model

    key = (path, sha256)
    with _MODELS_LOCK:
        _configure_threads(threads)
        if threads is not None:
            # A worker process of the batch's (processes or a cluster): its
            # network from OpenVINO's cached conversion, without TensorFlow.
            use_default_network_cache()
        model = _MODELS.get(key)
        if model is None:
            if path is None:
                raise ModelFileError('the batch\'s model exists only in the memory of '
                                     'the process that started the batch; give it as '
                                     'a .keras file to run on processes or a cluster.')
            model = load_model(path, n_bands=n_bands, verify=verify, network='lazy')
            if sha256 and model.sha256 != sha256:
                raise ModelFileError(f'model {path} has weights SHA-256 '
                                     f'{model.sha256} in this worker but '
                                     f'{sha256} when the batch started: the file '
                                     f'changed; restore it and resume the batch.')
            model = _serial_model(model)
            if len(_MODELS) >= 4:
                _MODELS.clear()
            _MODELS[key] = model
        if precision is not None:
            get_runner(model, precision)
    return model


def _configure_threads(threads):
    """Limit this worker process's TensorFlow and OpenMP/BLAS threads.

    ``threads`` is an int, ``'worker'`` (the threads of this dask.distributed
    worker) or None (leave them). Effective only before TensorFlow starts,
    that is in a fresh worker process; done once per process.
    """
    if threads is None or _THREADS_CONFIGURED:
        return
    _THREADS_CONFIGURED.append(threads)
    if threads == 'worker':
        try:
            from distributed import get_worker

            threads = int(get_worker().state.nthreads)
        except (ImportError, ValueError, AttributeError):
            return
    threads = max(1, int(threads))
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    # Read by TensorFlow when it starts, if it does: a network cached by
    # OpenVINO runs without it (psfdeconv.inference).
    os.environ['TF_NUM_INTRAOP_THREADS'] = str(threads)
    os.environ['TF_NUM_INTEROP_THREADS'] = str(min(2, threads))
    if 'tensorflow' in sys.modules:
        try:
            tf = sys.modules['tensorflow']
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except (AttributeError, RuntimeError):
            pass  # TensorFlow already running in this process


#: The hidden temporary files of `psfdeconv.io.atomic_path` (``.NAME.XXXXXXXX.tmp``).
_TEMPORARY = re.compile(r'\..+\.[A-Za-z0-9_]{8}\.tmp')


def _remove_temporaries(directory, prefix='.'):
    """Remove the temporary files whose names start with ``prefix`` that a
    killed run left in ``directory`` (about to be written again)."""
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(prefix) and _TEMPORARY.fullmatch(path.name) \
                    and path.is_file():
                path.unlink(missing_ok=True)


def _error_text(exc):
    """'Type: message' of an exception, on one line (a summary cell)."""
    return f'{type(exc).__name__}: {" ".join(str(exc).split())}'


def _utc_now():
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec='seconds')


def _run_group(group, out_dir, model_ref, options):
    """Run one group (a dask task): its outputs, then its marker; never
    raises, the summary row says what happened."""
    import socket

    from .flags import n_flagged
    from .io import atomic_path
    from .pipeline import run_exposure_set

    start = time.perf_counter()
    row = _row(group['id'], worker=f'{socket.gethostname()}:{os.getpid()}')
    group_dir = Path(out_dir) / group['id']
    try:
        model = _worker_model(*model_ref, threads=options['threads'],
                              precision=options.get('precision', 'auto'))
        extra = {key: options[key] for key in ('epsf_options', 'detect_options')
                 if options.get(key)}
        if options.get('pixel_scale') is not None:
            extra['pixel_scale'] = options['pixel_scale']
        exposures = read_group_exposures(group['exposures'], group.get('reads'),
                                         pixel_scale=options.get('pixel_scale'))
        catalog, _ = run_exposure_set(
            exposures, group_dir, group['catalog'] or None, group['psfs'], model=model,
            reference_band=options['reference_band'],
            batch_size=options['batch_size'], chunk_size=options['chunk_size'],
            overwrite=options['overwrite'], symmetries=options['symmetries'],
            precision=options.get('precision', 'auto'), **extra)
        row.update(status='ok', n_sources=len(catalog),
                   n_flagged=n_flagged(catalog['flags']),
                   seconds=time.perf_counter() - start, finished=_utc_now())
        marker = dict(row, weights_sha256=model.sha256, symmetries=options['symmetries'])
        # Last, and atomically: the group is finished exactly when this exists.
        with atomic_path(group_dir / MARKER_NAME, overwrite=True) as tmp:
            tmp.write_text(json.dumps(marker, indent=1))
    except Exception as exc:  # one group's failure must not stop the batch
        row.update(status='failed', error=_error_text(exc),
                   seconds=time.perf_counter() - start, finished=_utc_now())
    return row


def read_group_exposures(exposures, reads=None, *, pixel_scale=None):
    """The exposures of one group (``psfdeconv run`` or one manifest row),
    read as their options say.

    Parameters
    ----------
    exposures : dict of str to str
        Band name to the FITS path, with an optional CFITSIO-style HDU
        (``decam.fits[1]``, `psfdeconv.io.parse_fits_spec`).
    reads : dict of str to dict, optional
        Band name to ``weight_hdu``, ``variance_hdu``, ``mask_hdu`` (FITS
        paths with an optional HDU) and ``unit`` of that band; empty values
        are not given.
    pixel_scale : float, optional
        Arcsec per pixel: the bands are read without requiring a celestial
        WCS, and one they have must agree with it within 1 %.

    Returns
    -------
    exposures : dict of str to str or `~astropy.nddata.CCDData`
        A band with nothing to read but its path stays a path (the pipeline
        checks the model and the outputs before reading it); the others are
        read with `psfdeconv.io.read_exposure`.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For a file or HDU that does not exist (naming the file's HDUs).
    psfdeconv.exceptions.ConfigError
        If ``pixel_scale`` disagrees with a band's WCS.
    """
    from .io import parse_fits_spec, pixel_scale_of, read_exposure

    read_exposures = {}
    for band, text in exposures.items():
        read = {key: value for key, value in ((reads or {}).get(band) or {}).items()
                if value}
        path, hdu = parse_fits_spec(text, must_exist=False)  # read_exposure checks
        if not read and hdu is None and pixel_scale is None:
            read_exposures[band] = str(text)
            continue
        for key in ('weight_hdu', 'variance_hdu', 'mask_hdu'):
            if key in read:
                aux_path, aux_hdu = parse_fits_spec(read[key], role=key[:-4])
                read[key] = aux_path if aux_hdu is None else (str(aux_path), aux_hdu)
        exposure = read_exposure(path, hdu=hdu, require_wcs=pixel_scale is None, **read)
        wcs = exposure.wcs
        if pixel_scale is not None and getattr(wcs, 'has_celestial', False):
            scale = float(pixel_scale_of(wcs).value)
            if abs(scale / pixel_scale - 1) > 0.01:
                raise ConfigError(f'pixel_scale = {pixel_scale:g} (--pixel-scale) '
                                  f'disagrees with the WCS of band {band!r} ({text}), '
                                  f'{scale:.4g} arcsec/pixel; omit it to use the WCS, '
                                  f'or fix it.')
        read_exposures[band] = exposure
    return read_exposures


# --- The batch -------------------------------------------------------------------

def _versions():
    import importlib.metadata

    from . import __version__

    versions = {'psfdeconv': __version__}
    for name in ('numpy', 'astropy', 'photutils', 'galsim', 'dask', 'distributed',
                 'keras', 'tensorflow', 'tensorflow-cpu'):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _check_options(scheduler, workers, resume, overwrite):
    if resume and overwrite:
        raise ConfigError('resume and overwrite exclude each other: resume keeps '
                          'the finished groups, overwrite redoes them all; give '
                          'one.')
    if workers is not None and (isinstance(workers, bool) or
                                not isinstance(workers, int) or workers < 1):
        raise ConfigError(f'workers = {workers!r}; give a number of threads or '
                          f'processes >= 1, or None for one per CPU.')
    if scheduler is None:
        return  # a local scheduler, chosen by _default_scheduler
    if isinstance(scheduler, str):
        if scheduler in LOCAL_SCHEDULERS:
            return
        if '://' not in scheduler:
            raise ConfigError(f'scheduler = {scheduler!r}; give one of '
                              f'{list(LOCAL_SCHEDULERS)} or the address of a '
                              f'dask.distributed scheduler, e.g. '
                              f'tcp://127.0.0.1:8786.')
    elif not hasattr(scheduler, 'compute'):
        raise ConfigError(f'scheduler is a {type(scheduler).__name__}; give one of '
                          f'{list(LOCAL_SCHEDULERS)}, a scheduler address or a '
                          f'distributed.Client.')
    if workers is not None:
        raise ConfigError(f'workers = {workers} cannot be set for a dask.distributed '
                          f'cluster ({scheduler}): start the cluster with the '
                          f'workers and threads you want.')


def _load_batch_model(model, n_bands, verify=True):
    """The batch's model: one in memory as it is; a file verified against
    its card with its network left to first use (``network='lazy'``: the
    groups load it where they run, `_worker_model`), which spares this
    process TensorFlow's start (seconds) when the groups run in worker
    processes; an unverified file loaded whole."""
    from .model import DeconvolutionModel, default_model_path, load_model

    if isinstance(model, DeconvolutionModel):
        loaded = model
    elif model is None or isinstance(model, str | Path):
        path = default_model_path(n_bands) if model is None else Path(model)
        # Unverified, the network is loaded here: a file Keras cannot read
        # fails the batch before its first group, not every group.
        loaded = load_model(path, n_bands=n_bands, verify=verify,
                            network='lazy' if verify else True)
    else:
        raise ModelFileError(f'model is a {type(model).__name__}; give a '
                             f'DeconvolutionModel (psfdeconv.load_model), the path '
                             f'of a .keras file, or None for the shipped model.')
    loaded.check_bands(n_bands)
    return loaded


def run_batch(manifest, out_dir, *, psfs='epsf', model=None, scheduler=None,
              workers=None, resume=False, overwrite=False, reference_band=None,
              batch_size=128, chunk_size=None, symmetries=None, units=None,
              epsf_options=None, detect_options=None, pixel_scale=None,
              progress=False, trust_model=False, precision='auto'):
    """Deconvolve every exposure group of a manifest, one dask task per group.

    Each group runs `psfdeconv.pipeline.run_exposure_set` into
    ``out_dir/<id>/`` and then writes its marker ``out_dir/<id>/done.json``;
    ``out_dir/summary.fits`` is written before the first group starts and
    rewritten as each group finishes (see the module docstring).

    Parameters
    ----------
    manifest : str, `~pathlib.Path` or `~astropy.table.Table`
        The manifest file, or a table returned by `read_manifest`.
    out_dir : str or `~pathlib.Path`
        The batch's output directory (created if needed).
    psfs : str, optional
        PSF specification of the bands without a ``psf_<band>`` value (as
        ``psfdeconv run --psf``): ``'epsf'`` (default),
        ``'moffat:fwhm=0.8arcsec,beta=3'``, ``'psf=FILE'``, ...
    model : `~psfdeconv.model.DeconvolutionModel`, str or `~pathlib.Path`, optional
        The network or its ``.keras`` file; the shipped model for the
        manifest's number of bands if None. It is checked (file, SHA-256,
        bands) before any group starts. Processes and cluster workers load
        it from its file, once per process; an in-memory model without a
        file works with the ``threads`` and ``synchronous`` schedulers only.
    scheduler : str or `distributed.Client`, optional
        ``'processes'`` (a local process pool; the default when the model
        is a file, or None, and more than one worker runs: the exposure-level
        work of a group holds Python's GIL much of the time, so threads
        share one core for it), ``'threads'`` (a thread pool in this
        process; the default for an in-memory model or one worker), ``'synchronous'`` (one group
        after the other, for debugging), the address of a running
        ``dask.distributed`` scheduler (``'tcp://host:8786'``; needs the
        ``dask`` extra, and the inputs, outputs and model must be on file
        systems the workers share) or a connected ``distributed.Client``.
    workers : int, optional
        Threads or processes of a local scheduler; default one per CPU this
        process may use (its CPU affinity: a batch job's allocation), at
        most one per group. Each process of the ``processes`` scheduler
        limits TensorFlow (and OpenMP/BLAS libraries it loads later) to
        CPUs / workers threads, so the processes do not oversubscribe the
        CPU. A cluster's workers are set where the cluster is started.
    resume : bool, optional
        Keep the groups finished by an earlier run into ``out_dir`` and run
        the others (failed and interrupted ones included).
    overwrite : bool, optional
        Redo every group, replacing an earlier run's outputs and summary.
    trust_model : bool, optional
        Load a model given as a path with ``verify=False``
        (`~psfdeconv.model.load_model`; ``--trust-model``).
    reference_band, batch_size, chunk_size, symmetries
        As for `psfdeconv.pipeline.run_exposure_set` (``chunk_size`` None:
        its default; ``symmetries`` None: the model card's). A resumed batch
        keeps only the groups made with the same model and symmetries.
    precision : {'auto', 'float32', 'bfloat16'}, optional
        As for `psfdeconv.pipeline.run_exposure_set`.
    units : dict of str to str, optional
        Band name to the data unit of the bands whose ``unit_<band>`` cell is
        empty (``psfdeconv batch --unit``).
    epsf_options, detect_options : dict, optional
        As for `psfdeconv.pipeline.run_exposure_set`, for every group.
    pixel_scale : float, optional
        Arcsec per pixel of exposures without a celestial WCS (``pixel_scale``
        of `psfdeconv.pipeline.run_exposure_set`); the exposures are then read
        without requiring one.
    progress : bool, optional
        Draw a `tqdm` bar on standard error counting the finished groups.

    Returns
    -------
    summary : `~astropy.table.QTable`
        The summary written to ``out_dir/summary.fits`` (see
        `read_summary`).

    Raises
    ------
    psfdeconv.exceptions.BatchFailureError
        After every group has run and the summary is written, if any group
        failed (exit code 6); its ``summary`` attribute holds the summary.
    psfdeconv.exceptions.OutputExistsError
        Before any work, if ``out_dir`` holds a summary or group outputs and
        neither ``resume`` nor ``overwrite`` is given.
    psfdeconv.exceptions.ConfigError
        For invalid options, or resuming with another model or symmetries
        than the ones that made the finished groups.
    psfdeconv.exceptions.InvalidInputError, psfdeconv.exceptions.ModelFileError
        For a bad manifest (`read_manifest`), or a model that cannot be
        loaded or has the wrong number of bands.

    Examples
    --------
    >>> from psfdeconv.batch import run_batch
    >>> summary = run_batch('groups.csv', 'out/')  # doctest: +SKIP
    >>> summary['id', 'status', 'n_sources', 'seconds']  # doctest: +SKIP
    """
    from astropy.table import Table

    from .inference import resolve_precision

    _check_options(scheduler, workers, resume, overwrite)
    positive_int(batch_size, 'batch_size', error=ConfigError)
    # A bad precision would otherwise fail every group, each after its PSFs.
    resolve_precision(precision)
    check_output_location(out_dir, 'out_dir', directory=True)
    if not isinstance(manifest, Table):
        manifest = read_manifest(manifest)
    bands = list(manifest.meta['bands'])
    out_dir = Path(out_dir)
    from .io import output_lock

    # A second batch (or run) into out_dir fails here, before any work.
    with output_lock(out_dir):
        return _run_batch_locked(manifest, out_dir, bands, psfs=psfs, model=model,
                                 scheduler=scheduler, workers=workers, resume=resume,
                                 overwrite=overwrite, reference_band=reference_band,
                                 batch_size=batch_size, chunk_size=chunk_size,
                                 symmetries=symmetries, units=units,
                                 epsf_options=epsf_options, detect_options=detect_options,
                                 pixel_scale=pixel_scale, progress=progress,
                                 trust_model=trust_model, precision=precision)


def _run_batch_locked(manifest, out_dir, bands, *, psfs, model, scheduler, workers, resume,
                      overwrite, reference_band, batch_size, chunk_size, symmetries, units,
                      epsf_options, detect_options, pixel_scale, progress, trust_model,
                      precision):
    """`run_batch` once ``out_dir`` is locked."""
    import dask

    summary_path = out_dir / SUMMARY_NAME
    ids = [str(group) for group in manifest['id']]

    if not resume and not overwrite:
        if summary_path.exists():
            raise OutputExistsError(f'{summary_path} exists: {out_dir} holds an '
                                    f'earlier batch; pass --resume to finish it or '
                                    f'--overwrite to redo every group.')
        for group in ids:
            group_dir = out_dir / group
            if group_dir.is_dir() and any(group_dir.iterdir()):
                raise OutputExistsError(f'{group_dir} exists and is not empty; pass '
                                        f'--resume to keep finished groups or '
                                        f'--overwrite to redo them, or choose '
                                        f'another --out.')

    loaded = _load_batch_model(model, len(bands), verify=not trust_model)
    from .deconvolve import check_symmetries

    symmetries = check_symmetries(symmetries, loaded)
    model_path = None if loaded.path is None else str(Path(loaded.path).resolve())
    if model_path is None and not (scheduler is None or isinstance(scheduler, str) and
                                   scheduler in ('threads', 'synchronous')):
        raise ConfigError('the model has no file, so workers in other processes '
                          'cannot load it; save it (psfdeconv.model.save_model) and '
                          'give its path, or use scheduler="threads".')
    if loaded.has_network:
        with _MODELS_LOCK:
            _MODELS[(model_path, loaded.sha256)] = _serial_model(loaded)

    rows = {}
    if resume:
        mismatched = []
        for group in ids:
            marker = _read_marker(out_dir / group)
            if marker is None:
                continue
            # Markers written before symmetries existed: one network call.
            if (marker.get('weights_sha256') != loaded.sha256 or
                    marker.get('symmetries', 1) != symmetries):
                mismatched.append(group)
                continue
            fields = {name: marker[name] for name in _SUMMARY_COLUMNS
                      if name in marker and name not in ('id', 'status')}
            rows[group] = _row(group, 'skipped', **fields)
        if mismatched:
            raise ConfigError(f'groups {mismatched} of {out_dir} were made with another '
                              f'model or symmetries (weights SHA-256 and symmetries '
                              f'in their done.json); resume with those, or pass '
                              f'--overwrite to redo every group with these.')
    todo = [row for row in range(len(manifest)) if ids[row] not in rows]
    for row in todo:
        rows[ids[row]] = _row(ids[row])
    if scheduler is None:
        scheduler = _default_scheduler(model, model_path, workers, len(todo))
    local = isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS
    if workers is None and local:
        workers = max(1, min(usable_cpus(), len(todo)))
    versions = _versions()
    meta = {
        'psfdeconv_version': versions['psfdeconv'],
        'versions': versions,
        'model': {'name': loaded.card.get('name'), 'path': model_path,
                  'weights_sha256': loaded.sha256,
                  'verified': bool(getattr(loaded, 'verified', True))},
        'symmetries': symmetries,
        'manifest': manifest.meta.get('manifest'),
        'bands': bands,
        'default_psf': psfs,
        'scheduler': scheduler if isinstance(scheduler, str) else repr(scheduler),
        'workers': workers,
        'resumed': bool(resume),
        'started': _utc_now(),
    }

    threads = None
    if scheduler == 'processes':
        threads = max(1, usable_cpus() // workers)
    elif not local:
        threads = 'worker'
    if chunk_size is None:
        from .pipeline import CHUNK_SIZE as chunk_size
    options = {'reference_band': reference_band, 'batch_size': batch_size,
               'chunk_size': chunk_size, 'threads': threads, 'symmetries': symmetries,
               'epsf_options': epsf_options, 'detect_options': detect_options,
               'pixel_scale': pixel_scale, 'precision': precision,
               # Groups that run have no marker: whatever they hold is the
               # partial output of an interrupted or failed run.
               'overwrite': bool(resume or overwrite)}
    model_ref = (model_path, loaded.sha256, len(bands), bool(getattr(loaded, 'verified', True)))
    tasks, keys = [], {}
    for row in todo:
        group = {'id': ids[row],
                 'exposures': {band: str(manifest[band][row]) for band in bands},
                 'catalog': str(manifest['catalog'][row]),
                 'psfs': {band: str(manifest[f'psf_{band}'][row]) or
                          (psfs[band] if hasattr(psfs, 'items') else psfs)
                          for band in bands},
                 'reads': {band: {
                     'weight_hdu': _manifest_value(manifest, f'weight_{band}', row),
                     'variance_hdu': _manifest_value(manifest, f'variance_{band}', row),
                     'mask_hdu': _manifest_value(manifest, f'mask_{band}', row),
                     'unit': _manifest_value(manifest, f'unit_{band}', row) or
                     (units or {}).get(band, '')} for band in bands}}
        key = f'psfdeconv-group-{ids[row]}'
        keys[key] = ids[row]
        tasks.append(dask.delayed(_run_group, pure=False)(
            group, str(out_dir), model_ref, options, dask_key_name=key))

    def write_summary():
        table = _summary_table([rows[group] for group in ids],
                               dict(meta, updated=_utc_now()))
        _write_summary(table, summary_path)
        return table

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc='groups', unit='group', disable=not progress,
               leave=False, dynamic_ncols=True)

    def finished(result):
        rows[result['id']] = result
        bar.update(1)
        nonlocal summary
        summary = write_summary()
        if result['status'] == 'failed':
            log.warning('group %s failed: %s', result['id'], result['error'])
        else:
            log.info('group %s: %d sources (%d flagged) in %.1f s', result['id'],
                     result['n_sources'], result['n_flagged'], result['seconds'])

    # Connect before anything in out_dir changes: a wrong address changes nothing.
    client = None if local else _connect(scheduler)
    try:
        if overwrite:
            for group in ids:
                (out_dir / group / MARKER_NAME).unlink(missing_ok=True)
        if resume or overwrite:
            _remove_temporaries(out_dir, prefix=f'.{SUMMARY_NAME}.')
            for row in todo:
                _remove_temporaries(out_dir / ids[row])
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = write_summary()
        log.info('batch of %d groups: %d to run, %d finished earlier', len(ids),
                 len(todo), len(ids) - len(todo))
        try:
            if tasks and client is None:
                _compute_locally(tasks, keys, finished, scheduler, workers, threads)
            elif tasks:
                _compute_on_cluster(tasks, keys, finished, client)
        except Exception as exc:  # e.g. a worker process that died
            for group in ids:
                if rows[group]['status'] == 'pending':
                    rows[group] = _row(group, 'failed', finished=_utc_now(),
                                       error=f'the batch stopped: {_error_text(exc)}')
            summary = write_summary()
    finally:
        bar.close()
        if client is not None and client is not scheduler:
            client.close()

    failed = [group for group in ids if rows[group]['status'] == 'failed']
    if failed:
        shown = ', '.join(failed[:5]) + (', ...' if len(failed) > 5 else '')
        error = BatchFailureError(
            f'{len(failed)} of {len(ids)} groups failed ({shown}); their errors are '
            f'in {summary_path}. The other groups are written; rerun with --resume '
            f'(resume=True) to retry the failed ones.')
        error.summary = summary
        raise error
    return summary


def _default_scheduler(model, model_path, workers, n_todo):
    """The local scheduler of ``scheduler=None``: processes for a model file
    (or the shipped one) when more than one worker would run, else threads.

    A group spends much of its time in Python (segmentation, measurement,
    I/O) that holds the GIL, so threads run the groups nearly one at a time;
    processes each load the model from its file once. A model passed in
    memory stays in this process (threads share it), and a single worker
    gains nothing from a second process.
    """
    n_workers = workers if workers is not None else min(usable_cpus(), n_todo)
    if model_path is None or n_workers <= 1 or not (model is None or
                                                     isinstance(model, str | Path)):
        return 'threads'
    return 'processes'


def _manifest_value(manifest, name, row):
    """A cell of a `read_manifest` table ('' for a column it lacks, as in a
    table made before the column existed)."""
    return str(manifest[name][row]) if name in manifest.colnames else ''


#: The thread-count variables of OpenMP and the BLAS libraries.
_THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


@contextlib.contextmanager
def _worker_threads(threads):
    """Set the thread-count variables to ``threads`` (an int) in this
    process's environment, which processes started meanwhile inherit, and
    restore them after.

    A BLAS library reads its variable once, when numpy loads it: in a
    worker process that is before `_configure_threads` runs, so the
    variable must be in the environment the process starts with.
    """
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _compute_locally(tasks, keys, finished, scheduler, workers, threads=None):
    """Run the group tasks on a local dask scheduler, calling ``finished``
    with each group's row as it completes; the worker processes of the
    'processes' scheduler start with ``threads`` as their thread-count
    variables."""
    import dask
    from dask.callbacks import Callback

    def posttask(key, result, dsk, state, worker_id):
        if key in keys:
            finished(result)

    options = {'scheduler': scheduler, 'optimize_graph': False}
    if scheduler != 'synchronous':
        options['num_workers'] = workers
    if scheduler == 'processes':
        # One group per dispatch (dask's default sends 6 to one process).
        options['chunksize'] = 1
        cpu_sets = _worker_cpu_sets(workers, threads)
        if cpu_sets is not None:
            from dask.multiprocessing import get_context

            queue = get_context().Queue()
            for cpus in cpu_sets:
                queue.put(cpus)
            options['initializer'] = partial(_pin_worker, queue)
    environment = (_worker_threads(threads) if scheduler == 'processes' and threads
                   else contextlib.nullcontext())
    with Callback(posttask=posttask), environment:
        dask.compute(*tasks, **options)


def _worker_cpu_sets(workers, threads):
    """Disjoint sets of ``threads`` CPUs, one per worker process, where the
    workers' threads fill the CPUs this process may use (its CPU affinity);
    else None (one worker, other thread counts, no affinity on this
    platform): the workers are not pinned."""
    if not (threads and workers and workers > 1) or not hasattr(os, 'sched_getaffinity'):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if workers * threads != len(allowed):
        return None
    return [allowed[k * threads:(k + 1) * threads] for k in range(workers)]


def _pin_worker(cpu_sets):
    """Initializer of a batch's worker process: keep to the next CPU set of
    the queue ``cpu_sets`` (`_worker_cpu_sets`).

    Unpinned, the threads of two workers (each its main thread, its network
    thread and OpenVINO's) move between the CPUs and slow each other: on
    2 cores of an AMD EPYC, a batch's later groups took 6.1 s beside the
    other worker unpinned, 5.6 s pinned and 5.5 s for one worker alone
    (``benchmarks/bench_speed.py``, the batch rows).
    """
    import queue

    try:
        os.sched_setaffinity(0, cpu_sets.get(timeout=30))
    except (queue.Empty, OSError, ValueError):
        pass  # left unpinned: slower, not wrong


def _connect(scheduler):
    """A ``distributed.Client`` of a scheduler address (or the given client)."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError(f'scheduler {scheduler!r} is a dask.distributed address, '
                          f'but distributed is not installed; pip install '
                          f'"psfdeconv[dask]", or use threads or processes.') from None
    if not isinstance(scheduler, str):
        return scheduler
    try:
        # dask's own connect timeout (distributed.comm.timeouts.connect).
        return Client(scheduler, set_as_default=False)
    except OSError as exc:
        raise ConfigError(f'cannot connect to the dask scheduler {scheduler} ({exc}); '
                          f'start one (dask scheduler; dask worker {scheduler}) or use '
                          f'threads or processes.') from None


def _compute_on_cluster(tasks, keys, finished, client):
    """Run the group tasks on a dask.distributed cluster."""
    from distributed import as_completed

    futures = client.compute(tasks)
    # The loop of this client: it need not be the default client.
    for future in as_completed(futures, loop=client.loop):
        try:
            result = future.result()
        except Exception as exc:  # the task or its worker died
            result = _row(keys[future.key], 'failed', error=_error_text(exc),
                          finished=_utc_now())
        finished(result)
