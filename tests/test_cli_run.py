# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the ``psfdeconv run`` and ``psfdeconv simulate-exposure`` commands.

``main`` runs in-process and returns the exit code (argparse usage errors raise
``SystemExit(2)``). The tiny model's output is meaningless: these test files, rows and exit
codes, not the deconvolution.
"""

import re

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS

from psfdeconv.cli import main
from psfdeconv.flags import FLAG_NEIGHBOURS
from psfdeconv.io import read_catalog, read_stamps
from psfdeconv.psf import read_psf_image

BANDS = ('g', 'r', 'i')
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'


@pytest.fixture(scope='module')
def exposure_set(tmp_path_factory, simulated_field_reused):
    """A 256x256 g, r, i set (8 galaxies, 25 stars) written by the CLI, and a catalogue
    of its first four galaxies.

    The options are those of the session's `simulated_field` (conftest.py), which the
    command writes instead of simulating the same seeded field again.
    """
    directory = tmp_path_factory.mktemp('exposures')
    with simulated_field_reused() as calls:
        assert main(['simulate-exposure', '--out', str(directory), '--seed', '4', '--size',
                     '256', '--n-galaxies', '8', '--n-stars', '25']) == 0
    assert calls == [True]
    truth = QTable.read(directory / 'truth.ecsv')
    catalog = directory / 'sources.ecsv'
    truth[truth['kind'] == 'galaxy'][:4]['id', 'ra', 'dec'].write(catalog)
    return directory, catalog


def band_arguments(directory, bands=BANDS):
    arguments = []
    for band in bands:
        arguments += ['--band', f'{band}={directory / f"{band}.fits"}']
    return arguments


def test_simulate_exposure_writes_the_set(exposure_set, capsys):
    directory, _ = exposure_set
    names = sorted(path.name for path in directory.iterdir())
    assert names == ['g.fits', 'i.fits', 'r.fits', 'sources.ecsv', 'truth.ecsv']
    truth = QTable.read(directory / 'truth.ecsv')
    assert len(truth) == 33 and truth.meta['seed'] == 4
    assert fits.getval(directory / 'r.fits', 'BUNIT') == 'adu'
    # Again without --overwrite: exit 5 and nothing changes.
    before = (directory / 'g.fits').read_bytes()
    assert main(['simulate-exposure', '--out', str(directory), '--seed', '5',
                 '--size', '256']) == 5
    assert 'psfdeconv simulate-exposure: error:' in capsys.readouterr().err
    assert (directory / 'g.fits').read_bytes() == before


def test_simulate_exposure_options(tmp_path):
    assert main(['simulate-exposure', '--out', str(tmp_path), '--size', '96',
                 '--bands', 'r,z', '--n-galaxies', '1', '--n-stars', '1',
                 '--seeing', 'r=0.7,z=0.6', '--sky-sigma', '0', '--no-wcs-offsets',
                 '--pixel-scale', '0.25']) == 0
    assert fits.getval(tmp_path / 'z.fits', 'SEEING') == 0.6
    assert fits.getval(tmp_path / 'z.fits', 'CRPIX1') == fits.getval(tmp_path / 'r.fits',
                                                                      'CRPIX1')
    assert main(['simulate-exposure', '--out', str(tmp_path / 'b'), '--size', '96',
                 '--seeing', 'wide']) == 2
    assert main(['simulate-exposure', '--out', str(tmp_path / 'c'), '--size', '96',
                 '--n-galaxies', '0', '--n-stars', '0']) == 2


def test_run_with_a_catalog(exposure_set, tiny_model_path, tmp_path, capsys):
    directory, catalog_path = exposure_set
    out = tmp_path / 'run'
    arguments = ['run', *band_arguments(directory), '--catalog', str(catalog_path),
                 '--psf', MOFFAT, '--model', str(tiny_model_path), '--out', str(out)]
    assert main(arguments) == 0
    assert 'deconvolved 4 sources in 3 bands' in capsys.readouterr().out
    # The outputs, and the marker written last that says they belong together.
    assert sorted(path.name for path in out.iterdir()) == [
        '.psfdeconv-complete.json', 'catalog.fits', 'psf_g.fits', 'psf_i.fits',
        'psf_r.fits', 'stamps.fits']
    catalog = read_catalog(out / 'catalog.fits')
    sources = QTable.read(catalog_path)
    assert list(catalog['id']) == list(sources['id'])
    assert isinstance(catalog['sky_centroid'], SkyCoord)
    assert catalog['flux_r'].unit == u.adu and catalog['size_g'].unit == u.arcsec
    assert catalog.meta['inputs']['i'] == str(directory / 'i.fits')
    assert catalog.meta['psf_source'] == dict.fromkeys(BANDS, MOFFAT)
    assert catalog.meta['positions'] == 'table columns ra, dec'
    # The catalogue's positions are the given ones (the input ra, dec).
    x, y = catalog['x_input'].value, catalog['y_input'].value
    sky = SkyCoord(sources['ra'], sources['dec'])
    wcs = WCS(fits.getheader(directory / 'g.fits'))
    assert np.allclose(np.transpose(wcs.world_to_pixel(sky)), np.transpose([x, y]),
                       atol=1e-6)
    stamps = read_stamps(out / 'stamps.fits')
    assert len(stamps) == 4 and stamps[0].data.shape == (3, 64, 64)
    psf = read_psf_image(out / 'psf_r.fits')
    assert psf.meta['oversampling'] == 2
    # A second run needs --overwrite (exit 5), and replaces the files with it.
    before = (out / 'catalog.fits').read_bytes()
    assert main(arguments) == 5
    assert 'catalog.fits exists' in capsys.readouterr().err
    assert (out / 'catalog.fits').read_bytes() == before
    assert main([*arguments, '--overwrite']) == 0


def test_run_detect(exposure_set, tiny_model_path, tmp_path):
    directory, _ = exposure_set
    out = tmp_path / 'detect'
    assert main(['run', *band_arguments(directory), '--detect', '--psf', MOFFAT,
                 '--model', str(tiny_model_path), '--reference-band', 'r',
                 '--out', str(out)]) == 0
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['positions'] == 'detected' and catalog.meta['reference_band'] == 'r'
    # The 8 galaxies, and up to 4 star-forming knots the deblending splits off them.
    assert 8 <= len(catalog) <= 12
    assert len(read_stamps(out / 'stamps.fits')) == len(catalog)
    assert catalog.meta['neighbours'] == 'replace'
    assert catalog.meta['symmetries'] == 4  # the card's
    # --keep-neighbours deconvolves the stamps as cut: no NEIGHBOURS flag.
    kept = tmp_path / 'kept'
    assert main(['run', *band_arguments(directory), '--detect', '--psf', MOFFAT,
                 '--model', str(tiny_model_path), '--reference-band', 'r',
                 '--keep-neighbours', '--symmetries', '1', '--out', str(kept)]) == 0
    kept = read_catalog(kept / 'catalog.fits')
    assert kept.meta['neighbours'] == 'keep' and kept.meta['symmetries'] == 1
    assert not (np.asarray(kept['flags']) & FLAG_NEIGHBOURS).any()
    assert (np.asarray(catalog['flags']) & FLAG_NEIGHBOURS).any()


def run_arguments(directory, model, out, bands=BANDS):
    return ['run', *band_arguments(directory, bands), '--psf', MOFFAT, '--model',
            str(model), '--out', str(out)]


@pytest.mark.parametrize(('change', 'code', 'message'), [
    (lambda d, m, o: run_arguments(d, m, o, bands=('g', 'r')), 3,
     r'the data have 2 band\(s\) but the model'),
    (lambda d, m, o: run_arguments(d, m, o) + ['--band', f'z={d / "z.fits"}'], 3,
     r'the data have 4 band\(s\)'),
    (lambda d, m, o: [a.replace('i.fits', 'missing.fits') for a in run_arguments(d, m, o)],
     3, 'missing.fits does not exist'),
    (lambda d, m, o: run_arguments(d, d / 'no.keras', o), 4, 'no.keras does not exist'),
    (lambda d, m, o: run_arguments(d, m, o) + ['--band', 'g'], 2,
     "--band 'g': write NAME=FILE"),
    (lambda d, m, o: run_arguments(d, m, o) + ['--band', f'g={d / "g.fits"}'], 2,
     '--band g is given twice'),
    (lambda d, m, o: run_arguments(d, m, o) + ['--psf', 'gaussian:fwhm=1'], 2,
     "band 'g': --psf 'gaussian:fwhm=1' is not a PSF specification"),
    (lambda d, m, o: run_arguments(d, m, o) + ['--catalog', str(d / 'nothing.ecsv')], 3,
     'nothing.ecsv does not exist'),
    (lambda d, m, o: run_arguments(d, m, o) + ['--catalog', str(d / 'g.fits')], 3,
     'cannot be read as a table'),
    # astropy's error for an unidentified format carries a table of every format it
    # knows: the message keeps its first line.
    (lambda d, m, o: run_arguments(d, m, o) + ['--catalog', str(_garbage(d / 'sources.txt'))],
     3, r'cannot be read as a table \(IORegistryError: Format could not be identified.*\); '
        'give an ECSV'),
    (lambda d, m, o: run_arguments(d, m, o) + ['--reference-band', 'z'], 3,
     "reference_band = 'z' is not one of the bands"),
])
def test_run_errors(exposure_set, tiny_model_path, tmp_path, capsys, change, code,
                    message):
    directory, _ = exposure_set
    out = tmp_path / 'out'
    assert main(change(directory, tiny_model_path, out)) == code
    err = capsys.readouterr().err
    assert 'psfdeconv run: error:' in err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _garbage(path):
    path.write_bytes(b'not a table\x00\x01' * 8)
    return path


def test_run_usage_errors(exposure_set, capsys):
    directory, catalog = exposure_set
    with pytest.raises(SystemExit) as info:
        main(['run', *band_arguments(directory), '--detect', '--catalog', str(catalog),
              '--out', 'x'])
    assert info.value.code == 2
    assert 'not allowed with argument' in capsys.readouterr().err


def test_integer_exposures_give_the_fluxes_of_float_ones(exposure_set, tiny_model_path, tmp_path):
    """The same set as uint16 counts on a soft-bias pedestal of 1000 (SDSS style)
    gives the fluxes of the float images with the same noise: the counts carry a
    quantization noise of 1/12 adu^2 and the dither another 1/12, which the float
    images get as Gaussian noise (the fluxes move with the noise level). Without
    the dither the median background snaps to the lattice: fluxes 2000 adu
    (20 errors) low."""
    directory, catalog = exposure_set
    rng = np.random.default_rng(12)
    for name in ('counts', 'floats'):
        (tmp_path / name).mkdir()
    for band in ('g', 'r', 'i'):
        with fits.open(directory / f'{band}.fits') as hdulist:
            header, data = hdulist[0].header, hdulist[0].data.astype(float)
        fits.PrimaryHDU(np.floor(data + 1000.0).astype(np.uint16),
                        header).writeto(tmp_path / 'counts' / f'{band}.fits')
        fits.PrimaryHDU(data + rng.normal(0.0, np.sqrt(1 / 6), data.shape),
                        header).writeto(tmp_path / 'floats' / f'{band}.fits')
    runs = {}
    for name in ('counts', 'floats'):
        out = tmp_path / f'{name}_out'
        assert main(['run', *band_arguments(tmp_path / name), '--catalog', str(catalog),
                     '--psf', MOFFAT, '--model', str(tiny_model_path), '--symmetries', '1',
                     '--out', str(out)]) == 0
        runs[name] = read_catalog(out / 'catalog.fits')
    for band in ('g', 'r', 'i'):
        counts, floats = runs['counts'][f'flux_{band}'], runs['floats'][f'flux_{band}']
        error = runs['floats'][f'flux_err_{band}']
        # Two noise realizations move the four fluxes together by up to 2.3 errors
        # here; without the dither the counts' fluxes were 20 errors low.
        assert np.all(np.abs(counts - floats) < 4 * error), (band, counts - floats, error)
    assert runs['counts'].meta['dequantized'] == {'g': 1.0, 'r': 1.0, 'i': 1.0}
    assert runs['floats'].meta['dequantized'] == {}
