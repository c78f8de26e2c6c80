# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.measure: moments, HSM shapes, SNR and the table."""

import warnings

import numpy as np
import pytest
from _images import elliptical_gaussian
from astropy import units as u
from astropy.table import QTable
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv import measure
from psfdeconv.exceptions import (
    InvalidInputError,
    InvalidPixelsError,
    PixelScaleError,
    ShapeMismatchError,
)

SIGMA_X, SIGMA_Y = 4.0, 2.5


def gaussian(shape=(64, 64), sigma_x=SIGMA_X, sigma_y=SIGMA_Y, theta=0.0, x0=31.3, y0=32.6,
             flux=1.0):
    """Elliptical Gaussian sampled at pixel centres, major axis at angle
    ``theta`` from the x axis, normalised to ``flux``.

    Sampling (no pixel integration) keeps the moments analytic: for
    sigma >= 2.5 pixels the aliasing error of the discrete sums is of
    order exp(-2 pi^2 sigma^2) and 8 sigma of margin makes truncation
    negligible, so the moments match the continuous ones to ~1e-12.
    """
    return elliptical_gaussian(shape, sigma_x, sigma_y, theta, x0, y0, flux)


def expected_shape(theta, sigma_x=SIGMA_X, sigma_y=SIGMA_Y):
    e = (sigma_x**2 - sigma_y**2) / (sigma_x**2 + sigma_y**2)
    return e * np.cos(2 * theta), e * np.sin(2 * theta), np.hypot(sigma_x, sigma_y)


@pytest.mark.parametrize('theta', [0.0, 0.3, 1.0, -0.7, np.pi / 2])
def test_image_moments_gaussian_analytic(theta):
    image = gaussian(theta=theta, flux=123.0)
    m = measure.image_moments(image)
    e1, e2, size = expected_shape(theta)
    assert_allclose(m['flux'], 123.0, rtol=1e-12)
    assert_allclose([m['x'], m['y']], [31.3, 32.6], atol=1e-9)
    assert_allclose([m['e1'], m['e2']], [e1, e2], atol=1e-9)
    assert_allclose(m['e'], abs(e1 + 1j * e2), atol=1e-9)
    assert_allclose(m['size'], size, rtol=1e-9)


def test_image_moments_centroid_is_zero_based():
    image = np.zeros((5, 7))
    image[3, 1] = 2.0  # row 3, column 1
    m = measure.image_moments(image)
    assert (m['x'], m['y']) == (1.0, 3.0)


def test_image_moments_stack_matches_single_images():
    thetas = np.array([[0.0, 0.4], [1.1, -0.3], [0.8, 2.0]])
    stack = np.stack([np.stack([gaussian(theta=t, flux=1 + t**2) for t in row])
                      for row in thetas])
    m = measure.image_moments(stack)
    assert m['e1'].shape == (3, 2)
    for i in range(3):
        for j in range(2):
            single = measure.image_moments(stack[i, j])
            for key in single:
                assert_allclose(m[key][i, j], single[key], rtol=1e-12, atol=1e-14)


def test_image_moments_flux_scaling_invariance():
    image = gaussian(theta=0.6)
    base = measure.image_moments(image)
    scaled = measure.image_moments(7.3 * image)
    assert_allclose(scaled['flux'], 7.3 * base['flux'], rtol=1e-12)
    for key in ('x', 'y', 'e1', 'e2', 'e', 'size'):
        assert_allclose(scaled[key], base[key], rtol=1e-12)


def test_image_moments_pixel_scale():
    image = gaussian(theta=0.2)
    size_pix = measure.image_moments(image)['size']
    for scale in (0.2, 0.2 * u.arcsec / u.pix, 200 * u.mas / u.pix, 0.2 * u.arcsec):
        m = measure.image_moments(image, pixel_scale=scale)
        assert_allclose(m['size'], 0.2 * size_pix, rtol=1e-12)
        # centroids stay in pixels
        assert_allclose(m['x'], 31.3, atol=1e-9)


