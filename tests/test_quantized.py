# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Integer-valued exposures (counts on a lattice, with a soft-bias pedestal or
BZERO/BSCALE): their median background and MAD noise snap to the lattice unless
the values are dithered off it (psfdeconv.background.dequantize_exposure); the pipeline check is in
test_cli_run.py (test_integer_exposures_give_the_fluxes_of_float_ones)."""

import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.stats import mad_std

from psfdeconv.background import dequantize_exposure, quantization_step


def lattice_image(shape=(200, 200), *, background=1000.3, sigma=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return np.floor(rng.normal(background, sigma, shape))


def test_quantization_step_finds_lattices():
    counts = lattice_image()
    assert quantization_step(counts) == 1.0
    assert quantization_step(counts * 0.5 + 7.0, scale=0.5, zero=7.0) == 0.5
    assert quantization_step(counts + 0.3) is None
    assert quantization_step(np.full((8, 8), 3.0)) is None  # constant: no lattice to see
    noisy = counts.copy()
    noisy[0, 0] = 0.5
    assert quantization_step(noisy) is None
    mask = np.zeros(counts.shape, dtype=bool)
    mask[0, 0] = True
    assert quantization_step(noisy, mask) == 1.0  # the masked pixel does not count


def test_dithering_removes_the_lattice_bias_of_median_and_mad():
    # floor() of N(1000.3, 1): mean 999.8 (the floor takes 0.5 off), noise
    # sqrt(1 + 1/12); the raw median snaps to 999 or 1000, the raw MAD to 1.48.
    counts = lattice_image()
    truth_level, truth_sigma = 1000.3 - 0.5, np.sqrt(1 + 1 / 12)
    assert abs(np.median(counts) - truth_level) > 0.2
    assert mad_std(counts) > 1.3 * truth_sigma
    exposure = dequantize_exposure(CCDData(counts, unit='adu'), seed=3)
    assert exposure.meta['dequantized'] == 1.0
    assert abs(np.median(exposure.data) - truth_level) < 0.03
    # The dither adds its own 1/12 of a step squared.
    assert mad_std(exposure.data) == pytest.approx(np.sqrt(truth_sigma**2 + 1 / 12), rel=0.03)
    # Deterministic, and within half a step of the counts.
    again = dequantize_exposure(CCDData(counts, unit='adu'), seed=3)
    np.testing.assert_array_equal(again.data, exposure.data)
    assert np.abs(exposure.data - counts).max() <= 0.5
    # Values off any lattice are left alone (the same object).
    floats = CCDData(counts + np.random.default_rng(2).random(counts.shape), unit='adu')
    assert dequantize_exposure(floats, seed=3) is floats
