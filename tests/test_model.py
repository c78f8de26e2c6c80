# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.model: the network, the model card and safe loading."""

import json
import shutil
import zipfile

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.exceptions import BandCountError, ConfigError, ModelFileError
from psfdeconv.model import (
    MODEL_CARD_VERSION,
    DeconvolutionModel,
    build_cae,
    file_sha256,
    load_model,
    save_model,
    sign_card,
    weights_sha256,
)

#: The only layer types of the paper's autoencoder (all loadable with safe_mode=True).
STANDARD_LAYERS = {'InputLayer', 'Conv2D', 'LeakyReLU', 'MaxPooling2D', 'BatchNormalization',
                   'Conv2DTranspose', 'UpSampling2D'}


def copy_model(source, directory, name, *, card=True):
    """Copy a .keras file (and its card unless ``card`` is False) under a new name."""
    target = directory / f'{name}.keras'
    shutil.copyfile(source, target)
    if card:
        shutil.copyfile(source.with_suffix('.json'), target.with_suffix('.json'))
    return target


def edit_card(model_path, **changes):
    card_path = model_path.with_suffix('.json')
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card))


def random_cubes(n, size=64, channels=9, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)).astype(
        np.float32)


# --- architecture ----------------------------------------------------------------------------


def test_paper_architecture_parameter_count():
    model = build_cae((64, 64, 9))
    # paper-spec: 1,338,499 parameters for 9 input channels and 3 outputs.
    assert model.count_params() == 1338499
    assert tuple(model.input_shape) == (None, 64, 64, 9)
    assert tuple(model.output_shape) == (None, 64, 64, 3)
    types = {type(layer).__name__ for layer in model.layers}
    assert types <= STANDARD_LAYERS, types - STANDARD_LAYERS
    assert 'Lambda' not in types
    # Softplus output, float32 whatever the dtype policy.
    assert model.layers[-1].get_config()['activation'] == 'softplus'
    assert model.layers[-1].dtype_policy.name == 'float32'


def test_build_cae_options():
    model = build_cae((32, 32, 3), n_outputs=1, filters=(4, 8, 16))
    assert tuple(model.output_shape) == (None, 32, 32, 1)
    assert [layer.filters for layer in model.layers
            if type(layer).__name__ == 'Conv2D'] == [4, 8, 16, 1]
    with pytest.raises(ConfigError, match=r'stamp shape \(60, 60\) must be divisible by 8'):
        build_cae((60, 60, 9))


def test_unet_adds_skip_connections():
    from psfdeconv.model import build_network

    unet = build_network('unet', (64, 64, 9))
    cae = build_network('cae', (64, 64, 9))
    concatenations = [layer for layer in unet.layers
                      if type(layer).__name__ == 'Concatenate']
    # One skip per level: 256 + 256 channels at 16x16, 128 + 128 at 32x32,
    # 64 + 64 at 64x64 feed the next decoder convolution / the output.
    assert [tuple(layer.output.shape[1:]) for layer in concatenations] == [
        (16, 16, 512), (32, 32, 256), (64, 64, 128)]
    # The extra input channels of the decoder convolutions and the output are
    # the only new weights: (512-256)*128*9 + (256-128)*64*9 + (128-64)*3*9.
    assert unet.count_params() - cae.count_params() == (
        256 * 128 * 9 + 128 * 64 * 9 + 64 * 3 * 9)
    types = {type(layer).__name__ for layer in unet.layers}
    assert types <= STANDARD_LAYERS | {'Concatenate'}
    with pytest.raises(ConfigError, match="architecture must be one of"):
        build_network('resnet', (64, 64, 9))


# --- save / load -----------------------------------------------------------------------------


