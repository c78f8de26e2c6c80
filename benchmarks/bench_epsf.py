#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The ePSF fit of psfdeconv against photutils' default, on the stars of a field.

``build_epsf`` runs photutils' ``EPSFBuilder`` with astropy's
``LevMarLSQFitter`` (MINPACK's Levenberg-Marquardt) for the fits of the stars'
centres and fluxes in each iteration; photutils' default is ``TRFLSQFitter``.
For each band of a field, the stars ``build_epsf`` selects are cut out once,
then the two builders run alternately (``--pairs`` times each, in this process
pinned to one CPU) and the script prints the best time of each, their ratio,
the largest difference of the two ePSFs (each normalised to unit sum) relative
to the peak, and the stars each excluded.

Usage (about a minute per band)::

    python benchmarks/bench_epsf.py FIELD [--bands g r i] [--pairs 2]

``FIELD`` is a directory of ``g.fits``, ``r.fits``, ``i.fits`` (``psfdeconv
simulate-exposure``).
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import cpu_name  # noqa: E402


def star_cutouts(path):
    """The stars build_epsf would use on a band, cut out of the subtracted image."""
    from astropy.io import fits
    from astropy.nddata import NDData
    from astropy.table import Table
    from photutils.psf import extract_stars

    from psfdeconv import psf
    from psfdeconv.background import estimate_background

    image = fits.getdata(path).astype(float)
    image, bad, _ = psf.as_image_and_mask(image, None)
    background, rms = estimate_background(image, bad)
    stars = psf.find_stars(image, mask=bad, box_size=25, threshold_sigma=10.0)
    keep = np.asarray(stars['selected'], dtype=bool)
    x, y = np.asarray(stars['x'])[keep], np.asarray(stars['y'])[keep]
    # The cutouts that build_epsf keeps: whole 25x25 boxes about the rounded centres.
    half = 12
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = ((ix - half >= 0) & (iy - half >= 0) & (ix + half <= image.shape[1] - 1)
              & (iy + half <= image.shape[0] - 1))
    subtracted = image - background
    subtracted[bad] = 0.0
    return extract_stars(NDData(subtracted, mask=bad),
                         Table({'x': x[inside], 'y': y[inside]}), size=(25, 25))


def build(stars, fitter):
    from photutils.psf import EPSFBuilder

    options = {} if fitter is None else {'fitter': fitter}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = EPSFBuilder(oversampling=2, maxiters=10, progress_bar=False,
                             **options)(stars)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('field', type=Path)
    parser.add_argument('--bands', nargs='+', default=['g', 'r', 'i'])
    parser.add_argument('--pairs', type=int, default=2)
    args = parser.parse_args()
    from astropy.modeling.fitting import LevMarLSQFitter

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(f'{cpu_name()}, one CPU')
    for band in args.bands:
        stars = star_cutouts(args.field / f'{band}.fits')
        seconds = {'TRF (photutils default)': [], 'Levenberg-Marquardt': []}
        results = {}
        for _ in range(args.pairs):
            for name, fitter in (('TRF (photutils default)', None),
                                 ('Levenberg-Marquardt',
                                  LevMarLSQFitter(calc_uncertainties=False))):
                elapsed, results[name] = build(stars, fitter)
                seconds[name].append(elapsed)
        trf, lm = (results[name].epsf.data for name in seconds)
        trf, lm = trf / trf.sum(), lm / lm.sum()
        print(f'band {band}: {len(stars)} stars')
        for name, values in seconds.items():
            print(f'  {name:26s} {min(values):6.2f} s (of '
                  f'{" / ".join(f"{v:.2f}" for v in values)}), '
                  f'{results[name].n_excluded_stars} excluded')
        trf_best, lm_best = (min(values) for values in seconds.values())
        print(f'  TRF / Levenberg-Marquardt  {trf_best / lm_best:6.2f}')
        print(f'  largest |difference| / peak  {np.abs(lm - trf).max() / trf.max():.1e}')


if __name__ == '__main__':
    main()
