# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The runners that execute the network for `~psfdeconv.model.DeconvolutionModel.predict`.

Two precisions are offered:

``'float32'``
    The Keras model traced once into a TensorFlow graph
    (`tf.function` with a fixed input signature), compiled by OpenVINO's
    CPU plugin in float32 (``INFERENCE_PRECISION_HINT`` f32, a softplus
    output activation applied by NumPy) when the ``openvino`` package is
    installed, else run by TensorFlow (under another Keras backend, such as
    JAX on a GPU machine, by that backend). All equal the eager Keras call to
    float32 rounding (within 1e-5 of the largest output; OpenVINO's output
    does not depend on the batch size). OpenVINO
    is the faster of the two on CPUs without bfloat16 (1.6-1.7x TensorFlow
    on an AMD EPYC with AVX2, ``benchmarks/bench_speed.py``).
``'bfloat16'``
    The network in bfloat16 arithmetic (float32 accumulation), which CPUs
    with AVX512-BF16 or AMX-BF16 run several times faster. Run by OpenVINO
    (the CPU plugin with ``INFERENCE_PRECISION_HINT`` bf16) when the
    ``openvino`` package is installed, else by TensorFlow with the
    ``mixed_bfloat16`` Keras policy (the network cloned with the float32
    weights). The output layer stays float32 in both.

``'auto'`` picks bfloat16 where the CPU has it (`cpu_has_bfloat16`) and
float32 elsewhere; it is the default of `~psfdeconv.deconvolve_stamps`, the
pipeline, the batch and the command line (`DeconvolutionModel.predict
<psfdeconv.model.DeconvolutionModel.predict>` and the calibrations run float32).
`resolve_precision` says what a setting gives on this machine, as
``(precision, runtime)``. Calibrations
are fitted in float32: :doc:`/precision` gives the effect of bfloat16 on
fluxes and shapes.

The runners are built on first use and kept on the model (one per
precision and runtime); each takes float32 cubes of any batch size and
returns float32 arrays.

