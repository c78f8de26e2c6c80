# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the PSF sources for real survey frames (psfdeconv.psf): the Moffat fallback
for frames with few stars, NDData.psf, PSF files with their pixel scale and
oversampling, and PSFEx models."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, NDData
from numpy.testing import assert_allclose

from psfdeconv import psf as psfmod
from psfdeconv.exceptions import InvalidPSFError
from psfdeconv.io import pixel_scale_of, read_exposure
from psfdeconv.psf import (
    PSFExModel,
    build_epsf,
    build_psfs,
    fit_moffat_psf,
    moffat_psf,
    psf_from_spec,
    read_psf_image,
    read_psfex,
    render_psf,
    render_stamp_psfs,
    write_psf_image,
)

DATA = Path(__file__).parent / 'data'
DECAM = DATA / 'decam-r-N6.fits'
DECAM_PSFEX = DATA / 'decam-r-psfex.fits'
CTIO = DATA / 'ctio-mosaic2-cdfs-I.fits'
#: The DECam header's FWHM (pixels, "Median FWHM in pixels").
DECAM_HEADER_FWHM = 4.022961


def _read(path):
    # Real headers carry non-standard cards; read_exposure records the warnings.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return read_exposure(path)


def _fwhm_pixels(model, position=None):
    """FWHM (pixels) of a PSF model as seen on the detector (with the pixel): the
    diameter of the disc with the area above half the peak, on a 0.1-pixel grid."""
    import galsim

    if isinstance(model, PSFExModel):
        x, y = model.default_position if position is None else position
        profile = model._psfex.getPSF(galsim.PositionD(x + 1, y + 1))
        image = profile.drawImage(nx=401, ny=401, scale=0.1, method='no_pixel').array
    else:
        grid = (np.arange(401) - 200) * 0.1
        yy, xx = np.meshgrid(grid, grid, indexing='ij')
        copy = model.copy()
        copy.x_0, copy.y_0, copy.flux = 0.0, 0.0, 1.0
        image = copy(xx, yy)
    return 2.0 * np.sqrt((image >= image.max() / 2).sum() * 0.01 / np.pi)


# --- 1. The Moffat fallback ----------------------------------------------------------------

def _elliptical_moffat_field(fwhm=4.0, beta=3.0, e1=0.06, e2=-0.04, seed=5):
    """A 120x120 frame with 3 stars of a known elliptical Moffat (GalSim, pixel
    integrated), a background of 10 and noise of sigma 1."""
    import galsim

    rng = np.random.default_rng(seed)
    image = galsim.ImageD(120, 120, scale=1.0)
    profile = galsim.Moffat(beta=beta, fwhm=fwhm).shear(e1=e1, e2=e2)
    for (x, y), flux in zip([(30.3, 35.6), (85.7, 40.2), (55.1, 90.8)],
                            [30000.0, 20000.0, 12000.0], strict=True):
        stamp = (profile * flux).drawImage(image=image.copy(), center=(x + 1, y + 1),
                                           add_to_image=False)
        image += stamp
    return image.array + 10.0 + rng.standard_normal((120, 120))


def test_moffat_fit_recovers_an_elliptical_moffat_from_three_stars():
    fwhm, beta, e1, e2 = 4.0, 3.0, 0.06, -0.04
    image = _elliptical_moffat_field(fwhm, beta, e1, e2)
    psf = fit_moffat_psf(image)
    assert psf.meta['n_stars'] == 3
    assert abs(psf.meta['fwhm_pixels'] / fwhm - 1) < 0.05
    assert abs(psf.meta['e1'] - e1) < 0.03
    assert abs(psf.meta['e2'] - e2) < 0.03
    # The rendered model is the Moffat of the fitted parameters (moffat_psf).
    truth = render_psf(moffat_psf(fwhm, beta, pixel_scale=1.0, e1=e1, e2=e2), size=25)
    assert np.abs(render_psf(psf, size=25) - truth).max() < 0.03 * truth.max()


