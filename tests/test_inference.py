# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The network runners of psfdeconv.inference: float32 graph, bfloat16
(OpenVINO or TensorFlow mixed precision) and the precision setting."""

import sys

import numpy as np
import pytest

from psfdeconv.exceptions import ConfigError
from psfdeconv.inference import (
    available_runtimes,
    cpu_has_bfloat16,
    get_runner,
    openvino_available,
    resolve_precision,
)

#: Largest |bfloat16 - float32| network output relative to the largest
#: float32 output (measured 0.006-0.008 on the shipped U-Net; bfloat16 keeps
#: 8 bits of mantissa, 0.4 % per rounding).
BF16_OUTPUT_TOLERANCE = 0.03
#: Median |flux change| / flux of SNR > 10 objects (measured 1.3e-3 on 2000 objects,
#: benchmarks/bench_precision.py).
BF16_FLUX_TOLERANCE = 0.005


@pytest.fixture(scope='module')
def model():
    import psfdeconv

    return psfdeconv.load_model()


@pytest.fixture(scope='module')
def sims():
    from psfdeconv.simulate import simulate_stamps

    return simulate_stamps(24, seed=3)


@pytest.fixture(scope='module')
def cube(model, sims):
    from psfdeconv.features import make_cube

    cube, _ = make_cube(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                        kinds=model.kinds, **model.feature_options)
    return cube.astype(np.float32)


def eager(model, cube):
    """The network as Keras runs it eagerly, (n, n_bands, ny, nx)."""
    return np.asarray(model.keras_model(cube, training=False)).transpose(0, 3, 1, 2)


def test_bad_precision_is_refused():
    with pytest.raises(ConfigError, match=r"precision must be one of .*'float16'"):
        resolve_precision('float16')


def test_float32_is_always_float32():
    # OpenVINO runs float32 where it is installed, TensorFlow elsewhere.
    assert resolve_precision('float32') == ('float32', available_runtimes()[-1])


def test_float32_without_openvino_is_tensorflow(monkeypatch):
    monkeypatch.setitem(sys.modules, 'openvino', None)
    assert resolve_precision('float32') == ('float32', 'tensorflow')


def test_auto_follows_the_cpu():
    precision, runtime = resolve_precision('auto')
    assert precision == ('bfloat16' if cpu_has_bfloat16() else 'float32')
    assert runtime in available_runtimes()


def test_cpu_flags(tmp_path):
    with_bf16 = tmp_path / 'bf16'
    with_bf16.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n')
    without = tmp_path / 'plain'
    without.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2\n')
    linux = sys.platform.startswith('linux')
    assert cpu_has_bfloat16(with_bf16) is linux
    assert cpu_has_bfloat16(without) is False
    assert cpu_has_bfloat16(tmp_path / 'missing') is False


def test_float32_graph_equals_eager(model, cube):
    expected = eager(model, cube)
    # 10 of 24: the last batch is partial.
    got = model.predict(cube, batch_size=10, precision='float32')
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_float32_under_another_keras_backend(model, cube, monkeypatch):
    # Under JAX (an accelerator machine without TensorFlow) the 'tensorflow' runtime is
    # Keras' own inference step: no TensorFlow graph, the same numbers.
    import keras

    from psfdeconv import inference

    monkeypatch.setattr(keras.backend, 'backend', lambda: 'jax')
    monkeypatch.setattr(inference, '_graph', None)  # never traced
    got = inference._tensorflow_runner(model.keras_model)(cube)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), eager(model, cube), rtol=0,
                               atol=1e-5)


def test_float32_runtimes_agree(model, cube):
    from psfdeconv import inference

    graph = inference._tensorflow_runner(model.keras_model)(cube)
    got = model.predict(cube, precision='float32').transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, graph, rtol=0, atol=1e-5 * graph.max())


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_openvino_float32_does_not_depend_on_the_batch_size(model, cube):
    from psfdeconv import inference

    run = inference._openvino_float32_runner(model.keras_model)
    whole = run(cube)
    pieces = np.concatenate([run(cube[first:first + 5]) for first in range(0, len(cube), 5)])
    assert np.array_equal(whole, pieces)
    # Nor on the chunks a call is spread over (one stamp: one request).
    ones = np.concatenate([run(cube[k:k + 1]) for k in range(len(cube))])
    assert np.array_equal(whole, ones)
    # Really float32, not a reduced precision under its name.
    graph = inference._tensorflow_runner(model.keras_model)(cube)
    assert np.abs(whole - graph).max() < 1e-5 * graph.max()


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_openvino_bfloat16_chunks_give_one_request_values(model, cube, monkeypatch):
    # A call spreads its batch over the streams in chunks; every stamp's output is the one
    # a single request for the whole batch gives.
    from psfdeconv import inference

    monkeypatch.setattr(inference, '_OPENVINO_CHUNK', 3)
    run = inference._openvino_runner(model.keras_model)
    chunked = run(cube)
    ones = np.concatenate([run(cube[k:k + 1]) for k in range(len(cube))])
    assert chunked.shape == ones.shape and np.array_equal(chunked, ones)


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_openvino_runner_from_several_threads(model, cube, monkeypatch):
    # Each thread runs its own inference requests (kept between its calls):
    # concurrent calls, chunked or not, give what each gives alone.
    from concurrent.futures import ThreadPoolExecutor

    from psfdeconv import inference

    monkeypatch.setattr(inference, '_OPENVINO_CHUNK', 2)
    run = inference._openvino_runner(model.keras_model)
    batches = [cube, cube[::-1], cube[:1], cube[1:4]] * 3
    alone = [run(batch) for batch in batches[:4]]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, batches))
    for k, got in enumerate(together):
        assert np.array_equal(got, alone[k % 4])


#: Builds an OpenVINO runner in a fresh interpreter and prints the forks it
#: made, whether a client ID appeared under HOME, and whether the telemetry
#: package is importable afterwards.
_TELEMETRY_SCRIPT = """
import os, pathlib, sys
import numpy as np
forks = []
os.register_at_fork(before=lambda: forks.append(1))
import keras
from psfdeconv.inference import get_runner
from psfdeconv.model import DeconvolutionModel
inputs = keras.Input((8, 8, 2))
network = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding='same',
                                                  activation='softplus')(inputs))
