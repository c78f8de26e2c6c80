# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""A run's outputs appear together or not at all; one writer per output directory
(`psfdeconv.io.output_transaction`, `psfdeconv.io.output_lock`)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import psfdeconv.io.files as files
from psfdeconv.batch import _read_marker
from psfdeconv.cli import main
from psfdeconv.exceptions import (
    ConfigError,
    ModelFileError,
    OutputLockedError,
    OutputWriteError,
    StaleLockWarning,
)
from psfdeconv.io import (
    COMPLETE_NAME,
    LOCK_NAME,
    read_catalog,
    read_complete_marker,
    run_is_complete,
)
from psfdeconv.pipeline import run_exposure_set
from psfdeconv.simulate import simulate_exposure, write_exposure_set

BANDS = ('g', 'r', 'i')
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'


@pytest.fixture(scope='module')
def exposures(tmp_path_factory):
    """A small three-band exposure set on disk: band -> path."""
    directory = tmp_path_factory.mktemp('exposures')
    field, truth = simulate_exposure((128, 128), n_galaxies=3, n_stars=3, seed=21)
    write_exposure_set(directory, field, truth)
    return {band: directory / f'{band}.fits' for band in BANDS}


@pytest.fixture(scope='module')
def first_run(exposures, tiny_model, tmp_path_factory):
    """One complete run, copied by the tests that run again into it."""
    out = tmp_path_factory.mktemp('first') / 'out'
    run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model)
    return out


def snapshot(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def copy_run(first_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(first_run, out)
    return out, snapshot(out)


def assert_clean(out):
    """No lock and no staging directory left behind."""
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob(f'{files.STAGING_PREFIX}*'))


def test_marker_lists_every_file(first_run):
    marker = read_complete_marker(first_run)
    assert sorted(marker['files']) == ['catalog.fits', 'psf_g.fits', 'psf_i.fits',
                                       'psf_r.fits', 'stamps.fits']
    assert run_is_complete(first_run, check_hashes=True)
    assert read_catalog(first_run / 'catalog.fits').meta['model']['verified'] is True
    assert_clean(first_run)


def test_interrupted_commit_leaves_an_incomplete_directory(first_run, tmp_path,
                                                           exposures, tiny_model,
                                                           monkeypatch):
    """Killed after stamps.fits is moved and before catalog.fits is: no marker, so the
    directory (and a batch group in it) reads as incomplete, never as a finished run."""
    out, _ = copy_run(first_run, tmp_path)
    (out / 'done.json').write_text('{}')  # as if a batch group
    real_replace = os.replace
    moved = []

    def replace(source, target):
        committing = os.path.dirname(target) == str(out) and str(source).startswith(
            str(out / files.STAGING_PREFIX))
        if committing and moved:
            raise KeyboardInterrupt  # the process dies here
        if committing:
            moved.append(os.path.basename(target))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, 'replace', replace)
    with pytest.raises(KeyboardInterrupt):
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True)
    monkeypatch.undo()
    assert moved == ['catalog.fits']  # moved in name order
    assert not (out / COMPLETE_NAME).exists()
    assert not run_is_complete(out)
    assert _read_marker(out) is None
    assert_clean(out)


def test_changed_file_makes_the_directory_inconsistent(first_run, tmp_path):
    out, _ = copy_run(first_run, tmp_path)
    (out / 'done.json').write_text('{}')
    assert _read_marker(out) == {}
    data = bytearray((out / 'catalog.fits').read_bytes())
    data[-1] ^= 1
    (out / 'catalog.fits').write_bytes(bytes(data))
    assert run_is_complete(out)  # same size
    assert not run_is_complete(out, check_hashes=True)
    assert _read_marker(out) is None


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    yield process.pid
    process.kill()
    process.wait()


def write_lock(out, pid):
    (out / LOCK_NAME).write_text(json.dumps({
        'pid': pid, 'host': files.socket.gethostname(), 'started': 'earlier',
        'command': 'psfdeconv run --out elsewhere'}))


def test_second_run_fails_at_once_naming_the_process(first_run, tmp_path, exposures,
                                                     live_process, capsys):
    out, _ = copy_run(first_run, tmp_path)
    write_lock(out, live_process)
    before = snapshot(out)
    with pytest.raises(OutputLockedError, match=f'process {live_process} '):
        run_exposure_set(exposures, out, psfs=MOFFAT, model='unused.keras',
                         overwrite=True)
    arguments = ['run', '--psf', MOFFAT, '--out', str(out), '--overwrite']
    for band, path in exposures.items():
        arguments += ['--band', f'{band}={path}']
    assert main(arguments) == 5
    assert str(live_process) in capsys.readouterr().err
    assert snapshot(out) == before  # the other process's lock included


