"""WCS traps of real exposures: INHERIT = T extensions, SIP distortion in the
stamps' WCS, partial band coverage and chip gaps (the "Hostile and unlucky
inputs" issue, WCS class). See docs/robustness.rst."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from psfdeconv.exceptions import PSFDeconvWarning
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


# --- Partial coverage and chip gaps -------------------------------------------------------

@pytest.fixture(scope='module')
def field_positions_psfs(simulated_field):
    exposures, truth = simulated_field
    galaxies = truth[np.asarray(truth['kind']) == 'galaxy']
    positions = np.stack([galaxies['x'].value, galaxies['y'].value], axis=1)
    psfs = {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in exposures}
    return exposures, positions, psfs


def test_align_bands_masks_pixels_outside_a_bands_footprint(simulated_field):
    from psfdeconv.cutouts import align_bands

    exposures, _ = simulated_field
    half = dict(exposures, r=exposures['r'][:, :128])  # r covers columns < 128 only
    aligned, _ = align_bands(half, reference='g')
    mask, data = aligned['r'].mask, aligned['r'].data
    assert mask.shape == exposures['g'].shape
    assert mask[:, 130:].all() and np.isnan(data[:, 130:]).all()
    assert not mask[2:-2, 2:125].any()  # (the edge rows: r is offset by a fraction of a pixel)


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_partial_band_coverage_masks_flags_and_nans(field_positions_psfs, tiny_model):
    from psfdeconv.flags import FLAG_MASKED
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, positions, psfs = field_positions_psfs
    full, _ = deconvolve_catalog(exposures, positions, psfs, model=tiny_model)
    half = dict(exposures, r=exposures['r'][:, :128])
    catalog, stamps = deconvolve_catalog(half, positions, psfs, model=tiny_model)
    size = stamps[0].data.shape[-1]
    x = positions[:, 0]
    inside = x + size / 2 < 127          # the whole stamp inside r's footprint
    beyond = x > 128 + 2                 # the centre beyond it: the stamp mostly outside
    touching = ~inside & ~beyond
    assert inside.any() and beyond.any() and touching.any()
    flags = np.asarray(catalog['flags'])
    flux_r = np.asarray(catalog['flux_r'].value)
    assert np.all(flags[beyond | touching] & FLAG_MASKED)
    assert np.isnan(flux_r[beyond]).all()
    assert np.isfinite(flux_r[~beyond]).all()
    # Whole stamps inside r's footprint are measured as on the full field, to the 1 %
    # that the background and noise estimates of half an image change.
    assert not np.any(flags[inside] & FLAG_MASKED)
    np.testing.assert_allclose(flux_r[inside], full['flux_r'].value[inside], rtol=0.02)
    for band in ('g', 'i'):
        assert np.isfinite(catalog[f'flux_{band}'].value).all()
    for k in np.flatnonzero(beyond):
        r_mask = stamps[k].mask[1]
        ox = stamps[k].meta['origin'][0]
        assert r_mask[:, max(130 - ox, 0):].all()


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_chip_gap_of_zero_weight_is_masked_and_flagged(field_positions_psfs, tiny_model,
                                                       tmp_path):
    """A chip gap written as data 0 and weight 0 (DECam community pipeline style)."""
    from psfdeconv.flags import FLAG_MASKED
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, positions, psfs = field_positions_psfs
    r = exposures['r']
    data = np.array(r.data, dtype=np.float32)
    weight = np.full(data.shape, 1 / np.median(r.uncertainty.array) ** 2, dtype=np.float32)
    gap = slice(140, 150)
    data[:, gap], weight[:, gap] = 0.0, 0.0
    header = r.wcs.to_header()
    header['BUNIT'] = 'adu'
    path = tmp_path / 'r-gap.fits'
    fits.HDUList([fits.PrimaryHDU(data, header=header),
                  fits.ImageHDU(weight, name='WEIGHT')]).writeto(path)
    r_gap = read_exposure(path, weight_hdu='WEIGHT')
    assert r_gap.mask[:, gap].all() and r_gap.mask.sum() == data.shape[0] * 10
    assert np.isinf(r_gap.uncertainty.array[:, gap]).all()

    catalog, stamps = deconvolve_catalog(dict(exposures, r=r_gap), positions, psfs,
                                         model=tiny_model)
    size = stamps[0].data.shape[-1]
    # Reference (g) columns 141-148 are in the gap whatever r's sub-pixel offset; 139 and
    # 150 may be partly.
    first = np.array([stamp.meta['origin'][0] for stamp in stamps])
    crosses = (first + size - 1 >= 141) & (first <= 148)
    clear = (first + size - 1 < 139) | (first > 150)
    assert crosses.any() and clear.any()
    flags = np.asarray(catalog['flags'])
    assert np.all(flags[crosses] & FLAG_MASKED)
    for k in np.flatnonzero(crosses):
        columns = np.arange(size) + first[k]
        assert stamps[k].mask[1][:, (columns >= 141) & (columns <= 148)].all()
    assert not np.any(flags[clear] & FLAG_MASKED)


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_chip_gap_of_zeros_without_a_weight_map_is_masked(field_positions_psfs, tiny_model,
                                                          tmp_path):
    """The same gap read without its weight map: blocks of exact zeros in a noisy
    image are no data, masked with a warning, and the band's fluxes there are NaN (a
    flux of 0 was reported as usable)."""
    from psfdeconv.exceptions import PSFDeconvWarning
    from psfdeconv.flags import FLAG_MASKED
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, positions, psfs = field_positions_psfs
    r = exposures['r']
    data = np.array(r.data, dtype=np.float32)
    data[:, 128:] = 0.0  # the right half of r has no data
    data[5, 7] = data[9, 20:22] = 0.0  # isolated zeros are data
    header = r.wcs.to_header()
    header['BUNIT'] = 'adu'
    path = tmp_path / 'r-half.fits'
    fits.PrimaryHDU(data, header=header).writeto(path)
    with pytest.warns(PSFDeconvWarning, match=r'blocks of exact zeros .* masked'):
        r_half = read_exposure(path)
    assert r_half.mask[:, 128:].all() and r_half.mask.sum() == data.shape[0] * 128
    assert r_half.meta['n_zero_filled'] == data.shape[0] * 128

    catalog, stamps = deconvolve_catalog(dict(exposures, r=r_half), positions, psfs,
                                         model=tiny_model)
    first = np.array([stamp.meta['origin'][0] for stamp in stamps])
    centre = first + stamps[0].data.shape[-1] // 2
    inside = centre > 140
    assert inside.any() and (centre < 110).any()
    flags = np.asarray(catalog['flags'])
    assert np.all(flags[inside] & FLAG_MASKED)
    assert np.isnan(catalog['flux_r'].value[inside]).all()
    assert np.isfinite(catalog['flux_r'].value[centre < 110]).all()
    assert not np.asarray(catalog['usable'])[inside].any()


def test_noiseless_zero_sky_is_data(tmp_path):
    """A simulation without sky noise is exactly 0 away from its sources: not masked."""
    from psfdeconv.simulate import simulate_exposure

    field, _ = simulate_exposure((160, 160), bands=('r',), n_galaxies=2, n_stars=1,
                                 sky_sigma=0.0, seed=4)
    data = np.asarray(field['r'].data)
    assert (data == 0).sum() > 100
    path = tmp_path / 'noiseless.fits'
    header = field['r'].wcs.to_header()
    header['BUNIT'] = 'adu'
    fits.PrimaryHDU(data, header=header).writeto(path)
    with warnings.catch_warnings():
        warnings.simplefilter('error', PSFDeconvWarning)
        exposure = read_exposure(path)
    assert not exposure.mask.any() and exposure.meta['n_zero_filled'] == 0


# --- Mirrored bands -----------------------------------------------------------------------

def _mirrored(exposure):
    """The exposure with its x axis reversed: the same sky, a WCS of the other parity
    (positive CD determinant: east to the right with north up)."""
    from astropy.nddata import CCDData, StdDevUncertainty

    wcs = exposure.wcs.deepcopy()
    nx = exposure.shape[1]
    wcs.wcs.crpix[0] = nx + 1 - wcs.wcs.crpix[0]
    if wcs.wcs.has_cd():
        wcs.wcs.cd[:, 0] *= -1
    else:
        wcs.wcs.pc[:, 0] *= -1
    wcs.wcs.set()
    return CCDData(np.array(exposure.data)[:, ::-1], unit=exposure.unit, wcs=wcs,
                   uncertainty=StdDevUncertainty(
                       np.array(exposure.uncertainty.array)[:, ::-1]),
                   meta=dict(exposure.meta))


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
@pytest.mark.parametrize('band', ['r', 'g'])
def test_mirrored_band_gives_the_same_fluxes(field_positions_psfs, tiny_model, band):
    """A band with x flipped (a non-reference band, or the reference band itself)
    measures the fluxes of the unmirrored field to 1 %."""
    from psfdeconv.cutouts import align_bands
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, positions, psfs = field_positions_psfs
    mirrored = dict(exposures, **{band: _mirrored(exposures[band])})
    assert np.linalg.det(mirrored[band].wcs.pixel_scale_matrix) > 0 > np.linalg.det(
        exposures[band].wcs.pixel_scale_matrix)
    nx = exposures[band].shape[1]
    np.testing.assert_allclose(
        mirrored[band].wcs.pixel_to_world(nx - 1 - 10.0, 20.0).ra.deg,
        exposures[band].wcs.pixel_to_world(10.0, 20.0).ra.deg, atol=1e-10)
    if band == 'r':
        aligned, _ = align_bands(mirrored, reference='g')
        assert aligned['r'].meta['parity_flip']
        assert abs(aligned['r'].meta['rotation']) < 1e-6
        plain, _ = align_bands(exposures, reference='g')
        peak = np.nanmax(plain['r'].data)
        inner = (slice(2, -2), slice(2, -2))  # the edges: r is offset by a sub-pixel
        np.testing.assert_allclose(aligned['r'].data[inner], plain['r'].data[inner],
                                   atol=0.01 * peak)
        positions_here, rtol = positions, 0.01
    else:
        # The stamps are cut on the mirrored grid (positions mirror too). An even-sized
        # stamp is not mirror-symmetric about its centre pixel (size // 2): the mirrored
        # stamp holds one other column, and the neighbour replacement and background of a
        # faint galaxy with a neighbour (the sixth, 2200 adu) move by 1.3 %; the others
        # agree to 0.3 %.
        positions_here = np.column_stack([nx - 1 - positions[:, 0], positions[:, 1]])
        rtol = 0.02
    expected, _ = deconvolve_catalog(exposures, positions, psfs, model=tiny_model)
    catalog, _ = deconvolve_catalog(mirrored, positions_here, psfs, model=tiny_model)
    for name in ('g', 'r', 'i'):
        ratio = catalog[f'flux_{name}'].value / expected[f'flux_{name}'].value
        np.testing.assert_allclose(ratio, 1.0, rtol=rtol)
        assert np.median(np.abs(ratio - 1)) < 0.003
    assert np.array_equal(catalog['flags'], expected['flags'])
