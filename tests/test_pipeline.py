# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.pipeline on simulated exposures with the tiny model.

The tiny model's output is meaningless (two epochs of a toy network): these tests check the
plumbing -- rows, shapes, units, flags, WCS round trips, files -- not the deconvolution.
"""

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import QTable, Table
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.detection import detect_galaxies
from psfdeconv.exceptions import (
    BandCountError,
    ConfigError,
    InvalidInputError,
    InvalidPSFError,
    ModelFileError,
    OutputExistsError,
    ShapeMismatchError,
)
from psfdeconv.flags import (
    FLAG_CENTROID_FALLBACK,
    FLAG_EDGE,
    FLAG_HSM_FAILED,
    FLAG_MASKED,
    FLAG_NEIGHBOURS,
    FLAG_OFF_IMAGE,
    FLAG_OUTSIDE_TRAINING,
)
from psfdeconv.io import read_catalog, read_stamps, write_catalog, write_stamps
from psfdeconv.pipeline import deconvolve_catalog
from psfdeconv.psf import build_psfs
from psfdeconv.simulate import simulate_exposure

BANDS = ['g', 'r', 'i']

# The tiny model of these tests was trained on the default simulations (Moffat FWHM 0.3-0.8
# arcsec) and the fields here have 0.75-0.9 arcsec seeing: the outside-training warning is
# expected (it is tested in test_exposure_accuracy.py).
pytestmark = pytest.mark.filterwarnings(
    'ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')


@pytest.fixture(scope='module')
def field(simulated_field):
    """8 galaxies and 25 stars on 256x256 pixels in g, r, i; the r and i pixel grids are
    offset from g's by sub-pixel amounts (the session's `simulated_field`, conftest.py)."""
    return simulated_field


@pytest.fixture(scope='module')
def moffat_psfs(field):
    """The true PSFs as --psf strings (fast; the ePSF path is tested separately)."""
    exposures, _ = field
    return {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in exposures}


@pytest.fixture(scope='module')
def detected(field, moffat_psfs, tiny_model):
    exposures, _ = field
    return deconvolve_catalog(exposures, psfs=moffat_psfs, model=tiny_model)


def galaxies_of(truth):
    return truth[np.asarray(truth['kind']) == 'galaxy']


def test_detection_finds_the_galaxies_not_the_stars(field):
    exposures, truth = field
    found = detect_galaxies(exposures['g'])
    assert found.meta['n_stars'] == 25
    x, y = truth['x'].value, truth['y'].value
    distance = np.hypot(found['x'].value[:, None] - x, found['y'].value[:, None] - y)
    nearest = distance.argmin(axis=1)
    matched = distance.min(axis=1) < 1.5
    # Every galaxy is found, no star is; extra detections are star-forming knots
    # that the deblending splits off their galaxy (the pipeline flags them BLENDED).
    assert set(nearest[matched]) == set(range(8))
    assert len(found) <= 8 + 4
    assert isinstance(found['sky_centroid'], SkyCoord)


def test_catalog_columns_units_and_meta(detected, field, tiny_model):
    catalog, stamps = detected
    exposures, truth = field
    assert len(catalog) == len(stamps) >= 8
    assert isinstance(catalog['sky_centroid'], SkyCoord)
    for name in ('x', 'y', 'x_input', 'y_input'):
        assert catalog[name].unit == u.pix
    assert catalog['flags'].dtype == np.int32
    for band in BANDS:
        for name in ('flux', 'flux_err', 'flux_corrected', 'flux_residual',
                     'flux_residual_err', 'noise_sigma'):
            assert catalog[f'{name}_{band}'].unit == u.adu
        for name in ('size', 'hsm_sigma'):
            assert catalog[f'{name}_{band}'].unit == u.arcsec
        for name in ('e1', 'e2', 'e', 'hsm_e1', 'hsm_e2', 'snr'):
            assert not hasattr(catalog[f'{name}_{band}'], 'unit') or \
                catalog[f'{name}_{band}'].unit in (None, u.dimensionless_unscaled)
        assert catalog[f'hsm_status_{band}'].dtype == np.int32
        assert_allclose(catalog[f'snr_{band}'],
                        catalog[f'flux_{band}'] / catalog[f'flux_err_{band}'])
        # The sky noise of the simulation (sigma 1) comes from the uncertainty; the
        # reprojected bands' is resampled (a little lower, approximate).
        assert_allclose(catalog[f'noise_sigma_{band}'].value, 1.0, rtol=0.1)
    for name in catalog.colnames:
        assert catalog[name].info.description, name
    meta = catalog.meta
    assert meta['bands'] == BANDS and meta['reference_band'] == 'g'
    assert meta['psf_source']['r'].startswith('moffat:fwhm=0.8arcsec,beta=3.5')
    assert meta['model']['weights_sha256'] == tiny_model.sha256
    assert meta['positions'] == 'detected'
    assert meta['reprojected'] == {'g': False, 'r': True, 'i': True}
    assert meta['stamp_size'] == 64 and meta['psf_size'] == 41
    assert meta['pixel_scale'] == pytest.approx(0.2)
    assert meta['inputs'] == {'g': None, 'r': None, 'i': None}
    assert meta['flag_bits']['HSM_FAILED'] == FLAG_HSM_FAILED
    # The detected positions are the galaxies of the truth.
    galaxies = galaxies_of(truth)
    distance = np.hypot(catalog['x_input'].value[:, None] - galaxies['x'].value,
                        catalog['y_input'].value[:, None] - galaxies['y'].value)
    assert np.all(distance.min(axis=0) < 1.5)


def test_sky_centroid_maps_back_to_x_y(detected, field):
    catalog, _ = detected
    exposures, _ = field
    x, y = exposures['g'].wcs.world_to_pixel(catalog['sky_centroid'])
    assert_allclose(x, catalog['x'].value, atol=0.1)
    assert_allclose(y, catalog['y'].value, atol=0.1)
    ok = (catalog['flags'] & FLAG_CENTROID_FALLBACK) == 0
    assert ok.all()
    # The measured centroid stays on the stamp around the input position.
    assert np.all(np.abs(catalog['x'] - catalog['x_input']) < 32 * u.pix)


def test_stamps_hold_the_deconvolved_images(detected, field):
    catalog, stamps = detected
    exposures, _ = field
    for row, stamp in zip(catalog, stamps, strict=True):
        assert stamp.data.shape == (3, 64, 64) and stamp.mask.shape == (3, 64, 64)
        assert stamp.unit == u.adu
        assert stamp.meta['id'] == row['id'] and stamp.meta['bands'] == BANDS
        assert stamp.meta['flags'] == row['flags']
        # The image sums are the fluxes.
        assert_allclose(stamp.data.sum(axis=(1, 2)),
                        [row[f'flux_{band}'].value for band in BANDS], rtol=1e-5)
        # The stamp WCS is the exposure's, shifted to the stamp origin.
        origin = stamp.meta['origin']
        sky = stamp.wcs.pixel_to_world(32, 32)
        ex, ey = exposures['g'].wcs.world_to_pixel(sky)
        assert_allclose([ex, ey], [origin[0] + 32, origin[1] + 32], atol=1e-6)


def test_positions_from_skycoord_table_and_pixels_agree(field, moffat_psfs, tiny_model):
    exposures, truth = field
    galaxies = galaxies_of(truth)[:4]
    sky = SkyCoord(galaxies['ra'], galaxies['dec'])
    from_sky, _ = deconvolve_catalog(exposures, sky, moffat_psfs, model=tiny_model)
    from_xy, _ = deconvolve_catalog(exposures, QTable(galaxies['x', 'y']), moffat_psfs,
                                    model=tiny_model)
    plain = Table({'id': [10, 11, 12, 13], 'ra': galaxies['ra'].value,
                   'dec': galaxies['dec'].value})
    from_radec, _ = deconvolve_catalog(exposures, plain, moffat_psfs, model=tiny_model)
    array = np.column_stack([galaxies['x'].value, galaxies['y'].value])
    from_array, _ = deconvolve_catalog(exposures, array, moffat_psfs, model=tiny_model)
    assert from_sky.meta['positions'] == 'SkyCoord'
    assert from_xy.meta['positions'].startswith('table columns x, y')
    assert from_radec.meta['positions'] == 'table columns ra, dec'
    assert_array_equal(from_sky['id'], [0, 1, 2, 3])
    assert_array_equal(from_radec['id'], [10, 11, 12, 13])
    for other in (from_xy, from_radec, from_array):
        assert_allclose(other['x_input'], from_sky['x_input'], atol=1e-6)
        for name in ('x', 'y', 'flux_g', 'flux_i', 'e1_r', 'size_i'):
            assert_allclose(other[name], from_sky[name], rtol=1e-6, atol=1e-9)
    # Only OUTSIDE_TRAINING (the tiny model's FWHM range, see pytestmark) and
    # NEIGHBOURS (informational) may be set.
    assert_array_equal(from_sky['flags'] & ~(FLAG_OUTSIDE_TRAINING | FLAG_NEIGHBOURS), 0)


def test_edge_and_off_image_sources_are_kept_and_flagged(field, moffat_psfs, tiny_model):
    exposures, truth = field
    galaxy = galaxies_of(truth)[0]
    positions = [(galaxy['x'].value, galaxy['y'].value), (3.2, 120.7), (-100.0, 50.0)]
    catalog, stamps = deconvolve_catalog(exposures, positions, moffat_psfs,
                                         model=tiny_model)
    assert len(catalog) == 3
    assert catalog['flags'][0] & (FLAG_EDGE | FLAG_OFF_IMAGE) == 0
    assert catalog['flags'][1] & FLAG_EDGE and not catalog['flags'][1] & FLAG_OFF_IMAGE
    assert stamps[1].mask[:, :, :28].all() and not stamps[1].mask[:, :, 40:].any()
    assert np.isfinite(catalog['flux_r'][1])
    assert catalog['flags'][2] & FLAG_OFF_IMAGE and catalog['flags'][2] & FLAG_EDGE
    assert stamps[2].mask.all()
    for band in BANDS:
        assert np.isnan(catalog[f'flux_{band}'][2]) and np.isnan(catalog[f'e1_{band}'][2])


def test_masked_pixels_are_zero_filled_and_flagged(field, moffat_psfs, tiny_model):
    exposures, truth = field
    galaxy = galaxies_of(truth)[1]
    x, y = int(round(galaxy['x'].value)), int(round(galaxy['y'].value))
    masked = dict(exposures)
    r = exposures['r']
    mask = np.zeros(r.shape, dtype=bool)
    mask[y + 5:y + 9, x - 20:x + 20] = True
    data = r.data.copy()
    data[mask] = np.nan  # NaN must never reach the network
    masked['r'] = CCDData(data, unit=r.unit, wcs=r.wcs, mask=mask,
                          uncertainty=r.uncertainty, meta=r.meta)
    catalog, stamps = deconvolve_catalog(masked, [(galaxy['x'].value, galaxy['y'].value)],
                                         moffat_psfs, model=tiny_model)
    assert catalog['flags'][0] & FLAG_MASKED
    assert stamps[0].mask[1].any() and not stamps[0].mask[0].any()
    assert np.isfinite(catalog['flux_r'][0]) and np.all(np.isfinite(stamps[0].data))


def test_single_band_grid_and_pixel_positions_without_alignment(tiny_model):
    exposures, truth = simulate_exposure((160, 160), n_galaxies=2, n_stars=3,
                                         wcs_offsets=False, seed=8)
    catalog, _ = deconvolve_catalog(exposures, truth[:2], 'moffat:fwhm=0.8arcsec,beta=3.5',
                                    model=tiny_model, reference_band='r')
    assert catalog.meta['reprojected'] == {'g': False, 'r': False, 'i': False}
    assert catalog.meta['reference_band'] == 'r'
    # The truth table's SkyCoord-free ra/dec columns were used.
    assert catalog.meta['positions'] == 'table columns ra, dec'
    assert_allclose(catalog['x_input'], truth['x_r'][:2], atol=1e-6)


def test_epsf_psfs_from_the_stars(field, tiny_model):
    exposures, truth = field
    positions = SkyCoord(truth['ra'][:2], truth['dec'][:2])
    catalog, _ = deconvolve_catalog(exposures, positions, model=tiny_model,
                                    epsf_options={'oversampling': 1, 'maxiters': 3})
    for band in BANDS:
        assert catalog.meta['psf_source'][band].startswith('epsf (')
    # Too few stars for an ePSF: a Moffat fitted to them, and the source says so.
    sparse, _ = simulate_exposure((128, 128), n_galaxies=1, n_stars=2, seed=1)
    catalog, _ = deconvolve_catalog(sparse, [(64, 64)], model=tiny_model)
    assert catalog.meta['psf_source']['g'].startswith('moffat fit (')
    assert 'too few for an ePSF' in catalog.meta['psf_source']['g']


def test_gridded_psf_flags_sources_outside_its_grid(field, tiny_model):
    """A GriddedPSFModel is rendered per source (and resampled for the reprojected
    bands); sources beyond its grid points are flagged FLAG_PSF_EXTRAPOLATED."""
    from astropy.nddata import NDData
    from photutils.psf import GriddedPSFModel

    from psfdeconv.flags import FLAG_PSF_EXTRAPOLATED
    from psfdeconv.psf import moffat_psf

    exposures, _ = field
    data = moffat_psf(0.8, 3.5, pixel_scale=0.2).data
    grid = [(64.0, 64.0), (192.0, 64.0), (64.0, 192.0), (192.0, 192.0)]
    gridded = GriddedPSFModel(NDData(np.stack([data] * 4),
                                     meta={'grid_xypos': grid, 'oversampling': 2}))
    catalog, _ = deconvolve_catalog(exposures, [(128.0, 128.0), (40.0, 128.0)], gridded,
                                    model=tiny_model, subtract_background=False)
    assert catalog['flags'][0] & FLAG_PSF_EXTRAPOLATED == 0
    assert catalog['flags'][1] & FLAG_PSF_EXTRAPOLATED
    assert catalog.meta['psf_source'] == dict.fromkeys(BANDS, 'gridded (4 PSFs)')
    assert catalog.meta['background_subtracted'] is False
    assert np.all(np.isfinite(catalog['flux_i']))


def test_build_psfs_forms(field):
    exposures, _ = field
    yy, xx = np.mgrid[-10:11, -10:11]
    array = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
    models, sources = build_psfs(exposures, {'g': array, 'r': 'moffat:fwhm=4pix,beta=3',
                                             'i': 'epsf'},
                                 epsf_options={'oversampling': 1, 'maxiters': 2})
    assert sources['g'] == 'array (21, 21)'
    assert sources['r'] == 'moffat:fwhm=4pix,beta=3'
    assert models['r'].meta['fwhm_arcsec'] == pytest.approx(0.8)
    assert sources['i'].startswith('epsf (')
    with pytest.raises(InvalidInputError, match=r"psfs has entries for \['g'\] but the "
                                                r"bands are \['g', 'r', 'i'\]"):
        build_psfs(exposures, {'g': array})


def test_errors(field, moffat_psfs, tiny_model, tmp_path):
    exposures, _ = field
    two = {'g': exposures['g'], 'r': exposures['r']}
    with pytest.raises(BandCountError, match=r'the data have 2 band\(s\) but the model'):
        deconvolve_catalog(two, model=tiny_model)
    with pytest.raises(InvalidInputError, match=r"neighbours = 'drop'; give one of"):
        deconvolve_catalog(exposures, None, moffat_psfs, model=tiny_model, neighbours='drop')
    with pytest.raises(ConfigError, match=r'symmetries must be one of \(1, 2, 4, 8\), got 3'):
        deconvolve_catalog(exposures, None, moffat_psfs, model=tiny_model, symmetries=3)
    with pytest.raises(InvalidInputError, match=r"reference_band = 'z' is not one of"):
        deconvolve_catalog(exposures, model=tiny_model, reference_band='z')
    with pytest.raises(ShapeMismatchError, match='size = 32, but the model was trained'):
        deconvolve_catalog(exposures, model=tiny_model, size=32)
    with pytest.raises(InvalidPSFError, match='psf_size = 40'):
        deconvolve_catalog(exposures, model=tiny_model, psf_size=40)
    with pytest.raises(InvalidInputError, match='positions of type str cannot be read'):
        deconvolve_catalog(exposures, 'here', moffat_psfs, model=tiny_model)
    with pytest.raises(InvalidInputError, match=r"the positions table has columns \['a'\]"):
        deconvolve_catalog(exposures, Table({'a': [1]}), moffat_psfs, model=tiny_model)
    with pytest.raises(InvalidInputError, match='all 1 position'):
        deconvolve_catalog(exposures, [(1000.0, 1000.0)], moffat_psfs, model=tiny_model)
    with pytest.raises(InvalidInputError, match='must be distinct identifiers'):
        deconvolve_catalog({'g-1': exposures['g']}, model=tiny_model)
    with pytest.raises(InvalidInputError, match='non-empty mapping'):
        deconvolve_catalog([exposures['g']], model=tiny_model)
    with pytest.raises(ModelFileError, match='does not exist'):
        deconvolve_catalog(exposures, model=tmp_path / 'none.keras')
    with pytest.raises(ModelFileError, match='give a DeconvolutionModel'):
        deconvolve_catalog(exposures, model=3)


def test_files_from_paths_and_round_trips(field, moffat_psfs, tiny_model, tmp_path):
    from psfdeconv.simulate import write_exposure_set

    exposures, truth = field
    paths = write_exposure_set(tmp_path / 'set', exposures, truth)
    galaxies = galaxies_of(truth)[:3]
    catalog, stamps = deconvolve_catalog({band: paths[band] for band in BANDS},
                                         SkyCoord(galaxies['ra'], galaxies['dec']),
                                         moffat_psfs, model=tiny_model)
    assert catalog.meta['inputs']['r'] == str(paths['r'])
    # No uncertainty is read from the files: the refit residuals give the noise.
    assert set(catalog.meta['noise_source'].values()) == {'refit residuals (1.4826 MAD)'}

    path = write_catalog(catalog, tmp_path / 'out' / 'catalog.fits')
    again = read_catalog(path)
    assert again.colnames == catalog.colnames
    assert isinstance(again['sky_centroid'], SkyCoord)
    assert_allclose(again['sky_centroid'].ra.deg, catalog['sky_centroid'].ra.deg)
    for name in ('flux_g', 'size_r', 'x', 'hsm_sigma_i'):
        assert again[name].unit == catalog[name].unit
        assert_allclose(again[name], catalog[name])
    assert again['flux_g'].info.description == catalog['flux_g'].info.description
    assert again.meta == catalog.meta
    header = fits.getheader(path, 1)
    assert header['BANDS'] == 'g,r,i' and header['MODELSHA'] == tiny_model.sha256
    # Plain astropy reads it with units and the SkyCoord too.
    plain = QTable.read(path)
    assert isinstance(plain['sky_centroid'], SkyCoord) and plain['flux_r'].unit == u.adu
    with pytest.raises(OutputExistsError, match='catalog.fits exists'):
        write_catalog(catalog, path)
    write_catalog(catalog, path, overwrite=True)

    stamp_path = write_stamps(stamps, tmp_path / 'out' / 'stamps.fits')
    back = read_stamps(stamp_path)
    assert len(back) == 3
    for original, copy in zip(stamps, back, strict=True):
        assert_allclose(copy.data, original.data, rtol=1e-6)  # float32 on disk
        assert_array_equal(copy.mask, original.mask)
        assert copy.unit == u.adu and copy.meta['id'] == original.meta['id']
        assert copy.meta['origin'] == original.meta['origin']
        assert_allclose(copy.wcs.wcs.crpix, original.wcs.wcs.crpix)
    with fits.open(stamp_path) as hdulist:
        assert [hdu.name for hdu in hdulist] == ['PRIMARY'] + ['STAMP'] * 3 + ['MASKS',
                                                                               'INDEX']
        assert_array_equal(hdulist['INDEX'].data['id'], catalog['id'])
    with pytest.raises(OutputExistsError, match='stamps.fits exists'):
        write_stamps(stamps, stamp_path)
    with pytest.raises(InvalidInputError, match='no stamps to write'):
        write_stamps([], tmp_path / 'empty.fits', overwrite=True)


def test_undetected_sources_are_flagged_with_empty_stamps(field, moffat_psfs, tiny_model):
    from psfdeconv.deconvolve import detection_snr
    from psfdeconv.flags import FLAG_UNDETECTED
    from psfdeconv.model import DeconvolutionModel

    exposures, truth = field
    galaxies = galaxies_of(truth)[:3]
    # Three galaxies and an empty sky position; a gate between the second and third
    # smallest detection SNRs empties exactly the two stamps below it.
    positions = np.column_stack([np.append(galaxies['x'].value, 128.0),
                                 np.append(galaxies['y'].value, 3.0)])
    catalog, _ = deconvolve_catalog(exposures, positions, moffat_psfs, model=tiny_model)
    flux = np.column_stack([catalog[f'flux_{b}'].value for b in BANDS])
    flux_err = np.column_stack([catalog[f'flux_err_{b}'].value for b in BANDS])
    snr = detection_snr(flux, flux_err)
    threshold = float(np.mean(np.sort(snr)[1:3]))
    card = dict(tiny_model.card, detection={'snr_threshold': threshold})
    gated = DeconvolutionModel(tiny_model.keras_model, card, path=tiny_model.path)
    catalog, stamps = deconvolve_catalog(exposures, positions, moffat_psfs, model=gated)
    undetected = (np.asarray(catalog['flags']) & FLAG_UNDETECTED) != 0
    assert_array_equal(undetected, snr < threshold)
    assert undetected.sum() == 2
    for k in np.flatnonzero(undetected):
        assert (stamps[k].data == 0).all()
        assert np.isfinite(catalog['flux_r'][k])
    for k in np.flatnonzero(~undetected):
        assert (stamps[k].data != 0).any()
