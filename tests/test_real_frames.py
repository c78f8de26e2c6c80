# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The real-frame check of docs/validation.rst as tests: ``psfdeconv run`` on the real
frames of tests/data against photutils' own detection, deblending and Kron photometry
(`psfdeconv.evaluate.kron_reference`, `psfdeconv.evaluate.compare_with_kron`): the usable
rows' median flux_corrected / Kron flux within 0.85-1.2, at most 5 % of them off by more
than 2x, and enough of the matched rows usable."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from psfdeconv.cli import main
from psfdeconv.evaluate import compare_with_kron, kron_reference
from psfdeconv.flags import FLAG_PSF_FALLBACK
from psfdeconv.io import read_catalog, read_exposure

DATA = Path(__file__).parent / 'data'
CTIO = DATA / 'ctio-mosaic2-cdfs-I.fits'
KIDS = DATA / 'kids-r-2600.fits'
VISTA = DATA / 'vista-viking-Z.fits'


@pytest.mark.filterwarnings('ignore:the WCS pixel scales differ')
@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_ctio_runs_without_options_on_a_moffat_fitted_to_its_few_stars(tmp_path):
    out = tmp_path / 'ctio'
    assert main(['run', '--band', f'I={CTIO}', '--symmetries', '1', '-q',
                 '--out', str(out)]) == 0
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['psf_source']['I'].startswith('moffat fit (')
    assert ((np.asarray(catalog['flags']) & FLAG_PSF_FALLBACK) != 0).all()
    result = compare_with_kron(catalog, kron_reference(read_exposure(CTIO)), band='I')
    assert result['n_matched'] >= 1 and result['passes'], result


def _kids_without_header(path, size=None):
    """The KiDS frame as a user would have it (HDU 1, no keywords at all), cut to
    ``size`` x ``size`` pixels from its centre if given."""
    with fits.open(KIDS) as hdulist:
        data = np.asarray(hdulist[1].data, dtype=np.float32)
    if size is not None:
        y0, x0 = (n // 2 - size // 2 for n in data.shape)
        data = data[y0:y0 + size, x0:x0 + size]
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(path)
    return path


def _check_kids(tmp_path, size, min_reference):
    frame = _kids_without_header(tmp_path / 'kids.fits', size)
    out = tmp_path / 'kids'
    assert main(['run', '--band', f'r={frame}[1]', '--pixel-scale', '0.2',
                 '--symmetries', '1', '-q', '--out', str(out)]) == 0
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['wcs'] is False and 'sky_centroid' not in catalog.colnames
    reference = kron_reference(read_exposure(frame, hdu=1, require_wcs=False))
    assert len(reference) >= min_reference
    result = compare_with_kron(catalog, reference, band='r', min_usable_fraction=0.5)
    # photutils' detection (smoothed, 10 pixels) and psfdeconv's (5 pixels) place a
    # few deblended sources more than 3 pixels apart.
    assert result['n_matched'] >= 0.75 * len(reference), result
    assert result['passes'], result
    # Unmatched reference galaxies count as unusable too.
    assert result['n_usable'] >= 0.5 * len(reference), result
    return catalog, result


def test_kids_cutout_without_header_against_kron(tmp_path):
    _check_kids(tmp_path, 900, 15)


@pytest.mark.slow
def test_kids_whole_frame_against_kron(tmp_path):
    catalog, result = _check_kids(tmp_path, None, 150)
    assert np.mean(np.asarray(catalog['usable'])) > 0.8


@pytest.mark.filterwarnings('ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')
def test_vista_galaxies_near_a_bright_pair_keep_their_neighbours_out(tmp_path):
    """Two galaxies of the VIKING frame are connected at 2 sigma to a bright pair and a
    compact source, which are BLENDED with each other: those are neighbours of the
    galaxies, replaced in their stamps. As their own light (deblended pieces of the
    shared parent segment holding no unblended source) they made the galaxies' fluxes
    2.2 times photutils' Kron fluxes, unflagged. The pair's faint halo still adds to
    them (1.2-1.4 times Kron, whose apertures take some of it too)."""
    out = tmp_path / 'vista'
    assert main(['run', '--band', f'Z={VISTA}', '--symmetries', '1', '-q',
                 '--out', str(out)]) == 0
    catalog = read_catalog(out / 'catalog.fits')
    result = compare_with_kron(catalog, kron_reference(read_exposure(VISTA)), band='Z')
    matches = result['matches']
    assert len(matches) == 2 and np.all(matches['usable']), matches
    assert np.all(matches['ratio'] < 1.7), matches['ratio']
