# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.io.read_exposure and pixel_scale_of, on real and synthetic files."""

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, NDData, StdDevUncertainty, VarianceUncertainty
from astropy.wcs import WCS, FITSFixedWarning
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.exceptions import InvalidInputError, InvalidPixelsError, PSFDeconvWarning
from psfdeconv.io import pixel_scale_of, read_exposure
from psfdeconv.io.exposures import _header_warnings_into

SHAPE = (40, 50)


def tan_header(shape=SHAPE, scale=0.25):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [53.1, -27.8]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    wcs.wcs.cdelt = [-scale / 3600, scale / 3600]
    return wcs.to_header()


def image(shape=SHAPE, seed=3):
    return np.random.default_rng(seed).normal(100.0, 5.0, shape)


def write(path, *hdus):
    fits.HDUList(list(hdus)).writeto(path)
    return path


@pytest.fixture
def simple_file(tmp_path):
    return write(tmp_path / 'simple.fits', fits.PrimaryHDU(image(), header=tan_header()))


# --- Real files ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def real_dir():
    for base in (Path(__file__).resolve().parents[2] / 'shared', Path('/work/shared')):
        path = base / 'data' / 'real'
        if path.is_dir():
            return path
    pytest.skip('the shared real-data directory is not available')


def test_real_ctio_tpv_big_endian(real_dir):
    path = real_dir / 'ctio-mosaic2-cdfs-I.fits'
    exposure = read_exposure(path)
    raw = fits.getdata(path)
    assert raw.dtype.byteorder == '>'
    assert exposure.data.dtype == np.float64 and exposure.data.dtype.isnative
    assert_array_equal(exposure.data, raw.astype(np.float64))
    assert exposure.shape == (512, 512) and not exposure.mask.any()
    assert exposure.wcs.has_celestial and exposure.wcs.pixel_shape == (512, 512)
    assert exposure.unit == u.dimensionless_unscaled
    assert exposure.meta['unit_source'] == 'assumed'
    assert exposure.meta['n_nonfinite'] == 0 and exposure.meta['hdu'] == 0
    assert any('RADECSYS' in text for text in exposure.meta['fits_warnings'])
    assert exposure.meta['header']['EXPTIME'] == exposure.meta['EXPTIME']
    # The linear (CD) scales differ by 1.5 percent: warned. Locally, with the TPV
    # distortion, the pixels are square to 0.3 percent.
    with pytest.warns(PSFDeconvWarning, match='differ by 1.48 percent'):
        linear = pixel_scale_of(exposure.wcs)
    assert linear.to_value(u.arcsec / u.pix) == pytest.approx(0.2626, abs=1e-4)
    local = pixel_scale_of(exposure.wcs, position=(255.5, 255.5))
    assert local.to_value(u.arcsec / u.pix) == pytest.approx(0.2591, abs=1e-4)


def test_real_ctio_tnx_raw_uint16(real_dir):
    path = real_dir / 'ctio-mosaic2-bulge-z-raw.fits'
    exposure = read_exposure(path)
    with fits.open(path) as hdulist:
        assert hdulist[0].header['BZERO'] == 32768
        raw = hdulist[0].data
        assert raw.dtype == np.uint16
        assert_array_equal(exposure.data, raw.astype(np.float64))
    assert exposure.data.min() == 1963.0
    # Non-standard CD cards: astropy fixes them with VerifyWarnings, recorded not raised.
    cards = [text for text in exposure.meta['fits_warnings'] if 'CD1_1' in text]
    assert cards and cards[0].startswith('VerifyWarning')
    # WCSLIB applies the TNX distortion: the WCS differs from its linear TAN part by
    # arcseconds at the corner.
    header = exposure.meta['header'].copy()
    for key in [k for k in header if k.startswith('WAT')]:
        del header[key]
    header['CTYPE1'], header['CTYPE2'] = 'RA---TAN', 'DEC--TAN'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', fits.verify.VerifyWarning)
        linear = WCS(header)
    offset = exposure.wcs.pixel_to_world(0, 0).separation(linear.pixel_to_world(0, 0))
    assert offset.arcsec > 1.0
    assert pixel_scale_of(exposure.wcs).to_value(u.arcsec / u.pix) == pytest.approx(
        0.2676, abs=1e-4)


