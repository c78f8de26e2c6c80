# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the command line (psfdeconv.cli): subcommands and exit codes.

``main`` is run in-process (it returns the exit code; argparse usage errors raise
``SystemExit(2)``); one test runs ``python -m psfdeconv.cli`` in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from psfdeconv.cli import main
from psfdeconv.simulate import SimulationFile


@pytest.fixture(scope='module')
def cli_sims(tmp_path_factory):
    """20 default-config objects written by the CLI itself."""
    path = tmp_path_factory.mktemp('cli') / 'sims.h5'
    assert main(['simulate', '--n', '20', '--seed', '1', '--out', str(path),
                 '--workers', '1']) == 0
    return path


def test_help_in_subprocess():
    result = subprocess.run([sys.executable, '-m', 'psfdeconv.cli', '--help'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ('simulate', 'train', 'evaluate', 'deconvolve', 'info', 'run',
                    'simulate-exposure', 'batch'):
        assert command in result.stdout


def test_simulate(cli_sims, capsys):
    assert cli_sims.exists()
    with SimulationFile(cli_sims) as sims:
        assert len(sims) == 20
        assert sims.seed == 1
    before = cli_sims.read_bytes()
    # Again without --overwrite: exit 5, the file untouched.
    assert main(['simulate', '--n', '20', '--seed', '1', '--out', str(cli_sims),
                 '--workers', '1']) == 5
    err = capsys.readouterr().err
    assert 'exists' in err
    assert 'psfdeconv simulate: error:' in err
    assert cli_sims.read_bytes() == before


def test_simulate_overwrite(tmp_path):
    path = tmp_path / 'sims.h5'
    assert main(['simulate', '--n', '3', '--seed', '1', '--out', str(path),
                 '--workers', '1']) == 0
    assert main(['simulate', '--n', '4', '--seed', '2', '--out', str(path),
                 '--workers', '1', '--overwrite']) == 0
    with SimulationFile(path) as sims:
        assert len(sims) == 4 and sims.seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sims.h5']


def test_simulate_with_config(tmp_path):
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'stamp_size': 32, 'psf_size': 15}))
    out = tmp_path / 'sims.h5'
    assert main(['simulate', '--n', '2', '--out', str(out), '--workers', '1',
                 '--config', str(config)]) == 0
    with SimulationFile(out) as sims:
        assert sims['observed'].shape == (2, 3, 32, 32)


def test_simulate_bad_config_is_usage_error(tmp_path, capsys):
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'psf_size': 40}))
    assert main(['simulate', '--n', '2', '--out', str(tmp_path / 'x.h5'), '--workers', '1',
                 '--config', str(config)]) == 2
    assert 'psf_size must be odd' in capsys.readouterr().err
    assert not (tmp_path / 'x.h5').exists()


@pytest.mark.parametrize('argv', [
    ['simulate', '--out', 'x.h5'],  # --n missing
    ['simulate', '--n', 'many', '--out', 'x.h5'],
    ['deconvolve'],  # --example or --stamps required
    ['nonsense'],
    [],
])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert 'usage:' in capsys.readouterr().err


