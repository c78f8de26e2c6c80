# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.simulate.simulate_exposure and write_exposure_set."""

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import QTable
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv.exceptions import ConfigError, OutputExistsError
from psfdeconv.io import read_exposure
from psfdeconv.psf import build_epsf, moffat_psf
from psfdeconv.simulate import simulate_exposure, write_exposure_set

#: A small field: 8 galaxies and 25 stars on 256x256 pixels (0.5 s to simulate).
SMALL = dict(shape=(256, 256), n_galaxies=8, n_stars=25)


@pytest.fixture(scope='module')
def small_field(simulated_field):
    """``simulate_exposure(**SMALL, seed=4)``: the session's `simulated_field` (conftest.py),
    simulated once for this module and test_pipeline.py."""
    _, truth = simulated_field
    assert truth.meta['shape'] == list(SMALL['shape']) and truth.meta['seed'] == 4
    return simulated_field


@pytest.fixture(scope='module')
def sparse_noise_free():
    """Sources far enough apart that each one's drawing box (81x81 pixels for a
    galaxy, 6 FWHM for a star) holds its light alone, without noise."""
    return simulate_exposure((256, 256), n_galaxies=3, n_stars=4, min_separation=85,
                             star_separation=60, sky_sigma=0.0, seed=3)


def fwhm_along_x(model, half_width=10.0, n=4001):
    """FWHM (pixels) of a PSF model from its profile along x through the centre
    (the helper of tests/test_psf.py)."""
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


def test_shapes_units_wcs_and_truth(small_field):
    exposures, truth = small_field
    assert list(exposures) == ['g', 'r', 'i']
    for band, exposure in exposures.items():
        assert exposure.shape == (256, 256)
        assert exposure.unit == u.adu
        assert exposure.wcs.has_celestial
        assert exposure.meta['BAND'] == band
        assert_allclose(exposure.uncertainty.array, 1.0)
        centre = exposure.wcs.pixel_to_world(127.5, 127.5)
        assert abs(centre.ra.deg - 150.0) < 1e-3 and abs(centre.dec.deg - 2.0) < 1e-3
    # The bands' reference pixels differ by sub-pixel amounts (wcs_offsets).
    crpix = np.array([exposures[b].wcs.wcs.crpix for b in 'gri'])
    shifts = np.abs(crpix[1:] - crpix[0])
    assert np.all(shifts <= 0.5) and np.all(shifts.max(axis=1) > 0)
    assert len(truth) == 33
    assert truth['kind'].tolist() == ['galaxy'] * 8 + ['star'] * 25
    assert truth['ra'].unit == u.deg and truth['x'].unit == u.pix
    assert truth['flux_r'].unit == u.adu
    assert np.all(truth['half_light_radius'][:8] >= 0.8 * u.arcsec)
    assert np.all(truth['half_light_radius'][8:] == 0)
    # First-band pixels are the truth's x, y.
    assert_array_equal(truth['x'], truth['x_g'])


def test_sources_are_separated(small_field):
    _, truth = small_field
    x, y = truth['x'].value, truth['y'].value
    distance = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(distance, np.inf)
    galaxy = np.asarray(truth['kind']) == 'galaxy'
    assert distance[galaxy].min() >= 40
    assert distance[~galaxy][:, ~galaxy].min() >= 25
    assert x[galaxy].min() >= 32 and x[galaxy].max() <= 255 - 32
    assert y[galaxy].min() >= 32 and y[galaxy].max() <= 255 - 32


def test_truth_positions_map_to_drawn_centroids(sparse_noise_free):
    """Noise-free: the truth's sky positions, through each band's WCS, are the
    centroids of the drawn light (measured 0.005 px at most)."""
    exposures, truth = sparse_noise_free
    for band, exposure in exposures.items():
        image = exposure.data
        x, y = exposure.wcs.world_to_pixel_values(truth['ra'].value, truth['dec'].value)
        assert_allclose(x, truth[f'x_{band}'].value, atol=1e-6)
        for i in range(len(truth)):
            ix, iy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
            y0, x0 = max(iy - 41, 0), max(ix - 41, 0)
            box = image[y0:iy + 42, x0:ix + 42]
            yy, xx = np.indices(box.shape)
            total = box.sum()
            assert_allclose([(xx * box).sum() / total + x0, (yy * box).sum() / total + y0],
                            [x[i], y[i]], atol=0.05)
            # The drawn flux is the catalogued flux less the wings beyond the
            # drawing box (about 0.5 percent for a galaxy with a large bulge).
            assert_allclose(total, truth[f'flux_{band}'][i].value, rtol=0.01)


def test_stars_give_an_epsf_of_the_band_seeing(small_field):
    """The ePSF of a band's stars has the band's FWHM (within 5 percent; it is
    the Moffat convolved with the pixel, which widens it by about 2 percent).

    One band proves the point (each ePSF takes seconds to build): i, whose 0.75 arcsec
    seeing is more than 5 percent from g's (0.9) and r's (0.8), so an i image drawn with
    another band's seeing would fail. The ePSF path of every band runs in
    test_pipeline.py::test_epsf_psfs_from_the_stars.
    """
    exposures, _ = small_field
    for band, exposure in [('i', exposures['i'])]:
        epsf = build_epsf(exposure, maxiters=5)
        assert epsf.meta['n_stars'] >= 20
        seeing_pixels = exposure.meta['SEEING'] / 0.2
        measured = fwhm_along_x(epsf)
        assert abs(measured / seeing_pixels - 1) < 0.05, (band, measured, seeing_pixels)
        expected = fwhm_along_x(moffat_psf(exposure.meta['SEEING'], 3.5, pixel_scale=0.2))
        assert abs(measured / expected - 1) < 0.03, (band, measured, expected)


