# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.simulate: seeding, PSFs, truth, noise, blanks, config and files."""

import json

import h5py
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv import simulate
from psfdeconv._fourier import convolve_same
from psfdeconv.exceptions import ConfigError, InvalidInputError, OutputExistsError
from psfdeconv.simulate import (
    SIMULATION_FIELDS,
    SimulationConfig,
    SimulationFile,
    read_simulation,
    simulate_stamps,
    write_simulation,
)

#: A reduced configuration (32x32 stamps, 15x15 PSFs) that simulates ~500 objects a second.
SMALL = dict(stamp_size=32, psf_size=15)


def centroid(images):
    """First moments (x, y) in 0-based pixel coordinates over the last two axes."""
    ny, nx = images.shape[-2:]
    y, x = np.mgrid[0:ny, 0:nx]
    total = images.sum(axis=(-2, -1))
    return (images * x).sum(axis=(-2, -1)) / total, (images * y).sum(axis=(-2, -1)) / total


@pytest.fixture(scope='module')
def small_sims():
    """600 objects of the reduced config: two chunks (500 + 100), one worker."""
    return simulate_stamps(600, config=SimulationConfig(**SMALL), seed=11, n_workers=1)


@pytest.fixture(scope='module')
def full_size_sims():
    """80 objects on the default 64x64 stamps, half of them blank (15x15 PSFs for speed)."""
    config = SimulationConfig(blank_fraction=0.5, psf_size=15)
    return simulate_stamps(80, config=config, seed=3)


# --- seeding ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays():
    config = SimulationConfig(**SMALL)
    first = simulate_stamps(12, config=config, seed=5)
    second = simulate_stamps(12, config=config, seed=5)
    assert set(first) == set(SIMULATION_FIELDS)
    for key in first:
        assert_array_equal(first[key], second[key], err_msg=key)


def test_different_seed_gives_different_arrays():
    config = SimulationConfig(**SMALL)
    first = simulate_stamps(12, config=config, seed=5)
    other = simulate_stamps(12, config=config, seed=6)
    for key in ('observed', 'psf', 'pixel_scale', 'noise_sigma', 'psf_fwhm'):
        assert not np.array_equal(first[key], other[key]), key


def test_result_does_not_depend_on_workers(small_sims):
    # 600 objects are two independently seeded chunks; with 2 workers they run in 2 processes.
    assert len(simulate._chunk_plan(600, 11)) == 2
    parallel = simulate_stamps(600, config=SimulationConfig(**SMALL), seed=11, n_workers=2)
    assert set(parallel) == set(small_sims)
    for key in small_sims:
        assert_array_equal(parallel[key], small_sims[key], err_msg=key)


def test_shapes_and_dtypes(small_sims):
    n, nb = 600, 3
    assert small_sims['truth'].shape == (n, nb, 32, 32)
    assert small_sims['observed'].shape == (n, nb, 32, 32)
    assert small_sims['psf'].shape == (n, nb, 15, 15)
    assert small_sims['pixel_scale'].shape == (n,)
    assert small_sims['noise_sigma'].shape == (n, nb)
    assert small_sims['offset'].shape == (n, 2)
    assert small_sims['is_blank'].dtype == bool
    for key in ('truth', 'observed', 'psf'):
        assert small_sims[key].dtype == np.float32


def test_drawn_values_lie_in_config_ranges(small_sims):
    config = SimulationConfig(**SMALL)
    for key, field in (('pixel_scale', 'pixel_scale_range'), ('psf_fwhm', 'psf_fwhm_range'),
                       ('psf_beta', 'psf_beta_range'), ('noise_sigma', 'noise_sigma_range'),
                       ('psf_g1', 'psf_shear_range'), ('psf_g2', 'psf_shear_range'),
                       ('offset', 'offset_range')):
        low, high = getattr(config, field)
        assert small_sims[key].min() >= low, key
        assert small_sims[key].max() <= high, key


# --- PSFs ------------------------------------------------------------------------------------