def test_build_psfs_falls_back_to_a_moffat_with_too_few_stars():
    image = _elliptical_moffat_field()
    models, sources = build_psfs({'r': NDData(image)})
    model = models['r']
    assert model.meta['psf_fallback'] is True
    assert model.meta['n_stars'] == 3
    assert sources['r'] == 'moffat fit (3 stars; too few for an ePSF)'
    # 'epsf' asks for the same thing, with the same fallback.
    _, sources = build_psfs({'r': NDData(image)}, 'epsf')
    assert sources['r'].startswith('moffat fit (3 stars')
    # Without the fallback the ePSF error stands.
    with pytest.raises(InvalidPSFError, match="band 'r'.*min_stars"):
        build_psfs({'r': NDData(image)}, fallback=False)


def test_bad_epsf_options_are_not_a_reason_to_fall_back():
    with pytest.raises(InvalidPSFError, match="band 'r': size = 24; .* must be odd"):
        build_psfs({'r': NDData(_elliptical_moffat_field())}, epsf_options={'size': 24})


def test_no_star_at_all_raises_naming_the_band_and_the_fixes():
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidPSFError) as info:
        build_psfs({'i': NDData(rng.standard_normal((80, 80)))})
    message = str(info.value)
    assert "band 'i'" in message
    assert 'stars = 0' in message
    assert '--psf moffat:fwhm=' in message and 'psf=FILE' in message


def test_ctio_i_falls_back_and_agrees_with_its_epsf():
    exposure = _read(CTIO)
    models, sources = build_psfs({'I': exposure})
    model = models['I']
    assert model.meta['psf_fallback'] is True
    assert sources['I'].startswith('moffat fit (') and 'too few for an ePSF' in sources['I']
    assert model.meta['n_stars'] >= 3
    # The ePSF of the same frame with min_stars lowered (4 stars pass; more iterations
    # wander off centre with so few stars): the FWHM of a Moffat fitted to each rendered
    # PSF agree (measured 8.83 and 9.23 px).
    epsf = build_epsf(exposure, min_stars=3, maxiters=3)
    fwhm = []
    for psf in (model, epsf):
        array = render_psf(psf, size=41)[None]
        fwhm.append(psfmod._fit_moffat(array, np.ones_like(array), np.zeros((1, 2)),
                                       8.0)['fwhm'])
    assert abs(fwhm[0] / fwhm[1] - 1) < 0.1


def test_decam_n6_falls_back_with_the_header_fwhm():
    exposure = _read(DECAM)
    models, sources = build_psfs({'r': exposure})
    model = models['r']
    assert model.meta['psf_fallback'] is True
    assert 'too few for an ePSF' in sources['r']
    assert_allclose(model.meta['pixel_scale'], 0.2624, rtol=1e-3)
    # Within 10 percent of the header's FWHM (4.02 px); measured 3.74 px.
    assert abs(_fwhm_pixels(model) / DECAM_HEADER_FWHM - 1) < 0.1


# --- 2. NDData.psf -------------------------------------------------------------------------

def test_nddata_psf_is_used_by_default_and_kept_by_read_exposure():
    image = _elliptical_moffat_field()
    own = render_psf(moffat_psf(4.0, 3.0, pixel_scale=1.0), size=20 - 1)[:-1, :-1]  # even
    exposure = CCDData(image, unit='adu', psf=3.0 * own)
    again = read_exposure(exposure, require_wcs=False)
    assert_allclose(again.psf, 3.0 * own)
    models, sources = build_psfs({'r': again})
    assert sources['r'] == 'NDData.psf'
    assert models['r'].data.shape == (19, 19)          # padded to odd
    assert_allclose(models['r'].data.sum(), 1.0)
    assert np.unravel_index(models['r'].data.argmax(), (19, 19)) == (9, 9)
    # 'epsf' still forces the stars' PSF.
    _, sources = build_psfs({'r': again}, 'epsf')
    assert sources['r'].startswith('moffat fit')


@pytest.mark.parametrize(('psf', 'match'), [
    (np.full((5, 5), np.nan), 'NaN/inf'),
    (np.zeros((5, 5)), 'sums to 0.0'),
    (np.ones((3, 3, 3)), 'shape'),
])
def test_bad_nddata_psf_is_refused(psf, match):
    image = _elliptical_moffat_field()
    with pytest.raises(InvalidPSFError, match=f"band 'r': NDData.psf.*{match}"):
        build_psfs({'r': NDData(image, psf=psf)})


