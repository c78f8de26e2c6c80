# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Data units: which ones are fluxes per pixel, and the conversions to them.

The network and the amplitude refit work on flux per pixel (adu,
electron/s, nanomaggy, nJy, ...), in any such unit: the deconvolved images
and fluxes come back in it. This module is the one place that decides what
else can be used:

- surface brightness (a solid angle in the denominator: ``MJy/sr``,
  ``nanomaggy/arcsec2``, ``erg/(s cm2 Hz sr)``) is turned into flux per
  pixel by multiplying with the pixel area (`flux_per_pixel`);
- magnitudes and other logarithmic units (``mag``, ``mag(AB)``, ``dex``)
  and per-beam units (``Jy/beam``) are refused (`check_flux_unit`): they
  cannot be summed into a flux, or need a beam this package does not know;
- the bands of one exposure set are converted to the reference band's unit
  where the units are convertible, and refused where they are not
  (`common_flux_unit`), so a catalogue never loses a band's unit.

`psfdeconv.io.read_exposure` calls `check_flux_unit`;
`psfdeconv.pipeline.deconvolve_catalog` calls `common_flux_unit`;
`psfdeconv.cutouts` uses `is_surface_brightness` to choose how to resample.
"""

import re

import numpy as np

from .exceptions import UnitsError

__all__ = ['unit_text', 'is_surface_brightness', 'is_magnitude', 'is_magnitude_text',
           'check_flux_unit', 'flux_per_pixel', 'common_flux_unit']

#: The fix quoted when a unit is refused.
_FLUX_FIX = ('give the data in a flux per pixel (e.g. adu, electron/s, '
             'nanomaggy, nJy): convert the image (and its BUNIT), or, if only '
             'the header is wrong, set the unit (--unit BAND=adu on the command '
             'line; unit= of psfdeconv.io.read_exposure, or the unit of an '
             'NDData/CCDData, in Python)')


def unit_text(text, where):
    """``text`` if astropy parses it as a unit, else a
    `~psfdeconv.exceptions.ConfigError` that starts with ``where`` (the
    option or manifest cell) and names the value."""
    import astropy.units as u

    from .exceptions import ConfigError

    try:
        u.Unit(text)
    except (ValueError, TypeError):
        raise ConfigError(f'{where}: {text!r} is not a unit astropy knows; give e.g. '
                          f'adu, electron/s or nanomaggy.') from None
    return text


def _angle_bases():
    import astropy.units as u

    return (u.sr, u.deg, u.arcmin, u.arcsec, u.mas, u.rad)


def is_surface_brightness(unit):
    """Whether a unit is per solid angle (e.g. MJy/sr, nmgy/arcsec2).

    Examples
    --------
    >>> is_surface_brightness('MJy / sr'), is_surface_brightness('adu')
    (True, False)
    """
    import astropy.units as u

    if unit is None:
        return False
    try:
        unit = u.Unit(unit)
        return any(base in _angle_bases() and power < 0
                   for base, power in zip(unit.bases, unit.powers, strict=True))
    except (ValueError, TypeError, AttributeError):
        return False


def is_magnitude(unit):
    """Whether a unit is logarithmic (mag, mag(AB), dex, dB, or a product
    with one, e.g. mag/arcsec2).

    Examples
    --------
    >>> import astropy.units as u
    >>> is_magnitude(u.ABmag), is_magnitude('mag'), is_magnitude('nanomaggy')
    (True, True, False)
    """
    import astropy.units as u
    from astropy.units.function import FunctionUnitBase

    if unit is None:
        return False
    if isinstance(unit, FunctionUnitBase):
        return True
    try:
        unit = u.Unit(unit)
    except (ValueError, TypeError):
        return False
    if isinstance(unit, FunctionUnitBase):
        return True
    logarithmic = (u.mag, u.dex, u.dB)
    return any(base in logarithmic for base in getattr(unit, 'bases', [unit]))


def is_magnitude_text(text):
    """Whether a unit string astropy cannot parse names a magnitude or a
    logarithm (``ABmag``, ``MAG``, ``mag_AB``, ``log(Jy)``); 'nanomaggy' and
    'maggies' do not."""
    low = str(text).strip().lower()
    return bool(re.search(r'mag(?!g)', low) or re.search(r'\bdex\b', low)
                or low.startswith('log'))


def check_flux_unit(unit, where):
    """Refuse a unit that cannot be turned into flux per pixel.

    Parameters
    ----------
    unit : `~astropy.units.UnitBase`
        The data's unit.
    where : str
        What the data are (a band, a file), for the message.

    Raises
    ------
    psfdeconv.exceptions.UnitsError
        For magnitudes and other logarithmic units, and per-beam units.
    """
    import astropy.units as u

    if is_magnitude(unit):
        raise UnitsError(f'{where} is in {unit}, a magnitude (logarithmic) unit: '
                         f'magnitudes cannot be deconvolved or summed into a '
                         f'flux; {_FLUX_FIX}.')
    if any(base == u.beam for base in getattr(unit, 'bases', [])):
        raise UnitsError(f'{where} is in {unit}: a per-beam unit needs the beam '
                         f'area to become flux per pixel, which psfdeconv does '
                         f'not know; convert the image to Jy/sr or Jy per pixel '
                         f'first (astropy.units.beam_angular_area), or '
                         f'{_FLUX_FIX}.')


def flux_per_pixel(unit, pixel_scale, where='the data'):
    """The flux-per-pixel unit of data in ``unit`` and the factor to it.

    A surface-brightness unit is multiplied by the pixel area
    (``pixel_scale`` squared) and loses its solid angle; any other unit is
    returned unchanged with factor 1.

    Parameters
    ----------
    unit : `~astropy.units.UnitBase`
        The data's unit.
    pixel_scale : float
        arcsec/pixel (square pixels).
    where : str, optional
        What the data are, for the message.

    Returns
    -------
    flux_unit : `~astropy.units.UnitBase`
    factor : float
        Multiply the data by it to get ``flux_unit``.

    Raises
    ------
    psfdeconv.exceptions.UnitsError
        As `check_flux_unit`.

    Examples
    --------
    >>> import astropy.units as u
    >>> unit, factor = flux_per_pixel(u.nanomaggy / u.arcsec**2, 0.2)
    >>> print(unit, round(factor, 6))
    nmgy 0.04
    """
    import astropy.units as u

    unit = u.Unit(unit)
    check_flux_unit(unit, where)
    if not is_surface_brightness(unit):
        return unit, 1.0
    bases = [(base, power) for base, power in zip(unit.bases, unit.powers, strict=True)
             if not (base in _angle_bases() and power < 0)]
    flux_unit = u.CompositeUnit(1.0, [b for b, _ in bases], [p for _, p in bases])
    area = (pixel_scale * u.arcsec) ** 2
    try:
        factor = float((1.0 * unit * area).to_value(flux_unit))
    except u.UnitConversionError:
        raise UnitsError(f'{where} is in {unit}, a surface brightness that could '
                         f'not be turned into flux per pixel with the pixel '
                         f'area ({pixel_scale} arcsec)^2; {_FLUX_FIX}.') from None
    return flux_unit, factor


def _scaled(exposure, unit, factor):
    """A copy of a CCDData with data and uncertainty times ``factor``."""
    from astropy.nddata import CCDData, StdDevUncertainty

    uncertainty = exposure.uncertainty
    if uncertainty is not None:
        sigma = uncertainty.represent_as(StdDevUncertainty).array
        uncertainty = StdDevUncertainty(sigma * factor)
    return CCDData(np.asarray(exposure.data) * factor, unit=unit, mask=exposure.mask,
                   uncertainty=uncertainty, wcs=exposure.wcs, meta=exposure.meta)


def common_flux_unit(exposures, reference_band, pixel_scales):
    """Every band in the reference band's flux-per-pixel unit.

    Surface brightness is converted to flux per pixel with each band's own
    pixel area (`flux_per_pixel`), then each band's unit to the reference
    band's where they are convertible (e.g. nJy to uJy).

    Parameters
    ----------
    exposures : dict
        Band name to `~astropy.nddata.CCDData`.
    reference_band : str
        The band whose unit the others are given.
    pixel_scales : dict
        Band name to arcsec/pixel.

    Returns
    -------
    converted : dict
        Band name to the exposure, a scaled copy where it was converted.
    conversions : dict
        Band name to ``{'from', 'to', 'factor', 'reason'}`` for each band
        that was converted (empty if none was).

    Raises
    ------
    psfdeconv.exceptions.UnitsError
        For a unit `flux_per_pixel` refuses, or a band whose unit is not
        convertible to the reference band's (e.g. adu and electron), naming
        both.
    """
    import astropy.units as u

    flux_units, factors = {}, {}
    for band, exposure in exposures.items():
        unit = exposure.unit or u.dimensionless_unscaled
        flux_units[band], factors[band] = flux_per_pixel(
            unit, pixel_scales[band], where=f'band {band!r}')
    target = flux_units[reference_band]
    converted, conversions = {}, {}
    for band, exposure in exposures.items():
        unit = exposure.unit or u.dimensionless_unscaled
        factor, reasons = factors[band], []
        if factor != 1.0 or flux_units[band] != unit:
            reasons.append(f'surface brightness times the pixel area '
                           f'({pixel_scales[band]:.6g} arcsec)^2')
        if flux_units[band] != target:
            try:
                factor *= float(flux_units[band].to(target))
            except u.UnitConversionError:
                raise UnitsError(
                    f'band {band!r} is in {unit} but the reference band '
                    f'{reference_band!r} is in {exposures[reference_band].unit}, and '
                    f'these cannot be converted to one another; give every band '
                    f'in one flux unit (convert the images, e.g. adu times the '
                    f'gain for electron, or, if a header is wrong, set the right '
                    f'unit: --unit BAND=UNIT on the command line, unit= of '
                    f'psfdeconv.io.read_exposure in Python).') from None
            reasons.append(f"converted to the reference band's unit {target}")
        if reasons:
            converted[band] = _scaled(exposure, target, factor)
            conversions[band] = {'from': unit.to_string(), 'to': target.to_string(),
                                 'factor': factor, 'reason': '; '.join(reasons)}
        else:
            converted[band] = exposure
    return converted, conversions
