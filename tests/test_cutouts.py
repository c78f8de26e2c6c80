# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.cutouts: stamps from exposures, band alignment, PSF resampling."""

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.nddata import CCDData, Cutout2D, NDData, StdDevUncertainty
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.cutouts import (
    _STRIP_ROWS,
    _adaptive_region,
    _pixel_shift,
    _shift_taps,
    _shifted_wcs,
    align_bands,
    align_to_reference,
    make_cutouts,
    reproject_region,
    resample_psf,
)
from psfdeconv.exceptions import InvalidInputError, InvalidPSFError, PixelScaleError
from psfdeconv.flags import FLAG_EDGE, FLAG_MASKED, FLAG_OFF_IMAGE

SIZE = 64
SHAPE = (150, 170)  # (ny, nx) of the synthetic exposure
#: Integer and sub-pixel source positions (x, y) of the synthetic exposure.
SOURCES = np.array([[60.0, 70.0], [110.3, 40.6], [85.5, 100.5], [30.0, 120.0]])
SIGMA_PIX = 2.0


def tan_wcs(shape, *, scale=0.2, rotation=0.0, crval=(150.0, 2.0)):
    """A TAN WCS, ``scale`` arcsec/pixel, north up and east left when not rotated, the
    pixel grid rotated counter-clockwise by ``rotation`` degrees."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    wcs.wcs.cd = (scale / 3600) * np.array([[-1.0, 0.0], [0.0, 1.0]]) @ np.array(
        [[c, -s], [s, c]])
    wcs.array_shape = shape
    return wcs


def gaussian_image(shape, positions, sigma, flux=1000.0):
    """Sum of circular Gaussians (x, y, 0-based) sampled at pixel centres, each summing to
    ``flux`` when well inside."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape)
    for x0, y0 in np.atleast_2d(positions):
        image += np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))
    return image * flux / (2 * np.pi * sigma ** 2)


def moments(image):
    """Flux, centroid (x, y) and the second-moment matrix of an image (NaN as 0)."""
    image = np.nan_to_num(image)
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    flux = image.sum()
    xc, yc = (image * xx).sum() / flux, (image * yy).sum() / flux
    dx, dy = xx - xc, yy - yc
    second = np.array([[(image * dx * dx).sum(), (image * dx * dy).sum()],
                       [(image * dx * dy).sum(), (image * dy * dy).sum()]]) / flux
    return flux, xc, yc, second


def fwhm(image, pixel_scale):
    """FWHM (arcsec) of a near-Gaussian image from its second moments."""
    second = moments(image)[3]
    return 2 * np.sqrt(2 * np.log(2)) * np.sqrt(np.trace(second) / 2) * pixel_scale


@pytest.fixture(scope='module')
def wcs():
    return tan_wcs(SHAPE)


@pytest.fixture(scope='module')
def sky(wcs):
    return wcs.pixel_to_world(SOURCES[:, 0], SOURCES[:, 1])


@pytest.fixture(scope='module')
def exposure(wcs):
    data = gaussian_image(SHAPE, SOURCES, SIGMA_PIX)
    return CCDData(data, unit='adu', wcs=wcs)


# --- make_cutouts ---------------------------------------------------------------------------

