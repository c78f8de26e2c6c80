# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
File output that is atomic and never overwrites by accident.

Every file psfdeconv writes goes first to a temporary file in the target's
own directory (so the final rename stays on one file system) and is moved
into place with `os.replace` only once complete: a crash leaves either the
old file or the complete new one, never half of one.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from .exceptions import OutputExistsError

__all__ = ['atomic_path', 'check_writable', 'write_table']


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
