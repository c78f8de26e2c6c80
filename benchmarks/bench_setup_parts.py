#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Three parts of ``psfdeconv run`` against what they replace, on a field.

* **clipped noise**: the sigma-clipped statistics of each band
  (`psfdeconv.background.clipped_stats`, one sort of the pixels) against
  astropy's ``sigma_clipped_stats`` (median centre, 3 sigma, 5 iterations),
  and their largest relative difference;
* **cutouts**: `psfdeconv.cutouts.make_cutouts` on 2000 seeded positions of
  a band, with and without each stamp's WCS, against a loop of
  `~astropy.nddata.Cutout2D` (``mode='partial'``, ``copy=True``, the WCS
  included: what ``make_cutouts`` called per stamp before), and
  whether the stamps are the same;
* **annulus sums beside the network**: the light within each radius of
  96 stamps (`psfdeconv.deconvolve.light_radius`'s sums, as the refit's
  ``flux_residual`` takes them: ``numpy.add.reduceat``) against a product
  with a one-hot matrix (which runs in the BLAS library's threads), alone and
  while another thread runs the shipped network in a loop, as the overlapped
  steps of ``deconvolve_stamps`` do, with the network's stamps/s meanwhile
  (the BLAS library's threads spin after each product, taking the network's
  cores).

Each pair alternates ``--rounds`` times and the script prints the best of each
and their ratio.

Usage (about a minute)::

    python benchmarks/bench_setup_parts.py FIELD [--rounds 3]

``FIELD`` is a directory of ``g.fits``, ``r.fits``, ``i.fits`` (``psfdeconv
simulate-exposure``).
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import cpu_name  # noqa: E402


def alternate(variants, rounds):
    """Best seconds of each ``{name: function}``, called in turn ``rounds`` times."""
    best = dict.fromkeys(variants, float('inf'))
    for _ in range(rounds):
        for name, function in variants.items():
            start = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def clipped_noise(band, rounds):
    from astropy.stats import sigma_clipped_stats

    from psfdeconv.background import clipped_stats
    from psfdeconv.io import read_exposure

    exposure = read_exposure(band)
    data, mask = exposure.data, exposure.mask
    best = alternate({'astropy': lambda: sigma_clipped_stats(data, mask=mask, sigma=3.0),
                      'clipped_stats': lambda: clipped_stats(data, mask, sigma=3.0)},
                     rounds)
    theirs = np.array(sigma_clipped_stats(data, mask=mask, sigma=3.0))
    ours = np.array(clipped_stats(data, mask, sigma=3.0))
    return best, float(np.max(np.abs(ours / theirs - 1)))


def cutouts(band, rounds, n=2000, size=64):
    from astropy.nddata import Cutout2D

    from psfdeconv.cutouts import make_cutouts
    from psfdeconv.io import read_exposure

    exposure = read_exposure(band)
    ny, nx = exposure.shape
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, ny - 0.5, n)])
    centres = np.floor(xy + 0.5).astype(int)

    def cutout2d_loop():
        return [Cutout2D(exposure.data, (int(x), int(y)), size, wcs=exposure.wcs,
                         mode='partial', fill_value=0.0, copy=True) for x, y in centres]

    best = alternate({
        'Cutout2D loop': cutout2d_loop,
        'make_cutouts': lambda: make_cutouts(exposure, xy, size=size),
        'make_cutouts, no WCS': lambda: make_cutouts(exposure, xy, size=size,
                                                     stamp_wcs=False)}, rounds)
    ours = make_cutouts(exposure, xy, size=size)
    same = all(np.array_equal(np.where(ours['mask'][i], 0.0, ours['data'][i]),
                              np.where(ours['mask'][i], 0.0, cutout.data))
               and np.array_equal(ours['wcs'][i].wcs.crpix, cutout.wcs.wcs.crpix)
               for i, cutout in enumerate(cutout2d_loop()))
    return best, same


def annulus_sums(rounds, steps=500):
    from psfdeconv.deconvolve import _enclosed
    from psfdeconv.model import load_model
    from psfdeconv.simulate import simulate_stamps

    model = load_model()
    stamps = simulate_stamps(32, seed=1)['observed'].astype(np.float32)  # (32, 3, 64, 64)
    cube = np.random.default_rng(0).uniform(0, 1, (32, 64, 64, 9)).astype(np.float32)
    ny, nx = stamps.shape[-2:]
    yy, xx = np.mgrid[:ny, :nx]
    annulus = np.ceil(np.hypot(yy - ny // 2, xx - nx // 2)).astype(int).ravel()
    matrix = np.zeros((annulus.size, annulus.max() + 1), dtype=np.float32)
    matrix[np.arange(annulus.size), annulus] = 1.0
    flat = stamps.reshape(stamps.shape[:2] + (-1,))

    def matrix_product():  # the sums as residual_flux made them before
        for _ in range(steps):
            np.cumsum(flat @ matrix, axis=-1, dtype=np.float64)

    def reduceat():  # psfdeconv's own
        for _ in range(steps):
            _enclosed(stamps)

    variants = {'one-hot matrix product': matrix_product, 'reduceat': reduceat}
    alone = alternate(variants, rounds)
    stop = threading.Event()
    done = []

    def network():
        while not stop.is_set():
            model.predict(cube, precision='auto')
            done.append(time.perf_counter())

    model.predict(cube, precision='auto')
    thread = threading.Thread(target=network)
    thread.start()
    beside = dict.fromkeys(variants, float('inf'))
    network_rate = dict.fromkeys(variants, 0.0)
    try:
        for _ in range(rounds):
            for name, function in variants.items():
                start = time.perf_counter()
                function()
                end = time.perf_counter()
                beside[name] = min(beside[name], end - start)
                # Stamps/s of the network while the sums ran beside it.
                calls = sum(start <= t <= end for t in done)
                network_rate[name] = max(network_rate[name], calls * len(cube) / (end - start))
    finally:
        stop.set()
        thread.join()
    per_step = 1e3 / steps
    return ({name: seconds * per_step for name, seconds in alone.items()},
            {name: seconds * per_step for name, seconds in beside.items()}, network_rate)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('field', type=Path, help='directory of g.fits, r.fits, i.fits')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores\n')
    for band in ('g', 'r', 'i'):
        best, difference = clipped_noise(args.field / f'{band}.fits', args.rounds)
        print(f'clipped noise, band {band}: astropy {best["astropy"]:.3f} s, '
              f'clipped_stats {best["clipped_stats"]:.3f} s '
              f'({best["astropy"] / best["clipped_stats"]:.1f} times), '
              f'largest relative difference {difference:.1e}')
    best, same = cutouts(args.field / 'r.fits', args.rounds)
    print('\n2000 cutouts of band r: ' + ', '.join(f'{name} {seconds:.3f} s'
                                                   for name, seconds in best.items())
          + f' (the same stamps and WCS as Cutout2D: {same})')
    alone, beside, network_rate = annulus_sums(args.rounds)
    print('\nannulus sums of 96 stamps (ms per step) and the network beside them:')
    for name in alone:
        print(f'  {name}: {alone[name]:.2f} alone, {beside[name]:.2f} beside the network, '
              f'which ran {network_rate[name]:.1f} stamps/s meanwhile')


if __name__ == '__main__':
    main()
