# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of exposures without a celestial WCS (``pixel_scale=``) in psfdeconv.pipeline.

The tiny model's output is meaningless: these tests check that a run without a WCS is the
run with one, less the sky coordinates, and that what cannot work is refused clearly.
"""

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.exceptions import InvalidInputError, PixelScaleError, ShapeMismatchError
from psfdeconv.io import pixel_scale_of, read_catalog, read_stamps
from psfdeconv.pipeline import deconvolve_catalog, run_exposure_set
from psfdeconv.simulate import simulate_exposure

pytestmark = pytest.mark.filterwarnings(
    'ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')

KIDS = Path(__file__).parent / 'data' / 'kids-r-2600.fits'


def strip_wcs(exposure):
    return CCDData(exposure.data, unit=exposure.unit, mask=exposure.mask,
                   uncertainty=exposure.uncertainty, wcs=None,
                   meta={'SEEING': exposure.meta['SEEING']})


@pytest.fixture(scope='module')
def field():
    """Three bands on one pixel grid (no sub-pixel offsets), 4 galaxies, 10 stars."""
    return simulate_exposure((192, 192), n_galaxies=4, n_stars=10, seed=11,
                             wcs_offsets=False)


@pytest.fixture(scope='module')
def psfs(field):
    exposures, _ = field
    return {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in exposures}


@pytest.fixture(scope='module')
def scale(field):
    exposures, _ = field
    return pixel_scale_of(exposures['g'].wcs).to_value(u.arcsec / u.pix)


@pytest.fixture(scope='module')
def both_runs(field, psfs, scale, tiny_model):
    exposures, _ = field
    with_wcs = deconvolve_catalog(exposures, psfs=psfs, model=tiny_model)
    bare = {band: strip_wcs(exposure) for band, exposure in exposures.items()}
    without = deconvolve_catalog(bare, psfs=psfs, model=tiny_model, pixel_scale=scale)
    return with_wcs, without


def test_no_wcs_gives_the_same_catalogue(both_runs):
    (with_wcs, _), (without, _) = both_runs
    assert len(without) == len(with_wcs) >= 3
    assert 'sky_centroid' in with_wcs.colnames
    assert 'sky_centroid' not in without.colnames
    # No WCS, no sky frame: sky_centroid and the *_sky_<band> shapes are absent.
    assert without.colnames == [name for name in with_wcs.colnames
                                if name != 'sky_centroid' and '_sky_' not in name]
    assert 'no celestial WCS' in without.meta['shape_frame']['sky']
    for name in ('x', 'y', 'x_input', 'y_input'):
        assert_allclose(without[name], with_wcs[name], rtol=0, atol=1e-6 * u.pix)
    for band in 'gri':
        for name in ('flux', 'flux_err', 'flux_corrected'):
            column = f'{name}_{band}'
            assert without[column].unit == with_wcs[column].unit == u.adu
            assert_allclose(without[column], with_wcs[column], rtol=1e-6)
    assert_array_equal(without['flags'], with_wcs['flags'])


def test_no_wcs_meta(both_runs, scale):
    (with_wcs, _), (without, stamps) = both_runs
    assert with_wcs.meta['wcs'] is True
    assert with_wcs.meta['pixel_scale_source'] == 'wcs'
    assert without.meta['wcs'] is False
    assert without.meta['pixel_scale_source'] == 'argument'
    assert without.meta['pixel_scale'] == pytest.approx(scale)
    assert without.meta['reprojected'] == {'g': False, 'r': False, 'i': False}
    assert all(stamp.wcs is None for stamp in stamps)
    assert stamps[0].unit == u.adu


def test_no_wcs_outputs_round_trip(field, psfs, scale, tiny_model, tmp_path):
    exposures, truth = field
    bare = {band: strip_wcs(exposure) for band, exposure in exposures.items()}
    galaxies = truth[np.asarray(truth['kind']) == 'galaxy']
    positions = Table({'x': galaxies['x'], 'y': galaxies['y']})
    catalog, paths = run_exposure_set(bare, tmp_path / 'out', positions, psfs=psfs,
                                      model=tiny_model, pixel_scale=scale * u.arcsec / u.pix)
    assert len(catalog) == len(galaxies)
    again = read_catalog(paths['catalog'])
    assert 'sky_centroid' not in again.colnames
    assert again.meta['wcs'] is False and again.meta['pixel_scale_source'] == 'argument'
    assert_allclose(again['flux_r'], catalog['flux_r'])
    assert again['flux_r'].unit == u.adu
    stamps = read_stamps(paths['stamps'])
    assert len(stamps) == len(catalog)
    assert all(stamp.wcs is None for stamp in stamps)
    assert stamps[0].unit == u.adu and stamps[0].data.shape == (3, 64, 64)
    assert paths['g'].is_file()


def test_no_wcs_needs_pixel_scale(field, psfs, tiny_model):
    exposures, _ = field
    bare = {band: strip_wcs(exposure) for band, exposure in exposures.items()}
    with pytest.raises(InvalidInputError, match=r"no celestial WCS.*pixel_scale=.*"
                                                r"--pixel-scale ARCSEC"):
        deconvolve_catalog(bare, psfs=psfs, model=tiny_model)
    with pytest.raises(InvalidInputError, match='--pixel-scale ARCSEC'):
        run_exposure_set(bare, Path('unused'), psfs=psfs, model=tiny_model)


def test_no_wcs_shapes_must_agree(field, psfs, tiny_model):
    exposures, _ = field
    bare = {band: strip_wcs(exposure) for band, exposure in exposures.items()}
    bare['i'] = CCDData(bare['i'].data[:180, :], unit='adu', meta=bare['i'].meta)
    with pytest.raises(ShapeMismatchError, match=r"\(180, 192\).*reproject"):
        deconvolve_catalog(bare, psfs=psfs, model=tiny_model, pixel_scale=0.2)


def test_pixel_scale_must_agree_with_the_wcs(field, psfs, tiny_model):
    exposures, _ = field
    with pytest.raises(PixelScaleError, match=r"pixel_scale = 0.25.*band 'g'.*0.2000"):
        deconvolve_catalog(exposures, psfs=psfs, model=tiny_model, pixel_scale=0.25)
    # One band without a WCS: the others' WCSs must still agree.
    mixed = dict(exposures, i=strip_wcs(exposures['i']))
    with pytest.raises(PixelScaleError, match='percent apart'):
        deconvolve_catalog(mixed, psfs=psfs, model=tiny_model, pixel_scale=0.3)


def test_no_wcs_refuses_sky_positions(field, psfs, tiny_model):
    exposures, truth = field
    bare = {band: strip_wcs(exposure) for band, exposure in exposures.items()}
    sky = SkyCoord([150.0], [2.0], unit='deg')
    with pytest.raises(InvalidInputError, match='sky coordinates.*no celestial WCS'):
        deconvolve_catalog(bare, sky, psfs=psfs, model=tiny_model, pixel_scale=0.2)
    table = Table({'ra': [150.0], 'dec': [2.0]})
    with pytest.raises(InvalidInputError, match='sky coordinates'):
        deconvolve_catalog(bare, table, psfs=psfs, model=tiny_model, pixel_scale=0.2)


def test_one_band_without_wcs(field, psfs, scale, both_runs, tiny_model):
    """A band without a WCS among bands with one: all are used on one pixel grid."""
    exposures, _ = field
    (with_wcs, _), _ = both_runs
    mixed = dict(exposures, r=strip_wcs(exposures['r']))
    catalog, stamps = deconvolve_catalog(mixed, psfs=psfs, model=tiny_model,
                                         pixel_scale=scale)
    assert catalog.meta['wcs'] is False and 'sky_centroid' not in catalog.colnames
    assert_allclose(catalog['flux_i'], with_wcs['flux_i'], rtol=1e-6)
    assert stamps[0].wcs is None


def test_kids_frame_without_header(tiny_model, tmp_path):
    """A real KiDS r frame with no header keywords at all, 600x600 of it written to a FITS
    file as it comes (no WCS, no unit), read as each of three bands."""
    with fits.open(KIDS) as hdulist:
        data = np.array(hdulist[1].data[1000:1600, 1000:1600], dtype=np.float64)
    path = tmp_path / 'kids.fits'
    fits.PrimaryHDU(data).writeto(path)
    exposures = dict.fromkeys('gri', path)
    # The default PSF: an ePSF from the frame's own stars, in pixels.
    catalog, stamps = deconvolve_catalog(exposures, model=tiny_model, pixel_scale=0.2)
    assert catalog.meta['psf_source']['r'].startswith('epsf (')
    assert len(catalog) >= 5
    assert 'sky_centroid' not in catalog.colnames
    assert catalog.meta['wcs'] is False and catalog.meta['pixel_scale'] == 0.2
    assert catalog['flux_r'].unit == u.dimensionless_unscaled
    finite = np.isfinite(catalog['flux_r'].value)
    assert finite.mean() > 0.8
    assert stamps[0].wcs is None


def test_build_psfs_takes_the_pixel_scale(field):
    from psfdeconv.exceptions import ConfigError, InvalidPSFError
    from psfdeconv.psf import build_psfs

    exposures, _ = field
    bare = {'r': strip_wcs(exposures['r'])}
    spec = 'moffat:fwhm=1arcsec,beta=3'
    models, sources = build_psfs(bare, spec, pixel_scale=0.2)
    wide, _ = build_psfs(bare, spec, pixel_scale=0.1 * u.arcsec / u.pix)
    assert sources['r'] == spec
    assert models['r'].meta['fwhm_arcsec'] == 1.0
    # The same FWHM in arcsec is twice as many pixels at half the pixel scale.
    assert wide['r'].data.max() < models['r'].data.max()
    with pytest.raises((ConfigError, InvalidPSFError), match='pixel_scale'):
        build_psfs(bare, spec)
