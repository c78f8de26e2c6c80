# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The parsers of psfdeconv's inputs, one per kind of input.

Public functions validate their inputs once, with these parsers, and raise
the `~psfdeconv.exceptions.InvalidInputError` subclass for the problem, with
a message of the form ``"<name> = <value>; <what is wrong>; <the fix>"``
(or, for arrays, the count and the first bad index).

* `angle_arcsec`: "float or angle Quantity" -> one positive angle in arcsec
  (a FWHM);
* `pixel_scale_arcsec`, `scalar_pixel_scale`, `broadcast_pixel_scale`:
  "float, array or Quantity" -> arcsec/pixel
  (`~psfdeconv.exceptions.PixelScaleError`);
* `as_image_array`: "array or Quantity of images" -> finite float64 array
  and unit;
* `as_image_and_mask`: "array, masked array or NDData" -> one 2-D image
  with its bad pixels set to 0, the bad-pixel mask and the meta;
* `check_psfs`: odd, not larger than the stamps, positive sums -> the PSFs
  normalised to unit sum (`~psfdeconv.exceptions.InvalidPSFError`);
  `as_stamps_and_psfs` checks stamps and PSFs together;
* `positive_int`: a count such as ``batch_size`` -> an int >= 1;
* `is_band_name`, `check_band_names`: band names (ASCII identifiers: they
  become column-name suffixes and FITS header values);
* `check_output_location`: an output file or directory that can be created
  (no regular file in the way, a writable directory), before any work.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from .exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    PixelScaleError,
    ShapeMismatchError,
)

__all__ = ['angle_arcsec', 'pixel_scale_arcsec', 'scalar_pixel_scale', 'broadcast_pixel_scale',
           'check_band_names', 'as_image_array', 'as_image_stack', 'as_image_and_mask',
           'check_psfs', 'as_stamps_and_psfs', 'config_from_dict', 'positive_int',
           'is_band_name', 'check_output_location', 'exception_text']


