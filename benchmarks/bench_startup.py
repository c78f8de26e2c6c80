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
  network's conversion and compilation) and its first call on 32 stamps;
* with OpenVINO, ``load_model(..., network='lazy')`` and the first runner where
  the conversion is cached (`psfdeconv.inference.network_cache_dir`, here a
  temporary directory filled once before the rounds): what a new ``psfdeconv
  run`` or batch worker pays when any earlier process converted the model.

The measurements without the cache run with ``PSFDECONV_CACHE_DIR=off``.

Usage (about a minute)::

    python benchmarks/bench_startup.py [--repeat 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import cpu_name  # noqa: E402

from psfdeconv.inference import openvino_available  # noqa: E402

CHILD = r'''
import json, os, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
times = {}
start = time.perf_counter()
import numpy as np
import psfdeconv
from psfdeconv.model import load_model
times['import psfdeconv'] = time.perf_counter() - start


def first_call(runner, name):
    cubes = np.random.default_rng(0).random((32, 64, 64, 9), dtype=np.float32)
    start = time.perf_counter()
    runner(cubes)
    times[name] = time.perf_counter() - start


if sys.argv[1] == 'checks':
    start = time.perf_counter()
    load_model(network=False)
    times['load_model, checks only (network=False)'] = time.perf_counter() - start
    times['TensorFlow imported'] = 'tensorflow' in sys.modules
elif sys.argv[1] == 'cached':
    from psfdeconv.inference import get_runner
    start = time.perf_counter()
    runner, resolved = get_runner(load_model(network='lazy'), 'auto')
    times["load_model(network='lazy') + cached runner"] = time.perf_counter() - start
    first_call(runner, 'first call of the cached runner, 32 stamps')
    times['TensorFlow imported with the cache'] = 'tensorflow' in sys.modules
else:
    from psfdeconv.inference import get_runner
    start = time.perf_counter()
    model = load_model()
    times['load_model (TensorFlow, Keras)'] = time.perf_counter() - start
    start = time.perf_counter()
    runner, resolved = get_runner(model, 'auto')
    times['first runner (precision auto)'] = time.perf_counter() - start
    first_call(runner, 'first call, 32 stamps')
    times['runtime'] = ' '.join(resolved)
print(json.dumps(times))
'''


def child(kind, cache='off'):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PSFDECONV_CACHE_DIR=cache)
    env.setdefault('KERAS_BACKEND', 'tensorflow')
    out = subprocess.run([sys.executable, '-c', CHILD, kind], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    best = {}
    with tempfile.TemporaryDirectory(prefix='bench-startup-') as cache:
        kinds = ['network', 'checks']
        if openvino_available():
            child('network', cache)  # fills the cache
            kinds.append('cached')
        for _ in range(args.repeat):
            for kind in kinds:
                for name, value in child(kind, cache if kind == 'cached' else 'off').items():
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