def test_batch_into_a_locked_directory(tmp_path, live_process, exposures):
    from psfdeconv.batch import run_batch

    out = tmp_path / 'batch'
    out.mkdir()
    write_lock(out, live_process)
    manifest = tmp_path / 'groups.csv'
    manifest.write_text('id,g,r,i\nf0,' + ','.join(str(exposures[band]) for band in BANDS)
                        + '\n')
    with pytest.raises(OutputLockedError, match=str(live_process)):
        run_batch(manifest, out)
    assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]


def test_stale_lock_is_taken_over(first_run, tmp_path, exposures, tiny_model):
    out, _ = copy_run(first_run, tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    write_lock(out, dead.pid)
    with pytest.warns(StaleLockWarning, match=f'process {dead.pid}, which no longer runs'):
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True)
    assert run_is_complete(out, check_hashes=True)
    assert_clean(out)


def test_full_disk_leaves_the_old_outputs_whole(first_run, tmp_path, exposures,
                                                tiny_model, monkeypatch):
    out, before = copy_run(first_run, tmp_path)

    def full(table, path, **kwargs):
        path.write_bytes(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device', str(path))

    monkeypatch.setattr('psfdeconv.io.write_catalog', full)
    with pytest.raises(OutputWriteError, match='file system is full') as info:
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True)
    assert str(out) in str(info.value) and 'unchanged' in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert snapshot(out) == before
    assert_clean(out)


def test_read_only_directory(first_run, tmp_path, exposures, tiny_model, monkeypatch):
    out, before = copy_run(first_run, tmp_path)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, 'Read-only file system', str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, 'open', read_only)
    with pytest.raises(OutputWriteError, match='read-only'):
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True)
    monkeypatch.undo()
    assert snapshot(out) == before


@pytest.mark.parametrize('where', ['out', 'parent'])
def test_not_a_directory(tmp_path, exposures, tiny_model, where):
    blocker = tmp_path / 'file'
    blocker.write_bytes(b'mine')
    out = blocker if where == 'out' else blocker / 'out'
    # Refused up front (check_output_location, a usage error); output_lock's own check
    # (OutputWriteError) covers a file that appears later.
    with pytest.raises(ConfigError, match='file, not a directory'):
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model)
    assert blocker.read_bytes() == b'mine'
    with pytest.raises(OutputWriteError, match='is a file, not a directory'), \
            files.output_lock(out):
        pass
    assert blocker.read_bytes() == b'mine'


def test_trusted_model_is_recorded(tiny_model_path, tmp_path, exposures):
    model = tmp_path / 'old.keras'
    shutil.copyfile(tiny_model_path, model)
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    del card['card_sha256'], card['config_sha256']
    model.with_suffix('.json').write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match='--trust-model'):
        run_exposure_set(exposures, tmp_path / 'refused', psfs=MOFFAT, model=model)
    assert not (tmp_path / 'refused').exists()
    catalog, _ = run_exposure_set(exposures, tmp_path / 'out', psfs=MOFFAT, model=model,
                                  trust_model=True)
    assert catalog.meta['model']['verified'] is False
    assert read_catalog(tmp_path / 'out' / 'catalog.fits').meta['model']['verified'] is False


def test_plots_are_part_of_the_transaction(first_run, tmp_path, exposures, tiny_model,
                                           monkeypatch):
    out, _ = copy_run(first_run, tmp_path)
    run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True,
                     plots=True)
    marker = read_complete_marker(out)
    assert {'catalog_overview.png', 'stamps.png'} <= set(marker['files'])
    assert run_is_complete(out, check_hashes=True)
    # A run that fails while plotting leaves the outputs (figures included) as they were.
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr('psfdeconv.plotting.write_run_plots', broken)
    with pytest.raises(OutputWriteError):
        run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True,
                         plots=True)
    assert snapshot(out) == before
    assert_clean(out)
    monkeypatch.undo()
    # A run without --plots removes the figures of the outputs it replaces.
    run_exposure_set(exposures, out, psfs=MOFFAT, model=tiny_model, overwrite=True)
    assert not (out / 'catalog_overview.png').exists()
    assert not (out / 'stamps.png').exists()
    assert run_is_complete(out, check_hashes=True)
