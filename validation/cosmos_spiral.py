#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""A resolved spiral re-observed from the ground: what ``psfdeconv run`` makes of it.

The HST ACS F814W image of COSMOS 147246 (``hst-acs-cosmos-147246.fits`` of the shared real
data, 0.03 arcsec/pixel, neighbours replaced by noise) is drawn through a Moffat PSF onto a
ground-based grid (an exposure of ``--size`` pixels with a TAN WCS, the galaxy at its
centre), given white noise at a peak signal-to-noise ratio of ``--peak-snr`` per pixel,
written to FITS and run through ``psfdeconv run`` with the known PSF. Prints every
catalogue row within ``--radius`` arcsec of the galaxy (position, flags, usable, fluxes),
the sums of ``flux_corrected`` and ``flux_residual`` over those rows and over the usable
ones against the galaxy's true flux, and whether a row lies within 1 arcsec of its
centre::

    python validation/cosmos_spiral.py IMAGE [--pixel-scale 0.2] [--fwhm 0.8] [--size 300]
        [--peak-snr 100] [--seed 1] [--radius 8]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np


def reobserve(image_path, *, pixel_scale, fwhm, size, peak_snr, seed):
    """The ground-based exposure (float32), its WCS header and the true flux."""
    import galsim
    from astropy.io import fits
    from astropy.wcs import WCS

    hst = fits.getdata(image_path).astype(float)
    galaxy = galsim.InterpolatedImage(galsim.Image(hst, scale=0.03), x_interpolant='lanczos5')
    psf = galsim.Moffat(beta=3.0, fwhm=fwhm)
    observed = galsim.Convolve(galaxy, psf).drawImage(nx=size, ny=size,
                                                      scale=pixel_scale).array
    sigma = observed.max() / peak_snr
    observed = observed + np.random.default_rng(seed).normal(0.0, sigma, observed.shape)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [150.416558, 1.998697]
    wcs.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    wcs.wcs.cdelt = [-pixel_scale / 3600, pixel_scale / 3600]
    header = wcs.to_header()
    header['BUNIT'] = 'adu'
    return observed.astype(np.float32), header, float(hst.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image', help='hst-acs-cosmos-147246.fits')
    parser.add_argument('--pixel-scale', type=float, default=0.2)
    parser.add_argument('--fwhm', type=float, default=0.8, help='Moffat FWHM, arcsec')
    parser.add_argument('--size', type=int, default=300)
    parser.add_argument('--peak-snr', type=float, default=100.0)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--radius', type=float, default=8.0,
                        help='rows within this many arcsec of the galaxy are listed')
    args = parser.parse_args(argv)

    from astropy import units as u
    from astropy.io import fits

    from psfdeconv.cli import main as cli_main
    from psfdeconv.io import read_catalog

    data, header, true_flux = reobserve(args.image, pixel_scale=args.pixel_scale,
                                        fwhm=args.fwhm, size=args.size,
                                        peak_snr=args.peak_snr, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix='psfdeconv-spiral-'))
    fits.PrimaryHDU(data, header=header).writeto(work / 'r.fits')
    status = cli_main(['run', '--band', f'r={work / "r.fits"}', '--psf',
                       f'moffat:fwhm={args.fwhm}arcsec,beta=3', '--out', str(work / 'run')])
    if status:
        raise SystemExit(status)
    catalog = read_catalog(work / 'run' / 'catalog.fits')
    centre = (args.size - 1) / 2
    distance = np.hypot(catalog['x'].value - centre,
                        catalog['y'].value - centre) * args.pixel_scale
    rows = catalog[distance <= args.radius]
    rows['distance'] = distance[distance <= args.radius] * u.arcsec
    rows.sort('distance')
    print(f'true flux {true_flux:.2f}; {len(rows)} rows within {args.radius:g} arcsec of '
          f'the galaxy ({int(np.sum(rows["usable"]))} usable); flag bits '
          f'{catalog.meta["flag_bits"]}')
    rows[['id', 'distance', 'flags', 'usable', 'flux_corrected_r',
          'flux_residual_r']].pprint(max_lines=-1, max_width=-1)
    for name in ('flux_corrected_r', 'flux_residual_r'):
        values = np.asarray(u.Quantity(rows[name]).value)
        usable = np.asarray(rows['usable'], bool)
        print(f'{name}: sum of the rows / true {values.sum() / true_flux:.3f}, of the '
              f'usable rows {values[usable].sum() / true_flux:.3f}')
    print(f'a row within 1 arcsec of the centre: {bool(np.any(rows["distance"] < 1 * u.arcsec))}')


if __name__ == '__main__':
    main()