def test_real_decam_compressed_with_weight_file(real_dir):
    weight_path = real_dir / 'decam-r-N6-weight.fits'
    exposure = read_exposure(real_dir / 'decam-r-N6.fits', weight_hdu=weight_path)
    assert exposure.meta['hdu'] == 1  # the tile-compressed image HDU, found automatically
    assert exposure.shape == (375, 280)
    weight = fits.getdata(weight_path, 1).astype(np.float64)
    assert isinstance(exposure.uncertainty, StdDevUncertainty)
    assert_allclose(exposure.uncertainty.array, 1 / np.sqrt(weight), rtol=1e-12)
    assert exposure.mask.sum() == np.sum(weight <= 0)
    # The CCD extension says INHERIT = T: it gets the primary header's keywords, whose
    # RADECSYS and MJD-END astropy repairs (recorded, not raised).
    assert 'RADESYS' in exposure.meta['inherited_keywords']
    assert all(text.startswith('FITSFixedWarning') and ('RADECSYS' in text or 'MJD-END'
                                                        in text)
               for text in exposure.meta['fits_warnings'])
    assert pixel_scale_of(exposure.wcs).to_value(u.arcsec / u.pix) == pytest.approx(
        0.2624, abs=1e-4)


def test_real_eso_without_celestial_wcs(real_dir):
    path = real_dir / 'eso-ntt-emmi-R.fits'
    with pytest.raises(InvalidInputError,
                       match=r"eso-ntt-emmi-R.fits has no celestial WCS .*astrometry\.net.*"
                             r"--pixel-scale"):
        read_exposure(path)
    exposure = read_exposure(path, require_wcs=False)
    assert exposure.wcs is None and exposure.shape == (256, 256)
    assert any('ESO-LOG' in text for text in exposure.meta['fits_warnings'])


def test_real_sdss_nanomaggy(real_dir):
    exposure = read_exposure(real_dir / 'sdss-ngc6976-r.fits')
    assert exposure.unit == u.nmgy and exposure.meta['unit_source'] == 'BUNIT'
    assert exposure.shape == (496, 682)
    assert pixel_scale_of(exposure.wcs).to_value(u.arcsec / u.pix) == pytest.approx(
        1.1877, abs=1e-4)


# --- Synthetic files: success paths ----------------------------------------------------------

def test_scaled_integer_data(tmp_path):
    hdu = fits.PrimaryHDU(np.arange(SHAPE[0] * SHAPE[1], dtype=np.int16).reshape(SHAPE),
                          header=tan_header())
    hdu.header['BSCALE'], hdu.header['BZERO'] = 0.5, 1000.0
    path = tmp_path / 'scaled.fits'
    hdu.writeto(path)
    exposure = read_exposure(path, unit='adu')
    assert exposure.data.dtype == np.float64
    assert exposure.data[0, 1] == 1000.5 and exposure.unit == u.adu
    assert exposure.meta['unit_source'] == 'argument'


def test_nonfinite_pixels_are_masked_not_interpolated(tmp_path):
    data = image()
    data[3, 4], data[10, 11], data[20, 21] = np.nan, np.inf, -np.inf
    path = write(tmp_path / 'nan.fits', fits.PrimaryHDU(data, header=tan_header()))
    exposure = read_exposure(path)
    assert exposure.meta['n_nonfinite'] == 3 and exposure.meta['n_masked'] == 3
    assert exposure.mask[3, 4] and exposure.mask[10, 11] and exposure.mask[20, 21]
    assert np.isnan(exposure.data[3, 4]) and np.isposinf(exposure.data[10, 11])


def test_mask_weight_and_uncertainty_hdus(tmp_path):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5, 6] = 4
    weight = np.full(SHAPE, 0.25, dtype=np.float32)
    weight[7, 8], weight[9, 10] = 0.0, -1.0
    path = write(tmp_path / 'mef.fits', fits.PrimaryHDU(header=tan_header()),
                 fits.ImageHDU(image(), header=tan_header(), name='SCI'),
                 fits.ImageHDU(mask, name='MASK'), fits.ImageHDU(weight, name='WHT'))
    exposure = read_exposure(path, mask_hdu='MASK', weight_hdu='WHT')
    assert exposure.meta['hdu'] == 1
    assert_array_equal(np.argwhere(exposure.mask), [[5, 6], [7, 8], [9, 10]])
    sigma = exposure.uncertainty.array
    assert sigma[0, 0] == 2.0 and np.isinf(sigma[7, 8]) and np.isinf(sigma[9, 10])
    # By index, and the same HDU as an uncertainty of the kind its UTYPE says.
    variance = fits.ImageHDU(np.full(SHAPE, 9.0), name='VAR')
    variance.header['UTYPE'] = 'VarianceUncertainty'
    path2 = write(tmp_path / 'var.fits', fits.PrimaryHDU(image(), header=tan_header()),
                  variance)
    exposure = read_exposure(path2, uncertainty_hdu=1)
    assert_allclose(exposure.uncertainty.array, 3.0)


