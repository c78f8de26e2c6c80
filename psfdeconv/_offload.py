# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Call a psfdeconv function in a helper Python process while this process works
on (`HelperCall`): on a machine with a CPU to spare, one stage's image-wide
work (the PSFs of the bands) beside another's (background, alignment,
segments).

The helper is a fresh interpreter (``python -m psfdeconv._offload``), not a
`multiprocessing` child: spawning one imports the caller's ``__main__`` again
(running an unguarded script's top level a second time), and forking copies a
process whose TensorFlow and OpenVINO threads the copy cannot use safely. The
call and its outcome travel as pickles through the helper's standard input
and output. The helper's warnings are warned again here, its log records
logged again here and its exception raised here (with the helper's traceback
as a note). Where no outcome comes back (the helper could not start, import,
unpickle or pickle, or died), the function is called in this process, so the
result never depends on the helper. A `Helper` is started before its call is
ready, and imports the modules it will need meanwhile.
"""
import importlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

__all__ = []

log = logging.getLogger(__name__)


class HelperCall:
    """``function(*args, **kwargs)`` started in a helper process; `result`
    waits for it.

    ``function`` must be importable by its module and qualified name, and the
    arguments picklable (else it runs in this process when `result` is called).

    Examples
    --------
    >>> from psfdeconv._offload import HelperCall
    >>> call = HelperCall(pow, 2, 10)
    >>> call.result()
    1024
    """

    def __init__(self, function, *args, **kwargs):
        self._start(None, function, args, kwargs)

    def _start(self, helper, function, args, kwargs):
        """Send the call to ``helper`` (a `Helper`), or to a helper started
        now where it is None."""
        self._function, self._args, self._kwargs = function, args, kwargs
        self._reply = None
        self._failure = None
        self._thread = None
        self._process = None
        self._cancelled = False
        if helper is not None and helper.failure is not None:
            self._failure = helper.failure
            return
        if helper is None and _no_interpreter():
            self._failure = _no_interpreter()
            return
        try:
            payload = pickle.dumps((function.__module__, function.__qualname__, args, kwargs),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - any pickling failure
            self._failure = f'the arguments cannot be pickled ({error})'
            if helper is not None:
                helper._stop()
            return
        self._thread = threading.Thread(target=self._run, args=(payload, helper), daemon=True,
                                        name='psfdeconv-helper')
        self._thread.start()

    def _run(self, payload, helper):
        try:
            self._process = _start_helper(()) if helper is None else helper.process
            if self._cancelled:
                self._process.kill()
            stdout, stderr = self._process.communicate(payload)
        except Exception as error:  # noqa: BLE001 - no interpreter, no pipe, killed
            self._failure = f'it could not run ({error})'
            return
        if self._process.returncode != 0 or not stdout:
            stderr = stderr.decode(errors='replace').strip()[-2000:]
            self._failure = f'it exited with status {self._process.returncode}: {stderr}'
            return
        try:
            self._reply = pickle.loads(stdout)
        except Exception as error:  # noqa: BLE001 - any unpickling failure
            self._failure = f'its reply cannot be unpickled ({error})'

    def cancel(self):
        """Stop the helper if it is still running (after an error here, so
        that it does not work on for nothing); nothing once it has ended."""
        self._cancelled = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    def result(self):
        """The function's return value (its exception raised, its warnings
        warned and its log records logged here)."""
        if self._thread is not None:
            try:
                self._thread.join()
            except BaseException:  # e.g. KeyboardInterrupt while waiting
                self.cancel()
                raise
        if self._cancelled:
            raise RuntimeError(f'the helper process for {self._function.__qualname__} '
                               f'was cancelled')
        if self._reply is None:
            log.debug('helper process for %s failed (%s); calling it in this process',
                      self._function.__qualname__, self._failure)
            return self._function(*self._args, **self._kwargs)
        status, value, caught, records = self._reply
        for record in records:
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        registry = {}
        for message, category, filename, lineno in caught:
            warnings.warn_explicit(message, category, filename, lineno, registry=registry)
        if status == 'error':
            raise value
        return value


class Helper:
    """A helper process started ahead of its one call: it imports ``modules``
    while this process prepares the call's arguments, then waits for `call`.
    `close` stops it where no call comes.

    Examples
    --------
    >>> from psfdeconv._offload import Helper
    >>> helper = Helper(['fractions'])
    >>> helper.call(pow, 3, 4).result()
    81
    """

    def __init__(self, modules=()):
        self.process = None
        self.failure = None
        self._used = False
        self.failure = _no_interpreter()
        if self.failure:
            return
        try:
            self.process = _start_helper(modules)
        except Exception as error:  # noqa: BLE001 - no interpreter, no pipe
            self.failure = f'it could not run ({error})'

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def call(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` in this helper: a `HelperCall`."""
        if self._used:
            raise RuntimeError('a helper process takes one call')
        self._used = True
        call = HelperCall.__new__(HelperCall)
        call._start(self, function, args, kwargs)
        return call

    def close(self):
        """Stop the helper if it has not been given a call."""
        if not self._used:
            self._used = True
            self._stop()

    def _stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.communicate()


def _no_interpreter():
    """Why no helper can be started here, or None."""
    if getattr(sys, 'frozen', False) or not sys.executable:
        # A frozen application's executable is the application itself.
        return 'there is no Python interpreter to start'
    return None


def _start_helper(modules):
    """The helper's process (``python -m psfdeconv._offload MODULE...``)."""
    env = dict(os.environ)
    # The helper imports what this process imports (this copy of
    # psfdeconv first), also modules found through a changed sys.path.
    root = str(Path(__file__).resolve().parent.parent)
    env['PYTHONPATH'] = os.pathsep.join([root] + [path for path in sys.path if path])
    return subprocess.Popen([sys.executable, '-m', 'psfdeconv._offload', *modules],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


class _Records(logging.Handler):
    """Keeps the helper's log records, made picklable."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


def _serve():
    """The helper: read one call from standard input, write its outcome to
    standard output."""
    reply_stream = sys.stdout.buffer
    # Nothing the function prints may corrupt the reply.
    sys.stdout = sys.stderr
    # Imported while the caller prepares the call (`Helper`).
    for name in sys.argv[1:]:
        importlib.import_module(name)
    try:
        module, qualname, args, kwargs = pickle.load(sys.stdin.buffer)
    except EOFError:
        return  # closed without a call
    function = importlib.import_module(module)
    for name in qualname.split('.'):
        function = getattr(function, name)
    handler = _Records()
    package_log = logging.getLogger('psfdeconv')
    package_log.addHandler(handler)
    package_log.setLevel(logging.DEBUG)
    package_log.propagate = False
    with warnings.catch_warnings(record=True) as caught:
        # Every warning goes back; the caller's filters decide there.
        warnings.simplefilter('always')
        try:
            value, status = function(*args, **kwargs), 'ok'
        except Exception as error:  # noqa: BLE001 - raised again by the caller
            error.add_note('In the helper process:\n' + ''.join(
                traceback.format_exception(error)).rstrip())
            value, status = error, 'error'
    reply = pickle.dumps((status, value,
                          [(w.message, w.category, w.filename, w.lineno) for w in caught],
                          handler.records), protocol=pickle.HIGHEST_PROTOCOL)
    reply_stream.write(reply)
    reply_stream.flush()


if __name__ == '__main__':
    _serve()
