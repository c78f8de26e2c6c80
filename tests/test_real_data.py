# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""``psfdeconv run`` end to end on a real exposure: a DECam r-band CCD cutout (see
tests/data/README.md) with a tile-compressed image HDU and a TPV WCS."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from psfdeconv.cli import main
from psfdeconv.io import read_catalog, read_exposure, read_stamps

DECAM = Path(__file__).parent / 'data' / 'decam-r-N6.fits'
#: The header's seeing (FWHM 4.02 pixels of 0.262 arcsec).
DECAM_PSF = 'moffat:fwhm=1.05arcsec,beta=3'


@pytest.fixture(scope='module')
def decam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('decam')
    # Real headers carry non-standard cards, and the shipped model may not cover this
    # pixel scale: the warnings are recorded, not errors.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        assert main(['run', '--band', f'r={DECAM}', '--psf', DECAM_PSF, '--out',
                     str(out)]) == 0
    return out, [str(w.message) for w in record]


def test_decam_catalog_positions_agree_with_the_wcs(decam_run):
    out, _ = decam_run
    catalog = read_catalog(out / 'catalog.fits')
    exposure = read_exposure(DECAM)
    assert len(catalog) >= 5
    # Each sky_centroid maps back to its pixel position through the exposure's WCS.
    x, y = exposure.wcs.world_to_pixel(catalog['sky_centroid'])
    assert np.max(np.hypot(x - catalog['x'].value, y - catalog['y'].value)) < 0.1
    # And lies on the exposure, near its detection.
    assert np.all((x > -0.5) & (x < exposure.shape[1]) & (y > -0.5) & (y < exposure.shape[0]))
    assert np.median(np.hypot(x - catalog['x_input'].value, y - catalog['y_input'].value)) < 2
    # Fluxes are finite and mostly positive: these are real sources.
    flux = catalog['flux_corrected_r'].value
    assert np.isfinite(flux).all() and np.mean(flux > 0) > 0.8


def test_decam_stamps_carry_the_exposure_wcs(decam_run):
    out, _ = decam_run
    catalog = read_catalog(out / 'catalog.fits')
    stamps = read_stamps(out / 'stamps.fits')
    exposure = read_exposure(DECAM)
    assert len(stamps) == len(catalog)
    for stamp in stamps:
        assert stamp.data.shape == (1, 64, 64)
        # Stamp pixel (0, 0) is exposure pixel `origin` (of the exposure
        # block-summed by `block_factor` for a galaxy larger than a stamp), on
        # the sky as well.
        origin, factor = np.asarray(stamp.meta['origin']), stamp.meta['block_factor']
        sky = stamp.wcs.pixel_to_world(0, 0)
        x, y = exposure.wcs.world_to_pixel(sky)
        x_native, y_native = factor * (origin + 0.5) - 0.5
        assert abs(x - x_native) < 1e-3 and abs(y - y_native) < 1e-3
