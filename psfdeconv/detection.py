# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Sources in exposures: the galaxies to deconvolve and their neighbours.

`segments_above` and `deblend` are photutils' detection and deblending
(the same segmentation, in a fraction of the time on a large frame).
`detect_galaxies` finds and deblends the sources of a band and drops the
stars (`psfdeconv.psf.find_stars`); `neighbour_segments` segments and
deblends the bands' combined signal-to-noise image, `blend_fractions`
measures how much of each segment's light belongs to a brighter source,
and `replace_neighbours` replaces the pixels of other sources in each
stamp, so that their light is not counted in a source's flux and shape.
"""

import numpy as np

from ._segments import deblend, segments_above
from .exceptions import InvalidInputError

__all__ = ['detect_galaxies', 'segments_above', 'deblend', 'neighbour_segments',
           'blend_fractions', 'source_segments', 'blended_sources', 'segment_extents',
           'replace_neighbours', 'NEIGHBOUR_OPTIONS', 'BLEND_LIMIT']


#: Detection threshold (background sigma) and minimum connected pixels of
#: `detect_galaxies`, as for `psfdeconv.psf.find_stars`.
_DETECTION_SIGMA = 3.0


_DETECTION_NPIXELS = 5


#: A source is BLENDED (`psfdeconv.flags.FLAG_BLENDED`) when the light of
#: brighter sources under its segment, estimated by `blend_fractions`, is more
#: than this fraction of its own light.
BLEND_LIMIT = 0.1


#: Width in pixels of the ring around a segment whose pixels in brighter
#: segments give the pedestal of `blend_fractions`.
_BLEND_RING = 2


#: A detection is a star when a point-like source of
#: `psfdeconv.psf.find_stars` lies within this many pixels (or a quarter of
#: the stellar FWHM, if larger) of its centroid.
_STAR_MATCH_RADIUS = 1.0


def detect_galaxies(exposure, *, threshold_sigma=_DETECTION_SIGMA,
                    n_pixels=_DETECTION_NPIXELS, star_threshold_sigma=10.0,
                    deblend_sources=True, psf_fwhm=None):
    """Detect the sources of an exposure and keep those that are not stars.

    The background (the mesh of `psfdeconv.psf.find_stars`) is subtracted and
    sources are segmented with `~photutils.segmentation.detect_sources`
    (``threshold_sigma`` times the background rms, ``n_pixels`` connected
    pixels) and deblended (`deblend`), so that a faint source inside a
    brighter galaxy's light is a source of its own (the pipeline flags it
    BLENDED when its light cannot be separated, see `blend_fractions`).
    Stars are found with
    `psfdeconv.psf.find_stars` (``all_sources=True``): a segment is a star
    when a point-like source of it (bright, round, with the stellar FWHM,
    isophotal and windowed centroids agreeing) lies within 1 pixel (or a
    quarter of the stellar FWHM) of the segment's centroid. Stars fainter
    than ``star_threshold_sigma`` (peak signal-to-noise) cannot be told from
    compact galaxies by this test and are kept, as are galaxies as compact as
    the stars; give positions from a catalogue to control the selection.

    Parameters
    ----------
    exposure : `~astropy.nddata.NDData`, `~astropy.nddata.CCDData` or `~numpy.ndarray`
        One band (2-D); its mask and non-finite pixels are ignored.
    threshold_sigma : float, optional
        Detection threshold in units of the background rms.
    n_pixels : int, optional
        Minimum number of connected pixels of a detection.
    star_threshold_sigma : float, optional
        Minimum peak signal-to-noise of a star (``threshold_sigma`` of
        `~psfdeconv.psf.find_stars`).
    deblend_sources : bool, optional
        Deblend the segments (default); False keeps touching sources as one.
    psf_fwhm : float, optional
        The FWHM in pixels of a known PSF (``psf_fwhm`` of
        `~psfdeconv.psf.find_stars`, e.g. `~psfdeconv.psf.half_peak_fwhm`):
        the stars' FWHM where the image has fewer than 5 compact sources
        to make a stellar locus of, which would otherwise be its most
        compact galaxy (a bulge, dropped as a star).

    Returns
    -------
    galaxies : `~astropy.table.QTable`
        One row per non-stellar detection: ``id`` (segment label), ``x``,
        ``y`` (isophotal centroid, 0-based pixels), ``sky_centroid`` (with
        a WCS), ``segment_flux`` and ``area`` (pixels). ``meta`` holds
        ``n_detected``, ``n_stars``, ``background_rms`` and ``fwhm_locus``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For an image that is not 2-D or entirely masked.

    Examples
    --------
    >>> from psfdeconv.detection import detect_galaxies
    >>> from psfdeconv.simulate import simulate_exposure
    >>> exposures, truth = simulate_exposure((160, 160), n_galaxies=3, n_stars=8,
    ...                                      seed=3)
    >>> galaxies = detect_galaxies(exposures['r'])
    >>> print(len(galaxies), galaxies.meta['n_stars'])
    3 8
    """
    import astropy.units as u
    from astropy.table import QTable
    from photutils.segmentation import SourceCatalog

    from ._validation import as_image_and_mask
    from .background import estimate_background
    from .psf import find_stars, point_sources

    if not np.isfinite(threshold_sigma) or threshold_sigma <= 0:
        raise InvalidInputError(f'threshold_sigma = {threshold_sigma}; give a '
                                f'positive number of sigma (e.g. 3).')
    if isinstance(n_pixels, bool) or int(n_pixels) != n_pixels or n_pixels < 1:
        raise InvalidInputError(f'n_pixels = {n_pixels!r}; give an integer >= 1.')
    if psf_fwhm is not None and not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise InvalidInputError(f'psf_fwhm = {psf_fwhm!r}; give the PSF\'s FWHM in '
                                f'pixels (a positive number) or None.')
    image, bad, image_meta = as_image_and_mask(exposure)
    background, rms = estimate_background(image, bad)
    subtracted = image - background
    subtracted[bad] = 0.0
    # None for an empty field: an empty table, not an error.
    segm = segments_above(subtracted, threshold_sigma * rms, int(n_pixels), mask=bad)
    if deblend_sources:
        segm = deblend(subtracted, segm, n_pixels)
    if (deblend_sources and segm is not None and int(n_pixels) == _DETECTION_NPIXELS
            and float(threshold_sigma) == min(_DETECTION_SIGMA, star_threshold_sigma)):
        # find_stars would segment and deblend the same image the same way:
        # measure its star candidates on these segments instead.
        stars = point_sources(image, bad, background, rms, segm,
                               threshold_sigma=star_threshold_sigma,
                               meta=image_meta, psf_fwhm=psf_fwhm)
    else:
        stars = find_stars(exposure, threshold_sigma=star_threshold_sigma,
                           all_sources=True, psf_fwhm=psf_fwhm)
    wcs = getattr(exposure, 'wcs', None)
    table = QTable()
    meta = {'n_detected': 0, 'n_stars': 0, 'background_rms': float(rms),
            'fwhm_locus': float(stars.meta['fwhm_locus']),
            'threshold_sigma': float(threshold_sigma), 'n_pixels': int(n_pixels)}
    if segm is None:
        for name in ('id', 'x', 'y', 'segment_flux', 'area'):
            table[name] = np.zeros(0, dtype=int if name == 'id' else float)
        table.meta.update(meta)
        return table
    catalog = SourceCatalog(subtracted, segm, mask=bad)
    x = np.asarray(catalog.x_centroid, dtype=float)
    y = np.asarray(catalog.y_centroid, dtype=float)
    point_like = np.asarray(stars['point_like'], dtype=bool)
    star_x = np.asarray(stars['x'].value)[point_like]
    star_y = np.asarray(stars['y'].value)[point_like]
    radius = _STAR_MATCH_RADIUS
    if np.isfinite(meta['fwhm_locus']):
        radius = max(radius, 0.25 * meta['fwhm_locus'])
    is_star = np.zeros(len(x), dtype=bool)
    if star_x.size:
        distance = np.hypot(x[:, None] - star_x[None], y[:, None] - star_y[None])
        is_star = distance.min(axis=1) <= radius
    keep = ~is_star
    table['id'] = np.asarray(segm.labels)[keep]
    table['x'] = x[keep] * u.pix
    table['y'] = y[keep] * u.pix
    if wcs is not None:
        table['sky_centroid'] = wcs.pixel_to_world(x[keep], y[keep])
    table['segment_flux'] = np.asarray(catalog.segment_flux, dtype=float)[keep]
    table['area'] = np.asarray(catalog.area.value, dtype=float)[keep] * u.pix ** 2
    meta.update(n_detected=len(x), n_stars=int(is_star.sum()))
    table.meta.update(meta)
    return table


#: Detection threshold (sigma of the bands' combined signal-to-noise image),
#: minimum connected pixels and dilation (pixels) of the segments whose pixels
#: `replace_neighbours` replaces: 2 sigma reaches into the wings, and the
#: dilation takes the faint rim beyond it.
_NEIGHBOUR_SIGMA = 2.0


_NEIGHBOUR_NPIXELS = 5


_NEIGHBOUR_DILATION = 2


#: A source without a segment at its own pixel takes the largest segment
#: within this many pixels of it (catalogue positions need not fall on the
#: detection's peak).
_TARGET_RADIUS = 3


#: Seed of the replacement noise (combined with each source's index).
_NEIGHBOUR_SEED = 20231030


#: The ``neighbours`` options of `~psfdeconv.pipeline.deconvolve_catalog`.
NEIGHBOUR_OPTIONS = ('replace', 'keep')


def neighbour_segments(images, *, masks=None, threshold_sigma=_NEIGHBOUR_SIGMA,
                       n_pixels=_NEIGHBOUR_NPIXELS, deblend_sources=True,
                       return_image=False, return_parents=False):
    """Segmentation map of the sources in aligned, background-subtracted bands.

    The bands are combined into one signal-to-noise image (each divided by
    its sigma-clipped standard deviation, `~psfdeconv.background.clipped_stats`,
    summed over the bands valid at a pixel, divided by the square root of their
    number), segmented with
    `~photutils.segmentation.detect_sources`, so that a neighbour bright in
    any band is found, and deblended (`deblend`), so that a source inside a
    brighter one's light has a segment of its own.

    Parameters
    ----------
    images : sequence of `~numpy.ndarray`
        The bands on one pixel grid, background subtracted, shape (ny, nx)
        each.
    masks : sequence of `~numpy.ndarray` or None, optional
        True on bad pixels, one per band (or None entries).
    threshold_sigma : float, optional
        Detection threshold in units of the combined image's noise.
    n_pixels : int, optional
        Minimum connected pixels of a segment.
    deblend_sources : bool, optional
        Deblend the segments (default).
    return_image : bool, optional
        Also return the combined signal-to-noise image (for
        `blend_fractions`).
    return_parents : bool, optional
        Also return the segments before deblending.

    Returns
    -------
    labels : `~numpy.ndarray`
        int32 labels, shape (ny, nx); 0 where there is no source.
    combined : `~numpy.ndarray`
        The combined signal-to-noise image (0 where no band is valid); only
        with ``return_image``.
    parents : `~numpy.ndarray`
        int32 labels of the segments before deblending; only with
        ``return_parents``.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.detection import neighbour_segments
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = rng.normal(0, 1, (64, 64)) + 50 * np.exp(
    ...     -((xx - 20)**2 + (yy - 20)**2) / 8) + 50 * np.exp(
    ...     -((xx - 45)**2 + (yy - 40)**2) / 8)
    >>> labels = neighbour_segments([image])
    >>> int(labels.max()), labels[20, 20] != labels[40, 45]
    (2, np.True_)
    """
    from .background import clipped_stats

    images = [np.asarray(image, dtype=float) for image in images]
    if masks is None:
        masks = [None] * len(images)
    combined = np.zeros(images[0].shape)
    count = np.zeros(images[0].shape, dtype=int)
    for image, mask in zip(images, masks, strict=True):
        valid = np.isfinite(image)
        if mask is not None:
            valid &= ~np.asarray(mask, dtype=bool)
        if not valid.any():
            continue
        _, _, std = clipped_stats(image, ~valid, sigma=3.0)
        if std > 0:
            combined += np.where(valid, image, 0.0) / std
            count += valid
    # Each pixel's sum of unit-noise images over the bands valid there.
    bad = count == 0
    labels = np.zeros(combined.shape, dtype=np.int32)
    parents = labels
    if not bad.all():
        combined /= np.sqrt(np.maximum(count, 1))
        # None for an empty field: no neighbours.
        segments = segments_above(combined, threshold_sigma, n_pixels, mask=bad)
        if segments is not None:
            parents = segments.data.astype(np.int32)
            if deblend_sources:
                segments = deblend(combined, segments, n_pixels)
            labels = segments.data.astype(np.int32)
    out = (labels,) + ((combined,) if return_image else ()) + \
        ((parents,) if return_parents else ())
    return out if len(out) > 1 else labels


def blend_fractions(image, labels, *, ring=_BLEND_RING):
    """The light of brighter sources under each segment, relative to its own.

    A faint source inside a brighter galaxy's light sits on that galaxy's
    profile: the galaxy's surface brightness at the edge of the source's
    segment continues under it. It is estimated from the ring of ``ring``
    pixels around the segment: the sum of the (positive) pixels of the ring
    that belong to brighter segments (larger sum of ``image``), divided by
    the number of pixels of the ring, is the pedestal per pixel (the ring's
    pixels on the sky count as 0, so an isolated source gets 0 and a source
    touching a brighter one on one side gets a part). The fraction is the
    pedestal times the segment's area over the segment's own light (its sum
    minus that pedestal); infinite where nothing is left of its own. A
    source is BLENDED when this exceeds `BLEND_LIMIT`.

    Parameters
    ----------
    image : `~numpy.ndarray`
        Background-subtracted image (e.g. the combined signal-to-noise image
        of `neighbour_segments`), shape (ny, nx).
    labels : `~numpy.ndarray`
        Segment labels on the same grid (0: no source).
    ring : int, optional
        Width of the ring in pixels.

    Returns
    -------
    `~numpy.ndarray`
        float64, shape (labels.max() + 1,): the fraction per label (0 at
        index 0 and for labels not present).

    Examples
    --------
    A faint source on a bright galaxy's flat profile, and one alone:

    >>> import numpy as np
    >>> from psfdeconv.detection import blend_fractions
    >>> image = np.zeros((40, 60))
    >>> labels = np.zeros((40, 60), dtype=int)
    >>> image[5:35, 5:35] = 10.0; labels[5:35, 5:35] = 1     # the galaxy
    >>> image[18:22, 18:22] += 5.0; labels[18:22, 18:22] = 2  # a knot on it
    >>> image[18:22, 48:52] = 5.0; labels[18:22, 48:52] = 3   # a source alone
    >>> blend_fractions(image, labels).round(2).tolist()
    [0.0, 0.0, 2.0, 0.0]
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=float)
    labels = np.asarray(labels)
    n_labels = int(labels.max()) if labels.size else 0
    fractions = np.zeros(n_labels + 1)
    if n_labels == 0:
        return fractions
    positive = np.where(np.isfinite(image), np.maximum(image, 0.0), 0.0)
    totals = ndimage.sum_labels(np.where(np.isfinite(image), image, 0.0), labels,
                                index=np.arange(n_labels + 1))
    structure = np.ones((2 * ring + 1, 2 * ring + 1), dtype=bool)
    ny, nx = labels.shape
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # The box grown by the ring, within the image.
        grown = tuple(slice(max(b.start - ring, 0), min(b.stop + ring, n))
                      for b, n in zip(box, (ny, nx), strict=True))
        local = labels[grown]
        own = local == label
        ring_pixels = ndimage.binary_dilation(own, structure=structure) & ~own
        n_ring = int(ring_pixels.sum())
        if n_ring == 0:
            continue
        ring_labels = local[ring_pixels]
        brighter = (ring_labels > 0) & (totals[ring_labels] > totals[label])
        if not brighter.any():
            continue
        pedestal = positive[grown][ring_pixels][brighter].sum() / n_ring
        under = pedestal * own.sum()
        left = totals[label] - under
        fractions[label] = under / left if left > 0 else np.inf
    return fractions


