#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Throughput and memory of exposure groups and batches, measured in one run.

Prints, all on the same machine in the same run:

* **end to end vs network**: stamps/s of one exposure group through
  ``run_exposure_set`` (read, ePSF, background, cutouts, PSF rendering,
  cube, network, amplitude refit, measurements, FITS writing) against the
  network's forward pass alone (``DeconvolutionModel.predict``) and
  ``deconvolve_stamps`` (cube + network + refit) on the same stamps; the
  target is end to end / forward >= 0.7;
* **network vs CPU**: the forward pass's GFLOP/s (multiply-adds of its
  convolutions counted from the Keras layers, 2 FLOP each) against numpy's
  float32 matmul GFLOP/s on 4096x4096 matrices; the target is >= 0.5;
* **memory**: the peak resident set (``VmHWM``; ``ru_maxrss`` where there
  is no /proc) of one group with 1k, 10k and 50k sources, each in a fresh
  process, and of groups deconvolved in one chunk for comparison; flat
  within 1.5x is the target;
* **bfloat16 inference**: the forward pass with the network's layers in
  mixed bfloat16 (its output layer in float32) against float32 on the same
  cubes, and what it changes in ``deconvolve_stamps``' fluxes (in units of
  their errors) and unweighted ellipticities;
* **workers**: the wall time of a batch of groups on a
  ``distributed.LocalCluster`` with 1 worker of 2 threads vs 2 workers of 1
  thread (processes), and the speed-up.

The field is one simulated exposure set (``simulate_exposure``; its
galaxies); the N sources of a group are its galaxies repeated with sub-pixel
jitter, so that every stamp holds a galaxy (the per-stamp work does not
depend on which galaxy).

