# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Model files that were tampered with, or that cannot be verified, are refused
before Keras sees them (`psfdeconv.model.load_model`)."""

import json
import shutil
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from psfdeconv.exceptions import ModelFileError
from psfdeconv.model import (
    MAX_MEMBER_BYTES,
    card_sha256,
    config_sha256,
    default_model_path,
    load_model,
    weights_sha256,
)


def copy_shipped(directory, name='copy', card=True):
    source = default_model_path()
    target = directory / f'{name}.keras'
    shutil.copyfile(source, target)
    if card:
        shutil.copyfile(source.with_suffix('.json'), target.with_suffix('.json'))
    return target


def read_card(path):
    return json.loads(path.with_suffix('.json').read_text())


def write_card(path, card):
    path.with_suffix('.json').write_text(json.dumps(card, indent=2))


def rewrite_member(path, member, change):
    """Rewrite the zip at ``path`` with ``member``'s bytes replaced by ``change(bytes)``."""
    tmp = path.with_suffix('.tmp')
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(tmp, 'w') as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info, change(data) if info.filename == member else data)
    tmp.replace(path)


def test_shipped_cards_carry_all_three_hashes():
    for n_bands in (1, 3):
        path = default_model_path(n_bands)
        card = read_card(path)
        assert card['weights_sha256'] == weights_sha256(path)
        assert card['config_sha256'] == config_sha256(path)
        assert card['card_sha256'] == card_sha256(card)


def test_card_hash_is_canonical():
    card = {'b': [1.0, 2], 'a': {'y': 1, 'x': 'z'}}
    assert card_sha256(card) == card_sha256(json.loads(json.dumps(card, indent=4)))
    assert card_sha256(card) == card_sha256(dict(card, card_sha256='anything'))


def test_symlink_to_shipped_model_without_card(tmp_path):
    link = tmp_path / 'linked.keras'
    link.symlink_to(default_model_path())
    with pytest.raises(ModelFileError) as info:
        load_model(link)
    message = str(info.value)
    assert str(link) in message and 'has no card' in message and '--trust-model' in message
    model = load_model(link, verify=False)
    assert model.verified is False
    assert model.sha256 == weights_sha256(default_model_path())


@pytest.mark.parametrize('edit', ['double_flux_bias', 'widen_ranges', 'rename'])
def test_edited_card_is_refused(tmp_path, edit):
    path = copy_shipped(tmp_path)
    card = read_card(path)
    if edit == 'double_flux_bias':
        card['flux_bias']['coefficients'] = [2 * c for c in card['flux_bias']['coefficients']]
    elif edit == 'widen_ranges':
        card['pixel_scale_range'] = [0.001, 10.0]
        card['psf_fwhm_range_arcsec'] = [0.01, 10.0]
    else:
        card['name'] = 'someone else'
    write_card(path, card)
    with pytest.raises(ModelFileError, match='card .* was edited') as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_reindented_card_is_accepted(tmp_path):
    path = copy_shipped(tmp_path)
    path.with_suffix('.json').write_text(json.dumps(read_card(path)))
    assert load_model(path).verified is True


@pytest.mark.parametrize(('key', 'value', 'match'), [
    (('flux_bias', 'coefficients'), [float('nan'), 0.0, 0.0], 'flux_bias.coefficients'),
    (('flux_bias', 'coefficients'), 'not numbers', 'flux_bias.coefficients'),
    (('flux_bias', 'log_snr_range'), [1.0, float('inf')], r'flux_bias.log_snr_range\[1\]'),
    (('pixel_scale_range',), 'wide', 'pixel_scale_range'),
    (('stamp_size',), '64', 'stamp_size'),
    (('input_kinds',), [1, 2, 3], 'input_kinds'),
])
def test_bad_card_values_name_the_key(tmp_path, key, value, match):
    path = copy_shipped(tmp_path)
    card = read_card(path)
    target = card
    for part in key[:-1]:
        target = target[part]
    target[key[-1]] = value
    path.with_suffix('.json').write_text(json.dumps(card))  # NaN/Infinity literals
    for verify in (True, False):
        with pytest.raises(ModelFileError, match=match):
            load_model(path, verify=verify)


def test_scaled_weights_with_hash_removed(tmp_path):
    import h5py

    path = copy_shipped(tmp_path)
    with zipfile.ZipFile(path) as archive:
        (tmp_path / 'w.h5').write_bytes(archive.read('model.weights.h5'))
    with h5py.File(tmp_path / 'w.h5', 'r+') as h5:
        def scale(name, item):
            if isinstance(item, h5py.Dataset) and item.dtype.kind == 'f':
                item[...] = np.asarray(item) * 1.5
        h5.visititems(scale)
    data = (tmp_path / 'w.h5').read_bytes()
    rewrite_member(path, 'model.weights.h5', lambda _: data)
    with pytest.raises(ModelFileError, match='weights'):
        load_model(path)
    card = read_card(path)
    del card['weights_sha256']
    write_card(path, card)
    with pytest.raises(ModelFileError, match='without weights_sha256.*--trust-model'):
        load_model(path)


