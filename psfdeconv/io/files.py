# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
File output that is atomic and never overwrites by accident.

Every file psfdeconv writes goes first to a temporary file in the target's
own directory (so the final rename stays on one file system) and is moved
into place with `os.replace` only once complete: a crash leaves either the
old file or the complete new one, never half of one.

The FITS tables psfdeconv writes (catalogues, batch summaries) keep their
whole ``meta`` as JSON in one header keyword, `META_KEYWORD`
(`write_table_with_meta`, `read_table_with_meta`), because FITS headers
cannot hold nested mappings.
"""

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .._warnings import catch_warnings
from ..exceptions import OutputExistsError

__all__ = ['atomic_path', 'check_writable', 'write_table', 'META_KEYWORD',
           'write_table_with_meta', 'read_table_with_meta']

#: Header keyword holding a table's full meta as JSON.
META_KEYWORD = 'PSFDMETA'


def check_writable(path, *, overwrite=False):
    """Raise `~psfdeconv.exceptions.OutputExistsError` if ``path`` exists
    and ``overwrite`` is False; return ``path`` as a `~pathlib.Path`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f'{path} exists; pass overwrite=True '
                                f'(--overwrite on the command line) to '
                                f'replace it.')
    return path


@contextlib.contextmanager
def atomic_path(path, *, overwrite=False):
    """Context manager yielding a temporary path renamed to ``path`` on
    success and removed on failure.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The final file.
    overwrite : bool, optional
        Allow replacing an existing file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from psfdeconv.io import atomic_path
    >>> target = pathlib.Path(tempfile.mkdtemp()) / 'out.txt'
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text('done')
    >>> target.read_text()
    'done'
    """
    path = check_writable(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp',
                                    dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        # Check again: another process may have written it meanwhile.
        check_writable(path, overwrite=overwrite)
        # mkstemp makes owner-only files; give the usual permissions.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_table(table, path, *, overwrite=False, format=None):
    """Write an astropy table atomically (FITS, ECSV, ... by extension).

    Parameters
    ----------
    table : `~astropy.table.Table` or `~astropy.table.QTable`
        The table.
    path : str or `~pathlib.Path`
        Output file; the format follows its extension unless given.
    overwrite : bool, optional
        Replace an existing file.
    format : str, optional
        An astropy unified I/O format name.

    Returns
    -------
    `~pathlib.Path`
        The written file.
    """
    path = Path(path)
    if format is None:
        suffix = path.suffix.lower()
        format = {'.fits': 'fits', '.fit': 'fits', '.ecsv': 'ascii.ecsv',
                  '.csv': 'ascii.csv'}.get(suffix, None)
    with atomic_path(path, overwrite=overwrite) as tmp:
        table.write(tmp, format=format, overwrite=True)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_table_with_meta(table, path, *, keywords=None, overwrite=False):
    """Write a table to FITS atomically, its ``meta`` as JSON in `META_KEYWORD`.

    Parameters
    ----------
    table : `~astropy.table.Table` or `~astropy.table.QTable`
        The table; its meta may nest dicts and lists (numpy values become
        Python numbers, other objects strings).
    path : str or `~pathlib.Path`
        Output FITS file.
    keywords : dict, optional
        Short header keywords written beside the JSON, for readers of the
        header alone (e.g. ``{'BANDS': 'g,r,i'}``).
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.table import Table
    >>> from psfdeconv.io import read_table_with_meta, write_table_with_meta
    >>> table = Table({'a': [1, 2]}, meta={'nested': {'b': [1, 2]}})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 't.fits'
    >>> _ = write_table_with_meta(table, path, keywords={'NOTE': 'x'})
    >>> read_table_with_meta(path).meta
    {'nested': {'b': [1, 2]}}
    """
    from astropy.utils.exceptions import AstropyUserWarning

    out = table.copy(copy_data=False)
    out.meta.clear()
    out.meta.update(keywords or {})
    out.meta[META_KEYWORD] = json.dumps(dict(table.meta), default=_json_default,
                                        separators=(',', ':'))
    with catch_warnings():
        # Units outside the FITS standard (e.g. SDSS nanomaggies) lose their
        # TUNIT keyword but round-trip through astropy's serialised meta.
        warnings.filterwarnings('ignore', message='.*could not be saved in native '
                                'FITS format', category=AstropyUserWarning)
        return write_table(out, path, overwrite=overwrite, format='fits')


def read_table_with_meta(path, *, required=False):
    """Read a FITS table of `write_table_with_meta` with its full ``meta``.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.
    required : bool, optional
        Raise `KeyError` if the header has no `META_KEYWORD`; otherwise the
        header keywords are the meta.

    Returns
    -------
    `~astropy.table.QTable`
    """
    from astropy.table import QTable

    table = QTable.read(path, format='fits')
    text = table.meta[META_KEYWORD] if required else table.meta.get(META_KEYWORD)
    if text is not None:
        table.meta.clear()
        table.meta.update(json.loads(text))
    return table