def test_integer_position_lands_on_stamp_centre(exposure, sky):
    # Even size: the source at integer exposure pixel (60, 70) is stamp pixel (32, 32).
    stamps = make_cutouts(exposure, sky[:1], size=SIZE)
    stamp = stamps['data'][0]
    assert np.unravel_index(np.argmax(stamp), stamp.shape) == (SIZE // 2, SIZE // 2)
    assert stamp[SIZE // 2, SIZE // 2] == exposure.data[70, 60]
    assert_array_equal(stamps['origin'][0], [60 - SIZE // 2, 70 - SIZE // 2])
    # Symmetric about the centre pixel (a neighbour enters the stamp's far corner).
    inner = stamp[SIZE // 2 - 10:SIZE // 2 + 11, SIZE // 2 - 10:SIZE // 2 + 11]
    assert_allclose(inner, inner[::-1, ::-1], rtol=0, atol=1e-12)
    assert_allclose(inner, inner.T, rtol=0, atol=1e-12)
    _, xc, yc, _ = moments(inner)
    assert_allclose([xc, yc], [10, 10], atol=1e-9)
    assert stamps['flags'][0] == 0


@pytest.mark.parametrize('size', [63, 64, 65, 25])
def test_centre_convention_for_even_and_odd_sizes(exposure, size):
    positions = np.array([[60.0, 70.0], [60.2, 70.0], [60.5, 70.49], [59.51, 69.5],
                          [60.9, 69.1]])
    stamps = make_cutouts(exposure, positions, size=size)
    nearest = np.floor(positions + 0.5)
    assert_array_equal(stamps['origin'], nearest - size // 2)
    offsets = np.stack([stamps['x_stamp'], stamps['y_stamp']], axis=1) - size // 2
    assert np.all((offsets >= -0.5) & (offsets < 0.5))
    assert_allclose(offsets, positions - nearest, atol=1e-12)


def test_cutout2d_alone_misplaces_even_stamps(exposure):
    # Why make_cutouts rounds before calling Cutout2D: for an even size Cutout2D starts the
    # stamp at ceil(x - size/2), so x = 60.1 lands on stamp pixel 31.1, not near 32.
    raw = Cutout2D(exposure.data, (60.1, 70.0), SIZE, mode='partial', fill_value=0)
    assert raw.origin_original[0] == 29 and 60.1 - 29 == pytest.approx(31.1)
    ours = make_cutouts(exposure, [(60.1, 70.0)], size=SIZE)
    assert ours['origin'][0, 0] == 28
    assert ours['x_stamp'][0] == pytest.approx(32.1)


def test_sky_and_pixel_positions_give_identical_cutouts(exposure, sky, wcs):
    by_sky = make_cutouts(exposure, sky, size=SIZE)
    x, y = wcs.world_to_pixel(sky)
    by_pixel = make_cutouts(exposure, np.stack([x, y], axis=1), size=SIZE)
    for key in ('data', 'mask', 'flags', 'origin'):
        assert_array_equal(by_sky[key], by_pixel[key], err_msg=key)
    assert_allclose(by_sky['x'], SOURCES[:, 0], atol=1e-8)
    assert_allclose(by_sky['y'], SOURCES[:, 1], atol=1e-8)
    assert by_sky['uncertainty'] is None


def test_cutout_wcs_maps_source_to_its_stamp_position(exposure, sky):
    stamps = make_cutouts(exposure, sky, size=SIZE)
    for i, cutout_wcs in enumerate(stamps['wcs']):
        assert isinstance(cutout_wcs, WCS)
        x, y = cutout_wcs.world_to_pixel(sky[i])
        assert_allclose([x, y], [stamps['x_stamp'][i], stamps['y_stamp'][i]], atol=1e-6)
    # The integer-position sources land exactly on (size // 2, size // 2).
    for i in (0, 3):
        x, y = stamps['wcs'][i].world_to_pixel(sky[i])
        assert_allclose([x, y], [SIZE // 2, SIZE // 2], atol=1e-6)


def test_edge_source_is_padded_masked_and_flagged(exposure):
    position = (3.2, 140.7)  # near the top-left corner (y up to 149)
    stamps = make_cutouts(exposure, [position], size=SIZE)
    ox, oy = stamps['origin'][0]
    assert (ox, oy) == (3 - 32, 141 - 32)
    data, mask = stamps['data'][0], stamps['mask'][0]
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[:SHAPE[0] - oy, -ox:] = True
    assert_array_equal(mask, ~inside)
    assert np.all(data[~inside] == 0)
    assert_array_equal(data[inside], exposure.data[oy:, :ox + SIZE].ravel())
    assert stamps['flags'][0] == FLAG_EDGE
    assert not stamps['flags'][0] & FLAG_MASKED


def test_mask_and_uncertainty_are_cut_with_the_data_slices(wcs):
    # Each pixel's value encodes its exposure index, so any misalignment between data, mask
    # and uncertainty shows.
    rng = np.random.default_rng(5)
    index = np.arange(np.prod(SHAPE), dtype=float).reshape(SHAPE)
    mask = rng.random(SHAPE) < 0.05
    sigma = 1.0 + index
    exposure = NDData(index.copy(), mask=mask, uncertainty=StdDevUncertainty(sigma), wcs=wcs)
    positions = [(60.0, 70.0), (2.0, 3.0), (168.6, 148.9), (85.5, 100.5)]
    stamps = make_cutouts(exposure, positions, size=SIZE)
    for i in range(len(positions)):
        ox, oy = stamps['origin'][i]
        yy, xx = np.mgrid[oy:oy + SIZE, ox:ox + SIZE]
        on = (xx >= 0) & (xx < SHAPE[1]) & (yy >= 0) & (yy < SHAPE[0])
        expected_mask = ~on
        expected_mask[on] = mask[yy[on], xx[on]]
        assert_array_equal(stamps['mask'][i], expected_mask)
        good = ~expected_mask
        assert_array_equal(stamps['data'][i][good], index[yy[good], xx[good]])
        assert_array_equal(stamps['uncertainty'][i][good], sigma[yy[good], xx[good]])
        assert np.all(stamps['data'][i][expected_mask] == 0)
        assert np.all(np.isinf(stamps['uncertainty'][i][expected_mask]))
        assert stamps['flags'][i] & FLAG_MASKED


def test_nonfinite_pixels_are_zeroed_masked_and_flagged(exposure, wcs):
    data = exposure.data.copy()
    data[72, 61] = np.nan
    data[69, 58] = np.inf
    stamps = make_cutouts(CCDData(data, unit='adu', wcs=wcs), [(60.0, 70.0)], size=SIZE)
    assert np.isfinite(stamps['data']).all()
    assert stamps['mask'][0][34, 33] and stamps['mask'][0][31, 30]
    assert stamps['mask'][0].sum() == 2
    assert stamps['data'][0][34, 33] == 0
    assert stamps['flags'][0] == FLAG_MASKED


def test_off_image_source_gets_an_empty_masked_stamp(exposure, sky, wcs):
    far = wcs.pixel_to_world(-100.0, 75.0)
    near = wcs.pixel_to_world(-10.0, 75.0)  # centre off, stamp overlapping the image
    positions = SkyCoord([sky[0], far, near])
    stamps = make_cutouts(exposure, positions, size=SIZE)
    assert stamps['flags'][0] == 0
    for i in (1, 2):
        assert stamps['flags'][i] == FLAG_OFF_IMAGE | FLAG_EDGE
        assert stamps['mask'][i].all()
        assert np.all(stamps['data'][i] == 0)
        x, y = stamps['wcs'][i].world_to_pixel(positions[i])
        assert_allclose([x, y], [stamps['x_stamp'][i], stamps['y_stamp'][i]], atol=1e-6)


@pytest.mark.parametrize('size', [SIZE, 33])
def test_stamps_and_their_wcs_are_cutout2ds(wcs, size):
    # Interior, edge and corner sources, with a SIP distortion in the WCS.
    distorted = _sip_wcs(SHAPE, scale=0.2, rotation=12.0, crpix_offset=(0.3, -0.4))
    data = np.random.default_rng(2).normal(size=SHAPE)
    positions = np.array([[60.0, 70.0], [1.2, 3.0], [168.6, 148.9], [100.0, 149.0]])
    stamps = make_cutouts(NDData(data, wcs=distorted), positions, size=size)
    pixels_only = make_cutouts(NDData(data, wcs=distorted), positions, size=size,
                               stamp_wcs=False)
    for key in ('data', 'mask', 'flags', 'origin'):
        assert_array_equal(pixels_only[key], stamps[key])
    assert pixels_only['wcs'] == [None] * len(positions)
    for i, (x, y) in enumerate(positions):
        centre = (int(np.floor(x + 0.5)), int(np.floor(y + 0.5)))
        cutout = Cutout2D(data, centre, size, wcs=distorted, mode='partial', fill_value=0.0)
        assert_array_equal(stamps['data'][i], cutout.data)
        assert_array_equal(stamps['wcs'][i].wcs.crpix, cutout.wcs.wcs.crpix)
        assert_array_equal(stamps['wcs'][i].sip.crpix, cutout.wcs.sip.crpix)
        assert stamps['wcs'][i].array_shape == cutout.wcs.array_shape
        corner = stamps['wcs'][i].pixel_to_world(0, size - 1)
        assert corner.separation(cutout.wcs.pixel_to_world(0, size - 1)).arcsec < 1e-9
        on_image = np.zeros((size, size), dtype=bool)
        on_image[cutout.slices_cutout] = True
        assert bool(stamps['flags'][i] & FLAG_EDGE) == (not on_image.all())
        assert bool(stamps['flags'][i] & FLAG_EDGE) == (i > 0)


def test_shifted_wcs_matches_cutout2d(wcs):
    cutout = Cutout2D(np.zeros(SHAPE), (5, 7), SIZE, wcs=wcs, mode='partial', fill_value=0)
    ox, oy = 5 - SIZE // 2, 7 - SIZE // 2
    shifted = _shifted_wcs(wcs, ox, oy, SIZE)
    assert_allclose(shifted.wcs.crpix, cutout.wcs.wcs.crpix)
    assert shifted.array_shape == cutout.wcs.array_shape


def test_all_positions_off_the_image_raise(exposure, wcs):
    positions = wcs.pixel_to_world([-500.0, 900.0, np.nan], [10.0, 10.0, 10.0])
    with pytest.raises(InvalidInputError,
                       match=r'all 3 position\(s\) are off the image \(the 170x150 image '
                             r'covers .* and RA'):
        make_cutouts(exposure, positions, size=SIZE)


def test_pixel_positions_without_wcs(exposure):
    stamps = make_cutouts(exposure.data, [[60, 70]], size=31)
    assert stamps['wcs'] == [None]
    assert stamps['data'][0][15, 15] == exposure.data[70, 60]


@pytest.mark.parametrize('positions, match', [
    (np.zeros((0, 2)), 'no positions'),
    (np.zeros((3, 3)), r'shape \(n, 2\)'),
    ('abc', 'cannot be read'),
])
def test_bad_positions(exposure, positions, match):
    with pytest.raises(InvalidInputError, match=match):
        make_cutouts(exposure, positions, size=SIZE)


def test_bad_inputs(exposure, sky):
    with pytest.raises(InvalidInputError, match='size = 0'):
        make_cutouts(exposure, sky, size=0)
    with pytest.raises(InvalidInputError, match='size = 6.5'):
        make_cutouts(exposure, sky, size=6.5)
    with pytest.raises(InvalidInputError, match='no celestial WCS'):
        make_cutouts(exposure.data, sky, size=SIZE)
    with pytest.raises(InvalidInputError, match='shape'):
        make_cutouts(np.zeros((2, 3, 4)), [(1, 1)], size=SIZE)
    with pytest.raises(InvalidInputError, match='give an NDData'):
        make_cutouts([[1.0, 2.0]], [(1, 1)], size=SIZE)


# --- Real exposures (need /work/shared) ----------------------------------------------------

@pytest.fixture(scope='module')
def real_dir():
    for base in (Path(__file__).resolve().parents[2] / 'shared', Path('/work/shared')):
        path = base / 'data' / 'real'
        if path.is_dir():
            return path
    pytest.skip('the shared real-data directory is not available')


def test_real_tpv_exposure_cutouts(real_dir):
    from psfdeconv.io import read_exposure

    exposure = read_exposure(real_dir / 'ctio-mosaic2-cdfs-I.fits')
    ny, nx = exposure.shape
    pixels = np.array([[256.0, 256.0], [10.3, 500.8], [400.6, 20.2]])
    positions = exposure.wcs.pixel_to_world(pixels[:, 0], pixels[:, 1])
    stamps = make_cutouts(exposure, positions, size=SIZE)
    assert_allclose(np.stack([stamps['x'], stamps['y']], axis=1), pixels, atol=1e-6)
    assert_array_equal(stamps['flags'], [0, FLAG_EDGE, FLAG_EDGE])
    assert_array_equal(stamps['data'][0], exposure.data[224:288, 224:288])
    for i in range(3):  # the distortion (TPV) travels with each cutout's WCS
        x, y = stamps['wcs'][i].world_to_pixel(positions[i])
        assert_allclose([x, y], [stamps['x_stamp'][i], stamps['y_stamp'][i]], atol=1e-6)


def test_real_decam_cutouts_carry_the_weight_uncertainty(real_dir):
    from psfdeconv.io import read_exposure

    exposure = read_exposure(real_dir / 'decam-r-N6.fits',
                             weight_hdu=real_dir / 'decam-r-N6-weight.fits')
    stamps = make_cutouts(exposure, [(140.0, 187.0)], size=32)
    assert_array_equal(stamps['uncertainty'][0],
                       exposure.uncertainty.array[171:203, 124:156])
    assert stamps['flags'][0] == 0


# --- align_bands ----------------------------------------------------------------------------

REF_SHAPE = (121, 121)
BAND_SHAPE = (85, 85)


@pytest.fixture(scope='module')
def two_bands():
    """A reference band (0.2"/px) and a band with 1.5x coarser pixels rotated by 10 degrees
    and shifted, one Gaussian source (FWHM 1.5") at the same sky position in both."""
    ref_wcs = tan_wcs(REF_SHAPE, scale=0.2)
    band_wcs = tan_wcs(BAND_SHAPE, scale=0.3, rotation=10.0, crval=(150.0001, 2.0001))
    source = SkyCoord(150.0002, 2.0003, unit='deg')
    sigma_arcsec = 1.5 / (2 * np.sqrt(2 * np.log(2)))
    ref_xy = np.array(ref_wcs.world_to_pixel(source), dtype=float)
    band_xy = np.array(band_wcs.world_to_pixel(source), dtype=float)
    ref = CCDData(gaussian_image(REF_SHAPE, ref_xy, sigma_arcsec / 0.2), unit='adu',
                  wcs=ref_wcs)
    band = CCDData(gaussian_image(BAND_SHAPE, band_xy, sigma_arcsec / 0.3), unit='adu',
                   wcs=band_wcs)
    aligned, ratio = align_bands({'r': ref, 'i': band}, reference='r')
    return dict(ref=ref, band=band, aligned=aligned, ratio=ratio, ref_xy=ref_xy,
                band_xy=band_xy, source=source, sigma_arcsec=sigma_arcsec)


def test_align_bands_conserves_flux_and_position(two_bands):
    aligned = two_bands['aligned']['i']
    assert aligned.shape == REF_SHAPE
    assert aligned.wcs.wcs.compare(two_bands['ref'].wcs.wcs)
    flux, xc, yc, _ = moments(aligned.data)
    assert flux == pytest.approx(1000.0, rel=0.01)
    assert_allclose([xc, yc], two_bands['ref_xy'], atol=0.05)
    assert two_bands['ratio']['i'] == pytest.approx((0.2 / 0.3) ** 2, rel=1e-6)
    meta = aligned.meta
    assert meta['rotation'] == pytest.approx(10.0, abs=1e-4)
    assert meta['pixel_scale'] == pytest.approx(0.3, rel=1e-6)
    assert meta['reference_pixel_scale'] == pytest.approx(0.2, rel=1e-6)
    assert meta['conserve_flux'] is True and meta['kernel'] == 'hann'
    assert not meta['parity_flip']


def test_align_bands_masks_uncovered_pixels_and_keeps_the_reference(two_bands):
    ref = two_bands['aligned']['r']
    assert_array_equal(ref.data, two_bands['ref'].data)
    assert not ref.mask.any() and ref.meta['reprojected'] is False
    aligned = two_bands['aligned']['i']
    # The rotated band (85 x 0.3" = 25.5") does not cover the reference's corners.
    assert aligned.mask[0, 0] and np.isnan(aligned.data[0, 0])
    assert not aligned.mask[60, 60]
    assert_array_equal(np.isnan(aligned.data), aligned.mask)


def test_align_bands_carries_mask_and_uncertainty(two_bands):
    band = two_bands['band']
    mask = np.zeros(BAND_SHAPE, dtype=bool)
    mask[20:30, 50:60] = True  # a 3" x 3" masked block
    sigma = np.full(BAND_SHAPE, 2.0)
    masked = CCDData(band.data, unit='adu', wcs=band.wcs, mask=mask,
                     uncertainty=StdDevUncertainty(sigma))
    aligned, _ = align_bands({'r': two_bands['ref'], 'i': masked}, reference='r')
    out = aligned['i']
    block = band.wcs.pixel_to_world(54.5, 24.5)
    bx, by = (int(round(float(v))) for v in two_bands['ref'].wcs.world_to_pixel(block))
    assert out.mask[by, bx]
    # About the block's area in reference pixels (3"/0.2" = 15 px a side), not much more.
    n_block = out.mask[10:110, 10:110].sum()
    assert 0.7 * 225 < n_block < 1.3 * 225
    good = ~out.mask
    # Flux per pixel scaled by the area ratio: sigma too (correlations ignored).
    assert_allclose(np.median(out.uncertainty.array[good]), 2.0 * (0.2 / 0.3) ** 2,
                    rtol=0.02)
    assert np.all(np.isinf(out.uncertainty.array[~good]))


def test_align_bands_surface_brightness_is_not_rescaled(two_bands):
    band = two_bands['band']
    flat = CCDData(np.full(BAND_SHAPE, 5.0), unit='MJy/sr', wcs=band.wcs)
    aligned, ratio = align_bands({'r': two_bands['ref'], 'i': flat}, reference='r')
    out = aligned['i']
    assert out.meta['conserve_flux'] is False
    assert_allclose(out.data[~out.mask], 5.0, rtol=1e-6)
    forced, _ = align_bands({'r': two_bands['ref'], 'i': flat}, reference='r',
                            conserve_flux=True)
    assert_allclose(np.median(forced['i'].data[~forced['i'].mask]), 5.0 * ratio['i'],
                    rtol=1e-6)


def test_align_bands_errors(two_bands):
    bands = {'r': two_bands['ref'], 'i': two_bands['band']}
    with pytest.raises(InvalidInputError, match=r"reference = 'z' is not one of the bands "
                                                r"\['r', 'i'\]"):
        align_bands(bands, reference='z')
    elsewhere = CCDData(two_bands['band'].data, unit='adu',
                        wcs=tan_wcs(BAND_SHAPE, scale=0.3, crval=(20.0, -40.0)))
    with pytest.raises(InvalidInputError, match="band 'i' does not overlap"):
        align_bands({'r': two_bands['ref'], 'i': elsewhere}, reference='r')
    with pytest.raises(InvalidInputError, match='no celestial WCS'):
        align_bands({'r': two_bands['ref'], 'i': NDData(np.ones((5, 5)))}, reference='r')
    with pytest.raises(InvalidInputError, match='kernel'):
        align_bands(bands, reference='r', kernel='lanczos')


# --- resample_psf ---------------------------------------------------------------------------

def gaussian_psf(half, sigma_x, sigma_y=None, angle=0.0):
    sigma_y = sigma_x if sigma_y is None else sigma_y
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    u_, v_ = c * xx + s * yy, -s * xx + c * yy
    psf = np.exp(-0.5 * ((u_ / sigma_x) ** 2 + (v_ / sigma_y) ** 2))
    return psf / psf.sum()


def test_resample_psf_unit_sum_odd_centred():
    psf = gaussian_psf(12, 2.0)
    for to_scale in (0.2, 0.3, 0.45):
        out = resample_psf(psf, from_scale=0.3 * u.arcsec / u.pix, to_scale=to_scale)
        assert out.shape[0] % 2 == 1 and out.shape[0] == out.shape[1]
        assert out.sum() == pytest.approx(1.0, abs=1e-12)
        _, xc, yc, _ = moments(out)
        assert_allclose([xc, yc], [out.shape[0] // 2] * 2, atol=1e-3)
    assert resample_psf(psf, from_scale=0.3, to_scale=0.2, size=41).shape == (41, 41)


def test_resample_psf_keeps_the_fwhm_in_arcsec():
    # A well-sampled PSF (FWHM 1.5" = 5 pixels of 0.3"), onto 0.2" pixels: the default
    # kernel ('hann' when the grid gets finer) widens it by less than 2 percent.
    sigma_pix = 1.5 / (2 * np.sqrt(2 * np.log(2))) / 0.3
    psf = gaussian_psf(15, sigma_pix)
    out = resample_psf(psf, from_scale=0.3, to_scale=0.2)
    assert fwhm(out, 0.2) == pytest.approx(fwhm(psf, 0.3), rel=0.02)
    assert fwhm(psf, 0.3) == pytest.approx(1.5, rel=0.01)


@pytest.mark.parametrize('kernel', [None, 'gaussian'])
def test_resample_psf_matches_a_star_reprojected_by_align_bands(two_bands, kernel):
    # The point of resample_psf: its output is the PSF of the reprojected band, including
    # the resampling kernel's widening ('gaussian' widens more than 'hann').
    aligned, _ = align_bands({'r': two_bands['ref'], 'i': two_bands['band']},
                             reference='r', kernel=kernel)
    meta = aligned['i'].meta
    sigma_pix = two_bands['sigma_arcsec'] / 0.3
    psf = resample_psf(gaussian_psf(12, sigma_pix), from_scale=meta['pixel_scale'],
                       to_scale=meta['reference_pixel_scale'], rotation=meta['rotation'],
                       kernel=meta['kernel'])
    assert fwhm(psf, 0.2) == pytest.approx(fwhm(aligned['i'].data, 0.2), rel=0.01)


def test_resample_psf_rotation_follows_align_bands(two_bands):
    # An elliptical source elongated along the band's x axis: its reprojected image and the
    # resampled PSF must have the same orientation on the reference grid.
    band = two_bands['band']
    sx, sy = 3.0, 1.5
    half = 12
    bx, by = two_bands['band_xy']
    stamp = gaussian_psf(half, sx, sy)
    image = np.zeros(BAND_SHAPE)
    ix, iy = int(round(bx)), int(round(by))
    image[iy - half:iy + half + 1, ix - half:ix + half + 1] = stamp
    star = CCDData(image, unit='adu', wcs=band.wcs)
    aligned, _ = align_bands({'r': two_bands['ref'], 'i': star}, reference='r')
    meta = aligned['i'].meta
    psf = resample_psf(stamp, from_scale=0.3, to_scale=0.2, rotation=meta['rotation'])
    star_second = moments(aligned['i'].data)[3]
    psf_second = moments(psf)[3]
    assert_allclose(psf_second, star_second, rtol=0.02, atol=0.02)
    angle = 0.5 * np.degrees(np.arctan2(2 * psf_second[0, 1],
                                        psf_second[0, 0] - psf_second[1, 1]))
    assert angle == pytest.approx(10.0, abs=0.5)


def test_resample_psf_errors():
    psf = gaussian_psf(5, 1.5)
    with pytest.raises(InvalidPSFError, match='odd sides'):
        resample_psf(np.ones((4, 5)), from_scale=0.3, to_scale=0.2)
    with pytest.raises(InvalidPSFError, match='sums to 0.0'):
        resample_psf(np.zeros((5, 5)), from_scale=0.3, to_scale=0.2)
    with pytest.raises(PixelScaleError, match='from_scale = -0.3'):
        resample_psf(psf, from_scale=-0.3, to_scale=0.2)
    with pytest.raises(PixelScaleError, match='to_scale'):
        resample_psf(psf, from_scale=0.3, to_scale=2 * u.m)
    with pytest.raises(InvalidPSFError, match='size = 10'):
        resample_psf(psf, from_scale=0.3, to_scale=0.2, size=10)


def test_mirrored_band_is_flagged_and_its_flipped_psf_matches(two_bands):
    # A band whose x axis points east (a mirror image of the usual orientation).
    mirrored = tan_wcs(BAND_SHAPE, scale=0.3, rotation=20.0, crval=(150.0001, 2.0001))
    mirrored.wcs.cd = mirrored.wcs.cd @ np.diag([-1.0, 1.0])
    half = 12
    stamp = gaussian_psf(half, 3.0, 1.5, angle=30.0)
    bx, by = (int(round(float(v))) for v in mirrored.world_to_pixel(two_bands['source']))
    image = np.zeros(BAND_SHAPE)
    image[by - half:by + half + 1, bx - half:bx + half + 1] = stamp
    aligned, _ = align_bands({'r': two_bands['ref'],
                              'i': CCDData(image, unit='adu', wcs=mirrored)}, reference='r')
    meta = aligned['i'].meta
    assert meta['parity_flip'] is True
    psf = resample_psf(stamp[:, ::-1], from_scale=0.3, to_scale=0.2,
                       rotation=meta['rotation'])
    assert_allclose(moments(psf)[3], moments(aligned['i'].data)[3], rtol=0.02, atol=0.02)


# --- Reprojection of regions --------------------------------------------------------


def _sip_wcs(shape, *, scale, rotation, crpix_offset):
    """A rotated TAN-SIP WCS (a distortion of a few tenths of a pixel at the corners)."""
    from astropy.wcs import Sip

    wcs = tan_wcs(shape, scale=scale, rotation=rotation)
    wcs.wcs.ctype = ['RA---TAN-SIP', 'DEC--TAN-SIP']
    wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) + crpix_offset
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    a[2, 0], a[1, 1], b[0, 2] = 2e-6, 1e-6, -3e-6
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


@pytest.mark.parametrize('distorted', [False, True])
def test_reproject_region_equals_the_whole_frame_on_stamps(distorted):
    """Stamp regions (and strips, in threads) of the reprojection equal the whole-frame
    reprojection of one reproject_adaptive call at the same pixels, to 1e-9 of the
    values' scale (floating-point rounding of the mapping)."""
    from reproject import reproject_adaptive

    ref_shape = (2 * _STRIP_ROWS + 40, 150)  # three strips
    ref_wcs = tan_wcs(ref_shape, scale=0.2)
    if distorted:
        band_shape = (400, 130)
        band_wcs = _sip_wcs(band_shape, scale=0.27, rotation=12.0,
                            crpix_offset=(0.3, -0.4))
    else:  # a plain TAN grid shifted by a fraction of a pixel: no round trip
        band_shape = ref_shape
        band_wcs = tan_wcs(ref_shape, scale=0.2)
        band_wcs.wcs.crpix = np.asarray(band_wcs.wcs.crpix) + (0.37, -0.21)
    rng = np.random.default_rng(5)
    planes = np.stack([rng.normal(3.0, 1.0, band_shape), np.ones(band_shape)])
    whole = reproject_adaptive((planes, band_wcs), ref_wcs, shape_out=(2,) + ref_shape,
                               conserve_flux=True, kernel='gaussian',
                               return_footprint=False)
    scale = 1e-9 * np.nanmax(np.abs(whole))
    for ox, oy in [(10, 20), (70, _STRIP_ROWS - 30), (86, ref_shape[0] - SIZE)]:
        region = reproject_region(planes, band_wcs, ref_wcs, (ox, oy), (SIZE, SIZE),
                                  conserve_flux=True, kernel='gaussian')
        expected = whole[:, oy:oy + SIZE, ox:ox + SIZE]
        assert np.isfinite(expected).mean() > 0.25  # the band covers part of it
        assert_array_equal(np.isnan(region), np.isnan(expected))
        assert_allclose(region, expected, rtol=0, atol=scale)
    for threads in (1, 3):
        frame = reproject_region(planes, band_wcs, ref_wcs, (0, 0), ref_shape,
                                 conserve_flux=True, kernel='gaussian', threads=threads)
        assert_array_equal(np.isnan(frame), np.isnan(whole))
        assert_allclose(frame, whole, rtol=0, atol=scale)


def test_reproject_region_threads_do_not_share_a_sip_wcs():
    """Strips reprojected in threads from one SIP WCS equal those of one
    thread, every time: concurrent all_world2pix calls on a shared astropy WCS
    corrupt each other (NoConvergence, values off by up to 10 %), so each
    strip must get its own copy. Repeated, as a race shows only sometimes."""
    ref_shape = (6 * _STRIP_ROWS, 150)
    ref_wcs = tan_wcs(ref_shape, scale=0.2)
    band_shape = (700, 130)
    band_wcs = _sip_wcs(band_shape, scale=0.27, rotation=12.0, crpix_offset=(0.3, -0.4))
    rng = np.random.default_rng(6)
    planes = np.stack([rng.normal(3.0, 1.0, band_shape), np.ones(band_shape)])
    serial = reproject_region(planes, band_wcs, ref_wcs, (0, 0), ref_shape,
                              conserve_flux=True, kernel='gaussian', threads=1)
    assert np.isfinite(serial).mean() > 0.4  # the band covers most strips
    for _ in range(12):
        threaded = reproject_region(planes, band_wcs, ref_wcs, (0, 0), ref_shape,
                                    conserve_flux=True, kernel='gaussian', threads=4)
        assert_array_equal(threaded, serial)


def _shifted_tan(shape, shift, **kwargs):
    """`tan_wcs` with its CRPIX moved by ``shift`` (x, y) pixels."""
    wcs = tan_wcs(shape, **kwargs)
    wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) + shift
    return wcs


def test_pixel_shift_only_for_grids_that_differ_by_a_shift():
    ref = tan_wcs((100, 120))
    region = ((0, 0), (100, 120))
    assert _pixel_shift(_shifted_tan((100, 120), (3.25, -7.5)), ref, *region) == (3.25, -7.5)
    assert _pixel_shift(ref.deepcopy(), ref, *region) == (0.0, 0.0)
    others = [tan_wcs((100, 120), rotation=0.01), tan_wcs((100, 120), scale=0.2001),
              tan_wcs((100, 120), crval=(150.0, 2.0001)),
              _sip_wcs((100, 120), scale=0.2, rotation=0.0, crpix_offset=(0.0, 0.0))]
    for other in others:
        assert _pixel_shift(other, ref, *region) is None
    galactic = ref.deepcopy()
    galactic.wcs.ctype = ['GLON-TAN', 'GLAT-TAN']
    assert _pixel_shift(galactic, ref, *region) is None


def test_shift_taps_are_the_hann_weights_of_the_shift():
    """Between grids shifted by (0.25, -0.5) pixels the Hann window of reproject
    weights 2 x 1 band pixels, (1 + cos(pi d)) per axis, normalised; with
    conserve_flux (equal pixels) the same."""
    ref = tan_wcs((100, 120))
    band = _shifted_tan((100, 120), (10.25, -0.5))
    for conserve_flux in (False, True):
        taps = _shift_taps((1, 100, 120), band, ref, (10.25, -0.5),
                           conserve_flux=conserve_flux, kernel='hann')
        weights = {(dy, dx): w for dy, dx, w in taps}
        hann = {d: 1 + np.cos(np.pi * d) for d in (0.25, 0.75)}
        total = hann[0.25] + hann[0.75]
        assert set(weights) == {(0, 10), (0, 11), (-1, 10), (-1, 11)}
        assert_allclose(weights[(0, 10)], 0.5 * hann[0.25] / total, rtol=1e-7)
        assert_allclose(weights[(-1, 11)], 0.5 * hann[0.75] / total, rtol=1e-7)


@pytest.mark.parametrize('conserve_flux', [False, True])
def test_reproject_region_of_a_shifted_grid_equals_reproject(conserve_flux):
    """Grids that differ by a shift (sub-pixel, whole pixels, partial overlaps, a
    band smaller than the region) take the weights of one resampled impulse:
    reproject's values to 1e-8 of their scale, uncovered pixels NaN as reproject's,
    for whole frames, regions and strips."""
    rng = np.random.default_rng(11)
    ref_wcs = tan_wcs((2 * _STRIP_ROWS + 30, 140))
    cases = [((0.37, -0.21), (300, 150)), ((-12.0, 4.0), (290, 150)),
             ((60.6, -80.3), (200, 100)), ((-3.5, 0.5), (60, 50))]
    for shift, band_shape in cases:
        band_wcs = _shifted_tan(band_shape, shift)
        band_wcs.wcs.crpix = np.asarray(ref_wcs.wcs.crpix) + shift
        planes = np.stack([rng.normal(3.0, 1.0, band_shape),
                           (rng.random(band_shape) < 0.1).astype(float),
                           np.ones(band_shape)])
        for origin, shape in [((0, 0), ref_wcs.array_shape), ((-20, 40), (70, 90)),
                              ((100, 500), (64, 64))]:
            assert _pixel_shift(band_wcs, ref_wcs, origin, shape) is not None
            fast = reproject_region(planes, band_wcs, ref_wcs, origin, shape,
                                    conserve_flux=conserve_flux, kernel='hann')
            expected = _adaptive_region(planes, band_wcs, ref_wcs, origin, shape,
                                        conserve_flux=conserve_flux, kernel='hann',
                                        threads=1)
            assert_array_equal(np.isnan(fast), np.isnan(expected))
            assert_allclose(fast, expected, rtol=0, atol=1e-8 * np.nanmax(np.abs(planes)))
            if origin == (0, 0):  # each band covers part of the frame
                assert 0 < np.isfinite(fast[0]).mean() < 1


def test_align_bands_of_a_shifted_band_keeps_reproject_masks():
    """align_bands of a band shifted by a fraction of a pixel: the masks, NaN and
    uncertainties of reproject's resampling (the same mask pixels exactly)."""
    import psfdeconv.cutouts as cutouts

    rng = np.random.default_rng(12)
    shape = (180, 160)
    data = rng.normal(0.0, 1.0, shape) + gaussian_image(shape, SOURCES, 2.0)
    mask = rng.random(shape) < 0.05
    exposures = {'r': CCDData(np.zeros(shape), unit='adu', wcs=tan_wcs(shape)),
                 'i': CCDData(data, unit='adu', mask=mask, wcs=_shifted_tan(shape, (0.4, -0.3)),
                              uncertainty=StdDevUncertainty(np.full(shape, 1.5)))}
    fast, _ = align_bands(exposures, reference='r')
    original = cutouts._pixel_shift
    cutouts._pixel_shift = lambda *args: None
    try:
        slow, _ = align_bands(exposures, reference='r')
    finally:
        cutouts._pixel_shift = original
    assert fast['i'].meta['kernel'] == 'hann'
    assert_array_equal(fast['i'].mask, slow['i'].mask)
    assert_array_equal(np.isnan(fast['i'].data), np.isnan(slow['i'].data))
    assert_allclose(fast['i'].data, slow['i'].data, rtol=0,
                    atol=1e-8 * np.nanmax(np.abs(slow['i'].data)))
    assert_allclose(fast['i'].uncertainty.array, slow['i'].uncertainty.array, rtol=1e-8)


def test_align_to_reference_leaves_a_band_on_the_reference_grid_untouched():
    ref_wcs = tan_wcs(REF_SHAPE)
    rng = np.random.default_rng(2)
    exposures = {band: CCDData(rng.normal(size=REF_SHAPE), unit='adu', wcs=ref_wcs.deepcopy())
                 for band in ('g', 'r', 'i')}
    shifted = ref_wcs.deepcopy()
    shifted.wcs.crpix = np.asarray(shifted.wcs.crpix) + (0.25, 0.0)
    exposures['i'] = CCDData(exposures['i'].data, unit='adu', wcs=shifted)
    aligned, reprojected = align_to_reference(exposures, 'r')
    assert reprojected == {'g': False, 'r': False, 'i': True}
    assert aligned['g'] is exposures['g'] and aligned['r'] is exposures['r']
    assert aligned['i'] is not exposures['i']
    assert_array_equal(aligned['i'].wcs.wcs.crpix, ref_wcs.wcs.crpix)
    # A quarter-pixel shift moves the values: the band was resampled.
    assert not np.allclose(aligned['i'].data[5:-5, 5:-5], exposures['i'].data[5:-5, 5:-5])
