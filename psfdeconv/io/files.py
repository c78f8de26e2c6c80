# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
File output that is atomic and never overwrites by accident.

Every file psfdeconv writes goes first to a temporary file in the target's
own directory (so the final rename stays on one file system) and is moved
into place with `os.replace` only once complete: a crash leaves either the
old file or the complete new one, never half of one.

The files of one run (``psfdeconv run``: catalogue, stamps, PSFs) are one
transaction (`output_transaction`): they are written into a hidden staging
directory inside the output directory, moved into place together, and a
completion marker `COMPLETE_NAME` listing them with their sizes and
SHA-256 is written last; a directory without a consistent marker is
incomplete (`run_is_complete`). A lock file `LOCK_NAME` holding the
writer's PID (`output_lock`) keeps two processes out of one directory.

The FITS tables psfdeconv writes (catalogues, batch summaries) keep their
whole ``meta`` as JSON in one header keyword, `META_KEYWORD`
(`write_table_with_meta`, `read_table_with_meta`), because FITS headers
cannot hold nested mappings.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .._warnings import catch_warnings
from ..exceptions import OutputExistsError, OutputLockedError, OutputWriteError

__all__ = ['atomic_path', 'check_writable', 'write_table', 'META_KEYWORD',
           'write_table_with_meta', 'read_table_with_meta', 'LOCK_NAME',
           'COMPLETE_NAME', 'output_lock', 'output_transaction', 'read_complete_marker',
           'run_is_complete', 'output_error', 'file_sha256']

#: A directory's lock file, created exclusively, holding the writer's PID.
LOCK_NAME = '.psfdeconv.lock'
#: A run's completion marker, written after all its files are in place.
COMPLETE_NAME = '.psfdeconv-complete.json'
#: Prefix of the staging directories of `output_transaction`.
STAGING_PREFIX = '.psfdeconv-staging-'

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


# --- One run's outputs as one transaction -------------------------------------------


def output_error(directory, exc):
    """An `~psfdeconv.exceptions.OutputWriteError` for an `OSError` met
    writing into ``directory``, saying what to do."""
    reason = {errno.ENOSPC: 'the file system is full',
              errno.EDQUOT: 'the disk quota is exceeded',
              errno.EROFS: 'the file system is read-only',
              errno.EACCES: 'permission denied',
              errno.EPERM: 'permission denied',
              errno.ENOTDIR: 'a part of the path is a file, not a directory'}.get(
        exc.errno, exc.strerror or str(exc))
    error = OutputWriteError(
        exc.errno, f'cannot write the outputs into {directory}: {reason} '
        f'({type(exc).__name__}: {exc}); the earlier outputs there, if any, are '
        f'unchanged. Free space, fix the permissions, or choose another --out.')
    error.filename = str(directory)
    return error


