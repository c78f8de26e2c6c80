#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
What a new process pays before its first stamp: each ``psfdeconv run``, and each
worker process of ``psfdeconv batch``.

Each measurement runs in a fresh Python process pinned to one CPU (as a batch
worker on a machine of as many CPUs as workers), alternated over ``--repeat``
rounds, and prints the best time of each stage:

* ``import psfdeconv``;
* ``load_model`` of the shipped 3-band model: the file's and card's checks and
  Keras (which starts TensorFlow), and with ``network=False``, the checks alone
  (what a batch's own process does when its groups run in worker processes);
* the first runner at ``precision='auto'`` (OpenVINO where installed: the
  network's conversion and compilation) and its first call on 32 stamps.

Usage (about a minute)::

    python benchmarks/bench_startup.py [--repeat 3]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import cpu_name  # noqa: E402

CHILD = r'''
import json, os, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
times = {}
start = time.perf_counter()
import numpy as np
import psfdeconv
from psfdeconv.model import load_model
times['import psfdeconv'] = time.perf_counter() - start
if sys.argv[1] == 'checks':
    start = time.perf_counter()
    load_model(network=False)
    times['load_model, checks only (network=False)'] = time.perf_counter() - start
    times['TensorFlow imported'] = 'tensorflow' in sys.modules
else:
    from psfdeconv.inference import get_runner
    start = time.perf_counter()
    model = load_model()
    times['load_model (TensorFlow, Keras)'] = time.perf_counter() - start
    start = time.perf_counter()
    runner, resolved = get_runner(model, 'auto')
    times['first runner (precision auto)'] = time.perf_counter() - start
    cubes = np.random.default_rng(0).random((32, 64, 64, 9), dtype=np.float32)
    start = time.perf_counter()
    runner(cubes)
    times['first call, 32 stamps'] = time.perf_counter() - start
    times['runtime'] = ' '.join(resolved)
print(json.dumps(times))
'''


def child(kind):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    env.setdefault('KERAS_BACKEND', 'tensorflow')
    out = subprocess.run([sys.executable, '-c', CHILD, kind], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    best = {}
    for _ in range(args.repeat):
        for kind in ('network', 'checks'):
            for name, value in child(kind).items():
                if isinstance(value, float):
                    best[name] = min(best.get(name, value), value)
                else:
                    best[name] = value
    print(f'{cpu_name()}, one CPU per process, best of {args.repeat}')
    for name, value in best.items():
        print(f'  {name:44s} {value:8.2f} s' if isinstance(value, float)
              else f'  {name:44s} {value}')


if __name__ == '__main__':
    main()