def test_same_seed_identical_other_seed_different():
    options = dict(shape=(96, 96), n_galaxies=1, n_stars=2)
    first, truth1 = simulate_exposure(**options, seed=5)
    second, truth2 = simulate_exposure(**options, seed=5)
    other, truth3 = simulate_exposure(**options, seed=6)
    for band in first:
        assert_array_equal(first[band].data, second[band].data)
        assert_array_equal(first[band].wcs.wcs.crpix, second[band].wcs.wcs.crpix)
        assert not np.array_equal(first[band].data, other[band].data)
    assert_array_equal(truth1['ra'], truth2['ra'])
    assert not np.array_equal(truth1['ra'], truth3['ra'])


def test_options():
    exposures, truth = simulate_exposure((96, 96), bands=('r', 'z'), n_galaxies=1,
                                         n_stars=1, seeing_fwhm=0.7 * u.arcsec,
                                         sky_sigma=0.0, unit='electron/s',
                                         wcs_offsets=False, pixel_scale=0.25)
    assert list(exposures) == ['r', 'z']
    assert exposures['z'].meta['SEEING'] == 0.7
    assert exposures['z'].uncertainty is None
    assert exposures['z'].unit == u.electron / u.s
    assert_array_equal(exposures['r'].wcs.wcs.crpix, exposures['z'].wcs.wcs.crpix)
    assert_allclose(exposures['r'].wcs.wcs.cdelt, [-0.25 / 3600, 0.25 / 3600])
    assert len(truth) == 2 and truth['flux_z'].unit == u.electron / u.s


@pytest.mark.parametrize(('kwargs', 'match'), [
    ({'n_galaxies': -1}, r'n_galaxies = -1; give an integer >= 0'),
    ({'n_galaxies': 0, 'n_stars': 0}, 'give at least one source'),
    ({'bands': ('g', 'g')}, 'give distinct band names'),
    ({'seeing_fwhm': {'g': 0.9}}, r"no value for band\(s\) \['r', 'i'\]"),
    ({'seeing_fwhm': [0.9, 0.8]}, 'has 2 values for 3 bands'),
    ({'seeing_fwhm': -1.0}, r"seeing_fwhm\['g'\] = -1.0"),
    ({'seeing_fwhm': 0.7 * u.kg}, 'give angles, e.g. 0.8'),
    ({'pixel_scale': 0.2 * u.kg}, 'pixel_scale = .*give a number or a Quantity'),
    ({'sky_sigma': -1}, 'sky_sigma = -1.0'),
    ({'psf_beta': 1.0}, 'must exceed 1.1'),
    ({'galaxy_flux_range': (10, 1)}, 'low <= high'),
    ({'pixel_scale': 0}, 'pixel_scale = 0'),
    ({'unit': 'bananas'}, "unit = 'bananas' is not an astropy unit"),
    ({'n_galaxies': 60, 'shape': (128, 128)}, 'cannot place 60 galaxies'),
    ({'shape': (8, 8)}, 'at least 16x16'),
])
def test_errors(kwargs, match):
    options = dict(shape=(96, 96), n_galaxies=1, n_stars=1)
    options.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        simulate_exposure(**options)


def test_write_exposure_set_round_trip(tmp_path):
    exposures, truth = simulate_exposure((96, 96), n_galaxies=1, n_stars=2, seed=2)
    paths = write_exposure_set(tmp_path / 'set', exposures, truth)
    assert sorted(paths) == ['g', 'i', 'r', 'truth']
    for band, exposure in exposures.items():
        again = read_exposure(paths[band], weight_hdu='WEIGHT')
        assert again.unit == u.adu
        assert_allclose(again.data, exposure.data, rtol=1e-6, atol=1e-5)  # float32
        assert_allclose(again.uncertainty.array, 1.0, rtol=1e-6)
        assert_allclose(again.wcs.wcs.crpix, exposure.wcs.wcs.crpix)
        assert fits.getval(paths[band], 'SEEING') == exposure.meta['SEEING']
    table = QTable.read(paths['truth'])
    assert table['kind'].tolist() == truth['kind'].tolist()
    assert table['ra'].unit == u.deg and table['flux_i'].unit == u.adu
    assert table.meta['seed'] == 2
    # Nothing is replaced without overwrite, and nothing is written when one file
    # of the set exists.
    before = paths['g'].read_bytes()
    with pytest.raises(OutputExistsError, match='g.fits exists; pass overwrite=True'):
        write_exposure_set(tmp_path / 'set', {'g': exposures['r']}, truth)
    assert paths['g'].read_bytes() == before
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'truth.ecsv').write_text('')
    with pytest.raises(OutputExistsError, match='truth.ecsv exists'):
        write_exposure_set(tmp_path / 'other', exposures, truth)
    assert sorted(p.name for p in (tmp_path / 'other').iterdir()) == ['truth.ecsv']
    write_exposure_set(tmp_path / 'set', exposures, truth, overwrite=True)