def test_separate_mask_file(tmp_path, simple_file):
    mask = np.zeros(SHAPE, dtype=np.int16)
    mask[0, :5] = 1
    mask_path = write(tmp_path / 'mask.fits', fits.PrimaryHDU(mask))
    exposure = read_exposure(simple_file, mask_hdu=str(mask_path))
    assert exposure.mask.sum() == 5
    exposure = read_exposure(simple_file, mask_hdu=(mask_path, 0))
    assert exposure.mask.sum() == 5
    small = write(tmp_path / 'small.fits', fits.PrimaryHDU(np.zeros((4, 4))))
    with pytest.raises(InvalidInputError, match=r'has shape \(4, 4\) but the image has '
                                                r'\(40, 50\)'):
        read_exposure(simple_file, mask_hdu=small)


def test_cube_planes(tmp_path):
    cube = np.stack([image(seed=1), image(seed=2), image(seed=3)])
    header = tan_header()
    path = write(tmp_path / 'cube.fits', fits.PrimaryHDU(cube, header=header))
    with pytest.raises(InvalidInputError, match=r'3-D cube of shape \(3, 40, 50\).*'
                                                r'plane=0\.\.2'):
        read_exposure(path)
    exposure = read_exposure(path, plane=1)
    assert_array_equal(exposure.data, cube[1])
    assert exposure.wcs.naxis == 2 and exposure.wcs.has_celestial
    with pytest.raises(InvalidInputError, match='plane = 5, but .* has 3 planes'):
        read_exposure(path, plane=5)
    single = write(tmp_path / 'single.fits', fits.PrimaryHDU(cube[:1], header=header))
    assert read_exposure(single).shape == SHAPE  # a length-1 axis is dropped


def test_header_fix_warnings_are_recorded(tmp_path):
    header = tan_header()
    header['RADECSYS'] = 'ICRS'
    path = write(tmp_path / 'old.fits', fits.PrimaryHDU(image(), header=header))
    exposure = read_exposure(path)  # pytest turns warnings into errors: none escape
    assert any(text.startswith('FITSFixedWarning') and 'RADECSYS' in text
               for text in exposure.meta['fits_warnings'])


def test_header_warning_filter_is_narrow():
    store = []
    with pytest.warns(UserWarning, match='something else'):
        with _header_warnings_into(store):
            warnings.warn('a fixed card', FITSFixedWarning, stacklevel=1)
            warnings.warn('something else', UserWarning, stacklevel=1)
    assert store == ['FITSFixedWarning: a fixed card']


def test_units_from_bunit(tmp_path):
    header = tan_header()
    header['BUNIT'] = 'ELECTRONS/S'
    path = write(tmp_path / 'e.fits', fits.PrimaryHDU(image(), header=header))
    assert read_exposure(path).unit == u.electron / u.s
    header['BUNIT'] = 'furlongs of light'
    path = write(tmp_path / 'odd.fits', fits.PrimaryHDU(image(), header=header))
    with pytest.warns(PSFDeconvWarning, match="BUNIT = 'furlongs of light'"):
        exposure = read_exposure(path)
    assert exposure.unit == u.dimensionless_unscaled
    with pytest.raises(InvalidInputError, match="unit = 'parsecs per florin'"):
        read_exposure(path, unit='parsecs per florin')


def test_written_back_with_the_header(tmp_path, simple_file):
    exposure = read_exposure(simple_file, unit='adu')
    out = tmp_path / 'out.fits'
    CCDData(exposure, meta=exposure.meta['header']).write(out)
    again = read_exposure(out)
    assert_array_equal(again.data, exposure.data)
    assert again.unit == u.adu


# --- Synthetic files: errors -----------------------------------------------------------------

def test_missing_extension_names_the_ones_present(simple_file):
    with pytest.raises(InvalidInputError,
                       match=r"has no mask HDU 'MASK'; its HDUs are 0 \('PRIMARY'\)"):
        read_exposure(simple_file, mask_hdu='MASK')
    with pytest.raises(InvalidInputError, match='has no image HDU 3'):
        read_exposure(simple_file, hdu=3)


def test_weight_and_uncertainty_together(simple_file):
    with pytest.raises(InvalidInputError, match='not both'):
        read_exposure(simple_file, weight_hdu=0, uncertainty_hdu=0)