for precision in ('float32', 'bfloat16'):
    runner, resolved = get_runner(DeconvolutionModel(network, {}), precision)
    assert resolved[1] == 'openvino', resolved
    runner(np.ones((2, 8, 8, 2), np.float32))
import openvino_telemetry
print(len(forks), (pathlib.Path.home() / 'intel').exists())
"""


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_openvino_sends_no_telemetry(tmp_path):
    # openvino's import and convert_model report usage (each event a fork,
    # which fails scipy.fft calls in other threads) unless opted out.
    import os
    import subprocess

    env = dict(os.environ, HOME=str(tmp_path), KERAS_HOME=str(tmp_path / 'keras'))
    env.pop('CI', None)  # OpenVINO sends nothing in CI: test the user's case
    result = subprocess.run([sys.executable, '-c', _TELEMETRY_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ['0', 'False']


#: Builds an OpenVINO runner in the main thread, releases it in another thread,
#: then interrupts the main thread (Ctrl-C), whose Python handler runs on the
#: thread's alternate signal stack.
_SIGNAL_SCRIPT = """
import gc, signal, threading, time
import keras, numpy as np
from psfdeconv import inference
inputs = keras.Input((8, 8, 2))
network = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding='same')(inputs))
holder = [inference._openvino_runner(network)]
holder[0](np.ones((4, 8, 8, 2), np.float32))
release = threading.Thread(target=lambda: (holder.clear(), gc.collect()))
release.start()
release.join()
caught = []
signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident,
                                           signal.SIGINT)).start()
