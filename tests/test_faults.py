# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fault tests: killed runs, unwritable or full output locations, refused outputs, corrupt
models -- the process-level behaviour behind docs/robustness.rst.

Outputs must be complete or absent: psfdeconv writes to a hidden temporary file beside the
target (``.NAME.XXXXXXXX.tmp``) and renames it into place only when complete
(`psfdeconv.io.atomic_path`). The command line is run as a real subprocess where its exit
status or a signal matters, and in-process (`psfdeconv.cli.main`) where a failure has to be
injected with ``monkeypatch``.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import psfdeconv
from psfdeconv.cli import main
from psfdeconv.exceptions import OutputExistsError
from psfdeconv.simulate import SimulationConfig, SimulationFile, write_simulation

#: A fast simulation configuration for the files these tests only need to exist.
SMALL = SimulationConfig(stamp_size=16, psf_size=7, oversampling=1)

#: Makes the package importable in the subprocesses whether or not it is installed.
_PACKAGE_ROOT = str(Path(psfdeconv.__file__).resolve().parents[1])


def _environment():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get('PYTHONPATH'))
                                        if p)
    return env


def run_cli(*args, timeout=120):
    """``python -m psfdeconv.cli ARGS`` to completion; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, '-m', 'psfdeconv.cli', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_environment())


def temp_files(directory, target_name):
    """The hidden temporary files `atomic_path` makes for ``target_name``."""
    pattern = re.compile(rf'\.{re.escape(target_name)}\.[^.]+\.tmp')
    return sorted(p.name for p in Path(directory).iterdir() if pattern.fullmatch(p.name))


def call_cli_in_process(argv, capsys):
    """Run `main`; return (exception or None, exit code or None, stderr)."""
    try:
        code = main(argv)
    except Exception as exc:  # an unhandled error: what the user sees is its traceback
        return exc, None, capsys.readouterr().err
    return None, code, capsys.readouterr().err


@pytest.fixture(scope='module')
def small_sims(tmp_path_factory):
    """A 2-object, 16-pixel simulation file (valid stamps for the CLI to read)."""
    path = tmp_path_factory.mktemp('faults') / 'stamps.h5'
    return write_simulation(path, 2, config=SMALL, seed=3, n_workers=1)


# --- (a) killed runs leave the output complete or absent --------------------------------------


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
def test_killed_simulation_leaves_no_output(tmp_path, sig):
    out = tmp_path / 'OUT.h5'
    # 4000 default objects take about a minute: the kill lands while the file is open.
    process = subprocess.Popen(
        [sys.executable, '-m', 'psfdeconv.cli', 'simulate', '--n', '4000', '--seed', '1',
         '--workers', '1', '--out', str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment())
    try:
        deadline = time.monotonic() + 60
        while not temp_files(tmp_path, out.name) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        assert temp_files(tmp_path, out.name), 'the run never started writing'
        time.sleep(1.0)  # well into the run: the HDF5 file is open and being filled
        assert process.poll() is None, 'the run ended before it could be killed'
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    # Complete or absent: the target never exists. SIGTERM unwinds the CLI (exit 128 + 15)
    # through atomic_path's clean-up, so the temporary file is gone too; SIGKILL cannot be
    # handled and leaves the hidden temporary file behind.
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if sig == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert leftovers == []
    else:
        assert process.returncode == -sig
        assert leftovers == temp_files(tmp_path, out.name)

    # A rerun (smaller, to keep the test short) completes despite the stale temporary file.
    result = run_cli('simulate', '--n', 40, '--seed', 1, '--workers', 1, '--out', out)
    assert result.returncode == 0, result.stderr
    with SimulationFile(out) as sims:
        assert len(sims) == 40
        assert sims.seed == 1
        assert sims['observed'].shape == (40, 3, 64, 64)
        assert np.isfinite(sims['observed'][-1]).all()
    assert out.name not in temp_files(tmp_path, out.name)


# --- (b) read-only output directory, refused temporary file, full disk ------------------------


@pytest.fixture
def old_output(tmp_path):
    """An existing output file (to be overwritten) and its bytes."""
    path = write_simulation(tmp_path / 'sims.h5', 2, config=SMALL, seed=5, n_workers=1)
    return path, path.read_bytes()


def assert_old_output_intact(path, before):
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_read_only_output_directory(old_output, capsys):
    path, before = old_output
    directory = path.parent
    directory.chmod(0o555)
    try:
        probe = directory / '.probe'
        try:
            probe.write_bytes(b'')
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip(f'running as root (euid {os.geteuid()}): chmod 0o555 does not stop '
                        f'writes; test_refused_temporary_file covers this failure for root')
        with pytest.raises(PermissionError) as info:
            write_simulation(path, 3, config=SMALL, n_workers=1, overwrite=True)
        assert str(directory) in str(info.value)
        assert_old_output_intact(path, before)

        error, code, stderr = call_cli_in_process(
            ['simulate', '--n', '3', '--out', str(path), '--workers', '1', '--overwrite'],
            capsys)
        assert isinstance(error, PermissionError) or (code not in (None, 0)
                                                      and str(directory) in stderr)
        assert_old_output_intact(path, before)
    finally:
        directory.chmod(0o755)


def _refuse_mkstemp(*args, dir=None, prefix='', suffix='', **kwargs):
    # What mkstemp raises in a directory the user may not write to.
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                          os.path.join(dir, f'{prefix}abcdefgh{suffix}'))


def test_refused_temporary_file(old_output, monkeypatch, capsys):
    """A directory that refuses the temporary file (the read-only case, also for root)."""
    path, before = old_output
    monkeypatch.setattr(tempfile, 'mkstemp', _refuse_mkstemp)
    with pytest.raises(PermissionError) as info:
        write_simulation(path, 3, config=SMALL, n_workers=1, overwrite=True)
    assert str(path.parent) in str(info.value) and 'Permission denied' in str(info.value)
    assert_old_output_intact(path, before)

    from astropy.table import Table

    from psfdeconv.io import write_table

    with pytest.raises(PermissionError):
        write_table(Table({'a': [1, 2]}), path.parent / 'table.ecsv')
    assert_old_output_intact(path, before)

    error, code, stderr = call_cli_in_process(
        ['simulate', '--n', '3', '--out', str(path), '--workers', '1', '--overwrite'], capsys)
    assert isinstance(error, PermissionError) or (code not in (None, 0)
                                                  and 'Permission denied' in stderr)
    assert_old_output_intact(path, before)


def test_disk_full_at_the_rename(old_output, monkeypatch, capsys):
    """ENOSPC from the final os.replace: the error propagates, the old file stays, and the
    temporary file is removed."""
    path, before = old_output

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(os, 'replace', full_disk)
    with pytest.raises(OSError) as info:
        write_simulation(path, 3, config=SMALL, n_workers=1, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert 'No space left on device' in str(info.value) and str(path) in str(info.value)
    assert_old_output_intact(path, before)

    error, code, stderr = call_cli_in_process(
        ['simulate', '--n', '3', '--out', str(path), '--workers', '1', '--overwrite'], capsys)
    assert (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        code not in (None, 0) and 'No space left on device' in stderr)
    assert_old_output_intact(path, before)


@pytest.fixture
def file_size_limit():
    """Lower this process's file-size limit (RLIMIT_FSIZE) for the test: writes past it
    fail with EFBIG, a real mid-write I/O failure like a full disk, also for root. Python
    ignores SIGXFSZ, so the failing write raises instead of killing the process."""
    if resource is None or signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
        pytest.skip('needs RLIMIT_FSIZE and an ignored SIGXFSZ (POSIX CPython)')
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 1 << 20

    def lower():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    try:
        yield lower
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_while_writing(old_output, file_size_limit):
    """A write that fails half-way through the HDF5 file (40 default objects are ~5 MB, the
    limit 1 MiB): the caller gets the OSError, the old file stays, no temporary file."""
    path, before = old_output
    file_size_limit()
    with pytest.raises(Exception) as info:
        write_simulation(path, 40, seed=1, n_workers=1, overwrite=True)
    assert_old_output_intact(path, before)
    # The I/O error itself (errno EFBIG, 'File too large'), not h5py's follow-up failure to
    # close the broken file ("RuntimeError: Can't decrement id ref count").
    assert isinstance(info.value, OSError), repr(info.value)
    assert info.value.errno == errno.EFBIG


def test_cli_disk_full_while_writing(old_output):
    """The same failure from the command line: a non-zero exit that is not 'output exists',
    the I/O error in the message, the old file intact and no temporary file."""
    if resource is None:
        pytest.skip('needs RLIMIT_FSIZE (POSIX)')
    path, before = old_output
    script = ('import resource, sys\n'
              'soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)\n'
              'resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))\n'
              'from psfdeconv.cli import main\n'
              f'sys.exit(main(["simulate", "--n", "40", "--out", {str(path)!r}, '
              f'"--workers", "1", "--overwrite"]))\n')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=120, env=_environment())
    assert result.returncode not in (0, 5)
    assert 'File too large' in result.stderr
    assert_old_output_intact(path, before)


# --- (c) existing outputs are refused, byte-identical -----------------------------------------


def test_existing_simulation_output_exits_5(old_output):
    path, before = old_output
    result = run_cli('simulate', '--n', 3, '--seed', 9, '--workers', 1, '--out', path)
    assert result.returncode == OutputExistsError.exit_code == 5
    assert f'psfdeconv simulate: error: {path} exists' in result.stderr
    assert '--overwrite' in result.stderr
    assert 'Traceback' not in result.stderr
    assert_old_output_intact(path, before)


def test_existing_deconvolve_output_exits_5_before_any_work(small_sims, tmp_path):
    """The output is checked first: a garbage model is never opened (exit 5, not 4)."""
    out = tmp_path / 'out.fits'
    out.write_bytes(b'precious results')
    garbage = tmp_path / 'garbage.keras'
    garbage.write_bytes(b'\x00garbage' * 10)
    result = run_cli('deconvolve', '--stamps', small_sims, '--model', garbage, '--out', out)
    assert result.returncode == 5, result.stderr
    assert str(out) in result.stderr and '--overwrite' in result.stderr
    assert out.read_bytes() == b'precious results'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['garbage.keras', 'out.fits']


def test_existing_model_exits_5_before_training(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model.keras').write_bytes(b'an earlier model')
    # The simulation file does not even exist: the output check comes first.
    assert main(['train', str(tmp_path / 'missing.h5'), '--out', str(run)]) == 5
    assert 'model.keras exists' in capsys.readouterr().err
    assert (run / 'model.keras').read_bytes() == b'an earlier model'
    assert sorted(p.name for p in run.iterdir()) == ['model.keras']


# --- (d) corrupt models exit 4 with the path ------------------------------------------------


def _truncated_zip(path):
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('config.json', '{"class_name": "Functional"}')
        archive.writestr('model.weights.h5', np.random.default_rng(0).bytes(20000))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('damage', ['missing', 'empty', 'garbage', 'truncated'])
def test_corrupt_model_exits_4_with_its_path(small_sims, tmp_path, damage):
    model = tmp_path / f'{damage}.keras'
    if damage == 'empty':
        model.write_bytes(b'')
    elif damage == 'garbage':
        model.write_bytes(np.random.default_rng(1).bytes(5000))
    elif damage == 'truncated':
        _truncated_zip(model)
    result = run_cli('deconvolve', '--stamps', small_sims, '--model', model)
    assert result.returncode == 4, result.stderr
    assert 'psfdeconv deconvolve: error: model file' in result.stderr
    assert str(model) in result.stderr
    assert 'Traceback' not in result.stderr
