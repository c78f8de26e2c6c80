# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.shear: the ring test, the bias and response fits, the card entry and
the shear columns of deconvolve_stamps and the catalogue."""

import json
import shutil

import numpy as np
import pytest
from astropy.table import Table
from numpy.testing import assert_allclose, assert_array_equal

from psfdeconv._fourier import convolve_same
from psfdeconv.calibrate import write_shear_response
from psfdeconv.deconvolve import deconvolve_stamps
from psfdeconv.exceptions import ConfigError, InvalidInputError, ModelFileError
from psfdeconv.measure import hsm_moments
from psfdeconv.model import load_model
from psfdeconv.shear import (
    check_shear_response,
    fit_shear_bias,
    fit_shear_response,
    ring_shears,
    shear_estimates,
    simulate_ring_test,
)
from psfdeconv.simulate import SimulationConfig, simulate_stamps

#: Exponential disks many pixels wide: HSM measures their truth with a pixel-integration
#: bias below 2% (a Sersic bulge's cusp on the pixel grid costs up to 12%).
RESOLVED = SimulationConfig(pixel_scale_range=(0.1, 0.1), half_light_radius_range=(0.4, 0.6),
                            bulge_fraction_range=(0.0, 0.0), knot_fraction_range=(0.0, 0.0))

pytestmark = pytest.mark.filterwarnings(
    'ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')


@pytest.fixture(scope='module')
def ring():
    return simulate_ring_test(3, seed=11, config=RESOLVED)


def rot90(images):
    return np.rot90(images, 1, axes=(-2, -1))


def test_the_rotated_member_is_the_first_turned_by_90_degrees_with_opposite_shear(ring):
    truth, observed, psf = ring['truth'], ring['observed'], ring['psf'][:, None]
    # (+g, 0) of the turned member is (-g, 0) of the first turned; (0, -g) likewise (0, +g).
    for turned, first in ((0, 1), (1, 0), (2, 3), (3, 2)):
        assert_allclose(truth[:, 1, turned], rot90(truth[:, 0, first]),
                        atol=1e-6 * truth.max())
    # One noise field for the four shears of a member; turned with the turned member.
    noiseless = convolve_same(truth.astype(np.float64), psf[:, None].astype(np.float64))
    noise = observed - noiseless
    for s in range(1, 4):
        assert_allclose(noise[:, :, s], noise[:, :, 0], atol=1e-4)
    assert_allclose(noise[:, 1, 0], rot90(noise[:, 0, 0]), atol=1e-4)
    assert np.std(noise[:, 0, 0]) > 0.3


def test_the_ring_test_is_seeded_and_split_independent(ring):
    again = simulate_ring_test(2, seed=11, config=RESOLVED)
    rest = simulate_ring_test(1, seed=11, config=RESOLVED, start=2)
    for key in ('observed', 'truth', 'psf', 'snr', 'psf_g1'):
        assert_array_equal(np.concatenate([again[key], rest[key]]), ring[key])
    assert_array_equal(ring['galaxy'], [0, 1, 2])
    other = simulate_ring_test(1, seed=12, config=RESOLVED)
    assert not np.allclose(other['truth'][0], ring['truth'][0])
    # The PSF is fixed per galaxy and anisotropic.
    assert np.all(np.abs(ring['psf_g1']) + np.abs(ring['psf_g2']) > 0)


def truth_table(ring):
    shapes = hsm_moments(ring['truth'])
    index = np.indices(shapes['hsm_e1'].shape)
    n = index[0].size
    return Table({'galaxy': index[0].ravel(), 'rotation': index[1].ravel(),
                  'state': index[2].ravel(), 'band': index[3].ravel(),
                  'truth_e1': shapes['hsm_e1'].ravel(), 'truth_e2': shapes['hsm_e2'].ravel(),
                  'psf_e1': np.zeros(n), 'psf_e2': np.zeros(n),
                  'snr_true': ring['snr'].ravel()}, meta={'shear': 0.02})


def test_the_noiseless_truth_responds_as_a_distortion_should(ring):
    shapes = hsm_moments(ring['truth'])
    e1, e2 = shapes['hsm_e1'], shapes['hsm_e2']
    assert np.isfinite(e1).all()
    g = 0.02
    # Per member: de1/dg1 = 2 (1 - e1^2) for a distortion, e1 of the unsheared galaxy
    # (the mean of the +-g states to O(g^2)).
    response1 = (e1[:, :, 0] - e1[:, :, 1]) / (2 * g)
    expected1 = 2 * (1 - ((e1[:, :, 0] + e1[:, :, 1]) / 2)**2)
    response2 = (e2[:, :, 2] - e2[:, :, 3]) / (2 * g)
    expected2 = 2 * (1 - ((e2[:, :, 2] + e2[:, :, 3]) / 2)**2)
    assert_allclose(response1, expected1, rtol=0.02)
    assert_allclose(response2, expected2, rtol=0.02)
    # The 90-degree pair cancels the intrinsic shape exactly: no additive bias.
    bias = fit_shear_bias(truth_table(ring), estimator='truth', n_bootstrap=10)
    assert abs(bias['c1']) < 1e-6 and abs(bias['c2']) < 1e-6
    assert abs(bias['m1']) < 0.1 and abs(bias['m2']) < 0.1
    assert bias['n_units'] == 3 * 3


def synthetic_table(rng, *, n=200, g=0.02, c=(0.003, -0.002), alpha=0.05,
                    noise=0.0):
    """A ring table whose distortions respond with R = 1 + 0.2 log10(snr) + 0.3 log10(size)."""
    index = np.indices((n, 1, 2, 4)).reshape(4, -1)
    galaxy, band, rotation, state = index
    shears = ring_shears(g)[state]
    # Per galaxy: an intrinsic shape (opposite for the turned member), SNR, size, PSF.
    e_int = rng.uniform(-0.3, 0.3, (n, 2))
    snr = 10**rng.uniform(1, 2.5, n)
    size = 10**rng.uniform(0.2, 0.6, n)
    psf = rng.uniform(-0.1, 0.1, (n, 2))
    response = 1 + 0.2 * np.log10(snr) + 0.3 * np.log10(size)
    sign = np.where(rotation == 1, -1.0, 1.0)
    e = {}
    for i in (0, 1):
        shear_part = shears[:, i] + c[i] + alpha * psf[galaxy, i]
        e[i] = (sign * e_int[galaxy, i] + response[galaxy] * shear_part
                + noise * rng.normal(size=galaxy.size))
    return Table({'galaxy': galaxy, 'band': band, 'rotation': rotation, 'state': state,
                  'e1': e[0], 'e2': e[1], 'snr': snr[galaxy], 'sigma': size[galaxy],
                  'psf_e1': psf[galaxy, 0], 'psf_e2': psf[galaxy, 1],
                  'snr_true': snr[galaxy]}, meta={'shear': g}), response


def test_the_response_fit_and_shear_estimates_recover_a_known_calibration():
    rng = np.random.default_rng(3)
    table, response = synthetic_table(rng)
    fit = fit_shear_response(table, n_snr_bins=3, n_size_bins=2, min_units=5, seed=3)
    check_shear_response(fit)
    json.dumps(fit, allow_nan=False)
    assert fit['seed'] == 3 and fit['shear'] == 0.02
    # The binned response is the mean of a smooth R within each bin: within 10%.
    r1, r2, g1, g2 = shear_estimates(table['e1'], table['e2'], table['snr'], table['sigma'],
                                     table['psf_e1'], table['psf_e2'], fit)
    assert_allclose(r1, response[table["galaxy"]], rtol=0.1)
    assert_allclose(r2, r1, rtol=0.02)
    assert_allclose([fit['c1'], fit['c2'], fit['alpha']], [0.003, -0.002, 0.05],
                    atol=2e-3)
    bias = fit_shear_bias(table, response=fit, n_bootstrap=20, snr_edges=[10, 40, 400])
    for key in ('m1', 'm2'):
        assert abs(bias[key]) < 0.02
    for key in ('c1', 'c2', 'alpha'):
        assert abs(bias[key]) < 2e-3
    assert len(bias['bins']) == 2 and sum(b['n_galaxies'] for b in bias['bins']) == 200
    # Raw distortions over the synthetic responses would be biased; calibrated are not.
    assert bias['m1_err'] < 0.02


def test_shear_estimates_invert_the_response_of_each_bin_exactly():
    response = {'log_snr_edges': [1.0, 1.5, 2.0], 'log_size_edges': [0.2, 0.35, 0.5],
                'R1': [[1.0, 1.2], [1.4, 1.8]], 'R2': [[1.1, 1.3], [1.5, 1.9]],
                'c1': 0.002, 'c2': -0.001, 'alpha': 0.03, 'kernel_sigma_pixels': 1.5}
    g1, g2 = np.array([0.01, -0.02, 0.03]), np.array([0.0, 0.015, -0.01])
    # The last beyond the edges: the outer bins extend to infinity.
    snr = 10**np.array([1.2, 1.7, 3.0])
    size = 10**np.array([0.25, 0.45, 0.0])
    psf1, psf2 = np.array([0.05, -0.04, 0.0]), np.array([0.0, 0.02, 0.07])
    r1 = np.array([1.0, 1.8, 1.4])
    r2 = np.array([1.1, 1.9, 1.5])
    e1 = r1 * (g1 + 0.002 + 0.03 * psf1)
    e2 = r2 * (g2 - 0.001 + 0.03 * psf2)
    out = shear_estimates(e1, e2, snr, size, psf1, psf2, response)
    assert_allclose(out[0], r1)
    assert_allclose(out[1], r2)
    assert_allclose(out[2], g1, atol=1e-12)
    assert_allclose(out[3], g2, atol=1e-12)
    nan = shear_estimates(np.nan, 0.1, 0.0, 2.0, 0.0, 0.0, response)
    assert np.isnan(nan[2]) and np.isnan(nan[0])


@pytest.mark.parametrize('key, value', [('R1', [[np.nan]]), ('R2', [[1.0, 2.0]]),
                                         ('R1', [[-1.0]]), ('c1', None),
                                         ('log_snr_edges', [2.0, 1.0]),
                                         ('alpha', float('inf'))])
def test_a_malformed_response_is_refused(key, value):
    response = {'log_snr_edges': [1, 2], 'log_size_edges': [0.2, 0.6], 'R1': [[1.5]],
                'R2': [[1.5]], 'c1': 0.0, 'c2': 0.0, 'alpha': 0.0,
                'kernel_sigma_pixels': 1.5}
    check_shear_response(response)
    response[key] = value
    with pytest.raises(ModelFileError, match=f'shear_response.{key}'):
        check_shear_response(response)


def test_bad_ring_settings_are_refused():
    with pytest.raises(ConfigError, match='shear'):
        simulate_ring_test(1, shear=0.5)
    with pytest.raises(ConfigError, match='snr_range'):
        simulate_ring_test(1, snr_range=(0, 10))
    with pytest.raises(InvalidInputError, match='estimator'):
        fit_shear_bias(truth_table(simulate_ring_test(1, seed=1, config=RESOLVED)),
                       estimator='best', n_bootstrap=2)


@pytest.fixture(scope='module')
def shear_model(tiny_model_path, tmp_path_factory):
    """The tiny model with a synthetic shear response in its card (signed)."""
    directory = tmp_path_factory.mktemp('shear_model')
    path = directory / tiny_model_path.name
    shutil.copyfile(tiny_model_path, path)
    shutil.copyfile(tiny_model_path.with_suffix('.json'), path.with_suffix('.json'))
    table, _ = synthetic_table(np.random.default_rng(5), n=60)
    response = fit_shear_response(table, n_snr_bins=2, n_size_bins=2, min_units=5)
    validation = fit_shear_bias(table, response=response, n_bootstrap=5)
    card = write_shear_response(path, response, validation=validation)
    return path, card


def test_the_card_entry_is_validated_and_signed(shear_model, tiny_model_path):
    path, card = shear_model
    assert card['shear_response']['validation']['estimator'] == 'calibrated'
    model = load_model(path)          # the checksums verify
    assert model.card['shear_response']['R1'] == card['shear_response']['R1']
    assert model.card['card_sha256'] != load_model(tiny_model_path).card['card_sha256']
    assert model.card['weights_sha256'] == load_model(tiny_model_path).card['weights_sha256']
    # A non-finite response is refused before anything is written.
    bad = dict(card['shear_response'], R1=[[np.nan] * 2] * 2)
    before = path.with_suffix('.json').read_bytes()
    with pytest.raises(ModelFileError, match='R1'):
        write_shear_response(path, bad)
    assert path.with_suffix('.json').read_bytes() == before
    # An edited card no longer verifies.
    edited = json.loads(before)
    edited['shear_response']['c1'] = 0.5
    path.with_suffix('.json').write_text(json.dumps(edited))
    try:
        with pytest.raises(ModelFileError):
            load_model(path)
    finally:
        path.with_suffix('.json').write_bytes(before)


def test_deconvolve_stamps_details_carry_calibrated_shears(shear_model, tiny_model):
    path, card = shear_model
    model = load_model(path)
    sims = simulate_stamps(6, seed=4)
    galaxies = ~sims['is_blank']
    _, details = deconvolve_stamps(sims['observed'], sims['psf'],
                                   pixel_scale=sims['pixel_scale'], model=model,
                                   return_details=True)
    for key in ('shear_g1', 'shear_g2', 'shear_R1', 'shear_R2'):
        assert details[key].shape == (6, 3)
    # Finite wherever the response is (HSM succeeded), on the galaxies at least somewhere.
    finite = np.isfinite(details['shear_R1'])
    assert_array_equal(np.isfinite(details['shear_g1']), finite)
    assert finite[galaxies].any()
    assert np.all(details['shear_R1'][finite] > 0)
    # Without a response in the card: no shear details.
    _, plain = deconvolve_stamps(sims['observed'], sims['psf'],
                                 pixel_scale=sims['pixel_scale'], model=tiny_model,
                                 return_details=True)
    assert 'shear_g1' not in plain


def test_the_catalogue_has_shear_columns(shear_model, simulated_field, tiny_model):
    from psfdeconv.pipeline import deconvolve_catalog

    exposures, _ = simulated_field
    psfs = {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in exposures}
    catalog, _ = deconvolve_catalog(exposures, psfs=psfs, model=load_model(shear_model[0]))
    assert 'pixel frame' in catalog['shear_g1_g'].description
    for band in exposures:
        ok = np.asarray(catalog[f'hsm_status_{band}']) == 0
        for name in ('shear_g1', 'shear_g2', 'shear_R1', 'shear_R2'):
            column = catalog[f'{name}_{band}']
            assert column.description
            assert np.isfinite(np.asarray(column)[ok]).any()
    # A card without a response gives the columns, all NaN.
    plain, _ = deconvolve_catalog(exposures, psfs=psfs, model=tiny_model)
    assert np.isnan(np.asarray(plain['shear_g1_g'])).all()


def test_ring_test_table_measures_in_the_given_precision(tiny_model, tmp_path):
    from psfdeconv.shear import measure_ring_test, ring_test_table

    ring = simulate_ring_test(1, seed=11, config=RESOLVED)
    tables = {precision: ring_test_table(1, seed=11, config=RESOLVED, model=tiny_model,
                                         precision=precision)
              for precision in ('float32', 'bfloat16')}
    direct = measure_ring_test(ring, model=tiny_model, precision='float32')
    for name in direct.colnames:
        assert_array_equal(tables['float32'][name], direct[name], err_msg=name)
    # bfloat16 products move the deconvolved images, so their measured shapes.
    raw = [name for name in direct.colnames if 'raw' in name or 'hsm' in name]
    assert raw and any(not np.array_equal(tables['float32'][name], tables['bfloat16'][name],
                                          equal_nan=True) for name in raw)
