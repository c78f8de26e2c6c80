#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exposure-level throughput of ``psfdeconv run`` and ``psfdeconv batch``, in one run.

Prints, all measured in the same run on the same machine:

* **run vs deconvolve_stamps**: sources/s of ``run_exposure_set`` on a simulated
  g, r, i field (detected galaxies, ePSFs from the stars, one network call per
  stamp) against ``deconvolve_stamps`` on the same stamps and PSFs, timed
  separately in the same process; their ratio (the target is >= 0.5), and the
  run's stage timings (the pipeline's DEBUG log: PSFs; detection, background and
  alignment; deconvolution and measurement);
* **memory**: the peak resident set (``VmHWM``) of ``run_exposure_set`` on the
  field with 1x and 4x its galaxies as the sources (a catalogue; each in a fresh
  process), flat in the number of sources being the target;
* **batch workers**: the wall time of ``run_batch`` on 4 small groups with one
  worker process on one CPU (pinned by CPU affinity), one worker process with
  every CPU, and 2 worker processes (model loading included), and the speed-ups
  of 2 workers over each single worker (target >= 1.8 on 2 cores over the
  one-CPU worker).

Usage (about 12 minutes on 2 cores with the defaults; ``--quick``, a 1024-pixel
field of 300 galaxies, about 3 minutes)::

    python benchmarks/bench_exposure.py [--field DIR] [--quick] [--skip-memory]
        [--skip-batch]

``--psf-process-pairs N`` only times ``run_exposure_set`` with the ePSFs built in its
own process and in a helper process (``psf_process``), alternated, N times each.

``--reproject-pairs N`` only times ``reproject_region`` of the r band's data, mask and
ones planes onto the g band's grid (on the simulated field they differ by a shift), with
the shift's weights and with ``reproject_adaptive`` pixel by pixel, alternated, N times
each.

``--field DIR`` reuses a field written by ``psfdeconv simulate-exposure`` (e.g.
``--size 3072 --n-galaxies 1600 --n-stars 150 --seed 7``) instead of simulating one.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

sys.path.insert(0, str(Path(__file__).parent))
from bench_batch import _peak_rss_kb, make_field, source_table, warm_up  # noqa: E402

BANDS = ('g', 'r', 'i')
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'


