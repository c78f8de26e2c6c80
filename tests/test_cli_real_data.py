# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""What real survey frames need on the command line: HDUs in CFITSIO style, weight,
variance and mask planes, units, a PSF per band, ePSF and detection options,
--pixel-scale, progress bars and stage logs, and the same in batch manifests.

Three full runs (DECam N6 with a weight map and -v; with a variance and a mask and -q;
a one-group batch); everything else stops before the network or calls the pieces."""

import argparse
import ast
import io
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import psfdeconv
from psfdeconv import cli
from psfdeconv.batch import read_group_exposures, read_manifest, read_summary
from psfdeconv.cli import main
from psfdeconv.exceptions import ConfigError, InvalidInputError
from psfdeconv.io import parse_fits_spec, read_catalog, read_exposure

DATA = Path(__file__).parent / 'data'
DECAM = DATA / 'decam-r-N6.fits'
DECAM_WEIGHT = DATA / 'decam-r-N6-weight.fits'
KIDS = DATA / 'kids-r-2600.fits'
#: The header's seeing (FWHM 4.02 pixels of 0.262 arcsec).
DECAM_PSF = 'moffat:fwhm=1.05arcsec,beta=3'


def run_main(arguments):
    """``main`` with the warnings of real headers (and of a pixel scale the shipped
    model may not cover) recorded instead of raised."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        return main(arguments)


class FakeTerminal(io.StringIO):
    """A standard error that says it is a terminal, so progress bars are drawn."""

    def isatty(self):
        return True


@pytest.fixture(scope='module')
def decam_planes(tmp_path_factory):
    """A variance file (1 / weight, 0 where the weight is 0) and a mask file (a bad
    column) of the DECam CCD."""
    directory = tmp_path_factory.mktemp('planes')
    weight = fits.getdata(DECAM_WEIGHT, 1).astype(float)
    with np.errstate(divide='ignore'):
        variance = np.where(weight > 0, 1 / weight, 0.0)
    fits.PrimaryHDU(variance).writeto(directory / 'variance.fits')
    mask = np.zeros(weight.shape, dtype=np.int16)
    mask[:, 100] = 4
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(mask, name='BPM')]).writeto(
        directory / 'mask.fits')
    return directory


# --- FILE[HDU] -----------------------------------------------------------------------------

@pytest.mark.parametrize('suffix, hdu', [
    ('', None), ('[1]', 1), ('[N6]', 'N6'), ('[ SCI , 2 ]', ('SCI', 2)), ('[0]', 0)])
def test_parse_fits_spec(suffix, hdu):
    assert parse_fits_spec(f'{DECAM}{suffix}') == (DECAM, hdu)


def test_parse_fits_spec_takes_an_existing_path_with_brackets_literally(tmp_path):
    odd = tmp_path / 'frame[1].fits'
    odd.write_bytes(b'')
    assert parse_fits_spec(str(odd)) == (odd, None)
    # A bracket at the end that is part of the name.
    odd = tmp_path / 'frame.fits[2]'
    odd.write_bytes(b'')
    assert parse_fits_spec(str(odd)) == (odd, None)


