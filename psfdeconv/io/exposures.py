# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
FITS input of exposures.

`read_exposure` reads one band of one exposure (a FITS image,
tile-compressed or not, with optional mask, weight or uncertainty
extensions or files) into a `~astropy.nddata.CCDData` with native float64
pixels, a boolean mask and a celestial WCS, and refuses what the pipeline
cannot use (no celestial WCS, cubes, constant images, non-FITS files) with
an error that names the file and the fix. `pixel_scale_of` gives the pixel
scale of a celestial WCS.
"""

import contextlib
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .._validation import is_band_name
from .._warnings import catch_warnings
from ..exceptions import (
    InvalidInputError,
    InvalidPixelsError,
    PSFDeconvWarning,
    UnitsError,
)

__all__ = ['read_exposure', 'read_exposure_set', 'pixel_scale_of', 'fits_unit_string',
           'parse_fits_spec', 'example_exposures', 'EXAMPLE_EXPOSURES', 'EXAMPLE_BANDS']

#: The bundled exposure set (``psfdeconv run --example``; see data/README.md).
EXAMPLE_EXPOSURES = Path(__file__).parent.parent / 'data' / 'example_exposures'
EXAMPLE_BANDS = ('g', 'r', 'i')


def example_exposures():
    """Paths of the bundled example exposure set.

    Three simulated 384x384 exposures (g, r, i; 0.2 arcsec/pixel, a TAN WCS
    each, 30 galaxies and 30 stars) made by
    `psfdeconv.simulate.simulate_exposure`, and their truth table.

    Returns
    -------
    exposures : dict
        Band name to the gzip-compressed FITS file, in the order g, r, i.
    truth : `~pathlib.Path`
        The ECSV truth table (positions, fluxes, PSF-free shapes).

    Examples
    --------
    >>> from psfdeconv.io import example_exposures
    >>> exposures, truth = example_exposures()
    >>> list(exposures), truth.name
    (['g', 'r', 'i'], 'truth.ecsv')
    """
    return ({band: EXAMPLE_EXPOSURES / f'{band}.fits.gz' for band in EXAMPLE_BANDS},
            EXAMPLE_EXPOSURES / 'truth.ecsv')


# --- Reading exposures ----------------------------------------------------------

#: Fix for an exposure without a celestial WCS, quoted in the error message.
_NO_WCS_FIX = ('add a celestial WCS, e.g. with astrometry.net, or give pixel '
               'positions and the pixel scale: pixel_scale=ARCSEC in Python '
               '(deconvolve_catalog, run_exposure_set; require_wcs=False for '
               'read_exposure), --pixel-scale ARCSEC on the command line')

#: Relative difference of the two pixel axes above which `pixel_scale_of`
#: warns that the pixels are not square.
_SQUARE_PIXEL_TOLERANCE = 0.01

#: Header keywords not copied into ``meta`` as single values.
_META_SKIP = ('', 'COMMENT', 'HISTORY')


def _is_header_warning(message):
    """Whether a recorded warning is astropy's report of a non-standard
    header that it read anyway (kept in ``meta['fits_warnings']``)."""
    from astropy.io.fits.verify import VerifyWarning
    from astropy.utils.exceptions import AstropyUserWarning
    from astropy.wcs import FITSFixedWarning

    if issubclass(message.category, FITSFixedWarning | VerifyWarning):
        return True
    # astropy.io.fits.card reports cards of no known convention (e.g.
    # 'ESO-LOG 03:04:08>-START EXPO ...') as a plain AstropyUserWarning.
    return (message.category is AstropyUserWarning
            and str(message.message).startswith(
                'The following header keyword is invalid'))


@contextlib.contextmanager
def _header_warnings_into(store):
    """Collect astropy's header-fix warnings into the list ``store``.

    Inside the block every warning is recorded; on exit, the warnings about
    non-standard headers that astropy repaired (`~astropy.wcs.FITSFixedWarning`,
    `~astropy.io.fits.verify.VerifyWarning`, invalid cards) are appended to
    ``store`` (once each), and any other warning is emitted again unchanged,
    so that the caller's filters still see it. The warning filters are
    process-wide, so the block holds psfdeconv's warnings lock
    (`psfdeconv._warnings`): threads read exposures one at a time.
    """
    caught = None
    try:
        with catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            yield
    finally:
        for message in caught or ():
            if _is_header_warning(message):
                text = (f'{message.category.__name__}: '
                        f'{" ".join(str(message.message).split())}')
                if text not in store:
                    store.append(text)
            else:
                warnings.warn_explicit(message.message, message.category,
                                       message.filename, message.lineno,
                                       source=message.source)


def fits_unit_string(unit):
    """The ``BUNIT``/``TUNIT`` string of an astropy unit.

    The FITS standard's spelling where it has one, else astropy's generic
    one (e.g. ``nmgy`` for SDSS nanomaggies, which FITS lacks), which
    `read_exposure` and astropy's table readers parse back.

    Examples
    --------
    >>> import astropy.units as u
    >>> from psfdeconv.io import fits_unit_string
    >>> fits_unit_string(u.electron / u.s), fits_unit_string(u.nanomaggy)
    ('electron / s', 'nmgy')
    """
    try:
        return unit.to_string('fits')
    except ValueError:
        return unit.to_string()


def _parse_unit(text):
    """An astropy unit from a BUNIT string, or None if it is not one.

    Tries the string as written, in lower case, with plural counts
    ('ELECTRONS/S' -> electron / s, 'DNs' -> DN, 'nanomaggies' ->
    nanomaggy) made singular, and with upper-case janskys in their astropy
    spelling ('JY/BEAM' -> Jy / beam, 'MJY/SR' -> MJy / sr, the Spitzer and
    Herschel convention), so that a per-beam or surface-brightness unit is
    recognised (and refused or converted) rather than read as dimensionless.
    """
    import astropy.units as u

    low = text.strip().lower()
    singular = re.sub(r'\b(electron|count|photon|adu|dn)s\b', r'\1', low)
    singular = re.sub(r'\b(nano)?maggies\b', lambda m: (m.group(1) or '') + 'maggy',
                      singular)
    # The prefix keeps its case (M: mega, m: milli); u, n are unambiguous.
    janskys = re.sub(r'\b([MmUuNn]?)jy\b',
                     lambda m: {'U': 'u', 'N': 'n'}.get(m.group(1), m.group(1)) + 'Jy',
                     text.strip(), flags=re.IGNORECASE)
    janskys = re.sub(r'[A-Za-z]+', lambda m: m.group(0) if m.group(0).endswith('Jy')
                     else m.group(0).lower(), janskys)
    candidates = (text.strip(), low, singular, janskys)
    for candidate in candidates:
        if not candidate:
            return None
        try:
            # Real headers write 'erg/s/cm2/Hz/sr'; astropy parses it and
            # warns that FITS discourages multiple slashes.
            with catch_warnings():
                warnings.simplefilter('ignore', u.UnitsWarning)
                return u.Unit(candidate)
        except ValueError:
            continue
    return None


def _hdu_names(hdulist):
    return ', '.join(f'{index} ({hdu.name!r})' for index, hdu in enumerate(hdulist))


def _image_hdus(hdulist):
    """Indices of the HDUs holding image data, with their numpy shapes, from
    the headers (no data is read; tile-compressed HDUs show the image's
    header)."""
    found = []
    for index, hdu in enumerate(hdulist):
        if not hdu.is_image:
            continue
        naxis = int(hdu.header.get('NAXIS', 0))
        shape = tuple(int(hdu.header.get(f'NAXIS{axis}', 0))
                      for axis in range(naxis, 0, -1))
        if naxis and all(shape):
            found.append((index, shape))
    return found


#: A CFITSIO-style HDU suffix: ``file.fits[1]``, ``file.fits[SCI]``,
#: ``file.fits[SCI,2]`` (EXTNAME, EXTVER).
_HDU_SUFFIX = re.compile(r'^(?P<path>.+?)\[(?P<hdu>[^\[\]]*)\]$')


def parse_fits_spec(text, *, role='image', must_exist=True):
    """A FITS path with an optional CFITSIO-style HDU, as ``(path, hdu)``.

    ``'decam.fits[1]'`` is HDU 1 (the first extension, as CFITSIO counts),
    ``'decam.fits[SCI]'`` the HDU whose EXTNAME is SCI and
    ``'decam.fits[SCI,2]'`` the one with EXTNAME SCI and EXTVER 2. A path
    without brackets, or one that exists as a file with its brackets, is
    taken literally (``hdu`` None: the reader's default HDU).

    Parameters
    ----------
    text : str or `~pathlib.Path`
        The path, with or without an HDU suffix.
    role : str, optional
        What the file is ('image', 'weight', 'mask', ...), for the messages.
    must_exist : bool, optional
        Refuse a file that does not exist.

    Returns
    -------
    path : `~pathlib.Path`
        The file.
    hdu : int, str, tuple of (str, int) or None
        The HDU index, EXTNAME or (EXTNAME, EXTVER).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the file does not exist (with ``must_exist``) or the bracket does
        not hold an HDU.

    Examples
    --------
    >>> from psfdeconv.io import parse_fits_spec
    >>> parse_fits_spec('decam.fits[SCI,2]', must_exist=False)
    (PosixPath('decam.fits'), ('SCI', 2))
    >>> parse_fits_spec('decam.fits[1]', must_exist=False)[1]
    1
    """
    text = str(text).strip()
    if Path(text).expanduser().is_file():
        return Path(text).expanduser(), None
    match = _HDU_SUFFIX.match(text)
    hdu = None
    if match:
        text, inner = match.group('path').strip(), match.group('hdu').strip()
        parts = [part.strip() for part in inner.split(',')]
        if not inner or not all(parts) or len(parts) > 2:
            raise InvalidInputError(f'{text}[{inner}]: the bracket must hold an HDU '
                                    f'index or EXTNAME, or EXTNAME,EXTVER (e.g. '
                                    f'{text}[1], {text}[SCI] or {text}[SCI,2]).')
        if len(parts) == 1:
            hdu = int(parts[0]) if re.fullmatch(r'[0-9]+', parts[0]) else parts[0]
        elif re.fullmatch(r'[0-9]+', parts[1]):
            hdu = (parts[0], int(parts[1]))
        else:
            raise InvalidInputError(f'{text}[{inner}]: EXTVER {parts[1]!r} is not a '
                                    f'whole number; write {text}[EXTNAME,EXTVER], '
                                    f'e.g. {text}[SCI,2].')
    path = Path(text).expanduser()
    if must_exist and not path.is_file():
        raise InvalidInputError(f'the {role} file {path} does not exist; give the '
                                f'path of a FITS file, optionally with an HDU '
                                f'(FILE[1], FILE[SCI] or FILE[SCI,2]).')
    return path, hdu


def _open_fits(path, role='image'):
    """`astropy.io.fits.open` with psfdeconv's errors for missing and
    non-FITS files."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'the {role} file {path} does not exist; give '
                                f'the path of a FITS file.')
    try:
        hdulist = fits.open(path)
        _ = len(hdulist)  # reads every header: a truncated file fails here
    except (OSError, ValueError, TypeError, IndexError) as error:
        raise InvalidInputError(f'the {role} file {path} is not a readable FITS '
                                f'file ({error}); give a FITS image (.fits, '
                                f'.fits.gz or .fits.fz).') from None
    return hdulist


