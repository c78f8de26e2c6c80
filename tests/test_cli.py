# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the command line (psfdeconv.cli): subcommands and exit codes.

``main`` is run in-process (it returns the exit code; argparse usage errors raise
``SystemExit(2)``); one test runs ``python -m psfdeconv.cli`` in a subprocess.
"""

import json
import subprocess
import sys

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
                    'simulate-exposure'):
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
    assert json.loads(tiny_model_path.with_suffix('.json').read_text())['weights_sha256'] \
        in stdout


def test_info_reports_modified_weights(tiny_model_path, tmp_path, capsys):
    path = tmp_path / 'copy.keras'
    path.write_bytes(tiny_model_path.read_bytes())
    card = json.loads(tiny_model_path.with_suffix('.json').read_text())
    card['weights_sha256'] = 'f' * 64
    path.with_suffix('.json').write_text(json.dumps(card))
    assert main(['info', '--model', str(path)]) == 0
    assert 'NOT verified' in capsys.readouterr().out


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
