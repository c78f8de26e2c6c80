# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The CPUs this process may run on, and work spread over them in threads."""

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = []


def usable_cpus():
    """The number of CPUs this process may use: its CPU affinity where the
    system has one (a batch job's allocation, ``taskset``), else every CPU.

    ``os.cpu_count()`` counts the machine's CPUs, also those a scheduler
    (SLURM, a container's cpuset) does not give this process: defaults sized
    by it start more workers and threads than the process can run at once.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def cpu_share():
    """The CPUs this process's work may keep busy: ``OMP_NUM_THREADS`` where
    it is set to a positive integer (a batch worker's share of the CPUs),
    else `usable_cpus`."""
    try:
        share = int(os.environ.get('OMP_NUM_THREADS', ''))
    except ValueError:
        share = 0
    return share if share >= 1 else usable_cpus()


def thread_count(n_items, min_per_thread):
    """Threads for ``n_items`` independent pieces of work: one per CPU of
    this process's share (`cpu_share`), each with at least ``min_per_thread``
    items (one thread below that)."""
    return min(cpu_share(), max(1, n_items // min_per_thread))


def run_in_threads(function, n_items, threads):
    """Call ``function(share)`` on contiguous slices of ``range(n_items)``, one
    per thread (in this thread when ``threads`` is 1), and re-raise the first
    error. For work that releases the GIL (numpy, scipy.ndimage): each item
    is computed as in one call, so the results do not depend on ``threads``."""
    bounds = [n_items * k // threads for k in range(threads + 1)]
    shares = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    if threads == 1:
        function(shares[0])
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(function, share) for share in shares]:
            done.result()


def overlapped(items, prepare, compute, finish, *, overlap=True):
    """``[finish(p, compute(p)) for p in map(prepare, items)]``, each
    ``compute`` in a worker thread while this thread finishes the item
    before it and prepares the one after.

    For a ``compute`` that releases the GIL (a network's forward pass)
    between ``prepare`` and ``finish`` steps that leave CPUs idle (numpy
    and scipy work, partly single-threaded): the two then share the CPUs
    instead of taking turns. Each item goes through the same three calls
    either way, so the results do not depend on ``overlap`` (False: all in
    this thread).
    """
    if not overlap or len(items) < 2:
        results = []
        for item in items:
            prepared = prepare(item)
            results.append(finish(prepared, compute(prepared)))
        return results
    results = []
    pool = ThreadPoolExecutor(1, thread_name_prefix='psfdeconv-compute')
    try:
        pending = None
        for item in items:
            prepared = prepare(item)
            # Queued behind the previous item's compute, which this thread
            # finishes meanwhile.
            future = pool.submit(compute, prepared)
            if pending is not None:
                results.append(finish(pending[0], pending[1].result()))
            pending = (prepared, future)
        results.append(finish(pending[0], pending[1].result()))
    finally:
        # On an error or an interrupt, the queued compute does not start;
        # the running one (a single step) is waited for.
        pool.shutdown(cancel_futures=True)
    return results
