# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exposure catalogues against their simulated truth.
"""


import numpy as np
from astropy import units as u
from astropy.table import QTable

from ..exceptions import (
    InvalidInputError,
)
from ..flags import unusable_bits

__all__ = ['match_truth', 'exposure_accuracy']



def match_truth(catalog, truth, *, max_separation=0.5 * u.arcsec, kind='galaxy'):
    """Match a catalogue of `~psfdeconv.pipeline.deconvolve_catalog` to the
    truth table of `~psfdeconv.simulate.simulate_exposure`.

    Each truth source of ``kind`` is matched to its nearest catalogue source
    on the sky; pairs farther apart than ``max_separation`` are dropped.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        With a ``sky_centroid`` column.
    truth : `~astropy.table.Table`
        With ``ra``, ``dec`` (degrees) and ``kind`` columns.
    max_separation : `~astropy.units.Quantity`, optional
        Largest separation of a match.
    kind : str or None, optional
        Truth sources to match ('galaxy', 'star' or None for all).

    Returns
    -------
    `~astropy.table.QTable`
        One row per match: ``truth_index``, ``catalog_index`` and
        ``separation`` (arcsec).
    """
    from astropy.coordinates import SkyCoord

    if 'sky_centroid' not in catalog.colnames:
        raise InvalidInputError('the catalogue has no sky_centroid column; give '
                                'the catalogue of deconvolve_catalog.')
    rows = np.arange(len(truth))
    if kind is not None:
        rows = rows[np.asarray(truth['kind']) == kind]
    sky = SkyCoord(u.Quantity(truth['ra'][rows], u.deg),
                   u.Quantity(truth['dec'][rows], u.deg))
    matches = QTable({'truth_index': np.zeros(0, int), 'catalog_index': np.zeros(0, int),
                      'separation': np.zeros(0) * u.arcsec})
    if rows.size == 0 or len(catalog) == 0:
        return matches
    index, separation, _ = sky.match_to_catalog_sky(catalog['sky_centroid'])
    keep = separation <= max_separation
    matches = QTable({'truth_index': rows[keep], 'catalog_index': index[keep],
                      'separation': separation[keep].to(u.arcsec)})
    return matches


def _noise_median_abs(relative_error, n_draws=1000, seed=0):
    """The median |dF/F| that the catalogue's own flux errors alone give:
    the median over objects of |N(0, relative_error)|, averaged over seeded
    draws (None for no objects)."""
    relative_error = np.asarray(relative_error, float)
    if relative_error.size == 0:
        return None
    draws = np.random.default_rng(seed).normal(size=(n_draws, relative_error.size))
    return float(np.mean(np.median(np.abs(draws * relative_error), axis=1)))


def exposure_accuracy(catalog, truth, *, min_snr=20.0,
                      max_separation=0.5 * u.arcsec):
    """Accuracy of an exposure catalogue against its simulated truth.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        From `~psfdeconv.pipeline.deconvolve_catalog`.
    truth : `~astropy.table.Table`
        From `~psfdeconv.simulate.simulate_exposure` (with the ``*_true``
        shape columns).
    min_snr : float, optional
        Flux accuracy is taken over matches with ``snr_<band>`` above this.
    max_separation : `~astropy.units.Quantity`, optional
        Matching radius (`match_truth`).

    Returns
    -------
    dict
        ``n_truth``, ``n_matched``, ``n_unflagged`` (matches without flags),
        ``position_arcsec`` (median and max separation), and per band
        ``flux`` (the median of ``|flux_corrected / true - 1|`` and the bias,
        the median of ``flux_corrected / true - 1``, over matches above
        ``min_snr``, with their count, and ``noise_median_abs``: the median
        that the catalogue's flux errors alone would give, the floor set by
        the photometric noise), ``e1``, ``e2`` (RMS and mean of the unweighted
        ellipticity difference), ``hsm_e1``, ``hsm_e2`` (same, adaptive
        moments, finite values only) and ``size_percent`` (mean and RMS of
        100 (size / size_true - 1)). Statistics use the matches without a
        flag that makes the measurement unusable
        (`~psfdeconv.flags.UNUSABLE_FLAGS`) and without ``HSM_FAILED``;
        ``n_unflagged`` counts them.
    """
    matches = match_truth(catalog, truth, max_separation=max_separation)
    n_truth = int(np.sum(np.asarray(truth['kind']) == 'galaxy'))
    cat = catalog[matches['catalog_index']]
    tru = truth[matches['truth_index']]
    # The catalogue's own name -> bit mapping, read with the registry's
    # unusable names.
    # HSM_FAILED rows are left out too, so that every statistic is over the
    # same rows.
    flag_bits = catalog.meta.get('flag_bits', {})
    unusable = unusable_bits(flag_bits) | flag_bits.get('HSM_FAILED', 0)
    good = (np.asarray(cat['flags']) & (unusable or ~0)) == 0
    sep = matches['separation'].to_value(u.arcsec)
    result = {'n_truth': n_truth, 'n_matched': len(matches),
              'n_unflagged': int(good.sum()),
              'position_arcsec': {'median': float(np.median(sep)) if sep.size else None,
                                  'max': float(np.max(sep)) if sep.size else None}}

    def stats(diff):
        diff = np.asarray(diff, float)
        diff = diff[np.isfinite(diff)]
        if diff.size == 0:
            return {'n': 0, 'mean': None, 'rms': None}
        return {'n': int(diff.size), 'mean': float(diff.mean()),
                'rms': float(np.sqrt(np.mean(diff ** 2)))}

    for band in catalog.meta.get('bands', []):
        flux = np.asarray(u.Quantity(cat[f'flux_corrected_{band}']).value)
        true_flux = np.asarray(u.Quantity(tru[f'flux_{band}']).value)
        snr_ok = good & (np.asarray(cat[f'snr_{band}']) > min_snr)
        ratio = flux[snr_ok] / true_flux[snr_ok] - 1.0
        entry = {'flux': {'n': int(ratio.size),
                          'median_abs': float(np.median(np.abs(ratio)))
                          if ratio.size else None,
                          'median': float(np.median(ratio)) if ratio.size else None,
                          'noise_median_abs': _noise_median_abs(
                              np.asarray(u.Quantity(cat[f'flux_err_{band}']).value)[snr_ok]
                              / true_flux[snr_ok])}}
        for name in ('e1', 'e2', 'hsm_e1', 'hsm_e2'):
            if f'{name}_true' in tru.colnames:
                entry[name] = stats(np.asarray(cat[f'{name}_{band}'])[good]
                                    - np.asarray(tru[f'{name}_true'])[good])
        if 'size_true' in tru.colnames:
            size = u.Quantity(cat[f'size_{band}']).to_value(u.arcsec)[good]
            size_true = u.Quantity(tru['size_true']).to_value(u.arcsec)[good]
            entry['size_percent'] = stats(100.0 * (size / size_true - 1.0))
        result[band] = entry
    return result