def _select_hdu(hdulist, spec, path, role):
    """Index of the HDU ``spec`` (index, name or (name, ver)) in ``hdulist``."""
    if isinstance(spec, bool):
        spec = None  # never a valid HDU; falls through to the error
    if isinstance(spec, int | np.integer):
        if 0 <= spec < len(hdulist):
            return int(spec)
    elif isinstance(spec, str | tuple):
        try:
            return hdulist.index_of(spec)
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    raise InvalidInputError(f'{path} has no {role} HDU {spec!r}; its HDUs are '
                            f'{_hdu_names(hdulist)}. Give one of these, by index '
                            f'or name, or the path of a separate FITS file.')


def _plane_of(array, plane, where):
    """The 2-D image of ``array``: itself, a squeezed single plane, or the
    plane ``plane`` of a 3-D cube."""
    if array.ndim > 2 and all(n == 1 for n in array.shape[:-2]):
        array = array.reshape(array.shape[-2:])  # e.g. NAXIS3 = 1
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise InvalidInputError(f'{where} has {array.ndim} dimensions, shape '
                                f'{array.shape}; give a 2-D image.')
    if plane is None:
        raise InvalidInputError(f'{where} is a 3-D cube of shape {array.shape}; '
                                f'psfdeconv reads one 2-D image per band: select '
                                f'a plane with plane=0..{array.shape[0] - 1}, or '
                                f'split the cube into one file per band.')
    if isinstance(plane, bool) or not isinstance(plane, int | np.integer) \
            or not 0 <= plane < array.shape[0]:
        raise InvalidInputError(f'plane = {plane!r}, but {where} has '
                                f'{array.shape[0]} planes; give an integer in '
                                f'0..{array.shape[0] - 1}.')
    return array[int(plane)]


