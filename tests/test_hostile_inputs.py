# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Hostile and unlucky inputs: each is refused before any work with a
`~psfdeconv.exceptions.PSFDeconvError` (or argparse's usage error) whose
message names the value, and no Python traceback reaches a command-line user
(docs/robustness.rst)."""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psfdeconv import cli
from psfdeconv._validation import check_band_names, check_output_location, positive_int
from psfdeconv.batch import read_manifest, run_batch
from psfdeconv.cli import main
from psfdeconv.deconvolve import deconvolve_stamps
from psfdeconv.exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    MissingDependencyError,
    ShapeMismatchError,
)
from psfdeconv.io import read_exposure_set
from psfdeconv.pipeline import deconvolve_catalog, run_exposure_set

#: The exit codes docs/robustness.rst documents.
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6}


def call(argv, capsys):
    """Exit code and standard error of ``psfdeconv ARGV`` run in this process
    (argparse's usage errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def one_stamp():
    """A valid (1, 1, 64, 64) stamp with a delta PSF: validation passes it."""
    stamps = np.zeros((1, 1, 64, 64))
    stamps[0, 0, 32, 32] = 100.0
    psfs = np.zeros((1, 1, 5, 5))
    psfs[0, 0, 2, 2] = 1.0
    return stamps, psfs


# --- 1. no traceback reaches a command-line user ----------------------------------

@pytest.mark.parametrize('error', [KeyError('boom'), ZeroDivisionError('division by zero')])
def test_internal_error_is_one_line(monkeypatch, capsys, error):
    def broken(args):
        raise error

    monkeypatch.setattr(cli, '_cmd_info', broken)
    code, err = call(['info'], capsys)
    assert code == 1
    assert 'Traceback' not in err
    name = type(error).__name__
    assert err.strip() == (f'psfdeconv info: internal error: {name}: {error} (run with -v '
                           f'for the traceback)')


def test_internal_error_traceback_with_verbose(monkeypatch, capsys):
    def broken(args):
        return 1 / 0

    monkeypatch.setattr(cli, '_cmd_info', broken)
    code, err = call(['info', '-v'], capsys)
    assert code == 1
    assert 'Traceback (most recent call last)' in err
    assert 'return 1 / 0' in err
    assert err.rstrip().endswith('internal error: ZeroDivisionError: division by zero '
                                 '(run with -v for the traceback)')


# --- 2. Keras or its backend not installed -------------------------------------

@pytest.fixture
def without_keras(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == 'keras' else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, 'find_spec', find_spec)


@pytest.mark.parametrize('argv', [
    ['run', '--example'], ['deconvolve', '--example'], ['batch', 'missing.csv'],
    ['evaluate', 'missing.h5']])
def test_missing_keras_is_refused_before_any_work(without_keras, monkeypatch, capsys,
                                                  tmp_path, argv):
    import psfdeconv.io

    def no_work(*args, **kwargs):
        raise AssertionError('work started before the Keras check')

    monkeypatch.setattr(psfdeconv.io, 'example_exposures', no_work)
    code, err = call(argv + ['--out', str(tmp_path / 'out')] if argv[0] != 'evaluate'
                     else argv, capsys)
    assert code == MissingDependencyError.exit_code == 1
    assert "pip install 'psfdeconv[cpu]'" in err and 'psfdeconv[gpu]' in err
    assert f"KERAS_BACKEND = {os.environ.get('KERAS_BACKEND') or 'tensorflow'!r}" in err
    assert 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('backend', ['jax_not_installed_here', 'no_such.module'])
def test_missing_backend_named_by_keras_backend(monkeypatch, capsys, tmp_path, backend):
    monkeypatch.setenv('KERAS_BACKEND', backend)
    code, err = call(['run', '--example', '--out', str(tmp_path / 'out')], capsys)
    assert code == 1
    assert f"KERAS_BACKEND = {backend!r}; keras or {backend} is not installed" in err
    assert issubclass(MissingDependencyError, ImportError)


def test_info_names_the_backend(monkeypatch, capsys):
    import json

    assert cli._backend_version('tensorflow').startswith('tensorflow ')
    real = importlib.metadata.version

    def version(name):
        if name.startswith('tensorflow'):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, 'version', version)
    assert cli._backend_version('tensorflow') == 'tensorflow (not installed)'
    versions = cli._versions()
    assert versions['keras backend'] == 'tensorflow (not installed)'
    monkeypatch.undo()
    code, out = main(['info', '--json']), capsys.readouterr().out
    assert code == 0
    assert json.loads(out)['versions']['keras backend'].startswith('tensorflow ')


# --- 3. numeric options ---------------------------------------------------------

@pytest.mark.parametrize('value', ['0', '-1', '2.5', 'many', ''])
def test_cli_batch_size_must_be_positive(capsys, tmp_path, value):
    code, err = call(['run', '--band', f'g={tmp_path / "g.fits"}', '--out',
                      str(tmp_path / 'out'), f'--batch-size={value}'], capsys)
    assert code == 2
    assert f"argument --batch-size: {value!r} is not a whole number >= 1" in err


@pytest.mark.parametrize('value', ['0', '-0.3', 'nan', 'inf'])
def test_cli_target_fwhm_must_be_positive(capsys, tmp_path, value):
    code, err = call(['run', '--band', f'g={tmp_path / "g.fits"}', '--out',
                      str(tmp_path / 'out'), f'--target-fwhm={value}'], capsys)
    assert code == 2 and 'argument --target-fwhm' in err


@pytest.mark.parametrize('batch_size', [0, -3, 2.5, True, '64', None])
def test_python_batch_size_must_be_positive(batch_size, tmp_path):
    stamps, psfs = one_stamp()
    text = f'batch_size = {batch_size!r}; it must be a whole number >= 1'
    with pytest.raises(InvalidInputError, match=f'^{text}'.replace('(', r'\(')):
        deconvolve_stamps(stamps, psfs, pixel_scale=0.2, batch_size=batch_size)
    with pytest.raises(InvalidInputError, match='batch_size = '):
        deconvolve_catalog({}, batch_size=batch_size)
    with pytest.raises(InvalidInputError, match='batch_size = '):
        run_exposure_set({}, tmp_path / 'out', batch_size=batch_size)
    with pytest.raises(ConfigError, match='batch_size = '):
        run_batch(tmp_path / 'missing.csv', tmp_path / 'out', batch_size=batch_size)
    assert not (tmp_path / 'out').exists()
    assert positive_int(np.int64(3), 'n') == 3


@pytest.mark.parametrize('noise_sigma', [-1.0, 0.0, np.nan, np.inf, [1.0, -2.0]])
def test_noise_sigma_must_be_positive_and_finite(noise_sigma):
    stamps, psfs = one_stamp()
    stamps, psfs = np.repeat(stamps, 2, axis=0), np.repeat(psfs, 2, axis=0)
    with pytest.raises(InvalidInputError, match=r'^noise_sigma\[\d, 0\] = .*; a per-pixel '
                                                r'noise standard deviation must be '
                                                r'positive and finite'):
        deconvolve_stamps(stamps, psfs, pixel_scale=0.2,
                          noise_sigma=np.reshape(noise_sigma, (-1, 1)))


def test_noise_sigma_of_wrong_shape():
    stamps, psfs = one_stamp()
    with pytest.raises(InvalidInputError, match='does not broadcast'):
        deconvolve_stamps(stamps, psfs, pixel_scale=0.2, noise_sigma=[1.0, 2.0, 3.0])


@pytest.mark.parametrize('cut', [np.s_[:0], np.s_[:, :0], np.s_[..., :0, :]])
def test_empty_stamps_are_refused(cut):
    """No objects, no bands or no rows: one clear error (it was numpy's reshape
    error for zero objects)."""
    stamps, psfs = one_stamp()
    psf_cut = cut if cut != np.s_[..., :0, :] else np.s_[:]
    with pytest.raises(ShapeMismatchError, match=r'^stamps have shape \(.*0.*\): no pixels'):
        deconvolve_stamps(stamps[cut], psfs[psf_cut], pixel_scale=0.2)


@pytest.mark.parametrize('value', [1e300, -1e31, 2e30])
def test_huge_pixel_values_are_refused(value):
    stamps, psfs = one_stamp()
    stamps[0, 0, 10, 20] = value
    with pytest.raises(InvalidPixelsError, match=r'^stamps\[0, 0, 10, 20\] = .*; 1 '
                                                 r'pixel\(s\) lie beyond \+-1e\+30'):
        deconvolve_stamps(stamps, psfs, pixel_scale=0.2)


# --- 4. band names --------------------------------------------------------------

@pytest.mark.parametrize('band', ['γ', 'r band', '1', 'g-r', 'ñ'])
def test_cli_band_names_must_be_ascii_identifiers(capsys, tmp_path, band):
    code, err = call(['run', '--band', f'{band}={tmp_path / "g.fits"}', '--out',
                      str(tmp_path / 'out')], capsys)
    assert code == 2
    assert f'the band name {band!r} is not an ASCII identifier' in err
    assert 'Traceback' not in err and not (tmp_path / 'out').exists()


def test_python_band_names_must_be_ascii_identifiers(tmp_path):
    with pytest.raises(InvalidInputError, match=r'identifiers \(ASCII letters'):
        check_band_names(['γ'], 1)
    with pytest.raises(InvalidInputError, match=r'identifiers \(ASCII letters'):
        read_exposure_set({'γ': tmp_path / 'g.fits'})
    (tmp_path / 'g.fits').write_bytes(b'')
    (tmp_path / 'batch.csv').write_text('id,γ\nf1,g.fits\n', encoding='utf-8')
    with pytest.raises(ConfigError, match='not identifiers'):
        read_manifest(tmp_path / 'batch.csv')


# --- 5. manifests saved as "CSV UTF-8" ------------------------------------------

@pytest.mark.parametrize('bom, newline', [(True, '\r\n'), (True, '\n'), (False, '\r\n'),
                                          (False, '\r')])
def test_manifest_with_bom_and_crlf(tmp_path, bom, newline):
    for name in ('g.fits', 'r.fits', 'sources.ecsv'):
        (tmp_path / name).write_bytes(b'')
    lines = ['id,g,r,catalog,unit_r', '007,g.fits,r.fits,sources.ecsv,adu',
             'f2,g.fits,r.fits,,']
    (tmp_path / 'clean.csv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    (tmp_path / 'excel.csv').write_bytes(
        (b'\xef\xbb\xbf' if bom else b'') + newline.join(lines + ['']).encode())
    clean, excel = (read_manifest(tmp_path / name) for name in ('clean.csv', 'excel.csv'))
    assert excel.colnames == clean.colnames
    assert excel.meta['bands'] == clean.meta['bands'] == ['g', 'r']
    for name in clean.colnames:
        assert list(excel[name]) == list(clean[name])
    assert excel['id'][0] == '007' and excel['unit_r'][0] == 'adu'


# --- 6. an --out that can never be written --------------------------------------

@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('not a directory')
    return path


@pytest.mark.parametrize('command', ['run', 'batch'])
def test_out_is_a_regular_file(capsys, tmp_path, a_file, command):
    inputs = (['--band', f'g={tmp_path / "g.fits"}'] if command == 'run'
              else [str(tmp_path / 'missing.csv')])
    code, err = call([command, *inputs, '--out', str(a_file)], capsys)
    assert code == ConfigError.exit_code == 2
    assert f"--out = '{a_file}'; it is an existing file, not a directory" in err or \
        f"out_dir = '{a_file}'; it is an existing file" in err
    assert a_file.read_text() == 'not a directory'


@pytest.mark.parametrize('argv', [['run', '--band', 'g=g.fits'], ['deconvolve', '--example'],
                                  ['batch', 'missing.csv']])
def test_out_below_a_regular_file(capsys, a_file, argv):
    out = a_file / 'sub' / ('x.fits' if argv[0] == 'deconvolve' else 'dir')
    code, err = call([*argv, '--out', str(out)], capsys)
    assert code == 2
    assert f"'{a_file}' is a file, not a directory, so nothing can be created" in err
    assert 'Traceback' not in err


def test_python_out_dir_is_checked_before_any_work(a_file):
    with pytest.raises(ConfigError, match='it is an existing file, not a directory'):
        run_exposure_set({'g': 'missing.fits'}, a_file)
    with pytest.raises(ConfigError, match='is a file, not a directory'):
        run_batch('missing.csv', a_file / 'out')


def test_read_only_out_directory(capsys, tmp_path):
    directory = tmp_path / 'locked'
    directory.mkdir()
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip(f'running as root (euid {os.geteuid()}): chmod 0o555 does not '
                        f'stop writes; test_unwritable_out_directory covers the check')
        code, err = call(['run', '--band', 'g=g.fits', '--out', str(directory / 'run')],
                         capsys)
        assert code == 2 and 'may not be written to (permission denied)' in err
    finally:
        directory.chmod(0o755)


def test_unwritable_out_directory(monkeypatch, capsys, tmp_path):
    """The same refusal where the test runs as root: os.access says no."""
    real = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode, **kwargs: (
        False if str(path) == str(tmp_path) else real(path, mode, **kwargs)))
    code, err = call(['run', '--band', 'g=g.fits', '--out', str(tmp_path / 'run')], capsys)
    assert code == 2
    assert (f"--out = '{tmp_path / 'run'}'; the directory '{tmp_path}' may not be written "
            f"to (permission denied)") in err
    with pytest.raises(ConfigError, match='may not be written to'):
        check_output_location(tmp_path / 'x.fits', 'out')



