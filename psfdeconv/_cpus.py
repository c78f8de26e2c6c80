# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The CPUs this process may run on."""

import os

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