def test_image_moments_pixel_scale_per_object():
    stack = np.stack([np.stack([gaussian()] * 2)] * 3)  # (3, 2, 64, 64)
    scales = np.array([0.1, 0.2, 0.3])[:, None]
    m = measure.image_moments(stack, pixel_scale=scales)
    assert_allclose(m['size'], np.hypot(SIGMA_X, SIGMA_Y) * np.broadcast_to(scales, (3, 2)),
                    rtol=1e-9)


def test_image_moments_blank_gives_nan_without_warning():
    images = np.zeros((3, 16, 16))
    images[1] = -1.0  # negative total flux
    images[2, 8, 8] = 5.0  # a point: M0 > 0 but Mxx + Myy = 0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m = measure.image_moments(images)
    assert_array_equal(m['flux'], [0.0, -256.0, 5.0])
    for key in ('x', 'y'):
        assert np.all(np.isnan(m[key][:2]))
    assert (m['x'][2], m['y'][2]) == (8.0, 8.0)
    for key in ('e1', 'e2', 'e', 'size'):
        assert np.all(np.isnan(m[key]))


def test_image_moments_negative_second_moments_give_nan():
    # M0 = 0.5 > 0, but the negative pixels far out make Mxx < 0.
    image = np.zeros((21, 21))
    image[10, 10] = 1.0
    image[10, 0] = image[10, 20] = -0.25
    m = measure.image_moments(image)
    assert m['flux'] == 0.5
    assert_allclose([m['x'], m['y']], [10.0, 10.0])
    assert np.isnan(m['e1']) and np.isnan(m['size'])


@pytest.mark.parametrize('theta', [0.0, 0.3, 1.0])
def test_hsm_moments_gaussian(theta):
    image = gaussian(theta=theta, flux=50.0)
    m = measure.hsm_moments(image)
    e1, e2, _ = expected_shape(theta)
    assert m['hsm_status'] == 0
    # HSM's adaptive weight matches an elliptical Gaussian exactly; GalSim
    # iterates to precision 1e-6 and reports float32 values.
    assert_allclose([m['hsm_e1'], m['hsm_e2']], [e1, e2], atol=1e-3)
    assert_allclose([m['hsm_x'], m['hsm_y']], [31.3, 32.6], atol=1e-3)
    assert_allclose(m['hsm_sigma'], np.sqrt(SIGMA_X * SIGMA_Y), rtol=1e-3)
    assert_allclose(m['hsm_flux'], 50.0, rtol=1e-3)


def test_hsm_moments_pixel_scale_and_shape():
    stack = np.stack([gaussian(), gaussian(theta=0.5)])[None]  # (1, 2, 64, 64)
    m = measure.hsm_moments(stack, pixel_scale=0.25 * u.arcsec / u.pix)
    assert m['hsm_sigma'].shape == (1, 2)
    assert m['hsm_status'].dtype.kind == 'i'
    assert_allclose(m['hsm_sigma'], 0.25 * np.sqrt(SIGMA_X * SIGMA_Y), rtol=1e-3)


def test_hsm_moments_failures_give_nan():
    rng = np.random.default_rng(3)
    images = np.stack([np.zeros((32, 32)),                 # blank
                       rng.normal(size=(32, 32)),           # pure noise
                       -gaussian(shape=(32, 32), x0=16, y0=16),  # negative source
                       gaussian(shape=(32, 32), x0=16, y0=16)])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m = measure.hsm_moments(images)
    assert m['hsm_status'][0] == -1
    assert m['hsm_status'][1] != 0
    assert m['hsm_status'][2] == -2
    assert m['hsm_status'][3] == 0
    for key in ('hsm_e1', 'hsm_e2', 'hsm_sigma', 'hsm_x', 'hsm_y', 'hsm_flux'):
        assert np.all(np.isnan(m[key][:3]))
        assert np.isfinite(m[key][3])


