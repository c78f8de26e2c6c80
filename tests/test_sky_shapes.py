# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Shapes on the sky axes: `psfdeconv.measure.sky_ellipticity` and the ``*_sky_<band>``
catalogue columns, which must not depend on how the exposure's pixels are oriented."""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.wcs import WCS
from numpy.testing import assert_allclose

from psfdeconv.exceptions import ShapeMismatchError
from psfdeconv.measure import (
    SKY_SHAPE_CONVENTION,
    image_moments,
    sky_ellipticity,
    sky_jacobian,
    sky_shear,
)

SCALE = 0.2 / 3600.0  # deg/pixel


def _rotation(angle_deg):
    angle = np.deg2rad(angle_deg)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _tan_wcs(cd, crpix, crval=(150.0, 2.0)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = np.asarray(cd)
    return wcs


def _sky_gaussian(wcs, shape, sky_covariance):
    """A Gaussian image whose shape on the (east, north) axes is ``sky_covariance``
    (arcsec^2), centred on the image, drawn through the WCS's local Jacobian."""
    ny, nx = shape
    x0, y0 = (nx - 1) / 2, (ny - 1) / 2
    jacobian = sky_jacobian(wcs, x0, y0) * 3600.0
    y, x = np.mgrid[:ny, :nx]
    offsets = np.stack([x - x0, y - y0], axis=-1) @ jacobian.T
    inverse = np.linalg.inv(sky_covariance)
    return np.exp(-0.5 * np.einsum('...i,ij,...j->...', offsets, inverse, offsets))


def test_sky_jacobian_of_north_up_east_left():
    wcs = _tan_wcs([[-SCALE, 0.0], [0.0, SCALE]], [50.0, 50.0], crval=(150.0, 60.0))
    jacobian = sky_jacobian(wcs, [49.0, 10.0], [49.0, 80.0])
    assert jacobian.shape == (2, 2, 2)
    # The cos(Dec) factor makes du/dx the pixel scale, not SCALE / cos(60 deg).
    assert_allclose(jacobian[0], [[-SCALE, 0.0], [0.0, SCALE]], atol=1e-12)


def test_sky_jacobian_across_ra_zero():
    wcs = _tan_wcs([[-SCALE, 0.0], [0.0, SCALE]], [50.0, 50.0], crval=(0.0, 0.0))
    assert_allclose(sky_jacobian(wcs, 49.0, 49.0), [[-SCALE, 0.0], [0.0, SCALE]],
                    atol=1e-12)


@pytest.mark.parametrize('mirrored', [False, True])
def test_galaxy_along_x_in_a_wcs_rotated_by_30_degrees(mirrored):
    # The pixel x axis points at east + 180 + 30 deg (counter-clockwise
    # towards north), so a galaxy elongated along x has phi = 210 deg:
    # e_sky = e (cos 420, sin 420) deg.
    cd = SCALE * _rotation(30.0) @ np.diag([-1.0, 1.0])
    if mirrored:
        # Pixels flipped left-right: the x axis reverses (the CD's first column).
        cd = cd @ np.diag([-1.0, 1.0])
    wcs = _tan_wcs(cd, [32.0, 32.0])
    jacobian = sky_jacobian(wcs, 31.0, 31.0)
    assert (np.linalg.det(jacobian) > 0) == mirrored
    e1_sky, e2_sky = sky_ellipticity(0.4, 0.0, jacobian)
    assert_allclose([e1_sky, e2_sky], [0.4 * np.cos(np.deg2rad(60.0)),
                                       0.4 * np.sin(np.deg2rad(60.0))], atol=1e-6)


def test_drawn_gaussian_has_the_same_sky_shape_in_rotated_and_mirrored_frames():
    # Major axis at PA = 30 deg (from north through east): phi = 60 deg.
    major, minor, pa = 1.2, 0.6, np.deg2rad(30.0)
    direction = np.array([np.sin(pa), np.cos(pa)])  # (east, north)
    normal = np.array([-direction[1], direction[0]])
    covariance = (major**2 * np.outer(direction, direction)
                  + minor**2 * np.outer(normal, normal))
    e = (major**2 - minor**2) / (major**2 + minor**2)
    expected = [e * np.cos(np.deg2rad(120.0)), e * np.sin(np.deg2rad(120.0))]
    shape = (65, 65)
    base = SCALE * _rotation(30.0) @ np.diag([-1.0, 1.0])
    results = []
    for cd in (base, base @ np.diag([-1.0, 1.0]), np.diag([-SCALE, SCALE]),
               np.diag([SCALE, SCALE])):
        wcs = _tan_wcs(cd, [33.0, 33.0])
        moments = image_moments(_sky_gaussian(wcs, shape, covariance))
        results.append(sky_ellipticity(moments['e1'], moments['e2'],
                                       sky_jacobian(wcs, 32.0, 32.0)))
    assert_allclose(results, [expected] * 4, atol=1e-4)


def test_sky_ellipticity_broadcasts_and_keeps_nan():
    e1, e2 = sky_ellipticity([0.1, np.nan], [0.2, 0.0], np.diag([-1.0, 1.0]))
    assert_allclose(e1, [0.1, np.nan])
    assert_allclose(e2, [-0.2, np.nan])


def test_sky_ellipticity_rejects_a_bad_jacobian():
    with pytest.raises(ShapeMismatchError, match=r'shape \(\.\.\., 2, 2\)'):
        sky_ellipticity(0.1, 0.2, np.eye(3))
    with pytest.raises(ShapeMismatchError, match='do not broadcast'):
        sky_ellipticity([0.1, 0.2], [0.1, 0.2], np.ones((3, 2, 2)))


# --- end to end ----------------------------------------------------------------------

def _reoriented(exposure, transform, matrix):
    """``exposure`` with its pixel arrays passed through ``transform`` (np.fliplr,
    np.rot90), where new 0-based pixel p' is old pixel ``matrix @ p' + (nx - 1, 0)``
    (true of both); the WCS follows, so every pixel keeps its sky position."""
    nx = exposure.shape[1]
    old = exposure.wcs
    cd = old.wcs.get_cdelt()[:, None] * old.wcs.get_pc()
    crpix0 = np.linalg.solve(matrix, old.wcs.crpix - 1.0 - np.array([nx - 1, 0.0]))
    wcs = _tan_wcs(cd @ matrix, crpix0 + 1.0, crval=old.wcs.crval)
    uncertainty = None
    if exposure.uncertainty is not None:
        uncertainty = StdDevUncertainty(transform(exposure.uncertainty.array).copy())
    return CCDData(transform(exposure.data).copy(), unit=exposure.unit, wcs=wcs,
                   uncertainty=uncertainty, meta=dict(exposure.meta))


@pytest.fixture(scope='module')
def three_orientations():
    from psfdeconv.simulate import simulate_exposure

    exposures, truth = simulate_exposure((160, 160), bands=('r',), n_galaxies=3, n_stars=1,
                                         seed=8)
    exposure = exposures['r']
    flipped = _reoriented(exposure, np.fliplr, np.array([[-1.0, 0.0], [0.0, 1.0]]))
    rotated = _reoriented(exposure, np.rot90, np.array([[0.0, -1.0], [1.0, 0.0]]))
    galaxies = truth[truth['kind'] == 'galaxy']
    positions = SkyCoord(galaxies['ra'], galaxies['dec'])
    psf = f'moffat:fwhm={exposure.meta["SEEING"]}arcsec,beta=3.5'
    from psfdeconv.pipeline import deconvolve_catalog

    return [deconvolve_catalog({'r': e}, positions, psf, symmetries=8,
                               subtract_background=False)[0]
            for e in (exposure, flipped, rotated)]


def test_reoriented_wcs_keeps_the_sky(three_orientations):
    original, flipped, rotated = three_orientations
    for catalog in (flipped, rotated):
        assert original['sky_centroid'].separation(
            catalog['sky_centroid']).arcsec.max() < 0.05


def test_sky_shapes_do_not_depend_on_pixel_orientation(three_orientations):
    # Not exact: a source lands on stamp pixel (32, 32) of a 64-pixel stamp,
    # half a pixel off the centre about which the 8 symmetries are averaged,
    # so a flipped exposure's stamps sit one pixel differently around each
    # galaxy; that moves HSM shapes by up to ~0.018 here, unweighted ones by
    # ~0.005.
    original, flipped, rotated = three_orientations
    assert np.all(np.isfinite(original['e1_sky_r']))
    for catalog in (flipped, rotated):
        for name in ('e1_sky_r', 'e2_sky_r', 'hsm_e1_sky_r', 'hsm_e2_sky_r'):
            assert_allclose(catalog[name], original[name], atol=0.02, err_msg=name)
    # The pixel-frame shapes change as spin-2 quantities: a mirror flips e2,
    # a quarter turn flips e1 and e2.
    for prefix in ('', 'hsm_'):
        e1, e2 = original[f'{prefix}e1_r'], original[f'{prefix}e2_r']
        assert_allclose(flipped[f'{prefix}e1_r'], e1, atol=0.02)
        assert_allclose(flipped[f'{prefix}e2_r'], -e2, atol=0.02)
        assert_allclose(rotated[f'{prefix}e1_r'], -e1, atol=0.02)
        assert_allclose(rotated[f'{prefix}e2_r'], -e2, atol=0.02)
    assert np.max(np.abs(original['e2_r'])) > 0.05  # the sign flips are seen


def test_shape_frame_is_recorded(three_orientations):
    catalog = three_orientations[0]
    frame = catalog.meta['shape_frame']
    assert frame['pixel'].startswith('reference-band pixel axes')
    assert SKY_SHAPE_CONVENTION in frame['sky'] and 'shear_g1_sky_<band>' in frame['sky']
    assert 'NE-SW' in catalog['e2_sky_r'].info.description
    # The 1-band model has no shear response: the sky shear columns are there, NaN.
    assert 'NE-SW' in catalog['shear_g2_sky_r'].info.description
    assert np.all(np.isnan(catalog['shear_g1_sky_r']))


@pytest.mark.parametrize('mirrored', [False, True])
@pytest.mark.parametrize('angle', [0.0, 17.0, 90.0, 135.0, -60.0])
def test_sky_shear_is_a_spin2_turn(angle, mirrored):
    rng = np.random.default_rng(3)
    g1, g2 = rng.normal(0, 0.03, (2, 50))
    parity = np.diag([-1.0, 1.0]) if mirrored else np.eye(2)
    turn = _rotation(angle) @ parity
    # The WCS's own scale and a small shear are left out: only the turn counts.
    jacobian = 3e-5 * turn @ np.array([[1.02, 0.01], [0.01, 0.98]])
    got1, got2 = sky_shear(g1, g2, jacobian)
    phase = np.exp(2j * np.deg2rad(angle))
    expected = (g1 + 1j * (-g2 if mirrored else g2)) * phase
    assert_allclose(got1, expected.real, atol=1e-12)
    assert_allclose(got2, expected.imag, atol=1e-12)
    # For a conformal Jacobian it is the ellipticity transform.
    assert_allclose(sky_shear(g1, g2, 5 * turn), sky_ellipticity(g1, g2, turn), atol=1e-12)


def test_sky_shear_nan_and_shapes():
    jacobians = np.array([np.eye(2), np.full((2, 2), np.nan), -np.eye(2)])
    g1, g2 = sky_shear(np.array([0.01, 0.01, 0.01]), np.array([np.nan, 0.02, 0.02]),
                       jacobians)
    assert np.isnan(g2[0]) and np.isnan(g1[1]) and np.isnan(g2[1])
    assert_allclose([g1[2], g2[2]], [0.01, 0.02])  # a half turn is the identity
    with pytest.raises(ShapeMismatchError, match=r'jacobian must have shape'):
        sky_shear(0.01, 0.0, np.eye(3))


def test_no_sky_columns_without_a_wcs():
    from psfdeconv.pipeline import deconvolve_catalog
    from psfdeconv.simulate import simulate_exposure

    exposures, truth = simulate_exposure((160, 160), bands=('r',), n_galaxies=1, n_stars=1,
                                         seed=8)
    exposure = exposures['r']
    bare = CCDData(exposure.data, unit=exposure.unit, wcs=None,
                   uncertainty=exposure.uncertainty, meta=dict(exposure.meta))
    positions = truth[truth['kind'] == 'galaxy']['x', 'y']
    catalog, _ = deconvolve_catalog({'r': bare}, positions, 'moffat:fwhm=0.8arcsec,beta=3.5',
                                    pixel_scale=0.2)
    assert 'e1_r' in catalog.colnames
    assert not [name for name in catalog.colnames if '_sky_' in name]
    assert 'no celestial WCS' in catalog.meta['shape_frame']['sky']


def test_sky_columns_and_frame_survive_fits(three_orientations, tmp_path):
    from psfdeconv.io import read_catalog, write_catalog

    catalog = three_orientations[0]
    write_catalog(catalog, tmp_path / 'catalog.fits')
    back = read_catalog(tmp_path / 'catalog.fits')
    assert back.meta['shape_frame'] == catalog.meta['shape_frame']
    assert_allclose(back['hsm_e2_sky_r'], catalog['hsm_e2_sky_r'])
    assert back['e1_sky_r'].info.description == catalog['e1_sky_r'].info.description