@pytest.mark.parametrize('shear_range', [(0.0, 0.0), (-0.05, 0.05)])
def test_psfs_are_unit_sum_and_centred(shear_range):
    config = SimulationConfig(psf_shear_range=shear_range, **SMALL)
    psfs = simulate_stamps(30, config=config, seed=1)['psf'].astype(np.float64)
    # float32 storage: sums are 1 to a few float32 ulps.
    assert_allclose(psfs.sum(axis=(-2, -1)), 1.0, rtol=0, atol=1e-6)
    # A Moffat, sheared or not, is symmetric under a 180-degree rotation about its centre,
    # drawn on an odd grid centred on the middle pixel: its centroid is that pixel up to
    # rounding (measured ~2e-8 px); 1e-3 px is the spec.
    x, y = centroid(psfs)
    assert_allclose(x, 7.0, atol=1e-3)
    assert_allclose(y, 7.0, atol=1e-3)
    assert psfs.min() >= 0


# --- truth -----------------------------------------------------------------------------------


def test_truth_centroid_is_stamp_centre_plus_offset():
    # Smooth disks only (no knots, no bulge) are point-symmetric about the galaxy centre, so
    # their centroid is the drawn centre; sizes up to 3 px keep the truncation by the stamp
    # edge negligible. The 0.05 px tolerance covers the centroid error of sampling the
    # smallest (0.6 px) disks on the 3x oversampled grid (measured max 0.023 px).
    config = SimulationConfig(knot_fraction_range=(0.0, 0.0), bulge_fraction_range=(0.0, 0.0),
                              blank_fraction=0.0, psf_size=15,
                              max_half_light_radius_pixels=3.0)
    sims = simulate_stamps(30, config=config, seed=2)
    x, y = centroid(sims['truth'].astype(np.float64))
    centre = config.stamp_size // 2
    # Every band: the band transforms are powers of band 1, which keep the symmetry.
    assert_allclose(x, np.broadcast_to(centre + sims['offset'][:, :1], x.shape), atol=0.05)
    assert_allclose(y, np.broadcast_to(centre + sims['offset'][:, 1:], y.shape), atol=0.05)
    assert np.abs(sims['offset']).max() > 1  # the offsets were actually exercised


def test_truth_is_non_negative_and_galaxies_have_flux(small_sims):
    truth = small_sims['truth']
    assert truth.min() >= 0
    galaxies = ~small_sims['is_blank']
    assert (truth[galaxies].sum(axis=(-2, -1)) > 0).all()


# --- blanks and noise ------------------------------------------------------------------------


def test_blanks_are_zero_truth_and_pure_noise(full_size_sims):
    sims = full_size_sims
    blank = sims['is_blank']
    assert blank.sum() > 10
    assert_array_equal(sims['truth'][blank], 0.0)
    assert_array_equal(sims['offset'][blank], 0.0)
    assert_array_equal(sims['half_light_radius'][blank], 0.0)
    # 64x64 = 4096 pixels: the sample std's relative error is 1/sqrt(2*4096) = 1.1%,
    # so 10% is a 9-sigma bound.
    ratio = sims['observed'][blank].std(axis=(-2, -1)) / sims['noise_sigma'][blank]
    assert_allclose(ratio, 1.0, atol=0.10)


