# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.psf: star selection, ePSF, Moffat, files, gridded, rendering."""

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import NDData
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv import psf as psfmod
from psfdeconv.exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPSFError,
    OutputExistsError,
    PixelScaleError,
    PSFDeconvWarning,
)
from psfdeconv.psf import (
    build_epsf,
    build_gridded_psf,
    find_stars,
    moffat_psf,
    psf_from_spec,
    read_psf_image,
    render_psf,
    write_psf_image,
)

# --- The simulated exposure ---------------------------------------------------------------
# 401x401 pixels, 80 Moffat stars (photutils MoffatPSF, alpha = 3.9 px, beta = 3, FWHM
# 3.98 px, sampled at pixel centres by make_psf_model_image), four round Gaussian galaxies
# (sigma 6 px, FWHM 14 px), one star 20x brighter than the rest that is clipped at the
# saturation level, a background of 50 and Gaussian noise of sigma 1.

SHAPE = (401, 401)
ALPHA, BETA = 3.9, 3.0
BACKGROUND = 50.0
SATURATION = 5000.0
GALAXIES = [(60.3, 340.2), (330.7, 70.1), (250.2, 250.9), (120.5, 130.5)]
GALAXY_SIGMA = 6.0


def _isolated_spot(truth, avoid, shape, min_distance=30):
    """The first point of a coarse grid at least min_distance px from every
    star and galaxy."""
    xy = np.concatenate([np.transpose([truth['x_0'], truth['y_0']]), avoid])
    for y in range(40, shape[0] - 40, 5):
        for x in range(40, shape[1] - 40, 5):
            if np.hypot(xy[:, 0] - x, xy[:, 1] - y).min() >= min_distance:
                return float(x) + 0.3, float(y) - 0.2
    raise RuntimeError('no isolated spot')  # pragma: no cover


def simulated_field(seed=2):
    """Image, true-star table, saturated-star position and the true PSF model."""
    from photutils.datasets import make_noise_image
    from photutils.psf import MoffatPSF, make_psf_model_image

    true_psf = MoffatPSF(alpha=ALPHA, beta=BETA)
    image, truth = make_psf_model_image(SHAPE, true_psf, 80, model_shape=(41, 41),
                                        min_separation=20, border_size=14,
                                        flux=(3000, 30000), seed=seed)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    for x, y in GALAXIES:
        image += (8000 / (2 * np.pi * GALAXY_SIGMA**2)
                  * np.exp(-((xx - x)**2 + (yy - y)**2) / (2 * GALAXY_SIGMA**2)))
    saturated_xy = _isolated_spot(truth, GALAXIES, SHAPE)
    bright = true_psf.copy()
    bright.x_0, bright.y_0, bright.flux = *saturated_xy, 3e5   # peak ~ 12500
    image += bright(xx, yy)
    image += make_noise_image(SHAPE, mean=BACKGROUND, stddev=1.0, seed=seed + 1)
    image = np.minimum(image, SATURATION)
    return image, truth, saturated_xy, true_psf


@pytest.fixture(scope='module')
def field():
    return simulated_field()


@pytest.fixture(scope='module')
def epsf(field):
    image = field[0]
    return build_epsf(image, saturation=SATURATION)


def fwhm_along_x(model, half_width=10.0, n=4001):
    """FWHM (pixels) of a PSF model from its profile along x through the centre,
    sampled every 0.005 px, with linear interpolation of the half-maximum crossings."""
    x = np.linspace(-half_width, half_width, n)
    m = model.copy()
    m.x_0, m.y_0, m.flux = 0.0, 0.0, 1.0
    profile = m(x, np.zeros_like(x))
    half = profile.max() / 2
    above = np.flatnonzero(profile >= half)
    i0, i1 = above[0], above[-1]
    left = np.interp(half, [profile[i0 - 1], profile[i0]], [x[i0 - 1], x[i0]])
    right = np.interp(half, [profile[i1 + 1], profile[i1]], [x[i1 + 1], x[i1]])
    return right - left


def centroid(image):
    yy, xx = np.indices(image.shape)
    return (xx * image).sum() / image.sum(), (yy * image).sum() / image.sum()


# --- Star selection -------------------------------------------------------------------------

def test_find_stars_rejects_galaxies_and_saturated_star(field):
    image, truth, saturated_xy, _ = field
    everything = find_stars(image, saturation=SATURATION, all_sources=True)
    stars = find_stars(image, saturation=SATURATION)
    assert stars.meta['n_selected'] == len(stars) >= 40
    assert everything.meta['n_detected'] == len(everything) > len(stars)
    for name in ('x', 'y', 'fwhm', 'centroid_shift'):
        assert stars[name].unit == u.pix
    assert_allclose(stars.meta['background'], BACKGROUND, atol=0.2)
    assert_allclose(stars.meta['background_rms'], 1.0, rtol=0.1)
    # The stellar locus is the stars' half-maximum FWHM (true FWHM 3.98 px).
    assert_allclose(stars.meta['fwhm_locus'], 3.98, rtol=0.1)
    # Only the bright detections are deblended and measured for the selection:
    # the same stars, measured the same, as in the table of every detection.
    chosen = everything[everything['selected']]
    assert len(stars) == len(chosen)
    for name in ('x', 'y', 'flux', 'peak', 'fwhm', 'ellipticity', 'centroid_shift'):
        assert_array_equal(np.asarray(stars[name]), np.asarray(chosen[name]))
    assert stars.meta['fwhm_locus'] == everything.meta['fwhm_locus']

    x, y = stars['x'].value, stars['y'].value
    # Every selected star is a true star (centroid within 0.5 px) ...
    distance = np.hypot(x[:, None] - truth['x_0'], y[:, None] - truth['y_0'])
    assert distance.min(axis=1).max() < 0.5
    # ... and none is within 12 px (two galaxy sigma) of a galaxy centre.
    for gx, gy in GALAXIES:
        assert np.hypot(x - gx, y - gy).min() > 2 * GALAXY_SIGMA
        # The detection on the galaxy itself is not point-like.
        near = np.hypot(everything['x'].value - gx, everything['y'].value - gy) < 3
        if near.any():
            assert not everything['point_like'][near].any()
            assert not everything['selected'][near].any()
    # The saturated star is detected, flagged and not selected.
    sx, sy = saturated_xy
    row = np.argmin(np.hypot(everything['x'].value - sx, everything['y'].value - sy))
    assert np.hypot(everything['x'][row].value - sx, everything['y'][row].value - sy) < 1
    assert everything['saturated'][row]
    assert not everything['selected'][row]
    assert np.hypot(x - sx, y - sy).min() > 20
    # Selected rows carry every flag they were selected for.
    assert np.all(stars['isolated'] & stars['point_like'] & ~stars['saturated']
                  & ~stars['edge'] & ~stars['masked'])
    assert np.all(stars['ellipticity'] < 0.25)
    assert np.all(np.diff(stars['flux']) <= 0)   # brightest first


