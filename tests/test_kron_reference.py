# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of `psfdeconv.evaluate.kron_reference` and `compare_with_kron`."""

import numpy as np
import pytest
from astropy.table import QTable
from numpy.testing import assert_allclose

from psfdeconv.evaluate import compare_with_kron, kron_reference
from psfdeconv.exceptions import InvalidInputError


def _nearest(table, x, y, suffix=''):
    def pixels(value):
        return np.asarray(getattr(value, 'value', value), dtype=float)

    distance = np.hypot(pixels(table['x' + suffix]) - pixels(x),
                        pixels(table['y' + suffix]) - pixels(y))
    return int(np.argmin(distance)), float(distance.min())


def test_kron_reference_finds_the_bright_galaxies(simulated_field):
    exposures, truth = simulated_field
    exposure = exposures['r']
    # The simulation saturates nothing (and has no SATURATE): no limit.
    reference = kron_reference(exposure, min_snr=50.0, saturation=None)
    galaxies = truth[truth['kind'] == 'galaxy']
    stars = truth[truth['kind'] == 'star']
    assert len(reference) >= 0.75 * len(galaxies)
    n_galaxies = 0
    for row in reference:
        # No selected source is a star (truth positions in the r band's pixels).
        _, to_star = _nearest(stars, row['x'], row['y'], '_r')
        _, to_galaxy = _nearest(galaxies, row['x'], row['y'], '_r')
        assert to_star > 2.0
        n_galaxies += to_galaxy < 2.0
    assert n_galaxies >= 0.75 * len(galaxies)
    # Kron fluxes within ~10 % of the true total fluxes (a Kron aperture of
    # 2.5 radii holds ~90-100 % of a galaxy's light; one galaxy loses a
    # piece of itself to deblending, hence 15 % for every galaxy).
    kron = []
    true = []
    for galaxy in galaxies:
        index, distance = _nearest(reference, galaxy['x_r'], galaxy['y_r'])
        if distance < 2.0:
            kron.append(reference['kron_flux'][index])
            true.append(float(np.asarray(galaxy['flux_r'].value
                                         if hasattr(galaxy['flux_r'], 'value')
                                         else galaxy['flux_r'])))
    assert_allclose(kron, true, rtol=0.15)
    assert 0.9 < np.median(np.divide(kron, true)) <= 1.0
    assert reference.meta['n_selected'] == len(reference)
    assert np.all(reference['snr'] > 50.0)
    assert np.all(reference['fwhm'] > 1.3 * reference.meta['stellar_fwhm'])


def test_kron_reference_all_sources_and_validation(simulated_field):
    exposure = simulated_field[0]['r']
    every = kron_reference(exposure, all_sources=True, stellar_fwhm=4.0)
    assert len(every) == every.meta['n_detected'] >= every.meta['n_selected']
    assert every.meta['stellar_fwhm'] == 4.0
    with pytest.raises(InvalidInputError, match='min_snr'):
        kron_reference(exposure, min_snr=-1)
    with pytest.raises(InvalidInputError, match='n_pixels'):
        kron_reference(exposure, n_pixels=0)


def _synthetic(ratios, usable):
    """A reference of galaxies on a line and a catalogue row for each with
    the given flux ratio and usable flag, its input position 0.5 pixel off
    and its measured position 1 pixel off."""
    n = len(ratios)
    kron = np.linspace(100.0, 1000.0, n)
    x = 20.0 + 30.0 * np.arange(n)
    reference = QTable({'x': x, 'y': np.full(n, 50.0), 'kron_flux': kron,
                        'label': np.arange(1, n + 1)})
    catalog = QTable({'id': np.arange(n)[::-1] + 1, 'x': x[::-1] + 1.0,
                      'y': np.full(n, 50.0), 'x_input': x[::-1] + 0.5,
                      'y_input': np.full(n, 50.0), 'usable': np.asarray(usable)[::-1],
                      'flags': np.where(np.asarray(usable)[::-1], 0, 512),
                      'flux_corrected_r': (kron * np.asarray(ratios))[::-1]})
    return catalog, reference


def test_compare_with_kron_exact_numbers():
    ratios = [1.0, 0.9, 1.1, 1.05, 2.5, 0.3, 1.0, 1.0, 1.0, 0.95]
    usable = [True, True, True, True, True, False, False, False, True, True]
    catalog, reference = _synthetic(ratios, usable)
    result = compare_with_kron(catalog, reference, band='r')
    assert result['n_reference'] == result['n_matched'] == 10
    assert result['n_usable'] == 7
    assert result['usable_fraction'] == pytest.approx(0.7)
    # Usable ratios: 1.0, 0.9, 1.1, 1.05, 2.5, 1.0, 0.95 -> median 1.0,
    # one of seven off by more than 2x.
    assert result['median_ratio'] == pytest.approx(1.0)
    assert result['fraction_off_2x'] == pytest.approx(1 / 7)
    assert result['passes_ratio'] and result['passes_usable']
    assert not result['passes_off_2x'] and not result['passes']
    matches = result['matches']
    assert list(matches['reference_index']) == list(range(10))
    assert list(matches['id']) == list(range(1, 11))
    assert_allclose(matches['ratio'], ratios)
    assert_allclose(matches['separation'], 0.5)
    assert list(matches['usable']) == usable


def test_compare_with_kron_passes_and_thresholds():
    ratios = [1.0] * 18 + [2.1, 0.6]
    usable = [True] * 10 + [False] * 10
    catalog, reference = _synthetic(ratios, usable)
    result = compare_with_kron(catalog, reference, band='r')
    assert result['fraction_off_2x'] == 0.0 and result['median_ratio'] == 1.0
    assert result['usable_fraction'] == 0.5 and result['passes']
    # 50 % usable fails a 60 % rule, passes DECam's 30 %.
    assert not compare_with_kron(catalog, reference, band='r',
                                 min_usable_fraction=0.6)['passes']
    assert compare_with_kron(catalog, reference, band='r',
                             min_usable_fraction=0.3)['passes']
    # A median outside 0.85-1.2 fails.
    low, reference = _synthetic([0.8] * 4, [True] * 4)
    result = compare_with_kron(low, reference, band='r')
    assert result['median_ratio'] == pytest.approx(0.8)
    assert not result['passes_ratio'] and not result['passes']


def test_compare_with_kron_matching_is_one_to_one_within_radius():
    reference = QTable({'x': [10.0, 12.0, 80.0], 'y': [10.0, 10.0, 80.0],
                        'kron_flux': [100.0, 100.0, 100.0]})
    # One catalogue row between two galaxies, closer to the second; one far away.
    catalog = QTable({'x': [11.8, 40.0], 'y': [10.0, 40.0], 'x_input': [11.8, 40.0],
                      'y_input': [10.0, 40.0], 'usable': [True, True],
                      'flux_corrected_r': [100.0, 100.0]})
    result = compare_with_kron(catalog, reference, band='r', match_radius=3.0)
    assert result['n_matched'] == 1
    assert list(result['matches']['reference_index']) == [1]
    assert result['matches']['separation'][0] == pytest.approx(0.2)
    empty = compare_with_kron(catalog[:0], reference, band='r')
    assert empty['n_matched'] == 0 and empty['median_ratio'] is None
    assert not empty['passes']


def test_compare_with_kron_refuses_missing_columns():
    reference = QTable({'x': [1.0], 'y': [1.0], 'kron_flux': [1.0]})
    catalog = QTable({'x': [1.0], 'y': [1.0]})
    with pytest.raises(InvalidInputError, match='flux_corrected_r'):
        compare_with_kron(catalog, reference, band='r')