def test_card_without_hashes_needs_trust(tmp_path):
    path = copy_shipped(tmp_path)
    card = read_card(path)
    for key in ('card_sha256', 'config_sha256'):
        card.pop(key)
    write_card(path, card)
    with pytest.raises(ModelFileError, match='without config_sha256, card_sha256'):
        load_model(path)
    assert load_model(path, verify=False).verified is False


def test_edited_config_is_refused(tmp_path):
    path = copy_shipped(tmp_path)

    def steeper(data):
        text = data.decode()
        assert '"negative_slope": 0.2' in text
        return text.replace('"negative_slope": 0.2', '"negative_slope": 0.5').encode()

    rewrite_member(path, 'config.json', steeper)
    with pytest.raises(ModelFileError, match=r'configuration \(config.json\)') as info:
        load_model(path)
    assert str(path) in str(info.value) and 'restore' in str(info.value)


@pytest.fixture(scope='module')
def zip_bomb(tmp_path_factory):
    """A .keras-like zip whose weights member inflates to 2 GiB of zeros (~2 MB on disk)."""
    path = tmp_path_factory.mktemp('bomb') / 'bomb.keras'
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED,
                         compresslevel=1) as archive:
        archive.writestr('config.json', '{}')
        archive.writestr('metadata.json', '{}')
        with archive.open('model.weights.h5', 'w', force_zip64=True) as member:
            for _ in range((2 << 30) // len(chunk)):
                member.write(chunk)
    return path


def test_zip_bomb_is_refused_unread(zip_bomb):
    assert zip_bomb.stat().st_size < 20 * 2 ** 20
    for verify in (True, False):
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ModelFileError, match='zip bomb') as info:
            load_model(zip_bomb, verify=verify)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 1.0
        assert peak < 10 * 2 ** 20
        assert 'model.weights.h5' in str(info.value) and str(zip_bomb) in str(info.value)
    assert MAX_MEMBER_BYTES < 2 << 30


def test_cli_trust_model(tmp_path, capsys):
    """``psfdeconv deconvolve --model`` refuses a cardless model (exit 4) unless
    ``--trust-model``."""
    from psfdeconv.cli import main

    model = copy_shipped(tmp_path, card=False)
    assert main(['deconvolve', '--example', '--model', str(model)]) == 4
    assert '--trust-model' in capsys.readouterr().err
    assert main(['deconvolve', '--example', '--model', str(model), '--trust-model']) == 0


def _info_lines(path, capsys):
    from psfdeconv.cli import main

    assert main(['info', '--model', str(path)]) == 0
    return capsys.readouterr().out.splitlines()


def test_info_verifies_all_three_checksums(tmp_path, capsys):
    """``psfdeconv info`` reports each checksum load_model verifies."""
    path = copy_shipped(tmp_path)
    card = read_card(path)
    lines = _info_lines(path, capsys)
    for key, name in (('weights_sha256', 'weights'), ('config_sha256', 'config'),
                      ('card_sha256', 'card')):
        assert f'  {name + " SHA-256":<17s}{card[key]} (verified)' in lines


def test_info_names_an_edited_card_or_config(tmp_path, capsys):
    from psfdeconv.cli import main

    path = copy_shipped(tmp_path)
    card = read_card(path)
    card['flux_bias']['coefficients'] = [2 * c for c in card['flux_bias']['coefficients']]
    write_card(path, card)
    lines = _info_lines(path, capsys)
    assert (f'  card SHA-256     {card_sha256(card)} MISMATCH (NOT verified): the card '
            f'records {card["card_sha256"]}') in lines
    assert f'  weights SHA-256  {card["weights_sha256"]} (verified)' in lines
    rewrite_member(path, 'config.json', lambda data: data.replace(
        b'"negative_slope": 0.2', b'"negative_slope": 0.5'))
    lines = _info_lines(path, capsys)
    assert any(line.startswith('  config SHA-256') and 'MISMATCH' in line for line in lines)
    assert main(['info', '--json', '--model', str(path)]) == 0
    [model] = json.loads(capsys.readouterr().out)['models']
    assert model['check'] == 'MISMATCH'
    assert model['checksums']['config_sha256']['actual'] != card['config_sha256']


def test_info_card_without_checksums_is_unsigned(tmp_path, capsys):
    from psfdeconv.cli import main

    path = copy_shipped(tmp_path)
    card = read_card(path)
    for key in ('config_sha256', 'card_sha256'):
        del card[key]
    write_card(path, card)
    lines = _info_lines(path, capsys)
    assert any(line.startswith('  card SHA-256') and 'NOT verified: the card does not '
               'record it' in line for line in lines)
    assert main(['info', '--json', '--model', str(path)]) == 0
    [model] = json.loads(capsys.readouterr().out)['models']
    assert model['check'] == 'unsigned'