def test_save_load_round_trip(tiny_training, tiny_model):
    path = tiny_training.path
    card = json.loads(path.with_suffix('.json').read_text())
    assert card['weights_sha256'] == weights_sha256(path)
    assert card['file_sha256'] == file_sha256(path)
    assert card['card_version'] == MODEL_CARD_VERSION
    assert card['name'] == 'tiny'
    assert card['flux_bias'] is None
    assert card == tiny_training.card  # the returned card is the written one

    assert isinstance(tiny_model, DeconvolutionModel)
    assert tiny_model.path == path
    assert tiny_model.kinds == ('psf', 'ipsf', 'ipsf1')
    assert tiny_model.n_bands == 3
    assert tiny_model.stamp_size == 64
    assert tiny_model.sha256 == card['weights_sha256']
    assert 'tiny' in repr(tiny_model)

    cubes = random_cubes(3)
    original = np.asarray(tiny_training.keras_model(cubes, training=False))
    loaded = np.asarray(tiny_model.keras_model(cubes, training=False))
    # Same weights, same float32 graph on the same CPU: identical numbers.
    assert_array_equal(loaded, original)


def test_weights_sha256_is_stable_across_saves(tiny_training, tmp_path):
    # The whole file's hash changes with the save date; the weights member's does not.
    card = save_model(tiny_training.keras_model, tmp_path / 'again.keras', {'name': 'again'})
    assert card['weights_sha256'] == tiny_training.card['weights_sha256']
    assert (tmp_path / 'again.json').exists()


def test_save_model_refuses_to_overwrite(tiny_training, tmp_path):
    from psfdeconv.exceptions import OutputExistsError

    path = tmp_path / 'm.keras'
    save_model(tiny_training.keras_model, path, {'name': 'm'})
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_model(tiny_training.keras_model, path, {'name': 'm'})
    assert path.read_bytes() == before
    save_model(tiny_training.keras_model, path, {'name': 'm2'}, overwrite=True)
    assert json.loads(path.with_suffix('.json').read_text())['name'] == 'm2'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.json', 'm.keras']


def test_predict_shape_and_batching(tiny_model):
    cubes = random_cubes(5, seed=1)
    # float32: compared with Keras' eager float32 call below.
    out = tiny_model.predict(cubes, precision='float32')
    assert out.shape == (5, 3, 64, 64)
    assert out.dtype == np.float32
    assert (out >= 0).all()  # softplus
    # Batching only splits the work (inference-mode batch normalisation); oneDNN may sum
    # in a different order for another batch size, hence rtol 1e-5 rather than equality.
    assert_allclose(tiny_model.predict(cubes, batch_size=2, precision='float32'), out,
                    rtol=1e-5, atol=1e-7)
    # Channels-last network output -> (n, bands, ny, nx).
    direct = np.asarray(tiny_model.keras_model(cubes, training=False))
    assert_allclose(out, direct.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-7)


def test_check_bands(tiny_model):
    tiny_model.check_bands(3)
    with pytest.raises(BandCountError, match='2 band') as info:
        tiny_model.check_bands(2)
    assert 'trained for 3' in str(info.value)
    assert isinstance(info.value, ValueError)


# --- refused files ---------------------------------------------------------------------------


def assert_refused(path, match=None):
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    if match is not None:
        assert match in message, message
    assert isinstance(info.value, OSError)
    assert info.value.exit_code == 4
    return message


def test_missing_file(tmp_path):
    assert_refused(tmp_path / 'missing.keras', 'does not exist')


def test_empty_file(tmp_path):
    path = tmp_path / 'empty.keras'
    path.write_bytes(b'')
    assert_refused(path, 'not a .keras (zip) archive')


def test_garbage_file(tmp_path):
    path = tmp_path / 'garbage.keras'
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    assert_refused(path, 'not a .keras (zip) archive')