def test_blank_fraction_matches_config(small_sims):
    # Binomial: 600 draws with p = 0.23; 4 sigma = 4 sqrt(p (1 - p) / n) = 0.069.
    p, n = SimulationConfig().blank_fraction, 600
    assert abs(small_sims['is_blank'].mean() - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_observed_minus_convolved_truth_is_the_noise(full_size_sims):
    sims = full_size_sims
    noiseless = convolve_same(sims['truth'].astype(np.float64), sims['psf'].astype(np.float64))
    residual = (sims['observed'] - noiseless) / sims['noise_sigma'][..., None, None]
    # ~1e6 normalised pixels: the pooled std and mean have errors ~0.001; 5-sigma bounds.
    assert abs(residual.std() - 1.0) < 0.005
    assert abs(residual.mean()) < 0.005
    # Per object and band (4096 pixels, 1.1% error each, 240 values): 10%.
    assert_allclose(residual.std(axis=(-2, -1)), 1.0, atol=0.10)
    # The noise is independent of the signal: bright galaxies have the same residual std.
    bright = sims['snr'] > 50
    assert bright.sum() > 5
    assert_allclose(residual.std(axis=(-2, -1))[bright], 1.0, atol=0.10)


def test_snr_is_matched_filter_snr(full_size_sims):
    sims = full_size_sims
    noiseless = convolve_same(sims['truth'].astype(np.float64), sims['psf'].astype(np.float64))
    expected = np.sqrt((noiseless**2).sum(axis=(-2, -1))) / sims['noise_sigma']
    # The stored SNR comes from the float64 truth; ours from its float32 copy.
    assert_allclose(sims['snr'], expected, rtol=1e-5, atol=1e-6)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize('values, match', [
    ({'psf_size': 40}, 'psf_size must be odd'),
    ({'psf_size': 71}, 'psf_size must be odd and at most stamp_size'),
    ({'stamp_size': 60}, 'stamp_size must be a positive multiple of 8, got 60'),
    ({'n_bands': 0}, 'n_bands must be >= 1'),
    ({'n_bands': 4}, 'band_alpha needs one value per band'),
    ({'blank_fraction': 1.0}, r'blank_fraction must be in \[0, 1\)'),
    ({'blank_fraction': -0.1}, r'blank_fraction must be in \[0, 1\)'),
    ({'pixel_scale_range': (0.3, 0.1)}, r'pixel_scale_range must satisfy 0 < low <= high'),
    ({'psf_fwhm_range': (0.0, 0.8)}, 'psf_fwhm_range must satisfy'),
    ({'noise_sigma_range': (-1.0, 1.0)}, 'noise_sigma_range must satisfy'),
    ({'psf_beta_range': (1.0, 3.0)}, 'Moffat beta must exceed 1.1'),
    ({'oversampling': 2}, 'oversampling must be a positive odd integer'),
])
def test_config_validation(values, match):
    with pytest.raises(ConfigError, match=match) as info:
        SimulationConfig(**values)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize('values', [
    # |e| must be < 1 (GalSim raises GalSimRangeError for e > 1 at draw time).
    {'ellipticity_range': (0.0, 1.2)},
    # Flux fractions must lie in [0, 1]: 1.5 or -0.1 give negative disk or knot fluxes
    # silently.
    {'bulge_fraction_range': (0.0, 1.5)},
    {'knot_fraction_range': (-0.1, 0.3)},
    # low > high: numpy's integers() raises at draw time instead.
    {'n_knots_range': (5, 3)},
])
def test_config_validation_of_morphology_ranges(values):
    # Invalid ranges must be refused when the configuration is made (the public boundary),
    # not deep inside a worker process halfway through a simulation.
    with pytest.raises(ConfigError):
        SimulationConfig(**values)


def test_config_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown simulation config keys \['bogus'\]"):
        SimulationConfig.from_dict({'stamp_size': 32, 'bogus': 1})


def test_config_dict_and_json_round_trip(tmp_path):
    config = SimulationConfig(stamp_size=32, psf_size=15, pixel_scale_range=[0.1, 0.2])
    # Lists from JSON become tuples, so configs compare equal after a round trip.
    assert config.pixel_scale_range == (0.1, 0.2)
    values = config.to_dict()
    assert values['pixel_scale_range'] == [0.1, 0.2]
    assert SimulationConfig.from_dict(values) == config
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(values))
    assert SimulationConfig.from_json(path) == config


def test_n_objects_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match='n_objects must be >= 1, got 0'):
        simulate_stamps(0)
    with pytest.raises(ConfigError, match='n_objects must be >= 1'):
        write_simulation(tmp_path / 'x.h5', 0, n_workers=1)
    assert list(tmp_path.iterdir()) == []


# --- files -----------------------------------------------------------------------------------


