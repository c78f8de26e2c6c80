# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Stamps from exposures: cutouts, band alignment and PSF resampling.

`make_cutouts` cuts square stamps around sources of one exposure (one
band), the stamps and WCS `~astropy.nddata.Cutout2D` makes in ``'partial'``
mode, so that a source near the edge keeps its stamp (padded with zeros,
masked, flagged) instead of being dropped. The mask and the uncertainty are
cut with the same slices as the data.

**Centre convention.** The deconvolution expects a source on the stamp's
pixel ``(size // 2, size // 2)`` (numpy ``[row, column]``, 0-based), up to
its sub-pixel offset; the PSF is centred on its own middle pixel
(`~psfdeconv.deconvolve.validate_stamps`, `~psfdeconv.psf.render_psf`).
A source at exposure pixel ``(x, y)`` gets the stamp whose pixel
``(size // 2, size // 2)`` is the exposure pixel nearest to it,
``(floor(x + 0.5), floor(y + 0.5))``: its offset from that pixel is in
``[-0.5, 0.5)`` on each axis, and a source at integer coordinates lands
exactly on it. `~astropy.nddata.Cutout2D` itself does not do this for even
sizes: it places the stamp's lower edge at ``ceil(x - size / 2)``, which
for ``size = 64`` puts a source at ``x = 50.1`` on stamp pixel 31.1 (an
offset of -0.9 from pixel 32) but one at ``x = 50.0`` on pixel 32.
`make_cutouts` therefore cuts the stamp Cutout2D cuts at the nearest integer
pixel, for which its rounding is exact for even and odd sizes alike, and
reports the sources' true positions separately.

**Flags** (bits of the ``flags`` array of `make_cutouts`):

* `~psfdeconv.flags.FLAG_EDGE` (1): the stamp reaches beyond the image; the pixels outside
  are 0 and masked.
* `~psfdeconv.flags.FLAG_MASKED` (2): the stamp has masked pixels inside the image (the
  exposure's mask, NaN/inf data, or a non-positive or non-finite
  uncertainty).
* `~psfdeconv.flags.FLAG_OFF_IMAGE` (4): the source's centre is off the image (outside
  ``-0.5 <= x < nx - 0.5``, ``-0.5 <= y < ny - 0.5``); its stamp is all 0
  and all masked. ``FLAG_EDGE`` is set too.

**Band alignment.** Cut each band at the object's sky position in its own
exposure where the bands share a pixel grid; where they do not,
`align_bands` reprojects each band onto a reference band's grid with
``reproject.reproject_adaptive`` (the anti-aliased algorithm of DeForest
2004), and `resample_psf` pushes the same resampling through that band's
PSF image, so that the PSF stays the PSF of the resampled image.
Resampling convolves with the resampling kernel: the PSF of a reprojected
band is a little wider than in its own pixels (less with the 'hann' kernel
used by default onto finer grids than with reproject's anti-aliasing
'gaussian' kernel), and `resample_psf` includes that widening.
The planes of a band (data, mask, uncertainty) are resampled together with
one pixel mapping, in strips of rows run in threads (`reproject_region`);
each output pixel depends only on its own position, so any region -- a
stamp -- equals the same pixels of the whole-frame reprojection. The
whole frame is reprojected because the neighbour segmentation of the
pipeline (`psfdeconv.detection.neighbour_segments`) combines every band's
full frame on the reference grid. Grids that differ only by a shift give
every pixel the same weights: those are read from reproject once and
applied as a small convolution.
"""

import numpy as np

from ._cpus import cpu_share
from ._validation import scalar_pixel_scale
from .exceptions import InvalidInputError, InvalidPSFError
from .flags import FLAG_EDGE, FLAG_MASKED, FLAG_OFF_IMAGE

__all__ = [
    'make_cutouts',
    'align_bands',
    'resample_psf',
    'align_to_reference',
    'reproject_region',
]

#: The resampling kernels of ``reproject.reproject_adaptive``.
_KERNELS = ('gaussian', 'hann')


def _default_kernel(from_scale, to_scale):
    """The resampling kernel used when none is given.

    'hann' onto a grid as fine as the band's own or finer: it widens the PSF
    least, and there is nothing to alias. 'gaussian' (reproject's own
    default, the strongest anti-aliasing) onto a coarser grid.
    """
    return 'hann' if to_scale <= from_scale * (1 + 1e-6) else 'gaussian'


def _check_kernel(kernel):
    if kernel is not None and kernel not in _KERNELS:
        raise InvalidInputError(f"kernel = {kernel!r}; give 'gaussian', 'hann' or "
                                f"None (chosen from the pixel scales).")
    return kernel


# --- Input helpers ---------------------------------------------------------------

def _exposure_parts(exposure):
    """(float64 data, bool mask, std-dev array or None, WCS or None) of an
    NDData or array, without copying more than needed. Non-finite data are
    added to the mask; non-positive or non-finite uncertainties too."""
    from astropy.nddata import StdDevUncertainty

    if isinstance(exposure, np.ndarray):
        data, mask, uncertainty, wcs = exposure, None, None, None
    elif hasattr(exposure, 'data') and hasattr(exposure, 'wcs'):
        data, mask = exposure.data, getattr(exposure, 'mask', None)
        uncertainty, wcs = getattr(exposure, 'uncertainty', None), exposure.wcs
    else:
        raise InvalidInputError(f'exposure is a {type(exposure).__name__}; give an '
                                f'NDData/CCDData (e.g. from '
                                f'psfdeconv.io.read_exposure) or a 2-D array.')
    if np.ma.isMaskedArray(data):
        extra = np.ma.getmaskarray(data)
        mask = extra if mask is None else np.asarray(mask, bool) | extra
        data = np.ma.getdata(data)
    data = np.asarray(data)
    if data.ndim != 2 or data.size == 0:
        raise InvalidInputError(f'the exposure has shape {data.shape}; give one '
                                f'non-empty 2-D image.')
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InvalidInputError(f'the exposure has data of dtype {data.dtype}; '
                                f'give real numbers.')
    data = np.asarray(data, dtype=np.float64)
    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise InvalidInputError(f'the exposure mask has shape {mask.shape} but '
                                    f'its data have {data.shape}.')
        bad = bad | mask
    sigma = None
    if uncertainty is not None:
        try:
            sigma = np.asarray(uncertainty.represent_as(StdDevUncertainty).array,
                               dtype=np.float64)
        except (TypeError, ValueError, AttributeError):
            raise InvalidInputError(
                f'the exposure uncertainty is a {type(uncertainty).__name__}, '
                f'which cannot be converted to standard deviations; give a '
                f'StdDevUncertainty, VarianceUncertainty or '
                f'InverseVariance.') from None
        if sigma.shape != data.shape:
            raise InvalidInputError(f'the exposure uncertainty has shape '
                                    f'{sigma.shape} but its data have '
                                    f'{data.shape}.')
        with np.errstate(invalid='ignore'):
            bad = bad | ~np.isfinite(sigma) | (sigma <= 0)
    wcs = getattr(wcs, 'low_level_wcs', wcs)
    if wcs is not None:
        from astropy.wcs import WCS

        if not isinstance(wcs, WCS) or not wcs.has_celestial:
            raise InvalidInputError('the exposure WCS must be a celestial '
                                    'astropy.wcs.WCS (or None with pixel '
                                    'positions); read the file with '
                                    'psfdeconv.io.read_exposure.')
        if wcs.naxis > 2:
            wcs = wcs.celestial
    return data, bad, sigma, wcs


def _positions_in_pixels(positions, wcs):
    """(x, y) float64 arrays, 0-based pixels, from a SkyCoord or (n, 2) array."""
    from astropy.coordinates import SkyCoord

    if isinstance(positions, SkyCoord):
        if wcs is None:
            raise InvalidInputError('positions are sky coordinates but the '
                                    'exposure has no celestial WCS; give (x, y) '
                                    'pixel positions instead, or an exposure '
                                    'with a WCS.')
        from astropy.wcs.utils import skycoord_to_pixel

        sky = positions.reshape(-1) if not positions.isscalar else positions.reshape(1)
        # mode='all' includes distortions (SIP, TPV, TNX), as Cutout2D does.
        x, y = skycoord_to_pixel(sky, wcs, origin=0, mode='all')
        return np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    try:
        array = np.array(positions, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f'positions of type {type(positions).__name__} '
                                f'cannot be read; give a SkyCoord or an (n, 2) '
                                f'array of (x, y) pixels.') from None
    if array.ndim == 1 and array.shape == (2,):
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f'pixel positions must have shape (n, 2) for '
                                f'(x, y), got {array.shape}.')
    return array[:, 0].copy(), array[:, 1].copy()


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 2:
        raise InvalidInputError(f'size = {size!r}; give the stamp side as an '
                                f'integer number of pixels >= 2 (e.g. 64).')
    return int(size)


def _shifted_wcs(wcs, origin_x, origin_y, size):
    """The WCS of a cutout whose pixel (0, 0) is exposure pixel
    (origin_x, origin_y): what `~astropy.nddata.Cutout2D` builds (which
    also refuses stamps that do not overlap the image)."""
    from astropy.wcs import Sip

    shifted = wcs.deepcopy()
    shifted.wcs.crpix -= (origin_x, origin_y)
    shifted.array_shape = (size, size)
    if wcs.sip is not None:
        shifted.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp,
                          wcs.sip.crpix - (origin_x, origin_y))
    return shifted


def _without_class_cache(wcs):
    """A copy of a WCS without astropy's cache of its world coordinate classes
    (built again when next needed). Every stamp's WCS is a deep copy of it
    (`_shifted_wcs`), and once the exposure's WCS has converted pixels to
    sky coordinates that cache costs several times the rest of the copy."""
    clean = wcs.deepcopy()
    clean.__dict__.pop('_components_and_classes_cache', None)
    return clean


def _footprint_text(shape, wcs):
    ny, nx = shape
    text = (f'the {nx}x{ny} image covers -0.5 <= x < {nx - 0.5}, -0.5 <= y < '
            f'{ny - 0.5}')
    if wcs is not None:
        corners = wcs.calc_footprint(axes=(nx, ny))
        low, high = corners.min(axis=0), corners.max(axis=0)
        names = [name.split('-')[0] or 'lon/lat' for name in wcs.wcs.ctype]
        text += (f' and {names[0]} {low[0]:.5f}..{high[0]:.5f} deg, {names[1]} '
                 f'{low[1]:.5f}..{high[1]:.5f} deg')
    return text


# --- Cutouts ---------------------------------------------------------------------

def make_cutouts(exposure, positions, *, size=64, stamp_wcs=True):
    """Square stamps around sources of one exposure.

    Each stamp is the cutout `~astropy.nddata.Cutout2D` makes (``mode='partial'``,
    ``fill_value=0``) at the exposure pixel nearest to the source, so that the
    source lands on stamp pixel ``(size // 2, size // 2)`` up to its
    sub-pixel offset (see the module docstring for why the position is
    rounded first), with its WCS; the data, the mask and the uncertainty are
    cut by slicing the exposure's arrays over the stamp's overlap with the
    image (a Cutout2D object per stamp took twice as long). Edge sources
    are padded and flagged, never dropped; sources off the image get an
    empty, masked stamp.

    Parameters
    ----------
    exposure : `~astropy.nddata.NDData`, `~astropy.nddata.CCDData` or `~numpy.ndarray`
        One band of one exposure (e.g. from `psfdeconv.io.read_exposure`),
        (ny, nx). Its ``mask`` (True = bad), ``uncertainty`` and celestial
        ``wcs`` are used when present.
    positions : `~astropy.coordinates.SkyCoord` or array-like
        The sources: sky coordinates (needs the WCS; converted with
        distortions included), or an (n, 2) array of (x, y) pixels, 0-based
        (pixel centres at integers, as photutils and astropy).
    size : int, optional
        Side of the stamps in pixels.
    stamp_wcs : bool, optional
        Make each stamp's WCS (the ``wcs`` list); False leaves it None, for
        callers that need only the pixels (faster).

    Returns
    -------
    cutouts : dict
        ``data``: float64 (n, size, size), 0 off the image and at NaN/inf
        pixels; ``mask``: bool (n, size, size), True off the image and at
        masked, NaN/inf or bad-uncertainty pixels; ``uncertainty``: float64
        (n, size, size) standard deviations, ``inf`` where masked, or None
        if the exposure has none; ``flags``: int32 (n,) bitmask of
        `~psfdeconv.flags.FLAG_EDGE`, `~psfdeconv.flags.FLAG_MASKED` and
        `~psfdeconv.flags.FLAG_OFF_IMAGE`; ``x``, ``y``:
        float64 (n,) the positions in the exposure (pixels);
        ``x_stamp``, ``y_stamp``: float64 (n,) the positions in the stamps;
        ``origin``: int64 (n, 2) the (x, y) exposure pixel of each stamp's
        pixel (0, 0); ``wcs``: list of n `~astropy.wcs.WCS` (None without
        an exposure WCS or with ``stamp_wcs=False``); ``size``: the stamp side.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If there are no positions, every position is off the image (the
        message gives the count and the image's footprint), sky positions are
        given without a WCS, or the inputs have the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import NDData
    >>> from psfdeconv.cutouts import make_cutouts
    >>> from psfdeconv.flags import FLAG_EDGE
    >>> image = np.zeros((100, 120))
    >>> image[40, 50] = 1.0
    >>> stamps = make_cutouts(NDData(image), [(50, 40), (118.2, 3.0)], size=32)
    >>> print(stamps['data'].shape, stamps['data'][0, 16, 16],
    ...       stamps['flags'].tolist(), stamps['origin'][0].tolist())
    (2, 32, 32) 1.0 [0, 1] [34, 24]
    >>> print(int(stamps['mask'][1].sum()), bool(stamps['flags'][1] & FLAG_EDGE))
    682 True
    """
    size = _check_size(size)
    data, bad, sigma, wcs = _exposure_parts(exposure)
    x, y = _positions_in_pixels(positions, wcs)
    if wcs is not None and stamp_wcs:
        wcs = _without_class_cache(wcs)
    n = x.size
    if n == 0:
        raise InvalidInputError('no positions given; give at least one source '
                                'position.')
    ny, nx = data.shape
    finite = np.isfinite(x) & np.isfinite(y)
    # The nearest pixel, rounding halves up; it becomes stamp pixel size // 2.
    centre_x = np.where(finite, np.floor(np.where(finite, x, 0) + 0.5), 0).astype(np.int64)
    centre_y = np.where(finite, np.floor(np.where(finite, y, 0) + 0.5), 0).astype(np.int64)
    off_image = ~finite | (centre_x < 0) | (centre_x >= nx) | (centre_y < 0) | \
        (centre_y >= ny)
    if off_image.all():
        raise InvalidInputError(
            f'all {n} position(s) are off the image ({_footprint_text(data.shape, wcs)}'
            f'); check that the positions belong to this exposure (and this '
            f'band), and their frame and units.')

    half = size // 2
    origin = np.stack([centre_x - half, centre_y - half], axis=1)
    stamps = np.zeros((n, size, size))
    masks = np.ones((n, size, size), dtype=bool)
    sigmas = None if sigma is None else np.full((n, size, size), np.inf)
    flags = np.zeros(n, dtype=np.int32)
    flags[off_image] = FLAG_OFF_IMAGE | FLAG_EDGE
    # Each stamp's overlap with the image: exposure pixels [low, high) per axis.
    low_x, low_y = np.maximum(origin, 0).T
    high_x = np.minimum(origin[:, 0] + size, nx)
    high_y = np.minimum(origin[:, 1] + size, ny)
    for i in np.flatnonzero(~off_image):
        ox, oy = int(origin[i, 0]), int(origin[i, 1])
        outside = (slice(int(low_y[i]), int(high_y[i])), slice(int(low_x[i]), int(high_x[i])))
        inside = (slice(int(low_y[i]) - oy, int(high_y[i]) - oy),
                  slice(int(low_x[i]) - ox, int(high_x[i]) - ox))
        stamp_bad = masks[i]
        stamp_bad[inside] = bad[outside]
        stamps[i][inside] = data[outside]
        stamps[i][stamp_bad] = 0.0  # off the image and NaN/inf pixels
        if sigmas is not None:
            sigmas[i][inside] = sigma[outside]
            sigmas[i][stamp_bad] = np.inf
        if stamp_bad[inside].any():
            flags[i] |= FLAG_MASKED
    partial = (low_x > origin[:, 0]) | (low_y > origin[:, 1]) | \
        (high_x < origin[:, 0] + size) | (high_y < origin[:, 1] + size)
    flags[partial & ~off_image] |= FLAG_EDGE
    wcs_list = [None] * n if wcs is None or not stamp_wcs else \
        [_shifted_wcs(wcs, int(ox), int(oy), size) for ox, oy in origin]
    return {
        'data': stamps,
        'mask': masks,
        'uncertainty': sigmas,
        'flags': flags,
        'x': x,
        'y': y,
        'x_stamp': x - origin[:, 0],
        'y_stamp': y - origin[:, 1],
        'origin': origin,
        'wcs': wcs_list,
        'size': size,
    }


# --- Band alignment ----------------------------------------------------------------

def _local_jacobian(wcs, x, y, frame_centre):
    """2x2 matrix of tangent-plane offsets (arcsec, east and north at
    ``frame_centre``) per pixel step along x (column 0) and y (column 1) at
    pixel (x, y), from the full WCS."""
    points = wcs.pixel_to_world([x - 0.5, x + 0.5, x, x], [y, y, y - 0.5, y + 0.5])
    points = points.transform_to(frame_centre.frame)
    east, north = frame_centre.spherical_offsets_to(points)
    east, north = east.to_value('arcsec'), north.to_value('arcsec')
    return np.array([[east[1] - east[0], east[3] - east[2]],
                     [north[1] - north[0], north[3] - north[2]]])


def _is_surface_brightness(unit):
    """Whether a unit is per solid angle (`psfdeconv._units.is_surface_brightness`)."""
    from ._units import is_surface_brightness

    return is_surface_brightness(unit)


def align_bands(exposures, *, reference, kernel=None, mask_threshold=0.5,
                conserve_flux=None):
    """Reproject every band onto the pixel grid of a reference band.

    Each other band is resampled with ``reproject.reproject_adaptive``
    onto the reference's WCS and shape. With ``conserve_flux=True`` the
    pixel values are treated as flux per pixel: reproject multiplies by the
    local ratio of output to input pixel area (the Jacobian determinant of
    the mapping), so that the total flux of a source is unchanged and each
    reprojected pixel holds the flux per *reference* pixel (a band with
    1.5 times coarser pixels has its pixel values multiplied by about
    1/1.5**2). With ``conserve_flux=False`` the values are treated as a
    surface brightness and only interpolated; that is the default for
    data in units per solid angle (e.g. MJy/sr).

    The mask is resampled as a float with the same kernel: a reprojected
    pixel is masked where more than ``mask_threshold`` of its weight comes
    from masked (or NaN/inf) input pixels, or where the input does not cover
    it (NaN in reproject's output, footprint 0). Masked input pixels enter the
    data as 0. The uncertainty is resampled like the data; this ignores the
    noise correlation that resampling introduces, so the per-pixel
    uncertainties of a reprojected band are approximate.

    Parameters
    ----------
    exposures : mapping of str to `~astropy.nddata.NDData`
        Band name to exposure, each with a celestial WCS.
    reference : str
        The band whose grid the others are resampled onto (usually the one
        with the finest pixels or the best seeing). It is copied unchanged.
    kernel : {'gaussian', 'hann'}, optional
        reproject's resampling kernel ('gaussian', reproject's default,
        anti-aliases best; 'hann' widens the PSF less). Default, per band:
        'hann' when the reference pixels are as small as the band's or
        smaller, else 'gaussian' (recorded in ``meta['kernel']``; give the
        same to `resample_psf`, which makes the same default choice).
    mask_threshold : float, optional
        Fraction of masked input weight above which an output pixel is
        masked.
    conserve_flux : bool, optional
        See above. Default: True unless the band's unit is per solid angle.

    Returns
    -------
    aligned : dict of str to `~astropy.nddata.CCDData`
        The bands on the reference grid, float64, NaN where the band does not
        cover the reference (and masked there). ``meta`` holds the input's
        meta plus ``pixel_area_ratio``, ``pixel_scale`` (the band's own, arcsec
        per pixel, at the reference centre), ``reference_pixel_scale``,
        ``rotation`` (degrees: the band's +x axis seen from the reference
        grid, counter-clockwise), ``parity_flip`` (the band is mirrored
        relative to the reference: reverse the x axis of its PSF,
        ``psf[:, ::-1]``, before `resample_psf`; ``rotation`` is then that of
        the mirrored grid), ``kernel``, ``conserve_flux`` and
        ``reprojected``.
    pixel_area_ratio : dict of str to float
        Per band, the area of a reference pixel over the area of the band's
        pixel, on the sky, at the reference image's centre (1.0 for the
        reference). With ``conserve_flux=True`` the reprojection has already
        multiplied the band's pixel values by (the local value of) this ratio.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``reference`` is not a band, a band has no celestial WCS, or a band
        does not overlap the reference.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import CCDData
    >>> from astropy.wcs import WCS
    >>> from psfdeconv.cutouts import align_bands
    >>> def tan_wcs(scale, n):
    ...     wcs = WCS(naxis=2)
    ...     wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    ...     wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [(n + 1) / 2, (n + 1) / 2]
    ...     wcs.wcs.cdelt = [-scale / 3600, scale / 3600]
    ...     return wcs
    >>> yy, xx = np.mgrid[:31, :31]
    >>> coarse = 100 * np.exp(-((xx - 15) ** 2 + (yy - 15) ** 2) / 8) / (8 * np.pi)
    >>> bands = {'r': CCDData(np.zeros((45, 45)), unit='adu', wcs=tan_wcs(0.2, 45)),
    ...          'i': CCDData(coarse, unit='adu', wcs=tan_wcs(0.3, 31))}
    >>> aligned, ratio = align_bands(bands, reference='r')
    >>> print(aligned['i'].shape, round(ratio['i'], 4),
    ...       round(float(np.nansum(aligned['i'].data))))
    (45, 45) 0.4444 100
    """
    import astropy.units as u
    from astropy.nddata import CCDData, NDData, StdDevUncertainty

    if not hasattr(exposures, 'items') or not exposures:
        raise InvalidInputError('exposures must be a non-empty mapping of band '
                                'name to NDData, e.g. {"g": g, "r": r}.')
    if reference not in exposures:
        raise InvalidInputError(f'reference = {reference!r} is not one of the bands '
                                f'{list(exposures)}; give one of them.')
    if not 0 <= mask_threshold < 1:
        raise InvalidInputError(f'mask_threshold = {mask_threshold}; give a '
                                f'fraction in [0, 1).')
    _check_kernel(kernel)
    parts = {}
    for band, exposure in exposures.items():
        if not isinstance(exposure, NDData):
            raise InvalidInputError(f'band {band!r} is a {type(exposure).__name__}; '
                                    f'give an NDData/CCDData with a WCS.')
        parts[band] = _exposure_parts(exposure)
        if parts[band][3] is None:
            raise InvalidInputError(f'band {band!r} has no celestial WCS; align_bands '
                                    f'needs one per band (see '
                                    f'psfdeconv.io.read_exposure).')
    ref_data, ref_bad, ref_sigma, ref_wcs = parts[reference]
    shape = ref_data.shape
    cx, cy = (shape[1] - 1) / 2, (shape[0] - 1) / 2
    centre = ref_wcs.pixel_to_world(cx, cy)
    ref_jacobian = _local_jacobian(ref_wcs, cx, cy, centre)
    ref_area = abs(np.linalg.det(ref_jacobian))
    ref_scale = float(np.sqrt(ref_area))

    aligned, ratios = {}, {}
    for band, exposure in exposures.items():
        data, bad, sigma, wcs = parts[band]
        meta = dict(exposure.meta or {})
        unit = getattr(exposure, 'unit', None)
        if unit is None:
            unit = u.dimensionless_unscaled
        if band == reference:
            meta.update(pixel_area_ratio=1.0, pixel_scale=ref_scale,
                        reference_pixel_scale=ref_scale, rotation=0.0,
                        parity_flip=False, kernel=None, conserve_flux=None,
                        reprojected=False)
            aligned[band] = CCDData(
                data.copy(), unit=unit, mask=bad.copy(), wcs=wcs.deepcopy(), meta=meta,
                uncertainty=None if sigma is None else StdDevUncertainty(sigma.copy()))
            ratios[band] = 1.0
            continue
        flux_mode = (not _is_surface_brightness(unit)) if conserve_flux is None \
            else bool(conserve_flux)
        with np.errstate(invalid='ignore'):
            bx, by = (float(v) for v in wcs.world_to_pixel(centre))
        if not (np.isfinite(bx) and np.isfinite(by)):
            # The reference centre is outside this band's projection (the
            # overlap check below then fails): measure at the band's centre.
            bx, by = (data.shape[1] - 1) / 2, (data.shape[0] - 1) / 2
        jacobian = _local_jacobian(wcs, bx, by, centre)
        area = abs(np.linalg.det(jacobian))
        band_kernel = kernel or _default_kernel(np.sqrt(area), ref_scale)
        # Band pixel offsets -> reference pixel offsets.
        transform = np.linalg.solve(ref_jacobian, jacobian)
        parity_flip = bool(np.linalg.det(transform) < 0)
        if parity_flip:  # the rotation of the band grid with its x axis reversed
            transform = transform @ np.diag([-1.0, 1.0])
        rotation = float(np.degrees(np.arctan2(transform[1, 0] - transform[0, 1],
                                               transform[0, 0] + transform[1, 1])))
        new_data, new_bad, new_sigma = _reproject_band(
            data, bad, sigma, wcs, ref_wcs, shape, conserve_flux=flux_mode,
            kernel=band_kernel, mask_threshold=mask_threshold)
        if not np.isfinite(new_data).any():
            raise InvalidInputError(
                f'band {band!r} does not overlap the reference band '
                f'{reference!r} ({_footprint_text(data.shape, wcs)}); give '
                f'exposures of the same field.')
        uncertainty = None if new_sigma is None else StdDevUncertainty(new_sigma)
        ratio = float(ref_area / area)
        meta.update(pixel_area_ratio=ratio, pixel_scale=float(np.sqrt(area)),
                    reference_pixel_scale=ref_scale, rotation=rotation,
                    parity_flip=parity_flip, kernel=band_kernel,
                    conserve_flux=flux_mode, reprojected=True)
        aligned[band] = CCDData(new_data, unit=unit, mask=new_bad, uncertainty=uncertainty,
                                wcs=ref_wcs.deepcopy(), meta=meta, copy=False)
        ratios[band] = ratio
    return aligned, ratios


#: Output rows per call of ``reproject_adaptive`` in `reproject_region`'s
#: strips: each output pixel's value depends only on its own position, so the
#: strips give the whole-frame result exactly, with a fraction of its
#: temporaries, and can run in parallel (reproject's kernel releases the GIL).
_STRIP_ROWS = 256
#: Most threads `reproject_region` uses.
_MAX_THREADS = 4
#: Largest departure (pixels) of two grids' pixel mapping from the shift of
#: their CRPIX on the frame's corners for `_pixel_shift` to take it as one.
_SHIFT_TOLERANCE = 1e-6
#: Half side of the unit impulse `_shift_taps` resamples: room for
#: reproject's widest kernel (its Gaussian samples 2 output pixels around).
_PROBE_HALF = 8
#: Rows per block of `_shifted_region`'s weighted sums.
_SHIFT_BLOCK_ROWS = 32
#: Band pixels added to the taps' reach before a reference pixel counts as
#: well inside the band in `_shifted_region`.
_SHIFT_MARGIN = 2


def _threads():
    """Threads for the reprojection strips: ``OMP_NUM_THREADS`` where set
    (the batch runner's workers set it to their share of the CPUs), else the
    CPUs this process may use, at most `_MAX_THREADS`."""
    return max(1, min(cpu_share(), _MAX_THREADS))


def _tan_only(wcs):
    """Whether a WCS is a plain TAN projection (no SIP, TPV, lookup-table or
    other distortion): pixel -> sky -> pixel then inverts exactly, and
    reproject's round-trip check of the mapping can never reject a pixel."""
    ctype = [str(value).upper() for value in wcs.wcs.ctype]
    return (len(ctype) == 2 and all(value[4:] in ('-TAN', 'TAN') for value in ctype)
            and not wcs.has_distortion and not len(wcs.wcs.get_pv()))


def _pixel_shift(wcs, reference_wcs, origin, shape):
    """``(sx, sy)`` where every reference pixel (x, y) is band pixel
    (x + sx, y + sy) -- two plain TAN grids with the same tangent point,
    axes, scale and orientation, differing only in ``CRPIX`` -- else None.

    The sky position of a pixel is then one function of its offset from
    ``CRPIX`` in both grids, so the shift is exact everywhere; it is also
    checked on the corners and the centre of the region ``origin``, ``shape``
    of the reference grid."""
    from astropy.wcs.utils import pixel_to_pixel

    if not (_tan_only(wcs) and _tan_only(reference_wcs)):
        return None
    a, b = wcs.wcs, reference_wcs.wcs
    a.set()  # fills the defaults (units, poles) that are compared
    b.set()
    same = (list(a.ctype) == list(b.ctype) and list(a.cunit) == list(b.cunit)
            and np.array_equal(a.crval, b.crval)
            and np.array_equal(wcs.pixel_scale_matrix, reference_wcs.pixel_scale_matrix)
            and a.lonpole == b.lonpole and a.latpole == b.latpole
            and a.radesys == b.radesys and np.array_equal(a.equinox, b.equinox,
                                                           equal_nan=True))
    if not same:
        return None
    sx, sy = (float(value) for value in a.crpix - b.crpix)
    (ox, oy), (ny, nx) = origin, shape
    x = ox + np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
    y = oy + np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    bx, by = pixel_to_pixel(reference_wcs, wcs, x, y)
    if not (np.abs(bx - x - sx).max() < _SHIFT_TOLERANCE
            and np.abs(by - y - sy).max() < _SHIFT_TOLERANCE):
        return None
    return sx, sy


def _shift_taps(planes_shape, wcs, reference_wcs, shift, *, conserve_flux, kernel):
    """The weights ``reproject_adaptive`` gives the band pixels around each
    reference pixel when the grids differ by the shift of `_pixel_shift`:
    ``[(dy, dx, weight), ...]``, reference pixel (x, y) taking
    ``weight * band[y + dy, x + dx]``. With a constant Jacobian the weights
    are the same at every pixel; they are read off reproject's own
    resampling of a unit impulse near the middle of the band, so they hold
    its kernel, normalisation and flux factor. None if that response is not
    enclosed by zeros (a kernel wider than the probe)."""
    half = _PROBE_HALF
    side = 2 * half + 1
    ny, nx = planes_shape[-2:]
    cx, cy = nx // 2, ny // 2
    # The reference pixel nearest to band pixel (cx, cy).
    px, py = int(np.floor(cx - shift[0] + 0.5)), int(np.floor(cy - shift[1] + 0.5))
    impulse = np.zeros((1, side, side))
    impulse[0, half, half] = 1.0
    response = _adaptive_region(
        impulse, _offset_wcs(wcs, cx - half, cy - half, (side, side)), reference_wcs,
        (px - half, py - half), (side, side), conserve_flux=conserve_flux,
        kernel=kernel, threads=1)[0]
    inner = np.zeros(response.shape, dtype=bool)
    inner[2:-2, 2:-2] = True
    hit = np.isfinite(response) & (response != 0)
    if not hit.any() or (hit & ~inner).any() or not np.isfinite(response[inner]).all():
        return None
    ky, kx = np.nonzero(hit)
    return [(int(cy - (py - half + k)), int(cx - (px - half + j)), float(response[k, j]))
            for k, j in zip(ky, kx, strict=True)]


def _shifted_region(planes, wcs, reference_wcs, shift, origin, shape, *, conserve_flux,
                    kernel, threads):
    """`reproject_region` for grids that differ by a shift (`_pixel_shift`),
    or None where `_shift_taps` has no taps. Reference pixels whose every
    sample lies well inside the band are the taps' weighted sums of band
    pixels; those near the band's edges are reprojected as usual; those
    farther outside it are not covered (NaN)."""
    taps = _shift_taps(planes.shape, wcs, reference_wcs, shift, conserve_flux=conserve_flux,
                       kernel=kernel)
    if taps is None:
        return None
    k = planes.shape[0]
    ny_band, nx_band = planes.shape[-2:]
    ox, oy = (int(value) for value in origin)
    ny, nx = (int(value) for value in shape)
    # How far (band pixels) a reference pixel's samples reach from its
    # position in the band, with a margin for reproject's sampling region.
    reach = max(max(abs(dx - shift[0]), abs(dy - shift[1])) for dy, dx, _ in taps)
    reach = int(np.ceil(reach)) + _SHIFT_MARGIN

    def spans(offset, n_band, n):
        """Region indices [start, stop) whose band positions are at least
        ``reach`` inside the band (inner), and within ``reach`` of it
        (covered)."""
        position = np.arange(n) + offset
        inner = np.flatnonzero((position >= reach) & (position <= n_band - 1 - reach))
        covered = np.flatnonzero((position >= -reach) & (position <= n_band - 1 + reach))
        return tuple((int(index[0]), int(index[-1]) + 1) if index.size else (0, 0)
                     for index in (inner, covered))

    (x0, x1), (cx0, cx1) = spans(ox + shift[0], nx_band, nx)
    (y0, y1), (cy0, cy1) = spans(oy + shift[1], ny_band, ny)
    out = np.full((k, ny, nx), np.nan)
    if x1 > x0 and y1 > y0:
        # In blocks of rows that stay in the cache through all the taps.
        term = np.empty((k, min(_SHIFT_BLOCK_ROWS, y1 - y0), x1 - x0))
        for start in range(y0, y1, _SHIFT_BLOCK_ROWS):
            rows = min(_SHIFT_BLOCK_ROWS, y1 - start)
            block = out[:, start:start + rows, x0:x1]
            block[...] = 0.0
            for dy, dx, weight in taps:
                by, bx = oy + start + dy, ox + x0 + dx
                np.multiply(planes[:, by:by + rows, bx:bx + (x1 - x0)], weight,
                            out=term[:, :rows])
                block += term[:, :rows]
        del term
    else:
        y0 = y1 = cy0
        x0 = x1 = cx0
    # The rim between the inner and the covered rectangles, reprojected.
    rims = [(cy0, y0, cx0, cx1), (y1, cy1, cx0, cx1), (y0, y1, cx0, x0), (y0, y1, x1, cx1)]
    for r0, r1, c0, c1 in rims:
        if r1 > r0 and c1 > c0:
            out[:, r0:r1, c0:c1] = _adaptive_region(
                planes, wcs, reference_wcs, (ox + c0, oy + r0), (r1 - r0, c1 - c0),
                conserve_flux=conserve_flux, kernel=kernel, threads=threads)
    return out


def _offset_wcs(wcs, origin_x, origin_y, shape):
    """The WCS of the region of ``shape`` (ny, nx) whose pixel (0, 0) is
    pixel (origin_x, origin_y) of ``wcs`` (`_shifted_wcs` for rectangles)."""
    shifted = _shifted_wcs(wcs, origin_x, origin_y, 1)
    shifted.array_shape = tuple(int(n) for n in shape)
    return shifted


def reproject_region(planes, wcs, reference_wcs, origin, shape, *, conserve_flux,
                     kernel, threads=None):
    """``reproject_adaptive`` of image planes onto a region of a reference grid.

    The planes share one pixel grid and are resampled together: the pixel
    mapping (the costly part) is computed once for all of them. The region is
    the reference grid's pixels ``origin[0] <= x < origin[0] + shape[1]``,
    ``origin[1] <= y < origin[1] + shape[0]``; its values equal those of the
    reprojection of the whole reference grid at the same pixels (each
    output pixel depends only on its own position), so a cut-out region and
    the whole frame agree (to the rounding of the mapping, about 1e-8 of
    the values where a distortion is evaluated on arrays of other lengths).
    It is done in strips of 256 rows, in ``threads`` threads (default:
    ``OMP_NUM_THREADS`` or the CPUs, at most 4). Plain TAN grids skip
    reproject's round trip of the mapping, which cannot fail for them.

    Two plain TAN grids that differ only by a shift (the same tangent point,
    scale and orientation, another ``CRPIX``: bands cut from one projection
    at other places) map every pixel alike, so with the 'hann' kernel (the
    default between equal pixels) reproject gives every pixel the same
    weights. They are read once from reproject's resampling of a unit
    impulse, and the pixels whose samples lie inside the planes are those
    weights' sums of the planes' pixels: reproject's values to the rounding of
    its mapping (about 1e-9 of the values), an order of magnitude faster.
    Pixels near the planes' edges are reprojected as above.

    Parameters
    ----------
    planes : `~numpy.ndarray`
        (k, my, mx) float64 planes on the grid of ``wcs``.
    wcs, reference_wcs : `~astropy.wcs.WCS`
        Celestial WCSs of the planes and of the reference grid.
    origin : tuple of int
        (x, y) reference pixel of the region's pixel (0, 0).
    shape : tuple of int
        (ny, nx) of the region.
    conserve_flux : bool
        As for ``reproject_adaptive``.
    kernel : {'gaussian', 'hann'}
        As for ``reproject_adaptive``.
    threads : int, optional
        Number of threads.

    Returns
    -------
    `~numpy.ndarray`
        (k, ny, nx) float64, NaN where the planes do not cover the region.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> from reproject import reproject_adaptive
    >>> from psfdeconv.cutouts import reproject_region
    >>> def tan_wcs(crpix):
    ...     wcs = WCS(naxis=2)
    ...     wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    ...     wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], crpix
    ...     wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    ...     return wcs
    >>> planes = np.random.default_rng(0).normal(size=(2, 80, 90))
    >>> band, reference = tan_wcs([45.3, 40.2]), tan_wcs([45.0, 40.0])
    >>> reference.wcs.cdelt = [-0.15 / 3600, 0.15 / 3600]
    >>> whole = reproject_adaptive((planes, band), reference, shape_out=(2, 80, 90),
    ...                            kernel='hann', return_footprint=False)
    >>> region = reproject_region(planes, band, reference, (20, 30), (16, 16),
    ...                           conserve_flux=False, kernel='hann')
    >>> bool(np.array_equal(region, whole[:, 30:46, 20:36]))
    True

    Grids that differ by a shift:

    >>> shifted = tan_wcs([45.0, 40.0])
    >>> whole = reproject_adaptive((planes, band), shifted, shape_out=(2, 80, 90),
    ...                            kernel='hann', return_footprint=False)
    >>> fast = reproject_region(planes, band, shifted, (0, 0), (80, 90),
    ...                         conserve_flux=False, kernel='hann')
    >>> bool(np.allclose(fast, whole, rtol=0, atol=1e-8, equal_nan=True))
    True
    """
    threads = _threads() if threads is None else max(1, int(threads))
    # Only the Hann window: the Gaussian's sampling region can end on a
    # pixel centre, which the mapping's rounding then takes in or leaves
    # out from pixel to pixel, so its weights are not the same everywhere.
    shift = _pixel_shift(wcs, reference_wcs, origin, shape) if kernel == 'hann' else None
    if shift is not None:
        out = _shifted_region(planes, wcs, reference_wcs, shift, origin, shape,
                              conserve_flux=conserve_flux, kernel=kernel, threads=threads)
        if out is not None:
            return out
    return _adaptive_region(planes, wcs, reference_wcs, origin, shape,
                            conserve_flux=conserve_flux, kernel=kernel, threads=threads)


def _adaptive_region(planes, wcs, reference_wcs, origin, shape, *, conserve_flux, kernel,
                     threads):
    """`reproject_region` by ``reproject_adaptive``, in strips of rows."""
    from reproject import reproject_adaptive

    ox, oy = (int(value) for value in origin)
    ny, nx = (int(value) for value in shape)
    k = planes.shape[0]
    roundtrip = not (_tan_only(wcs) and _tan_only(reference_wcs))
    out = np.empty((k, ny, nx))

    starts = range(0, ny, _STRIP_ROWS)
    threaded = threads > 1 and len(starts) > 1
    # An astropy WCS is not safe to share between threads: concurrent
    # all_world2pix calls on one SIP WCS corrupt each other's iterations
    # (NoConvergence, then values off by up to 10 %). Each strip gets its own
    # copies, made here in the calling thread.
    strip_wcs = {
        start: (wcs.deepcopy() if threaded else wcs,
                _offset_wcs(reference_wcs, ox, oy + start, (min(_STRIP_ROWS, ny - start), nx)))
        for start in starts}

    def strip(start):
        rows = min(_STRIP_ROWS, ny - start)
        band_wcs, region_wcs = strip_wcs[start]
        out[:, start:start + rows] = reproject_adaptive(
            (planes, band_wcs), region_wcs, shape_out=(k, rows, nx),
            conserve_flux=conserve_flux, kernel=kernel, roundtrip_coords=roundtrip,
            return_footprint=False)

    if not threaded:
        for start in starts:
            strip(start)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(strip, starts))
    return out


def _reproject_band(data, bad, sigma, wcs, ref_wcs, shape, *, conserve_flux, kernel,
                    mask_threshold):
    """One band of `align_bands` on the reference grid: (data, mask,
    standard deviations or None)."""
    k = 3 if sigma is None else 4
    planes = np.empty((k,) + data.shape)
    np.copyto(planes[0], data)
    planes[0][bad] = 0.0
    planes[1] = bad
    planes[2] = 1.0
    if sigma is not None:
        np.copyto(planes[3], sigma)
        planes[3][bad] = 0.0
    result = reproject_region(planes, wcs, ref_wcs, (0, 0), shape,
                              conserve_flux=conserve_flux, kernel=kernel)
    del planes
    covered = np.all(np.isfinite(result), axis=0)
    # The reprojected plane of ones is the local Jacobian factor that
    # conserve_flux applied (1 without it): dividing by it turns the
    # reprojected mask back into a fraction.
    with np.errstate(invalid='ignore', divide='ignore'):
        mask_fraction = result[1] / result[2]
    new_bad = ~covered | ~(mask_fraction <= mask_threshold)
    del mask_fraction
    # Copies, so that the mask and ones planes are freed with the result.
    new_data = np.where(covered, result[0], np.nan)
    new_sigma = None if sigma is None else np.where(new_bad, np.inf, result[3])
    return new_data, new_bad, new_sigma


def resample_psf(psf_array, *, from_scale, to_scale, rotation=0.0, size=None,
                 kernel=None):
    """Push a band's resampling onto the reference grid through its PSF image.

    The PSF image, sampled on the band's pixels (``from_scale``), is given a
    TAN WCS centred on its middle pixel and reprojected with
    ``reproject.reproject_adaptive`` (``conserve_flux=True``, the same
    ``kernel`` as `align_bands`) onto an odd grid of ``to_scale`` pixels
    centred on the same point, then normalised to unit sum. It is therefore
    the PSF of the reprojected band: a point source resampled by
    `align_bands` has this profile, including the slight widening by the
    resampling kernel. Wings beyond the input image are taken as 0.

    Parameters
    ----------
    psf_array : `~numpy.ndarray`
        (py, px) with odd sides, centred on its middle pixel, in the band's
        pixels (e.g. from `psfdeconv.psf.render_psf`).
    from_scale, to_scale : float or `~astropy.units.Quantity`
        Pixel scales of the band and of the reference grid (arcsec/pixel).
    rotation : float, optional
        Angle in degrees, counter-clockwise, of the band's +x pixel axis on
        the reference grid (``meta['rotation']`` of `align_bands`).
    size : int, optional
        Odd side of the output. Default: the smallest odd size covering the
        input's extent.
    kernel : {'gaussian', 'hann'}, optional
        The resampling kernel of `align_bands` (its ``meta['kernel']``).
        Default: the same choice as `align_bands` makes, 'hann' unless
        ``to_scale`` is larger than ``from_scale``.

    Returns
    -------
    psf : `~numpy.ndarray`
        float64 (size, size), odd, centred on ``[size // 2, size // 2]``,
        summing to 1.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        If the PSF is not 2-D with odd sides or has a non-positive or
        non-finite sum, or ``size`` is not odd.
    psfdeconv.exceptions.PixelScaleError
        If a pixel scale is not positive and finite.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.cutouts import resample_psf
    >>> yy, xx = np.mgrid[-12:13, -12:13]
    >>> psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * 2.0 ** 2))
    >>> fine = resample_psf(psf, from_scale=0.3, to_scale=0.2)
    >>> print(fine.shape, round(float(fine.sum()), 6),
    ...       np.unravel_index(np.argmax(fine), fine.shape))
    (37, 37) 1.0 (np.int64(18), np.int64(18))
    """
    from astropy.wcs import WCS
    from reproject import reproject_adaptive

    psf = np.asarray(psf_array, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise InvalidPSFError(f'psf_array must be 2-D with odd sides, got shape '
                              f'{psf.shape}; pad or crop it to an odd size.')
    total = float(psf.sum())
    if not np.isfinite(total) or total <= 0:
        raise InvalidPSFError(f'psf_array sums to {total}; a PSF must have a '
                              f'positive, finite sum.')
    from_scale = scalar_pixel_scale(from_scale, 'from_scale')
    to_scale = scalar_pixel_scale(to_scale, 'to_scale')
    rotation = float(rotation)
    if not np.isfinite(rotation):
        raise InvalidInputError(f'rotation = {rotation}; give an angle in '
                                f'degrees.')
    kernel = _check_kernel(kernel) or _default_kernel(from_scale, to_scale)
    if size is None:
        half = int(np.ceil((max(psf.shape) // 2) * from_scale / to_scale))
        size = 2 * half + 1
    elif isinstance(size, bool) or not isinstance(size, int | np.integer) \
            or size < 3 or size % 2 == 0:
        raise InvalidPSFError(f'size = {size!r}; the PSF size must be an odd '
                              f'integer >= 3.')
    size = int(size)

    def tan(scale, shape, angle):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
        wcs.wcs.crval = [180.0, 0.0]
        wcs.wcs.crpix = [shape[1] // 2 + 1, shape[0] // 2 + 1]  # the middle pixel
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        # East to the left (-x), north up; the band grid rotated by `angle`.
        wcs.wcs.cd = (scale / 3600.0) * np.array([[-1.0, 0.0], [0.0, 1.0]]) @ \
            np.array([[c, -s], [s, c]])
        wcs.array_shape = shape
        return wcs

    resampled = reproject_adaptive(
        (psf / total, tan(from_scale, psf.shape, rotation)),
        tan(to_scale, (size, size), 0.0), shape_out=(size, size),
        conserve_flux=True, kernel=kernel, boundary_mode='constant',
        boundary_fill_value=0.0, return_footprint=False)
    resampled = np.nan_to_num(np.asarray(resampled, dtype=np.float64), nan=0.0)
    out_total = float(resampled.sum())
    if not np.isfinite(out_total) or out_total <= 0:
        raise InvalidPSFError(f'the resampled PSF sums to {out_total}; the '
                              f'input PSF is too small for to_scale = '
                              f'{to_scale} arcsec (give a larger size).')
    return resampled / out_total


#: Largest difference (pixels) between two bands' pixel coordinates of the
#: same sky positions for the bands to count as sharing a pixel grid.
_SAME_GRID_TOLERANCE = 1e-3


def _same_grid(wcs, shape, reference_wcs, reference_shape):
    """Whether an exposure shares the reference band's pixel grid."""
    if tuple(shape) != tuple(reference_shape):
        return False
    ny, nx = reference_shape
    x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
    y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    with np.errstate(invalid='ignore'):
        bx, by = wcs.world_to_pixel(reference_wcs.pixel_to_world(x, y))
    offset = np.hypot(np.asarray(bx) - x, np.asarray(by) - y)
    return bool(np.all(np.isfinite(offset)) and
                offset.max() <= _SAME_GRID_TOLERANCE)


def align_to_reference(exposures, reference_band):
    """Every band on the reference band's pixel grid.

    Bands that share the grid are returned unchanged, the others
    reprojected with `align_bands`.

    Parameters
    ----------
    exposures : dict
        Band name to `~astropy.nddata.CCDData` with a celestial WCS.
    reference_band : str
        One of the band names.

    Returns
    -------
    aligned : dict
        Band name to the exposure on the reference grid.
    reprojected : dict
        Band name to whether it was reprojected.
    """
    reference = exposures[reference_band]
    differing = [band for band, exposure in exposures.items()
                 if band != reference_band and not _same_grid(
                     exposure.wcs, exposure.shape, reference.wcs, reference.shape)]
    aligned = dict(exposures)
    if differing:
        subset = {reference_band: reference}
        subset.update({band: exposures[band] for band in differing})
        result, _ = align_bands(subset, reference=reference_band)
        for band in differing:
            aligned[band] = result[band]
    return aligned, {band: band in differing for band in exposures}


# --- Block-averaged grids (galaxies larger than a stamp) ----------------------------


def block_wcs(wcs, factor):
    """The celestial WCS of an image block-summed by ``factor`` (as
    `~astropy.nddata.block_reduce`, trimmed at the far end): coarse pixel
    ``j`` covers native pixels ``factor * j ... factor * j + factor - 1``.

    `astropy.wcs.WCS.slice` with a step scales CDELT but not a CD matrix,
    so the WCS is rebuilt here: CRPIX moves to the coarse grid, CD (or
    CDELT) grows by ``factor``, SIP coefficients are rescaled; TPV-style
    PV distortions act on intermediate world coordinates and stay as they
    are. None gives None.
    """
    if wcs is None:
        return None
    coarse = wcs.deepcopy()
    k = float(factor)
    coarse.wcs.crpix = (np.asarray(wcs.wcs.crpix) - (k + 1) / 2) / k + 1
    if wcs.wcs.has_cd():
        coarse.wcs.cd = np.asarray(wcs.wcs.cd) * k
    else:
        coarse.wcs.cdelt = np.asarray(wcs.wcs.cdelt) * k
    if wcs.sip is not None:
        from astropy.wcs import Sip

        def scaled(matrix):
            if matrix is None:
                return None
            p, q = np.indices(matrix.shape)
            return matrix * k ** (p + q - 1)

        sip = wcs.sip
        coarse.sip = Sip(scaled(sip.a), scaled(sip.b), scaled(sip.ap), scaled(sip.bp),
                         coarse.wcs.crpix)
    if wcs.pixel_shape is not None:
        coarse.pixel_shape = tuple(int(n // factor) for n in wcs.pixel_shape)
    coarse.wcs.set()
    return coarse


def block_reduce_exposure(exposure, factor):
    """An exposure block-summed by an integer ``factor`` (coarser pixels).

    The data of each ``factor`` x ``factor`` block are summed over its good
    pixels and scaled up by the block's area over their number (so a flux
    stays a flux); a block is masked when more than half its pixels are bad.
    Variances add the same way. The far rows and columns that do not fill a
    block are dropped (`~astropy.nddata.block_reduce`).

    Parameters
    ----------
    exposure : `~astropy.nddata.NDData`
        One band (``data``, optional ``mask``, `~astropy.nddata.StdDevUncertainty`
        and celestial ``wcs``).
    factor : int
        Block side in pixels, >= 1.

    Returns
    -------
    `~astropy.nddata.CCDData`
        The coarse exposure with `block_wcs`, the same unit and meta (plus
        ``block_factor``).

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import NDData
    >>> from psfdeconv.cutouts import block_reduce_exposure
    >>> image = np.ones((5, 6))
    >>> coarse = block_reduce_exposure(NDData(image), 2)
    >>> coarse.data.shape, float(coarse.data[0, 0])
    ((2, 3), 4.0)
    """
    from astropy.nddata import CCDData, StdDevUncertainty, block_reduce

    factor = int(factor)
    data, bad, sigma, wcs = _exposure_parts(exposure)
    good = ~bad & np.isfinite(data)
    n_good = block_reduce(good.astype(float), factor, np.sum)
    scale = np.where(n_good > 0, factor * factor / np.maximum(n_good, 1), 0.0)
    coarse = block_reduce(np.where(good, data, 0.0), factor, np.sum) * scale
    coarse_bad = n_good <= factor * factor / 2
    uncertainty = None
    if sigma is not None:
        variance = block_reduce(np.where(good & np.isfinite(sigma), sigma, 0.0) ** 2,
                                factor, np.sum) * scale
        uncertainty = StdDevUncertainty(np.where(coarse_bad, np.inf, np.sqrt(variance)))
    meta = dict(getattr(exposure, 'meta', None) or {})
    meta['block_factor'] = factor
    unit = getattr(exposure, 'unit', None) or 'adu'
    return CCDData(np.where(coarse_bad, 0.0, coarse), mask=coarse_bad,
                   uncertainty=uncertainty, wcs=block_wcs(wcs, factor), unit=unit,
                   meta=meta)


def block_psfs(native_psfs, factor):
    """PSF images block-summed like `block_reduce_exposure`'s data.

    Parameters
    ----------
    native_psfs : `~numpy.ndarray`
        (..., m, m) native-pixel PSFs centred on their middle pixel, with
        ``m = factor * size`` for an odd ``factor`` and
        ``m = factor * size + 1`` for an even one (as `block_psf_size`
        gives), ``size`` odd.
    factor : int
        Block side in pixels.

    Returns
    -------
    `~numpy.ndarray`
        (..., size, size), centred on the middle pixel, each summing to 1:
        the PSF of a source at the centre of a coarse pixel.
    """
    from astropy.nddata import block_reduce
    from scipy import ndimage

    psfs = np.asarray(native_psfs, dtype=float)
    factor = int(factor)
    m = psfs.shape[-1]
    if factor % 2 == 0:
        # The coarse pixel's centre lies on a corner of native pixels: move
        # the PSF by half a native pixel towards the origin, drop the last
        # row and column, and the middle block is centred on it.
        shift = [0.0] * (psfs.ndim - 2) + [-0.5, -0.5]
        psfs = ndimage.shift(psfs, shift, order=3, mode='constant')[..., :m - 1, :m - 1]
    block = (1,) * (psfs.ndim - 2) + (factor, factor)
    coarse = block_reduce(psfs, block, np.sum)
    total = coarse.sum(axis=(-2, -1), keepdims=True)
    return coarse / np.where(total > 0, total, 1.0)


def block_psf_size(size, factor):
    """The native PSF side `block_psfs` needs for coarse PSFs of side ``size``."""
    return int(factor) * int(size) + (1 if int(factor) % 2 == 0 else 0)
