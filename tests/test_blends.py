# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Blends and galaxies larger than a stamp: deblending, BLENDED, symmetric replacement,
block-summed stamps (BLOCK_REDUCED) and TRUNCATED, on synthetic images, GalSim fields and
the real DECam frame of tests/data."""

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from psfdeconv.detection import (
    BLEND_LIMIT,
    blend_fractions,
    blended_sources,
    replace_neighbours,
    segment_extents,
    source_segments,
)
from psfdeconv.flags import (
    FLAG_BLENDED,
    FLAG_BLOCK_REDUCED,
    FLAG_EDGE,
    FLAG_TRUNCATED,
    UNUSABLE_FLAGS,
    flag_names,
)

DATA = Path(__file__).parent / 'data'
DECAM = DATA / 'decam-r-N6.fits'
DECAM_WEIGHT = DATA / 'decam-r-N6-weight.fits'
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3'


def gaussian(shape, x0, y0, sigma, flux):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return flux / (2 * np.pi * sigma ** 2) * np.exp(
        -((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))


# --- Blend fractions and owners -------------------------------------------------------

def test_blend_fraction_of_a_knot_a_touching_pair_and_an_isolated_source():
    image = np.zeros((60, 120))
    labels = np.zeros(image.shape, dtype=int)
    # A bright flat galaxy with a faint knot on it: the knot sits on 10 per pixel.
    image[5:45, 5:45] = 10.0
    labels[5:45, 5:45] = 1
    image[20:24, 20:24] += 2.0
    labels[20:24, 20:24] = 2
    # Two touching sources, the left one brighter: only the fainter one gets a pedestal,
    # from the part of its ring the brighter one covers.
    image[20:30, 60:70], labels[20:30, 60:70] = 8.0, 3
    image[20:30, 70:80], labels[20:30, 70:80] = 4.0, 4
    # A source alone.
    image[40:44, 100:104], labels[40:44, 100:104] = 5.0, 5
    fractions = blend_fractions(image, labels)
    assert fractions.shape == (6,)
    assert fractions[1] == 0 and fractions[3] == 0 and fractions[5] == 0
    # The knot: pedestal 10 on 16 pixels against 32 of its own.
    assert_allclose(fractions[2], 10 * 16 / (12 * 16 - 10 * 16))
    # The fainter of the pair: the ring's 2-pixel strip on the brighter side, 20 of 96
    # ring pixels at 8, under 100 pixels against 400 - that.
    pedestal = 8.0 * 20 / 96
    assert_allclose(fractions[4], pedestal * 100 / (400 - pedestal * 100))
    assert fractions[2] > BLEND_LIMIT > 0


def test_a_source_with_nothing_of_its_own_is_infinitely_blended():
    image = np.full((30, 30), 5.0)
    labels = np.ones((30, 30), dtype=int)
    labels[10:14, 10:14] = 2   # no excess over the galaxy
    assert np.isinf(blend_fractions(image, labels)[2])


def test_two_sources_in_one_segment_the_farther_from_its_centroid_is_blended():
    image = gaussian((64, 64), 30.0, 30.0, 4.0, 1000.0)
    labels = (image > 0.05).astype(int)
    blended, fraction = blended_sources(image, labels, [30.2, 38.0, 5.0], [29.8, 31.0, 5.0])
    assert blended.tolist() == [False, True, False]
    assert fraction[0] == 0 and np.isnan(fraction[2])  # the third one has no segment
    segments = source_segments(labels, [30.2, 38.0, 5.0], [29.8, 31.0, 5.0])
    assert segments.tolist() == [1, 1, 0]


def _deblend_field(seed):
    """A noisy field of single, double and triple sources, a flat segment, a
    segment with a non-positive minimum, and a NaN pixel."""
    rng = np.random.default_rng(seed)
    shape = (160, 220)
    image = rng.normal(0.0, 1.0, shape)
    for _ in range(25):
        x0, y0 = rng.uniform(12, shape[1] - 12), rng.uniform(12, shape[0] - 12)
        for _ in range(rng.integers(1, 4)):
            image += gaussian(shape, x0 + rng.normal(0, 3), y0 + rng.normal(0, 3),
                              rng.uniform(1.0, 3.0), rng.uniform(50, 3000))
    image[5:9, 5:12] = 40.0                    # flat: never split
    image[150:154, 200:212] = 40.0
    image[152, 205] = -5.0                      # holes below zero: linear levels
    image[151, 203] = np.nan
    return image


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_deblend_hands_photutils_only_segments_that_split(seed):
    """detection.deblend tests every segment's thresholds at once and deblends
    only those that split: the result is photutils' deblending of all of them,
    and of a subset when labels are given."""
    import warnings

    from photutils.segmentation import deblend_sources, detect_sources

    from psfdeconv._segments import _splitting_labels
    from psfdeconv.detection import deblend

    image = _deblend_field(seed)
    mask = ~np.isfinite(image)
    segments = detect_sources(np.where(mask, 0.0, image), 2.5, n_pixels=5, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        every = deblend_sources(image, segments, 5, progress_bar=False)
        subset = segments.labels[::2]
        some = deblend_sources(image, segments, 5, labels=subset, progress_bar=False)
    ours = deblend(image, segments, 5)
    assert ours.n_labels > segments.n_labels  # some segments did split
    np.testing.assert_array_equal(ours.data, every.data)
    np.testing.assert_array_equal(deblend(image, segments, 5, labels=subset).data, some.data)
    # The pre-selection is exact here: photutils splits every segment it names.
    splitting = _splitting_labels(image, segments, 5, segments.labels)
    split = [label for label in segments.labels
             if np.unique(every.data[segments.data == label]).size > 1]
    np.testing.assert_array_equal(splitting, split)


@pytest.mark.parametrize('seed', [0, 1])
def test_segments_above_is_photutils_detect_sources(seed):
    """Same labels as photutils' detect_sources (connectivity 8) with a scalar or
    per-pixel threshold, a mask and NaN pixels; None where nothing is detected."""
    import warnings

    from photutils.segmentation import detect_sources

    from psfdeconv.detection import segments_above

    image = _deblend_field(seed)
    mask = np.zeros(image.shape, dtype=bool)
    mask[40:60, 100:180] = True
    threshold = 1.5 + 0.01 * np.arange(image.shape[1])[None, :]
    for level in (2.0, threshold):
        for masked in (None, mask):
            ours = segments_above(image, level, 5, mask=masked)
            theirs = detect_sources(image, level, n_pixels=5, mask=masked)
            np.testing.assert_array_equal(ours.data, theirs.data)
            np.testing.assert_array_equal(ours.labels, theirs.labels)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no NoDetectionsWarning
        assert segments_above(image, 1e9, 5) is None
        assert segments_above(np.zeros((30, 30)), 0.5, 1) is None


def test_deblend_without_a_segment_that_splits_returns_a_copy():
    from photutils.segmentation import detect_sources

    from psfdeconv.detection import deblend

    image = gaussian((60, 60), 30, 30, 2.0, 1000.0)
    segments = detect_sources(image, 0.5, n_pixels=5)
    result = deblend(image, segments, 5)
    np.testing.assert_array_equal(result.data, segments.data)
    assert result is not segments
    assert deblend(image, None, 5) is None


def test_segment_extents_and_image_edges():
    labels = np.zeros((50, 80), dtype=int)
    labels[10:21, 30:61] = 1    # 31 columns: 15 on each side of column 45
    labels[40:50, 0:5] = 2      # touches two borders
    extent, at_edge = segment_extents(labels, [45.0, 2.0], [15.0, 45.0])
    assert_allclose(extent, [15.5, 5.5])
    assert at_edge.tolist() == [False, True]


# --- Symmetric replacement --------------------------------------------------------------

def test_a_knot_split_off_a_galaxy_is_refilled_with_the_galaxys_light():
    shape = (64, 64)
    galaxy = gaussian(shape, 32.0, 32.0, 6.0, 5000.0)
    knot = gaussian(shape, 40.0, 32.0, 1.0, 300.0)
    stamps = (galaxy + knot)[None, None]
    labels = np.ones(shape, dtype=int)[None]
    labels[0, 29:36, 37:44] = 2
    out, replaced, targets = replace_neighbours(
        stamps, labels, np.array([32.0]), np.array([32.0]), np.array([[1.0]]),
        index=np.array([0]), dilation=0, return_targets=True)
    assert targets.tolist() == [1]
    assert replaced[0].sum() == 49
    # The knot's pixels now hold the galaxy's light from the other side (a symmetric
    # galaxy: exactly its own), so the galaxy keeps its flux and loses the knot's.
    assert_allclose(out[0, 0][replaced[0]], galaxy[replaced[0]], rtol=1e-12)
    assert_allclose(out.sum(), galaxy.sum(), rtol=1e-3)


def test_pieces_of_the_targets_parent_merge_unless_a_brighter_source_holds_them():
    """One parent segment deblended into five pieces: the target's (light 100), a knot
    with no source (300: the galaxy's own light however bright), a faint blended
    source (50: cannot be told from the galaxy), a brighter blended source (500: a
    neighbour, replaced) and an unblended source (20: its own segment)."""
    from psfdeconv.pipeline import _segment_pieces, _with_own_pieces

    labels = np.zeros((10, 12), dtype=int)
    image = np.zeros(labels.shape)
    for label, light in zip((1, 2, 3, 4, 5), (100.0, 300.0, 50.0, 500.0, 20.0), strict=True):
        labels[:, 2 * label:2 * label + 2] = label
        image[:, 2 * label:2 * label + 2] = light / 20
    parents = (labels > 0).astype(int)
    # Sources: the target in piece 1, blended ones in 3 and 4, an unblended one in 5.
    segments_of = np.array([1, 3, 4, 5])
    blended = np.array([False, True, True, False])
    pieces = _segment_pieces(labels, parents, segments_of, blended, image)
    parent, claimed, occupied, light = pieces
    assert parent.tolist() == [0, 1, 1, 1, 1, 1]
    assert claimed.tolist() == [False, True, False, False, False, True]
    assert occupied.tolist() == [False, True, False, True, True, True]
    assert_allclose(light, [0, 100, 300, 50, 500, 20])
    merged = _with_own_pieces(labels[None], np.array([1]), pieces)[0]
    assert sorted(np.unique(merged).tolist()) == [0, 1, 4, 5]
    assert (merged[labels == 2] == 1).all() and (merged[labels == 3] == 1).all()


# --- The pipeline ----------------------------------------------------------------------

def _field(sources, *, size=200, scale=0.2, noise=1.0, seed=8):
    """A one-band CCDData with a TAN WCS and the GalSim profiles ``sources`` ((profile,
    x, y) with 0-based pixel positions) seen through a 0.8 arcsec Moffat."""
    import galsim
    from astropy.nddata import CCDData, StdDevUncertainty
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [size / 2, size / 2]
    wcs.wcs.cdelt = [-scale / 3600, scale / 3600]
    psf = galsim.Moffat(beta=3.0, fwhm=0.8)
    image = galsim.ImageD(size, size, scale=scale)
    for profile, x, y in sources:
        galsim.Convolve(profile, psf).drawImage(
            image=image, add_to_image=True, center=galsim.PositionD(x + 1, y + 1))
    rng = np.random.default_rng(seed)
    data = image.array + rng.normal(0, noise, image.array.shape)
    return CCDData(data, unit='adu', wcs=wcs,
                   uncertainty=StdDevUncertainty(np.full(data.shape, noise)))


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_a_faint_source_on_a_galaxy_is_blended_and_the_galaxy_keeps_its_flux():
    import galsim

    from psfdeconv.pipeline import deconvolve_catalog

    galaxy = galsim.Exponential(half_light_radius=1.0, flux=20000.0).shear(e1=0.2)
    faint = galsim.Gaussian(sigma=0.15, flux=300.0)
    exposure = _field([(galaxy, 100.0, 100.0), (faint, 108.0, 103.0)])
    catalog, _ = deconvolve_catalog({'r': exposure}, [[100.0, 100.0], [108.0, 103.0]], MOFFAT,
                                    symmetries=1)
    assert catalog.meta['flag_bits']['BLENDED'] == FLAG_BLENDED
    flags = [flag_names(value) for value in catalog['flags']]
    # The faint source stands on the galaxy's light, several times its own: unusable.
    assert 'BLENDED' in flags[1] and not catalog['usable'][1]
    assert catalog['flux_corrected_r'][1].value > 300.0 * 1.5  # what it would report
    # The galaxy is usable, its flux the galaxy's (the faint source's segment refilled
    # from the galaxy's other side).
    assert 'BLENDED' not in flags[0] and catalog['usable'][0]
    assert abs(catalog['flux_corrected_r'][0].value / 20000.0 - 1) < 0.05


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_a_galaxy_larger_than_the_stamp_is_cut_from_block_sums():
    import galsim

    from psfdeconv.pipeline import deconvolve_catalog

    # Half-light radius 3 arcsec = 15 pixels at 0.2 arcsec/pixel: its light reaches far
    # beyond the 64-pixel stamp, and its segment does too.
    galaxy = galsim.Exponential(half_light_radius=3.0, flux=2.0e5).shear(e1=0.1, e2=0.05)
    exposure = _field([(galaxy, 150.0, 150.0)], size=300)
    catalog, stamps = deconvolve_catalog({'r': exposure}, [[150.0, 150.0]], MOFFAT,
                                         symmetries=1)
    names = flag_names(catalog['flags'][0])
    assert 'BLOCK_REDUCED' in names and 'TRUNCATED' not in names
    assert catalog['usable'][0]
    factor = stamps[0].meta['block_factor']
    assert factor >= 2
    # The position is in the exposure's pixels, the flux the galaxy's.
    assert abs(catalog['x'][0].value - 150.0) < 1 and abs(catalog['y'][0].value - 150.0) < 1
    assert abs(catalog['flux_corrected_r'][0].value / 2.0e5 - 1) < 0.1
    # On the exposure's own grid the same galaxy loses a fifth of its flux or more.
    import psfdeconv.pipeline as pipeline

    block_factors = pipeline._block_factors
    try:
        pipeline._block_factors = lambda extent, stamp_size, blended: (
            np.ones(len(extent), dtype=np.int64), np.zeros(len(extent), dtype=bool))
        native, _ = deconvolve_catalog({'r': exposure}, [[150.0, 150.0]], MOFFAT,
                                       symmetries=1)
    finally:
        pipeline._block_factors = block_factors
    assert native['flux_corrected_r'][0].value / 2.0e5 < 0.85
    # The coarse stamp's WCS puts its pixel (0, 0) at the block-summed origin.
    origin = np.asarray(stamps[0].meta['origin'])
    sky = stamps[0].wcs.pixel_to_world(0, 0)
    x, y = exposure.wcs.world_to_pixel(sky)
    assert_allclose([x, y], factor * (origin + 0.5) - 0.5, atol=1e-6)


def test_block_factors_truncated_beyond_the_largest_and_blended_kept_native():
    from psfdeconv.pipeline import _MAX_BLOCK_FACTOR, _block_factors

    factor, truncated = _block_factors(np.array([10.0, 40.0, 1000.0, 1000.0]), 64,
                                       np.array([False, False, False, True]))
    assert factor.tolist() == [1, 2, _MAX_BLOCK_FACTOR, 1]
    assert truncated.tolist() == [False, False, True, False]
    assert 'TRUNCATED' in UNUSABLE_FLAGS and FLAG_TRUNCATED not in (FLAG_EDGE, FLAG_BLOCK_REDUCED)


def test_block_reduce_exposure_keeps_flux_wcs_and_masks():
    from astropy.nddata import CCDData, StdDevUncertainty
    from astropy.wcs import WCS

    from psfdeconv.cutouts import block_reduce_exposure, block_wcs

    rng = np.random.default_rng(2)
    data = rng.uniform(1, 2, (41, 60))
    mask = np.zeros(data.shape, dtype=bool)
    mask[0, 0] = True                 # one bad pixel of four: scaled up from three
    mask[2:4, 2:4] = True             # a whole block: masked
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN-SIP', 'DEC--TAN-SIP']
    wcs.wcs.crval = [10.0, -5.0]
    wcs.wcs.crpix = [20.0, 15.0]
    wcs.wcs.cd = np.array([[-0.26, 0.01], [0.01, 0.26]]) / 3600
    from astropy.wcs import Sip
    a = np.zeros((3, 3))
    a[2, 0] = 2e-5
    b = np.zeros((3, 3))
    b[0, 2] = -1e-5
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    exposure = CCDData(data, unit='electron', mask=mask, wcs=wcs,
                       uncertainty=StdDevUncertainty(np.full(data.shape, 0.5)))
    coarse = block_reduce_exposure(exposure, 2)
    assert coarse.shape == (20, 30) and coarse.unit == 'electron'
    assert_allclose(coarse.data[0, 0], data[[0, 1, 1], [1, 0, 1]].sum() * 4 / 3)
    assert_allclose(coarse.data[0, 1], data[0:2, 2:4].sum())
    assert coarse.mask[1, 1] and not coarse.mask[0, 0]
    assert_allclose(coarse.uncertainty.array[0, 1], 1.0)   # sqrt(4 * 0.25)
    assert np.isinf(coarse.uncertainty.array[1, 1])
    # Coarse pixel j is at native pixel 2 j + 0.5, distortion included.
    j = np.array([[3.0, 7.0], [12.5, 1.0]])
    for factor in (2, 3):
        coarse_wcs = block_wcs(wcs, factor)
        assert_allclose(coarse_wcs.pixel_to_world_values(*j),
                        wcs.pixel_to_world_values(*(factor * (j + 0.5) - 0.5)),
                        rtol=0, atol=1e-10)


def test_block_psfs_are_the_block_summed_psf():
    from psfdeconv.cutouts import block_psf_size, block_psfs
    from psfdeconv.psf import moffat_psf, render_psf

    native_model = moffat_psf(1.0, 3.0, pixel_scale=0.25)
    for factor in (2, 3):
        native = render_psf(native_model, size=block_psf_size(21, factor))
        coarse = block_psfs(native[None], factor)[0]
        expected = render_psf(moffat_psf(1.0, 3.0, pixel_scale=0.25 * factor), size=21)
        assert coarse.shape == (21, 21)
        assert_allclose(coarse.sum(), 1.0)
        assert np.abs(coarse - expected).max() < 0.01 * expected.max()
        yy, xx = np.mgrid[:21, :21]
        assert_allclose([(coarse * xx).sum(), (coarse * yy).sum()], [10, 10], atol=1e-3)


# --- The real DECam frame ---------------------------------------------------------------

@pytest.fixture(scope='module')
def decam_run(tmp_path_factory):
    from psfdeconv.cli import main
    from psfdeconv.io import read_catalog

    out = tmp_path_factory.mktemp('decam-blends')
    assert main(['run', '--band', f'r={DECAM}[1]', '--weight', f'r={DECAM_WEIGHT}',
                 '--psf', 'moffat:fwhm=1.05arcsec,beta=3', '--symmetries', '1', '-q',
                 '--out', str(out)]) == 0
    return read_catalog(out / 'catalog.fits')


def test_decam_bright_galaxy_has_its_kron_flux_and_its_disc_sources_are_blended(decam_run):
    from psfdeconv.evaluate import compare_with_kron, kron_reference
    from psfdeconv.io import read_exposure

    catalog = decam_run
    exposure = read_exposure(DECAM, weight_hdu=DECAM_WEIGHT)
    reference = kron_reference(exposure)
    result = compare_with_kron(catalog, reference, band='r', min_usable_fraction=0.3)
    assert result['passes'], result
    # The bright galaxy (45 pixels wide, larger than the stamp) is block-summed and
    # usable, within 15 % of its Kron flux.
    bright = np.argmax(np.asarray(catalog['flux_corrected_r'].value))
    assert catalog['flags'][bright] & FLAG_BLOCK_REDUCED and catalog['usable'][bright]
    kron = reference['kron_flux'][np.argmax(reference['kron_flux'])]
    assert 0.85 < catalog['flux_corrected_r'][bright].value / kron < 1.15
    # Every other source within 60 pixels of it stands on its light: none is usable.
    distance = np.hypot(catalog['x_input'].value - catalog['x_input'][bright].value,
                        catalog['y_input'].value - catalog['y_input'][bright].value)
    near = (distance > 3) & (distance < 60)
    assert near.sum() >= 3
    assert not np.asarray(catalog['usable'])[near].any()
    assert ((np.asarray(catalog['flags'])[near] & FLAG_BLENDED) != 0).all()