def test_write_and_read_round_trip(tmp_path):
    config = SimulationConfig(**SMALL)
    path = write_simulation(tmp_path / 'sims.h5', 6, config=config, seed=3, n_workers=1)
    assert path == tmp_path / 'sims.h5'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sims.h5']
    expected = simulate_stamps(6, config=config, seed=3)
    with SimulationFile(path) as sims:
        assert sims.config == config
        assert sims.seed == 3
        assert len(sims) == 6
        assert set(sims.keys()) == set(SIMULATION_FIELDS)
        # Lazy: indexing gives the h5py dataset, not an array.
        assert isinstance(sims['observed'], h5py.Dataset)
        assert sims['observed'].shape == (6, 3, 32, 32)
        assert sims['observed'].attrs['description'] == SIMULATION_FIELDS['observed']
        for key in expected:
            assert_array_equal(sims[key][:], expected[key], err_msg=key)
        part = sims.read(2, 4, fields=['truth', 'pixel_scale'])
        assert set(part) == {'truth', 'pixel_scale'}
        assert_array_equal(part['truth'], expected['truth'][2:4])
    with h5py.File(path, 'r') as h5:
        assert h5.attrs['n_objects'] == 6
        assert isinstance(h5.attrs['psfdeconv_version'], str)
    read = read_simulation(path, 1, 3)
    assert_array_equal(read['observed'], expected['observed'][1:3])