Usage (``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset for this command
only: the development machine sets them for old OpenBLAS builds, and they
halve numpy's matmul there, 259 vs 501 GFLOP/s)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_batch.py

A quick check that the script runs (small sizes, any model)::

    python benchmarks/bench_batch.py --quick --model tiny.keras
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

BANDS = ('g', 'r', 'i')
#: The Moffat PSF of the memory runs (an ePSF's cost does not grow with the
#: number of sources, and the memory runs measure what does).
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'


def _best(func, *args, repeat=1, **kwargs):
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        result = func(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def make_field(directory, *, size, n_galaxies, n_stars, seed):
    """Write a simulated g, r, i exposure set; return its galaxies' truth."""
    from psfdeconv.simulate import simulate_exposure, write_exposure_set

    exposures, truth = simulate_exposure((size, size), n_galaxies=n_galaxies,
                                         n_stars=n_stars, seed=seed)
    write_exposure_set(directory, exposures, truth, overwrite=True)
    return truth[truth['kind'] == 'galaxy']


def source_table(galaxies, n, *, seed):
    """n sources: the galaxies repeated, each copy jittered by up to half a
    pixel (as ra, dec)."""
    import astropy.units as u
    import numpy as np
    from astropy.table import QTable

    rng = np.random.default_rng(seed)
    pick = np.arange(n) % len(galaxies)
    jitter = 0.5 * 0.2 / 3600  # half a 0.2-arcsec pixel, in degrees
    ra = np.asarray(galaxies['ra'].to_value(u.deg))[pick] + rng.uniform(-jitter, jitter, n)
    dec = np.asarray(galaxies['dec'].to_value(u.deg))[pick] + rng.uniform(-jitter, jitter, n)
    return QTable({'id': np.arange(n), 'ra': ra * u.deg, 'dec': dec * u.deg})


def forward_flops(keras_model):
    """FLOPs of one forward pass of one stamp: 2 per multiply-add of the
    Conv2D, Conv2DTranspose and Dense layers (activations, pooling and
    normalisation are not counted; they are a few per cent)."""
    import numpy as np

    flops = 0
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind in ('Conv2D', 'Conv2DTranspose'):
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            c_out = layer.filters
            # Output pixels for Conv2D, input pixels for the transpose (each
            # input pixel scatters one kernel).
            pixels = np.prod((layer.output if kind == 'Conv2D' else layer.input).shape[1:3])
            flops += 2 * int(pixels) * kh * kw * c_in * c_out
        elif kind == 'Dense':
            flops += 2 * layer.input.shape[-1] * layer.units
    return flops


def matmul_gflops(n=4096, repeat=3):
    """numpy float32 matmul GFLOP/s on n x n matrices (best of ``repeat``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    seconds, _ = _best(np.matmul, a, b, repeat=repeat)
    return 2 * n ** 3 / seconds / 1e9


def warm_up(model):
    """Build the network's graph (its first call) outside the timings."""
    import numpy as np

    model.predict(np.zeros((8, model.stamp_size, model.stamp_size,
                            len(model.kinds) * len(BANDS)), np.float32))


def group_throughput(field, galaxies, n, model, work):
    """Stamps/s of run_exposure_set, deconvolve_stamps and the forward pass
    on the same n stamps."""
    import numpy as np

    from psfdeconv.cutouts import make_cutouts
    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.features import make_cube
    from psfdeconv.io import read_exposure
    from psfdeconv.pipeline import run_exposure_set
    from psfdeconv.psf import read_psf_image, render_psf

    sources = source_table(galaxies, n, seed=2)
    sources.write(work / 'sources.ecsv', overwrite=True)
    exposures = {band: field / f'{band}.fits' for band in BANDS}
    warm_up(model)
    seconds_epsf, (catalog, paths) = _best(
        run_exposure_set, exposures, work / 'group', work / 'sources.ecsv', 'epsf',
        model=model, overwrite=True)
    # Again with the ePSFs just built, given as files: the per-source path
    # with the fixed costs of reading, background and alignment, without the
    # ePSF build.
    psf_files = {band: f'psf={paths[band]}' for band in BANDS}
    seconds_e2e, _ = _best(run_exposure_set, exposures, work / 'group_psf',
                           work / 'sources.ecsv', psf_files, model=model, overwrite=True)

    # The same stamps and PSFs for the stages alone.
    stamps = np.stack([make_cutouts(read_exposure(exposures[band]),
                                    np.column_stack([catalog['x_input'].value,
                                                     catalog['y_input'].value]),
                                    size=model.stamp_size)['data'] for band in BANDS],
                      axis=1)
    psf_size = catalog.meta['psf_size']
    psfs = np.stack([render_psf(read_psf_image(paths[band]), size=psf_size)
                     for band in BANDS])
    psfs = np.broadcast_to(psfs, (n,) + psfs.shape)
    scale = catalog.meta['pixel_scale']
    seconds_deconvolve, _ = _best(deconvolve_stamps, stamps, psfs, pixel_scale=scale,
                                  model=model)
    cube, _ = make_cube(stamps, psfs, pixel_scale=scale, kinds=model.kinds,
                        **model.feature_options)
    seconds_forward, _ = _best(model.predict, cube, repeat=2)
    bf16 = bfloat16_comparison(model, stamps, psfs, scale, cube)
    return {'bfloat16': bf16, 'n': n, 'end_to_end': n / seconds_e2e,
            'end_to_end_seconds': seconds_e2e,
            'end_to_end_epsf': n / seconds_epsf, 'end_to_end_epsf_seconds': seconds_epsf,
            'deconvolve_stamps': n / seconds_deconvolve,
            'forward': n / seconds_forward}


def bfloat16_model(model):
    """The model with its layers in mixed bfloat16 (bfloat16 compute,
    float32 weights), except its output layer, with the same weights."""
    import copy

    import keras

    from psfdeconv.model import DeconvolutionModel

    config = copy.deepcopy(model.keras_model.get_config())
    nodes = config['output_layers']
    nodes = nodes if nodes and isinstance(nodes[0], list) else [nodes]
    outputs = {node[0] for node in nodes}
    for layer in config['layers']:
        dtype = layer['config'].get('dtype')
        if isinstance(dtype, dict) and layer['name'] not in outputs:
            dtype['config']['name'] = 'mixed_bfloat16'
    network = keras.Model.from_config(config)
    network.set_weights(model.keras_model.get_weights())
    return DeconvolutionModel(network, model.card, path=model.path)


def bfloat16_comparison(model, stamps, psfs, scale, cube):
    """Forward stamps/s in mixed bfloat16 vs float32, and the changes of the
    deconvolved fluxes and ellipticities."""
    import numpy as np

    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.measure import image_moments

    bf16 = bfloat16_model(model)
    bf16.predict(cube[:8])
    seconds, _ = _best(bf16.predict, cube, repeat=2)
    images = {}
    for name, network in (('float32', model), ('bfloat16', bf16)):
        images[name], details = deconvolve_stamps(stamps, psfs, pixel_scale=scale,
                                                  model=network, return_details=True)
        images[name + '_flux'] = details['flux']
        images[name + '_err'] = details['flux_err']
    flux_change = np.abs(images['bfloat16_flux'] - images['float32_flux']) / \
        images['float32_err']
    relative_change = np.abs(images['bfloat16_flux'] / images['float32_flux'] - 1)
    moments = {name: image_moments(images[name]) for name in ('float32', 'bfloat16')}
    e_change = np.hypot(moments['bfloat16']['e1'] - moments['float32']['e1'],
                        moments['bfloat16']['e2'] - moments['float32']['e2'])
    finite = np.isfinite(flux_change) & np.isfinite(e_change)
    return {'forward': len(cube) / seconds,
            'flux_change_median': float(np.median(flux_change[finite])),
            'flux_change_p99': float(np.percentile(flux_change[finite], 99)),
            'relative_change_median': float(np.median(relative_change[finite])),
            'relative_change_p99': float(np.percentile(relative_change[finite], 99)),
            'e_change_median': float(np.median(e_change[finite])),
            'e_change_p99': float(np.percentile(e_change[finite], 99))}


def _peak_rss_kb():
    """This process's peak resident set (kB): ``VmHWM`` of
    /proc/self/status where there is one, else ``ru_maxrss``. On Linux
    ``ru_maxrss`` keeps the resident set of the parent at the fork (it
    survives the exec), so a child of a large parent reports the parent's
    size; ``VmHWM`` belongs to the child's own address space."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(field, n, chunk_size, model_path):
    """In a fresh process: one group of n sources; print its peak RSS."""
    from astropy.table import QTable

    from psfdeconv.model import load_model
    from psfdeconv.pipeline import run_exposure_set

    galaxies = QTable.read(field / 'truth.ecsv')
    galaxies = galaxies[galaxies['kind'] == 'galaxy']
    model = load_model(model_path)
    before = _peak_rss_kb()
    with tempfile.TemporaryDirectory(dir=field.parent) as work:
        source_table(galaxies, n, seed=3).write(Path(work) / 'sources.ecsv')
        start = time.perf_counter()
        run_exposure_set({band: field / f'{band}.fits' for band in BANDS}, work,
                         Path(work) / 'sources.ecsv', MOFFAT, model=model,
                         chunk_size=chunk_size)
        seconds = time.perf_counter() - start
    print(json.dumps({'n': n, 'chunk_size': chunk_size, 'rss_before_kb': before,
                      'max_rss_kb': _peak_rss_kb(), 'seconds': seconds,
                      'ru_maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss(field, sizes, chunk_size, model_path):
    """``rss_child`` for each number of sources (``chunk_size`` None: the
    pipeline's default; 0: one chunk of all the sources)."""
    results = []
    for n in sizes:
        command = [sys.executable, __file__, '--rss-child', str(n), '--field', str(field)]
        if chunk_size is not None:
            command += ['--chunk-size', str(chunk_size or n)]
        if model_path:
            command += ['--model', str(model_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f'memory run with {n} sources failed ({done.returncode})')
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def cluster_speedup(field_root, n_groups, model_path, *, size, n_galaxies, n_stars):
    """Wall time of one batch on a LocalCluster of 1 worker x 2 threads and
    of 2 workers x 1 thread (processes), model loading included."""
    from distributed import LocalCluster

    from psfdeconv.batch import run_batch

    lines = ['id,g,r,i']
    for k in range(n_groups):
        group = f'g{k:02d}'
        make_field(field_root / group, size=size, n_galaxies=n_galaxies,
                   n_stars=n_stars, seed=100 + k)
        lines.append(f'{group},{group}/g.fits,{group}/r.fits,{group}/i.fits')
    (field_root / 'groups.csv').write_text('\n'.join(lines) + '\n')
    times = {}
    for n_workers, threads in ((1, 2), (2, 1)):
        with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                          host='127.0.0.1', dashboard_address=None) as cluster:
            out = field_root / f'out_{n_workers}'
            start = time.perf_counter()
            summary = run_batch(field_root / 'groups.csv', out, psfs=MOFFAT,
                                model=model_path, scheduler=cluster.scheduler_address,
                                overwrite=True)
            times[(n_workers, threads)] = time.perf_counter() - start
            n_sources = int(summary['n_sources'].sum())
    return times, n_sources


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--n', type=int, default=2048,
                        help='sources of the end-to-end group')
    parser.add_argument('--rss-sizes', default='1000,10000,50000',
                        help='sources per group of the memory runs')
    parser.add_argument('--chunk-size', type=int, default=None,
                        help='chunk_size of the memory runs (default: the '
                             "pipeline's)")
    parser.add_argument('--unchunked-sizes', default='1000,5000',
                        help='sources per group of memory runs in one chunk, for '
                             'comparison (about 1.2 MB per source; empty: none)')
    parser.add_argument('--groups', type=int, default=8,
                        help='groups of the LocalCluster batch')
    parser.add_argument('--field-size', type=int, default=512)
    parser.add_argument('--model', help='model .keras file (default: shipped)')
    parser.add_argument('--skip', default='',
                        help='comma-separated parts to skip: group, matmul, rss, '
                             'cluster')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes, to check that the script runs')
    parser.add_argument('--rss-child', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--field', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        from psfdeconv.pipeline import CHUNK_SIZE

        rss_child(Path(args.field), args.rss_child,
                  args.chunk_size or CHUNK_SIZE, args.model)
        return
    if args.quick:
        args.n, args.rss_sizes, args.groups, args.field_size = 64, '50,200', 2, 256
        args.unchunked_sizes = '200'
    skip = set(filter(None, args.skip.split(',')))
    for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE'):
        if name in os.environ:
            print(f'note: {name}={os.environ[name]} is set; run with env -u {name} '
                  f'for the matmul reference (see the docstring)')

    from psfdeconv.model import load_model

    model = load_model(args.model)
    print(f'model {model.card.get("name")} ({model.sha256[:12]}), {os.cpu_count()} CPUs')
    root = Path(tempfile.mkdtemp(prefix='psfdeconv-bench-batch-'))
    field = root / 'field'
    start = time.perf_counter()
    galaxies = make_field(field, size=args.field_size,
                          n_galaxies=8 if args.quick else 60,
                          n_stars=25 if args.quick else 40, seed=1)
    print(f'field: {args.field_size}x{args.field_size}, {len(galaxies)} galaxies '
          f'(simulated in {time.perf_counter() - start:.0f} s) in {root}')
    print()

    rates = None
    if 'group' not in skip:
        rates = group_throughput(field, galaxies, args.n, model, root)
        print(f'one group of {rates["n"]} sources            stamps/s')
        print(f'  run_exposure_set, building ePSFs   {rates["end_to_end_epsf"]:9.1f}   '
              f'({rates["end_to_end_epsf_seconds"]:.1f} s)')
        print(f'  run_exposure_set, PSF files        {rates["end_to_end"]:9.1f}   '
              f'({rates["end_to_end_seconds"]:.1f} s, reading and writing included)')
        print(f'  deconvolve_stamps (cube+net+refit) {rates["deconvolve_stamps"]:9.1f}')
        print(f'  network forward (float32)          {rates["forward"]:9.1f}')
        print(f'  end to end (PSF files) / forward   {rates["end_to_end"] / rates["forward"]:9.2f}'
              f'   (target >= 0.7)')
        print(f'  end to end (ePSFs) / forward       '
              f'{rates["end_to_end_epsf"] / rates["forward"]:9.2f}')
        print(f'  deconvolve_stamps / forward        '
              f'{rates["deconvolve_stamps"] / rates["forward"]:9.2f}')
        bf16 = rates['bfloat16']
        print(f'  network forward (mixed bfloat16)   {bf16["forward"]:9.1f}')
        print(f'  bfloat16 / float32 forward         {bf16["forward"] / rates["forward"]:9.2f}')
        print(f'  bfloat16 - float32 |flux| / flux_err: median {bf16["flux_change_median"]:.3f},'
              f' 99th percentile {bf16["flux_change_p99"]:.3f}')
        print(f'  bfloat16 / float32 flux - 1: median {bf16["relative_change_median"]:.4f},'
              f' 99th percentile {bf16["relative_change_p99"]:.4f} (absolute)')
        print(f'  bfloat16 - float32 |e|: median {bf16["e_change_median"]:.4f}, '
              f'99th percentile {bf16["e_change_p99"]:.4f}')
        print()
    if 'matmul' not in skip:
        flops = forward_flops(model.keras_model)
        matmul = matmul_gflops(1024 if args.quick else 4096)
        print(f'numpy float32 matmul 4096x4096       {matmul:9.1f} GFLOP/s')
        print(f'network forward: {flops / 1e9:.3f} GFLOP per stamp')
        if rates is not None:
            forward = flops * rates['forward'] / 1e9
            print(f'network forward                      {forward:9.1f} GFLOP/s')
            print(f'  forward / matmul                   {forward / matmul:9.2f}'
                  f'   (target >= 0.5)')
        print()
    if 'rss' not in skip:
        sizes = [int(v) for v in args.rss_sizes.split(',')]
        results = peak_rss(field, sizes, args.chunk_size, args.model)
        peaks = [result['max_rss_kb'] for result in results]
        unchunked = [int(v) for v in args.unchunked_sizes.split(',') if v]
        results += peak_rss(field, unchunked, 0, args.model)
        print('one group, fresh process each       peak RSS     before run   seconds')
        for result in results:
            print(f'  {result["n"]:6d} sources (chunk {result["chunk_size"]:5d})   '
                  f'{result["max_rss_kb"] / 1024:8.0f} MiB  '
                  f'{result["rss_before_kb"] / 1024:8.0f} MiB  {result["seconds"]:8.1f}')
        print(f'  largest / smallest peak, chunked   {max(peaks) / min(peaks):9.2f}'
              f'   (target <= 1.5)')
        print()
    if 'cluster' not in skip:
        times, n_sources = cluster_speedup(
            root / 'cluster', args.groups, args.model or model.path,
            size=128 if args.quick else 256, n_galaxies=3 if args.quick else 8,
            n_stars=3 if args.quick else 25)
        print(f'LocalCluster batch of {args.groups} groups ({n_sources} sources), '
              f'model loading included')
        for (n_workers, threads), seconds in times.items():
            print(f'  {n_workers} worker(s) x {threads} thread(s)             '
                  f'{seconds:9.1f} s')
        print(f'  speed-up 2 workers / 1 worker      {times[(1, 2)] / times[(2, 1)]:9.2f}')


if __name__ == '__main__':
    main()