def _read_auxiliary(spec, hdulist, path, shape, plane, role, collected):
    """Read a mask, weight or uncertainty image given as an HDU of the
    exposure's file or as a separate file. Returns (float64 array, header,
    description)."""
    file_spec = hdu_spec = None
    if isinstance(spec, os.PathLike):
        file_spec = spec
    elif isinstance(spec, tuple) and len(spec) == 2 and \
            isinstance(spec[0], str | os.PathLike) and Path(spec[0]).is_file():
        file_spec, hdu_spec = spec
    elif isinstance(spec, str) and hdulist is not None and \
            spec.upper() in (hdu.name for hdu in hdulist):
        hdu_spec = spec
    elif isinstance(spec, str) and Path(spec).is_file():
        file_spec = spec
    elif hdulist is not None:
        hdu_spec = spec
    else:
        raise InvalidInputError(f'{role}_hdu = {spec!r}: with an in-memory '
                                f'image, give the path of a FITS file (or set '
                                f'the NDData {role} yourself).')

    with contextlib.ExitStack() as stack:
        if file_spec is not None:
            source = Path(file_spec)
            with _header_warnings_into(collected):
                aux_list = stack.enter_context(_open_fits(source, role))
                if hdu_spec is None:
                    found = _image_hdus(aux_list)
                    if not found:
                        raise InvalidInputError(
                            f'the {role} file {source} has no image data; its '
                            f'HDUs are {_hdu_names(aux_list)}.')
                    index = found[0][0]
                else:
                    index = _select_hdu(aux_list, hdu_spec, source, role)
                hdu = aux_list[index]
                data, header = hdu.data, hdu.header.copy()
            where = f'HDU {index} of the {role} file {source}'
        else:
            with _header_warnings_into(collected):
                index = _select_hdu(hdulist, hdu_spec, path, role)
                hdu = hdulist[index]
                data, header = hdu.data, hdu.header.copy()
            where = f'{role} HDU {index} ({hdu.name!r}) of {path}'
        if data is None or not hdu.is_image:
            raise InvalidInputError(f'{where} holds no image data; give the HDU '
                                    f'with the {role} image.')
        array = _plane_of(np.array(data, dtype=np.float64), plane, where)
    if array.shape != shape:
        raise InvalidInputError(f'{where} has shape {array.shape} but the image '
                                f'has {shape}; give the {role} image of the same '
                                f'exposure.')
    return array, header, where


def _uncertainty_from(sigma_kind, values):
    """Standard deviations and the pixels they invalidate, from an inverse
    variance ('ivar'), variance or standard deviation image."""
    with np.errstate(divide='ignore', invalid='ignore'):
        bad = ~np.isfinite(values) | (values <= 0)
        if sigma_kind == 'ivar':
            sigma = 1.0 / np.sqrt(values)
        elif sigma_kind == 'var':
            sigma = np.sqrt(values)
        else:
            sigma = values.copy()
    sigma[bad] = np.inf
    return sigma, bad