def exception_text(exc, *, limit=200):
    r"""``'TypeName: first line'`` of a third-party exception, for one-line
    messages: astropy's unidentified-format error, for one, appends a
    30-line table of every format it knows.

    Examples
    --------
    >>> from psfdeconv._validation import exception_text
    >>> exception_text(ValueError('no format\n  ascii  Yes\n  fits  Yes'))
    'ValueError: no format'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ''
    if len(text) > limit:
        text = text[:limit - 3] + '...'
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def angle_arcsec(value, name, *, error=InvalidInputError):
    """One positive, finite angle in arcsec, e.g. a FWHM.

    Parameters
    ----------
    value : float or `~astropy.units.Quantity`
        arcsec as a number, or an angle Quantity.
    name : str
        The argument's name, for the error message.
    error : type, optional
        The `~psfdeconv.exceptions.InvalidInputError` subclass to raise.

    Returns
    -------
    float

    Examples
    --------
    >>> import astropy.units as u
    >>> angle_arcsec(0.5 * u.arcmin, 'fwhm')
    30.0
    """
    import astropy.units as u

    given = value
    if isinstance(value, u.Quantity):
        try:
            value = value.to_value(u.arcsec)
        except u.UnitConversionError:
            raise error(f'{name} = {given}; give an angle such as 0.8 * u.arcsec, or a '
                        f'number of arcsec.') from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise error(f'{name} = {given!r}; give a number of arcsec or an angle '
                    f'Quantity.') from None
    if not np.isfinite(value) or value <= 0:
        raise error(f'{name} = {value} arcsec; it must be positive and finite.')
    return value


def pixel_scale_arcsec(pixel_scale, name='pixel_scale', *, scalar_to=None):
    """Pixel scales in arcsec/pixel, each positive and finite.

    Parameters
    ----------
    pixel_scale : float, array-like or `~astropy.units.Quantity`
        arcsec/pixel as numbers, or a Quantity in angle/pixel or in angle
        (taken per pixel).
    name : str, optional
        The argument's name, for the error message.
    scalar_to : tuple of int, optional
        Repeat a scalar to this shape before checking the values (so that
        the message names the first bad element).

    Returns
    -------
    `~numpy.ndarray`
        float64, the input's shape (or ``scalar_to``).

    Raises
    ------
    psfdeconv.exceptions.PixelScaleError
        For other units, non-numbers and values that are not positive and
        finite.

    Examples
    --------
    >>> import astropy.units as u
    >>> float(pixel_scale_arcsec(0.2 * u.arcsec / u.pix))
    0.2
    >>> try:
    ...     pixel_scale_arcsec(-1.0)
    ... except ValueError as exc:
    ...     print(exc)
    pixel_scale = -1.0; it must be positive and finite (arcsec/pixel).
    """
    import astropy.units as u

    value = pixel_scale
    if isinstance(pixel_scale, u.Quantity):
        try:
            value = pixel_scale.to_value(u.arcsec / u.pix,
                                         equivalencies=[(u.arcsec, u.arcsec / u.pix)])
        except u.UnitConversionError:
            raise PixelScaleError(f'{name} = {pixel_scale}; give an angle per pixel '
                                  f'such as 0.2 * u.arcsec / u.pix, or a number in '
                                  f'arcsec/pixel.') from None
    try:
        value = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PixelScaleError(f'{name} = {pixel_scale!r}; give arcsec per pixel (a '
                              f'number or a Quantity).') from None
    if scalar_to is not None and value.ndim == 0:
        value = np.full(scalar_to, float(value))
    bad = ~(np.isfinite(value) & (value > 0))
    if bad.any():
        if value.ndim == 0:
            raise PixelScaleError(f'{name} = {float(value)}; it must be positive and '
                                  f'finite (arcsec/pixel).')
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ', '.join(map(str, index))
        raise PixelScaleError(f'{name}[{where}] = {value[index]}; pixel scales must '
                              f'be positive and finite (arcsec/pixel).')
    return value


def scalar_pixel_scale(pixel_scale, name='pixel_scale'):
    """One pixel scale in arcsec/pixel, as `pixel_scale_arcsec`; a
    `~psfdeconv.exceptions.PixelScaleError` for an array of several."""
    value = pixel_scale_arcsec(pixel_scale, name)
    if value.size != 1:
        raise PixelScaleError(f'{name} has shape {value.shape}; give one pixel '
                              f'scale.')
    return float(value.reshape(()))


def broadcast_pixel_scale(pixel_scale, shape, name='pixel_scale', *, per_object=False):
    """Pixel scales (`pixel_scale_arcsec`) broadcast to ``shape``.

    Parameters
    ----------
    pixel_scale : float, array-like or `~astropy.units.Quantity`
        As for `pixel_scale_arcsec`.
    shape : tuple of int
        The images' leading shape, e.g. (n, n_bands).
    name : str, optional
        The argument's name, for the error message.
    per_object : bool, optional
        Take a 1-D array of length ``shape[0]`` as one value per object (the
        first axis); otherwise numpy's rules align trailing axes.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the scales do not broadcast to ``shape``.
    """
    value = pixel_scale_arcsec(pixel_scale, name)
    if per_object and value.ndim == 1 and len(shape) > 1 and value.shape[0] == shape[0]:
        value = value.reshape((-1,) + (1,) * (len(shape) - 1))
    try:
        return np.broadcast_to(value, shape)
    except ValueError:
        raise ShapeMismatchError(
            f'{name} of shape {value.shape} does not broadcast to the images\' '
            f'leading shape {tuple(shape)}; give a scalar or an array of that '
            f'shape (numpy broadcasting aligns trailing axes: per-object scales '
            f'for (n, n_bands) stamps need shape (n, 1)).') from None


def positive_int(value, name, *, error=InvalidInputError):
    """A count that must be a whole number >= 1 (``batch_size``, ...).

    Refuses booleans, floats (even 2.0: a count is given as an int), zero
    and negative numbers with ``error`` naming the value.

    Examples
    --------
    >>> positive_int(64, 'batch_size')
    64
    >>> positive_int(2.5, 'batch_size')
    Traceback (most recent call last):
    ...
    psfdeconv.exceptions.InvalidInputError: batch_size = 2.5; it must be a whole number >= 1; ...
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise error(f'{name} = {value!r}; it must be a whole number >= 1; give e.g. '
                    f'{name}=128.')
    return int(value)


def is_band_name(text):
    """Whether ``text`` may name a band: an ASCII identifier (letters,
    digits and underscores, not starting with a digit), because band names
    become column names (``flux_<band>``), file names (``psf_<band>.fits``)
    and FITS header values, which are ASCII.

    >>> is_band_name('r'), is_band_name('F814W'), is_band_name('γ'), is_band_name('2')
    (True, True, False, False)
    """
    return isinstance(text, str) and text.isascii() and text.isidentifier()


