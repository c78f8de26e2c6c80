# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The sky background of an exposure.

`estimate_background` gives a `~photutils.background.Background2D` mesh
(or global sigma-clipped statistics on small images, `clipped_stats`) and its rms, for the
star selection of `psfdeconv.psf`, the detection of `psfdeconv.detection`
and the background subtraction of the pipeline (`subtract_background`).

Those three stages estimate the same first mesh of the same band;
within `shared_estimates` (the pipeline's set-up) it is computed once per
image and shared, also with another process through a directory.
"""

import contextlib
import contextvars
import functools
import hashlib
import os
import tempfile

import numpy as np

__all__ = ['BACKGROUND_BOX', 'SOURCE_MASK_DILATION', 'clipped_stats',
           'estimate_background', 'mesh_image', 'shared_estimates', 'subtract_background',
           'quantization_step', 'dequantize_exposure']


#: Box size of the 2-D background mesh (pixels).
BACKGROUND_BOX = 64
#: Dilation (pixels, a square footprint) of the source mask of
#: `estimate_background` with ``mask_sources=True``.
SOURCE_MASK_DILATION = 21

#: Inside `shared_estimates` (None outside): the fingerprint of (image, mask)
#: -> first estimate, and the directory shared with other processes (or
#: None). A context variable, so that threads (the batch runner's) never
#: share one another's.
_SHARED = contextvars.ContextVar('psfdeconv_shared_backgrounds', default=None)


@contextlib.contextmanager
def shared_estimates(directory=None):
    """Share `estimate_background`'s first estimate of an image in a block.

    The ePSF (`psfdeconv.psf.build_epsf`), the detection
    (`psfdeconv.detection.detect_galaxies`) and `subtract_background` each
    begin with the same `~photutils.background.Background2D` mesh of the
    same band. Inside this block it is computed once per distinct (image,
    mask) -- recognised by a hash of their bytes, so a changed image
    (e.g. converted to another unit) gets its own -- and the shared mesh is
    read-only. The results are those computed without the block; the
    estimates are dropped when it ends. Blocks may nest (the outer one
    holds them).

    With ``directory``, each first estimate is also written there (its mesh,
    a small file named by the fingerprint, written atomically), and an
    estimate not yet made in this process is read from there if another
    process wrote it: `psfdeconv.pipeline.run_exposure_set` and the helper
    process that builds its ePSFs share the meshes of the bands that way.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.background import estimate_background, shared_estimates
    >>> image = np.random.default_rng(0).normal(10.0, 1.0, (256, 256))
    >>> bad = np.zeros(image.shape, dtype=bool)
    >>> with shared_estimates():
    ...     first, _ = estimate_background(image, bad)
    ...     again, _ = estimate_background(image.copy(), bad)
    >>> again is first
    True
    """
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set(({}, None if directory is None else str(directory)))
    try:
        yield
    finally:
        _SHARED.reset(token)


def _fingerprint(image, mask):
    """Exact identity of an (image, mask) pair: shapes, dtypes and a hash of
    the bytes (about 0.1 s for a 3072 x 3072 band, against seconds for a
    mesh)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for array in (image, mask):
        array = np.ascontiguousarray(array)
        digest.update(f'{array.shape}{array.dtype.str}'.encode())
        digest.update(array.data)
    return digest.hexdigest()


def clipped_stats(data, mask=None, *, sigma=3.0, maxiters=5):
    """Mean, median and standard deviation of the values of ``data`` that
    survive iterative sigma clipping about the median.

    The statistics of `astropy.stats.sigma_clipped_stats` with its defaults
    (``cenfunc='median'``, ``stdfunc='std'``) and ``sigma`` (to the rounding of
    their sums), from one sort of the values: each iteration keeps the values
    within ``sigma`` standard deviations of the median, which in the sorted
    values is a slice narrowing with every iteration, found by bisection.
    astropy copies and filters the whole frame in each iteration: 0.7-0.8 s
    against 0.18 s per 3k x 3k band (``benchmarks/bench_setup_parts.py``).

    Parameters
    ----------
    data : array-like
        The values (any shape).
    mask : array-like of bool, optional
        True for values to ignore; non-finite values are ignored too.
    sigma : float, optional
        Clipping limit, in standard deviations, on both sides.
    maxiters : int, optional
        Most clipping iterations (fewer where one clips nothing).

    Returns
    -------
    mean, median, std : float
        NaN if no value is left to measure.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.stats import sigma_clipped_stats
    >>> from psfdeconv.background import clipped_stats
    >>> values = np.random.default_rng(1).normal(10.0, 2.0, 100_000)
    >>> values[:500] = 1e4  # outliers
    >>> ours, astropy = clipped_stats(values), sigma_clipped_stats(values)
    >>> bool(np.allclose(ours, astropy, rtol=1e-12, atol=0))
    True
    """
    values = np.asarray(data, dtype=np.float64)
    keep = np.isfinite(values)
    if mask is not None:
        keep &= ~np.asarray(mask, dtype=bool)
    values = np.sort(values[keep], axis=None)
    if not values.size:
        return np.nan, np.nan, np.nan

    def median(part):
        return 0.5 * (part[(part.size - 1) // 2] + part[part.size // 2])

    low, high = 0, values.size
    for _ in range(int(maxiters)):
        part = values[low:high]
        centre, spread = median(part), part.std()
        # astropy keeps centre - sigma std <= value <= centre + sigma std.
        new_low = low + int(np.searchsorted(part, centre - sigma * spread, side='left'))
        new_high = low + int(np.searchsorted(part, centre + sigma * spread, side='right'))
        if (new_low, new_high) == (low, high):
            break
        low, high = new_low, new_high
    part = values[low:high]
    return float(part.mean()), float(median(part)), float(part.std())


def estimate_background(image, mask, *, mask_sources=False):
    """Background map (or scalar) and the scalar background rms.

    A `~photutils.background.Background2D` mesh of `BACKGROUND_BOX`-pixel boxes where the
    image holds at least two boxes per axis, else (or if the mesh fails)
    global sigma-clipped statistics. With ``mask_sources`` the estimate is
    repeated with the sources masked (detected at 2 sigma over the first
    estimate, dilated by `SOURCE_MASK_DILATION` pixels): sigma clipping
    alone leaves the faint wings of galaxies in the sky, which then takes a
    few per cent of their flux. Inside `shared_estimates` the first
    estimate of an image is computed once and shared (read-only).

    Parameters
    ----------
    image : `~numpy.ndarray`
        2-D float image, masked pixels set to 0 (as
        ``psfdeconv._validation.as_image_and_mask`` returns it).
    mask : `~numpy.ndarray`
        bool, same shape; True for pixels to ignore.
    mask_sources : bool, optional
        Estimate again with the sources masked.

    Returns
    -------
    background : `~numpy.ndarray` or float
        The mesh (the image's shape) or the global median.
    rms : float
        The background rms (median of the mesh's rms).
    """
    from astropy.stats import SigmaClip

    def estimate(mask, exclude_percentile):
        """(mesh or the global median, rms)."""
        if min(image.shape) >= 2 * BACKGROUND_BOX:
            from photutils.background import Background2D

            try:
                bkg = Background2D(image, BACKGROUND_BOX, mask=mask,
                                   sigma_clip=SigmaClip(sigma=3.0),
                                   exclude_percentile=exclude_percentile)
                return (np.asarray(bkg.background_mesh, dtype=np.float64),
                        float(bkg.background_rms_median))
            except ValueError:
                pass  # e.g. every box clipped away: use global statistics
        _, median, std = clipped_stats(image, mask, sigma=3.0)
        return median, std

    def expanded(estimate):
        background, rms = estimate
        if isinstance(background, np.ndarray):
            background = mesh_image(background, BACKGROUND_BOX, image.shape)
        return background, rms

    shared, directory = _SHARED.get() or (None, None)
    key = None if shared is None else _fingerprint(image, mask)
    if key is not None and key in shared:
        background, rms = shared[key]
    else:
        first = None if directory is None else _read_estimate(directory, key)
        if first is None:
            first = estimate(mask, 10.0)
            if directory is not None:
                _write_estimate(directory, key, first)
        background, rms = expanded(first)
        if key is not None:
            if isinstance(background, np.ndarray):
                # Shared by several callers: none may change it.
                background.setflags(write=False)
            shared[key] = (background, rms)
    if not mask_sources or not rms > 0:
        return background, rms
    from ._segments import segments_above

    segments = segments_above(np.where(mask, 0.0, image - background), 2.0 * rms, 5,
                              mask=mask)
    if segments is None:
        return background, rms
    sources = segments.make_source_mask(size=SOURCE_MASK_DILATION)
    # Boxes are mostly masked around bright galaxies: keep those with half
    # their pixels free rather than 90 %.
    return expanded(estimate(mask | sources, 50.0))


def _estimate_path(directory, key):
    return os.path.join(directory, f'background-{key}.npy')


def _write_estimate(directory, key, estimate):
    """Write a first estimate (mesh or median, rms) for other processes:
    into a temporary file renamed into place, so a reader finds a whole file
    or none. A directory that cannot be written only loses the sharing."""
    background, rms = estimate
    values = np.append(np.ravel(background), rms)
    shape = np.shape(background)
    try:
        handle, temporary = tempfile.mkstemp(dir=directory, suffix='.tmp')
    except OSError:
        return
    try:
        with os.fdopen(handle, 'wb') as stream:
            np.save(stream, np.concatenate([[len(shape)], shape, values]).astype(np.float64))
        os.replace(temporary, _estimate_path(directory, key))
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _read_estimate(directory, key):
    """The first estimate another process wrote (`_write_estimate`), or None."""
    try:
        values = np.load(_estimate_path(directory, key))
        ndim = int(values[0])
        shape = tuple(int(n) for n in values[1:1 + ndim])
        background = values[1 + ndim:-1]
        if values.ndim != 1 or ndim not in (0, 2) or background.size != int(np.prod(shape)):
            return None
    except (OSError, ValueError, IndexError):
        return None
    return (background.reshape(shape) if ndim else float(background[0])), float(values[-1])


def mesh_image(mesh, box_size, shape):
    """The full-resolution image of a background mesh, as the ``background``
    of `~photutils.background.Background2D` gives it: its cubic-spline zoom
    by ``box_size`` (`scipy.ndimage.zoom`, ``mode='reflect'``,
    ``grid_mode=True``), cropped to ``shape`` and clipped to the range of the
    mesh.

    The zoom is separable, so it is computed as two matrix products with the
    zoom of each unit vector along each axis: the same image to the rounding
    of the last bit, for a fraction of the cost of zooming the whole frame.

    Parameters
    ----------
    mesh : `~numpy.ndarray`
        (my, mx) mesh values (``Background2D.background_mesh``).
    box_size : int
        Side of a mesh box in pixels.
    shape : tuple of int
        (ny, nx) of the image, at most ``box_size`` times the mesh's.

    Returns
    -------
    `~numpy.ndarray`
        (ny, nx) float64.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the mesh is not 2-D or covers fewer pixels than ``shape``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.ndimage import zoom
    >>> from psfdeconv.background import mesh_image
    >>> mesh = np.random.default_rng(1).normal(size=(4, 5))
    >>> image = mesh_image(mesh, 8, (30, 37))
    >>> direct = zoom(mesh, 8, order=3, mode='reflect', grid_mode=True)[:30, :37]
    >>> bool(np.allclose(image, np.clip(direct, mesh.min(), mesh.max()),
    ...                  rtol=0, atol=1e-12))
    True
    """
    mesh = np.asarray(mesh, dtype=np.float64)
    covered = tuple(int(n) * int(box_size) for n in mesh.shape)
    if (mesh.ndim != 2 or len(shape) != 2
            or any(n > m for n, m in zip(shape, covered, strict=True))):
        from .exceptions import InvalidInputError

        raise InvalidInputError(f'a mesh of shape {mesh.shape} with boxes of {box_size} '
                                f'pixels covers {covered} pixels, not shape = '
                                f'{tuple(shape)}; give the mesh of that image.')
    low, high = float(mesh.min()), float(mesh.max())
    if low == high:
        return np.full(shape, low)
    rows = _zoom_matrix(mesh.shape[0], int(box_size))[:shape[0]]
    columns = _zoom_matrix(mesh.shape[1], int(box_size))[:shape[1]]
    image = (rows @ mesh) @ columns.T
    return np.clip(image, low, high, out=image)


@functools.lru_cache(maxsize=16)
def _zoom_matrix(n, factor):
    """(n * factor, n) matrix of the 1-D cubic-spline zoom of `mesh_image`:
    column k is the zoom of the k-th unit vector (read-only, cached)."""
    from scipy.ndimage import zoom

    matrix = np.empty((n * factor, n))
    unit = np.zeros(n)
    for k in range(n):
        unit[k] = 1.0
        matrix[:, k] = zoom(unit, factor, order=3, mode='reflect', grid_mode=True)
        unit[k] = 0.0
    matrix.setflags(write=False)
    return matrix


def subtract_background(exposure):
    """A copy of an exposure minus its background, and the background rms.

    Parameters
    ----------
    exposure : `~astropy.nddata.CCDData`
        As `psfdeconv.io.read_exposure` returns it.

    Returns
    -------
    subtracted : `~astropy.nddata.CCDData`
        The data minus `estimate_background` (``mask_sources=True``), the
        mask extended by the non-finite pixels, ``meta['background_rms']``.
    rms : float
        The background rms.
    """
    from astropy.nddata import CCDData

    data = np.array(exposure.data, dtype=np.float64)
    bad = ~np.isfinite(data)
    if exposure.mask is not None:
        bad |= np.asarray(exposure.mask, dtype=bool)
    filled = np.where(bad, 0.0, data)
    background, rms = estimate_background(filled, bad, mask_sources=True)
    meta = dict(exposure.meta or {})
    meta['background_rms'] = rms
    return CCDData(data - background, unit=exposure.unit, mask=bad,
                   uncertainty=exposure.uncertainty, wcs=exposure.wcs,
                   meta=meta), rms


def quantization_step(data, mask=None, *, scale=1.0, zero=0.0):
    """The step of the lattice an image's values lie on, or None.

    Integer images (raw or bias-subtracted counts stored as integers, with a
    soft-bias pedestal or scaled by ``BSCALE``) hold ``zero + scale * k`` for
    whole numbers ``k``. On such a lattice the median and the median absolute
    deviation snap to the lattice too: a background off by up to half a step
    per pixel (a flux offset of half a step times a galaxy's area) and a MAD
    noise of 1.48 steps for a noise of one step.

    Parameters
    ----------
    data : `~numpy.ndarray`
        The image.
    mask : `~numpy.ndarray`, optional
        True where a pixel is not data.
    scale, zero : float, optional
        The lattice's step and origin to test (``BSCALE`` and ``BZERO`` of an
        integer FITS image).

    Returns
    -------
    float or None
        ``scale`` if every finite unmasked value lies on the lattice (and
        they take more than one value), else None.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.background import quantization_step
    >>> counts = np.random.default_rng(0).poisson(1000.0, (32, 32)).astype(float)
    >>> quantization_step(counts), quantization_step(counts + 0.25)
    (1.0, None)
    """
    data = np.asarray(data, dtype=np.float64)
    good = np.isfinite(data)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    values = data[good]
    scale = float(scale)
    if not values.size or not scale > 0:
        return None

    def on_lattice(part):
        steps = (part - float(zero)) / scale
        return np.array_equal(steps, np.round(steps))

    # A float image is off the lattice within its first pixels: no
    # full-frame temporaries for it (the pipeline tests every band).
    if not on_lattice(values[:4096]) or values.min() == values.max():
        return None
    return scale if on_lattice(values) else None


def dequantize_exposure(exposure, *, seed):
    """An exposure whose values lie on a lattice, dithered off it.

    Each pixel gets a uniform offset in ``[-step / 2, step / 2)`` (seeded):
    the median and the MAD then estimate the background and the noise without
    the lattice's bias (`quantization_step`), at the cost of ``step**2 / 12``
    of variance per pixel (4 % more noise for a noise of one step). Values
    that are not on a lattice are returned unchanged.

    Parameters
    ----------
    exposure : `~astropy.nddata.CCDData`
        As `psfdeconv.io.read_exposure` returns it (``BSCALE``/``BZERO`` of
        its header, if any, give the lattice to test).
    seed : int or sequence of int
        Seed of the dither.

    Returns
    -------
    `~astropy.nddata.CCDData`
        ``exposure`` itself, or a dithered copy whose ``meta['dequantized']``
        is the step.
    """
    meta = exposure.meta or {}
    step = quantization_step(exposure.data, exposure.mask,
                             scale=meta.get('BSCALE', 1.0) or 1.0,
                             zero=meta.get('BZERO', 0.0) or 0.0)
    if step is None:
        return exposure
    copy = exposure.copy()
    copy.data = copy.data.astype(np.float64, copy=False)
    rng = np.random.default_rng(seed)
    copy.data += (rng.random(copy.data.shape) - 0.5) * step
    copy.meta['dequantized'] = step
    return copy