def test_point_sources_on_given_segments_match_find_stars():
    from photutils.segmentation import detect_sources

    from psfdeconv._validation import as_image_and_mask
    from psfdeconv.background import estimate_background
    from psfdeconv.detection import deblend
    from psfdeconv.simulate import simulate_exposure

    exposures, _ = simulate_exposure((400, 400), n_galaxies=20, n_stars=20, seed=5)
    exposure = exposures['r']
    image, bad, meta = as_image_and_mask(exposure)
    background, rms = estimate_background(image, bad)
    subtracted = np.where(bad, 0.0, image - background)
    segments = deblend(subtracted, detect_sources(subtracted, 3.0 * rms, 5, mask=bad), 5)
    reused = psfmod.point_sources(image, bad, background, rms, segments,
                                   threshold_sigma=10.0, meta=meta)
    everything = find_stars(exposure, all_sources=True)
    expected = everything[everything['point_like']]
    point_like = reused[reused['point_like']]
    assert len(point_like) >= 10
    assert_array_equal(point_like['x'], expected['x'])
    assert_array_equal(point_like['y'], expected['y'])
    assert reused.meta['fwhm_locus'] == everything.meta['fwhm_locus']



def test_star_selection_splits_only_bright_segments_and_selects_the_same_stars(monkeypatch):
    # The ePSF and Moffat star selections deblend only the segments whose peak
    # can make a star: the stars, the locus and the selection are those of
    # deblending the whole frame, and the faint segments are never split.
    import photutils.segmentation

    from psfdeconv._validation import as_image_and_mask
    from psfdeconv.background import estimate_background
    from psfdeconv.simulate import simulate_exposure

    exposures, _ = simulate_exposure((400, 400), n_galaxies=40, n_stars=20, seed=5)
    image, bad, _ = as_image_and_mask(exposures['r'])
    background, rms = estimate_background(image, bad)
    threshold_sigma = 10.0
    tables = {}
    for bright_only in (False, True):
        table = psfmod._detect(image, bad, background, rms, threshold_sigma=threshold_sigma,
                               box_size=25, saturation=None, bright_only=bright_only)
        locus = psfmod._select(table, fwhm_guess=None, max_stars=100)
        tables[bright_only] = (table, locus)
    (everything, locus_all), (bright, locus_bright) = tables[False], tables[True]
    assert len(bright) < len(everything)
    assert locus_bright == locus_all
    for name in ('point_like', 'selected'):
        expected = everything[everything[name]]
        found = bright[bright[name]]
        assert len(found) >= 10
        assert_array_equal(np.sort(found['x']), np.sort(expected['x']))
        assert_array_equal(np.sort(found['y']), np.sort(expected['y']))
    # The windowed centroids are measured only where the other compact tests
    # pass, with the values of the whole table there.
    shift = np.asarray(bright['centroid_shift'])
    other_tests = (bright['_bright'] & ~bright['saturated'] & ~bright['edge']
                   & (np.asarray(bright['ellipticity']) < psfmod._MAX_ELLIPTICITY)
                   & (np.asarray(bright['fwhm']) > 0))
    assert 0 < other_tests.sum() < len(bright)
    assert np.isnan(shift[~other_tests]).all()
    same_rows = np.searchsorted(np.asarray(everything['id']), np.asarray(bright['id']))
    assert_array_equal(np.asarray(everything['id'])[same_rows], bright['id'])
    assert_array_equal(shift[other_tests],
                       np.asarray(everything['centroid_shift'])[same_rows][other_tests])

    split = []
    original = photutils.segmentation.deblend_sources

    def spy(data, segment_img, npixels, **kwargs):
        split.append((segment_img.n_labels, kwargs.get('labels')))
        return original(data, segment_img, npixels, **kwargs)

    monkeypatch.setattr(photutils.segmentation, 'deblend_sources', spy)
    build_epsf(exposures['r'], threshold_sigma=threshold_sigma, maxiters=2)
    assert len(split) == 1
    n_segments, labels = split[0]
    assert labels is not None and 0 < len(labels) < n_segments