# --- 3. PSF files --------------------------------------------------------------------------

def test_write_read_round_trip_with_photutils(tmp_path):
    from photutils.psf import ImagePSF

    model = moffat_psf(0.9, 3.0, pixel_scale=0.25, e1=0.05, size=21)
    path = write_psf_image(model, tmp_path / 'psf.fits', pixel_scale=0.25)
    data, header = fits.getdata(path, header=True)
    assert header['OVERSAMP'] == 2
    assert_allclose(header['PIXSCALE'], 0.125)
    assert_allclose(data.sum(), 4.0)
    photutils_psf = ImagePSF(data, oversampling=header['OVERSAMP'], x_0=15, y_0=15)
    yy, xx = np.mgrid[:31, :31]
    native = photutils_psf(xx, yy)
    expected = render_psf(model, size=31)
    assert np.abs(native - expected).max() < 1e-3 * expected.max()
    # And read_psf_image gives the same model back.
    again = read_psf_image(path, pixel_scale=0.25)
    assert 'resampled_from' not in again.meta
    assert np.abs(render_psf(again, size=31) - expected).max() < 1e-6


def test_old_files_summing_to_one_read_the_same(tmp_path):
    model = moffat_psf(0.9, 3.0, pixel_scale=0.25, size=21)
    path = tmp_path / 'old.fits'
    fits.PrimaryHDU(model.data / model.data.sum(),
                    header=fits.Header([('OVERSAMP', 2)])).writeto(path)
    again = read_psf_image(path)
    assert_allclose(again.data.sum(), 4.0)
    assert np.abs(render_psf(again, size=31) - render_psf(model, size=31)).max() < 1e-12


@pytest.mark.parametrize(('cards', 'scale'), [
    ([('PIXSCALE', 0.2)], 0.2),
    ([('PIXSCAL1', 0.2)], 0.2),
    ([('SECPIX', 0.2)], 0.2),
    ([('CDELT1', -0.2 / 3600)], 0.2),
    ([('CD1_1', -0.2 / 3600), ('CD2_2', 0.2 / 3600)], 0.2),
    ([], None),
])
def test_pixel_scale_keywords(tmp_path, cards, scale):
    path = tmp_path / 'psf.fits'
    data = render_psf(moffat_psf(1.0, 3.0, pixel_scale=0.2, size=21), size=21)
    fits.PrimaryHDU(data, header=fits.Header(cards)).writeto(path)
    psf = read_psf_image(path)
    assert psf.meta['pixel_scale'] == pytest.approx(scale)


def test_a_file_at_another_scale_is_resampled(tmp_path):
    # A FWHM 1 arcsec Moffat sampled at 0.2 arcsec, used on 0.25 arcsec pixels.
    path = tmp_path / 'psf.fits'
    fine = render_psf(moffat_psf(1.0, 3.0, pixel_scale=0.2, size=41), size=41)
    fits.PrimaryHDU(fine, header=fits.Header([('PIXSCALE', 0.2)])).writeto(path)
    exposure = NDData(_elliptical_moffat_field(), wcs=_tan_wcs(0.25))
    models, sources = build_psfs({'r': exposure}, f'psf={path}')
    assert sources['r'] == f'psf={path} (resampled from 0.2 to 0.25 arcsec/pixel)'
    model = models['r']
    assert model.meta['resampled_from'] == pytest.approx(0.2)
    expected = render_psf(moffat_psf(1.0, 3.0, pixel_scale=0.25), size=25)
    got = render_psf(model, size=25)
    # The resampling kernel widens the PSF slightly.
    assert np.abs(got - expected).max() < 0.05 * expected.max()


def _tan_wcs(scale_arcsec):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [60.0, 60.0]
    wcs.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    return wcs


# --- 4. PSFEx ------------------------------------------------------------------------------

