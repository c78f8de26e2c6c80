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


# --- SIP distortion kept in the stamps' WCS -----------------------------------------------

#: SIP coefficients: A_2_0 = B_0_2 = 1e-4 pixel^-1 shift a pixel 100 pixels from CRPIX by
#: 1 pixel (0.2 arcsec) -- far more than the 1e-3 arcsec the stamps' WCS must match.
SIP_A20 = SIP_B02 = 1e-4
SIP_A11 = 3e-5
SIP_B11 = -3e-5


def _with_sip(exposure):
    from astropy.nddata import CCDData
    from astropy.wcs import Sip

    wcs = exposure.wcs.deepcopy()
    wcs.wcs.ctype = ['RA---TAN-SIP', 'DEC--TAN-SIP']
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    a[2, 0], a[1, 1] = SIP_A20, SIP_A11
    b[0, 2], b[1, 1] = SIP_B02, SIP_B11
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return CCDData(np.array(exposure.data), unit=exposure.unit, wcs=wcs,
                   uncertainty=exposure.uncertainty, meta=dict(exposure.meta))


@pytest.fixture(scope='module')
def sip_field(simulated_field):
    exposures, truth = simulated_field
    galaxies = truth[np.asarray(truth['kind']) == 'galaxy']
    positions = np.stack([galaxies['x'].value, galaxies['y'].value], axis=1)
    psfs = {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in exposures}
    return {band: _with_sip(exposure) for band, exposure in exposures.items()}, positions, psfs


def _assert_stamp_wcs_matches(stamps, reference_wcs):
    """Every stamp pixel (j, i) is exposure pixel origin + (j, i) on the sky, to 1e-3
    arcsec, over the whole stamp (corners and centre)."""
    n_distorted = 0
    for stamp in stamps:
        size = stamp.data.shape[-1]
        ox, oy = stamp.meta['origin']
        j = np.array([0, size - 1, 0, size - 1, size // 2], dtype=float)
        i = np.array([0, 0, size - 1, size - 1, size // 2], dtype=float)
        on_stamp = stamp.wcs.pixel_to_world(j, i)
        on_exposure = reference_wcs.pixel_to_world(ox + j, oy + i)
        assert np.max(on_stamp.separation(on_exposure).arcsec) < 1e-3
        # The distortion is real here: the linear part alone is off by > 0.5 pixel.
        linear = reference_wcs.deepcopy()
        linear.sip = None
        offset = reference_wcs.pixel_to_world(ox + j, oy + i).separation(
            linear.pixel_to_world(ox + j, oy + i)).arcsec
        n_distorted += np.max(offset) > 0.5 * 0.2
    assert n_distorted > 0


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_sip_distortion_is_kept_in_the_stamps_wcs(sip_field, tiny_model, tmp_path):
    from psfdeconv.io import read_stamps, write_stamps
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, positions, psfs = sip_field
    reference_wcs = exposures['g'].wcs
    catalog, stamps = deconvolve_catalog(exposures, positions, psfs, model=tiny_model)
    assert all(stamp.wcs.sip is not None for stamp in stamps)
    _assert_stamp_wcs_matches(stamps, reference_wcs)
    write_stamps(stamps, tmp_path / 'stamps.fits')
    _assert_stamp_wcs_matches(read_stamps(tmp_path / 'stamps.fits'), reference_wcs)


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_sip_distortion_is_kept_by_run_exposure_set(sip_field, tiny_model, tmp_path):
    from psfdeconv.io import read_stamps
    from psfdeconv.pipeline import run_exposure_set

    exposures, positions, psfs = sip_field
    run_exposure_set(exposures, tmp_path / 'out', positions, psfs, model=tiny_model)
    stamps = read_stamps(tmp_path / 'out' / 'stamps.fits')
    assert len(stamps) == len(positions)
    _assert_stamp_wcs_matches(stamps, exposures['g'].wcs)