def test_not_fits_and_missing_files(tmp_path):
    text = tmp_path / 'notes.fits'
    text.write_text('not a FITS file at all\n' * 10)
    with pytest.raises(InvalidInputError, match='notes.fits is not a readable FITS file'):
        read_exposure(text)
    with pytest.raises(InvalidInputError, match='does not exist'):
        read_exposure(tmp_path / 'absent.fits')
    with pytest.raises(InvalidInputError, match='cannot read an exposure from a list'):
        read_exposure([1, 2])


def test_no_image_data(tmp_path):
    path = write(tmp_path / 'empty.fits', fits.PrimaryHDU(header=tan_header()))
    with pytest.raises(InvalidInputError, match='has no image data'):
        read_exposure(path)


def test_constant_and_blank_images(tmp_path):
    path = write(tmp_path / 'flat.fits', fits.PrimaryHDU(np.zeros(SHAPE),
                                                         header=tan_header()))
    with pytest.raises(InvalidInputError, match=r'is constant \(every unmasked pixel = '
                                                r'0\.0\)'):
        read_exposure(path)
    path = write(tmp_path / 'nan.fits', fits.PrimaryHDU(np.full(SHAPE, np.nan),
                                                        header=tan_header()))
    with pytest.raises(InvalidPixelsError, match='every pixel .* is NaN or infinite'):
        read_exposure(path)
    path = write(tmp_path / 'masked.fits', fits.PrimaryHDU(image(), header=tan_header()),
                 fits.ImageHDU(np.ones(SHAPE, dtype=np.uint8), name='MASK'))
    with pytest.raises(InvalidPixelsError, match='every pixel .* is masked'):
        read_exposure(path, mask_hdu='MASK')


def test_linear_wcs_is_not_celestial(tmp_path):
    header = fits.Header()
    header['CTYPE1'], header['CTYPE2'] = 'LINEAR', 'LINEAR'
    path = write(tmp_path / 'linear.fits', fits.PrimaryHDU(image(), header=header))
    with pytest.raises(InvalidInputError, match=r"no celestial WCS \(CTYPE = \['LINEAR', "
                                                r"'LINEAR'\]\)"):
        read_exposure(path)
    assert read_exposure(path, require_wcs=False).wcs is None


# --- NDData input ----------------------------------------------------------------------------

def test_nddata_input_is_validated_and_copied():
    data = image()
    data[1, 2] = np.nan
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3, 3] = True
    original = NDData(data, mask=mask, wcs=WCS(tan_header()),
                      uncertainty=VarianceUncertainty(np.full(SHAPE, 4.0)), unit='adu',
                      meta={'SATURATE': 5000.0})
    exposure = read_exposure(original)
    assert exposure.data is not data and not np.shares_memory(exposure.data, data)
    assert exposure.mask[1, 2] and exposure.mask[3, 3] and not mask[1, 2]
    assert exposure.meta['n_nonfinite'] == 1 and exposure.meta['SATURATE'] == 5000.0
    assert exposure.unit == u.adu and exposure.meta['unit_source'] == 'input'
    assert_allclose(exposure.uncertainty.array, 2.0)
    exposure.data[5, 5] = -1
    assert data[5, 5] != -1
    with pytest.raises(InvalidInputError, match='no celestial WCS'):
        read_exposure(NDData(image()))
    assert read_exposure(NDData(image()), require_wcs=False).wcs is None


# --- pixel_scale_of --------------------------------------------------------------------------

def test_pixel_scale_of():
    wcs = WCS(tan_header(scale=0.3))
    scale = pixel_scale_of(wcs)
    assert scale.unit == u.arcsec / u.pix
    assert scale.value == pytest.approx(0.3, rel=1e-12)
    assert pixel_scale_of(wcs, position=(10.0, 30.0)).value == pytest.approx(0.3, rel=1e-6)
    wcs.wcs.cdelt = [-0.3 / 3600, 0.31 / 3600]
    with pytest.warns(PSFDeconvWarning, match='differ by 3.33 percent'):
        scale = pixel_scale_of(wcs)
    assert scale.value == pytest.approx(np.sqrt(0.3 * 0.31), rel=1e-9)
    with pytest.raises(InvalidInputError, match='no celestial WCS'):
        pixel_scale_of(WCS(naxis=2))
    with pytest.raises(InvalidInputError, match='position'):
        pixel_scale_of(WCS(tan_header()), position=(1.0,))
