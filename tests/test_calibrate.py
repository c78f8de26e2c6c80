# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.calibrate.recalibrate_model and ``psfdeconv calibrate``: a saved
model's card refitted without training."""

import json
import shutil
import warnings

import pytest

from psfdeconv.calibrate import calibrate_card, recalibrate_model
from psfdeconv.exceptions import ConfigError, OutputExistsError
from psfdeconv.io.files import file_sha256
from psfdeconv.model import DeconvolutionModel, load_model, sign_card
from psfdeconv.simulate import write_simulation
from psfdeconv.train import TrainConfig, validation_objects


def _copy_model(path, directory):
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, directory / path.name)
    shutil.copy(path.with_suffix('.json'), directory / path.with_suffix('.json').name)
    return directory / path.name


@pytest.fixture(scope='module')
def one_pass(tiny_model_path, tiny_simulation_path, tmp_path_factory):
    """The tiny model's card refitted for one network pass."""
    out = tmp_path_factory.mktemp('one_pass') / 'tiny1.keras'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        card = recalibrate_model(tiny_model_path, tiny_simulation_path, symmetries=1, out=out)
    return out, card


def test_recalibrated_card_is_for_one_pass_and_keeps_the_weights(one_pass, tiny_model_path):
    out, card = one_pass
    old = json.loads(tiny_model_path.with_suffix('.json').read_text())
    assert old['symmetries'] == 4
    assert card['symmetries'] == 1 and card['training']['config']['symmetries'] == 1
    # The weights file is copied byte for byte: its checksums stay.
    assert file_sha256(out) == file_sha256(tiny_model_path)
    for key in ('file_sha256', 'weights_sha256', 'config_sha256'):
        assert card[key] == old[key]
    assert card['card_sha256'] != old['card_sha256']
    assert json.loads(out.with_suffix('.json').read_text()) == card
    # load_model verifies the new card's checksum.
    assert load_model(out).card['symmetries'] == 1


def test_recalibration_is_calibrate_card_on_the_runs_validation_split(
        one_pass, tiny_model, tiny_simulation_path):
    _, card = one_pass
    config = TrainConfig.from_dict(card['training']['config'])
    val = validation_objects(tiny_simulation_path, config)
    assert card['n_validation_objects'] == len(val['is_blank'])
    fits = {}
    for symmetries in (1, 8):
        model = DeconvolutionModel(tiny_model.keras_model,
                                   dict(tiny_model.card, symmetries=symmetries))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            fits[symmetries] = calibrate_card(
                model, val['observed'], val['psf'], val['pixel_scale'], val['truth'],
                val['is_blank'])
    assert card['flux_bias'] == fits[1]['flux_bias']
    assert card['psf_leakage'] == fits[1]['psf_leakage']
    # Fitted for one pass, not for the card's eight.
    assert card['psf_leakage'] != fits[8]['psf_leakage']


def test_recalibration_refuses_another_simulation_and_existing_output(
        tiny_model_path, tmp_path):
    other = write_simulation(tmp_path / 'other.h5', 20, seed=3, n_workers=1)
    with pytest.raises(ConfigError, match='20 objects'):
        recalibrate_model(tiny_model_path, other, symmetries=1, out=tmp_path / 'new.keras')
    with pytest.raises(OutputExistsError):
        recalibrate_model(tiny_model_path, other, out=tiny_model_path)


def test_card_without_size_bias_stays_without(tiny_model_path, tiny_simulation_path,
                                              tmp_path, monkeypatch):
    import psfdeconv.calibrate as calibrate_module

    path = _copy_model(tiny_model_path, tmp_path / 'no_size')
    card = json.loads(path.with_suffix('.json').read_text())
    card.pop('size_bias', None)
    path.with_suffix('.json').write_text(json.dumps(card))
    sign_card(path)
    fitted = []
    monkeypatch.setattr(calibrate_module, 'fit_size_bias',
                        lambda *args, **kwargs: fitted.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        new = recalibrate_model(path, tiny_simulation_path, out=path, overwrite=True)
    assert not fitted and 'size_bias' not in new
    assert new['symmetries'] == card['symmetries']
    assert load_model(path).card == new


def test_cli_calibrate_rewrites_the_card_in_place(tiny_model_path, tiny_simulation_path,
                                                  tmp_path, capsys):
    from psfdeconv.cli import main

    path = _copy_model(tiny_model_path, tmp_path / 'cli')
    before = file_sha256(path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        code = main(['calibrate', str(path), str(tiny_simulation_path), '--symmetries', '2',
                     '--out', str(path), '--overwrite'])
    assert code == 0
    assert file_sha256(path) == before
    card = load_model(path).card
    assert card['symmetries'] == 2
    assert json.loads(capsys.readouterr().out) == card['metrics']
    # Without --overwrite the existing file is refused.
    assert main(['calibrate', str(path), str(tiny_simulation_path),
                 '--out', str(path)]) != 0


def test_cli_calibrate_help_examples_parse(capsys):
    import shlex

    from psfdeconv.cli import _parser, main

    with pytest.raises(SystemExit):
        main(['calibrate', '--help'])
    stdout = capsys.readouterr().out
    examples = [line for line in stdout[stdout.index('examples:'):].splitlines()
                if line.startswith('  psfdeconv ')]
    assert len(examples) == 2
    for line in examples:
        args = _parser().parse_args(shlex.split(line)[1:])
        assert args.command == 'calibrate' and args.out
    with pytest.raises(SystemExit):
        main(['--help'])
    assert 'calibrate' in capsys.readouterr().out