def check_output_location(path, name, *, directory=False, error=ConfigError):
    """Refuse, before any work, an output that could never be written.

    ``path`` is an output file (``directory=False``: its parent directory is
    created if missing) or an output directory (``directory=True``). Refused
    with ``error``: a directory output that is an existing regular file, a
    path below a regular file, or a path whose nearest existing directory may
    not be written to (by its permissions, or because a file cannot be created
    in it). Existing outputs are left to
    `~psfdeconv.io.check_writable` (``overwrite``).

    Returns
    -------
    `~pathlib.Path`
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise error(f'{name} = {str(path)!r}; it is an existing file, not a directory; '
                    f'give the path of a directory (it is created if missing).')
    ancestor = path if directory else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f'{name} = {str(path)!r}; {str(ancestor)!r} is a file, not a '
                    f'directory, so nothing can be created under it; give a path in '
                    f'a directory.')
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise error(f'{name} = {str(path)!r}; the directory {str(ancestor)!r} may not be '
                    f'written to (permission denied); give a directory you may write '
                    f'to.')
    # Permission bits do not tell a read-only mount, a pseudo file system
    # (/proc) or a full disk: create and remove a file there.
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise error(f'{name} = {str(path)!r}; nothing can be created in '
                    f'{str(ancestor)!r} ({exc.strerror or exc}); give a directory '
                    f'you may write to.') from None
    return path


def check_band_names(bands, n_bands):
    """Band names as a tuple of distinct ASCII identifiers (they become
    column-name suffixes, `is_band_name`); ``b0``, ``b1``, ... if None."""
    if bands is None:
        return tuple(f'b{i}' for i in range(n_bands))
    bands = tuple(str(b) for b in bands)
    if len(bands) != n_bands:
        raise ShapeMismatchError(f'bands has {len(bands)} name(s) {bands} but the '
                                 f'images have {n_bands} band(s); give one name per '
                                 f'band.')
    if len(set(bands)) != len(bands) or not all(is_band_name(b) for b in bands):
        raise InvalidInputError(f'band names must be distinct identifiers (ASCII '
                                f'letters, digits, underscores), got {bands}.')
    return bands


def as_image_array(images, name, *, min_ndim=2):
    """Images as a finite float64 array, and their unit.

    Parameters
    ----------
    images : array-like or `~astropy.units.Quantity`
        Shape (..., ny, nx).
    name : str
        The argument's name, for the error message.
    min_ndim : int, optional
        Fewest dimensions.

    Returns
    -------
    array : `~numpy.ndarray`
        float64.
    unit : `~astropy.units.UnitBase` or None
        A Quantity's unit.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For non-numbers; `~psfdeconv.exceptions.ShapeMismatchError` for too
        few dimensions or empty images; `~psfdeconv.exceptions.InvalidPixelsError`
        for NaN or inf pixels.
    """
    import astropy.units as u

    unit = None
    if isinstance(images, u.Quantity):
        unit = images.unit
        images = images.value
    try:
        array = np.asarray(images, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f'{name} must be a numeric array, got '
                                f'{type(images).__name__}; pass a numpy array of '
                                f'floats.') from exc
    if array.ndim < min_ndim:
        raise ShapeMismatchError(f'{name} must have at least {min_ndim} dimensions '
                                 f'(..., ny, nx), got shape {array.shape}; pass a 2-D '
                                 f'image or a stack of them.')
    if array.shape[-1] == 0 or array.shape[-2] == 0:
        raise ShapeMismatchError(f'{name} has empty images, shape {array.shape}.')
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidPixelsError(f'{name} has {int(bad.sum())} non-finite (NaN or inf) '
                                 f'pixel(s), the first at index {first}; replace or '
                                 f'mask them (e.g. set to 0 after background '
                                 f'subtraction) before measuring.')
    return array, unit


def as_image_and_mask(data, mask=None):
    """One 2-D image with its bad pixels set to 0, its mask and its meta.

    Parameters
    ----------
    data : array-like, masked array or `~astropy.nddata.NDData`
        One band of one exposure.
    mask : array-like, optional
        bool, the image's shape; True for pixels to ignore, added to an
        NDData's or masked array's own mask.

    Returns
    -------
    image : `~numpy.ndarray`
        float64 in native byte order; masked and non-finite pixels are 0,
        so that photutils never sees them.
    bad : `~numpy.ndarray`
        bool, the masked and non-finite pixels.
    meta : dict
        An NDData's meta (empty otherwise).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For an image that is not 2-D, a mask of another shape, or an image
        without a good pixel.
    """
    meta = {}
    nd_mask = None
    if hasattr(data, 'data') and hasattr(data, 'mask') and \
            not isinstance(data, np.ndarray):
        meta = dict(getattr(data, 'meta', None) or {})
        nd_mask = data.mask
        data = data.data
    if np.ma.isMaskedArray(data):
        nd_mask = np.ma.getmaskarray(data) if nd_mask is None else \
            np.asarray(nd_mask, bool) | np.ma.getmaskarray(data)
        data = np.ma.getdata(data)
    image = np.array(data, dtype=np.float64)  # also native byte order
    if image.ndim != 2:
        raise InvalidInputError(f'data must be a 2-D image, got shape '
                                f'{image.shape}; pass one band of one '
                                f'exposure.')
    bad = ~np.isfinite(image)
    for extra in (nd_mask, mask):
        if extra is not None:
            extra = np.asarray(extra, dtype=bool)
            if extra.shape != image.shape:
                raise InvalidInputError(f'mask has shape {extra.shape} but '
                                        f'the image has {image.shape}; give '
                                        f'a mask of the same shape.')
            bad = bad | extra
    if bad.all():
        raise InvalidInputError('every pixel of the image is masked or '
                                'non-finite; there is nothing to find stars '
                                'in.')
    image[bad] = 0.0
    return image, bad, meta


def check_psfs(psfs, stamp_shape, name='psfs'):
    """PSFs checked against stamps of ``stamp_shape`` and normalised.

    Parameters
    ----------
    psfs : `~numpy.ndarray`
        float (..., py, px).
    stamp_shape : tuple of int
        (ny, nx) of the stamps.
    name : str, optional
        The argument's name, for the error message.

    Returns
    -------
    `~numpy.ndarray`
        float64 PSFs divided by their sums.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        If a size is even, a PSF is larger than the stamps, or a sum is not
        positive and finite (naming the first such PSF).
    """
    psfs = np.asarray(psfs, dtype=np.float64)
    py, px = psfs.shape[-2:]
    ny, nx = stamp_shape
    if py % 2 == 0 or px % 2 == 0:
        raise InvalidPSFError(f'PSF images must have odd sizes so that they have a '
                              f'centre pixel, got {(py, px)}; crop or resample them '
                              f'to an odd size.')
    if py > ny or px > nx:
        raise InvalidPSFError(f'PSF images {(py, px)} are larger than the stamps '
                              f'{(ny, nx)}; crop them.')
    sums = psfs.sum(axis=(-2, -1))
    bad = ~(np.isfinite(sums) & (sums > 0))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ', '.join(map(str, index))
        raise InvalidPSFError(f'{name}[{where}] sums to {float(sums[index])}; a PSF must '
                              f'have a positive, finite sum.')
    return psfs / sums[..., None, None]


def as_image_stack(images, name):
    """`as_image_array` of shape (n, n_bands, ny, nx), without its unit."""
    data, _ = as_image_array(images, name)
    if data.ndim != 4:
        msg = (f'{name} must have shape (n, n_bands, ny, nx), got '
               f'{data.shape}; add a band axis with {name}[:, None] for '
               f'single-band stamps.')
        raise ShapeMismatchError(msg)
    return data


def as_stamps_and_psfs(stamps, psfs):
    """Stamps ``(..., ny, nx)`` (`as_image_array`) and one PSF per stamp
    (`check_psfs`): float arrays, the PSFs normalised to unit sum."""
    stamps, _ = as_image_array(stamps, 'stamps')
    psfs, _ = as_image_array(psfs, 'psfs')
    try:
        leading = np.broadcast_shapes(stamps.shape[:-2], psfs.shape[:-2])
    except ValueError:
        leading = None
    if leading != stamps.shape[:-2]:
        msg = (f'psfs of shape {psfs.shape} do not match stamps of shape '
               f'{stamps.shape}; give one PSF per stamp, (..., py, px) with '
               f'the stamps\' leading shape.')
        raise ShapeMismatchError(msg)
    return stamps, check_psfs(psfs, stamps.shape[-2:])


def config_from_dict(cls, values, what):
    """A configuration dataclass ``cls`` from a dict, refusing unknown keys
    (a `~psfdeconv.exceptions.ConfigError` naming them and the valid ones);
    ``what`` names the configuration in the message."""
    import dataclasses

    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f'unknown {what} config keys {unknown}; valid keys are '
                          f'{sorted(known)}.')
    return cls(**values)