def test_stellar_locus_is_the_stars_when_compact_galaxies_outnumber_them():
    """A deep frame: 60 compact round galaxies (FWHM ~7 pixels) and 20 stars (FWHM 4.65).
    The largest cluster of FWHMs is the galaxies'; the locus must still be the stars'
    (it was the galaxies', and every star was rejected as too small)."""
    import galsim

    rng = np.random.default_rng(11)
    moffat = galsim.Moffat(beta=3.5, fwhm=4.5)
    image = galsim.ImageF(720, 720, scale=1.0)
    slots = rng.permutation([(x, y) for x in range(40, 700, 44) for y in range(40, 700, 44)])
    is_star = np.zeros(80, dtype=bool)
    is_star[:20] = True
    for (x, y), star in zip(slots[:80], is_star, strict=True):
        flux = rng.uniform(3e4, 1e5)
        profile = (moffat if star else galsim.Convolve(
            galsim.Exponential(half_light_radius=rng.uniform(2.3, 2.8)), moffat))
        profile.withFlux(flux).drawImage(
            image=image[galsim.BoundsI(int(x) - 20, int(x) + 20, int(y) - 20, int(y) + 20)],
            add_to_image=True, offset=rng.uniform(-0.5, 0.5, 2))
    data = image.array + rng.normal(0.0, 5.0, image.array.shape)
    table = find_stars(data, all_sources=True)
    positions = np.array(slots[:80], dtype=float) - 1  # GalSim is 1-based
    xy = np.column_stack([table['x'].value, table['y'].value])
    nearest = np.hypot(*(xy[:, None] - positions[None]).T).T.argmin(1)
    selected = np.asarray(table['selected'])
    assert selected.sum() >= 15
    assert is_star[nearest[selected]].all()
    star_fwhm = np.median(table['fwhm'].value[is_star[nearest]])
    assert table.meta['fwhm_locus'] == pytest.approx(star_fwhm, rel=0.05)


def test_find_stars_saturation_from_nddata_meta_and_mask(field):
    image, _, saturated_xy, _ = field
    mask = np.zeros(SHAPE, dtype=bool)
    reference = find_stars(image, saturation=SATURATION)
    # Mask one selected star's core: it must no longer be selected.
    x0, y0 = int(round(reference['x'][0].value)), int(round(reference['y'][0].value))
    mask[y0 - 2:y0 + 3, x0 - 2:x0 + 3] = True
    nd = NDData(image, mask=mask, meta={'SATURATE': SATURATION})
    everything = find_stars(nd, all_sources=True)
    sx, sy = saturated_xy
    row = np.argmin(np.hypot(everything['x'].value - sx, everything['y'].value - sy))
    assert everything['saturated'][row]
    stars = everything[everything['selected']]
    assert np.hypot(stars['x'].value - x0, stars['y'].value - y0).min() > 3
    # NaN pixels are masked too.
    with_nan = image.copy()
    with_nan[y0, x0] = np.nan
    stars_nan = find_stars(with_nan, saturation=SATURATION)
    assert np.hypot(stars_nan['x'].value - x0, stars_nan['y'].value - y0).min() > 3


def test_find_stars_max_stars_and_fwhm_guess(field):
    image = field[0]
    stars = find_stars(image, saturation=SATURATION, max_stars=7)
    assert len(stars) == 7
    # fwhm_guess replaces the stellar locus: at 12 px only the round galaxy that stands
    # alone (FWHM 14 px) passes, no star.
    wide = find_stars(image, saturation=SATURATION, fwhm_guess=12.0)
    assert wide.meta['fwhm_locus'] == 12.0
    assert len(wide) == 1
    assert_allclose([wide['x'][0].value, wide['y'][0].value], GALAXIES[2], atol=0.5)


def test_find_stars_errors():
    image = np.zeros((50, 50))
    with pytest.raises(InvalidInputError,
                       match=r'data must be a 2-D image, got shape \(2, 50, 50\)'):
        find_stars(np.zeros((2, 50, 50)))
    with pytest.raises(InvalidInputError, match='every pixel of the image is masked'):
        find_stars(np.full((50, 50), np.nan))
    with pytest.raises(InvalidInputError, match=r'mask has shape \(3, 3\)'):
        find_stars(image, mask=np.zeros((3, 3), bool))
    with pytest.raises(InvalidInputError, match='threshold_sigma = -1'):
        find_stars(image, threshold_sigma=-1)
    with pytest.raises(InvalidInputError, match='fwhm_guess = 0'):
        find_stars(image, fwhm_guess=0)
    with pytest.raises(InvalidInputError, match=r'box_size = 2\.5; give an integer >= 3'):
        find_stars(image, box_size=2.5)
    # A flat image has no sources: an empty table, not an error.
    empty = find_stars(np.random.default_rng(0).normal(size=(60, 60)))
    assert len(empty) == 0 and np.isnan(empty.meta['fwhm_locus'])


# --- ePSF -----------------------------------------------------------------------------------

def test_epsf_matches_known_psf(field, epsf):
    """The ePSF of 55-60 simulated stars against the true Moffat.

    Both are rendered the same way (render_psf on 25x25 pixels, the ePSF's extent, so that
    both are normalised over the same area). Measured on this field (seed 2, 58 stars):
    max |diff| / peak = 0.91 %, FWHM ratio 1.002; over seeds 0-5 of the same set-up
    0.36-0.91 % and FWHM ratios within 0.2 % of 1. The
    tolerance of 3 % leaves room for other platforms' noise realisations while still
    catching the failures photutils 3.0 is known for at oversampling > 1 (dotted ePSFs,
    issue 1404: several percent to tens of percent).
    """
    true_psf = field[3]
    assert epsf.oversampling.tolist() == [2, 2]
    assert epsf.data.shape == (51, 51)
    assert_allclose(epsf.data.sum(), 4.0)           # photutils: sums to oversampling**2
    assert epsf.meta['n_stars'] >= 40
    built = render_psf(epsf, size=25)
    known = render_psf(true_psf, size=25)
    error = np.abs(built - known).max() / known.max()
    assert error < 0.03, error
    fwhm_ratio = fwhm_along_x(epsf) / fwhm_along_x(true_psf)
    assert abs(fwhm_ratio - 1) < 0.05, fwhm_ratio
    assert_allclose(fwhm_along_x(true_psf), true_psf.fwhm, rtol=1e-3)
    # Also at a sub-pixel offset (the ePSF interpolates its oversampled array).
    yy, xx = np.mgrid[:25, :25]
    models = []
    for model in (epsf, true_psf):
        m = model.copy()
        m.x_0, m.y_0, m.flux = 12.25, 11.6, 1.0
        values = m(xx, yy)
        models.append(values / values.sum())
    assert np.abs(models[0] - models[1]).max() / models[1].max() < 0.03