@pytest.mark.parametrize('text, message', [
    (f'{DECAM}[]', r'the bracket must hold an HDU'),
    (f'{DECAM}[SCI,two]', r"EXTVER 'two' is not a whole number"),
    (f'{DATA}/nothing.fits[1]', r'the image file .*nothing.fits does not exist'),
])
def test_parse_fits_spec_errors(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_fits_spec(text)


@pytest.mark.parametrize('band, code, message', [
    (f'r={DECAM}[SCI]', 3, r"has no image HDU 'SCI'; its HDUs are 0 \('PRIMARY'\), "
                           r"1 \('N6'\)"),
    (f'r={DECAM}[7]', 3, r"has no image HDU 7; its HDUs are 0 \('PRIMARY'\)"),
    (f'r={DATA}/nothing.fits[1]', 3, 'nothing.fits does not exist'),
])
def test_run_refuses_a_bad_hdu_naming_the_hdus(band, code, message, tmp_path, capsys):
    assert run_main(['run', '--band', band, '--out', str(tmp_path)]) == code
    assert re.search(message, capsys.readouterr().err)


# --- Planes and units ----------------------------------------------------------------------

def test_read_exposure_variance_hdu(decam_planes):
    weight = fits.getdata(DECAM_WEIGHT, 1).astype(float)
    exposure = read_exposure(DECAM, hdu='N6', variance_hdu=decam_planes / 'variance.fits',
                             mask_hdu=(str(decam_planes / 'mask.fits'), 'BPM'))
    good = weight > 0
    np.testing.assert_allclose(exposure.uncertainty.array[good],
                               1 / np.sqrt(weight[good]), rtol=1e-6)
    assert exposure.mask[~good].all() and exposure.mask[:, 100].all()
    with pytest.raises(InvalidInputError, match='give one of weight_hdu and variance_hdu'):
        read_exposure(DECAM, weight_hdu=DECAM_WEIGHT, variance_hdu=DECAM_WEIGHT)


@pytest.mark.parametrize('extra, message', [
    (['--weight', f'z={DECAM_WEIGHT}'], r"--weight 'z=.*': 'z' is not one of the bands "
                                        r"\['r'\]"),
    (['--weight', f'r={DECAM_WEIGHT}', '--variance', f'r={DECAM_WEIGHT}'],
     r"--weight and --variance both given for band\(s\) \['r'\]"),
    (['--mask', 'r'], "--mask 'r': write BAND=VALUE"),
    (['--unit', 'r=furlongs'], r"--unit r='furlongs': 'furlongs' is not a unit"),
    (['--unit', 'r=adu', '--unit', 'r=adu'], r'--unit r=\.\.\. is given twice'),
    (['--pixel-scale', '0.5'], r"pixel_scale = 0.5 \(--pixel-scale\) disagrees with the "
                               r"WCS of band 'r' .* 0.26\d* arcsec/pixel"),
])
def test_run_option_errors_exit_2(extra, message, tmp_path, capsys):
    arguments = ['run', '--band', f'r={DECAM}[1]', '--out', str(tmp_path), *extra]
    assert run_main(arguments) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize('option, value', [
    ('--pixel-scale', '-0.2'), ('--pixel-scale', 'nan'), ('--pixel-scale', 'inf'),
    ('--min-stars', '0'), ('--box-size', '2.5'), ('--threshold-sigma', '0')])
def test_numeric_options_are_checked_by_the_parser(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(['run', '--band', f'r={DECAM}', '--out', 'x', option, value])
    assert info.value.code == 2
    assert f'argument {option}' in capsys.readouterr().err


def test_pixel_scale_agreeing_with_the_wcs_is_accepted():
    exposures = read_group_exposures({'r': f'{DECAM}[1]'}, pixel_scale=0.263)
    assert exposures['r'].wcs.has_celestial
    # Nothing to read: the path as given.
    assert read_group_exposures({'r': str(DECAM)}) == {'r': str(DECAM)}


# --- PSF per band --------------------------------------------------------------------------

@pytest.mark.parametrize('items, expected', [
    (None, 'epsf'),
    (['moffat:fwhm=0.8arcsec,beta=3'], 'moffat:fwhm=0.8arcsec,beta=3'),
    # psf=FILE has an '=': 'psf' is not a band, so it is the spec of every band.
    (['psf=my_psf.fits'], 'psf=my_psf.fits'),
    (['r=psf=r_psf.fits', 'g=epsf'], {'g': 'epsf', 'r': 'psf=r_psf.fits', 'i': 'epsf'}),
    (['r=psf=r_psf.fits', 'moffat:fwhm=1arcsec,beta=3'],
     {'g': 'moffat:fwhm=1arcsec,beta=3', 'r': 'psf=r_psf.fits',
      'i': 'moffat:fwhm=1arcsec,beta=3'}),
    # A repeated bare spec: the last one, as for any repeated option.
    (['epsf', 'moffat:fwhm=1arcsec,beta=3'], 'moffat:fwhm=1arcsec,beta=3'),
])
def test_psf_specs(items, expected):
    assert cli._psf_specs(items, ['g', 'r', 'i']) == expected


def test_psf_specs_errors():
    with pytest.raises(ConfigError, match=r'--psf r=\.\.\. is given twice'):
        cli._psf_specs(['r=epsf', 'r=epsf'], ['g', 'r'])
    with pytest.raises(ConfigError, match='give the PSF after r='):
        cli._psf_specs(['r='], ['g', 'r'])


# --- Options reach the pipeline ------------------------------------------------------------

def test_run_passes_the_options_to_the_pipeline(monkeypatch, tmp_path):
    calls = {}

    def fake_run(exposures, out_dir, positions, psfs, **options):
        calls.update(exposures=exposures, psfs=psfs, **options)
        raise InvalidInputError('stop here')

    monkeypatch.setattr('psfdeconv.pipeline.run_exposure_set', fake_run)
    assert run_main(['run', '--band', f'r={DECAM}[N6]', '--weight',
                     f'r={DECAM_WEIGHT}[1]', '--unit', 'r=electron/s', '--psf',
                     f'r={DECAM_PSF}', '--min-stars', '8', '--star-threshold-sigma', '20',
                     '--box-size', '31', '--threshold-sigma', '2.5', '-q',
                     '--out', str(tmp_path)]) == 3
    exposure = calls['exposures']['r']
    assert exposure.meta['hdu'] == 1 and str(exposure.unit) == 'electron / s'
    assert exposure.uncertainty is not None
    assert calls['psfs'] == {'r': DECAM_PSF}
    assert calls['epsf_options'] == {'min_stars': 8, 'threshold_sigma': 20.0,
                                     'box_size': 31}
    assert calls['detect_options'] == {'threshold_sigma': 2.5}
    assert calls['progress'] is False


def test_min_stars_reaches_the_epsf_and_too_few_fall_back(tmp_path):
    # No CCD has 1000 isolated stars: the ePSF is refused and the PSF is an elliptical
    # Moffat fitted to the stars there are, in the meta and in every row's flags.
    from psfdeconv.flags import FLAG_PSF_FALLBACK

    assert run_main(['run', '--band', f'r={DECAM}[1]', '--min-stars', '1000', '-q',
                     '--out', str(tmp_path)]) == 0
    catalog = read_catalog(tmp_path / 'catalog.fits')
    assert catalog.meta['psf_source']['r'].startswith('moffat fit (')
    assert 'too few for an ePSF' in catalog.meta['psf_source']['r']
    assert ((np.asarray(catalog['flags']) & FLAG_PSF_FALLBACK) != 0).all()
    assert np.asarray(catalog['usable']).any()


# --- Every option a message suggests exists ------------------------------------------------

def _suggested_options():
    """'--option' -> files, from every string constant of the package (messages,
    f-string parts, help and docstrings)."""
    pattern = re.compile(r'(?<![\w-])--[a-z][a-z0-9-]*')
    found = {}
    for path in Path(psfdeconv.__file__).parent.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for option in pattern.findall(node.value):
                    found.setdefault(option, set()).add(path.name)
    return found


def _cli_options():
    parser = cli._parser()
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options |= set(subparser._option_string_actions)
    return options


def test_every_suggested_option_exists():
    suggested = _suggested_options()
    # The messages of the ePSF and detection name these (psf.py, pipeline.py).
    assert {'--min-stars', '--star-threshold-sigma', '--box-size', '--threshold-sigma',
            '--pixel-scale', '--psf', '--overwrite', '--resume'} <= set(suggested)
    missing = {option: sorted(files) for option, files in suggested.items()
               if option not in _cli_options()}
    assert not missing, f'options suggested but not on any psfdeconv command: {missing}'


# --- No WCS --------------------------------------------------------------------------------

def test_run_without_wcs_with_pixel_scale(tmp_path, capsys):
    # A KiDS cutout: no header keywords, no WCS, about 0.2 arcsec/pixel.
    frame = tmp_path / 'kids.fits'
    fits.PrimaryHDU(fits.getdata(KIDS)[1000:1400, 1000:1400]).writeto(frame)
    assert run_main(['run', '--band', f'r={frame}', '--unit', 'r=adu', '--pixel-scale',
                     '0.2', '--psf', 'moffat:fwhm=0.7arcsec,beta=3', '-q', '--out',
                     str(tmp_path / 'out')]) == 0, capsys.readouterr().err
    catalog = read_catalog(tmp_path / 'out' / 'catalog.fits')
    assert len(catalog) > 0 and catalog.meta['pixel_scale'] == pytest.approx(0.2)


# --- Full runs: progress, logs, planes -----------------------------------------------------

def test_run_decam_weight_verbose_with_progress(tmp_path, monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    out = tmp_path / 'n6'
    assert run_main(['run', '--band', f'r={DECAM}[1]', '--weight',
                     f'r={DECAM_WEIGHT}[1]', '--psf', f'r={DECAM_PSF}', '-v', '--out',
                     str(out)]) == 0
    err = terminal.getvalue()
    for line in ('building the PSFs of 1 band', 'built the PSFs in',
                 'finding the sources', r'found \d+ sources in',
                 r'deconvolving and measuring \d+ sources',
                 r'deconvolved and measured \d+ sources in \d+\.\d s'):
        assert re.search(f'DEBUG psfdeconv.pipeline: {line}', err), line
    # The bars: PSFs per band, the sources, the deconvolution per source.
    for bar in (r'PSFs: .*/1 \[', r'sources: .*/1 \[', r'deconvolve: .*/\d+ \['):
        assert re.search(bar, err), bar
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['noise_source']['r'].startswith('uncertainty')
    assert catalog.meta['psf_source']['r'] == DECAM_PSF
    assert 'deconvolved' in capsys.readouterr().out


def test_run_decam_variance_mask_quiet(tmp_path, decam_planes, monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    out = tmp_path / 'n6'
    assert run_main(['run', '--band', f'r={DECAM}[N6]', '--variance',
                     f'r={decam_planes / "variance.fits"}', '--mask',
                     f'r={decam_planes / "mask.fits"}[BPM]', '--psf', DECAM_PSF,
                     '--unit', 'r=adu', '-q', '--out', str(out)]) == 0
    # -q: no progress bar and no log line, even on a terminal.
    assert terminal.getvalue() == ''
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['noise_source']['r'].startswith('uncertainty')
    assert len(catalog) > 0
    capsys.readouterr()


# --- Batch manifests -----------------------------------------------------------------------

def write_manifest(directory, header, row):
    (directory / 'groups.csv').write_text(f'{header}\n{row}\n')
    return directory / 'groups.csv'


def test_read_manifest_plane_and_unit_columns(tmp_path, decam_planes):
    path = write_manifest(tmp_path, 'id,r,weight_r,mask_r,unit_r',
                          f'N6,{DECAM}[1],{DECAM_WEIGHT}[N6],'
                          f'{decam_planes / "mask.fits"}[BPM],adu')
    manifest = read_manifest(path)
    assert manifest.meta['bands'] == ['r']
    assert manifest['r'][0] == f'{DECAM}[1]'
    assert manifest['weight_r'][0] == f'{DECAM_WEIGHT}[N6]'
    assert manifest['unit_r'][0] == 'adu'
    reads = {'r': {'weight_hdu': manifest['weight_r'][0], 'mask_hdu': manifest['mask_r'][0],
                   'variance_hdu': '', 'unit': manifest['unit_r'][0]}}
    exposure = read_group_exposures({'r': manifest['r'][0]}, reads)['r']
    assert exposure.uncertainty is not None and exposure.mask[:, 100].all()
    assert str(exposure.unit) == 'adu'


@pytest.mark.parametrize('header, row, error, message', [
    ('id,r,weight_z', f'a,{DECAM},{DECAM_WEIGHT}', ConfigError,
     r"column\(s\) \['weight_z'\] but no band column\(s\) \['z'\]"),
    ('id,r,weight_r,variance_r', f'a,{DECAM},{DECAM_WEIGHT},{DECAM_WEIGHT}', ConfigError,
     'both weight_r and variance_r are given'),
    ('id,r,unit_r', f'a,{DECAM},furlongs', ConfigError, "'furlongs' is not a unit"),
    ('id,r,mask_r', f'a,{DECAM},nothing.fits[1]', InvalidInputError,
     r"column 'mask_r': mask .*nothing.fits does not exist"),
    ('id,r', f'a,{DECAM}[]', InvalidInputError, 'the bracket must hold an HDU'),
])
def test_read_manifest_column_errors(tmp_path, header, row, error, message):
    with pytest.raises(error, match=message):
        read_manifest(write_manifest(tmp_path, header, row))


def test_batch_decam_weight_column(tmp_path, monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    manifest = write_manifest(tmp_path, 'id,r,weight_r', f'N6,{DECAM}[1],{DECAM_WEIGHT}[1]')
    out = tmp_path / 'out'
    assert run_main(['batch', str(manifest), '--out', str(out), '--psf',
                     f'r={DECAM_PSF}', '--unit', 'r=adu', '--scheduler', 'synchronous',
                     ]) == 0, read_summary(out / 'summary.fits')['error']
    # A bar counting the groups, and the INFO line of each group.
    assert re.search(r'groups: .*/1 \[', terminal.getvalue())
    assert re.search(r'INFO: group N6: \d+ sources', terminal.getvalue())
    summary = read_summary(out / 'summary.fits')
    assert list(summary['status']) == ['ok'] and summary['n_sources'][0] > 0
    catalog = read_catalog(out / 'N6' / 'catalog.fits')
    assert catalog.meta['noise_source']['r'].startswith('uncertainty')
    assert catalog.meta['psf_source']['r'] == DECAM_PSF
    assert '1 groups: 1 done' in capsys.readouterr().out
