# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Segmentation of images: photutils' detection and deblending, without their
Python loops over the segments.

`segments_above` is `~photutils.segmentation.detect_sources` (8-connected) in
one labelling; `deblend` is `~photutils.segmentation.deblend_sources` handed
only the segments that split at one of its thresholds. Both give photutils'
segmentation, labels included. The background's source mask
(`psfdeconv.background`), the star selection (`psfdeconv.psf`) and the
detection of the sources and their neighbours (`psfdeconv.detection`) use
them; `psfdeconv.detection` is where they are documented for users.
"""

import warnings

import numpy as np

from ._warnings import catch_warnings

__all__ = ['segments_above', 'deblend']


#: Multi-thresholding levels and minimum flux contrast of the deblending
#: (`~photutils.segmentation.deblend_sources`): photutils' defaults, so that
#: the sources are those photutils' own detection and deblending finds. A
#: galaxy's knots split off by it are refilled from the galaxy's other side
#: in its stamp (`psfdeconv.detection.replace_neighbours`) and flagged BLENDED
#: in their own rows.
_DEBLEND_LEVELS = 32
_DEBLEND_CONTRAST = 0.001

#: photutils' connectivity 8, the footprint of every labelling here.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def segments_above(image, threshold, n_pixels, mask=None):
    """The 8-connected groups of at least ``n_pixels`` pixels above
    ``threshold``: `~photutils.segmentation.detect_sources` (connectivity 8)
    in one labelling and a count of each group's pixels.

    photutils counts the pixels of each group in a Python loop over them,
    which on a large frame at a low threshold (its thousands of noise
    peaks) takes most of a second; the segmentation is the same, labels
    included. Where nothing is detected this returns None without
    photutils' `~photutils.utils.exceptions.NoDetectionsWarning`.

    Parameters
    ----------
    image : `~numpy.ndarray`
        2-D image (NaN pixels are never above the threshold).
    threshold : float or `~numpy.ndarray`
        The value (or per-pixel values) a pixel must exceed.
    n_pixels : int
        Minimum connected pixels of a segment.
    mask : `~numpy.ndarray`, optional
        True on pixels that belong to no segment.

    Returns
    -------
    `~photutils.segmentation.SegmentationImage` or None

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.detection import segments_above
    >>> image = np.zeros((20, 20))
    >>> image[2:5, 2:5] = 1.0    # 9 pixels
    >>> image[10, 10:12] = 1.0   # 2 pixels: too few
    >>> segments_above(image, 0.5, 5).labels
    array([1], dtype=int32)
    """
    from photutils.segmentation import SegmentationImage
    from scipy import ndimage

    with np.errstate(invalid='ignore'):
        above = np.asarray(image) > threshold
    if mask is not None:
        above &= ~np.asarray(mask, dtype=bool)
    groups, n_groups = ndimage.label(above, structure=_EIGHT_CONNECTED)
    if n_groups == 0:
        return None
    keep = np.bincount(groups.ravel(), minlength=n_groups + 1) >= n_pixels
    keep[0] = False
    n_kept = int(np.count_nonzero(keep))
    if n_kept == 0:
        return None
    if n_kept < n_groups:
        # Consecutive labels in the order of the groups, as photutils relabels.
        new_labels = np.zeros(n_groups + 1, dtype=groups.dtype)
        new_labels[keep] = np.arange(1, n_kept + 1, dtype=groups.dtype)
        groups = new_labels[groups]
    return SegmentationImage(groups)


def deblend(image, segments, n_pixels, labels=None):
    """Deblend a segmentation image with photutils' multi-thresholding and
    watershed (`~photutils.segmentation.deblend_sources`, the module's
    levels and contrast), without a progress bar.

    Only the segments that split at one of the thresholds at least are
    handed to photutils: the others would come back unchanged, and testing
    them all at once (one labelling of a mosaic of them per level) costs a
    fraction of photutils' loop over the levels of each segment. The result
    is the same as ``deblend_sources`` on every segment.

    Parameters
    ----------
    image : `~numpy.ndarray`
        The detection image (background subtracted).
    segments : `~photutils.segmentation.SegmentationImage` or None
        From `~photutils.segmentation.detect_sources` (8-connected); None
        is returned as is.
    n_pixels : int
        Minimum connected pixels of a deblended source.
    labels : array-like of int, optional
        Deblend only these segments (default: all).

    Returns
    -------
    `~photutils.segmentation.SegmentationImage` or None

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.segmentation import detect_sources
    >>> from psfdeconv.detection import deblend
    >>> yy, xx = np.mgrid[:40, :60]
    >>> image = (100 * np.exp(-((xx - 22)**2 + (yy - 20)**2) / 10)
    ...          + 60 * np.exp(-((xx - 34)**2 + (yy - 20)**2) / 10))
    >>> segments = detect_sources(image, 1.0, n_pixels=5)
    >>> segments.n_labels, deblend(image, segments, 5).n_labels
    (1, 2)
    """
    from photutils.segmentation import deblend_sources

    if segments is None:
        return None
    splitting = _splitting_labels(image, segments, n_pixels,
                                 segments.labels if labels is None else labels)
    if not len(splitting):
        return segments.copy()
    with catch_warnings():
        # Segments too small to split are kept whole; photutils says so.
        warnings.simplefilter('ignore')
        return deblend_sources(image, segments, int(n_pixels), labels=splitting,
                               n_levels=_DEBLEND_LEVELS, contrast=_DEBLEND_CONTRAST,
                               progress_bar=False)


#: Width in pixels of the mosaic of segment boxes in `_splitting_labels`.
_MOSAIC_WIDTH = 2048


def _deblend_thresholds(values, n_levels):
    """photutils' exponential multi-thresholds of one segment (linear where
    its minimum is not positive), or None where the segment is flat: the
    arithmetic of ``deblend_sources``, so that each level compares the
    same pixels."""
    low, high = np.nanmin(values), np.nanmax(values)
    if low == high:
        return None
    linear = np.linspace(low, high, n_levels + 2)
    if low <= 0:
        return linear[1:-1]
    normalized = (linear - low) / (high - low)
    return (low * (high / low) ** normalized)[1:-1]


def _splitting_labels(image, segments, n_pixels, labels):
    """The segments that photutils' deblending can split: at one of its
    thresholds at least, two or more 8-connected groups of ``n_pixels``
    pixels or more lie above it.

    `~photutils.segmentation.deblend_sources` labels each segment's cut-out
    once per threshold level (32) in a Python loop, and returns the others
    unchanged. Here every segment's pixels are copied into one mosaic (the
    boxes on shelves, one empty pixel apart) and each level is one labelling
    of the mosaic; a segment's thresholds are computed as photutils
    computes them (exponential levels between its minimum and maximum,
    linear where the minimum is not positive).

    Parameters
    ----------
    image : `~numpy.ndarray`
        The detection image.
    segments : `~photutils.segmentation.SegmentationImage`
        8-connected segments (``detect_sources``), so that no two touch.
    n_pixels : int
        Minimum connected pixels of a deblended source.
    labels : array-like of int
        The segments to test.

    Returns
    -------
    `~numpy.ndarray`
        The labels, of those given, that split (in the order given).
    """
    from scipy import ndimage

    labels = np.atleast_1d(np.asarray(labels, dtype=int))
    if not labels.size:
        return labels
    indices = segments.get_indices(labels)
    # deblend_sources' own cut: two sources need n_pixels each.
    large_enough = np.asarray(segments.areas)[indices] >= 2 * n_pixels
    labels, indices = labels[large_enough], indices[large_enough]
    n_levels = _DEBLEND_LEVELS
    # Row 0 is the mosaic's empty pixels: no threshold is below infinity.
    thresholds = np.full((labels.size + 1, n_levels), np.inf)
    boxes = []
    for owner, (label, index) in enumerate(zip(labels, indices, strict=True), start=1):
        box = segments.slices[index]
        inside = segments.data[box] == label
        values = image[box][inside]
        levels = _deblend_thresholds(values, n_levels)
        if levels is not None:
            thresholds[owner] = levels
            boxes.append((owner, inside, values))
    if not boxes:
        return labels[:0]
    boxes.sort(key=lambda item: item[1].shape[0], reverse=True)
    width = max(_MOSAIC_WIDTH, max(inside.shape[1] for _, inside, _ in boxes))
    places = []
    x = y = shelf = 0
    for owner, inside, values in boxes:
        height, wide = inside.shape
        if x + wide > width:
            y, x, shelf = y + shelf + 1, 0, 0
        places.append((owner, inside, values, y, x))
        x += wide + 1
        shelf = max(shelf, height)
    # Each mosaic pixel holds how many of its segment's thresholds it is
    # above, so that a level is one comparison of small integers.
    above_levels = np.zeros((y + shelf, width), dtype=np.uint8)
    owners = np.zeros(above_levels.shape, dtype=np.intp)
    for owner, inside, values, y0, x0 in places:
        height, wide = inside.shape
        with np.errstate(invalid='ignore'):
            counts = (values[:, None] > thresholds[owner]).sum(axis=1)
        above_levels[y0:y0 + height, x0:x0 + wide][inside] = counts
        owners[y0:y0 + height, x0:x0 + wide][inside] = owner
    owners = owners.ravel()
    splits = np.zeros(labels.size + 1, dtype=bool)
    for level in range(n_levels):
        groups, n_groups = ndimage.label(above_levels > level, structure=_EIGHT_CONNECTED)
        if n_groups < 2:
            continue
        groups = groups.ravel()
        sizes = np.bincount(groups, minlength=n_groups + 1)
        group_owner = np.zeros(n_groups + 1, dtype=np.intp)
        group_owner[groups] = owners
        large = np.flatnonzero(sizes >= n_pixels)
        large = large[large > 0]
        splits |= np.bincount(group_owner[large], minlength=labels.size + 1) >= 2
    return labels[splits[1:]]