def test_build_epsf_from_nddata_with_star_table(field):
    from astropy.nddata import CCDData

    image, truth, _, true_psf = field
    stars = find_stars(image, saturation=SATURATION, all_sources=True)  # uses 'selected'
    ccd = CCDData(image, unit='adu', mask=np.zeros(SHAPE, bool))
    built = build_epsf(ccd, stars=stars, maxiters=3)
    assert built.meta['n_stars'] == int(stars['selected'].sum())
    error = np.abs(render_psf(built, size=25) - render_psf(true_psf, size=25)).max()
    assert error / render_psf(true_psf, size=25).max() < 0.05


def test_build_epsf_too_few_stars(field):
    image = field[0]
    with pytest.raises(InvalidPSFError, match=r'found 3 usable star\(s\) for the ePSF, fewer '
                       r'than min_stars = 5; give --psf moffat:fwhm=\.\.\.,beta=\.\.\. or a '
                       r'PSF file'):
        build_epsf(image, saturation=SATURATION, max_stars=3)
    # A blank exposure: zero stars.
    blank = np.random.default_rng(3).normal(size=(100, 100))
    with pytest.raises(InvalidPSFError, match=r'found 0 usable star'):
        build_epsf(blank)


def test_build_epsf_errors(field):
    image = field[0]
    with pytest.raises(InvalidPSFError, match=r'size = 24; the ePSF cutout size must be odd'):
        build_epsf(image, size=24)
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) \['fwhm'\]"):
        build_epsf(image, fwhm=3)
    with pytest.raises(InvalidInputError, match=r'stars must be a table with x and y columns'):
        build_epsf(image, stars={'a': [1]})
    with pytest.raises(InvalidInputError, match=r"options \['max_stars'\] have no effect"):
        build_epsf(image, stars=find_stars(image), max_stars=3)
    with pytest.raises(InvalidInputError, match=r'oversampling = 0; give an integer >= 1'):
        build_epsf(image, oversampling=0)
    with pytest.raises(InvalidInputError, match=r"maxiters = 'ten'; give an integer >= 1"):
        build_epsf(image, maxiters='ten')


# --- Moffat ---------------------------------------------------------------------------------

def test_moffat_psf_normalisation_convention():
    """photutils' convention: an ImagePSF array sums to oversampling**2, and the model
    evaluated with flux=1 on the native grid sums to 1."""
    for oversampling in (1, 2, 3, 4):
        model = moffat_psf(0.8 * u.arcsec, 3.5, pixel_scale=0.2 * u.arcsec / u.pix,
                           oversampling=oversampling, size=41)
        assert model.data.shape[0] % 2 == 1 and model.data.shape[0] >= 41 * oversampling
        assert_allclose(model.data.sum(), oversampling**2, rtol=1e-12)
        m = model.copy()
        m.x_0, m.y_0, m.flux = 20.0, 20.0, 1.0
        yy, xx = np.mgrid[:41, :41]
        assert_allclose(m(xx, yy).sum(), 1.0, atol=2e-3)


def test_moffat_psf_fwhm():
    """The model is the Moffat convolved with the pixel: its FWHM equals galsim's FWHM of
    Moffat * Pixel (to 0.1 %) and the requested FWHM up to the pixel's broadening (1.5 %
    for 5 px; 3 % allowed)."""
    import galsim

    model = moffat_psf(1.0 * u.arcsec, 2.5, pixel_scale=0.2)
    measured = fwhm_along_x(model, half_width=12)
    assert abs(measured / 5.0 - 1) < 0.03
    expected = galsim.Convolve(galsim.Moffat(2.5, fwhm=1.0), galsim.Pixel(0.2)
                               ).calculateFWHM(scale=0.01, size=1001) / 0.2
    assert_allclose(measured, expected, rtol=1e-3)
    # Default size: about 8 FWHM, odd.
    assert model.data.shape == (83, 83)          # 41 native pixels x 2, +1 to be odd
    assert model.meta['fwhm_arcsec'] == 1.0 and model.meta['beta'] == 2.5


def test_moffat_psf_matches_galsim_pixel_integrated_drawing():
    """Evaluated at native pixels at any offset, the ePSF equals galsim's own
    drawImage(method='auto') at that offset (0.1 % of the peak measured)."""
    import galsim

    model = moffat_psf(0.8, 3.0, pixel_scale=0.2, size=41)
    yy, xx = np.mgrid[:41, :41]
    for offset in [(0.0, 0.0), (0.3, -0.2), (0.5, 0.5)]:
        direct = galsim.Moffat(3.0, fwhm=0.8).drawImage(
            nx=41, ny=41, scale=0.2, method='auto', offset=offset).array
        m = model.copy()
        m.x_0, m.y_0, m.flux = 20 + offset[0], 20 + offset[1], 1.0
        values = m(xx, yy)
        diff = np.abs(values / values.sum() - direct / direct.sum()).max()
        assert diff / (direct.max() / direct.sum()) < 0.005


@pytest.mark.parametrize('e1, e2', [(0.1, -0.05), (0.0, 0.15)])
def test_moffat_psf_ellipticity(e1, e2):
    """Unweighted moments give the distortion (e1, e2). beta = 4.5 keeps the wings
    outside the 81x81 stamp negligible; the pixel convolution dilutes e by ~2 %."""
    import galsim

    from psfdeconv.measure import image_moments

    model = moffat_psf(0.8, 4.5, pixel_scale=0.2, e1=e1, e2=e2, size=81)
    rendered = render_psf(model, size=81)
    moments = image_moments(rendered)
    assert_allclose([moments['e1'], moments['e2']], [e1, e2], atol=0.005)
    direct = galsim.Moffat(4.5, fwhm=0.8).shear(galsim.Shear(e1=e1, e2=e2)).drawImage(
        nx=81, ny=81, scale=0.2, method='auto').array
    reference = image_moments(direct)
    assert_allclose([moments['e1'], moments['e2']], [reference['e1'], reference['e2']],
                    atol=1e-3)
    # Adaptive moments (HSM) agree as well.
    hsm = galsim.hsm.FindAdaptiveMom(galsim.Image(rendered, scale=0.2))
    assert_allclose([hsm.observed_shape.e1, hsm.observed_shape.e2], [e1, e2], atol=0.006)


