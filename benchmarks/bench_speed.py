#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The speed targets of psfdeconv on a CPU, all measured in one run.

Prints one table of measurements and the ratios the speed targets are set on:

* **stamps**: a bare float32 Keras forward pass of the paper's CAE (64/128/256
  filters, 9 channels, batch 128, ``predict_on_batch``) against
  ``deconvolve_stamps`` end to end (input cube, network, amplitude refits and
  the card's corrections) with the shipped 3-band model: the card's
  configuration (its symmetry views) and one view, each in float32 and in
  ``precision='auto'`` (the default: bfloat16 where the CPU has AVX512-BF16 or AMX), and
  that through a 0.4 arcsec target PSF with its residual update, and one view
  in ``'auto'`` with its steps one after the other (``deconvolve_stamps`` runs
  the network of one step in a worker thread beside the work on its
  neighbours); target: ``deconvolve_stamps`` >= 0.7x the CAE forward;
* **exposures** (`bench_exposure.run_vs_deconvolve`): ``run_exposure_set`` on a
  simulated 3-band field against ``deconvolve_stamps`` on the same stamps and
  PSFs with the same views (target >= 0.5): with one view, the ePSFs built in
  a helper process while the bands are background-subtracted, aligned and
  segmented (the default) and in the run's own process (``psf_process=False``),
  and in the default configuration (the card's views, the helper), with its
  stage timings, and its peak resident memory with 1x and 4x the sources, each in a
  fresh process (target: flat);
* **batch** (`bench_exposure.batch_workers`): ``run_batch`` on 4 groups with one
  worker process on one CPU (pinned by CPU affinity), one worker process with
  every CPU, and 2 worker processes (target: 2 workers >= 1.8x the one-CPU
  worker on 2 cores; a worker with every CPU already runs its network, FFTs and
  reprojection in threads, so it shows what the processes add); each group is a simulated
  field of ``--batch-field`` pixels a side (1024, 250 galaxies and 60 stars, by
  default; 512 gives 40 galaxies and 25 stars), and each worker process starts
  TensorFlow and loads the model once, a fixed cost the groups share.

Usage (about 25 minutes on 2 cores with the defaults)::

    python benchmarks/bench_speed.py [--n 512] [--field DIR] [--quick]
        [--skip-stamps] [--skip-exposure] [--skip-memory] [--skip-batch]
        [--batch-field 1024] [--batch-groups 4] [--batch-rounds 1] [--batch-dir DIR]

``--batch-groups N`` runs N groups (more than 4 reuse the 4 simulated fields in
turn); ``--batch-rounds R`` alternates the three batch measurements R times and
gives the best of each and each round's ratio; ``--batch-dir DIR`` keeps the
simulated batch fields there, and reuses those it finds.

``--field DIR`` reuses a field written by ``psfdeconv simulate-exposure --size 3072
--n-galaxies 1600 --n-stars 150 --seed 7 --out DIR``; ``--quick`` simulates a
1024-pixel field of 300 galaxies instead of the 3072-pixel one.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

sys.path.insert(0, str(Path(__file__).parent))
from bench_batch import make_field  # noqa: E402
from bench_exposure import BANDS, batch_workers, peak_rss, run_vs_deconvolve  # noqa: E402


def _best(func, *args, repeat=2, **kwargs):
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        func(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name():
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def cae_forward_rate(n, batch_size=128):
    """Stamps/s of a bare float32 Keras forward pass of the paper's CAE on
    random 64x64x9 cubes (the weights do not change the arithmetic)."""
    import keras
    import numpy as np

    from psfdeconv.model import build_cae

    keras.config.set_dtype_policy('float32')
    network = build_cae((64, 64, 9))
    cubes = np.random.default_rng(0).random((n, 64, 64, 9), dtype=np.float32)

    def forward():
        for start in range(0, n, batch_size):
            network.predict_on_batch(cubes[start:start + batch_size])

    forward()  # build the function once
    return n / _best(forward)


def stamp_rates(n, model):
    """Stamps/s of deconvolve_stamps in the card's configuration and with one
    view, each in float32 and 'auto' precision, with one view in 'auto' through a 0.4
    arcsec target PSF, and with one view in 'auto' with its steps one after
    the other (the network not overlapped with the work around it), on n
    simulated stamps."""
    import psfdeconv.deconvolve as deconvolve_module
    from psfdeconv.deconvolve import check_symmetries, deconvolve_stamps
    from psfdeconv.inference import resolve_precision
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(n, seed=1)
    observed, psfs, scale = sims['observed'], sims['psf'], sims['pixel_scale']
    views = check_symmetries(None, model)
    auto = resolve_precision('auto')
    variants = {f'card ({views} views), float32': dict(precision='float32'),
                f'card ({views} views), auto ({auto[0]}, {auto[1]})': dict(precision='auto'),
                '1 view, float32': dict(symmetries=1, precision='float32'),
                f'1 view, auto ({auto[0]}, {auto[1]})': dict(symmetries=1,
                                                              precision='auto'),
                '1 view, auto, target 0.4 arcsec (residual update)': dict(
                    symmetries=1, precision='auto', target_psf=0.4),
                '1 view, auto, steps not overlapped': dict(symmetries=1, precision='auto',
                                                           overlap=False)}
    rates = {}
    for name, options in variants.items():
        deconvolve_module._OVERLAP = options.pop('overlap', True)
        try:
            deconvolve_stamps(observed[:32], psfs[:32], pixel_scale=scale[:32], model=model,
                              **options)  # build the runner outside the timing
            rates[name] = n / _best(deconvolve_stamps, observed, psfs, pixel_scale=scale,
                                    model=model, **options)
        finally:
            deconvolve_module._OVERLAP = True
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--n', type=int, default=512, help='stamps per stamp measurement')
    parser.add_argument('--field', type=Path, help='an existing g, r, i field directory')
    parser.add_argument('--quick', action='store_true', help='a small field')
    parser.add_argument('--skip-exposure', action='store_true')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--skip-batch', action='store_true')
    parser.add_argument('--batch-field', type=int, choices=(512, 1024), default=1024,
                        help='side in pixels of each batch group')
    parser.add_argument('--batch-groups', type=int, default=4,
                        help='groups of the batch (each a simulated field)')
    parser.add_argument('--batch-rounds', type=int, default=1,
                        help='rounds of the three batch measurements, alternated')
    parser.add_argument('--batch-dir', type=Path,
                        help='where the batch fields are simulated, or reused if there')
    parser.add_argument('--skip-stamps', action='store_true')
    args = parser.parse_args()

    from psfdeconv.deconvolve import check_symmetries
    from psfdeconv.model import default_model_path, load_model

    model_path = default_model_path(len(BANDS))
    model = load_model(model_path)
    rows = []  # (what, value, target or '')
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores')

    if not args.skip_stamps:
        cae = cae_forward_rate(args.n)
        rows.append(('paper CAE, bare float32 Keras forward (stamps/s)', f'{cae:.1f}', ''))
        for name, rate in stamp_rates(args.n, model).items():
            rows.append((f'deconvolve_stamps, {name} (stamps/s)', f'{rate:.1f}', ''))
            rows.append(('  / CAE forward', f'{rate / cae:.2f}', '>= 0.7'))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_exposure:
            field = args.field
            if field is None:
                size, n_galaxies, n_stars = ((1024, 300, 60) if args.quick
                                             else (3072, 1600, 150))
                field = tmp / 'field'
                make_field(field, size=size, n_galaxies=n_galaxies, n_stars=n_stars, seed=7)
            # One view with the PSFs in a helper process where it pays (the
            # default), then in the run's own process, then the card's views
            # (the default configuration), in the same run.
            views = check_symmetries(None, model)
            for psf_process, symmetries, how in (
                    ('auto', 1, '1 view'), (False, 1, '1 view, PSFs in-process'),
                    ('auto', None, f"the card's {views} views (the defaults)")):
                result = run_vs_deconvolve(field, model, tmp, psf_process=psf_process,
                                           symmetries=symmetries)
                rows.append((f'run_exposure_set, {result["n"]} sources, {how} '
                             f'(sources/s)', f'{result["run_rate"]:.1f}', ''))
                rows.append(('deconvolve_stamps, same stamps and views (sources/s)',
                             f'{result["deconvolve_rate"]:.1f}', ''))
                rows.append(('  run / deconvolve_stamps', f'{result["ratio"]:.2f}',
                             '>= 0.5'))
                print(f'run_exposure_set stages ({how}):')
                for line in result['stages']:
                    print(f'  {line}')
            if not args.skip_memory:
                n = result['n']
                peaks = peak_rss(field, (n, 4 * n), None)
                for row in peaks:
                    rows.append((f'peak RSS, {row["n"]} sources (GB)',
                                 f'{row["max_rss_kb"] / 1e6:.2f}', ''))
                rows.append(('  4x sources / 1x sources',
                             f'{peaks[1]["max_rss_kb"] / peaks[0]["max_rss_kb"]:.2f}',
                             'flat'))
        if not args.skip_batch:
            sources = {512: (40, 25), 1024: (250, 60)}[args.batch_field]
            times, n_sources, groups = batch_workers(
                args.batch_dir or tmp / 'batch', str(model_path), n_groups=args.batch_groups,
                size=args.batch_field, n_galaxies=sources[0], n_stars=sources[1],
                rounds=args.batch_rounds)
            if args.batch_rounds == 1:
                times = {name: [value] for name, value in times.items()}

            def seconds(values):
                best = f'{min(values):.1f}'
                each = ' / '.join(f'{value:.1f}' for value in values)
                return best if len(values) == 1 else f'{best} (of {each})'

            rows.append((f'run_batch, {args.batch_groups} groups of {args.batch_field}x'
                         f'{args.batch_field} ({n_sources} sources), 1 worker on 1 CPU (s)',
                         seconds(times['1 cpu']), ''))
            rows.append(('run_batch, 1 worker on every CPU (s)', seconds(times[1]), ''))
            rows.append(('run_batch, 2 workers (s)', seconds(times[2]), ''))
            rows.append(('  speed-up 2 workers / 1 worker on 1 CPU (best of each)',
                         f'{min(times["1 cpu"]) / min(times[2]):.2f}', '>= 1.8'))
            if args.batch_rounds > 1:
                rows.append(('  the same, per round', ' / '.join(
                    f'{one / two:.2f}' for one, two in zip(times['1 cpu'], times[2],
                                                           strict=True)), ''))
            rows.append(('  speed-up 2 workers / 1 worker on every CPU',
                         f'{min(times[1]) / min(times[2]):.2f}', ''))
            # A group's own time beside the other worker over alone (each worker's
            # first group, which loads the model, apart): what the workers cost each other.
            for name, label in (('1 cpu', '1 worker on 1 CPU'), (2, '2 workers')):
                rest = [value for one in groups[name] for value in one['rest']]
                first = [value for one in groups[name] for value in one['first']]
                rows.append((f'  group seconds, {label}: later groups / first',
                             f'{np.mean(rest):.1f} / {np.mean(first):.1f}', ''))

    width = max(len(what) for what, _, _ in rows)
    print()
    print(f'{"measurement":{width}s}  {"value":>8s}  target')
    for what, value, target in rows:
        print(f'{what:{width}s}  {value:>8s}  {target}')


if __name__ == '__main__':
    main()