def test_write_refuses_to_overwrite_and_leaves_no_temp_file(tmp_path):
    config = SimulationConfig(**SMALL)
    path = write_simulation(tmp_path / 'sims.h5', 3, config=config, seed=1, n_workers=1)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match='exists') as info:
        write_simulation(path, 3, config=config, seed=2, n_workers=1)
    assert isinstance(info.value, FileExistsError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sims.h5']

    write_simulation(path, 4, config=config, seed=2, n_workers=1, overwrite=True)
    with SimulationFile(path) as sims:
        assert sims.seed == 2
        assert len(sims) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sims.h5']


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_chunk(n, config, seed_sequence):
        raise RuntimeError('simulated crash')

    monkeypatch.setattr(simulate, '_simulate_chunk', broken_chunk)
    with pytest.raises(RuntimeError, match='simulated crash'):
        write_simulation(tmp_path / 'sims.h5', 3, config=SimulationConfig(**SMALL),
                         n_workers=1)
    assert list(tmp_path.iterdir()) == []


def test_simulation_file_errors(tmp_path):
    with pytest.raises(InvalidInputError, match='cannot read simulation file'):
        SimulationFile(tmp_path / 'missing.h5')
    garbage = tmp_path / 'garbage.h5'
    garbage.write_bytes(b'not an hdf5 file')
    with pytest.raises(InvalidInputError, match='garbage.h5'):
        read_simulation(garbage)


def test_psf_families():
    from psfdeconv.deconvolve import psf_fwhm
    from psfdeconv.simulate import SimulationConfig, simulate_stamps

    # Well-sampled PSFs (FWHM >= 10 pixels), so that their measured FWHM is precise.
    config = SimulationConfig(psf_families=('moffat', 'kolmogorov', 'optical'),
                              pixel_scale_range=(0.05, 0.06), psf_fwhm_range=(0.6, 0.8))
    sims = simulate_stamps(12, config=config, seed=4)
    family = sims['psf_family']
    assert set(family.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(sims['psf'].sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    # beta is a Moffat parameter only.
    assert np.all(np.isfinite(sims['psf_beta'][family == 0]))
    assert np.all(np.isnan(sims['psf_beta'][family != 0]))
    # Every family has about the drawn FWHM ('optical' ~1.1x: atmosphere + diffraction).
    measured = psf_fwhm(sims['psf'].reshape(-1, *sims['psf'].shape[-2:]),
                        np.repeat(sims['pixel_scale'], 3))
    ratio = np.asarray(measured).reshape(12, 3) / sims['psf_fwhm']
    for index, (low, high) in enumerate([(0.95, 1.05), (0.95, 1.05), (0.95, 1.3)]):
        assert np.all((ratio[family == index] > low) & (ratio[family == index] < high))


def test_psf_families_keep_the_moffat_stream():
    # A Moffat-only configuration draws no family and no aberrations: the same objects as
    # before the option existed, and a different stream once there is a choice.
    from psfdeconv.simulate import SimulationConfig, simulate_stamps

    default = simulate_stamps(3, seed=8)
    explicit = simulate_stamps(3, config=SimulationConfig(psf_families=('moffat',)), seed=8)
    mixed = simulate_stamps(3, config=SimulationConfig(psf_families=('moffat', 'kolmogorov')),
                            seed=8)
    np.testing.assert_array_equal(default['observed'], explicit['observed'])
    assert not np.array_equal(default['truth'], mixed['truth'])


def test_psf_families_refuses_unknown():
    from psfdeconv.exceptions import ConfigError
    from psfdeconv.simulate import SimulationConfig

    with pytest.raises(ConfigError, match="psf_families must be a non-empty subset"):
        SimulationConfig(psf_families=('airy',))


def _asymmetry(images):
    """Rotational asymmetry sum|I - I_180| / (2 sum|I|) about the brightest pixel (0: point
    symmetric, 1: no overlap)."""
    values = []
    for image in images:
        y, x = np.unravel_index(np.argmax(image), image.shape)
        half = min(y, x, image.shape[0] - 1 - y, image.shape[1] - 1 - x)
        cut = image[y - half:y + half + 1, x - half:x + half + 1]
        values.append(np.abs(cut - cut[::-1, ::-1]).sum() / (2 * np.abs(cut).sum()))
    return np.array(values)


@pytest.mark.parametrize('option', ['clumpy_fraction', 'merger_fraction'])
def test_clumpy_galaxies_and_mergers_are_asymmetric(option):
    # Lopsided knot clouds and companions break the point symmetry that bulge + disk +
    # centred knots keep: the median rotational asymmetry of the truth rises clearly.
    base = dict(SMALL, blank_fraction=0.0, knot_fraction_range=(0.0, 0.1),
                half_light_radius_range=(0.4, 0.8))
    plain = simulate_stamps(40, config=SimulationConfig(**base), seed=21)
    irregular = simulate_stamps(40, config=SimulationConfig(**base, **{option: 1.0}), seed=21)
    assert np.median(_asymmetry(irregular['truth'][:, 0])) > \
        1.5 * np.median(_asymmetry(plain['truth'][:, 0]))


def test_companions_stay_on_the_stamp():
    # A companion is placed at most 22 pixels (32-pixel stamps: 6) from the main galaxy's
    # centre, so even at the largest separations its light stays off the stamp's border.
    config = SimulationConfig(**SMALL, blank_fraction=0.0, merger_fraction=1.0,
                              companion_separation_range=(50.0, 50.0), offset_range=(0.0, 0.0),
                              half_light_radius_range=(0.1, 0.2))
    truth = simulate_stamps(20, config=config, seed=4)['truth'][:, 0]
    inner = truth[:, 3:-3, 3:-3].sum(axis=(-2, -1))
    assert np.all(inner > 0.99 * truth.sum(axis=(-2, -1)))
    # The companions are there: a second peak at least 4 pixels from the brightest one.
    second = []
    for image in truth:
        y, x = np.unravel_index(np.argmax(image), image.shape)
        yy, xx = np.mgrid[:32, :32]
        second.append(image[np.hypot(yy - y, xx - x) >= 4].max() / image.max())
    assert np.median(second) > 0.05


def test_morphology_options_keep_the_default_stream():
    # With no clumpy galaxies and no mergers nothing extra is drawn: the same objects as a
    # configuration that never had the options; with them the objects change.
    default = simulate_stamps(3, config=SimulationConfig(**SMALL), seed=8)
    explicit = simulate_stamps(3, config=SimulationConfig(**SMALL, clumpy_fraction=0.0,
                                                          merger_fraction=0.0), seed=8)
    clumpy = simulate_stamps(3, config=SimulationConfig(**SMALL, clumpy_fraction=0.5), seed=8)
    np.testing.assert_array_equal(default['observed'], explicit['observed'])
    assert not np.array_equal(default['truth'], clumpy['truth'])


@pytest.mark.parametrize('values, match', [
    ({'clumpy_fraction': 1.5}, r'clumpy_fraction must be in \[0, 1\]'),
    ({'merger_fraction': -0.1}, r'merger_fraction must be in \[0, 1\]'),
    ({'clumpy_knot_fraction_range': (0.5, 1.2)}, 'clumpy_knot_fraction_range must satisfy'),
    ({'companion_flux_ratio_range': (0.0, 1.0)}, 'companion_flux_ratio_range must satisfy'),
    ({'companion_separation_range': (2.0, 1.0)}, 'companion_separation_range must satisfy'),
    ({'knot_offset_max': -1.0}, 'knot_offset_max must be >= 0'),
])
def test_morphology_option_validation(values, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**values)