def test_moffat_psf_errors():
    with pytest.raises(InvalidPSFError, match=r'fwhm = -0\.8 arcsec; it must be positive'):
        moffat_psf(-0.8, 3.0, pixel_scale=0.2)
    with pytest.raises(InvalidPSFError, match=r'fwhm = 0\.8 kg; give an angle'):
        moffat_psf(0.8 * u.kg, 3.0, pixel_scale=0.2)
    with pytest.raises(InvalidPSFError,
                       match=r'beta = 1\.0; the Moffat power index must be >= 1\.5'):
        moffat_psf(0.8, 1.0, pixel_scale=0.2)
    with pytest.raises(InvalidPSFError, match=r'\(e1, e2\) = \(0\.9, 0\.5\) has \|e\| = 1\.02'):
        moffat_psf(0.8, 3.0, pixel_scale=0.2, e1=0.9, e2=0.5)
    with pytest.raises(InvalidPSFError, match=r'size = 40; the PSF size must be odd'):
        moffat_psf(0.8, 3.0, pixel_scale=0.2, size=40)
    with pytest.raises(PixelScaleError, match=r'pixel_scale = 0\.0; it must be positive'):
        moffat_psf(0.8, 3.0, pixel_scale=0.0)
    with pytest.raises(PixelScaleError, match=r'pixel_scale = 0\.2 m; give an angle per pixel'):
        moffat_psf(0.8, 3.0, pixel_scale=0.2 * u.m)


# --- Files ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def shared_data():
    """The shared real-data folder: ../shared next to the repository (CI) or /work/shared."""
    for base in (Path(__file__).resolve().parents[2] / 'shared', Path('/work/shared')):
        folder = base / 'data' / 'real'
        if folder.is_dir():
            return folder
    pytest.skip('the shared real-data folder (shared/data/real next to the repository, or '
                '/work/shared/data/real) is not available')


def test_write_read_round_trip(tmp_path):
    model = moffat_psf(0.8, 3.0, pixel_scale=0.2, size=21, oversampling=2)
    path = write_psf_image(model, tmp_path / 'psf.fits')
    assert fits.getval(path, 'OVERSAMP') == 2
    # photutils' convention: an oversampled array sums to OVERSAMP**2.
    assert_allclose(fits.getdata(path).sum(), 4.0)
    again = read_psf_image(path)
    assert again.oversampling.tolist() == [2, 2]
    assert_allclose(again.data, model.data, rtol=1e-12)
    assert again.meta['padded'] is False and again.meta['path'] == str(path)
    assert_allclose(render_psf(again), render_psf(model), atol=1e-15)
    with pytest.raises(OutputExistsError, match='psf.fits exists; pass overwrite=True'):
        write_psf_image(model, path)
    write_psf_image(render_psf(model, size=15), path, overwrite=True)   # a plain array
    assert fits.getval(path, 'OVERSAMP') == 1
    assert read_psf_image(path).data.shape == (15, 15)
    with pytest.raises(InvalidPSFError, match='cannot write a str as a PSF image'):
        write_psf_image('not a psf', tmp_path / 'x.fits')
    with pytest.raises(InvalidPSFError, match=r'the PSF \(shape \(3, 3\)\) sums to 0\.0'):
        write_psf_image(np.zeros((3, 3)), tmp_path / 'x.fits')


def test_read_unnormalised_big_endian_int16(tmp_path):
    """Like HST PSF files, scaled to sum to 2535 (here x 100 to keep int16 precision)."""
    psf = render_psf(moffat_psf(0.12, 2.5, pixel_scale=0.06), size=31)
    scaled = np.round(psf * 25350)          # peak ~ 4800 counts
    assert scaled.max() < np.iinfo(np.int16).max
    counts = scaled.astype('>i2')
    assert counts.dtype.byteorder == '>'
    path = tmp_path / 'hst_like.fits'
    fits.PrimaryHDU(counts).writeto(path)
    model = read_psf_image(path)
    assert model.data.dtype == np.float64 and model.data.dtype.isnative
    assert model.oversampling.tolist() == [1, 1]
    assert_allclose(model.data.sum(), 1.0)
    # Rounding to integers changes each pixel by up to 0.5 / 25350 = 2e-5 of the total,
    # and the total itself by ~ sqrt(961 / 12) = 9 counts (3.5e-4 relative).
    assert_allclose(render_psf(model, size=31), psf, rtol=1e-3, atol=2e-5)


def test_read_oversampled_header_keywords(tmp_path):
    fine = moffat_psf(0.8, 3.0, pixel_scale=0.2, size=21, oversampling=3).data
    for key in ('OVERSAMP', 'OVERSAMPLING'):
        header = fits.Header()
        # OVERSAMPLING has more than 8 characters: a HIERARCH card.
        header[key if len(key) <= 8 else f'HIERARCH {key}'] = 3
        path = tmp_path / f'{key}.fits'
        fits.PrimaryHDU(fine * 1234.5, header=header).writeto(path)
        model = read_psf_image(path)
        assert model.oversampling.tolist() == [3, 3]
        assert_allclose(model.data.sum(), 9.0)
    header = fits.Header()
    header['OVERSAMP'] = 0
    fits.PrimaryHDU(fine, header=header).writeto(tmp_path / 'bad.fits')
    with pytest.raises(InvalidPSFError, match=r'bad\.fits: OVERSAMP = 0; it must be a positive'):
        read_psf_image(tmp_path / 'bad.fits')