OpenVINO's conversion of a model file's network is kept on disk
(`network_cache_dir`), keyed by the file's weights and configuration and the
versions that made it: a process that finds it there compiles it without
starting Keras and TensorFlow (seconds at each start of a process: each
``psfdeconv run``, each worker of ``psfdeconv batch``). The cached files
carry their SHA-256 digests and are checked against them and against the
model card at every use; a mismatch converts the network again.
"""

import collections
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

from .exceptions import ConfigError

__all__ = ['PRECISIONS', 'RUNTIMES', 'cpu_has_bfloat16', 'openvino_available',
           'available_runtimes', 'resolve_precision', 'get_runner',
           'network_cache_dir', 'use_default_network_cache', 'CACHE_DIR_VARIABLE']

log = logging.getLogger(__name__)

#: Values of the ``precision`` options.
PRECISIONS = ('auto', 'float32', 'bfloat16')
#: Runtimes a runner can use.
RUNTIMES = ('tensorflow', 'openvino')
#: /proc/cpuinfo flags of x86 CPUs with bfloat16 dot products.
_BF16_FLAGS = frozenset({'avx512_bf16', 'amx_bf16'})
#: Environment variable naming the directory of converted networks
#: (`network_cache_dir`); ``off`` (or empty) turns the cache off.
CACHE_DIR_VARIABLE = 'PSFDECONV_CACHE_DIR'
#: Layout of a cache entry; part of its key.
_CACHE_LAYOUT = 1


def cpu_has_bfloat16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16).

    Read from the ``flags`` of ``/proc/cpuinfo`` on Linux; False elsewhere
    (and where the file cannot be read), so that ``precision='auto'`` never
    picks a precision the CPU would only emulate.

    Parameters
    ----------
    cpuinfo : str, optional
        The file to read.

    Returns
    -------
    bool
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith('flags'):
                    return bool(_BF16_FLAGS & set(line.split(':', 1)[-1].split()))
    except OSError:
        pass
    return False


_IMPORT_LOCK = threading.Lock()


def _import_openvino():
    """``import openvino``, without OpenVINO's usage telemetry.

    ``openvino`` sends usage events (to Google Analytics, through the
    ``openvino-telemetry`` package it depends on) when it is imported and on
    every ``convert_model`` call, unless the user has opted out, and writes
    a client ID under ``~/intel``; each event forks the process. A library
    must not report its users' runs, and the forks break what other threads
    are doing at that moment (scipy.fft's worker pool is shut down around a
    fork, failing a concurrent transform with "Work item submitted after
    shutdown"). OpenVINO falls back to its own no-op telemetry stub where
    ``openvino_telemetry`` cannot be imported: the first import is done with
    that module hidden, so OpenVINO's modules keep the stub; the module is
    importable again afterwards. Where the application imported
    ``openvino`` first, its telemetry is left as the application set it up.
    """
    with _IMPORT_LOCK:
        if 'openvino' in sys.modules:
            import openvino

            return openvino
        hide = 'openvino_telemetry' not in sys.modules
        if hide:
            sys.modules['openvino_telemetry'] = None  # import raises ImportError
        try:
            import openvino
        finally:
            if hide and sys.modules.get('openvino_telemetry', 0) is None:
                del sys.modules['openvino_telemetry']
        return openvino


def openvino_available():
    """Whether the optional ``openvino`` package can be imported."""
    try:
        _import_openvino()
    except ImportError:
        return False
    return True


def available_runtimes():
    """The runtimes psfdeconv can run the network with here, e.g.
    ``('tensorflow', 'openvino')``."""
    return ('tensorflow',) + (('openvino',) if openvino_available() else ())


def resolve_precision(precision='auto'):
    """The precision and runtime a ``precision`` setting runs with here.

    Parameters
    ----------
    precision : {'auto', 'float32', 'bfloat16'}, optional
        ``'auto'``: bfloat16 where the CPU has it (`cpu_has_bfloat16`),
        else float32. ``'bfloat16'`` is honoured on any CPU (emulated, and
        slow, where the CPU lacks it).

    Returns
    -------
    tuple of str
        ``(precision, runtime)``: ``('float32', 'openvino')`` or
        ``('bfloat16', 'openvino')``, or, without OpenVINO,
        ``('float32', 'tensorflow')`` or ``('bfloat16', 'tensorflow')``.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        For a value not in `PRECISIONS`.

    Examples
    --------
    >>> from psfdeconv.inference import available_runtimes, resolve_precision
    >>> precision, runtime = resolve_precision('float32')
    >>> precision, runtime == available_runtimes()[-1]
    ('float32', True)
    """
    if precision not in PRECISIONS:
        raise ConfigError(f'precision must be one of {PRECISIONS}, got {precision!r}; '
                          f"'auto' uses bfloat16 where the CPU has it.")
    if precision == 'auto':
        precision = 'bfloat16' if cpu_has_bfloat16() else 'float32'
    return precision, 'openvino' if openvino_available() else 'tensorflow'


def get_runner(model, precision='float32'):
    """The runner of a model at a precision, built on first use and kept on
    the model.

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        The network.
    precision : {'auto', 'float32', 'bfloat16'}, optional
        See `resolve_precision`.

    Returns
    -------
    runner : callable
        ``runner(batch)`` maps a float32 array (n, ny, nx, n_channels) to
        the float32 output (n, ny, nx, n_bands).
    resolved : tuple of str
        ``(precision, runtime)`` that ran.
    """
    resolved = resolve_precision(precision)
    # One build per model and precision, also when threads of a batch ask at
    # once: a conversion (OpenVINO, a mixed-precision clone) is not thread-safe.
    with _BUILD_LOCK:
        if not model.has_network:
            raise ConfigError(f'the model {getattr(model, "path", None) or ""} was loaded '
                              f'without its network (load_model(..., network=False)); '
                              f'load it with load_model(path) to run it.')
        # Replacing the model's Keras network empties this cache.
        cache = model.__dict__.setdefault('_runners', {})
        runner = cache.get(resolved)
        if runner is None:
            if resolved[1] == 'openvino':
                runner = _model_openvino_runner(model, resolved[0])
            elif resolved[0] == 'float32':
                runner = _tensorflow_runner(model.keras_model)
            else:
                runner = _mixed_bfloat16_runner(model.keras_model)
            cache[resolved] = runner
    return runner, resolved


_BUILD_LOCK = threading.Lock()


def _input_signature(keras_model):
    import tensorflow as tf

    # Any batch size, the model's own stamp and channel sizes: one trace.
    return [tf.TensorSpec((None,) + tuple(keras_model.input_shape[1:]), tf.float32)]


def _graph(keras_model):
    import tensorflow as tf

    @tf.function(input_signature=_input_signature(keras_model))
    def forward(batch):
        return keras_model(batch, training=False)

    return forward


def _tensorflow_runner(keras_model):
    """float32: the Keras model as one TensorFlow graph; under another Keras
    backend (JAX on an accelerator machine, which has no TensorFlow), that
    backend's compiled inference step."""
    import keras

    if keras.backend.backend() != 'tensorflow':
        return _keras_runner(keras_model)
    forward = _graph(keras_model)

    def run(batch):
        return np.asarray(forward(batch), dtype=np.float32)

    return run


def _keras_runner(keras_model):
    """The Keras model's own ``predict_on_batch``, in whatever backend runs it."""
    def run(batch):
        return np.asarray(keras_model.predict_on_batch(batch), dtype=np.float32)

    return run


def _mixed_bfloat16_clone(keras_model):
    """The network under the ``mixed_bfloat16`` policy (bfloat16 compute,
    float32 variables) with the same weights; the output layer, float32 in
    the original, stays float32."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if layer is not keras_model.layers[-1]:
            config['dtype'] = 'mixed_bfloat16'
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(keras_model, clone_function=clone)
    mixed.set_weights(keras_model.get_weights())
    return mixed


def _mixed_bfloat16_runner(keras_model):
    """bfloat16 without OpenVINO: TensorFlow's mixed precision in a graph."""
    return _tensorflow_runner(_mixed_bfloat16_clone(keras_model))


def _openvino_threads():
    """The thread limit of the network: TensorFlow's intra-op setting where
    TensorFlow runs and has one, else ``TF_NUM_INTRAOP_THREADS`` (which a
    batch worker sets before TensorFlow starts, if it does), else 0:
    OpenVINO's default, one thread per core."""
    if 'tensorflow' in sys.modules:
        threads = int(sys.modules['tensorflow'].config.threading
                      .get_intra_op_parallelism_threads())
        if threads:
            return threads
    try:
        return max(0, int(os.environ.get('TF_NUM_INTRAOP_THREADS', '')))
    except ValueError:
        return 0


#: Most stamps per OpenVINO inference request of one runner call.
_OPENVINO_CHUNK = 32


def _openvino_runner(keras_model, precision='bf16', network=None):
    """The Keras network converted to OpenVINO and compiled for the CPU at
    ``precision`` (``'bf16'`` or ``'f32'``, `_compiled_runner`).
    ``network``: an OpenVINO model to compile instead of the Keras model's
    conversion (the int8 one of ``benchmarks/bench_int8.py``).
    """
    openvino = _import_openvino()
    converted = openvino.convert_model(_graph(keras_model)) if network is None else network
    return _compiled_runner(converted, precision)


def _compiled_runner(network, precision):
    """An OpenVINO model compiled for the CPU at ``precision`` (``'bf16'`` or
    ``'f32'``).

    bfloat16 is compiled for throughput: OpenVINO splits the cores into
    streams (2 on 2 cores; one where a batch worker has one thread), and
    each call spreads its batch over them in chunks of at most
    `_OPENVINO_CHUNK` stamps. Each stamp's output does not depend on the
    chunk it is in (the same values as one request for the whole batch).
    On 2 cores of an Intel Xeon with AMX, ``deconvolve_stamps`` with one
    view ran 1.13-1.27 times faster this way in bfloat16 but 0.92 times as
    fast in float32, which therefore stays one latency-tuned stream, one
    request per call (:doc:`/precision`). Each thread keeps its requests
    between calls.
    """
    openvino = _import_openvino()
    hint = 'THROUGHPUT' if precision == 'bf16' else 'LATENCY'
    config = {'INFERENCE_PRECISION_HINT': precision, 'PERFORMANCE_HINT': hint}
    threads = _openvino_threads()
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    with _kept_sigaltstack():
        compiled = openvino.Core().compile_model(network, 'CPU', config)
    n_requests = 1 if hint == 'LATENCY' else max(
        1, int(compiled.get_property('OPTIMAL_NUMBER_OF_INFER_REQUESTS')))

    local = threading.local()

    def thread_requests():
        # A request is not safe to share between threads, and takes
        # milliseconds to make (its tensors): each thread keeps its own.
        requests = getattr(local, 'requests', None)
        if requests is None:
            requests = local.requests = [compiled.create_infer_request()
                                         for _ in range(n_requests)]
        return requests

    def run(batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        chunk = min(_OPENVINO_CHUNK, -(-len(batch) // n_requests))
        requests = thread_requests()
        if n_requests == 1 or len(batch) <= chunk:
            result = requests[0].infer({0: batch})
            return np.array(result[0], dtype=np.float32)
        # The chunks go round the requests, each started again once it has
        # returned its previous chunk. No Python callback runs in OpenVINO's
        # threads (an AsyncInferQueue's does: one still waiting for the GIL
        # when its compiled network was released hung the process, or aborted
        # it at exit, "terminate called without an active exception").
        pending, outputs = collections.deque(), []
        for k, start in enumerate(range(0, len(batch), chunk)):
            if len(pending) == n_requests:
                outputs.append(_finished_output(pending.popleft()))
            request = requests[k % n_requests]
            request.start_async({0: batch[start:start + chunk]})
            pending.append(request)
        outputs.extend(_finished_output(request) for request in pending)
        return np.concatenate(outputs)

    return run


class _SignalStack(ctypes.Structure):
    """``stack_t`` of ``sigaltstack(2)``."""

    _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int),
                ('ss_size', ctypes.c_size_t)]


@contextlib.contextmanager
def _kept_sigaltstack():
    """Give this thread back its alternate signal stack after the block.

    OpenVINO's CPU plugin gives the thread that compiles a network a new
    alternate signal stack, and unmaps it when the network is released,
    restoring the old one only where the releasing thread is the compiling
    one. A network released by another thread (the garbage collector runs
    in any) left the compiling thread's alternate stack unmapped, and its
    next signal (Ctrl-C: Python's handlers run on that stack) killed the
    process with SIGSEGV. Only the compiling thread's stack is restored;
    OpenVINO's own stack then goes unused until it is unmapped.
    """
    if not sys.platform.startswith('linux'):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    previous = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(previous)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(previous), None)


def _finished_output(request):
    """The output of an OpenVINO inference request once it has finished (a
    copy: the request's own memory is reused by its next start)."""
    request.wait()
    return np.array(request.get_output_tensor(0).data, dtype=np.float32)


def _logits_network(keras_model):
    """The network without its output layer's softplus (the same layer with a
    linear activation and the same weights), or None where the output layer
    has another activation.

    OpenVINO's softplus is an approximation (it flushes outputs below ~1e-9
    to zero and moves the fluxes of bright galaxies by up to 1e-3), while
    everything before it matches TensorFlow to 1e-6: in float32 the softplus
    is applied by NumPy (`_with_softplus`).
    """
    import keras

    last = keras_model.layers[-1]
    if getattr(last, 'activation', None) is not keras.activations.softplus:
        return None
    config = last.get_config()
    config.update(activation='linear', name=f'{last.name}_logits')
    logits_layer = last.__class__.from_config(config)
    logits = logits_layer(last.input)
    logits_layer.set_weights(last.get_weights())
    return keras.Model(keras_model.inputs, logits)


def _with_softplus(run_logits):
    def run(batch):
        # softplus(x) = log(1 + exp(x)), overflow-free.
        return np.logaddexp(np.float32(0), run_logits(batch), dtype=np.float32)

    return run


def _openvino_float32_runner(keras_model):
    """float32 by OpenVINO, with a softplus output layer's activation applied
    by NumPy (`_logits_network`)."""
    logits = _logits_network(keras_model)
    if logits is None:
        return _openvino_runner(keras_model, precision='f32')
    return _with_softplus(_openvino_runner(logits, precision='f32'))


def _model_openvino_runner(model, precision):
    """The OpenVINO runner of a `~psfdeconv.model.DeconvolutionModel` at
    ``precision`` (``'float32'`` or ``'bfloat16'``), its network read from
    the cache of conversions where it is there (`_openvino_network`)."""
    network, softplus = _openvino_network(model, logits=precision == 'float32')
    run = _compiled_runner(network, 'f32' if precision == 'float32' else 'bf16')
    return _with_softplus(run) if softplus else run


def network_cache_dir():
    """The directory of OpenVINO conversions of model files, or None.

    ``PSFDECONV_CACHE_DIR`` (`CACHE_DIR_VARIABLE`) where it is set (``off``
    or empty: no cache). Else, in the processes that psfdeconv starts itself
    (the command line, the worker processes of a batch:
    `use_default_network_cache`), ``networks`` in psfdeconv's directory of
    astropy's cache location (``~/.cache/psfdeconv/networks`` on Linux, or
    under ``XDG_CACHE_HOME``); in a Python session of the user's, none
    unless the variable names one. Each entry is a few MB; the directory can
    be removed at any time.

    Returns
    -------
    `~pathlib.Path` or None
        None where the cache is off.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> from psfdeconv.inference import network_cache_dir
    >>> with mock.patch.dict(os.environ, {'PSFDECONV_CACHE_DIR': '/scratch/networks'}):
    ...     print(network_cache_dir())
    /scratch/networks
    >>> with mock.patch.dict(os.environ, {'PSFDECONV_CACHE_DIR': 'off'}):
    ...     print(network_cache_dir())
    None
    """
    value = os.environ.get(CACHE_DIR_VARIABLE)
    if value is not None:
        value = value.strip()
        return None if value.lower() in ('', 'off') else Path(value).expanduser()
    if not _DEFAULT_CACHE:
        return None
    from astropy.config import get_cache_dir_path

    try:
        return get_cache_dir_path('psfdeconv', ensure_exists=False) / 'networks'
    except OSError:  # no home directory to put it in
        return None


#: Whether `network_cache_dir` defaults to psfdeconv's cache location in this
#: process (`use_default_network_cache`).
_DEFAULT_CACHE = []


def use_default_network_cache():
    """Use psfdeconv's cache location for converted networks in this process
    where ``PSFDECONV_CACHE_DIR`` is not set (`network_cache_dir`).

    Called by the command line and by the worker processes of a batch, which
    load the network once each; a long Python session of the user's keeps its
    runners in memory and leaves the cache to ``PSFDECONV_CACHE_DIR``.
    """
    if not _DEFAULT_CACHE:
        _DEFAULT_CACHE.append(True)


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cache_key(model, logits):
    """What decides a conversion: the file's weights and Keras configuration,
    the variant, and the versions of the software that converts it."""
    from . import __version__

    card = model.card
    return {'layout': _CACHE_LAYOUT, 'weights_sha256': card.get('weights_sha256'),
            'config_sha256': card.get('config_sha256'), 'logits': bool(logits),
            'openvino': _import_openvino().__version__, 'keras': _version('keras'),
            'psfdeconv': __version__}


def _cache_entry(model, logits):
    """The cache directory of a model's conversion, or None: no cache, or a
    model without a file and both checksums (built in memory)."""
    root = network_cache_dir()
    key = _cache_key(model, logits)
    if root is None or model.path is None or not (key['weights_sha256'] and
                                                  key['config_sha256']):
        return None, key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return root / digest[:32], key


def _file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_cached_network(entry, key, model):
    """The cached OpenVINO model of ``entry`` and whether NumPy applies the
    softplus, or None where it is missing or fails a check (its files'
    digests, its key, its shapes against the model card)."""
    manifest_path = entry / 'manifest.json'
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest['key'] != key or any(
                _file_digest(entry / name) != digest
                for name, digest in manifest['sha256'].items()):
            raise ValueError('its files or key differ from its manifest')
        network = _import_openvino().Core().read_model(entry / 'network.xml')
        model.check_network_shapes(_shape(network.inputs[0]), _shape(network.outputs[0]))
        return network, bool(manifest['softplus'])
    except Exception as exc:  # any damage: convert again
        log.warning('the cached network %s of %s is damaged (%s); converting the '
                    'network again.', entry, model.path, exc)
        return None


def _shape(port):
    return tuple(None if dim.is_dynamic else dim.get_length()
                 for dim in port.get_partial_shape())


def _write_cached_network(entry, key, network, softplus, *, replace=False):
    """Save a conversion as ``entry`` atomically: written in a temporary
    directory beside it, which is then renamed. ``replace``: the entry there
    is damaged and is replaced; else an entry another process wrote
    meanwhile is kept. A cache that cannot be written is skipped."""
    openvino = _import_openvino()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{entry.name}.', dir=entry.parent))
    except OSError as exc:
        log.info('not caching the converted network in %s: %s', entry.parent, exc)
        return
    try:
        openvino.save_model(network, staging / 'network.xml', compress_to_fp16=False)
        manifest = {'key': key, 'softplus': bool(softplus),
                    'sha256': {name: _file_digest(staging / name)
                               for name in ('network.xml', 'network.bin')}}
        (staging / 'manifest.json').write_text(json.dumps(manifest, indent=1))
        if replace and entry.exists():
            # Moved aside, then removed: the rename below needs the name free.
            aside = Path(tempfile.mkdtemp(prefix=f'.{entry.name}.old.', dir=entry.parent))
            os.replace(entry, aside / 'entry')
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(staging, entry)
    except OSError as exc:  # another process's entry came first, or a full disk
        log.info('not caching the converted network as %s: %s', entry, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _openvino_network(model, logits):
    """A model's network as an OpenVINO model, and whether NumPy applies its
    output's softplus (``logits``: float32, `_logits_network`): from the
    cache (`network_cache_dir`) where it is there, else converted from the
    Keras network (which loads it) and cached."""
    entry, key = _cache_entry(model, logits)
    if entry is not None:
        cached = _read_cached_network(entry, key, model)
        if cached is not None:
            return cached
        damaged = entry.exists()
    keras_model = model.keras_model
    softplus = False
    if logits:
        without_softplus = _logits_network(keras_model)
        softplus = without_softplus is not None
        keras_model = without_softplus if softplus else keras_model
    network = _import_openvino().convert_model(_graph(keras_model))
    if entry is not None:
        _write_cached_network(entry, key, network, softplus, replace=damaged)
        # What later processes will compile, so that this one runs the same (and
        # the conversion, which holds TensorFlow's graph, is let go).
        cached = _read_cached_network(entry, key, model)
        if cached is not None:
            return cached
    return network, softplus
