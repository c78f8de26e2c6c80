# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Hostile and unlucky catalogues and PSF images: each gives the right result, or a
`~psfdeconv.exceptions.PSFDeconvError` naming the value before any deconvolution.

The catalogue cases run `~psfdeconv.pipeline.run_exposure_set` on the session's simulated
field with the tiny model; for the refusals `psfdeconv.deconvolve.deconvolve_stamps` is
replaced by a function that fails the test if called, so a refusal that came only after
the network had run (as some did, in the stamp writer) would show.
"""

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose

import psfdeconv.deconvolve
from psfdeconv.exceptions import ConfigError, InvalidInputError, InvalidPSFError
from psfdeconv.io import check_source_ids, read_catalog, read_positions, read_stamps
from psfdeconv.pipeline import run_exposure_set
from psfdeconv.psf import moffat_psf, psf_from_spec, read_psf_image, render_psf

MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'


@pytest.fixture(scope='module')
def galaxies(simulated_field):
    """The field's exposures and its first two galaxies (truth rows)."""
    exposures, truth = simulated_field
    return exposures, truth[truth['kind'] == 'galaxy'][:2]


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the network runs."""
    def deconvolve_stamps(*args, **kwargs):
        raise AssertionError('the network ran before the input was refused')

    monkeypatch.setattr(psfdeconv.deconvolve, 'deconvolve_stamps', deconvolve_stamps)


def run(galaxies, table, tmp_path, model):
    exposures, _ = galaxies
    return run_exposure_set(exposures, tmp_path / 'out', table, psfs=MOFFAT, model=model)


# --- Catalogues -----------------------------------------------------------------------------

@pytest.mark.parametrize('ids, match', [
    (['gal\u00e9', 'b'], r"id\[0\] = 'gal\u00e9'; source ids are written to FITS headers "
                         r".*printable ASCII only.* rename it \(e\.g\. 'gal_'\)"),
    (['a', 'b\nc'], r"id\[1\] = 'b\\nc'; .*no accents, newlines or tabs.* "
                     r"rename it \(e\.g\. 'b_c'\)"),
    ([1.0, np.nan], r'id\[1\] = nan; a source id must be a finite number'),
    (['a', 'a'], r"id\[1\] = 'a'; it repeats id\[0\], .* make them unique, or drop the id"),
])
def test_bad_ids_are_refused_before_the_network(galaxies, tmp_path, tiny_model_path,
                                                no_network, ids, match):
    """Non-ASCII or newline ids (FITS headers cannot hold them), NaN ids and duplicate ids
    failed in the stamp writer, after the first chunk had been deconvolved (duplicates
    went through and made the catalogue ambiguous)."""
    _, truth = galaxies
    table = Table({'id': ids, 'ra': truth['ra'], 'dec': truth['dec']})
    with pytest.raises(InvalidInputError, match=match):
        run(galaxies, table, tmp_path, tiny_model_path)
    assert not (tmp_path / 'out' / 'stamps.fits').exists()


def test_masked_id_is_refused():
    ids = np.ma.MaskedArray([1, 2, 3], mask=[False, True, False])
    with pytest.raises(InvalidInputError, match=r'id\[1\] is missing \(masked\)'):
        check_source_ids(ids)


def test_ascii_string_ids_reach_both_files(galaxies, tmp_path, tiny_model_path):
    _, truth = galaxies
    table = Table({'id': ['NGC 1', 'obj-2'], 'ra': truth['ra'], 'dec': truth['dec']})
    catalog, paths = run(galaxies, table, tmp_path, tiny_model_path)
    assert list(read_catalog(paths['catalog'])['id']) == ['NGC 1', 'obj-2']
    assert [stamp.meta['id'] for stamp in read_stamps(paths['stamps'])] == ['NGC 1', 'obj-2']


def test_sexagesimal_ra_dec(galaxies, tmp_path, tiny_model_path):
    """ra in hours and dec in degrees as sexagesimal strings give the same sources as the
    same positions in degrees."""
    _, truth = galaxies
    ra = Angle(truth['ra']).to_string(unit=u.hourangle, sep=':', precision=4)
    dec = Angle(truth['dec']).to_string(unit=u.deg, sep=':', precision=3, alwayssign=True)
    table = Table({'id': [1, 2], 'ra': ra, 'dec': dec})
    catalog, _ = run(galaxies, table, tmp_path, tiny_model_path)
    assert catalog.meta['positions'] == 'table columns ra, dec'
    assert_allclose(catalog['sky_centroid'].ra.deg, truth['ra'].to_value(u.deg)
                    if hasattr(truth['ra'], 'unit') else truth['ra'], atol=2e-4)


def test_unparsable_ra_dec_is_refused(galaxies, tmp_path, tiny_model_path, no_network):
    _, truth = galaxies
    table = Table({'id': [1, 2], 'ra': ['10:00:01.2', 'ten'], 'dec': ['+02:10:03'] * 2})
    with pytest.raises(InvalidInputError, match=r"\(ra, dec\)\[1\] = \('ten', '\+02:10:03'\) "
                       r'cannot be read .* ra in hours and dec in degrees'):
        run(galaxies, table, tmp_path, tiny_model_path)


def test_empty_catalogue_is_refused(galaxies, tmp_path, tiny_model_path, no_network):
    path = tmp_path / 'empty.ecsv'
    Table({'id': np.array([], int), 'ra': np.array([], float),
           'dec': np.array([], float)}).write(path)
    with pytest.raises(InvalidInputError, match=r'empty\.ecsv has no rows; give at least one'):
        read_positions(path)
    with pytest.raises(InvalidInputError, match=r'empty\.ecsv has no rows'):
        run(galaxies, path, tmp_path, tiny_model_path)


# --- PSF images -----------------------------------------------------------------------------

def moffat_image(size, centre, fwhm_pixels=4.0):
    """A noiseless round Moffat (beta 3) sampled at pixel centres, centred at ``centre``
    (y, x) pixels of a size x size image."""
    alpha = fwhm_pixels / (2 * np.sqrt(2 ** (1 / 3) - 1))
    y, x = np.indices((size, size), dtype=float)
    r2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    return (1 + r2 / alpha ** 2) ** -3.0


def centroid(image):
    y, x = np.indices(image.shape)
    return float((image * y).sum() / image.sum()), float((image * x).sum() / image.sum())


def test_even_psf_centred_on_a_corner_is_recentred(tmp_path):
    """A 32x32 PSF centred at (15.5, 15.5), between four pixels: padded to 33x33 and
    shifted by half a pixel, its centroid is on the centre pixel (16, 16)."""
    path = tmp_path / 'corner.fits'
    fits.PrimaryHDU(moffat_image(32, (15.5, 15.5))).writeto(path)
    model = read_psf_image(path)
    assert model.data.shape == (33, 33)
    assert model.meta['padded'] and model.meta['recentred']
    assert np.unravel_index(model.data.argmax(), model.data.shape) == (16, 16)
    cy, cx = centroid(model.data)
    assert abs(cy - 16) < 0.01 and abs(cx - 16) < 0.01
    assert_allclose(model.data.sum(), 1.0)
    # The same profile drawn on the odd grid: the shift is exact to ~1e-3 of the peak.
    expected = moffat_image(33, (16, 16))
    assert_allclose(model.data, expected / expected.sum(), atol=1e-3 * model.data.max())


def test_even_psf_centred_on_a_pixel_is_only_padded(tmp_path):
    path = tmp_path / 'pixel.fits'
    fits.PrimaryHDU(moffat_image(32, (16, 16))).writeto(path)
    model = read_psf_image(path)
    assert model.meta['padded'] and not model.meta['recentred']
    assert np.unravel_index(model.data.argmax(), model.data.shape) == (16, 16)


def test_pedestal_is_subtracted(tmp_path):
    """A Moffat of peak 30000 on a uint16 soft bias of 1000 (SDSS style) reads as the
    Moffat alone."""
    psf = moffat_image(51, (25, 25))
    raw = np.round(30000 * psf / psf.max() + 1000).astype(np.uint16)
    path = tmp_path / 'pedestal.fits'
    fits.PrimaryHDU(raw).writeto(path)
    model = read_psf_image(path)
    assert model.meta['background'] == 1000
    expected = raw.astype(float) - 1000
    assert_allclose(model.data, expected / expected.sum(), atol=1e-12)
    # background=0 keeps the pedestal, as asked.
    assert read_psf_image(path, background=0).meta['background'] == 0


def test_real_sdss_psf_pedestal():
    """The SDSS PSF reconstruction of the shared data (every border pixel 1000)."""
    path = Path('/work/shared/data/real/sdss-psf-example.fits')
    for base in (Path(__file__).resolve().parents[2] / 'shared', Path('/work/shared')):
        if (base / 'data' / 'real' / path.name).is_file():
            path = base / 'data' / 'real' / path.name
            break
    else:
        pytest.skip('the shared real-data folder is not here')
    model = read_psf_image(path)
    assert model.meta['background'] == 1000
    assert np.all(model.data[0] == 0) and np.all(model.data[:, -1] == 0)
    assert_allclose(model.data.sum(), 1.0)


def test_cropped_psf_without_pedestal_is_not_subtracted(tmp_path):
    """A wide PSF cropped inside its wings: a border above 1 percent that is not flat is
    not a pedestal (only a warning)."""
    path = tmp_path / 'cropped.fits'
    fits.PrimaryHDU(moffat_image(15, (7, 7), fwhm_pixels=8.0)).writeto(path)
    with pytest.warns(psfdeconv.exceptions.PSFDeconvWarning, match='border median'):
        model = read_psf_image(path)
    assert model.meta['background'] == 0


@pytest.mark.parametrize('size', [1, 3, 4])
def test_tiny_psf_is_refused(tmp_path, size):
    path = tmp_path / 'tiny.fits'
    fits.PrimaryHDU(moffat_image(size, ((size - 1) / 2,) * 2)).writeto(path)
    with pytest.raises(InvalidPSFError, match=rf'tiny\.fits is {size}x{size} samples; a PSF '
                       r'image must be at least 5x5'):
        read_psf_image(path)


def test_off_centre_peak_is_refused(tmp_path):
    path = tmp_path / 'off.fits'
    fits.PrimaryHDU(moffat_image(25, (12, 15))).writeto(path)
    with pytest.raises(InvalidPSFError, match=r'off\.fits peaks at sample \(y, x\) = '
                       r'\(12, 15\), 3 pixel\(s\) from its centre \(12, 12\); .* recentre'):
        read_psf_image(path)
    # One pixel off (a centring convention) is accepted, as check_psfs does.
    fits.PrimaryHDU(moffat_image(25, (12, 13))).writeto(tmp_path / 'one.fits')
    read_psf_image(tmp_path / 'one.fits')


def test_text_file_as_psf_is_refused(tmp_path):
    path = tmp_path / 'psf.txt'
    path.write_text('0 0 0\n0 1 0\n0 0 0\n')
    with pytest.raises(InvalidPSFError, match=r'PSF file .*psf\.txt is not a FITS file'):
        read_psf_image(path)
    with pytest.raises(InvalidPSFError, match=r'psf\.txt is not a FITS file'):
        psf_from_spec(f'psf={path}', pixel_scale=0.2)


@pytest.mark.parametrize('fwhm', ['1e9', '101arcsec', '150pix'])
def test_huge_moffat_fwhm_is_refused(fwhm):
    with pytest.raises(ConfigError, match=r'a PSF FWHM must be at most 100 arcsec and 100 '
                       r'pixels .* check the value and its unit'):
        psf_from_spec(f'moffat:fwhm={fwhm},beta=3', pixel_scale=0.2)


def test_psf_header_pixel_scale(tmp_path):
    """A PSF file drawn at 0.1 arcsec/pixel (PIXSCALE) read for a 0.2 arcsec/pixel
    exposure is resampled: the FWHM in exposure pixels halves."""
    from psfdeconv.psf import write_psf_image

    path = tmp_path / 'fine.fits'
    write_psf_image(moffat_psf(0.8, 3.0, pixel_scale=0.1, size=41, oversampling=1), path,
                    pixel_scale=0.1)
    assert fits.getval(path, 'PIXSCALE') == pytest.approx(0.1)
    model = read_psf_image(path, pixel_scale=0.2)
    assert model.meta['resampled_from'] == pytest.approx(0.1)
    rendered = render_psf(model, size=25)
    direct = render_psf(moffat_psf(0.8, 3.0, pixel_scale=0.2), size=25)
    assert_allclose(rendered.max(), direct.max(), rtol=0.05)


# --- Units (refused by psfdeconv._units; here through run_exposure_set) --------------------

@pytest.mark.parametrize('unit, match', [('mag', r"band 'r'.*magnitude"),
                                         ('Jy/beam', r"band 'r'.*beam")])
def test_magnitude_or_per_beam_exposure_is_refused_before_the_network(
        galaxies, tmp_path, tiny_model_path, no_network, unit, match):
    from astropy.nddata import NDData

    from psfdeconv.exceptions import UnitsError

    exposures, truth = galaxies
    exposures = dict(exposures)
    r = exposures['r']
    exposures['r'] = NDData(np.array(r.data), wcs=r.wcs, unit=unit, meta=dict(r.meta))
    table = Table({'id': [1, 2], 'ra': truth['ra'], 'dec': truth['dec']})
    with pytest.raises(UnitsError, match=match):
        run_exposure_set(exposures, tmp_path / 'out', table, psfs=MOFFAT,
                         model=tiny_model_path)


def test_string_ids_from_a_fits_catalogue(galaxies, tmp_path, tiny_model_path):
    """A FITS table's string column reads as bytes; the ids come out as the strings."""
    _, truth = galaxies
    path = tmp_path / 'sources.fits'
    Table({'id': ['NGC 1', 'obj-2'], 'ra': truth['ra'], 'dec': truth['dec']}).write(path)
    catalog, paths = run(galaxies, path, tmp_path, tiny_model_path)
    assert [stamp.meta['id'] for stamp in read_stamps(paths['stamps'])] == ['NGC 1', 'obj-2']
    assert list(read_catalog(paths['catalog'])['id']) == ['NGC 1', 'obj-2']
