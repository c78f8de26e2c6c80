#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The real-frame acceptance check: ``psfdeconv run`` against photutils' Kron photometry.

For each real test frame (tests/data/README.md), runs ``psfdeconv run`` (through
``psfdeconv.cli.main``), finds the bright resolved galaxies of the same image with photutils'
own detection, deblending and Kron photometry (``psfdeconv.evaluate.kron_reference``) and
prints ``psfdeconv.evaluate.compare_with_kron``: the rule is a median
flux_corrected / Kron flux within 0.85-1.2 over the usable matched rows, no more than 5 % of
them off by more than 2x, and at least half the matched rows usable on KiDS (30 % on
DECam); the last column is the median flux_residual / Kron flux of the same rows. A case
whose run fails is reported as ``FAILED: <error>`` and the others go on.

    python validation/real_frames.py
    python validation/real_frames.py --case decam --out real_runs/
    python validation/real_frames.py --case decam --out real_runs/ --reuse
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / 'tests' / 'data'

#: name -> (psfdeconv run arguments without --out, band, image path, HDU,
#: minimum usable fraction).
CASES = {
    'ctio': (['--band', f'I={DATA / "ctio-mosaic2-cdfs-I.fits"}'],
             'I', DATA / 'ctio-mosaic2-cdfs-I.fits', 0, 0.5),
    'kids': (['--band', f'r={DATA / "kids-r-2600.fits"}', '--pixel-scale', '0.2'],
             'r', DATA / 'kids-r-2600.fits', 1, 0.5),
    'decam': (['--band', f'r={DATA / "decam-r-N6.fits"}',
               '--weight', f'r={DATA / "decam-r-N6-weight.fits"}',
               '--psf', 'moffat:fwhm=1.05arcsec,beta=3'],
              'r', DATA / 'decam-r-N6.fits', 1, 0.3),
    # Today's DECam run without the weight image (--weight is not there yet).
    'decam-noweight': (['--band', f'r={DATA / "decam-r-N6.fits"}',
                        '--psf', 'moffat:fwhm=1.05arcsec,beta=3'],
                       'r', DATA / 'decam-r-N6.fits', 1, 0.3),
}
DEFAULT_CASES = ('ctio', 'kids', 'decam')


def read_image(path, hdu):
    """One band of a frame, as psfdeconv reads it (no WCS required)."""
    from psfdeconv.io import read_exposure

    return read_exposure(path, hdu=hdu, require_wcs=False)


def run_case(name, out, *, reuse=False):
    """Run one case into ``out`` and compare with the Kron reference."""
    import numpy as np
    from astropy import units as u
    from astropy.table import QTable

    from psfdeconv.cli import main as cli_main
    from psfdeconv.evaluate import compare_with_kron, kron_reference

    arguments, band, image, hdu, min_usable_fraction = CASES[name]
    catalog_path = out / 'catalog.fits'
    start = time.perf_counter()
    if not (reuse and catalog_path.exists()):
        status = cli_main(['run', *arguments, '--out', str(out), '--overwrite'])
        if status:
            raise RuntimeError(f'psfdeconv run exited with status {status} '
                               f'(see the message above)')
    catalog = QTable.read(catalog_path)
    reference = kron_reference(read_image(image, hdu))
    result = compare_with_kron(catalog, reference, band=band,
                               min_usable_fraction=min_usable_fraction)
    # The same rule's median for flux_residual (the flux the residual corrects).
    matches = result['matches']
    residual = (np.asarray(u.Quantity(catalog[f'flux_residual_{band}']).value)
                [matches['catalog_index']] / np.asarray(matches['kron_flux']))
    usable = np.asarray(matches['usable'], bool)
    result['median_residual_ratio'] = (float(np.median(residual[usable])) if usable.any()
                                       else None)
    result['seconds'] = round(time.perf_counter() - start, 1)
    result['n_catalog'] = len(catalog)
    result['stellar_fwhm'] = reference.meta['stellar_fwhm']
    return result


def _format(value, spec):
    return 'n/a' if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case', action='append', choices=sorted(CASES),
                        help='run this case (repeatable; default: '
                             + ', '.join(DEFAULT_CASES) + ')')
    parser.add_argument('--out', help='keep the runs in OUT/<case>/ (default: a '
                                      'temporary directory)')
    parser.add_argument('--reuse', action='store_true',
                        help="compare an existing OUT/<case>/catalog.fits instead of "
                             "running again")
    parser.add_argument('--matches', action='store_true',
                        help='also print the matched rows of each case')
    parser.add_argument('--json', help='also write the numbers to this JSON file')
    args = parser.parse_args(argv)
    if args.reuse and not args.out:
        parser.error('--reuse needs --out (the directory of the earlier runs)')

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(
        prefix='psfdeconv-real-frames-'))
    results = {}
    for name in args.case or DEFAULT_CASES:
        try:
            results[name] = run_case(name, root / name, reuse=args.reuse)
        except SystemExit as error:  # argparse refuses an option it lacks
            results[name] = {'error': f'psfdeconv run exited with status {error.code} '
                                      f'(see the message above)'}
        except Exception as error:  # report and go on to the next case
            results[name] = {'error': f'{type(error).__name__}: {error}'}

    print('case            n_ref  matched  usable  usable_frac  median_ratio  '
          'off_2x  passes  median flux_residual / Kron')
    for name, result in results.items():
        if 'error' in result:
            print(f'{name:14s}  FAILED: {result["error"]}')
            continue
        print(f'{name:14s}  {result["n_reference"]:5d}  {result["n_matched"]:7d}  '
              f'{result["n_usable"]:6d}  {_format(result["usable_fraction"], "11.2f")}  '
              f'{_format(result["median_ratio"], "12.3f")}  '
              f'{_format(result["fraction_off_2x"], "6.2f")}  {str(result["passes"]):6s}  '
              f'{_format(result["median_residual_ratio"], ".3f")}')
    if args.matches:
        for name, result in results.items():
            if 'matches' in result:
                print(f'\n{name}:')
                result['matches'].pprint(max_lines=-1, max_width=-1)
    if args.json:
        serial = {name: {key: value for key, value in result.items() if key != 'matches'}
                  for name, result in results.items()}
        Path(args.json).write_text(json.dumps(serial, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