time.sleep(1)
print('caught', caught)
"""


@pytest.mark.skipif(not openvino_available() or not sys.platform.startswith('linux'),
                    reason='needs OpenVINO on Linux')
def test_interrupt_after_a_network_released_by_another_thread():
    # OpenVINO unmaps the alternate signal stack it gave the compiling thread
    # when another thread releases the network: the interrupt crashed (SIGSEGV).
    import os
    import subprocess

    result = subprocess.run([sys.executable, '-c', _SIGNAL_SCRIPT], capture_output=True,
                            text=True, timeout=300, check=False,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split()[-2:] == ['caught', '[2]']


@pytest.mark.skipif(not openvino_available() or not sys.platform.startswith('linux'),
                    reason='needs OpenVINO on Linux')
def test_compiling_keeps_the_threads_alternate_signal_stack():
    import ctypes

    import keras

    from psfdeconv import inference

    libc = ctypes.CDLL(None, use_errno=True)

    def current():
        stack = inference._SignalStack()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    inputs = keras.Input((8, 8, 2))
    network = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding='same')(inputs))
    before = current()
    run = inference._openvino_runner(network)
    assert current() == before
    assert run(np.ones((2, 8, 8, 2), np.float32)).shape == (2, 8, 8, 1)


def test_runner_is_cached(model):
    first, _ = get_runner(model, 'float32')
    second, _ = get_runner(model, 'float32')
    assert first is second


def test_bfloat16_is_close_to_float32(model, cube):
    reference = model.predict(cube, precision='float32')
    got = model.predict(cube, batch_size=10, precision='bfloat16')
    assert got.dtype == np.float32 and got.shape == reference.shape
    difference = np.abs(got - reference).max() / reference.max()
    assert difference < BF16_OUTPUT_TOLERANCE
    if cpu_has_bfloat16():
        # Really reduced precision, not float32 under another name.
        assert difference > 1e-5


def test_tensorflow_bfloat16_without_openvino(model, cube, monkeypatch):
    monkeypatch.setitem(sys.modules, 'openvino', None)
    assert not openvino_available()
    assert resolve_precision('bfloat16') == ('bfloat16', 'tensorflow')
    assert resolve_precision('auto')[1] == 'tensorflow'
    reference = model.predict(cube, precision='float32')
    got = model.predict(cube, precision='bfloat16')
    assert np.abs(got - reference).max() / reference.max() < BF16_OUTPUT_TOLERANCE


def test_deconvolve_stamps_float32_reproduces_eager(model, sims, cube):
    from psfdeconv.deconvolve import deconvolve_stamps

    class EagerModel(type(model)):
        """The model as it ran before the compiled runners: eager Keras."""

        def predict(self, cubes, *, batch_size=128, precision='auto'):
            return eager(self, cubes)

    old = EagerModel(model.keras_model, model.card, path=model.path)
    args = (sims['observed'], sims['psf'])
    kwargs = dict(pixel_scale=sims['pixel_scale'], symmetries=1, return_details=True)
    images, details = deconvolve_stamps(*args, model=model, precision='float32', **kwargs)
    expected, expected_details = deconvolve_stamps(*args, model=old, **kwargs)
    assert details['precision'] == resolve_precision('float32')
    np.testing.assert_allclose(images, expected, rtol=1e-4, atol=1e-6 * expected.max())
    # Fluxes of blanks are noise near 0: their tolerance is a fraction of the error.
    np.testing.assert_allclose(details['flux'], expected_details['flux'], rtol=1e-4,
                               atol=1e-4 * np.median(expected_details['flux_err']))


def test_deconvolve_stamps_bfloat16_fluxes(model, sims):
    from psfdeconv.deconvolve import deconvolve_stamps

    args = (sims['observed'], sims['psf'])
    kwargs = dict(pixel_scale=sims['pixel_scale'], symmetries=1, return_details=True)
    _, single = deconvolve_stamps(*args, model=model, precision='float32', **kwargs)
    _, reduced = deconvolve_stamps(*args, model=model, precision='bfloat16', **kwargs)
    assert reduced['precision'][0] == 'bfloat16'
    bright = single['flux'] / single['flux_err'] > 10
    assert bright.sum() >= 10
    change = np.abs(reduced['flux'][bright] / single['flux'][bright] - 1)
    assert np.median(change) < BF16_FLUX_TOLERANCE


def test_deconvolve_stamps_refuses_bad_precision(sims):
    from psfdeconv.deconvolve import deconvolve_stamps

    with pytest.raises(ConfigError, match='precision'):
        deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                          precision='half')


def test_batch_refuses_bad_precision_before_any_group(tmp_path):
    from psfdeconv.batch import run_batch

    (tmp_path / 'groups.csv').write_text('id,g\nf0,missing.fits\n')
    with pytest.raises(ConfigError, match="precision must be one of .*'half'"):
        run_batch(tmp_path / 'groups.csv', tmp_path / 'out', precision='half')
    assert not (tmp_path / 'out').exists()


def test_run_records_precision(example_run):
    from psfdeconv.io import read_catalog

    model = read_catalog(example_run.out / 'catalog.fits').meta['model']
    # The default: bfloat16 where the CPU has it.
    assert (model['precision'], model['runtime']) == resolve_precision('auto')


@pytest.mark.slow
def test_cli_precision_float32_recorded(tmp_path):
    from psfdeconv.cli import main
    from psfdeconv.io import read_catalog

    out = tmp_path / 'out'
    assert main(['run', '--example', '--precision', 'float32', '--symmetries', '1',
                 '--out', str(out)]) == 0
    model = read_catalog(out / 'catalog.fits').meta['model']
    assert (model['precision'], model['runtime']) == resolve_precision('float32')


# --- OpenVINO's conversions cached on disk ----------------------------------------------------

#: Runs a lazily loaded model file's network in a fresh interpreter at two precisions; prints
#: whether TensorFlow and Keras were imported, and saves the outputs.
_CACHED_RUN_SCRIPT = """
import sys
import numpy as np
from psfdeconv.model import load_model
model = load_model(sys.argv[1], network='lazy')
channels = len(model.kinds) * model.n_bands
cubes = np.random.default_rng(5).random((6, model.stamp_size, model.stamp_size, channels),
                                        dtype=np.float32)
