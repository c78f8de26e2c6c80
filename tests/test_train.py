# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.train: configuration, split, batches, learning, resume, determinism.

Every training here is tiny ((4, 8, 16) filters, 120 training stamps, float32, a few epochs):
these tests check the machinery, not the quality of a model.
"""

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.exceptions import ConfigError, InvalidInputError, OutputExistsError
from psfdeconv.features import make_cube
from psfdeconv.simulate import SimulationFile, read_simulation
from psfdeconv.train import TrainConfig, scaled_batch, split_indices, train_model


def assert_same_weights(first, second):
    first, second = first.get_weights(), second.get_weights()
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert_array_equal(a, b)


def untrained_validation_loss(simulation_path, config):
    """Binary cross-entropy, on the run's validation objects, of the network as
    `train_model` initialises it (same seed, same builder) before any step."""
    import keras

    from psfdeconv.model import build_cae

    with SimulationFile(simulation_path) as sims:
        _, val_idx = split_indices(len(sims), validation_fraction=config.validation_fraction,
                                   seed=config.seed)
        val = {key: sims[key][val_idx] for key in ('observed', 'psf', 'pixel_scale', 'truth')}
    cube, target = scaled_batch(val['observed'], val['psf'], val['pixel_scale'], val['truth'],
                                kinds=config.kinds)
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(config.seed)
        model = build_cae(cube.shape[1:], n_outputs=target.shape[-1], filters=config.filters,
                          negative_slope=config.negative_slope)
        weights.append(model.get_weights())
    # The seeded initialisation is reproducible, so this is the network train_model starts from.
    for a, b in zip(*weights, strict=True):
        assert_array_equal(a, b)
    # Keras evaluates the validation loss with the model in inference mode, as here.
    prediction = model(cube, training=False)
    return float(keras.losses.BinaryCrossentropy()(target, prediction))


# --- configuration ---------------------------------------------------------------------------


def test_train_config_from_dict_round_trip():
    config = TrainConfig.from_dict({'epochs': 3, 'filters': [4, 8, 16], 'kinds': ['ipsf1', 'psf'],
                                    'dtype_policy': 'float32'})
    assert config.filters == (4, 8, 16)
    assert config.kinds == ('psf', 'ipsf1')  # canonical order
    values = config.to_dict()
    assert values['kinds'] == ['psf', 'ipsf1']
    assert TrainConfig.from_dict(values) == config
    json.dumps(values)  # serialisable for the model card


@pytest.mark.parametrize('values, match', [
    ({'bogus': 1}, r"unknown training config keys \['bogus'\]"),
    ({'dtype_policy': 'float16'}, "dtype_policy must be 'float32' or 'mixed_bfloat16'"),
    ({'epochs': 0}, 'epochs, batch_size and data_workers must be'),
    ({'batch_size': 0}, 'epochs, batch_size and data_workers must be'),
    ({'validation_fraction': 1.0}, r'validation_fraction must be in \(0, 1\)'),
    ({'validation_fraction': 0.0}, r'validation_fraction must be in \(0, 1\)'),
    ({'kinds': ['psf', 'bogus']}, 'kinds must be distinct values'),
    ({'architecture': 'resnet'}, "architecture must be 'cae' or 'unet'"),
    ({'target_headroom': 0.5}, 'target_headroom must be >= 1'),
    ({'moment_loss_weight': -0.1}, 'moment_loss_weight must be a finite number >= 0'),
    ({'moment_loss_weight': float('nan')}, 'moment_loss_weight must be a finite number >= 0'),
    ({'distill_symmetries': 3, 'initial_weights': 'a.keras', 'cache_cubes': True},
     'symmetries must be'),
    ({'distill_symmetries': 4, 'cache_cubes': True}, 'set initial_weights to its .keras'),
    ({'distill_symmetries': 4, 'initial_weights': 'a.keras'}, 'cache_cubes to true'),
    ({'distill_weight': 1.5}, r'distill_weight must be in \[0, 1\]'),
])
def test_train_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(values)


# --- split and batches -----------------------------------------------------------------------


def test_split_indices_seeded_and_disjoint():
    train, val = split_indices(100, validation_fraction=0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert np.intersect1d(train, val).size == 0
    assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    again = split_indices(100, validation_fraction=0.2, seed=3)
    assert_array_equal(again[0], train)
    assert_array_equal(again[1], val)
    other = split_indices(100, validation_fraction=0.2, seed=4)
    assert not np.array_equal(other[1], val)
    # At least one validation object, however small the fraction.
    assert len(split_indices(10, validation_fraction=0.01, seed=0)[1]) == 1


def test_scaled_batch(tiny_simulation_path):
    data = read_simulation(tiny_simulation_path, 0, 24)
    assert data['is_blank'].any() and (~data['is_blank']).any()
    cube, target = scaled_batch(data['observed'], data['psf'], data['pixel_scale'],
                                data['truth'])
    assert cube.shape == (24, 64, 64, 9)
    assert target.shape == (24, 64, 64, 3)
    assert cube.dtype == np.float32 and target.dtype == np.float32
    assert_allclose(np.abs(cube).reshape(24, -1).max(axis=1), 1.0, rtol=1e-6)
    assert target.min() >= 0 and target.max() <= 1
    blank = data['is_blank']
    assert_array_equal(target[blank], 0.0)
    # The target is the truth over target_headroom times the inputs' own scale (the
    # factor the cube was divided by), clipped to 1: proportional to the inputs.
    _, scale = make_cube(data['observed'], data['psf'], pixel_scale=data['pixel_scale'])
    truth = data['truth'].transpose(0, 2, 3, 1)
    expected = np.clip(truth / (4.0 * scale[:, None, None, None]), 0, 1)
    assert_allclose(target, expected, rtol=1e-6, atol=1e-7)
    # Doubling the stamps and the truth leaves inputs and targets unchanged.
    cube2, target2 = scaled_batch(2 * data['observed'], data['psf'], data['pixel_scale'],
                                  2 * data['truth'])
    assert_allclose(cube2, cube, rtol=1e-5, atol=1e-6)
    assert_allclose(target2, target, rtol=1e-5, atol=1e-7)
    # A larger headroom divides the (unclipped) targets.
    _, target8 = scaled_batch(data['observed'], data['psf'], data['pixel_scale'],
                              data['truth'], target_headroom=8.0)
    assert_allclose(target8, np.clip(truth / (8.0 * scale[:, None, None, None]), 0, 1),
                    rtol=1e-6, atol=1e-7)
    # Kinds subsets give n_kinds * n_bands channels.
    cube_psf, _ = scaled_batch(data['observed'], data['psf'], data['pixel_scale'],
                               data['truth'], kinds=['psf'])
    assert cube_psf.shape == (24, 64, 64, 3)


# --- learning --------------------------------------------------------------------------------


def test_tiny_training_card_and_files(tiny_training, tiny_simulation_path):
    card = tiny_training.card
    training = card['training']
    assert card['input_kinds'] == ['psf', 'ipsf', 'ipsf1']
    assert card['n_bands'] == 3 and card['stamp_size'] == 64
    assert card['architecture_config']['filters'] == [4, 8, 16]
    assert training['n_train'] == 120 and training['n_validation'] == 40
    assert training['epochs_run'] == 2
    assert [h['epoch'] for h in training['history']] == [1, 2]
    assert training['simulation_seed'] == SimulationFile(tiny_simulation_path).seed
    assert training['config'] == tiny_training.config.to_dict()
    for name in ('checkpoint.keras', 'best.keras', 'state.json'):
        assert (tiny_training.run_dir / name).exists(), name
    state = json.loads((tiny_training.run_dir / 'state.json').read_text())
    assert state['epoch'] == 2
    assert state['history'] == training['history']
    val_losses = [h['val_loss'] for h in training['history']]
    assert training['best_val_loss'] == min(val_losses)
    assert training['best_epoch'] == 1 + int(np.argmin(val_losses))
    assert tiny_training.keras_model.dtype_policy.name == 'float32'


@pytest.mark.slow
def test_training_lowers_the_validation_loss(tiny_simulation_path, tmp_path,
                                             make_tiny_train_config):
    # Compared: the binary cross-entropy on the 40 validation objects of (a) the network as
    # train_model initialises it (same seed), before any step, and (b) the same network after
    # 4 epochs x 30 steps of 4 stamps (120 Adam steps at lr 3e-3), as recorded in the history.
    # Measured on this CPU: 0.0517 before, then 0.0491, 0.0424, 0.0332, 0.0239 after each
    # epoch (the output starts at the softplus(-3) floor, which training removes); the 10%
    # bound leaves room for another CPU's rounding.
    config = make_tiny_train_config(epochs=4, batch_size=4, learning_rate=3e-3)
    untrained = untrained_validation_loss(tiny_simulation_path, config)
    _, card = train_model(tiny_simulation_path, tmp_path / 'run', config=config, verbose=0)
    val_losses = [h['val_loss'] for h in card['training']['history']]
    assert len(val_losses) == 4
    assert val_losses[0] < untrained
    assert card['training']['best_val_loss'] < 0.9 * untrained, (untrained, val_losses)


def test_tiny_fixture_training_also_improves(tiny_training, tiny_simulation_path):
    # The shared 2-epoch fixture (16 steps at lr 1e-4): measured 1.188 -> 1.159 -> 1.136 (a
    # small but systematic decrease: each Adam step moves the output bias the same way).
    untrained = untrained_validation_loss(tiny_simulation_path, tiny_training.config)
    val_losses = [h['val_loss'] for h in tiny_training.card['training']['history']]
    assert val_losses[1] < val_losses[0] < untrained


@pytest.mark.slow
def test_seeded_training_is_deterministic(tiny_training, tiny_simulation_path, tmp_path,
                                          make_tiny_train_config):
    # Same seed, same float32 configuration as the shared fixture: identical weights.
    model, card = train_model(tiny_simulation_path, tmp_path / 'run',
                              config=make_tiny_train_config(), verbose=0)
    assert_same_weights(model, tiny_training.keras_model)
    assert [h['val_loss'] for h in card['training']['history']] == \
        [h['val_loss'] for h in tiny_training.card['training']['history']]


@pytest.mark.slow
def test_resume(tiny_training, tiny_simulation_path, tmp_path, make_tiny_train_config):
    import keras

    run = tmp_path / 'run'
    _, card = train_model(tiny_simulation_path, run, config=make_tiny_train_config(epochs=1),
                          verbose=0)
    assert card['training']['epochs_run'] == 1
    assert json.loads((run / 'state.json').read_text())['epoch'] == 1

    # Starting again in the same directory without resume would overwrite the run.
    with pytest.raises(OutputExistsError, match='resume') as info:
        train_model(tiny_simulation_path, run, config=make_tiny_train_config(epochs=2), verbose=0)
    assert isinstance(info.value, FileExistsError)

    _, card = train_model(tiny_simulation_path, run, config=make_tiny_train_config(epochs=2),
                          resume=True, verbose=0)
    history = card['training']['history']
    assert [h['epoch'] for h in history] == [1, 2]
    state = json.loads((run / 'state.json').read_text())
    assert state['epoch'] == 2
    assert len(state['history']) == 2
    # 1 epoch + 1 resumed epoch = 2 epochs in one go (the fixture's run, same seed): the
    # checkpoint restores the weights, the optimizer state and the epoch's shuffling seed.
    resumed = keras.saving.load_model(run / 'checkpoint.keras', safe_mode=True)
    straight = keras.saving.load_model(tiny_training.run_dir / 'checkpoint.keras',
                                       safe_mode=True)
    assert_same_weights(resumed, straight)
    assert [h['val_loss'] for h in history] == \
        [h['val_loss'] for h in tiny_training.card['training']['history']]

    # Resuming a finished run does no more epochs, and reads no training arrays (a run cut
    # off after its last checkpoint is finished this way without the memory of its data).
    import psfdeconv.train as train_module

    def no_arrays(*args, **kwargs):
        raise AssertionError('a finished run loaded its training arrays')

    original = train_module._load_split
    train_module._load_split = no_arrays
    try:
        _, card = train_model(tiny_simulation_path, run,
                              config=make_tiny_train_config(epochs=2), resume=True, verbose=0)
    finally:
        train_module._load_split = original
    assert card['training']['epochs_run'] == 2
    assert card['training']['n_train_stamps'] == card['training']['n_train']


def test_resume_without_checkpoint(tiny_simulation_path, tmp_path, make_tiny_train_config):
    with pytest.raises(InvalidInputError, match='no checkpoint'):
        train_model(tiny_simulation_path, tmp_path / 'empty', config=make_tiny_train_config(),
                    resume=True, verbose=0)


def test_train_on_missing_simulation(tmp_path, make_tiny_train_config):
    with pytest.raises(InvalidInputError, match='cannot read simulation file'):
        train_model(tmp_path / 'missing.h5', tmp_path / 'run', config=make_tiny_train_config(),
                    verbose=0)


@pytest.mark.slow
def test_tiny_unet_mixed_precision_trains_saves_and_loads(tiny_simulation_path, tmp_path,
                                                          make_tiny_train_config):
    # The shipped recipe: U-Net, mixed bfloat16 training, float32 inference model.
    from psfdeconv.model import load_model, save_model

    config = make_tiny_train_config(epochs=1, architecture='unet',
                                    dtype_policy='mixed_bfloat16')
    keras_model, card = train_model(tiny_simulation_path, tmp_path / 'run', config=config,
                                    verbose=0)
    assert card['architecture'] == 'unet'
    assert keras_model.dtype_policy.name == 'float32'
    assert any(type(layer).__name__ == 'Concatenate' for layer in keras_model.layers)
    card.update(name='tiny-unet', flux_bias=None)
    save_model(keras_model, tmp_path / 'unet.keras', card)
    model = load_model(tmp_path / 'unet.keras')
    cubes = np.zeros((2, 64, 64, 9), np.float32)
    assert_allclose(model.predict(cubes), np.asarray(keras_model(cubes)).transpose(0, 3, 1, 2),
                    rtol=1e-6)


# --- single-band models ----------------------------------------------------------------------


def test_split_bands_layout():
    from psfdeconv.train import split_bands

    rng = np.random.default_rng(3)
    data = {'observed': rng.normal(size=(4, 3, 8, 8)), 'psf': rng.normal(size=(4, 3, 5, 5)),
            'pixel_scale': np.array([0.1, 0.2, 0.3, 0.4]),
            'is_blank': np.array([0, 1, 0, 0], bool),
            'noise_sigma': rng.normal(size=(4, 3))}
    out = split_bands(data)
    assert out['observed'].shape == (12, 1, 8, 8) and out['psf'].shape == (12, 1, 5, 5)
    assert out['noise_sigma'].shape == (12, 1)
    # Object i, band b is row 3 i + b, with the object's own scalars.
    assert_array_equal(out['observed'][3 * 2 + 1, 0], data['observed'][2, 1])
    assert_array_equal(out['psf'][3 * 3 + 2, 0], data['psf'][3, 2])
    assert out['noise_sigma'][3 * 1 + 2, 0] == data['noise_sigma'][1, 2]
    assert_array_equal(out['pixel_scale'], np.repeat(data['pixel_scale'], 3))
    assert_array_equal(out['is_blank'], np.repeat(data['is_blank'], 3))


@pytest.mark.slow
def test_single_band_training_from_a_three_band_simulation(tiny_simulation_path, tmp_path,
                                                           make_tiny_train_config):
    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.model import load_model, save_model

    config = make_tiny_train_config(epochs=1, split_bands=True, max_train_objects=40)
    keras_model, card = train_model(tiny_simulation_path, tmp_path / 'run', config=config,
                                    verbose=0)
    assert card['n_bands'] == 1
    # 3 channels in (psf, ipsf, ipsf1 of one band), one band out.
    assert keras_model.input_shape[-1] == 3 and keras_model.output_shape[-1] == 1
    # Every band of the 40 training objects is a training object of its own.
    assert card['training']['n_train'] == 40
    state = json.loads((tmp_path / 'run' / 'state.json').read_text())
    assert state['epoch'] == 1
    card.update(name='tiny-1band', flux_bias=None)
    save_model(keras_model, tmp_path / 'one.keras', card)
    model = load_model(tmp_path / 'one.keras')
    sims = read_simulation(tiny_simulation_path, 0, 3)
    images = deconvolve_stamps(sims['observed'][:, 1:2], sims['psf'][:, 1:2],
                               pixel_scale=sims['pixel_scale'], model=model)
    assert images.shape == (3, 1, 64, 64) and np.isfinite(images).all()
    assert card['training']['n_train_stamps'] == 120

    # Evaluated on a 3-band simulation: every band of every object is a 1-band object.
    from psfdeconv.evaluate import evaluate_simulation

    results = evaluate_simulation(tiny_simulation_path, model=model, n_objects=24,
                                  baselines=('observed', 'wiener'))
    assert results['table1']['n'][0] == 3 * (24 - sims_blanks(tiny_simulation_path, 24))


def sims_blanks(path, n):
    from psfdeconv.simulate import read_simulation

    return int(read_simulation(path, 0, n)['is_blank'].sum())


@pytest.mark.slow
def test_initial_weights_start_the_run(tiny_training, tiny_simulation_path, tmp_path,
                                       make_tiny_train_config):
    # Fine-tuning: the run starts from the given network (with a vanishing learning rate
    # its convolution kernels stay that network's), and the card records the file's hash.
    import keras

    from psfdeconv.model import file_sha256

    start = tiny_training.run_dir / 'best.keras'
    config = make_tiny_train_config(epochs=1, max_train_objects=16, learning_rate=1e-12,
                                    initial_weights=str(start))
    model, card = train_model(tiny_simulation_path, tmp_path / 'run', config=config,
                              verbose=0)
    assert card['training']['initial_weights_sha256'] == file_sha256(start)
    source = keras.saving.load_model(start, safe_mode=True)
    kernels = [(layer.name, layer.kernel) for layer in model.layers if hasattr(layer, 'kernel')]
    assert kernels
    for name, kernel in kernels:
        assert_allclose(np.asarray(kernel), np.asarray(source.get_layer(name).kernel),
                        atol=1e-7)
    # A fresh run with the same seed starts elsewhere.
    fresh, _ = train_model(tiny_simulation_path, tmp_path / 'fresh', verbose=0,
                           config=make_tiny_train_config(epochs=1, max_train_objects=16,
                                                         learning_rate=1e-12))
    name, kernel = kernels[0]
    assert not np.allclose(np.asarray(fresh.get_layer(name).kernel), np.asarray(kernel))


def test_initial_weights_of_another_network_refused(tiny_training, tiny_simulation_path,
                                                    tmp_path, make_tiny_train_config):
    config = make_tiny_train_config(epochs=1, filters=(4, 8, 8),
                                    initial_weights=str(tiny_training.path))
    with pytest.raises(ConfigError, match='different network'):
        train_model(tiny_simulation_path, tmp_path / 'run', config=config, verbose=0)
    config = make_tiny_train_config(initial_weights=str(tmp_path / 'none.keras'))
    with pytest.raises(ConfigError, match='does not exist'):
        train_model(tiny_simulation_path, tmp_path / 'run2', config=config, verbose=0)


def test_augment_batch_matches_the_cube_of_transformed_stamps(tiny_simulation_path):
    # The symmetries commute with the channels' convolutions: the cube of flipped / turned
    # stamps and PSFs equals the flipped / turned cube (up to float32 rounding).
    from psfdeconv.simulate import read_simulation
    from psfdeconv.train import augment_batch

    sims = read_simulation(tiny_simulation_path, 0, 4)
    cube, target = scaled_batch(sims['observed'], sims['psf'], sims['pixel_scale'],
                                sims['truth'])
    for transform in range(8):
        def on_stamps(images, transform=transform):
            images = np.rot90(images, k=transform % 4, axes=(-2, -1))
            return images[..., ::-1] if transform >= 4 else images

        expected_cube, expected_target = scaled_batch(
            on_stamps(sims['observed']), on_stamps(sims['psf']), sims['pixel_scale'],
            on_stamps(sims['truth']))
        got_cube, got_target = augment_batch(cube, target, transform)
        np.testing.assert_allclose(got_cube, expected_cube, atol=2e-6)
        np.testing.assert_allclose(got_target, expected_target, atol=2e-6)
    # Transform 0 is the identity and every other one changes an asymmetric batch.
    assert np.array_equal(augment_batch(cube, target, 0)[0], cube)
    assert all(not np.allclose(augment_batch(cube, target, t)[0], cube) for t in range(1, 8))


def test_build_cache_equals_per_batch_cubes(tiny_simulation_path):
    from psfdeconv.simulate import read_simulation
    from psfdeconv.train import build_cache

    sims = read_simulation(tiny_simulation_path, 0, 40)
    data = {key: sims[key] for key in ('observed', 'psf', 'pixel_scale', 'truth')}
    expected = scaled_batch(data['observed'], data['psf'], data['pixel_scale'],
                            data['truth'])
    # Forked workers and chunks that do not divide the objects evenly.
    cubes, targets = build_cache(data, n_workers=2, chunk=16)
    np.testing.assert_array_equal(cubes, expected[0])
    np.testing.assert_array_equal(targets, expected[1])


@pytest.mark.slow
def test_cached_augmented_training_runs_and_is_recorded(tiny_simulation_path, tmp_path,
                                                        make_tiny_train_config):
    config = make_tiny_train_config(epochs=1, cache_cubes=True, augment=True,
                                    data_workers=2)
    model, card = train_model(tiny_simulation_path, tmp_path / 'run', config=config,
                              verbose=0)
    training = card['training']
    assert training['config']['cache_cubes'] and training['config']['augment']
    assert training['keras_backend'] == 'tensorflow'
    assert training['compute_device'] == 'cpu'
    assert np.isfinite(training['best_val_loss'])


def test_validation_objects_are_the_runs_held_out_split(tiny_simulation_path,
                                                        make_tiny_train_config):
    from psfdeconv.simulate import read_simulation
    from psfdeconv.train import validation_objects

    config = make_tiny_train_config()
    val = validation_objects(tiny_simulation_path, config)
    sims = read_simulation(tiny_simulation_path)
    _, val_idx = split_indices(160, validation_fraction=config.validation_fraction,
                               seed=config.seed)
    assert_array_equal(val['observed'], sims['observed'][val_idx])
    single = validation_objects(tiny_simulation_path, make_tiny_train_config(split_bands=True))
    assert single['observed'].shape == (3 * len(val_idx), 1, 64, 64)


# --- the shape term of the loss --------------------------------------------------------------


def test_moment_term_measures_the_weighted_shape_errors():
    import keras
    from _images import elliptical_gaussian as gaussian

    from psfdeconv.train import _moment_term

    round_ = gaussian((32, 32), 3.0, 3.0, 0.0, 15.5, 16.2)
    elongated = gaussian((32, 32), 3.3, 2.7, 0.0, 15.5, 16.2)
    larger = gaussian((32, 32), 3.6, 3.6, 0.0, 15.5, 16.2)
    target = np.stack([round_, round_, round_, np.zeros_like(round_)], -1)[None]
    predicted = np.stack([round_, elongated, larger, elongated], -1)[None]
    term = float(keras.ops.convert_to_numpy(_moment_term(keras.ops, target.astype('float32'),
                                                         predicted.astype('float32')))[0])
    # Weighted by a round Gaussian of the target's sigma^2 = T_target / 2 = 9 px^2, a
    # Gaussian of widths s_x, s_y has moments 1 / (1 / s^2 + 1 / 9): band 1's e1 is
    # (4.93 - 4.03) / (4.93 + 4.03), band 2's ln T ratio ln(2 * 5.14 / 9); the blank
    # band 3 has no term but counts in the mean over the 4 bands.
    qx, qy = 1 / (1 / 3.3**2 + 1 / 9), 1 / (1 / 2.7**2 + 1 / 9)
    e1 = (qx - qy) / (qx + qy)
    log_t1 = np.log((qx + qy) / 9.0)
    log_t2 = np.log(2 / (1 / 3.6**2 + 1 / 9) / 9.0)
    expected = (e1**2 + log_t1**2 + log_t2**2) / 4
    assert_allclose(term, expected, rtol=0.02)
    same = keras.ops.convert_to_numpy(_moment_term(keras.ops, target.astype('float32'),
                                                   target.astype('float32')))
    assert_allclose(same, 0.0, atol=1e-10)


def test_moment_loss_adds_the_weighted_term_and_serialises():
    import keras

    from psfdeconv.train import _moment_term, moment_loss

    rng = np.random.default_rng(3)
    target = rng.uniform(0, 0.5, (2, 16, 16, 3)).astype('float32')
    predicted = rng.uniform(0.01, 0.5, (2, 16, 16, 3)).astype('float32')
    loss = moment_loss(keras)(moment_weight=0.5)
    bce = float(keras.losses.BinaryCrossentropy()(target, predicted))
    term = keras.ops.convert_to_numpy(_moment_term(keras.ops, target, predicted))
    assert term.min() > 0
    assert_allclose(float(loss(target, predicted)), bce + 0.5 * term.mean(), rtol=1e-5)
    # Checkpoints of runs with the term reload it by its registered name.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss) and restored.moment_weight == 0.5
    assert moment_loss(keras) is type(loss)


@pytest.mark.slow
def test_training_with_the_moment_term_resumes(tiny_simulation_path, tmp_path,
                                               make_tiny_train_config):
    config = make_tiny_train_config(epochs=1, moment_loss_weight=0.05)
    run = tmp_path / 'run'
    _, card = train_model(tiny_simulation_path, run, config=config, verbose=0)
    assert card['training']['config']['moment_loss_weight'] == 0.05
    first = card['training']['history'][0]['val_loss']
    plain = make_tiny_train_config(epochs=1)
    _, plain_card = train_model(tiny_simulation_path, tmp_path / 'plain', config=plain,
                                verbose=0)
    # Same seed, same weights at the first validation: the term adds to the loss.
    assert first > plain_card['training']['history'][0]['val_loss']
    _, card = train_model(tiny_simulation_path, run,
                          config=make_tiny_train_config(epochs=2, moment_loss_weight=0.05),
                          resume=True, verbose=0)
    assert [h['epoch'] for h in card['training']['history']] == [1, 2]


# --- distillation of the symmetry average ------------------------------------------------------


def test_distilled_targets_are_the_teachers_symmetry_average(tiny_model, tiny_simulation_path):
    # The targets of a distilled run are the teacher's 4-view average of the same stamps, as
    # deconvolve_stamps computes it (symmetric_output), in the targets' layout; a weight mixes
    # them with the truth's.
    from psfdeconv.deconvolve import symmetric_output
    from psfdeconv.train import distilled_targets

    sims = read_simulation(tiny_simulation_path, 0, 24)
    cube, truth_target = scaled_batch(sims['observed'], sims['psf'], sims['pixel_scale'],
                                      sims['truth'])
    average = symmetric_output(tiny_model, sims['observed'], sims['psf'], sims['pixel_scale'],
                               symmetries=4).transpose(0, 2, 3, 1)
    expected = np.clip(average, 0.0, 1.0)
    got = distilled_targets(tiny_model.path, cube, truth_target.copy(), symmetries=4,
                            chunk=10)
    assert got.dtype == np.float32
    assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Not the truth, and not one view: the average is of the four turns.
    one_view = symmetric_output(tiny_model, sims['observed'], sims['psf'],
                                sims['pixel_scale'], symmetries=1).transpose(0, 2, 3, 1)
    assert np.abs(got - truth_target).max() > 1e-2
    assert np.abs(got - np.clip(one_view, 0, 1)).max() > 1e-4
    half = distilled_targets(tiny_model, cube, truth_target.copy(), symmetries=4, weight=0.5)
    assert_allclose(half, 0.5 * expected + 0.5 * truth_target, atol=1e-6)
    assert_array_equal(distilled_targets(tiny_model, cube, truth_target.copy(), symmetries=4,
                                         weight=0.0), truth_target)


def test_distilled_targets_refuse_another_network(tiny_model, tiny_simulation_path):
    from psfdeconv.train import distilled_targets

    sims = read_simulation(tiny_simulation_path, 0, 4)
    cube, target = scaled_batch(sims['observed'], sims['psf'], sims['pixel_scale'],
                                sims['truth'], kinds=('psf',))
    with pytest.raises(ConfigError, match=r'takes cubes of shape \(64, 64, 9\)'):
        distilled_targets(tiny_model, cube, target, symmetries=4)


@pytest.mark.slow
def test_distilled_training_records_its_teacher(tiny_training, tiny_simulation_path, tmp_path,
                                                make_tiny_train_config):
    # Same seed, start and steps: only the targets differ, so the weights do, and the card
    # records the teacher's views. (Whether a student learns its teacher's average is a question
    # for a real network, docs/validation.rst; this one's outputs barely depend on the view.)
    options = dict(epochs=1, cache_cubes=True, learning_rate=1e-3,
                   initial_weights=str(tiny_training.path))
    plain, _ = train_model(tiny_simulation_path, tmp_path / 'plain', verbose=0,
                           config=make_tiny_train_config(**options))
    distilled, card = train_model(tiny_simulation_path, tmp_path / 'distilled', verbose=0,
                                  config=make_tiny_train_config(distill_symmetries=4,
                                                                **options))
    assert card['training']['config']['distill_symmetries'] == 4
    assert card['training']['config']['distill_weight'] == 1.0
    assert any(not np.array_equal(a, b)
               for a, b in zip(plain.get_weights(), distilled.get_weights(), strict=True))
