# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Geometric transforms of images: the symmetries of the square, and shears
and dilations about the light centroid.

The symmetries serve the network's test-time averaging
(`~psfdeconv.deconvolve.symmetric_output`) and the training augmentation
(`~psfdeconv.train.augment_batch`); the shear and dilation serve the
PSF-leakage and size-bias corrections (`psfdeconv.deconvolve`,
`psfdeconv.calibrate`).
"""

from functools import partial

import numpy as np

from ._cpus import run_in_threads, thread_count
from .exceptions import InvalidInputError

__all__ = ['square_symmetry', 'shear_images', 'dilate_images']


def square_symmetry(array, transform, *, inverse=False, axes=(-2, -1)):
    """Symmetry ``transform`` of the square on two axes of an array.

    Transform t in 0..7 is ``t % 4`` quarter turns (`numpy.rot90`)
    followed, for t >= 4, by a flip of the second axis.

    Parameters
    ----------
    array : `~numpy.ndarray`
        Any array with two equal image axes.
    transform : int
        0 to 7.
    inverse : bool, optional
        Undo ``transform`` instead.
    axes : tuple of int, optional
        The (y, x) image axes.

    Returns
    -------
    `~numpy.ndarray`
        A view of ``array``.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(9).reshape(3, 3)
    >>> turned = square_symmetry(image, 5)
    >>> bool(np.array_equal(square_symmetry(turned, 5, inverse=True), image))
    True
    """
    flip = (slice(None),) * (axes[1] % array.ndim) + (slice(None, None, -1),)
    if inverse:
        if transform >= 4:
            array = array[flip]
        return np.rot90(array, k=-(transform % 4), axes=axes)
    array = np.rot90(array, k=transform % 4, axes=axes)
    return array[flip] if transform >= 4 else array


def shear_images(images, g1, g2):
    """Shear images about their centroids (an area-preserving shear).

    Each image ``I`` becomes ``I(S^-1 x)`` with the area-preserving shear
    ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - g1**2 - g2**2)`` (x along
    columns) about its light centroid, by cubic-spline interpolation,
    clipped at 0. A round image acquires the distortion ``2 g / (1 + g**2)``.
    Images with no positive flux are returned unchanged.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    g1, g2 : `~numpy.ndarray` or float
        Reduced shear per image, broadcastable to ``images.shape[:-2]``,
        ``g1**2 + g2**2 < 1``.

    Returns
    -------
    `~numpy.ndarray`
        The sheared images, same shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.transforms import shear_images
    >>> from psfdeconv.measure import image_moments
    >>> y, x = np.mgrid[:48, :48]
    >>> round_image = np.exp(-0.5 * ((x - 24)**2 + (y - 24)**2) / 3.0**2)
    >>> sheared = shear_images(round_image, 0.05, 0.0)
    >>> round(float(image_moments(sheared)['e1']), 3)  # 2 g / (1 + g^2)
    0.1
    """
    return _dilate_and_shear(images, 0.0, g1, g2)


def _dilate_and_shear(images, dilation, g1, g2):
    """The map ``f S`` about each image's light centroid: a dilation by
    ``f`` (`dilate_images`) and a shear ``S`` (`shear_images`) as one
    interpolation, ``I((f S)^-1 (x - c) + c) / f**2``.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    dilation : `~numpy.ndarray` or float
        ``f - 1`` per image, broadcastable to ``images.shape[:-2]``,
        ``f > 0``.
    g1, g2 : `~numpy.ndarray` or float
        Reduced shear per image, broadcastable likewise,
        ``g1**2 + g2**2 < 1``.

    Returns
    -------
    `~numpy.ndarray`
        The transformed images, same shape and dtype; images whose map is
        the identity, or with no positive flux, unchanged.
    """
    images = np.asarray(images)
    leading = images.shape[:-2]
    factor = 1.0 + np.broadcast_to(np.asarray(dilation, dtype=float), leading)
    if np.any(~(factor > 0)):
        raise InvalidInputError(f'dilate_images needs dilation > -1, got '
                                f'{np.min(factor) - 1.0:g}; give f - 1 with f > 0.')
    g1 = np.broadcast_to(np.asarray(g1, dtype=float), leading)
    g2 = np.broadcast_to(np.asarray(g2, dtype=float), leading)
    if np.any(~(g1**2 + g2**2 < 1)):
        raise InvalidInputError(f'shear_images needs g1**2 + g2**2 < 1, got '
                                f'{np.max(g1**2 + g2**2):g}; give reduced shears.')
    # The inverse map (f S(g))^-1 = S(-g) / f in (row, column) order, (..., 2, 2).
    inverse = np.stack([np.stack([1 + g1, -g2], axis=-1),
                        np.stack([-g2, 1 - g1], axis=-1)], axis=-2)
    no_shear = (g1 == 0) & (g2 == 0)
    # Exactly the identity where there is no shear (the transform is then skipped).
    inverse[no_shear] = np.eye(2)
    inverse /= (np.where(no_shear, 1.0, np.sqrt(1 - g1**2 - g2**2)) * factor)[..., None, None]
    return _transform_about_centroids(images, inverse, 1.0 / factor**2)


def _transform_about_centroids(images, inverse, flux_scale):
    """``flux_scale * I(A^-1 (x - c) + c)`` about each image's light centroid
    ``c``, cubic spline, clipped at 0.

    ``inverse`` (..., 2, 2) is ``A^-1`` in (row, column) order, as
    `scipy.ndimage.affine_transform` maps output to input positions;
    images whose ``inverse`` is the identity, or without a centroid, are
    returned unchanged.
    """
    from scipy import ndimage

    from .measure import image_moments

    shape = images.shape
    # One leading axis (a single image included).
    images = images.reshape((-1,) + shape[-2:])
    inverse = np.reshape(inverse, (-1, 2, 2))
    flux_scale = np.broadcast_to(flux_scale, shape[:-2]).reshape(-1)
    moments = image_moments(images)
    centres = np.stack([moments['y'], moments['x']], axis=-1)
    moved = np.isfinite(centres).all(axis=-1) & ~(inverse == np.eye(2)).all(axis=(-2, -1))
    offsets = centres - (inverse @ centres[..., None])[..., 0]
    out = np.clip(images, 0, None)
    # A diagonal map (a dilation, a shear along the axes) is separable: all
    # such images at once as matrix products, the same values as scipy's.
    diagonal = moved & (inverse[..., 0, 1] == 0) & (inverse[..., 1, 0] == 0)
    index = np.flatnonzero(diagonal)
    for start in range(0, len(index), _CHUNK):
        part = index[start:start + _CHUNK]
        transformed = _diagonal_splines(images[part], inverse[part, 0, 0],
                                        inverse[part, 1, 1], offsets[part])
        out[part] = np.clip(transformed * flux_scale[part, None, None], 0, None)
    # One spline per other image (scipy's affine_transform takes one matrix),
    # from coefficients prefiltered for the whole batch at once.
    index = np.flatnonzero(moved & ~diagonal)

    def transform(part, coefficients, share):
        for i, coefficient in zip(part[share], coefficients[share], strict=True):
            transformed = ndimage.affine_transform(
                coefficient, inverse[i], offset=offsets[i], order=3, mode='constant',
                prefilter=False, output=images.dtype)
            out[i] = np.clip(transformed * flux_scale[i], 0, None)

    threads = thread_count(len(index), _MIN_IMAGES_PER_THREAD)
    for start in range(0, len(index), _CHUNK):
        part = index[start:start + _CHUNK]
        coefficients = _spline_coefficients(images[part])
        # scipy.ndimage releases the GIL.
        run_in_threads(partial(transform, part, coefficients), len(part), threads)
    return out.reshape(shape)


#: Fewest images per thread of the non-diagonal splines (below, one thread:
#: starting threads costs more than they save).
_MIN_IMAGES_PER_THREAD = 64


#: Images per batch of `_diagonal_splines` (bounds its float64 temporaries).
_CHUNK = 512


def _diagonal_splines(images, scale_y, scale_x, offsets):
    """``scipy.ndimage.affine_transform(image, diag(scale_y, scale_x),
    offset, order=3, mode='constant')`` of each image of a stack (m, ny, nx).

    The cubic-spline coefficients (scipy's prefilter) are mapped along y and
    along x by two banded matrices, so the stack takes two batched matrix
    products instead of one 16-point sum per pixel in a loop over images.
    """
    coefficients = _spline_coefficients(images)
    rows = _spline_matrices(scale_y, offsets[:, 0], images.shape[-2])
    columns = _spline_matrices(scale_x, offsets[:, 1], images.shape[-1])
    return rows @ coefficients @ np.swapaxes(columns, -1, -2)


def _spline_coefficients(images):
    """Cubic-spline coefficients of each image of a stack (m, ny, nx), in
    float64: scipy's prefilter for mode 'constant', one axis at a time."""
    from scipy import ndimage

    coefficients = ndimage.spline_filter1d(images, 3, axis=-1, mode='constant',
                                           output=np.float64)
    return ndimage.spline_filter1d(coefficients, 3, axis=-2, mode='constant',
                                   output=coefficients)


def _spline_matrices(scale, shift, length):
    """Matrices W (m, length, length) with ``W @ c`` the cubic spline of
    coefficients ``c`` at ``scale * o + shift`` (o = 0, ..., length - 1), as
    scipy's mode 'constant': 0 outside [0, length - 1], mirrored
    coefficients at the edges."""
    u = np.arange(length) * scale[:, None] + shift[:, None]
    floor = np.floor(u)
    t = u - floor
    weights = np.stack([(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
                        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6], axis=-1)
    weights *= ((u >= 0) & (u <= length - 1))[..., None]
    index = np.abs(floor.astype(np.int64)[..., None] - 1 + np.arange(4))
    index = np.where(index >= length, 2 * length - 2 - index, index)
    matrices = np.zeros(u.shape + (length,))
    rows = (np.arange(len(u))[:, None], np.arange(length))
    # One tap at a time: within a tap no two weights share an entry, so each
    # fancy-indexed sum is exact, and mirrored taps that meet at an edge add
    # in tap order, as np.add.at adds them (in 0.7 of its time).
    for tap in range(4):
        matrices[rows + (index[..., tap],)] += weights[..., tap]
    return matrices


def dilate_images(images, dilation):
    """Dilate images about their centroids, conserving their sums.

    Each image ``I`` becomes ``I((x - c) / f + c) / f**2`` with
    ``f = 1 + dilation`` about its light centroid ``c``, by cubic-spline
    interpolation, clipped at 0: every size scales by ``f``. Images with no
    positive flux, or a dilation of 0, are returned unchanged.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    dilation : `~numpy.ndarray` or float
        ``f - 1`` per image, broadcastable to ``images.shape[:-2]``,
        ``f > 0``.

    Returns
    -------
    `~numpy.ndarray`
        The dilated images, same shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.transforms import dilate_images
    >>> from psfdeconv.measure import image_moments
    >>> y, x = np.mgrid[:48, :48]
    >>> round_image = np.exp(-0.5 * ((x - 24)**2 + (y - 24)**2) / 3.0**2)
    >>> larger = dilate_images(round_image, 0.2)
    >>> ratio = image_moments(larger)['size'] / image_moments(round_image)['size']
    >>> print(f'{float(ratio):.3f}')
    1.200
    """
    return _dilate_and_shear(images, dilation, 0.0, 0.0)
