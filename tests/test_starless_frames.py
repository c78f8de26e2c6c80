# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Frames without stars: a galaxy's compact bulge is not a star.

A frame holding one bulge + disc galaxy and no star: the image's own stellar locus is the
bulge, so detection without a known stellar FWHM drops the galaxy as a star, and a Moffat
fit to it is not a seeing PSF. With the PSF given, the pipeline identifies stars by its
FWHM and keeps the galaxy.
"""

import galsim
import numpy as np
import pytest
from astropy.nddata import NDData
from astropy.wcs import WCS

from psfdeconv.detection import detect_galaxies
from psfdeconv.exceptions import InvalidInputError, InvalidPSFError
from psfdeconv.pipeline import deconvolve_catalog
from psfdeconv.psf import (
    MIN_MOFFAT_BETA,
    find_stars,
    fit_moffat_psf,
    half_peak_fwhm,
    moffat_psf,
)

SCALE = 0.2
SEEING = 0.8


@pytest.fixture(scope='module')
def bulge_galaxy():
    """200x200 pixels at 0.2 arcsec: a disc of half-light radius 2 arcsec with
    a 0.15 arcsec de Vaucouleurs bulge (30 % of the light), Moffat seeing."""
    galaxy = galsim.Add(galsim.Exponential(half_light_radius=2.0, flux=0.7),
                        galsim.DeVaucouleurs(half_light_radius=0.15, flux=0.3))
    image = galsim.Convolve(galaxy, galsim.Moffat(beta=3.0, fwhm=SEEING)).drawImage(
        nx=200, ny=200, scale=SCALE).array * 1e4
    image += np.random.default_rng(1).normal(0.0, image.max() / 200, image.shape)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [100.5, 100.5]
    wcs.wcs.cdelt = [-SCALE / 3600, SCALE / 3600]
    return NDData(image.astype(np.float32), wcs=wcs)


def _stars_and_bulge_galaxy(frame):
    """The frame with 8 stars of the same seeing added in its corners."""
    image = np.array(frame.data, dtype=float)
    star = galsim.Moffat(beta=3.0, fwhm=SEEING, flux=3e3)
    for k, (x, y) in enumerate([(20, 20), (20, 180), (180, 20), (180, 180),
                                (20, 100), (180, 100), (100, 20), (100, 180)]):
        offset = galsim.PositionD(0.3 * (k % 3 - 1), 0.2 * (k % 2))
        stamp = star.drawImage(nx=21, ny=21, scale=SCALE, offset=offset).array
        image[y - 10:y + 11, x - 10:x + 11] += stamp
    return image


def test_half_peak_fwhm_of_a_moffat():
    # Pixel-integrated Moffat of 4 pixels FWHM: the area above half the peak
    # gives it within a pixel.
    fwhm = half_peak_fwhm(moffat_psf(SEEING, 3.0, pixel_scale=SCALE))
    assert abs(fwhm - SEEING / SCALE) < 0.5
    wide = half_peak_fwhm(moffat_psf(2 * SEEING, 3.0, pixel_scale=SCALE))
    assert abs(wide / fwhm - 2.0) < 0.15


def test_a_known_stellar_fwhm_keeps_the_bulge(bulge_galaxy):
    alone = detect_galaxies(bulge_galaxy)
    # The image's own locus is the bulge: the galaxy is taken for a star.
    assert len(alone) == 0 and alone.meta['n_stars'] == 1
    psf_fwhm = half_peak_fwhm(moffat_psf(SEEING, 3.0, pixel_scale=SCALE))
    known = detect_galaxies(bulge_galaxy, psf_fwhm=psf_fwhm)
    assert len(known) == 1 and known.meta['n_stars'] == 0
    assert known.meta['fwhm_locus'] == pytest.approx(psf_fwhm)
    # Where stars make a locus, it is theirs: a known FWHM does not replace it.
    stars = find_stars(NDData(_stars_and_bulge_galaxy(bulge_galaxy)), psf_fwhm=2 * psf_fwhm,
                       all_sources=True)
    assert stars.meta['fwhm_locus'] == pytest.approx(psf_fwhm, rel=0.2)
    assert np.hypot(known['x'][0].value - 99.5, known['y'][0].value - 99.5) < 2
    for bad in (0.0, -3.0, np.nan):
        with pytest.raises(InvalidInputError, match='psf_fwhm'):
            detect_galaxies(bulge_galaxy, psf_fwhm=bad)


def test_a_moffat_fit_to_a_bulge_is_refused(bulge_galaxy):
    with pytest.raises(InvalidPSFError, match='not stars'):
        fit_moffat_psf(bulge_galaxy, pixel_scale=SCALE)


@pytest.mark.parametrize('beta', [1.2, MIN_MOFFAT_BETA - 0.01])
def test_moffat_psf_refuses_betas_it_cannot_draw(beta):
    # GalSim would need a petabyte FFT for beta 1.2.
    with pytest.raises(InvalidPSFError, match=f'>= {MIN_MOFFAT_BETA}'):
        moffat_psf(SEEING, beta, pixel_scale=SCALE)


def test_the_pipeline_keeps_the_galaxy_with_a_given_psf(bulge_galaxy):
    catalog, _ = deconvolve_catalog({'r': bulge_galaxy}, None,
                                    f'moffat:fwhm={SEEING}arcsec,beta=3')
    assert len(catalog) == 1
    assert np.hypot(catalog['x'][0].value - 99.5, catalog['y'][0].value - 99.5) < 2
    # Without it, the frame has no stars to build a PSF from: a clear error.
    with pytest.raises(InvalidPSFError, match='not stars'):
        deconvolve_catalog({'r': bulge_galaxy})