def _as_celestial_wcs(wcs, where, require_wcs):
    """The astropy `~astropy.wcs.WCS` of an image, checked to be celestial;
    None if it is not and ``require_wcs`` is False."""
    from astropy.wcs import WCS

    low_level = getattr(wcs, 'low_level_wcs', wcs)  # HighLevelWCSWrapper
    if low_level is not None and not isinstance(low_level, WCS):
        raise InvalidInputError(f'the WCS of {where} is a '
                                f'{type(low_level).__name__}; psfdeconv needs an '
                                f'astropy.wcs.WCS (e.g. WCS(header)).')
    if low_level is None or not low_level.has_celestial:
        if not require_wcs:
            return None
        ctypes = list(low_level.wcs.ctype) if low_level is not None else []
        raise InvalidInputError(f'{where} has no celestial WCS (CTYPE = '
                                f'{ctypes}); {_NO_WCS_FIX}.')
    if low_level.naxis > 2:
        low_level = low_level.celestial
    matrix = low_level.pixel_scale_matrix
    det = float(np.linalg.det(matrix)) if np.all(np.isfinite(matrix)) else np.nan
    if not np.isfinite(det) or det == 0:
        raise InvalidInputError(f'the celestial WCS of {where} has a singular '
                                f'pixel scale matrix {matrix.tolist()}; fix its '
                                f'CD (or CDELT/PC) keywords, or '
                                f'{_NO_WCS_FIX}.')
    return low_level.deepcopy()


#: Primary-header keywords that describe the primary HDU itself, never
#: inherited by an extension (FITS standard 4.0, section 4.4.2; the INHERIT
#: convention of the FITS registry).
_NOT_INHERITED = frozenset({'SIMPLE', 'BITPIX', 'NAXIS', 'EXTEND', 'BLANK', 'BSCALE',
                            'BZERO', 'PCOUNT', 'GCOUNT', 'XTENSION', 'EXTNAME',
                            'EXTVER', 'EXTLEVEL', 'INHERIT', 'CHECKSUM', 'DATASUM',
                            'COMMENT', 'HISTORY', ''})


def _inherit_primary(header, primary_header):
    """Add to ``header`` (in place) the primary header's keywords it lacks,
    as the FITS INHERIT convention says for an extension with ``INHERIT = T``:
    the extension's own keywords win. Returns the keywords added."""
    added = []
    for card in primary_header.cards:
        key = card.keyword
        if key in _NOT_INHERITED or re.fullmatch(r'NAXIS\d+', key) or key in header:
            continue
        header.append(card)
        added.append(key)
    return added


def _meta_from_header(header):
    meta = {}
    if header is None:
        return meta
    for key, value in header.items():
        if key not in _META_SKIP and key not in meta:
            meta[key] = value
    return meta


