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
float32 elsewhere; float32 is the default of every function and command.
`resolve_precision` says what a setting gives on this machine, as
``(precision, runtime)``. Calibrations
are fitted in float32: :doc:`/precision` gives the effect of bfloat16 on
fluxes and shapes.

The runners are built on first use and kept on the model (one per
precision and runtime); each takes float32 cubes of any batch size and
returns float32 arrays.
"""

import collections
import contextlib
import ctypes
import sys
import threading

import numpy as np

from .exceptions import ConfigError

__all__ = ['PRECISIONS', 'RUNTIMES', 'cpu_has_bfloat16', 'openvino_available',
           'available_runtimes', 'resolve_precision', 'get_runner']

#: Values of the ``precision`` options.
PRECISIONS = ('auto', 'float32', 'bfloat16')
#: Runtimes a runner can use.
RUNTIMES = ('tensorflow', 'openvino')
#: /proc/cpuinfo flags of x86 CPUs with bfloat16 dot products.
_BF16_FLAGS = frozenset({'avx512_bf16', 'amx_bf16'})


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
        cache = model.__dict__.setdefault('_runners', {})
        keras_model = model.keras_model
        if keras_model is None:
            raise ConfigError(f'the model {getattr(model, "path", None) or ""} was loaded '
                              f'without its network (load_model(..., network=False)); '
                              f'load it with load_model(path) to run it.')
        cached = cache.get(resolved)
        # Rebuilt if the Keras model was replaced on the same object.
        if cached is None or cached[0] is not keras_model:
            build = {('float32', 'tensorflow'): _tensorflow_runner,
                     ('bfloat16', 'tensorflow'): _mixed_bfloat16_runner,
                     ('float32', 'openvino'): _openvino_float32_runner,
                     ('bfloat16', 'openvino'): _openvino_runner}[resolved]
            cached = (keras_model, build(keras_model))
            cache[resolved] = cached
    return cached[1], resolved


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
    """TensorFlow's intra-op thread limit (set by a batch's ``threads``), or 0:
    OpenVINO's default, one thread per core."""
    import tensorflow as tf

    return int(tf.config.threading.get_intra_op_parallelism_threads())


#: Most stamps per OpenVINO inference request of one runner call.
_OPENVINO_CHUNK = 32


def _openvino_runner(keras_model, precision='bf16', network=None):
    """The network converted to OpenVINO and compiled for the CPU at
    ``precision`` (``'bf16'`` or ``'f32'``).

    bfloat16 is compiled for throughput: OpenVINO splits the cores into
    streams (2 on 2 cores; one where a batch worker has one thread), and
    each call spreads its batch over them in chunks of at most
    `_OPENVINO_CHUNK` stamps. Each stamp's output does not depend on the
    chunk it is in (the same values as one request for the whole batch).
    On 2 cores of an Intel Xeon with AMX, ``deconvolve_stamps`` with one
    view ran 1.13-1.27 times faster this way in bfloat16 but 0.92 times as
    fast in float32, which therefore stays one latency-tuned stream, one
    request per call (:doc:`/precision`). ``network``: an OpenVINO model to
    compile instead of the Keras model's conversion (the int8 one of
    ``benchmarks/bench_int8.py``).
    """
    openvino = _import_openvino()
    converted = openvino.convert_model(_graph(keras_model)) if network is None else network
    hint = 'THROUGHPUT' if precision == 'bf16' else 'LATENCY'
    config = {'INFERENCE_PRECISION_HINT': precision, 'PERFORMANCE_HINT': hint}
    threads = _openvino_threads()
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    with _kept_sigaltstack():
        compiled = openvino.Core().compile_model(converted, 'CPU', config)
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


def _openvino_float32_runner(keras_model):
    """float32 by OpenVINO, with a softplus output layer's activation applied
    by NumPy: OpenVINO's softplus is an approximation (it flushes outputs
    below ~1e-9 to zero and moves the fluxes of bright galaxies by up to
    1e-3), while everything before it matches TensorFlow to 1e-6."""
    import keras

    last = keras_model.layers[-1]
    if getattr(last, 'activation', None) is not keras.activations.softplus:
        return _openvino_runner(keras_model, precision='f32')
    config = last.get_config()
    config.update(activation='linear', name=f'{last.name}_logits')
    logits_layer = last.__class__.from_config(config)
    logits = logits_layer(last.input)
    logits_layer.set_weights(last.get_weights())
    run_logits = _openvino_runner(keras.Model(keras_model.inputs, logits), precision='f32')

    def run(batch):
        # softplus(x) = log(1 + exp(x)), overflow-free.
        return np.logaddexp(np.float32(0), run_logits(batch), dtype=np.float32)

    return run