def _check_directory(directory):
    for part in [directory, *directory.parents]:
        if part.exists():
            if not part.is_dir():
                raise OutputWriteError(
                    errno.ENOTDIR, f'cannot write the outputs into {directory}: {part} '
                    f'is a file, not a directory; choose another --out.')
            return


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _take_lock(lock):
    from ..exceptions import StaleLockWarning

    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
                pid, host = int(owner['pid']), owner.get('host')
            except (OSError, ValueError, KeyError, TypeError):
                # Being written by its owner, or damaged: stale once old.
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10:
                    raise OutputLockedError(
                        f'{lock.parent} is locked by another process ({lock} was just '
                        f'created); wait for it to finish, or choose another --out.'
                    ) from None
                owner, pid, host = {}, None, socket.gethostname()
            if host != socket.gethostname() or (pid is not None and _pid_alive(pid)):
                raise OutputLockedError(
                    f'{lock.parent} is being written by process {pid} on {host} '
                    f'({owner.get("command", "?")}, since {owner.get("started", "?")}); '
                    f'wait for it to finish or stop it, or choose another --out. If '
                    f'that process no longer runs, remove {lock}.') from None
            warnings.warn(StaleLockWarning(
                f'{lock} was left by process {pid}, which no longer runs (killed?); '
                f'taking over {lock.parent}.'), stacklevel=4)
            lock.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise output_error(lock.parent, exc) from None
        with os.fdopen(fd, 'w') as file:
            json.dump({'pid': os.getpid(), 'host': socket.gethostname(),
                       'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                       'command': ' '.join(sys.argv)[:500]}, file)
        return
    raise OutputLockedError(f'{lock.parent} is locked by another process ({lock}); '
                            f'wait for it to finish, or choose another --out.')


@contextlib.contextmanager
def output_lock(directory):
    """Hold ``directory``'s lock (`LOCK_NAME`) while writing into it.

    The lock file is created with ``O_CREAT | O_EXCL`` and holds this
    process's PID, host and command. A lock of a live process raises
    `~psfdeconv.exceptions.OutputLockedError` at once, naming that process;
    one of a process that no longer runs (on this host) is taken over with a
    `~psfdeconv.exceptions.StaleLockWarning`. The directory is created if
    needed, and removed again on exit if it is then empty.

    Raises
    ------
    psfdeconv.exceptions.OutputLockedError
        Another process holds the lock.
    psfdeconv.exceptions.OutputWriteError
        ``directory`` is a file, or cannot be created or written.
    """
    directory = Path(directory)
    _check_directory(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(directory, exc) from None
    lock = directory / LOCK_NAME
    try:
        _take_lock(lock)
        try:
            yield directory
        finally:
            lock.unlink(missing_ok=True)
    finally:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if nothing was written


def file_sha256(path):
    """SHA-256 hex digest of a whole file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def output_transaction(directory):
    """Write a run's files so that they appear together or not at all.

    Yields a staging directory (hidden, inside ``directory``, so on its file
    system) to write every file into. On success the earlier completion
    marker is removed, the files are moved into ``directory`` with
    `os.replace`, and a new marker `COMPLETE_NAME` (file names, sizes and
    SHA-256, written atomically) is written last. On failure the staging
    directory is removed and ``directory`` is as before. Hold
    `output_lock` around it.

    An `OSError` (full disk, read-only) becomes
    `~psfdeconv.exceptions.OutputWriteError`.
    """
    from ..exceptions import PSFDeconvError

    directory = Path(directory)
    for old in directory.glob(f'{STAGING_PREFIX}*'):
        # Left by a killed run; ours alone, since we hold the lock.
        shutil.rmtree(old, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    except OSError as exc:
        raise output_error(directory, exc) from None
    try:
        try:
            yield staging
            names = sorted(path.name for path in staging.iterdir() if path.is_file())
            files = {name: {'bytes': (staging / name).stat().st_size,
                            'sha256': file_sha256(staging / name)} for name in names}
            for name in names:
                os.chmod(staging / name, 0o644)
            (directory / COMPLETE_NAME).unlink(missing_ok=True)
            # A kill from here on leaves no marker: the directory reads as incomplete.
            for name in names:
                os.replace(staging / name, directory / name)
            marker = {'files': files, 'pid': os.getpid(),
                      'finished': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
            with atomic_path(directory / COMPLETE_NAME, overwrite=True) as tmp:
                tmp.write_text(json.dumps(marker, indent=1))
        except OSError as exc:
            if isinstance(exc, PSFDeconvError):
                raise
            raise output_error(directory, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_complete_marker(directory):
    """The completion marker of a run directory (a dict), or None."""
    try:
        marker = json.loads((Path(directory) / COMPLETE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(
        marker.get('files'), dict) else None


def run_is_complete(directory, *, check_hashes=False):
    """Whether ``directory`` holds a complete run: its marker exists and
    every file it lists has the recorded size (and, with
    ``check_hashes``, SHA-256)."""
    directory = Path(directory)
    marker = read_complete_marker(directory)
    if marker is None:
        return False
    for name, record in marker['files'].items():
        path = directory / name
        try:
            if not path.is_file() or path.stat().st_size != record['bytes']:
                return False
            if check_hashes and file_sha256(path) != record['sha256']:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True