def read_exposure(path_or_nddata, *, hdu=None, plane=None, mask_hdu=None,
                  weight_hdu=None, uncertainty_hdu=None, unit=None,
                  require_wcs=True, variance_hdu=None):
    """Read one band of one exposure as a `~astropy.nddata.CCDData`.

    The pixels become native-endian float64 (integer data are scaled by
    BZERO/BSCALE by astropy first; tile-compressed HDUs are decompressed).
    NaN and infinite pixels are kept as they are and added to the mask (never
    interpolated); their number is ``meta['n_nonfinite']``. An inverse-variance
    weight image becomes a `~astropy.nddata.StdDevUncertainty` of
    ``1 / sqrt(weight)``, with pixels of weight <= 0 masked and given an
    infinite standard deviation.

    **INHERIT.** An image in an extension whose header says ``INHERIT = T``
    gets the primary header's keywords it lacks (the WCS, BUNIT, ...), its
    own keywords winning, as the FITS INHERIT convention says; the keywords
    added are ``meta['inherited_keywords']``.

    **Header warnings.** Real headers are often not quite standard
    (deprecated RADECSYS, unparsable CD values, ESO-LOG cards). astropy repairs
    what it can and says so with `~astropy.wcs.FITSFixedWarning`,
    `~astropy.io.fits.verify.VerifyWarning` or an invalid-card
    `~astropy.utils.exceptions.AstropyUserWarning`; these are recorded, one
    line each, in ``meta['fits_warnings']`` instead of being shown (every
    other warning passes through). The warning filters are process-wide, so
    threads of one process read exposures one at a time (dask processes
    read in parallel). IRAF TNX and TPV
    distortions are applied by astropy (WCSLIB translates them), so sky
    positions include them.

    Parameters
    ----------
    path_or_nddata : str, `~pathlib.Path` or `~astropy.nddata.NDData`
        A FITS file, or an in-memory image (`~astropy.nddata.NDData` or
        `~astropy.nddata.CCDData`), which is checked the same way and copied,
        not modified.
    hdu : int or str, optional
        HDU index or name of the image. Default: the first HDU with 2-D image
        data (or, with ``plane``, the first with any image data).
    plane : int, optional
        For a 3-D cube, the index of the plane to read (along the first numpy
        axis, FITS NAXIS3). Leading axes of length 1 are dropped without it.
    mask_hdu, weight_hdu, uncertainty_hdu : int, str, `~pathlib.Path` or tuple, optional
        Where the bad-pixel mask (non-zero = bad), the inverse-variance weight
        or the uncertainty image is: an HDU index or name of the same file,
        the path of a separate FITS file (its first image HDU), or a
        ``(path, hdu)`` pair. An uncertainty HDU holds standard deviations
        unless its header's ``UTYPE`` (as written by
        `~astropy.nddata.CCDData`) says ``VarianceUncertainty`` or
        ``InverseVariance``. Give at most one of ``weight_hdu``,
        ``uncertainty_hdu`` and ``variance_hdu``.
    variance_hdu : int, str, `~pathlib.Path` or tuple, optional
        Where a variance image is (as ``weight_hdu``): it becomes a
        `~astropy.nddata.StdDevUncertainty` of ``sqrt(variance)``, with pixels
        of variance <= 0 (or not finite) masked.
    unit : str or `~astropy.units.Unit`, optional
        The data unit. Default: the header's ``BUNIT``; without one the data
        are dimensionless (``meta['unit_source']`` says which).
    require_wcs : bool, optional
        Refuse an image without a celestial WCS (default). With False such an
        image is read with ``wcs=None``, for use with pixel positions and an
        explicit pixel scale.

    Returns
    -------
    exposure : `~astropy.nddata.CCDData`
        ``data`` float64 (ny, nx); ``mask`` bool (ny, nx), True for bad
        pixels (the mask HDU, weight <= 0, non-positive or non-finite
        uncertainty, non-finite data); ``uncertainty`` a
        `~astropy.nddata.StdDevUncertainty` or None; ``wcs`` the 2-D
        celestial `~astropy.wcs.WCS` (with ``pixel_shape`` set) or None;
        ``meta`` a dict with the header's keywords (``meta['SATURATE']``
        ...) and psfdeconv's lower-case entries: ``header`` (the
        `~astropy.io.fits.Header`, with inherited keywords), ``path``, ``hdu``,
        ``plane``, ``inherited_keywords`` (list of str), ``n_nonfinite``,
        ``n_masked``, ``fits_warnings`` (list of str) and
        ``unit_source`` ('argument', 'BUNIT', 'input' or 'assumed'). To write
        the exposure back, use ``CCDData(exposure, meta=exposure.meta['header'])``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        Naming the file and the fix: a missing or non-FITS file, no image HDU,
        a missing extension (with the ones present), a cube without
        ``plane``, no celestial WCS, an empty or constant image, or auxiliary
        images of another shape.
    psfdeconv.exceptions.InvalidPixelsError
        If every pixel is non-finite or masked.
    psfdeconv.exceptions.UnitsError
        For data in magnitudes (BUNIT ``mag``, ``ABmag``, ``dex``, ...) or
        per beam (``Jy/beam``), which cannot become flux per pixel
        (`psfdeconv._units.check_flux_unit`).

    Warns
    -----
    psfdeconv.exceptions.PSFDeconvWarning
        If ``BUNIT`` is not a unit astropy knows (the data are then read as
        dimensionless).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astropy.io import fits
    >>> from astropy.wcs import WCS
    >>> from psfdeconv.io import read_exposure
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    >>> wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [16.5, 16.5]
    >>> wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    >>> data = np.arange(32 * 32, dtype='>i2').reshape(32, 32)
    >>> weight = np.ones((32, 32), dtype=np.float32)
    >>> weight[0, :4] = 0
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'r.fits'
    >>> fits.HDUList([fits.PrimaryHDU(data, header=wcs.to_header()),
    ...               fits.ImageHDU(weight, name='WEIGHT')]).writeto(path)
    >>> exposure = read_exposure(path, weight_hdu='WEIGHT', unit='adu')
    >>> print(exposure.data.dtype, exposure.shape, int(exposure.mask.sum()),
    ...       exposure.unit, exposure.wcs.has_celestial)
    float64 (32, 32) 4 adu True
    """
    from astropy.nddata import NDData

    if isinstance(path_or_nddata, NDData):
        return _exposure_from_nddata(path_or_nddata, plane=plane, mask_hdu=mask_hdu,
                                     weight_hdu=weight_hdu,
                                     uncertainty_hdu=uncertainty_hdu, unit=unit,
                                     require_wcs=require_wcs, variance_hdu=variance_hdu)
    if not isinstance(path_or_nddata, str | os.PathLike):
        raise InvalidInputError(f'cannot read an exposure from a '
                                f'{type(path_or_nddata).__name__}; give the path '
                                f'of a FITS file or an NDData/CCDData.')
    _check_one_noise(weight_hdu, uncertainty_hdu, variance_hdu)
    from astropy.wcs import WCS

    path = Path(path_or_nddata)
    collected = []
    with _header_warnings_into(collected):
        hdulist = _open_fits(path)
    with hdulist:
        with _header_warnings_into(collected):
            if hdu is None:
                found = _image_hdus(hdulist)
                if plane is None:
                    two_d = [i for i, shape in found if len(shape) == 2]
                    index = two_d[0] if two_d else (found[0][0] if found else None)
                else:
                    index = found[0][0] if found else None
                if index is None:
                    raise InvalidInputError(f'{path} has no image data; its HDUs '
                                            f'are {_hdu_names(hdulist)}. Give a '
                                            f'FITS file with a 2-D image.')
            else:
                index = _select_hdu(hdulist, hdu, path, 'image')
            image_hdu = hdulist[index]
            where = f'HDU {index} ({image_hdu.name!r}) of {path}'
            if not image_hdu.is_image or image_hdu.data is None \
                    or image_hdu.data.size == 0:
                raise InvalidInputError(f'{where} holds no image data (shape '
                                        f'{getattr(image_hdu.data, "shape", None)});'
                                        f' give the HDU of the image with hdu=.')
            raw = image_hdu.data
            header = image_hdu.header.copy()
            inherited = []
            if index != 0 and header.get('INHERIT') is True:
                inherited = _inherit_primary(header, hdulist[0].header)
            data = np.array(raw, dtype=np.float64)  # native byte order, a copy
            wcs = WCS(header, fobj=hdulist)
        data = _plane_of(data, plane, where)
        if wcs.naxis > 2 and wcs.has_celestial:
            wcs = wcs.celestial
        wcs = _as_celestial_wcs(wcs, where, require_wcs)

        mask = np.zeros(data.shape, dtype=bool)
        sigma = None
        if mask_hdu is not None:
            values, _, _ = _read_auxiliary(mask_hdu, hdulist, path, data.shape,
                                           plane, 'mask', collected)
            mask |= (values != 0) | ~np.isfinite(values)
        if weight_hdu is not None:
            values, _, _ = _read_auxiliary(weight_hdu, hdulist, path, data.shape,
                                           plane, 'weight', collected)
            sigma, bad = _uncertainty_from('ivar', values)
            mask |= bad
        if uncertainty_hdu is not None:
            values, aux_header, _ = _read_auxiliary(uncertainty_hdu, hdulist, path,
                                                    data.shape, plane,
                                                    'uncertainty', collected)
            utype = str(aux_header.get('UTYPE', 'StdDevUncertainty'))
            kind = {'VarianceUncertainty': 'var',
                    'InverseVariance': 'ivar'}.get(utype, 'std')
            sigma, bad = _uncertainty_from(kind, values)
            mask |= bad
        if variance_hdu is not None:
            values, _, _ = _read_auxiliary(variance_hdu, hdulist, path, data.shape,
                                           plane, 'variance', collected)
            sigma, bad = _uncertainty_from('var', values)
            mask |= bad

    meta = _meta_from_header(header)
    meta.update(header=header, path=str(path), hdu=index, plane=plane,
                inherited_keywords=inherited)
    unit, unit_source = _resolve_unit(unit, header.get('BUNIT'), where, None)
    return _finish_exposure(data, mask, sigma, wcs, unit, meta, where,
                            unit_source=unit_source, fits_warnings=collected)