def test_read_hdu_selection(tmp_path):
    psf = render_psf(moffat_psf(0.8, 3.0, pixel_scale=0.2), size=25)
    path = tmp_path / 'mef.fits'
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(psf * 7, name='PSF')]).writeto(path)
    assert_allclose(read_psf_image(path).data, psf)          # first 2-D image HDU
    assert_allclose(read_psf_image(path, hdu='PSF').data, psf)
    with pytest.raises(InvalidPSFError, match=r"HDU 0 of .*mef\.fits is not a 2-D image"):
        read_psf_image(path, hdu=0)
    with pytest.raises(InvalidPSFError, match=r"has no HDU 'NOPE'; it has 2 HDU"):
        read_psf_image(path, hdu='NOPE')
    fits.PrimaryHDU().writeto(tmp_path / 'empty.fits')
    with pytest.raises(InvalidPSFError, match=r'empty\.fits has no 2-D image HDU'):
        read_psf_image(tmp_path / 'empty.fits')
    with pytest.raises(InvalidPSFError, match=r'missing\.fits does not exist'):
        read_psf_image(tmp_path / 'missing.fits')


@pytest.mark.parametrize('peak_index, expected_pad', [(12, 'after'), (11, 'before')])
def test_read_even_size_is_padded(tmp_path, peak_index, expected_pad):
    """A 24x24 PSF: one row/column of zeros goes on the side that centres the peak."""
    odd = render_psf(moffat_psf(0.8, 3.0, pixel_scale=0.2), size=25)   # peak at [12, 12]
    even = odd[:24, :24] if peak_index == 12 else odd[1:, 1:]        # peak at 12 or 11
    assert np.unravel_index(even.argmax(), even.shape) == (peak_index, peak_index)
    path = tmp_path / 'even.fits'
    fits.PrimaryHDU(even).writeto(path)
    model = read_psf_image(path)
    assert model.data.shape == (25, 25) and model.meta['padded'] is True
    assert np.unravel_index(model.data.argmax(), (25, 25)) == (12, 12)
    zero_row = model.data[24] if expected_pad == 'after' else model.data[0]
    assert np.all(zero_row == 0)
    rendered = render_psf(model, size=25)
    assert np.unravel_index(rendered.argmax(), (25, 25)) == (12, 12)
    assert_allclose(rendered.sum(), 1.0)


def test_read_invalid_files(tmp_path):
    psf = render_psf(moffat_psf(0.8, 3.0, pixel_scale=0.2), size=25)
    with_nan = psf.copy()
    with_nan[3, 4] = np.nan
    fits.PrimaryHDU(with_nan).writeto(tmp_path / 'nan.fits')
    with pytest.raises(InvalidPSFError, match=r'nan\.fits has 1 NaN/inf pixel\(s\)'):
        read_psf_image(tmp_path / 'nan.fits')
    fits.PrimaryHDU(np.zeros((25, 25))).writeto(tmp_path / 'zero.fits')
    with pytest.raises(InvalidPSFError, match=r'the PSF image in .*zero\.fits sums to 0\.0; '
                       r'a PSF must have a positive'):
        read_psf_image(tmp_path / 'zero.fits')
    fits.PrimaryHDU(-psf).writeto(tmp_path / 'negative.fits')
    with pytest.raises(InvalidPSFError, match=r'negative\.fits sums to -1\.0'):
        read_psf_image(tmp_path / 'negative.fits')
    fits.PrimaryHDU(np.zeros((2, 5, 5))).writeto(tmp_path / 'cube.fits')
    with pytest.raises(InvalidPSFError, match=r'cube\.fits has no 2-D image HDU'):
        read_psf_image(tmp_path / 'cube.fits')
    fits.PrimaryHDU(psf).writeto(tmp_path / 'ok.fits')
    with pytest.raises(InvalidPSFError, match=r"background = 'median'; give a number"):
        read_psf_image(tmp_path / 'ok.fits', background='median')


def test_read_real_sdss_psf(shared_data):
    """An SDSS PSF reconstruction: 51x51 uint16 (BZERO 32768), unnormalised, on the soft
    bias of 1000 that SDSS adds (every border pixel is exactly 1000)."""
    path = shared_data / 'sdss-psf-example.fits'
    raw = fits.getdata(path)
    assert raw.dtype == np.uint16 and raw.shape == (51, 51)
    # The flat border of 1000 is a pedestal: subtracted without being asked.
    assert read_psf_image(path).meta['background'] == 1000
    for background in (None, 'border', 1000):
        model = read_psf_image(path, background=background)
        assert model.oversampling.tolist() == [1, 1]
        rendered = render_psf(model, size=51)
        assert rendered.shape == (51, 51)
        assert_allclose(rendered.sum(), 1.0)
        assert np.unravel_index(rendered.argmax(), rendered.shape) == (25, 25)
        cx, cy = centroid(rendered)
        assert abs(cx - 25) < 0.1 and abs(cy - 25) < 0.1
        expected = (raw.astype(float) - 1000) / (raw.astype(float) - 1000).sum()
        assert_allclose(rendered, expected, atol=1e-12)
        assert_allclose(render_psf(model, size=25).sum(), 1.0)


# --- Gridded --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def two_psf_image():
    """300x300: Moffat FWHM 3.06 px on the left half, 4.59 px on the right half."""
    from photutils.datasets import make_noise_image
    from photutils.psf import MoffatPSF, make_psf_model_image

    halves = []
    for i, alpha in enumerate((3.0, 4.5)):
        half, _ = make_psf_model_image((300, 150), MoffatPSF(alpha=alpha, beta=3.0), 30,
                                       model_shape=(41, 41), min_separation=20,
                                       border_size=12, flux=(3000, 30000), seed=10 + i)
        halves.append(half)
    return np.hstack(halves) + make_noise_image((300, 300), mean=0, stddev=1.0, seed=5)