def test_psfex_renders_unit_sum_centred_with_the_header_fwhm():
    model = read_psf_image(DECAM_PSFEX)
    assert isinstance(model, PSFExModel)
    for position in [(0.0, 0.0), (140.0, 187.0), (279.0, 374.0)]:
        psf = render_psf(model, position, size=31)
        assert_allclose(psf.sum(), 1.0)
        # Centroid of the core (9x9 pixels): the full first moment is pulled by 0.1 px
        # by the basis's faint wings.
        core = psf[11:20, 11:20]
        yy, xx = np.mgrid[-4:5, -4:5]
        assert abs((core * xx).sum() / core.sum()) < 0.1
        assert abs((core * yy).sum() / core.sum()) < 0.1
    # Measured 3.88 px against the header's 4.02.
    assert abs(_fwhm_pixels(model, (140.0, 187.0)) / DECAM_HEADER_FWHM - 1) < 0.1


def test_psfex_varies_across_the_frame_and_renders_per_stamp():
    model = psf_from_spec(f'psf={DECAM_PSFEX}')
    assert isinstance(model, PSFExModel)
    stamps = render_stamp_psfs(model, np.array([0.0, 279.0, np.nan]),
                               np.array([0.0, 374.0, 5.0]), psf_size=25, aligned_meta={})
    assert stamps.shape == (3, 25, 25)
    assert_allclose(stamps.sum(axis=(1, 2)), 1.0)
    assert np.abs(stamps[0] - stamps[1]).max() > 1e-5
    assert_allclose(stamps[2], render_psf(model, model.default_position, size=25))
    models, sources = build_psfs({'r': _read(DECAM)}, f'psf={DECAM_PSFEX}')
    assert sources['r'] == f'psf={DECAM_PSFEX}'


def test_psfex_offset_shifts_the_polynomial():
    model = read_psfex(DECAM_PSFEX, offset=(100.0, -50.0))
    plain = read_psfex(DECAM_PSFEX)
    assert_allclose(render_psf(model, (40.0, 100.0), size=25),
                    render_psf(plain, (140.0, 50.0), size=25))


def test_not_a_psfex_file(tmp_path):
    path = tmp_path / 'table.fits'
    fits.BinTableHDU.from_columns([fits.Column(name='a', format='E',
                                               array=np.ones(2))]).writeto(path)
    with pytest.raises(InvalidPSFError, match='no PSFEx table'):
        read_psfex(path)


def test_pixel_scale_of_decam():
    assert_allclose(pixel_scale_of(_read(DECAM).wcs).value, 0.2624, rtol=1e-3)


def test_the_psf_file_of_a_run_reads_in_photutils(example_run):
    """psf_<band>.fits of `psfdeconv run --example` is the run's PSF for photutils too."""
    from photutils.psf import ImagePSF

    from psfdeconv.io import example_exposures

    assert example_run.code == 0
    paths, _ = example_exposures()
    exposures = {band: read_exposure(path) for band, path in paths.items()}
    models, _ = build_psfs(exposures)            # what the run used (--psf epsf)
    for band, model in models.items():
        data, header = fits.getdata(example_run.out / f'psf_{band}.fits', header=True)
        oversampling = header['OVERSAMP']
        assert_allclose(data.sum(), oversampling ** 2)
        assert_allclose(header['PIXSCALE'] * oversampling,
                        pixel_scale_of(exposures[band].wcs).value, rtol=1e-6)
        # A grid covering the whole array, so that render_psf's renormalisation to
        # unit sum does not hide a wrong normalisation of the file.
        size = 2 * (data.shape[0] // oversampling) + 1
        yy, xx = np.mgrid[:size, :size]
        native = ImagePSF(data, oversampling=oversampling, x_0=size // 2,
                          y_0=size // 2)(xx, yy)
        expected = render_psf(model, size=size)
        # Sampled at native pixel centres, an oversampled ePSF array (one phase of its
        # fine pixels) sums to 1 only on average over the phases; photutils 3.0's ePSF
        # is uneven at the 0.2 percent level (measured sums 1.0016, 1.0003, 1.0009 for
        # g, r, i), which render_psf's renormalisation removes.
        assert abs(native.sum() - 1) < 3e-3
        assert np.abs(native / native.sum() - expected).max() < 1e-3 * expected.max()
