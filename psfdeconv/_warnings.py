"""`warnings.catch_warnings`, one thread at a time.

The warning filters are process-wide, so two threads that change them
inside ``catch_warnings`` at the same time (dask's threaded scheduler runs
exposure groups in threads) restore each other's filters and record each
other's warnings: a warning one thread silences can reach the other one's
record and be emitted there. Every such block in psfdeconv holds this lock.
"""
import contextlib
import threading
import warnings

_LOCK = threading.RLock()


@contextlib.contextmanager
def catch_warnings(**kwargs):
    """`warnings.catch_warnings` (same arguments) under a process-wide lock."""
    with _LOCK, warnings.catch_warnings(**kwargs) as caught:
        yield caught