def test_snr_matched_filter():
    image = gaussian(flux=200.0, theta=0.4)
    # sum(I^2) of a sampled Gaussian = flux^2 / (4 pi sx sy)
    expected = 200.0 / np.sqrt(4 * np.pi * SIGMA_X * SIGMA_Y) / 2.0
    assert_allclose(measure.snr(image, 2.0), expected, rtol=1e-9)
    stack = np.stack([image, 2 * image])
    assert_allclose(measure.snr(stack, [2.0, 4.0]), [expected, expected], rtol=1e-9)


def test_snr_quantities():
    image = np.zeros((5, 5))
    image[2, 2] = 30.0
    assert_allclose(measure.snr(image * u.nJy, 3.0 * u.nJy), 10.0)
    assert_allclose(measure.snr(image * u.nJy, 0.003 * u.uJy), 10.0)


def test_measure_table_columns_units_meta():
    rng = np.random.default_rng(0)
    thetas = rng.uniform(0, np.pi, (4, 2))
    stamps = np.stack([np.stack([gaussian(theta=t, flux=10.0) for t in row])
                       for row in thetas])
    psfs = np.stack([np.stack([gaussian((31, 31), 2.0, 1.5, t, 15, 15) for t in row])
                     for row in thetas[:, ::-1]])
    table = measure.measure_table(stamps, pixel_scale=0.2, bands=('g', 'r'), unit=u.nJy,
                                  psf_images=psfs)
    assert isinstance(table, QTable)
    assert len(table) == 4
    for band in ('g', 'r'):
        for name in ('flux', 'x', 'y', 'e1', 'e2', 'e', 'size', 'hsm_e1', 'hsm_e2',
                     'hsm_sigma', 'hsm_x', 'hsm_y', 'hsm_flux', 'hsm_status', 'psf_e1',
                     'psf_e2'):
            column = table[f'{name}_{band}']
            assert column.info.description, f'{name}_{band} has no description'
    assert table['flux_g'].unit == u.nJy
    assert table['hsm_flux_r'].unit == u.nJy
    assert table['x_g'].unit == u.pix
    assert table['size_r'].unit == u.arcsec
    assert table['hsm_sigma_g'].unit == u.arcsec
    e1, e2, size = expected_shape(thetas[:, 0])
    assert_allclose(table['e1_g'], e1, atol=1e-9)
    assert_allclose(table['e2_g'], e2, atol=1e-9)
    assert_allclose(table['size_g'].to_value(u.arcsec), 0.2 * size, rtol=1e-9)
    assert_allclose(table['hsm_e1_g'], e1, atol=1e-3)
    psf_e1, psf_e2, _ = expected_shape(thetas[:, 1], 2.0, 1.5)
    assert_allclose(table['psf_e1_g'], psf_e1, atol=1e-6)
    assert_allclose(table['psf_e2_g'], psf_e2, atol=1e-6)
    assert table.meta['bands'] == ['g', 'r']
    assert 'e1' in table.meta['moment_definitions']


def test_measure_table_defaults_and_pixel_scales():
    stamps = np.stack([np.stack([gaussian(), gaussian(), gaussian()])] * 2)  # (2, 3, ...)
    table = measure.measure_table(stamps * u.electron, pixel_scale=[0.1, 0.2], hsm=False)
    assert 'flux_b2' in table.colnames and 'hsm_e1_b0' not in table.colnames
    assert table['flux_b0'].unit == u.electron
    size = np.hypot(SIGMA_X, SIGMA_Y)
    # a 1-D pixel_scale of length n is per object, not per band
    assert_allclose(table['size_b1'].to_value(u.arcsec), [0.1 * size, 0.2 * size], rtol=1e-9)
    per_band = measure.measure_table(stamps, pixel_scale=np.full((2, 3), 0.3), hsm=False)
    assert_allclose(per_band['size_b2'].to_value(u.arcsec), 0.3 * size, rtol=1e-9)


# --- error messages ---------------------------------------------------------------------

