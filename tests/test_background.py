# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.background: the estimate shared within a set-up."""

import numpy as np
import pytest
from astropy.utils.exceptions import AstropyUserWarning
from numpy.testing import assert_array_equal

from psfdeconv.background import (
    BACKGROUND_BOX,
    clipped_stats,
    estimate_background,
    mesh_image,
    shared_estimates,
    subtract_background,
)
from psfdeconv.detection import detect_galaxies
from psfdeconv.psf import build_epsf
from psfdeconv.simulate import simulate_exposure


@pytest.fixture(scope='module')
def band():
    exposures, _ = simulate_exposure((256, 256), n_galaxies=6, n_stars=20, seed=11,
                                     bands=('r',))
    return exposures['r']


@pytest.mark.parametrize('maxiters', [1, 2, 5, 20])
def test_clipped_stats_are_astropys(maxiters):
    from astropy.stats import sigma_clipped_stats

    rng = np.random.default_rng(maxiters)
    # Skewed sky with sources, a masked region, NaN and inf.
    image = rng.normal(0.0, 1.0, (300, 300)) + rng.exponential(0.3, (300, 300))
    image[50:80, 50:80] += rng.uniform(0, 500, (30, 30))
    image[5, :7] = np.nan
    image[9, 3] = np.inf
    mask = np.zeros(image.shape, dtype=bool)
    mask[200:, 250:] = True
    for sigma in (2.5, 3.0):
        with pytest.warns(AstropyUserWarning, match='invalid values'):
            expected = sigma_clipped_stats(image, mask=mask, sigma=sigma, maxiters=maxiters)
        ours = clipped_stats(image, mask, sigma=sigma, maxiters=maxiters)
        assert np.allclose(ours, expected, rtol=1e-12, atol=0)
    # Few distinct values: the clipped set is decided by ties, as astropy's.
    levels = rng.integers(0, 4, 5000).astype(float)
    levels[:3] = 40.0
    assert np.allclose(clipped_stats(levels, maxiters=maxiters),
                       sigma_clipped_stats(levels, maxiters=maxiters), rtol=1e-12, atol=0)
    assert np.isnan(clipped_stats(image, np.ones(image.shape, dtype=bool))).all()


def _image(size=256, seed=0):
    image = np.random.default_rng(seed).normal(5.0, 1.0, (size, size))
    image[100:110, 40:60] += 50.0
    return image, np.zeros(image.shape, dtype=bool)


def test_shared_estimate_is_the_unshared_one():
    image, bad = _image()
    alone, rms_alone = estimate_background(image, bad)
    with shared_estimates():
        first, rms = estimate_background(image, bad)
        again, rms_again = estimate_background(image.copy(), bad.copy())
        # With the sources masked: the same first estimate, then its own.
        masked, _ = estimate_background(image, bad, mask_sources=True)
    assert again is first
    assert rms == rms_again == rms_alone
    assert_array_equal(first, alone)
    assert not first.flags.writeable  # shared: nobody may change it
    assert_array_equal(masked, estimate_background(image, bad, mask_sources=True)[0])


def test_changed_image_or_mask_gets_its_own_estimate():
    image, bad = _image()
    with shared_estimates():
        first, _ = estimate_background(image, bad)
        scaled, _ = estimate_background(2.0 * image, bad)
        bad[:, :3] = True
        masked, _ = estimate_background(image, bad)
    assert scaled is not first and masked is not first
    assert_array_equal(scaled, estimate_background(2.0 * image, np.zeros_like(bad))[0])
    assert_array_equal(masked, estimate_background(image, bad)[0])


def test_nothing_shared_outside_the_block():
    image, bad = _image()
    with shared_estimates():
        with shared_estimates():  # nested: the outer block holds the estimates
            inner, _ = estimate_background(image, bad)
        assert estimate_background(image, bad)[0] is inner
    outside, _ = estimate_background(image, bad)
    assert outside is not inner and outside.flags.writeable


