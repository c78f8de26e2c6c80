# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The re-observation of real AEGIS galaxies in ``validation/aegis_accuracy.py``: truth,
PSFs, noise and the oracle Wiener baseline (the network itself is run by the script)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

AEGIS = Path(__file__).parent / 'data' / 'aegis'
SCRIPT = Path(__file__).parents[1] / 'validation' / 'aegis_accuracy.py'


@pytest.fixture(scope='module')
def aegis():
    spec = importlib.util.spec_from_file_location('aegis_accuracy', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def stamps(aegis):
    return aegis.make_stamps(AEGIS, 2, seed=3, n_bands=3)


def test_truth_keeps_the_hst_flux(aegis, stamps):
    # The truth is the HST image integrated over ground pixels: the flux is kept up to
    # the part of the (largest) galaxy that falls off the 64-pixel stamp.
    import galsim

    catalog = galsim.RealGalaxyCatalog('AEGIS_F814w_catalog.fits', dir=AEGIS)
    hst_flux = np.array([galsim.RealGalaxy(catalog, index=i).original_gal.flux
                         for i in range(catalog.nobjects)])
    flux = stamps['truth'][:, -1].sum(axis=(-2, -1))
    assert_allclose(flux, np.repeat(hst_flux, 2), rtol=0.05)
    # Centred on the stamp's centre pixel (n // 2) within the half-pixel offsets.
    y, x = np.mgrid[:64, :64]
    truth = stamps['truth'][:, -1]
    cx = (truth * x).sum(axis=(-2, -1)) / flux
    assert np.all(np.abs(cx - 32) < 3)


def test_psfs_and_noise(stamps):
    assert_allclose(stamps['psf'].sum(axis=(-2, -1)), 1.0, rtol=1e-6)
    assert np.all((stamps['pixel_scale'] >= 0.15) & (stamps['pixel_scale'] <= 0.25))
    # The noise realises the drawn matched-filter SNR of the reddest band.
    residual = stamps['observed'][:, -1, :8, :8]  # a corner far from the galaxy: noise
    assert_allclose(residual.std(axis=(-2, -1)).mean() / stamps['noise_sigma'][:, -1].mean(),
                    1.0, atol=0.25)


def test_oracle_wiener_is_no_worse_than_any_fixed_filter(aegis, stamps):
    from psfdeconv.evaluate import wiener_deconvolve

    best = aegis.oracle_wiener(stamps['observed'], stamps['psf'], stamps['truth'])
    best_error = ((best - stamps['truth']) ** 2).sum(axis=(-2, -1))
    for balance in (1e-3, 1e-1):
        fixed = wiener_deconvolve(stamps['observed'], stamps['psf'], balance=balance)
        assert np.all(best_error <= ((fixed - stamps['truth']) ** 2).sum(axis=(-2, -1)) + 1e-9)


def test_target_gaussian_keeps_flux_and_widens(aegis, stamps):
    images = stamps['truth'][:2]
    wide = aegis.to_target(images, stamps['pixel_scale'][:2], 0.5)
    assert_allclose(wide.sum(axis=(-2, -1)), images.sum(axis=(-2, -1)), rtol=1e-3)
    assert np.all(wide.max(axis=(-2, -1)) < images.max(axis=(-2, -1)))


def test_flux_tertiles_split_by_snr(aegis):
    # Thirds of the SNR, each with its median error and the error of that median.
    rng = np.random.default_rng(4)
    snr = rng.uniform(10, 200, 300)
    truth = np.ones((300, 3, 4, 4))
    flux = np.where(snr < np.quantile(snr, 1 / 3), 1.1, 1.0) * 16.0
    flux = np.repeat(flux[:, None], 3, axis=1) + rng.normal(0, 0.01, (300, 3))
    rows = aegis.per_tertile_flux({'truth': truth, 'snr': snr}, flux, 2 * flux - 16.0)
    assert [row['n'] for row in rows] == [100, 100, 100]
    assert_allclose([row['flux_corrected'][0] for row in rows], [0.1, 0, 0], atol=2e-3)
    assert_allclose([row['flux_residual'][0] for row in rows], [0.2, 0, 0], atol=4e-3)
    assert all(0 < row['flux_corrected'][1] < 1e-3 for row in rows)