def _resolve_unit(unit, bunit, where, input_unit):
    """The data unit from the argument, the input NDData or BUNIT (in that
    order), and where it came from; magnitudes and per-beam units are
    refused (`psfdeconv._units.check_flux_unit`)."""
    import astropy.units as u

    from .._units import check_flux_unit, is_magnitude_text

    if unit is not None:
        if isinstance(unit, u.UnitBase | u.FunctionUnitBase):
            resolved = unit
        else:
            try:
                resolved = u.Unit(unit)
            except (ValueError, TypeError):
                if isinstance(unit, str) and is_magnitude_text(unit):
                    check_flux_unit(u.mag, f'{where} (unit = {unit!r})')
                raise InvalidInputError(f'unit = {unit!r} is not a unit astropy '
                                        f'knows; give e.g. "adu", "electron/s" or '
                                        f'"nanomaggy".') from None
        check_flux_unit(resolved, where)
        return resolved, 'argument'
    if input_unit is not None:
        check_flux_unit(input_unit, where)
        return u.Unit(input_unit), 'input'
    if bunit is not None and str(bunit).strip():
        parsed = _parse_unit(str(bunit))
        if parsed is None and is_magnitude_text(bunit):
            check_flux_unit(u.mag, f'{where} (BUNIT = {bunit!r})')
        if parsed is not None:
            check_flux_unit(parsed, f'{where} (BUNIT = {bunit!r})')
            return parsed, 'BUNIT'
        warnings.warn(f'BUNIT = {bunit!r} of {where} is not a unit astropy '
                      f'knows; the data are read as dimensionless. Pass unit= '
                      f'to set the unit.', PSFDeconvWarning, stacklevel=3)
    return u.dimensionless_unscaled, 'assumed'


#: Side of the smallest square of exact zeros `_zero_filled` takes for missing data.
ZERO_BLOCK_SIZE = 3


