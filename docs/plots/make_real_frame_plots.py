#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Regenerate the DECam figures and catalogue listing of docs/tutorial_exposures.rst.

Runs the tutorial's command on the DECam r-band frame of the tests (about 10 s on two
CPU cores), copies its ``catalog_overview.png`` and ``stamps.png`` to
``docs/plots/decam_catalog_overview.png`` and ``docs/plots/decam_stamps.png`` and prints
the catalogue's rows as the tutorial shows them (id, x, y, flag names, usable,
flux_corrected_r).

    python docs/plots/make_real_frame_plots.py
"""

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / 'tests' / 'data'
PLOTS = REPO / 'docs' / 'plots'


def main():
    from psfdeconv.cli import main as cli_main
    from psfdeconv.flags import flag_names
    from psfdeconv.io import read_catalog

    out = Path(tempfile.mkdtemp(prefix='psfdeconv-decam-')) / 'decam'
    status = cli_main(['run', '--band', f'r={DATA / "decam-r-N6.fits"}[1]',
                       '--weight', f'r={DATA / "decam-r-N6-weight.fits"}[1]',
                       '--psf', 'moffat:fwhm=1.05arcsec,beta=3',
                       '--out', str(out), '--plots', '-q'])
    if status:
        return status
    for name in ('catalog_overview', 'stamps'):
        shutil.copyfile(out / f'{name}.png', PLOTS / f'decam_{name}.png')
    catalog = read_catalog(out / 'catalog.fits')
    print(f'{"id":>3}  {"x":>6}  {"y":>6}  {"flags":44}  {"usable":6}  '
          f'{"flux_corrected_r":>16}')
    for row in catalog:
        names = ' '.join(flag_names(row['flags'])) or '-'
        print(f'{row["id"]:3d}  {row["x"].value:6.1f}  {row["y"].value:6.1f}  {names:44}  '
              f'{str(bool(row["usable"])):6}  {row["flux_corrected_r"].value:16.0f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
