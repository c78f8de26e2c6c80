#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Accuracy of ``psfdeconv run`` on a simulated multi-band exposure set with known truth.

Simulates a g, r, i exposure set (not the bundled example: its own seed and size), runs the
exposure pipeline twice on it -- with ePSFs built from the exposure's stars (what a user
gets) and with the true Moffat PSF of each band (the PSF known exactly, as for prepared
stamps) -- and prints, per band, the median |flux_corrected / true - 1| of galaxies with
SNR > 20, the median position error, and the RMS ellipticity errors of the two runs with
their ratio (the targets of docs/validation.rst: < 3 %, < 0.05 arcsec, ratio <= 1.2).

    python validation/exposure_accuracy.py --size 1024 --n-galaxies 150 --n-stars 80 --seed 31
"""

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from astropy.table import QTable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--n-galaxies', type=int, default=150)
    parser.add_argument('--n-stars', type=int, default=80)
    parser.add_argument('--seed', type=int, default=31)
    parser.add_argument('--model', help='model .keras file (default: shipped)')
    parser.add_argument('--json', help='also write the results to this JSON file')
    args = parser.parse_args(argv)

    from psfdeconv.evaluate import exposure_accuracy
    from psfdeconv.pipeline import deconvolve_catalog
    from psfdeconv.simulate import simulate_exposure, write_exposure_set

    work = Path(tempfile.mkdtemp(prefix='psfdeconv-validation-'))
    exposures, truth = simulate_exposure((args.size, args.size), n_galaxies=args.n_galaxies,
                                         n_stars=args.n_stars, seed=args.seed)
    # Through FITS files, as a user's data would come.
    paths = write_exposure_set(work, exposures, truth)
    files = {band: paths[band] for band in exposures}
    truth = QTable.read(paths['truth'])
    beta = truth.meta['psf_beta']
    true_psfs = {band: f'moffat:fwhm={fwhm}arcsec,beta={beta}'
                 for band, fwhm in truth.meta['seeing_fwhm'].items()}
    results = {'command': 'python validation/exposure_accuracy.py ' + ' '.join(
        f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items() if v is not None)}
    for name, psfs in (('epsf', 'epsf'), ('true_psf', true_psfs)):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            catalog, _ = deconvolve_catalog(files, None, psfs, model=args.model)
        results[name] = exposure_accuracy(catalog, truth)
        results[name]['seconds'] = round(time.perf_counter() - start, 1)
        results[name]['psf_source'] = catalog.meta['psf_source']

    epsf, true = results['epsf'], results['true_psf']
    print(results['command'])
    print(f"{epsf['n_truth']} galaxies; matched {epsf['n_matched']} (ePSF) / "
          f"{true['n_matched']} (true PSF); unflagged {epsf['n_unflagged']} / "
          f"{true['n_unflagged']}; PSFs {epsf['psf_source']}")
    print(f"median position error: {epsf['position_arcsec']['median']:.3f} arcsec (ePSF), "
          f"{true['position_arcsec']['median']:.3f} (true PSF)")
    print('band  median|dF/F| (SNR>20)  noise floor  bias      HSM e1 RMS  HSM e2 RMS  '
          '(true PSF)        ratio e1, e2')
    for band in truth.meta['bands']:
        e, t = epsf[band], true[band]
        r1 = e['hsm_e1']['rms'] / t['hsm_e1']['rms']
        r2 = e['hsm_e2']['rms'] / t['hsm_e2']['rms']
        print(f"{band:4s}  {e['flux']['median_abs']:.4f} (n={e['flux']['n']:3d})     "
              f"{e['flux']['noise_median_abs']:.4f}       "
              f"{e['flux']['median']:+.4f}   {e['hsm_e1']['rms']:.4f}      "
              f"{e['hsm_e2']['rms']:.4f}      ({t['hsm_e1']['rms']:.4f}, "
              f"{t['hsm_e2']['rms']:.4f})  {r1:.2f}, {r2:.2f}")
    print('band  flux_residual: median|dF/F| (SNR>20)  bias  (ePSF; true PSF)')
    for band in truth.meta['bands']:
        e, t = epsf[band]['flux_residual'], true[band]['flux_residual']
        print(f"{band:4s}  {e['median_abs']:.4f}  {e['median']:+.4f}  "
              f"({t['median_abs']:.4f}  {t['median']:+.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