def _zero_filled(data, mask):
    """The pixels of ``data`` in `ZERO_BLOCK_SIZE` squares of exact zeros, when
    the rest of the image is noisy (many negative pixels) or its sky lies far
    above 0: no data written as 0, which nine noisy pixels never all are. None
    where there are none, or in a noiseless image (a simulation without sky
    noise, whose empty sky is exactly 0)."""
    from scipy import ndimage

    zero = (data == 0) & ~mask
    if zero.sum() < ZERO_BLOCK_SIZE ** 2:
        return None
    blocks = ndimage.binary_opening(zero, np.ones((ZERO_BLOCK_SIZE,) * 2, dtype=bool))
    if not blocks.any():
        return None
    values = data[~mask & ~zero]
    if values.size == 0:
        return None
    values = values[::max(values.size // 200_000, 1)]  # enough for the quantiles
    median = np.median(values)
    sigma = 1.4826 * np.median(np.abs(values - median))
    noisy = np.mean(values < 0) >= 0.01 or (sigma > 0 and median > 5 * sigma)
    return blocks if noisy else None


def _finish_exposure(data, mask, sigma, wcs, unit, meta, where, *, unit_source,
                     fits_warnings, psf=None):
    """Validate the pixels and assemble the CCDData (keeping an NDData's
    ``psf``, which `psfdeconv.psf.build_psfs` uses by default)."""
    from astropy.nddata import CCDData, StdDevUncertainty

    if data.ndim != 2 or data.size == 0:
        raise InvalidInputError(f'{where} has shape {data.shape}; give a '
                                f'non-empty 2-D image.')
    nonfinite = ~np.isfinite(data)
    mask = mask | nonfinite
    zero_filled = _zero_filled(data, mask)
    if zero_filled is not None:
        mask |= zero_filled
        warnings.warn(f'{int(zero_filled.sum())} pixels of {where} lie in blocks of '
                      f'exact zeros in a noisy image: no data written as 0 (a chip gap, '
                      f'beyond a coadd\'s footprint); they are masked, and sources on '
                      f'them flagged MASKED. Give the weight map (--weight, weight_hdu=) '
                      f'or a mask to say so explicitly.', PSFDeconvWarning, stacklevel=3)
    if nonfinite.all():
        raise InvalidPixelsError(f'every pixel of {where} is NaN or infinite; '
                                 f'give an image with data (check hdu= and '
                                 f'plane=).')
    if mask.all():
        raise InvalidPixelsError(f'every pixel of {where} is masked (by the mask, '
                                 f'zero weights or bad uncertainties); check '
                                 f'the mask/weight images.')
    good = data[~mask]
    low, high = float(good.min()), float(good.max())
    if low == high:
        raise InvalidInputError(f'{where} is constant (every unmasked pixel = '
                                f'{low}); it holds no sources. Check that this '
                                f'is the science image (hdu=, plane=).')
    if wcs is not None:
        wcs.pixel_shape = data.shape[::-1]
    meta.update(n_nonfinite=int(nonfinite.sum()), n_masked=int(mask.sum()),
                n_zero_filled=0 if zero_filled is None else int(zero_filled.sum()),
                fits_warnings=list(fits_warnings), unit_source=unit_source)
    uncertainty = None if sigma is None else StdDevUncertainty(sigma, copy=False)
    return CCDData(data, unit=unit, mask=mask, uncertainty=uncertainty, wcs=wcs,
                   meta=meta, psf=psf, copy=False)


def _check_one_noise(weight_hdu, uncertainty_hdu, variance_hdu):
    given = [name for name, value in (('weight_hdu', weight_hdu),
                                      ('uncertainty_hdu', uncertainty_hdu),
                                      ('variance_hdu', variance_hdu))
             if value is not None]
    if len(given) > 1:
        raise InvalidInputError(f'give one of {" and ".join(given)}, not both: they '
                                f'describe the same noise (on the command line, one '
                                f'of --weight and --variance per band).')


def _exposure_from_nddata(nddata, *, plane, mask_hdu, weight_hdu,
                          uncertainty_hdu, unit, require_wcs, variance_hdu=None):
    """`read_exposure` for an in-memory NDData: the same checks, on a copy."""
    from astropy.io import fits
    from astropy.nddata import StdDevUncertainty

    where = f'the input {type(nddata).__name__}'
    _check_one_noise(weight_hdu, uncertainty_hdu, variance_hdu)
    data = nddata.data
    mask = None if nddata.mask is None else np.asarray(nddata.mask)
    if np.ma.isMaskedArray(data):
        extra = np.ma.getmaskarray(data)
        mask = extra if mask is None else (np.asarray(mask, bool) | extra)
        data = np.ma.getdata(data)
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InvalidInputError(f'{where} has data of dtype {data.dtype}; give '
                                f'real numbers.')
    data = _plane_of(np.array(data, dtype=np.float64), plane, where)
    if mask is None:
        mask = np.zeros(data.shape, dtype=bool)
    else:
        mask = _plane_of(np.array(mask, dtype=bool), plane, f'the mask of {where}')
        if mask.shape != data.shape:
            raise InvalidInputError(f'the mask of {where} has shape {mask.shape} '
                                    f'but its data have {data.shape}; give a '
                                    f'mask of the same shape.')
    wcs = nddata.wcs
    low_level = getattr(wcs, 'low_level_wcs', wcs)
    if plane is not None and low_level is not None and \
            getattr(low_level, 'naxis', 2) > 2 and getattr(low_level, 'has_celestial', False):
        wcs = low_level.celestial
    wcs = _as_celestial_wcs(wcs, where, require_wcs)

    sigma = None
    if nddata.uncertainty is not None:
        try:
            std = nddata.uncertainty.represent_as(StdDevUncertainty)
        except (TypeError, ValueError, AttributeError):
            raise InvalidInputError(
                f'the uncertainty of {where} is a '
                f'{type(nddata.uncertainty).__name__}, which cannot be converted '
                f'to standard deviations; give a StdDevUncertainty, '
                f'VarianceUncertainty or InverseVariance.') from None
        values = _plane_of(np.array(std.array, dtype=np.float64), plane,
                           f'the uncertainty of {where}')
        if values.shape != data.shape:
            raise InvalidInputError(f'the uncertainty of {where} has shape '
                                    f'{values.shape} but its data have '
                                    f'{data.shape}.')
        sigma, bad = _uncertainty_from('std', values)
        mask |= bad
    collected = []
    for spec, role in ((mask_hdu, 'mask'), (weight_hdu, 'weight'),
                       (uncertainty_hdu, 'uncertainty'), (variance_hdu, 'variance')):
        if spec is None:
            continue
        values, aux_header, _ = _read_auxiliary(spec, None, where, data.shape,
                                                plane, role, collected)
        if role == 'mask':
            mask |= (values != 0) | ~np.isfinite(values)
            continue
        kind = 'ivar' if role == 'weight' else 'var' if role == 'variance' else {
            'VarianceUncertainty': 'var', 'InverseVariance': 'ivar'}.get(
                str(aux_header.get('UTYPE', 'StdDevUncertainty')), 'std')
        sigma, bad = _uncertainty_from(kind, values)
        mask |= bad

    source_meta = nddata.meta or {}
    if isinstance(source_meta, fits.Header):
        header = source_meta.copy()
        meta = _meta_from_header(header)
        meta['header'] = header
    else:
        meta = {key: value for key, value in dict(source_meta).items()}
        header = meta.get('header') if isinstance(meta.get('header'), fits.Header) \
            else None
    meta.update(path=meta.get('path'), hdu=meta.get('hdu'), plane=plane)
    bunit = header.get('BUNIT') if header is not None else meta.get('BUNIT')
    input_unit = nddata.unit
    unit, unit_source = _resolve_unit(unit, bunit, where, input_unit)
    return _finish_exposure(data, mask, sigma, wcs, unit, meta, where,
                            unit_source=unit_source,
                            fits_warnings=list(meta.get('fits_warnings', [])) + collected,
                            psf=getattr(nddata, 'psf', None))


def pixel_scale_of(wcs, *, position=None):
    """The pixel scale of a celestial WCS in arcsec per pixel.

    Without ``position`` this is the geometric mean of the two axes' scales
    from `astropy.wcs.utils.proj_plane_pixel_scales`: the linear part of the
    WCS (CD or CDELT x PC) at the reference pixel, without distortion terms.
    With ``position`` it is measured locally, at that pixel, from the full
    WCS (TPV, SIP or TNX distortions included) with one-pixel central
    differences. The two differ by up to about one percent on distorted wide
    field cameras (e.g. the CTIO Mosaic2 TPV file of the test data).

    Parameters
    ----------
    wcs : `~astropy.wcs.WCS`
        A WCS with celestial axes.
    position : tuple of float, optional
        (x, y), 0-based pixels, at which to measure the local scale.

    Returns
    -------
    pixel_scale : `~astropy.units.Quantity`
        arcsec / pix.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the WCS has no celestial axes or a singular or non-finite scale.

    Warns
    -----
    psfdeconv.exceptions.PSFDeconvWarning
        If the two axes' scales differ by more than 1 percent: the pixels are
        not square and one number describes them only approximately.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> from psfdeconv.io import pixel_scale_of
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    >>> wcs.wcs.cdelt = [-0.262 / 3600, 0.262 / 3600]
    >>> print(pixel_scale_of(wcs).round(4))
    0.262 arcsec / pix
    >>> print(pixel_scale_of(wcs, position=(100.0, 50.0)).round(4))
    0.262 arcsec / pix
    """
    import astropy.units as u
    from astropy.wcs.utils import proj_plane_pixel_scales

    wcs = _as_celestial_wcs(wcs, 'the given WCS', True)
    if position is None:
        scales = proj_plane_pixel_scales(wcs) * 3600.0
    else:
        try:
            x, y = (float(v) for v in position)
        except (TypeError, ValueError):
            raise InvalidInputError(f'position = {position!r}; give (x, y) in '
                                    f'pixels.') from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InvalidInputError(f'position = {position!r}; give finite (x, y) '
                                    f'pixels.')
        step_x = wcs.pixel_to_world([x - 0.5, x + 0.5], [y, y])
        step_y = wcs.pixel_to_world([x, x], [y - 0.5, y + 0.5])
        scales = np.array([step_x[0].separation(step_x[1]).arcsec,
                           step_y[0].separation(step_y[1]).arcsec])
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise InvalidInputError(f'the WCS gives pixel scales {scales.tolist()} '
                                f'arcsec; they must be positive and finite (is '
                                f'the position inside the projection?).')
    ratio = float(scales.max() / scales.min())
    if ratio - 1 > _SQUARE_PIXEL_TOLERANCE:
        warnings.warn(f'the WCS pixel scales differ by {100 * (ratio - 1):.2f} '
                      f'percent ({scales[0]:.5f} and {scales[1]:.5f} arcsec); '
                      f'using their geometric mean {np.sqrt(scales.prod()):.5f} '
                      f'arcsec/pixel.', PSFDeconvWarning, stacklevel=2)
    return float(np.sqrt(scales.prod())) * u.arcsec / u.pix


def read_exposure_set(exposures, *, require_wcs=True):
    """Read the bands of one exposure set.

    Parameters
    ----------
    exposures : mapping of str to str, `~pathlib.Path` or `~astropy.nddata.NDData`
        Band name (a column-name suffix) to the band's exposure, each read
        with `read_exposure`.
    require_wcs : bool, optional
        As for `read_exposure`: False reads exposures without a celestial
        WCS (their ``wcs`` is None).

    Returns
    -------
    read : dict
        Band name to `~astropy.nddata.CCDData`, in the mapping's order.
    paths : dict
        Band name to the input path (None for an NDData not read from a file).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For an empty mapping, band names that are not distinct identifiers,
        or an exposure `read_exposure` refuses.
    """
    from astropy.nddata import NDData

    if not hasattr(exposures, 'items') or not exposures:
        raise InvalidInputError(f'exposures must be a non-empty mapping of band '
                                f'name to a FITS path or NDData, e.g. {{"g": '
                                f'"g.fits", "r": "r.fits"}}; got '
                                f'{type(exposures).__name__}.')
    bands = [str(band) for band in exposures]
    if len(set(bands)) != len(bands) or not all(is_band_name(b) for b in bands):
        raise InvalidInputError(f'band names {bands} must be distinct identifiers '
                                f'(ASCII letters, digits, underscores): they become '
                                f'column names such as flux_<band>.')
    read, paths = {}, {}
    for band, exposure in exposures.items():
        try:
            read[str(band)] = read_exposure(exposure, require_wcs=require_wcs)
        except UnitsError as error:
            raise UnitsError(f'band {band!r}: {error}') from error
        # An exposure read by read_exposure knows its file.
        paths[str(band)] = (dict(exposure.meta or {}).get('path')
                            if isinstance(exposure, NDData) else str(exposure))
    return read, paths