@pytest.mark.parametrize('size', [256, 100])  # a mesh, and global statistics
def test_estimates_shared_through_a_directory(size, tmp_path, background_meshes):
    """A first estimate written to the directory by one block (another process)
    is read by the next instead of computed: the same values, bit for bit."""
    image, bad = _image(size)
    alone, rms_alone = estimate_background(image, bad)
    meshes = background_meshes
    with shared_estimates(tmp_path):
        written, rms_written = estimate_background(image, bad)
    assert len(list(tmp_path.glob('background-*.npy'))) == 1
    computed = len(meshes)
    with shared_estimates(tmp_path):
        read, rms_read = estimate_background(image, bad)
        # The masked estimate is this call's own; its first estimate is read.
        masked, _ = estimate_background(image, bad, mask_sources=True)
    assert len(meshes) == computed + (size >= 2 * BACKGROUND_BOX)
    assert rms_read == rms_written == rms_alone
    assert_array_equal(read, alone)
    assert_array_equal(written, alone)
    assert_array_equal(masked, estimate_background(image, bad, mask_sources=True)[0])
    assert not list(tmp_path.glob('*.tmp'))


def test_a_damaged_or_unwritable_shared_directory_only_loses_the_sharing(tmp_path):
    image, bad = _image()
    alone, rms_alone = estimate_background(image, bad)
    with shared_estimates(tmp_path):
        estimate_background(image, bad)
    (path,) = tmp_path.glob('background-*.npy')
    for damage in (b'not an array', np.zeros(0), np.array([2.0, 5.0, 5.0, 1.0])):
        if isinstance(damage, bytes):
            path.write_bytes(damage)
        else:
            np.save(path, damage)
        with shared_estimates(tmp_path):
            damaged, rms = estimate_background(image, bad)
        assert_array_equal(damaged, alone)
        assert rms == rms_alone
    with shared_estimates(tmp_path / 'missing'):
        unwritable, rms = estimate_background(image, bad)
    assert_array_equal(unwritable, alone)
    assert rms == rms_alone


def test_stages_give_the_same_results_shared(band):
    """The ePSF, the detection and the subtraction, shared or not."""
    def stages():
        epsf = build_epsf(band, maxiters=2)
        galaxies = detect_galaxies(band)
        subtracted, rms = subtract_background(band)
        return epsf.data, np.asarray(galaxies['x']), subtracted.data, rms

    alone = stages()
    with shared_estimates():
        shared = stages()
    for a, b in zip(alone, shared, strict=True):
        assert_array_equal(a, b)


@pytest.mark.parametrize('shape', [(384, 448), (300, 410), (130, 200)])
def test_mesh_image_is_background2ds_background(shape):
    """The two matrix products give Background2D's own cubic-spline zoom (its
    crop to frames that are not whole boxes, its clip to the mesh's range)."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = 5.0 + 0.01 * xx - 0.02 * yy + 3.0 * np.sin(xx / 40.0) + rng.normal(size=shape)
    mask = np.zeros(shape, dtype=bool)
    mask[20:90, 30:100] = True
    bkg = Background2D(image, BACKGROUND_BOX, mask=mask, sigma_clip=SigmaClip(sigma=3.0))
    expected = bkg.background
    got = mesh_image(bkg.background_mesh, BACKGROUND_BOX, shape)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert got.min() >= bkg.background_mesh.min() and got.max() <= bkg.background_mesh.max()


def test_mesh_image_of_a_flat_mesh_is_flat():
    got = mesh_image(np.full((3, 4), 2.5), 16, (40, 60))
    assert got.shape == (40, 60) and np.all(got == 2.5)


def test_mesh_image_refuses_a_frame_larger_than_its_mesh():
    from psfdeconv.exceptions import InvalidInputError

    with pytest.raises(InvalidInputError, match=r'covers \(48, 64\) pixels'):
        mesh_image(np.ones((3, 4)), 16, (49, 60))