@pytest.mark.parametrize('argv', [
    ['simulate', '--n', '5', '--out', '{file}/x.h5'],
    ['simulate-exposure', '--size', '128', '--n-galaxies', '2', '--n-stars', '2',
     '--out', '{file}'],
    ['train', 'sims.h5', '--out', '{file}'],
    ['evaluate', 'sims.h5', '--report', '{file}'],
])
def test_simulate_train_evaluate_outputs_checked_first(capsys, a_file, argv):
    """The commands that simulate or train for hours refuse an output that can
    never be written before they start, with the usage exit code."""
    argv = [arg.format(file=a_file) for arg in argv]
    code, err = call(argv, capsys)
    assert code == 2
    assert f"'{a_file}'" in err and ('is a file, not a directory' in err
                                     or 'it is an existing file, not a directory' in err)
    assert 'Traceback' not in err and 'Errno' not in err
    assert a_file.read_text() == 'not a directory'


def test_output_in_a_directory_nothing_can_be_created_in(capsys, tmp_path, monkeypatch):
    """A read-only mount, a pseudo file system or a full disk pass the
    permission bits; a file created and removed there finds them."""
    import tempfile

    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(30, 'Read-only file system')
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, 'TemporaryFile', refuse)
    code, err = call(['simulate', '--n', '5', '--out', str(tmp_path / 'x.h5')], capsys)
    assert code == 2
    assert (f"--out = '{tmp_path / 'x.h5'}'; nothing can be created in '{tmp_path}' "
            f"(Read-only file system)") in err
    assert not (tmp_path / 'x.h5').exists()

# --- 7. fuzzing the options of psfdeconv run ------------------------------------

_VALUES = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
    st.just(''),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(['--batch-size', '--symmetries', '--target-fwhm',
                               '--pixel-scale', '--band', '--psf']),
       value=_VALUES)
def test_fuzz_run_options(capsys, tmp_path, option, value):
    """Any value of these options ends in a documented exit code and a message,
    never a traceback (the band file does not exist, so the run stops early)."""
    argv = ['run', '--band', f'g={tmp_path / "missing_g.fits"}', '--out',
            str(tmp_path / 'out'), f'{option}={value}']
    code, err = call(argv, capsys)
    assert isinstance(code, int) and code in EXIT_CODES - {0}, (code, err)
    assert 'Traceback' not in err
    assert 'internal error' not in err, err