def source_segments(labels, x, y):
    """The segment of each source: the label at its pixel, or the most common
    label within 3 pixels of it (0: none), as `replace_neighbours` chooses.

    Parameters
    ----------
    labels : `~numpy.ndarray`
        Segment labels, shape (ny, nx).
    x, y : array-like
        Source positions in pixels of ``labels``, shape (n,); non-finite or
        off-image positions get 0.

    Returns
    -------
    `~numpy.ndarray`
        int64 (n,).
    """
    labels = np.asarray(labels)
    ny, nx = labels.shape
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    out = np.zeros(x.size, dtype=np.int64)
    r = _TARGET_RADIUS
    for i in range(x.size):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        cx, cy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        if 0 <= cy < ny and 0 <= cx < nx and labels[cy, cx] > 0:
            out[i] = labels[cy, cx]
            continue
        y0, y1 = max(cy - r, 0), min(cy + r + 1, ny)
        x0, x1 = max(cx - r, 0), min(cx + r + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        near = labels[y0:y1, x0:x1][np.hypot(xx - x[i], yy - y[i]) <= r]
        near = near[near > 0]
        if near.size:
            found, counts = np.unique(near, return_counts=True)
            out[i] = found[np.argmax(counts)]
    return out


def blended_sources(image, labels, x, y, *, segments_of=None, fractions=None):
    """Which sources cannot be separated from a brighter one's light.

    A source is blended when its segment's `blend_fractions` exceeds
    `BLEND_LIMIT`, or when it shares its segment with another source that
    lies closer to the segment's light centroid (two catalogue sources in
    one segment: the deblending could not split them, and the other one's
    light fills this one's stamp).

    Parameters
    ----------
    image : `~numpy.ndarray`
        The detection image (e.g. the combined signal-to-noise image of
        `neighbour_segments`).
    labels : `~numpy.ndarray`
        Its segment labels.
    x, y : array-like
        Source positions, shape (n,).
    segments_of : `~numpy.ndarray`, optional
        `source_segments` of the sources, if already known.
    fractions : `~numpy.ndarray`, optional
        `blend_fractions` of ``image`` and ``labels``, if already known.

    Returns
    -------
    blended : `~numpy.ndarray`
        bool (n,).
    fraction : `~numpy.ndarray`
        float64 (n,): the blend fraction of each source's segment (NaN for
        sources without one).
    """
    from scipy import ndimage

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if segments_of is None:
        segments_of = source_segments(labels, x, y)
    if fractions is None:
        fractions = blend_fractions(image, labels)
    has = segments_of > 0
    fraction = np.full(x.size, np.nan)
    fraction[has] = fractions[segments_of[has]]
    blended = has & (fraction > BLEND_LIMIT)
    shared, counts = np.unique(segments_of[has], return_counts=True)
    shared = shared[counts > 1]
    if shared.size:
        positive = np.where(np.isfinite(image), np.maximum(image, 0.0), 0.0)
        centres = np.atleast_2d(ndimage.center_of_mass(positive, labels, shared))
        for label, (cy, cx) in zip(shared, centres, strict=True):
            members = np.flatnonzero(segments_of == label)
            distance = np.hypot(x[members] - cx, y[members] - cy)
            owner = members[np.nanargmin(distance)] if np.isfinite(distance).any() \
                else members[0]
            blended[members[members != owner]] = True
    return blended, fraction


def segment_extents(labels, x, y, segments_of=None):
    """How far each source's segment reaches from its position.

    Parameters
    ----------
    labels : `~numpy.ndarray`
        Segment labels, shape (ny, nx).
    x, y : array-like
        Source positions in pixels, shape (n,).
    segments_of : `~numpy.ndarray`, optional
        `source_segments` of the sources, if already known.

    Returns
    -------
    extent : `~numpy.ndarray`
        float64 (n,): the largest distance along x or y in pixels from the
        position to the far side of the segment's bounding box (0 for
        sources without a segment).
    at_edge : `~numpy.ndarray`
        bool (n,): the segment touches the image's border.
    """
    from scipy import ndimage

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if segments_of is None:
        segments_of = source_segments(labels, x, y)
    boxes = ndimage.find_objects(np.asarray(labels))
    extent = np.zeros(x.size)
    at_edge = np.zeros(x.size, dtype=bool)
    ny, nx = np.shape(labels)
    for i, label in enumerate(segments_of):
        if label <= 0 or label > len(boxes) or boxes[label - 1] is None:
            continue
        rows, cols = boxes[label - 1]
        at_edge[i] = rows.start == 0 or cols.start == 0 or rows.stop == ny or \
            cols.stop == nx
        extent[i] = max(x[i] - (cols.start - 0.5), (cols.stop - 0.5) - x[i],
                        y[i] - (rows.start - 0.5), (rows.stop - 0.5) - y[i])
    return extent, at_edge


def replace_neighbours(stamps, segments, x, y, noise_sigma, *, index, masks=None,
                       dilation=_NEIGHBOUR_DILATION, seed=_NEIGHBOUR_SEED,
                       return_targets=False):
    """Replace the pixels of other sources in stamps.

    The source's own segment is the one at its pixel (or the largest within
    3 pixels of it); every other segment of the stamp, dilated by
    ``dilation`` pixels but never into the source's own segment, is a
    neighbour. Each neighbour pixel takes the value of the pixel
    point-symmetric to it about the source's pixel, where that one lies in
    the stamp and is neither a neighbour nor masked (symmetric replacement:
    a knot split off a galaxy by the deblending is refilled with the
    galaxy's light at the same radius, and a neighbour on the sky with sky);
    elsewhere it becomes a draw of N(0, ``noise_sigma``), seeded by the
    source's ``index`` so that a source gets the same stamps whatever else
    is processed with it. Without this, a neighbour's light is deconvolved
    with the source and counted in its flux.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        Background-subtracted stamps, shape (n, n_bands, ny, nx).
    segments : `~numpy.ndarray`
        Segment labels cut like the stamps, shape (n, ny, nx).
    x, y : `~numpy.ndarray`
        The sources' positions in the stamps (pixels, 0-based), shape (n,).
    noise_sigma : `~numpy.ndarray`
        Per-pixel noise standard deviation, shape (n, n_bands); non-finite
        entries leave the noise-filled pixels of that stamp unchanged.
    index : `~numpy.ndarray`
        Integer identity of each source (e.g. its row), shape (n,).
    masks : `~numpy.ndarray`, optional
        True on bad pixels, shape of ``stamps``; left unchanged.
    dilation : int, optional
        Pixels by which neighbour segments grow.
    seed : int, optional
        Seed of the noise, combined with ``index``.
    return_targets : bool, optional
        Also return each source's own segment label (0: none).

    Returns
    -------
    stamps : `~numpy.ndarray`
        A copy with the neighbours' pixels replaced.
    neighbour : `~numpy.ndarray`
        bool (n, ny, nx), the replaced pixels.
    targets : `~numpy.ndarray`
        int64 (n,), only with ``return_targets``.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.detection import replace_neighbours
    >>> stamps = np.zeros((1, 1, 16, 16))
    >>> stamps[0, 0, 6:10, 6:10] = 10.0    # the source
    >>> stamps[0, 0, 0:3, 12:15] = 50.0    # a neighbour
    >>> segments = np.zeros((1, 16, 16), dtype=int)
    >>> segments[0, 6:10, 6:10] = 1
    >>> segments[0, 0:3, 12:15] = 2
    >>> out, replaced = replace_neighbours(stamps, segments, np.array([7.5]),
    ...                                    np.array([7.5]), np.array([[1.0]]),
    ...                                    index=np.array([0]), dilation=1)
    >>> bool(out[0, 0, 6:10, 6:10].sum() == 160), float(abs(out[0, 0, 1, 13])) < 10
    (True, True)
    >>> int(replaced.sum())  # the 3x3 neighbour grown by one pixel, cut by the edge
    18
    """
    from scipy import ndimage

    original = np.asarray(stamps, dtype=float)
    stamps = original.copy()
    segments = np.asarray(segments)
    n, n_bands, ny, nx = stamps.shape
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=float), (n, n_bands))
    yy, xx = np.mgrid[:ny, :nx]
    structure = np.hypot(*np.mgrid[-dilation:dilation + 1, -dilation:dilation + 1]) \
        <= dilation if dilation > 0 else None
    neighbour = np.zeros((n, ny, nx), dtype=bool)
    targets = np.zeros(n, dtype=np.int64)
    for i in range(n):
        labels = segments[i]
        if not labels.any():
            continue
        cx, cy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        target = source_segments(labels, x[i:i + 1], y[i:i + 1])[0]
        targets[i] = target
        others = (labels > 0) & (labels != target)
        if not others.any():
            continue
        if structure is not None:
            others = ndimage.binary_dilation(others, structure=structure)
        if target:
            others &= labels != target
        neighbour[i] = others
        # The point-symmetric pixel of each pixel about the source's pixel.
        mirror_x, mirror_y = 2 * cx - xx, 2 * cy - yy
        in_stamp = (mirror_x >= 0) & (mirror_x < nx) & (mirror_y >= 0) & (mirror_y < ny)
        mirror_x, mirror_y = np.clip(mirror_x, 0, nx - 1), np.clip(mirror_y, 0, ny - 1)
        symmetric = in_stamp & ~others[mirror_y, mirror_x]
        rng = np.random.default_rng([seed, int(index[i])])
        for b in range(n_bands):
            replace = others if masks is None else others & ~masks[i, b]
            usable = symmetric if masks is None else \
                symmetric & ~masks[i, b][mirror_y, mirror_x]
            mirrored = replace & usable
            stamps[i, b][mirrored] = original[i, b][mirror_y[mirrored], mirror_x[mirrored]]
            noisy = replace & ~usable
            if np.isfinite(noise_sigma[i, b]) and noise_sigma[i, b] > 0:
                stamps[i, b][noisy] = rng.normal(0.0, noise_sigma[i, b], noisy.sum())
    if return_targets:
        return stamps, neighbour, targets
    return stamps, neighbour
