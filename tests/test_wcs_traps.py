"""WCS traps of real exposures: INHERIT = T extensions, SIP distortion in the
stamps' WCS, partial band coverage and chip gaps (the "Hostile and unlucky
inputs" issue, WCS class). See docs/robustness.rst."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from psfdeconv.io.exposures import read_exposure

SEED = 20261205


def _tan_header(crpix=32.0, scale_arcsec=0.2):
    header = fits.Header()
    header['CTYPE1'], header['CTYPE2'] = 'RA---TAN', 'DEC--TAN'
    header['CRVAL1'], header['CRVAL2'] = 150.0, 2.0
    header['CRPIX1'], header['CRPIX2'] = crpix, crpix
    header['CD1_1'], header['CD1_2'] = -scale_arcsec / 3600, 0.0
    header['CD2_1'], header['CD2_2'] = 0.0, scale_arcsec / 3600
    return header


def test_inherit_merges_the_primary_header(tmp_path):
    """INHERIT = T: the WCS and BUNIT of the primary header apply to the
    extension's image; the extension's own keywords win."""
    rng = np.random.default_rng(SEED)
    primary = _tan_header()
    primary['BUNIT'] = 'adu'
    primary['GAIN'] = 4.0
    image = fits.ImageHDU(rng.normal(size=(64, 64)).astype(np.float32), name='SCI')
    image.header['INHERIT'] = True
    image.header['GAIN'] = 2.5
    path = tmp_path / 'inherit.fits'
    fits.HDUList([fits.PrimaryHDU(header=primary), image]).writeto(path)

    exposure = read_exposure(path)
    expected = WCS(_tan_header())
    assert exposure.wcs.has_celestial
    np.testing.assert_allclose(exposure.wcs.wcs.crval, expected.wcs.crval)
    np.testing.assert_allclose(exposure.wcs.wcs.cd, expected.wcs.cd)
    assert exposure.unit == 'adu'
    assert exposure.meta['GAIN'] == 2.5  # the extension wins
    assert exposure.meta['hdu'] == 1
    assert {'CTYPE1', 'CRVAL1', 'CD2_2', 'BUNIT'} <= set(
        exposure.meta['inherited_keywords'])
    assert 'GAIN' not in exposure.meta['inherited_keywords']
    assert 'BITPIX' not in exposure.meta['inherited_keywords']


def test_without_inherit_the_primary_header_is_ignored(tmp_path):
    """INHERIT absent or F: the extension's header alone (no WCS -> the usual
    error naming the fix)."""
    from psfdeconv.exceptions import InvalidInputError

    rng = np.random.default_rng(SEED)
    for inherit in (None, False):
        image = fits.ImageHDU(rng.normal(size=(32, 32)).astype(np.float32))
        if inherit is not None:
            image.header['INHERIT'] = inherit
        path = tmp_path / f'no-inherit-{inherit}.fits'
        fits.HDUList([fits.PrimaryHDU(header=_tan_header()), image]).writeto(path)
        with pytest.raises(InvalidInputError, match='no celestial WCS'):
            read_exposure(path)
        exposure = read_exposure(path, require_wcs=False)
        assert exposure.wcs is None
        assert exposure.meta['inherited_keywords'] == []