def test_gridded_psf_varies_across_detector(two_psf_image):
    from photutils.psf import GriddedPSFModel

    from psfdeconv.measure import image_moments

    # Oversampling 1 keeps this test fast: with 2, photutils 3.0 fills the ePSF pixels
    # that none of a region's ~15 stars samples by cubic interpolation, which costs
    # 1-20 s per iteration (the oversampled path is tested on the single-ePSF field).
    model = build_gridded_psf(two_psf_image, grid_shape=(2, 2), size=15, oversampling=1,
                              maxiters=3)
    assert isinstance(model, GriddedPSFModel)
    assert model.grid_xypos.tolist() == [[74.5, 74.5], [224.5, 74.5], [74.5, 224.5],
                                         [224.5, 224.5]]
    assert model.oversampling.tolist() == [1, 1]
    assert_allclose(model.data.sum(axis=(1, 2)), 1.0)
    left = render_psf(model, (40.0, 150.0), size=25)
    right = render_psf(model, (260.0, 150.0), size=25)
    middle = render_psf(model, (150.0, 150.0), size=25)
    size_left, size_middle, size_right = (float(image_moments(p)['size'])
                                          for p in (left, middle, right))
    # Truth: FWHM ratio 1.5; the 15-pixel ePSFs truncate the wings, so compare loosely.
    assert size_right / size_left > 1.2
    assert size_left < size_middle < size_right
    assert left.max() > 1.5 * right.max()
    for p in (left, middle, right):
        assert_allclose(p.sum(), 1.0)
        assert np.unravel_index(p.argmax(), p.shape) == (12, 12)
    with pytest.raises(InvalidInputError, match=r'give position=\(x, y\)'):
        render_psf(model)


def test_gridded_psf_errors(two_psf_image):
    only_right = two_psf_image.copy()
    only_right[:, :150] = np.random.default_rng(0).normal(size=(300, 150))
    with pytest.raises(InvalidPSFError, match=r'found 0 usable star\(s\) in region \(row 0, '
                       r'column 0\) of grid_shape \(2, 2\) around \(x, y\) = \(74\.5, 74\.5\)'):
        build_gridded_psf(only_right, grid_shape=(2, 2), size=15)
    with pytest.raises(InvalidInputError, match=r'grid_shape = \(1, 2\); use \(1, 1\) or at '
                       r'least 2 regions'):
        build_gridded_psf(two_psf_image, grid_shape=(1, 2))
    with pytest.raises(InvalidInputError, match=r"grid_shape = 'big'; give two integers"):
        build_gridded_psf(two_psf_image, grid_shape='big')
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) \['sigma'\]"):
        build_gridded_psf(two_psf_image, sigma=3)


# --- Rendering ------------------------------------------------------------------------------

def _render_cases(epsf):
    from photutils.psf import CircularGaussianPRF, MoffatPSF

    return {
        'epsf': epsf,
        'moffat_psf': moffat_psf(0.8, 3.0, pixel_scale=0.2),
        'photutils_moffat': MoffatPSF(alpha=ALPHA, beta=BETA),
        'gaussian_prf': CircularGaussianPRF(fwhm=3.0),
        'array': render_psf(moffat_psf(0.8, 3.0, pixel_scale=0.2), size=31) * 17.0,
    }


@pytest.mark.parametrize('name', ['epsf', 'moffat_psf', 'photutils_moffat', 'gaussian_prf',
                                  'array'])
@pytest.mark.parametrize('size', [25, 41])
def test_render_psf_is_odd_centred_unit_sum(epsf, name, size):
    from psfdeconv.deconvolve import validate_stamps

    model = _render_cases(epsf)[name]
    psf = render_psf(model, (123.4, 56.7), size=size)
    assert psf.shape == (size, size) and psf.dtype == np.float64
    assert_allclose(psf.sum(), 1.0, rtol=1e-12)
    middle = size // 2
    assert np.unravel_index(psf.argmax(), psf.shape) == (middle, middle)
    cx, cy = centroid(psf)
    assert abs(cx - middle) < 0.05 and abs(cy - middle) < 0.05, (cx, cy)
    # The position of a position-independent model does not matter.
    assert_allclose(render_psf(model, size=size), psf, atol=1e-14)
    # The deconvolution accepts it.
    stamps = np.ones((1, 2, 64, 64))
    _, psfs, _ = validate_stamps(stamps, np.stack([psf, psf])[None], 0.2)
    assert_allclose(psfs[0, 0], psf)


def test_render_psf_errors_and_warnings():
    from photutils.psf import ImagePSF

    model = moffat_psf(0.8, 3.0, pixel_scale=0.2)
    for size in (40, 1, 41.0, True):
        with pytest.raises(InvalidPSFError, match=r'size = .*; the stamp PSF size must be an '
                           r'odd integer >= 3'):
            render_psf(model, size=size)
    # An oversampled array normalised to 1 instead of oversampling**2.
    wrong = ImagePSF(model.data / model.data.sum(), oversampling=2)
    with pytest.warns(PSFDeconvWarning, match=r"sums to 0\.25 over the 41x41 stamp .*"
                      r'oversampling\*\*2'):
        psf = render_psf(wrong)
    assert_allclose(psf, render_psf(model), atol=1e-15)
    # A stamp much smaller than the PSF.
    with pytest.warns(PSFDeconvWarning, match='increase size'):
        render_psf(moffat_psf(3.0, 3.0, pixel_scale=0.2), size=5)
    # An array whose centre is not the PSF centre.
    shifted = np.zeros((25, 25))
    shifted[5, 5] = 1.0
    with pytest.raises(InvalidPSFError, match=r'peaks at pixel \(y, x\) = \(5, 5\), not at the '
                       r'centre \(12, 12\); recentre'):
        render_psf(shifted, size=25)
    with pytest.raises(InvalidPSFError, match=r'odd sides, got shape \(24, 24\)'):
        render_psf(np.ones((24, 24)))
    with pytest.raises(InvalidPSFError, match=r'the PSF array sums to 0\.0'):
        render_psf(np.zeros((25, 25)))
    with pytest.raises(InvalidPSFError, match=r'cannot render a str'):
        render_psf('moffat')


