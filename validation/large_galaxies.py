#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fluxes of simulated galaxies larger than a stamp: the exposure's grid against block sums.

Simulates single-band fields (400x400 pixels at 0.2 arcsec/pixel, 0.8 arcsec Moffat
seeing, 4 galaxies and 20 stars each) with galaxies of half-light radii in a few bins (the
shipped models were trained on 0.15-0.8 arcsec), runs
`psfdeconv.pipeline.deconvolve_catalog` twice on each, once as it is (large sources cut
from block-summed bands, flag BLOCK_REDUCED) and once with every source kept on the
exposure's grid, and prints per bin the median flux_corrected / true flux and the mean
absolute error of both, over the galaxies matched within 3 pixels in both runs.

    python validation/large_galaxies.py
    python validation/large_galaxies.py --seeds 1 2 3 4 5
"""

import argparse
import warnings

import numpy as np

BINS = ((0.8, 1.6), (1.5, 2.0), (2.0, 3.0), (3.0, 5.0))


def _on_native_grid(extent, stamp_size, blended):
    return np.ones(len(extent), dtype=np.int64), np.zeros(len(extent), dtype=bool)


def _ratios(catalog, galaxies):
    """flux_corrected_r / true flux and flags of each galaxy's nearest row (NaN and -1
    beyond 3 pixels)."""
    distance = np.hypot(catalog['x_input'].value[:, None] - galaxies['x'].value,
                        catalog['y_input'].value[:, None] - galaxies['y'].value)
    nearest = distance.argmin(axis=0)
    found = distance.min(axis=0) < 3
    ratio = catalog['flux_corrected_r'].value[nearest] / galaxies['flux_r'].value
    return np.where(found, ratio, np.nan), np.where(found, catalog['flags'][nearest], -1)


def main(argv=None):
    import psfdeconv.pipeline as pipeline
    from psfdeconv.exceptions import PSFDeconvError
    from psfdeconv.flags import FLAG_BLOCK_REDUCED
    from psfdeconv.simulate import simulate_exposure

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    args = parser.parse_args(argv)
    block_factors = pipeline._block_factors
    print(f'{"hlr arcsec":>10s} {"n":>3s} {"blocked":>7s} {"median native":>13s} '
          f'{"median block":>12s} {"|err| native":>12s} {"|err| block":>11s}')
    for low, high in BINS:
        native, blocked, flagged = [], [], []
        for seed in args.seeds:
            exposures, truth = simulate_exposure(
                (400, 400), bands=('r',), n_galaxies=4, n_stars=20, seeing_fwhm=0.8,
                half_light_radius_range=(low, high), seed=seed)
            galaxies = truth[np.asarray(truth['kind']) == 'galaxy']
            runs = []
            for factors in (block_factors, _on_native_grid):
                pipeline._block_factors = factors
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore')
                        catalog, _ = pipeline.deconvolve_catalog(
                            exposures, psfs='moffat:fwhm=0.8arcsec,beta=3.5', symmetries=1)
                except PSFDeconvError:
                    break  # e.g. no galaxy detected in this field
                finally:
                    pipeline._block_factors = block_factors
                runs.append(_ratios(catalog, galaxies))
            if len(runs) < 2:
                continue
            (ratio_block, flags), (ratio_native, _) = runs
            both = np.isfinite(ratio_block) & np.isfinite(ratio_native)
            blocked += list(ratio_block[both])
            native += list(ratio_native[both])
            flagged += list((flags[both] & FLAG_BLOCK_REDUCED) != 0)
        native, blocked = np.array(native), np.array(blocked)
        print(f'{f"{low}-{high}":>10s} {native.size:3d} {int(np.sum(flagged)):7d} '
              f'{np.median(native):13.3f} {np.median(blocked):12.3f} '
              f'{np.mean(np.abs(native - 1)):12.3f} {np.mean(np.abs(blocked - 1)):11.3f}')


if __name__ == '__main__':
    main()