def test_error_images_not_2d():
    with pytest.raises(ShapeMismatchError, match=r'at least 2 dimensions.*got shape \(5,\)'):
        measure.image_moments(np.ones(5))


def test_error_images_empty():
    with pytest.raises(ShapeMismatchError, match='empty images'):
        measure.image_moments(np.ones((3, 0)))


def test_error_images_not_numeric():
    with pytest.raises(InvalidInputError, match='must be a numeric array'):
        measure.image_moments([['a', 'b']])


def test_error_images_nonfinite():
    image = np.ones((8, 8))
    image[2, 3] = np.nan
    with pytest.raises(InvalidPixelsError, match=r'1 non-finite .* index \(2, 3\)'):
        measure.image_moments(image)
    with pytest.raises(InvalidPixelsError, match='non-finite'):
        measure.hsm_moments(image)


@pytest.mark.parametrize('scale', [0.0, -0.2, np.nan, [0.2, -1.0]])
def test_error_pixel_scale_not_positive(scale):
    with pytest.raises(PixelScaleError, match='must be positive and finite'):
        measure.image_moments(np.ones((2, 8, 8)), pixel_scale=scale)


def test_error_pixel_scale_not_a_number():
    with pytest.raises(PixelScaleError, match="pixel_scale = 'big'; give arcsec per pixel"):
        measure.image_moments(np.ones((8, 8)), pixel_scale='big')


def test_error_pixel_scale_unit():
    with pytest.raises(PixelScaleError, match=r'pixel_scale = 1.0 m; give an angle per pixel'):
        measure.image_moments(np.ones((8, 8)), pixel_scale=1 * u.m)


def test_error_pixel_scale_broadcast():
    with pytest.raises(ShapeMismatchError, match=r'does not broadcast .* need shape \(n, 1\)'):
        measure.image_moments(np.ones((3, 2, 8, 8)), pixel_scale=[0.1, 0.2, 0.3])


def test_error_guess_sigma():
    with pytest.raises(InvalidInputError, match='guess_sigma must be a positive number'):
        measure.hsm_moments(np.ones((8, 8)), guess_sigma=-1.0)


@pytest.mark.parametrize('sigma', [0.0, -1.0, np.inf])
def test_error_snr_sigma(sigma):
    with pytest.raises(InvalidInputError, match='noise_sigma must be positive and finite'):
        measure.snr(np.ones((8, 8)), sigma)


def test_error_snr_units():
    with pytest.raises(InvalidInputError, match='but the images have none'):
        measure.snr(np.ones((8, 8)), 1 * u.nJy)
    with pytest.raises(InvalidInputError, match='cannot be converted to the image unit'):
        measure.snr(np.ones((8, 8)) * u.nJy, 1 * u.s)


def test_error_snr_broadcast():
    with pytest.raises(ShapeMismatchError, match='does not broadcast'):
        measure.snr(np.ones((3, 8, 8)), [1.0, 2.0])


def test_error_measure_table_not_4d():
    with pytest.raises(ShapeMismatchError, match=r'\(n, n_bands, ny, nx\).*images\[:, None\]'):
        measure.measure_table(np.ones((2, 8, 8)), pixel_scale=0.2)


def test_error_measure_table_bands():
    with pytest.raises(ShapeMismatchError, match='one name per band'):
        measure.measure_table(np.ones((2, 3, 8, 8)), pixel_scale=0.2, bands=('g', 'r'))
    with pytest.raises(InvalidInputError, match='distinct identifiers'):
        measure.measure_table(np.ones((2, 2, 8, 8)), pixel_scale=0.2, bands=('g', 'g'))


def test_error_measure_table_psf_shape():
    with pytest.raises(ShapeMismatchError, match=r'psf_images must have shape .*\(2, 2, py, px\)'):
        measure.measure_table(np.ones((2, 2, 8, 8)), pixel_scale=0.2, hsm=False,
                              psf_images=np.ones((2, 3, 5, 5)))