# --- Command-line specifications ------------------------------------------------------------

def test_psf_from_spec_moffat():
    psf = psf_from_spec('moffat:fwhm=0.8arcsec,beta=3', pixel_scale=0.2 * u.arcsec / u.pix)
    assert psf.meta['fwhm_arcsec'] == 0.8 and psf.meta['beta'] == 3.0
    assert psf.meta['e1'] == 0.0 and psf.meta['e2'] == 0.0
    psf = psf_from_spec(' moffat: fwhm=4pix, beta=2.5, e1=0.05, e2=-0.02 ', pixel_scale=0.2)
    assert_allclose(psf.meta['fwhm_arcsec'], 0.8)
    assert (psf.meta['beta'], psf.meta['e1'], psf.meta['e2']) == (2.5, 0.05, -0.02)
    psf = psf_from_spec('moffat:fwhm=0.0002deg,beta=3', pixel_scale=0.2)
    assert_allclose(psf.meta['fwhm_arcsec'], 0.72)
    assert_allclose(psf_from_spec('moffat:fwhm=0.8,beta=3', pixel_scale=0.2).data,
                    moffat_psf(0.8, 3.0, pixel_scale=0.2).data)


def test_psf_from_spec_file(tmp_path):
    model = moffat_psf(0.8, 3.0, pixel_scale=0.2, size=21)
    path = write_psf_image(model, tmp_path / 'my psf=1.fits')
    read = psf_from_spec(f'psf={path}')
    assert_allclose(read.data, model.data)


def test_psf_from_spec_epsf(monkeypatch):
    calls = []
    monkeypatch.setattr(psfmod, 'build_epsf', lambda data: calls.append(('epsf', data)) or 1)
    monkeypatch.setattr(psfmod, 'build_gridded_psf',
                        lambda data, grid_shape: calls.append(('grid', grid_shape)) or 2)
    image = np.zeros((5, 5))
    assert psf_from_spec('epsf', data=image) == 1
    assert psf_from_spec('EPSF:grid=3x2', data=image) == 2
    assert calls[0][0] == 'epsf' and calls[0][1] is image
    assert calls[1] == ('grid', (3, 2))


@pytest.mark.parametrize('spec, kwargs, match', [
    ('gaussian:fwhm=1', {}, r"--psf 'gaussian:fwhm=1' is not a PSF specification; accepted "
     r"forms are 'epsf', 'epsf:grid=NYxNX'"),
    ('', {}, r"--psf '' is empty or not a string"),
    (None, {}, r'--psf None is empty or not a string'),
    ('epsf', {}, r"--psf 'epsf' builds the PSF from the stars of the exposure, but no image"),
    ('epsf:grid=2by2', {'data': np.zeros((5, 5))}, r"grid='2by2' must be NYxNX"),
    ('epsf:grid=1x2', {'data': np.zeros((300, 300))}, r"--psf 'epsf:grid=1x2': grid_shape = "
     r'\(1, 2\)'),
    ('epsf:size=3', {'data': np.zeros((5, 5))}, r"cannot read 'size=3' \(options are grid"),
    ('moffat:fwhm=0.8arcsec,beta=3', {}, r'needs the pixel scale'),
    ('moffat:fwhm=0.8arcsec', {'pixel_scale': 0.2}, r'lacks beta; write e\.g\. '
     r'moffat:fwhm=0\.8arcsec,beta=3'),
    ('moffat:beta=3', {'pixel_scale': 0.2}, r'lacks fwhm'),
    ('moffat:fwhm=0.8kg,beta=3', {'pixel_scale': 0.2}, r"fwhm='0\.8kg' must be an angle"),
    ('moffat:fwhm=wide,beta=3', {'pixel_scale': 0.2}, r"fwhm='wide' is not a number"),
    ('moffat:fwhm=0.8,beta=three', {'pixel_scale': 0.2}, r"beta='three' is not a number"),
    ('moffat:fwhm=0.8,beta=1', {'pixel_scale': 0.2}, r'beta = 1\.0; the Moffat power index'),
    ('moffat:fwhm=0.8,beta=3,theta=4', {'pixel_scale': 0.2}, r"cannot read 'theta=4' "
     r'\(options are fwhm, beta, e1, e2, each once\)'),
    ('moffat:fwhm=0.8,fwhm=0.9,beta=3', {'pixel_scale': 0.2}, r"cannot read 'fwhm=0\.9'"),
    ('moffat:fwhm=0.8,beta', {'pixel_scale': 0.2}, r"cannot read 'beta'"),
    ('psf=', {}, r"--psf 'psf=' names no file"),
])
def test_psf_from_spec_errors(spec, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        psf_from_spec(spec, **kwargs)


def test_psf_from_spec_bad_pixel_scale_and_file(tmp_path):
    with pytest.raises(PixelScaleError, match=r'pixel_scale = -0\.2'):
        psf_from_spec('moffat:fwhm=0.8,beta=3', pixel_scale=-0.2)
    with pytest.raises(InvalidPSFError, match=r'nothing\.fits does not exist'):
        psf_from_spec(f'psf={tmp_path / "nothing.fits"}')


def test_import_is_light():
    """psfdeconv.psf imports photutils, galsim and astropy.io.fits only when called."""
    import subprocess
    import sys

    code = ('import sys, psfdeconv.psf; '
            'print(sorted(m for m in ("photutils", "galsim", "astropy.io.fits", "scipy.ndimage")'
            ' if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == '[]'