def test_truncated_file(tiny_model_path, tmp_path):
    data = tiny_model_path.read_bytes()
    path = tmp_path / 'truncated.keras'
    path.write_bytes(data[:len(data) // 2])
    shutil.copyfile(tiny_model_path.with_suffix('.json'), path.with_suffix('.json'))
    assert_refused(path, 'truncated or corrupt')


def test_corrupted_member_fails_crc(tiny_model_path, tmp_path):
    path = copy_model(tiny_model_path, tmp_path, 'flipped')
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo('model.weights.h5')
    data = bytearray(path.read_bytes())
    # A byte inside the weights member's data (30-byte local header + name, then data).
    data[info.header_offset + 30 + len(info.filename) + 1000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_refused(path, 'fails its CRC check')


def test_zip_without_config(tiny_model_path, tmp_path):
    path = tmp_path / 'noconfig.keras'
    with zipfile.ZipFile(tiny_model_path) as source, zipfile.ZipFile(path, 'w') as target:
        target.writestr('model.weights.h5', source.read('model.weights.h5'))
    assert_refused(path, "lacks ['config.json']")


def test_weights_checksum_mismatch(tiny_model_path, tmp_path):
    path = copy_model(tiny_model_path, tmp_path, 'modified')
    edit_card(path, weights_sha256='0' * 64)
    message = assert_refused(path, 'SHA-256')
    assert '0' * 64 in message
    # verify=False skips the checksum (and loads).
    model = load_model(path, verify=False)
    assert model.n_bands == 3


def test_checked_without_the_network(tiny_model_path, tiny_model, tmp_path):
    # network=False: the file's and card's checks, not Keras (for a batch's
    # parent process, whose workers load the network).
    light = load_model(tiny_model_path, network=False)
    assert light.keras_model is None
    assert light.card == tiny_model.card
    assert light.sha256 == tiny_model.sha256
    with pytest.raises(ConfigError, match='without its network'):
        light.predict(np.zeros((1, 64, 64, 9), np.float32))
    path = copy_model(tiny_model_path, tmp_path, 'modified')
    edit_card(path, weights_sha256='0' * 64)
    with pytest.raises(ModelFileError, match='SHA-256'):
        load_model(path, network=False)
    # Unverified, the weights' SHA-256 is the file's, as with the network.
    assert load_model(path, verify=False, network=False).sha256 == tiny_model.sha256


def test_network_loaded_on_first_use(tiny_model_path, tiny_model, tmp_path):
    # network='lazy': the checks now, Keras at the first use of keras_model (or never,
    # where OpenVINO runs a cached conversion: tests/test_inference.py).
    lazy = load_model(tiny_model_path, network='lazy')
    assert lazy.has_network and not lazy.network_loaded
    assert lazy.card == tiny_model.card
    assert lazy.keras_model.count_params() == tiny_model.keras_model.count_params()
    assert lazy.network_loaded
    cubes = np.random.default_rng(1).random((2, 64, 64, 9), dtype=np.float32)
    np.testing.assert_array_equal(lazy.predict(cubes, precision='float32'),
                                  tiny_model.predict(cubes, precision='float32'))
    # A checksum mismatch is refused at once, as with the network.
    path = copy_model(tiny_model_path, tmp_path, 'modified')
    edit_card(path, weights_sha256='0' * 64)
    with pytest.raises(ModelFileError, match='SHA-256'):
        load_model(path, network='lazy')
    with pytest.raises(ConfigError, match="network must be True, 'lazy' or False"):
        load_model(tiny_model_path, network='later')
    assert not load_model(tiny_model_path, network=False).has_network


def test_lazy_network_that_keras_cannot_read(tiny_model_path, tmp_path):
    # Unverified (no checksums to stop it), a network Keras refuses fails where it is
    # first used, with the load's own error.
    path = copy_model(tiny_model_path, tmp_path, 'unknown')
    with zipfile.ZipFile(tiny_model_path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members['config.json'])
    config['config']['layers'][1]['class_name'] = 'NoSuchLayer'
    members['config.json'] = json.dumps(config).encode()
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    lazy = load_model(path, verify=False, network='lazy')
    assert lazy.has_network and not lazy.network_loaded
    with pytest.raises(ModelFileError, match='cannot be loaded by Keras'):
        lazy.keras_model  # noqa: B018


def test_replacing_the_network_drops_its_runners(tiny_model_path, tiny_training):
    from psfdeconv.inference import get_runner

    model = load_model(tiny_model_path)
    first, _ = get_runner(model, 'float32')
    assert get_runner(model, 'float32')[0] is first
    model.keras_model = tiny_training.keras_model
    assert model.network_loaded and get_runner(model, 'float32')[0] is not first


@pytest.mark.parametrize('changes', [{'n_bands': 2}, {'input_kinds': ['psf', 'ipsf']},
                                     {'stamp_size': 32}])
def test_card_of_another_architecture(tiny_model_path, tmp_path, changes):
    path = copy_model(tiny_model_path, tmp_path, 'wrongarch')
    edit_card(path, **changes)
    # Re-signed, so that the architecture check, not the card's checksum, refuses it.
    sign_card(path)
    assert_refused(path, 'wrong architecture')


def test_card_not_json(tiny_model_path, tmp_path):
    path = copy_model(tiny_model_path, tmp_path, 'badcard')
    path.with_suffix('.json').write_text('{"name": ')
    with pytest.raises(ModelFileError, match='is not valid JSON'):
        load_model(path)


def test_lambda_layer_is_refused(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 9))
    doubled = keras.layers.Lambda(lambda x: x * 2)(inputs)
    outputs = keras.layers.Conv2D(3, 1)(doubled)
    model = keras.Model(inputs, outputs)
    path = tmp_path / 'lambda.keras'
    # A card that matches the network, so only the Lambda layer can be the reason.
    save_model(model, path, {'name': 'lambda', 'input_kinds': ['psf', 'ipsf', 'ipsf1'],
                             'n_bands': 3, 'stamp_size': 16})
    message = assert_refused(path, 'refused for safety')
    assert 'Lambda' in message


def test_bare_keras_file_without_card(tiny_training, tmp_path):
    path = tmp_path / 'bare.keras'
    tiny_training.keras_model.save(path)
    assert not path.with_suffix('.json').exists()
    with pytest.raises(ModelFileError, match='has no card.*--trust-model'):
        load_model(path)
    model = load_model(path, verify=False)
    assert model.verified is False
    assert model.card['name'] == 'unnamed'
    assert model.kinds == ('psf', 'ipsf', 'ipsf1')
    assert model.n_bands == 3
    assert model.stamp_size == 64
    assert model.card['flux_bias'] is None
    assert model.sha256 == weights_sha256(path)
    cubes = random_cubes(2, seed=3)
    assert_array_equal(model.predict(cubes), DeconvolutionModel(
        tiny_training.keras_model, tiny_training.card).predict(cubes))


def test_default_model_per_band_count():
    from psfdeconv.model import DEFAULT_MODELS, default_model_path

    assert default_model_path().name == f'{DEFAULT_MODELS[3]}.keras'
    assert default_model_path(1).name == f'{DEFAULT_MODELS[1]}.keras'
    for n_bands in DEFAULT_MODELS:
        assert default_model_path(n_bands).is_file()
        assert default_model_path(n_bands).with_suffix('.json').is_file()
    with pytest.raises(BandCountError, match=r'not 5.*train a model for 5'):
        default_model_path(5)


def test_shipped_single_band_model_loads_and_verifies():
    model = load_model(n_bands=1)
    assert model.n_bands == 1 and model.kinds == ('psf', 'ipsf', 'ipsf1')
    assert model.card['training']['config']['split_bands'] is True


def test_card_of_a_later_version_is_refused(tiny_model_path, tmp_path):
    path = copy_model(tiny_model_path, tmp_path, 'future')
    edit_card(path, card_version=MODEL_CARD_VERSION + 1)
    assert_refused(path, 'upgrade psfdeconv')