np.savez(sys.argv[2], **{precision: model.predict(cubes, precision=precision)
                         for precision in ('float32', 'bfloat16')})
print('tensorflow' in sys.modules, 'keras' in sys.modules, model.network_loaded)
"""


def _cached_run(model_path, out, cache):
    import os
    import subprocess

    env = dict(os.environ, PSFDECONV_CACHE_DIR=str(cache))
    child = subprocess.run([sys.executable, '-c', _CACHED_RUN_SCRIPT, str(model_path),
                            str(out)], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert child.returncode == 0, child.stderr[-2000:]
    with np.load(out) as outputs:
        return child.stdout.split()[-3:], dict(outputs)


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_cached_network_runs_without_tensorflow(tiny_model_path, tmp_path):
    # The first process converts the network (Keras, TensorFlow) and caches the
    # conversion; the next compiles the cached one without starting either, to the
    # same outputs in float32 (softplus by NumPy) and in bfloat16.
    cache = tmp_path / 'cache'
    first, converted = _cached_run(tiny_model_path, tmp_path / 'first.npz', cache)
    assert first == ['True', 'True', 'True']
    assert len(list(cache.iterdir())) == 2  # one entry per precision
    again, cached = _cached_run(tiny_model_path, tmp_path / 'again.npz', cache)
    assert again == ['False', 'False', 'False']
    # And as a process without the cache, which runs its own conversion.
    uncached = _cached_run(tiny_model_path, tmp_path / 'uncached.npz', 'off')[1]
    for precision in ('float32', 'bfloat16'):
        assert np.array_equal(cached[precision], converted[precision]), precision
        assert np.array_equal(uncached[precision], converted[precision]), precision
    assert converted['float32'].min() > 0  # the softplus was applied


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_damaged_cached_network_is_converted_again(tiny_model_path, tiny_model, tmp_path,
                                                   monkeypatch, caplog):
    from psfdeconv.model import load_model

    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(tmp_path / 'cache'))
    cubes = np.random.default_rng(6).random(
        (3, tiny_model.stamp_size, tiny_model.stamp_size, 9), dtype=np.float32)
    expected = load_model(tiny_model_path, network='lazy').predict(cubes)
    (entry,) = (tmp_path / 'cache').iterdir()
    weights = entry / 'network.bin'
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    with caplog.at_level('WARNING', logger='psfdeconv.inference'):
        got = load_model(tiny_model_path, network='lazy').predict(cubes)
    assert np.array_equal(got, expected)
    assert 'is damaged' in caplog.text and 'differ from its manifest' in caplog.text
    # Replaced by a good conversion, which the next process reads.
    assert weights.read_bytes() != bytes(damaged)
    caplog.clear()
    model = load_model(tiny_model_path, network='lazy')
    assert np.array_equal(model.predict(cubes), expected)
    assert not model.network_loaded and 'damaged' not in caplog.text


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_cached_network_of_another_shape_is_refused(tiny_model_path, tiny_model, tmp_path,
                                                    monkeypatch, caplog):
    # A conversion whose files match their manifest but not the model card (here the
    # card claims 2 bands) is not used: the network is converted from the file.
    import json

    from psfdeconv import inference
    from psfdeconv.model import DeconvolutionModel, load_model

    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(tmp_path / 'cache'))
    # The 3-band entry.
    load_model(tiny_model_path, network='lazy').predict(np.zeros((1, 64, 64, 9), np.float32))
    card = dict(tiny_model.card, n_bands=2, input_kinds=['psf', 'ipsf', 'ipsf1'])
    wrong = DeconvolutionModel(None, card, path=tiny_model.path,
                               load_network=lambda: tiny_model.keras_model)
    entry, key = inference._cache_entry(wrong, logits=False)
    # The 3-band conversion under the 2-band card's key, its manifest consistent.
    (right,) = [path for path in (tmp_path / 'cache').iterdir() if path != entry]
    manifest = json.loads((right / 'manifest.json').read_text())
    manifest['key'] = key
    entry.mkdir()
    for name in ('network.xml', 'network.bin'):
        (entry / name).write_bytes((right / name).read_bytes())
    (entry / 'manifest.json').write_text(json.dumps(manifest))
    with caplog.at_level('WARNING', logger='psfdeconv.inference'):
        assert inference._read_cached_network(entry, key, wrong) is None
    assert 'but its card describes 2 bands' in caplog.text


def test_no_cache_without_a_file_or_when_off(tiny_training, tiny_model, tmp_path,
                                             monkeypatch):
    from psfdeconv import inference
    from psfdeconv.model import DeconvolutionModel

    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(tmp_path / 'cache'))
    assert inference.network_cache_dir() == tmp_path / 'cache'
    # A network built in memory has no file to key its conversion on.
    in_memory = DeconvolutionModel(tiny_training.keras_model, dict(tiny_training.card))
    assert inference._cache_entry(in_memory, logits=False)[0] is None
    assert inference._cache_entry(tiny_model, logits=False)[0].parent == tmp_path / 'cache'
    for off in ('off', 'OFF', ''):
        monkeypatch.setenv('PSFDECONV_CACHE_DIR', off)
        assert inference.network_cache_dir() is None
        assert inference._cache_entry(tiny_model, logits=False)[0] is None
    # Unset: none in a user's session; psfdeconv's location in the processes it starts.
    monkeypatch.delenv('PSFDECONV_CACHE_DIR')
    monkeypatch.setattr(inference, '_DEFAULT_CACHE', [])
    assert inference.network_cache_dir() is None
    inference.use_default_network_cache()
    assert inference.network_cache_dir().parts[-2:] == ('psfdeconv', 'networks')


def test_cache_key_follows_the_weights_and_configuration(tiny_model, tmp_path, monkeypatch):
    from psfdeconv import inference
    from psfdeconv.model import DeconvolutionModel

    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(tmp_path))

    def entry(**changes):
        model = DeconvolutionModel(None, dict(tiny_model.card, **changes),
                                   path=tiny_model.path, load_network=lambda: None)
        return inference._cache_entry(model, logits=False)[0]

    assert entry() == inference._cache_entry(tiny_model, logits=False)[0]
    assert entry(weights_sha256='0' * 64) != entry()
    assert entry(config_sha256='0' * 64) != entry()
    assert inference._cache_entry(tiny_model, logits=True)[0] != entry()


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_unwritable_cache_is_skipped(tiny_model_path, tmp_path, monkeypatch):
    # A cache location that cannot be made (a file in the way): the network runs,
    # converted as without a cache.
    from psfdeconv.model import load_model

    blocker = tmp_path / 'file'
    blocker.write_text('not a directory')
    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(blocker / 'cache'))
    model = load_model(tiny_model_path, network='lazy')
    out = model.predict(np.ones((2, 64, 64, 9), np.float32))
    assert out.shape == (2, 3, 64, 64) and model.network_loaded