class _StageLog(logging.Handler):
    """Keeps the pipeline's DEBUG messages (its stage timings)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_vs_deconvolve(field, model, work, psf_process='auto', symmetries=1):
    """Sources/s of run_exposure_set on the field (``psf_process`` and
    ``symmetries`` as for it; None: the card's views) and of deconvolve_stamps
    on the same stamps and PSFs with the same views; the stage log."""
    import numpy as np

    from psfdeconv.cutouts import make_cutouts
    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.io import read_exposure
    from psfdeconv.pipeline import run_exposure_set
    from psfdeconv.psf import read_psf_image, render_psf

    exposures = {band: field / f'{band}.fits' for band in BANDS}
    warm_up(model)
    stages = _StageLog()
    logger = logging.getLogger('psfdeconv.pipeline')
    logger.addHandler(stages)
    logger.setLevel(logging.DEBUG)
    try:
        start = time.perf_counter()
        catalog, paths = run_exposure_set(exposures, work / 'run', psfs='epsf',
                                          model=model, symmetries=symmetries,
                                          overwrite=True, psf_process=psf_process)
        seconds_run = time.perf_counter() - start
    finally:
        logger.removeHandler(stages)
    n = len(catalog)
    xy = np.column_stack([catalog['x_input'].value, catalog['y_input'].value])
    stamps = np.stack([make_cutouts(read_exposure(exposures[band]), xy,
                                    size=model.stamp_size)['data'] for band in BANDS], axis=1)
    psfs = np.stack([render_psf(read_psf_image(paths[band]), size=catalog.meta['psf_size'])
                     for band in BANDS])
    psfs = np.broadcast_to(psfs, (n,) + psfs.shape)
    start = time.perf_counter()
    deconvolve_stamps(stamps, psfs, pixel_scale=catalog.meta['pixel_scale'], model=model,
                      symmetries=symmetries)
    seconds_deconvolve = time.perf_counter() - start
    return {'n': n, 'run_seconds': seconds_run, 'run_rate': n / seconds_run,
            'deconvolve_seconds': seconds_deconvolve,
            'deconvolve_rate': n / seconds_deconvolve,
            'ratio': seconds_deconvolve / seconds_run, 'stages': stages.lines}


def alternate_psf_process(field, model, work, pairs):
    """Seconds of run_exposure_set on the field with the ePSFs built in the
    run's process (``psf_process=False``) and in a helper (True), the two
    alternated (False, True, True, False, ...) so that a drifting machine
    affects both alike."""
    from psfdeconv.pipeline import run_exposure_set

    exposures = {band: field / f'{band}.fits' for band in BANDS}
    warm_up(model)
    seconds = {False: [], True: []}
    for k in range(pairs):
        for setting in (False, True) if k % 2 == 0 else (True, False):
            start = time.perf_counter()
            run_exposure_set(exposures, work / f'alternate_{setting}', psfs='epsf',
                             model=model, symmetries=1, overwrite=True,
                             psf_process=setting)
            seconds[setting].append(time.perf_counter() - start)
    return seconds


def alternate_reprojection(field, pairs):
    """Seconds of reproject_region of the r band's three planes onto the g band's
    grid: with the weights of the grids' shift and with reproject_adaptive (both
    CPUs), alternated; the largest difference of the two."""
    import numpy as np

    from psfdeconv.cutouts import _adaptive_region, _pixel_shift, reproject_region
    from psfdeconv.io import read_exposure

    reference, band = (read_exposure(field / f'{name}.fits') for name in ('g', 'r'))
    shape = reference.shape
    if _pixel_shift(band.wcs, reference.wcs, (0, 0), shape) is None:
        raise SystemExit('the g and r grids of this field differ by more than a shift')
    planes = np.stack([np.asarray(band.data, dtype=float), np.zeros(band.shape),
                       np.ones(band.shape)])
    ways = {'shift': lambda: reproject_region(planes, band.wcs, reference.wcs, (0, 0),
                                              shape, conserve_flux=True, kernel='hann'),
            'adaptive': lambda: _adaptive_region(planes, band.wcs, reference.wcs, (0, 0),
                                                 shape, conserve_flux=True, kernel='hann',
                                                 threads=os.cpu_count())}
    ways['shift']()  # the first call pays for the pages of its output
    seconds, results = {'shift': [], 'adaptive': []}, {}
    for k in range(pairs):
        for name in ('shift', 'adaptive') if k % 2 == 0 else ('adaptive', 'shift'):
            start = time.perf_counter()
            results[name] = ways[name]()
            seconds[name].append(time.perf_counter() - start)
    difference = float(np.nanmax(np.abs(results['shift'] - results['adaptive'])))
    return seconds, difference, float(np.nanmax(np.abs(results['adaptive'][0])))


def rss_child(field, n, model_path):
    """In a fresh process: run_exposure_set on n catalogue sources; print its
    peak RSS."""
    from astropy.table import QTable

    from psfdeconv.model import load_model
    from psfdeconv.pipeline import run_exposure_set

    galaxies = QTable.read(field / 'truth.ecsv')
    galaxies = galaxies[galaxies['kind'] == 'galaxy']
    model = load_model(model_path) if model_path else None
    with tempfile.TemporaryDirectory() as work:
        source_table(galaxies, n, seed=3).write(Path(work) / 'sources.ecsv')
        start = time.perf_counter()
        run_exposure_set({band: field / f'{band}.fits' for band in BANDS}, work,
                         Path(work) / 'sources.ecsv', MOFFAT, model=model, symmetries=1)
        seconds = time.perf_counter() - start
    print(json.dumps({'n': n, 'max_rss_kb': _peak_rss_kb(), 'seconds': seconds}))


def peak_rss(field, sizes, model_path):
    results = []
    for n in sizes:
        command = [sys.executable, __file__, '--rss-child', str(n), '--field', str(field)]
        if model_path:
            command += ['--model', str(model_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f'memory run with {n} sources failed ({done.returncode})')
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def batch_workers(root, model_path, *, n_groups=4, size=512, n_galaxies=40, n_stars=25,
                  rounds=1):
    """Wall time of run_batch on n_groups small fields with worker processes
    (each starts TensorFlow and loads the model; more than 4 groups reuse the
    4 fields in turn): ``times['1 cpu']``, one
    worker on one CPU (the process pinned with CPU affinity, which the worker
    inherits); ``times[1]``, one worker with every CPU (its TensorFlow,
    FFT and reprojection threads); ``times[2]``, two workers. With several
    ``rounds`` (the three alternated), each is a list of the rounds' times;
    ``groups[name]``, the groups' own seconds (summary column ``seconds``)
    of each round, every worker's first group (which loads the model) apart."""
    from psfdeconv._cpus import usable_cpus
    from psfdeconv.batch import run_batch

    lines = ['id,g,r,i']
    # At most 4 fields (a simulation each, minutes), which more groups reuse in
    # turn; fields already in root (an earlier run's, --batch-dir) are kept.
    for k in range(min(n_groups, 4)):
        if not (root / f'f{k}' / 'i.fits').exists():
            make_field(root / f'f{k}', size=size, n_galaxies=n_galaxies, n_stars=n_stars,
                       seed=200 + k)
    for k in range(n_groups):
        field = f'f{k % 4}'
        lines.append(f'g{k},{field}/g.fits,{field}/r.fits,{field}/i.fits')
    (root / 'groups.csv').write_text('\n'.join(lines) + '\n')
    allowed = os.sched_getaffinity(0)
    times, groups = {}, {}
    for _ in range(rounds):
        for name, workers, cpus in (('1 cpu', 1, {min(allowed)}), (1, 1, allowed),
                                    (2, 2, allowed)):
            os.sched_setaffinity(0, cpus)
            try:
                assert usable_cpus() == len(cpus)
                start = time.perf_counter()
                summary = run_batch(root / 'groups.csv',
                                    root / f'out_{workers}_{len(cpus)}',
                                    model=model_path, scheduler='processes',
                                    workers=workers, symmetries=1, overwrite=True)
                times.setdefault(name, []).append(time.perf_counter() - start)
            finally:
                os.sched_setaffinity(0, allowed)
            # Groups finish in time order per worker; its first one loaded the model.
            finished = [str(value) for value in summary['finished']]
            seconds = getattr(summary['seconds'], 'value', summary['seconds'])
            seen, first, rest = set(), [], []
            for row in sorted(range(len(summary)), key=finished.__getitem__):
                worker = str(summary['worker'][row])
                (rest if worker in seen else first).append(float(seconds[row]))
                seen.add(worker)
            groups.setdefault(name, []).append({'first': first, 'rest': rest})
    if rounds == 1:
        times = {name: values[0] for name, values in times.items()}
    return times, int(summary['n_sources'].sum()), groups


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--field', type=Path, help='an existing g, r, i field directory')
    parser.add_argument('--quick', action='store_true', help='a small field')
    parser.add_argument('--model', help='model .keras file (default: shipped)')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--skip-batch', action='store_true')
    parser.add_argument('--psf-process-pairs', type=int, metavar='N',
                        help='only time run_exposure_set with the ePSFs in its own process '
                             'and in a helper, alternated, N times each')
    parser.add_argument('--reproject-pairs', type=int, metavar='N',
                        help='only time the reprojection of a band of the field (--field) '
                             'by its shift and pixel by pixel, alternated, N times each')
    parser.add_argument('--rss-child', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.field, args.rss_child, args.model)
        return
    if args.reproject_pairs:
        if args.field is None:
            parser.error('--reproject-pairs needs --field')
        seconds, difference, peak = alternate_reprojection(args.field, args.reproject_pairs)
        for name, values in seconds.items():
            print(f'reproject_region, {name}: {" / ".join(f"{v:.2f}" for v in values)} s')
        print(f"speed-up of the shift (best of each): "
              f"{min(seconds['adaptive']) / min(seconds['shift']):.1f}")
        print(f'largest difference {difference:.2e} (largest value {peak:.2e})')
        return
    from psfdeconv.model import default_model_path, load_model

    model_path = args.model or default_model_path(len(BANDS))
    model = load_model(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        field = args.field
        if field is None:
            size, n_galaxies, n_stars = (1024, 300, 60) if args.quick else (3072, 1600, 150)
            field = tmp / 'field'
            make_field(field, size=size, n_galaxies=n_galaxies, n_stars=n_stars, seed=7)
        print(f'CPU: {os.cpu_count()} cores; field {field}')
        if args.psf_process_pairs:
            seconds = alternate_psf_process(field, model, tmp, args.psf_process_pairs)
            for setting, how in ((False, 'in-process'), (True, 'helper')):
                print(f'run_exposure_set, ePSFs {how}: '
                      f'{" / ".join(f"{value:.1f}" for value in seconds[setting])} s')
            print(f'speed-up of the helper (best of each): '
                  f'{min(seconds[False]) / min(seconds[True]):.2f}')
            return
        result = run_vs_deconvolve(field, model, tmp)
        print(f"run_exposure_set: {result['n']} sources in {result['run_seconds']:.1f} s "
              f"= {result['run_rate']:.1f} sources/s")
        print(f"deconvolve_stamps (same stamps): {result['deconvolve_seconds']:.1f} s "
              f"= {result['deconvolve_rate']:.1f} sources/s")
        print(f"ratio run / deconvolve_stamps: {result['ratio']:.2f} (target >= 0.5)")
        print('stages:')
        for line in result['stages']:
            print(f'  {line}')
        if not args.skip_memory:
            n = result['n']
            for row in peak_rss(field, (n, 4 * n), args.model):
                print(f"peak RSS with {row['n']} sources: {row['max_rss_kb'] / 1e6:.2f} GB "
                      f"({row['seconds']:.0f} s)")
        if not args.skip_batch:
            times, n_sources, _ = batch_workers(tmp / 'batch', str(model_path))
            print(f'batch of 4 groups ({n_sources} sources): 1 worker on 1 CPU '
                  f'{times["1 cpu"]:.1f} s, on every CPU {times[1]:.1f} s, 2 workers '
                  f'{times[2]:.1f} s; speed-up {times["1 cpu"] / times[2]:.2f} over the '
                  f'one-CPU worker, {times[1] / times[2]:.2f} over the other')


if __name__ == '__main__':
    main()