def test_deconvolve(cli_sims, tiny_model_path, tmp_path, capsys):
    out = tmp_path / 'deconvolved.fits'
    assert main(['deconvolve', '--stamps', str(cli_sims), '--model', str(tiny_model_path),
                 '--out', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'deconvolved 20 stamps of 3 bands with tiny.keras' in stdout
    assert 'RMS' in stdout
    assert 'observed' in stdout and 'deconvolved' in stdout
    with fits.open(out) as hdul:
        assert hdul['DECONVOLVED'].data.shape == (20, 3, 64, 64)
        assert len(hdul['FLUXES'].data) == 20
        assert 'flux_corrected_2' in hdul['FLUXES'].columns.names
    # --out exists now: exit 5 before any work.
    assert main(['deconvolve', '--stamps', str(cli_sims), '--model', str(tiny_model_path),
                 '--out', str(out)]) == 5
    # --symmetries 1: the network once per stamp instead of the card's 8 flips and turns.
    once = tmp_path / 'once.fits'
    assert main(['deconvolve', '--stamps', str(cli_sims), '--model', str(tiny_model_path),
                 '--symmetries', '1', '--out', str(once)]) == 0
    with fits.open(out) as averaged, fits.open(once) as single:
        assert not np.allclose(averaged['DECONVOLVED'].data, single['DECONVOLVED'].data)
    with pytest.raises(SystemExit):
        main(['deconvolve', '--stamps', str(cli_sims), '--symmetries', '3'])


def test_deconvolve_garbage_model(cli_sims, tmp_path, capsys):
    garbage = tmp_path / 'garbage.keras'
    garbage.write_bytes(b'\x00garbage' * 100)
    assert main(['deconvolve', '--stamps', str(cli_sims), '--model', str(garbage)]) == 4
    assert 'garbage.keras' in capsys.readouterr().err


def test_deconvolve_missing_stamps(tiny_model_path, tmp_path, capsys):
    assert main(['deconvolve', '--stamps', str(tmp_path / 'notthere.h5'),
                 '--model', str(tiny_model_path)]) == 3
    assert 'notthere.h5' in capsys.readouterr().err


def test_info(tiny_model_path, capsys):
    assert main(['info', '--model', str(tiny_model_path)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith('psfdeconv ')
    assert '(verified)' in stdout
    assert 'NOT verified' not in stdout
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    assert card['weights_sha256'] in stdout
    # Readable lines, not the card's raw JSON.
    assert '{' not in stdout
    lines = stdout.splitlines()
    assert any(line.split()[:2] == ['numpy', np.__version__] for line in lines)
    # The tiny card has its ranges only in its training section.
    low, high = card['training']['simulation_config']['pixel_scale_range']
    assert f'  pixel scale      {low:g} to {high:g} arcsec/pixel' in stdout
    low, high = card['training']['simulation_config']['psf_fwhm_range']
    assert f'  PSF FWHM         {low:g} to {high:g} arcsec' in stdout
    assert f'  bands            {card["n_bands"]} (inputs psf, ipsf, ipsf1' in stdout
    training = next(line for line in lines if line.startswith('  training '))
    assert f'{card["training"]["epochs_run"]} epochs' in training
    assert f'{card["training"]["n_train_stamps"]} training stamps' in training


def test_info_shipped_models(capsys):
    from psfdeconv.model import default_model_path

    assert main(['info']) == 0
    stdout = capsys.readouterr().out
    assert '{' not in stdout
    paths = sorted(default_model_path().parent.glob('*.keras'))
    assert default_model_path(1) in paths and default_model_path(3) in paths
    # The weights', the configuration's and the card's checksums of each.
    assert stdout.count('(verified)') == 3 * len(paths)
    blocks = stdout.split('\nmodel ')[1:]
    for path, block in zip(paths, blocks, strict=True):
        card = json.loads(path.with_suffix('.json').read_text())
        assert block.startswith(f'{card["name"]} ({path})')
        lines = block.splitlines()
        assert f'  bands            {card["n_bands"]} (inputs ' in block
        low, high = card['pixel_scale_range']
        assert f'  pixel scale      {low:g} to {high:g} arcsec/pixel' in block
        low, high = card['psf_fwhm_range_arcsec']
        assert f'  PSF FWHM         {low:g} to {high:g} arcsec' in block
        assert f'{card["training"]["n_train_stamps"]} training stamps' in block
        # The headline metrics, one short aligned line each.
        metrics = card['metrics']
        assert (f'  metrics          ({metrics["n_objects"]} validation objects, '
                f'deconvolved - truth)') in lines
        assert f'    e1           RMS {metrics["e1"]["rms"]:6.3f}' in lines
        assert f'    e2           RMS {metrics["e2"]["rms"]:6.3f}' in lines
        for key, label in (('size_percent', 'size'), ('flux_percent', 'flux')):
            assert (f'    {label:<13s}RMS {metrics[key]["rms"]:6.1f} %   '
                    f'mean {metrics[key]["mean"]:+6.1f} %') in lines
        assert f'  weights SHA-256  {card["weights_sha256"]} (verified)' in lines


def test_info_training_backend_and_device(tiny_model_path, tmp_path, capsys):
    path = tmp_path / 'copy.keras'
    path.write_bytes(tiny_model_path.read_bytes())
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    card['training'].update(keras_backend='jax', compute_device='NVIDIA H100 80GB HBM3')
    path.with_suffix('.json').write_text(json.dumps(card))
    assert main(['info', '--model', str(path)]) == 0
    assert 'keras backend jax on NVIDIA H100 80GB HBM3' in capsys.readouterr().out
    assert main(['info', '--json', '--model', str(path)]) == 0
    training = json.loads(capsys.readouterr().out)['models'][0]['training']
    assert training['keras_backend'] == 'jax'
    assert training['compute_device'] == 'NVIDIA H100 80GB HBM3'


def test_info_json(tiny_model_path, capsys):
    assert main(['info', '--json', '--model', str(tiny_model_path)]) == 0
    document = json.loads(capsys.readouterr().out)  # nothing but the JSON document
    assert document['versions']['numpy'] == np.__version__
    assert 'psfdeconv' in document['versions'] and 'python' in document['versions']
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    [model] = document['models']
    assert model['path'] == str(tiny_model_path)
    assert model['name'] == card['name']
    assert model['check'] == 'verified' and model['error'] is None
    assert model['weights_sha256'] == model['card_weights_sha256'] == card['weights_sha256']
    assert model['n_bands'] == card['n_bands']
    simulation = card['training']['simulation_config']
    assert model['pixel_scale_range'] == simulation['pixel_scale_range']
    assert model['psf_fwhm_range_arcsec'] == simulation['psf_fwhm_range']
    assert model['metrics'] == card.get('metrics')
    assert model['training']['epochs_run'] == card['training']['epochs_run']
    assert model['training']['n_train_stamps'] == card['training']['n_train_stamps']
    # The shipped models: their card's metrics as they are.
    assert main(['info', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    # The suite has no cache of converted networks (tests/conftest.py).
    assert os.environ['PSFDECONV_CACHE_DIR'] == 'off' and report['network_cache'] is None
    models = report['models']
    assert len(models) >= 2
    assert all(model['check'] == 'verified' for model in models)
    for model in models:
        card = json.loads(Path(model['path']).with_suffix('.json').read_text())
        assert model['metrics'] == card['metrics']
        assert model['pixel_scale_range'] == card['pixel_scale_range']


def test_info_reports_modified_weights(tiny_model_path, tmp_path, capsys):
    path = tmp_path / 'copy.keras'
    path.write_bytes(tiny_model_path.read_bytes())
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    card['weights_sha256'] = 'f' * 64
    path.with_suffix('.json').write_text(json.dumps(card))
    assert main(['info', '--model', str(path)]) == 0
    stdout = capsys.readouterr().out
    assert 'NOT verified' in stdout
    assert 'MISMATCH' in stdout and 'f' * 64 in stdout
    assert main(['info', '--json', '--model', str(path)]) == 0
    [model] = json.loads(capsys.readouterr().out)['models']
    assert model['check'] == 'MISMATCH'
    assert model['card_weights_sha256'] == 'f' * 64 != model['weights_sha256']


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'missing', 'bad card'])
@pytest.mark.parametrize('as_json', [False, True])
def test_info_broken_model_file_exits_4(damage, as_json, tiny_model_path, tmp_path,
                                        capsys):
    path = tmp_path / 'broken.keras'
    data = tiny_model_path.read_bytes()
    path.with_suffix('.json').write_text(tiny_model_path.with_suffix('.json').read_text())
    if damage == 'garbage':
        path.write_bytes(b'\x00garbage' * 100)
    elif damage == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif damage == 'bad card':
        path.write_bytes(data)
        path.with_suffix('.json').write_text('{"weights_sha256": ')
    argv = ['info', '--model', str(path)] + (['--json'] if as_json else [])
    assert main(argv) == 4
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err
    assert captured.err.startswith('psfdeconv info: error: ')
    assert 'broken' in captured.err
    if as_json:
        [model] = json.loads(captured.out)['models']
        assert model['check'] == 'error' and 'broken' in model['error']
    else:
        assert 'ERROR: ' in captured.out


SUBCOMMANDS = ('simulate', 'train', 'evaluate', 'deconvolve', 'info', 'run',
               'simulate-exposure', 'batch')


@pytest.mark.parametrize('sub', SUBCOMMANDS)
def test_subcommand_help_has_examples(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, '--help'])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    assert 'examples:' in stdout
    assert 'psfdeconv ' + sub in stdout
    examples = stdout[stdout.index('examples:'):].splitlines()[1:]
    commands = [line.strip() for line in examples if line.startswith('  psfdeconv ')]
    assert 2 <= len(commands) <= 4
    assert all(command.split()[:2] == ['psfdeconv', sub] for command in commands)


@pytest.mark.parametrize('sub', SUBCOMMANDS)
def test_subcommand_examples_parse(sub, capsys):
    """Each example of a subcommand's help is a valid command line."""
    import shlex

    from psfdeconv.cli import _parser

    with pytest.raises(SystemExit):
        main([sub, '--help'])
    stdout = capsys.readouterr().out
    examples = stdout[stdout.index('examples:'):].splitlines()[1:]
    for line in examples:
        if line.startswith('  psfdeconv '):
            argv = shlex.split(line.split('#')[0].split('>')[0], comments=False)[1:]
            args = _parser().parse_args(argv)
            assert args.command == sub


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(['--help'])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in stdout
    assert 'examples:' in stdout


@pytest.fixture
def record_logging(monkeypatch):
    """Replace ``info`` by a command that records the logging set-up while it
    runs and logs one line at each level, from psfdeconv and from others."""
    import logging

    import psfdeconv.cli as cli

    seen = {}

    def fake_info(args):
        seen['psfdeconv'] = logging.getLogger('psfdeconv').getEffectiveLevel()
        seen['psfdeconv.batch'] = logging.getLogger('psfdeconv.batch').getEffectiveLevel()
        seen['root'] = logging.getLogger().getEffectiveLevel()
        for name in ('jax', 'tensorflow', 'absl', 'h5py'):
            seen[name] = logging.getLogger(name).getEffectiveLevel()
        seen['progress'] = cli._progress_wanted(args)
        for name in ('psfdeconv.batch', 'jax._src.xla_bridge'):
            logger = logging.getLogger(name)
            logger.debug('%s debug line', name)
            logger.info('%s info line', name)
            logger.warning('%s warning line', name)
        return 0

    monkeypatch.setattr(cli, '_cmd_info', fake_info)
    root = logging.getLogger()
    before = root.level, logging.getLogger('psfdeconv').level
    yield seen
    assert (root.level, logging.getLogger('psfdeconv').level) == before


@pytest.mark.parametrize('argv', [['-v', 'info'], ['info', '-v'], ['info', '--verbose']])
def test_verbose_is_debug_for_psfdeconv_only(argv, record_logging, capsys):
    import logging

    assert main(argv) == 0
    seen = record_logging
    assert seen['psfdeconv'] == seen['psfdeconv.batch'] == logging.DEBUG
    assert seen['root'] > logging.DEBUG
    for name in ('jax', 'tensorflow', 'absl', 'h5py'):
        assert seen[name] >= logging.WARNING, name
    err = capsys.readouterr().err
    assert 'psfdeconv.batch debug line' in err
    assert 'psfdeconv.batch info line' in err
    assert 'jax._src.xla_bridge debug line' not in err
    assert 'jax._src.xla_bridge info line' not in err
    assert err.count('psfdeconv.batch warning line') == 1  # printed once


@pytest.mark.parametrize('argv', [['info'], ['-q', 'info'], ['info', '--quiet']])
def test_default_and_quiet_logging(argv, record_logging, capsys):
    import logging

    quiet = len(argv) == 2
    assert main(argv) == 0
    seen = record_logging
    assert seen['psfdeconv'] == (logging.WARNING if quiet else logging.INFO)
    assert seen['progress'] is False  # -q, or standard error is not a terminal
    err = capsys.readouterr().err
    assert 'debug line' not in err
    assert ('psfdeconv.batch info line' in err) is not quiet
    assert err.count('psfdeconv.batch warning line') == 1
    assert 'INFO: psfdeconv.batch info line' in err or quiet


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize('quiet, tty, wanted', [
    (False, True, True), (False, False, False), (True, True, False), (True, False, False)])
def test_progress_bars_only_on_a_terminal(quiet, tty, wanted, monkeypatch):
    import argparse

    from psfdeconv.cli import _progress_wanted

    args = argparse.Namespace(quiet=quiet)
    monkeypatch.setattr(sys, 'stderr', _Stream(tty))
    assert _progress_wanted(args) is wanted
    # An explicit stream (train: Keras draws its bar on standard output).
    monkeypatch.setattr(sys, 'stderr', _Stream(not tty))
    assert _progress_wanted(args, _Stream(tty)) is wanted
    assert _progress_wanted(args, object()) is False  # no isatty: not a terminal


def test_verbose_subprocess_has_no_third_party_debug_lines(tiny_model_path):
    """From the real command line: -v gives psfdeconv's DEBUG lines and none of the
    other libraries' (a root logger at DEBUG would show TensorFlow's and absl's)."""
    result = subprocess.run([sys.executable, '-m', 'psfdeconv.cli', '-v', 'info',
                             '--model', str(tiny_model_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    debug = [line for line in result.stderr.splitlines() if line.startswith('DEBUG')]
    assert debug and all(line.startswith('DEBUG psfdeconv') for line in debug), debug


@pytest.mark.slow
def test_train(tiny_simulation_path, tmp_path, capsys):
    config = tmp_path / 'cfg.json'
    config.write_text(json.dumps({'filters': [4, 8, 16], 'validation_fraction': 0.25,
                                  'seed': 3}))
    out = tmp_path / 'run'
    argv = ['train', str(tiny_simulation_path), '--out', str(out), '--epochs', '1',
            '--batch-size', '8', '--dtype-policy', 'float32', '--config', str(config)]
    assert main(argv) == 0
    assert (out / 'model.keras').exists()
    card = json.loads((out / 'model.json').read_text())
    for key in ('weights_sha256', 'flux_bias', 'metrics', 'training'):
        assert key in card, key
    assert card['name'] == 'model'
    assert card['training']['config']['filters'] == [4, 8, 16]
    assert card['training']['config']['batch_size'] == 8  # the option wins over the file
    assert card['training']['n_validation'] == 40
    assert card['n_validation_objects'] == 40
    assert card['flux_bias']['coefficients'] and len(card['flux_bias']['coefficients']) == 3
    assert card['metrics']['n_objects'] > 0
    assert card['pixel_scale_range'] == [0.088, 0.255]
    # The printed metrics are the card's (after Keras' one line per epoch).
    stdout = capsys.readouterr().out
    assert json.loads(stdout[stdout.index('{'):]) == card['metrics']
    # The model loads and verifies.
    from psfdeconv.model import load_model

    assert load_model(out / 'model.keras').sha256 == card['weights_sha256']

    # Again: the model exists -> exit 5.
    assert main(argv) == 5
    assert 'exists' in capsys.readouterr().err


def test_train_bad_config_is_usage_error(tiny_simulation_path, tmp_path, capsys):
    config = tmp_path / 'cfg.json'
    config.write_text(json.dumps({'filterz': [4, 8, 16]}))
    assert main(['train', str(tiny_simulation_path), '--out', str(tmp_path / 'run'),
                 '--config', str(config)]) == 2
    assert 'filterz' in capsys.readouterr().err


def test_evaluate(tiny_simulation_path, tiny_model_path, tmp_path, capsys):
    report = tmp_path / 'report'
    argv = ['evaluate', str(tiny_simulation_path), '--model', str(tiny_model_path), '--n', '40',
            '--baselines', 'observed,wiener', '--report', str(report)]
    assert main(argv) == 0
    assert (report / 'report.md').exists()
    stdout = capsys.readouterr().out
    assert 'wiener' in stdout
    assert main(argv) == 5
    assert main(argv + ['--overwrite']) == 0


def test_astropy_warnings_are_printed_once():
    """An astropy warning (psfdeconv's warnings are AstropyUserWarnings, logged by astropy's
    logger) appears once: the command line does not add a second, root handler."""
    code = ('import sys, warnings\n'
            'from astropy.utils.exceptions import AstropyUserWarning\n'
            'import psfdeconv.cli as cli\n'
            'def command(args):\n'
            '    warnings.warn("outside the training range", AstropyUserWarning)\n'
            '    return 0\n'
            'cli._cmd_info = command\n'
            'sys.exit(cli.main(sys.argv[1:]))\n')
    for argv in (['info'], ['-v', 'info'], ['info', '-q']):
        result = subprocess.run([sys.executable, '-c', code, *argv], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count('outside the training range') == 1, result.stderr
