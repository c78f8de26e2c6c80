# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of data units: flux columns in the input's unit, surface brightness converted to
flux per pixel, magnitudes and Jy/beam refused, bands in different units converted to the
reference band's or refused, and Quantity stamps in `deconvolve_stamps`.

The exposures are simulated fields written to FITS files with BUNIT set, read back by the
pipeline as a user's files are.
"""

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose

from psfdeconv._units import common_flux_unit, flux_per_pixel, is_magnitude
from psfdeconv.deconvolve import deconvolve_stamps
from psfdeconv.exceptions import PSFDeconvError, UnitsError
from psfdeconv.io import read_exposure, read_exposure_set
from psfdeconv.pipeline import deconvolve_catalog
from psfdeconv.simulate import read_simulation, simulate_exposure

pytestmark = pytest.mark.filterwarnings(
    'ignore::psfdeconv.exceptions.OutsideTrainingRangeWarning')

BANDS = ('g', 'r', 'i')
#: Pixel area of the simulated fields (0.2 arcsec pixels) in arcsec2.
AREA = 0.04


@pytest.fixture(scope='module')
def field():
    exposures, truth = simulate_exposure((160, 160), n_galaxies=3, n_stars=8, seed=5,
                                         wcs_offsets=False)
    galaxies = truth[np.asarray(truth['kind']) == 'galaxy']
    positions = Table({'x': galaxies['x'], 'y': galaxies['y']})
    psfs = {band: f'moffat:fwhm={exposures[band].meta["SEEING"]}arcsec,beta=3.5'
            for band in BANDS}
    return exposures, positions, psfs


@pytest.fixture(scope='module')
def write_field(field, tmp_path_factory):
    """Writes the field's bands as FITS files: ``write(name, {band: (BUNIT or None,
    factor)})`` stores data times factor with that BUNIT; returns band -> path."""
    exposures, _, _ = field
    base = tmp_path_factory.mktemp('units')

    def write(name, units):
        paths = {}
        for band in BANDS:
            bunit, factor = units[band]
            header = exposures[band].wcs.to_header()
            if bunit is not None:
                header['BUNIT'] = bunit
            path = base / f'{name}_{band}.fits'
            fits.PrimaryHDU(np.asarray(exposures[band].data) * factor,
                            header=header).writeto(path)
            paths[band] = path
        return paths

    return write


def run(paths, field, model):
    _, positions, psfs = field
    return deconvolve_catalog(paths, positions, psfs=psfs, model=model)


@pytest.mark.parametrize('bunit, unit', [('adu', u.adu), ('electron/s', u.electron / u.s),
                                         ('nanomaggy', u.nanomaggy),
                                         (None, u.dimensionless_unscaled)])
def test_flux_columns_carry_the_input_unit(field, write_field, tiny_model, bunit, unit):
    name = 'plain_' + (bunit or 'none').replace('/', '_')
    catalog, stamps = run(write_field(name, dict.fromkeys(BANDS, (bunit, 1.0))), field,
                          tiny_model)
    for band in BANDS:
        for column in ('flux', 'flux_err', 'flux_corrected', 'flux_residual',
                       'noise_sigma'):
            assert catalog[f'{column}_{band}'].unit == unit
        assert np.isfinite(catalog[f'flux_{band}'].value).all()
    assert stamps[0].unit == unit
    assert catalog.meta['unit'] == unit.to_string()
    assert catalog.meta['unit_conversion'] == {}


def test_surface_brightness_becomes_flux_per_pixel(field, write_field, tiny_model):
    flux = run(write_field('nmgy', dict.fromkeys(BANDS, ('nanomaggy', 1.0))), field,
               tiny_model)[0]
    surface = dict.fromkeys(BANDS, ('nanomaggy/arcsec2', 1 / AREA))
    catalog, stamps = run(write_field('nmgy_arcsec2', surface), field, tiny_model)
    for band in BANDS:
        assert catalog[f'flux_{band}'].unit == u.nanomaggy
        assert_allclose(catalog[f'flux_{band}'], flux[f'flux_{band}'], rtol=1e-6)
    conversion = catalog.meta['unit_conversion']['g']
    assert u.Unit(conversion['from']) == u.nanomaggy / u.arcsec**2
    assert u.Unit(conversion['to']) == u.nanomaggy
    assert conversion['factor'] == pytest.approx(AREA)
    assert 'pixel area' in conversion['reason']
    assert stamps[0].unit == u.nanomaggy


def test_surface_brightness_units():
    unit, factor = flux_per_pixel(u.MJy / u.sr, 0.2)
    assert unit == u.MJy
    assert factor == pytest.approx((0.2 * u.arcsec).to_value(u.rad) ** 2)
    # A header's spelling with several slashes is read without a warning.
    unit, factor = flux_per_pixel(u.erg / u.s / u.cm**2 / u.Hz / u.sr, 0.2)
    assert unit == u.erg / u.s / u.cm**2 / u.Hz
    unit, factor = flux_per_pixel(u.adu, 0.2)
    assert (unit, factor) == (u.adu, 1.0)


@pytest.mark.parametrize('bunit, unit', [('MJY/SR', u.MJy / u.sr), ('mJy/sr', u.mJy / u.sr),
                                         ('NANOMAGGIES', u.nanomaggy), ('UJY', u.uJy)])
def test_upper_case_fits_spellings(bunit, unit, tmp_path):
    header = fits.Header({'BUNIT': bunit})
    data = np.random.default_rng(1).normal(size=(20, 20))
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / 'image.fits')
    exposure = read_exposure(tmp_path / 'image.fits', require_wcs=False)
    assert exposure.unit == unit and exposure.meta['unit_source'] == 'BUNIT'


def test_bunit_with_several_slashes(field, write_field):
    paths = write_field('cgs', dict.fromkeys(BANDS, ('erg/s/cm2/Hz/sr', 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        exposure = read_exposure(paths['g'])
    assert exposure.unit == u.erg / u.s / u.cm**2 / u.Hz / u.sr


@pytest.mark.parametrize('bunit', ['mag', 'ABmag', 'mag(AB)', 'MAG', 'dex', 'mag/arcsec2'])
def test_magnitudes_are_refused(field, write_field, bunit):
    name = 'mag_' + ''.join(c for c in bunit if c.isalnum())
    units = dict.fromkeys(BANDS, ('adu', 1.0))
    units['r'] = (bunit, 1.0)
    paths = write_field(name, units)
    with pytest.raises(UnitsError,
                       match=r"band 'r'.*mag.*magnitude.*flux per pixel.*--unit BAND=adu"):
        read_exposure_set(paths)
    assert issubclass(UnitsError, PSFDeconvError)


def test_magnitude_argument_and_jy_per_beam_are_refused(field, write_field):
    # Radio headers write JY/BEAM: recognised and refused, not read as dimensionless.
    paths = write_field('beam', dict.fromkeys(BANDS, ('JY/BEAM', 1.0)))
    with pytest.raises(UnitsError, match=r"band 'g'.*Jy / beam.*beam area"):
        read_exposure_set(paths)
    exposures, _, _ = field
    with pytest.raises(UnitsError, match='magnitude'):
        read_exposure(exposures['g'], unit=u.ABmag)
    with pytest.raises(UnitsError, match='magnitude'):
        read_exposure(exposures['g'], unit='ABmag')
    assert is_magnitude(u.STmag) and not is_magnitude(u.nanomaggy)


def test_convertible_band_units_are_converted(field, write_field, tiny_model):
    same = run(write_field('njy', dict.fromkeys(BANDS, ('nJy', 1.0))), field, tiny_model)[0]
    mixed = {'g': ('nJy', 1.0), 'r': ('uJy', 1e-3), 'i': ('uJy', 1e-3)}
    catalog, stamps = run(write_field('mixed', mixed), field, tiny_model)
    for band in BANDS:
        assert catalog[f'flux_{band}'].unit == u.nJy
        assert_allclose(catalog[f'flux_{band}'], same[f'flux_{band}'], rtol=1e-6)
    conversions = catalog.meta['unit_conversion']
    assert set(conversions) == {'r', 'i'}
    assert conversions['r']['factor'] == pytest.approx(1000.0)
    assert "reference band's unit" in conversions['r']['reason']
    assert stamps[0].unit == u.nJy
    assert stamps[0].meta['units'] == dict.fromkeys(BANDS, 'nJy')


def test_inconvertible_band_units_are_refused(field, write_field, tiny_model):
    units = {'g': ('adu', 1.0), 'r': ('electron', 1.0), 'i': ('adu', 1.0)}
    with pytest.raises(UnitsError, match=r"band 'r' is in electron.*reference band 'g' "
                                         r"is in adu.*--unit BAND=UNIT"):
        run(write_field('adu_electron', units), field, tiny_model)


def test_common_flux_unit_scales_the_uncertainty(field):
    exposures, _, _ = field
    bands = {'g': exposures['g'],
             'r': exposures['r'].multiply(1e-3 * u.dimensionless_unscaled)}
    bands['r'].unit = u.uJy
    bands['g'].unit = u.nJy
    converted, conversions = common_flux_unit(bands, 'g', {'g': 0.2, 'r': 0.2})
    assert converted['r'].unit == u.nJy and conversions['r']['factor'] == pytest.approx(1e3)
    assert_allclose(converted['r'].data, exposures['r'].data * 1e-3 * 1e3)
    assert_allclose(converted['r'].uncertainty.array,
                    bands['r'].uncertainty.array * 1e3)


@pytest.fixture(scope='module')
def stamps(tiny_simulation_path):
    return read_simulation(tiny_simulation_path, 0, 3)


def test_deconvolve_stamps_keeps_quantities(stamps, tiny_model):
    plain, plain_details = deconvolve_stamps(
        stamps['observed'], stamps['psf'], pixel_scale=stamps['pixel_scale'],
        model=tiny_model, noise_sigma=1.0, return_details=True)
    images, details = deconvolve_stamps(
        stamps['observed'] * u.nJy, stamps['psf'], pixel_scale=stamps['pixel_scale'],
        model=tiny_model, noise_sigma=1e-3 * u.uJy, return_details=True)
    assert isinstance(images, u.Quantity) and images.unit == u.nJy
    assert_allclose(images.value, plain)
    for key in ('flux', 'flux_err', 'flux_corrected', 'flux_residual', 'flux_residual_err',
                'noise_sigma', 'amplitude'):
        assert details[key].unit == u.nJy, key
        assert_allclose(details[key].value, plain_details[key])
    assert not isinstance(details['network_output'], u.Quantity)
    again = deconvolve_stamps(stamps['observed'] * u.nJy, stamps['psf'],
                              pixel_scale=stamps['pixel_scale'], model=tiny_model)
    assert again.unit == u.nJy
    assert not isinstance(plain, u.Quantity)


def test_deconvolve_stamps_noise_unit_mismatch(stamps, tiny_model):
    with pytest.raises(UnitsError, match='noise_sigma is in adu but the stamps are in nJy'):
        deconvolve_stamps(stamps['observed'] * u.nJy, stamps['psf'],
                          pixel_scale=stamps['pixel_scale'], model=tiny_model,
                          noise_sigma=1.0 * u.adu)
    with pytest.raises(UnitsError, match='plain array'):
        deconvolve_stamps(stamps['observed'], stamps['psf'],
                          pixel_scale=stamps['pixel_scale'], model=tiny_model,
                          noise_sigma=1.0 * u.adu)
