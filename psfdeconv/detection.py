# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Sources in exposures: the galaxies to deconvolve and their neighbours.

`detect_galaxies` finds the sources of a band and drops the stars
(`psfdeconv.psf.find_stars`); `neighbour_segments` segments the bands'
combined signal-to-noise image, and `replace_neighbours` replaces the
pixels of other sources in each stamp by noise, so that their light is not
counted in a source's flux and shape.
"""

import warnings

import numpy as np

from ._warnings import catch_warnings
from .exceptions import InvalidInputError

__all__ = ['detect_galaxies', 'neighbour_segments', 'replace_neighbours',
           'NEIGHBOUR_OPTIONS']


#: Detection threshold (background sigma) and minimum connected pixels of
#: `detect_galaxies`, as for `psfdeconv.psf.find_stars`.
_DETECTION_SIGMA = 3.0


_DETECTION_NPIXELS = 5


#: A detection is a star when a point-like source of
#: `psfdeconv.psf.find_stars` lies within this many pixels (or a quarter of
#: the stellar FWHM, if larger) of its centroid.
_STAR_MATCH_RADIUS = 1.0


def detect_galaxies(exposure, *, threshold_sigma=_DETECTION_SIGMA,
                    n_pixels=_DETECTION_NPIXELS, star_threshold_sigma=10.0):
    """Detect the sources of an exposure and keep those that are not stars.

    The background (the mesh of `psfdeconv.psf.find_stars`) is subtracted and
    sources are segmented with `~photutils.segmentation.detect_sources`
    (``threshold_sigma`` times the background rms, ``n_pixels`` connected
    pixels) *without* deblending, so that a galaxy's star-forming knots stay
    part of it (close pairs stay one source, too). Stars are found with
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
    ...                                      seed=1)
    >>> galaxies = detect_galaxies(exposures['r'])
    >>> print(len(galaxies), galaxies.meta['n_stars'])
    3 8
    """
    import warnings

    import astropy.units as u
    from astropy.table import QTable
    from photutils.segmentation import SourceCatalog, detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning

    from ._validation import as_image_and_mask
    from .background import estimate_background
    from .psf import find_stars

    if not np.isfinite(threshold_sigma) or threshold_sigma <= 0:
        raise InvalidInputError(f'threshold_sigma = {threshold_sigma}; give a '
                                f'positive number of sigma (e.g. 3).')
    if isinstance(n_pixels, bool) or int(n_pixels) != n_pixels or n_pixels < 1:
        raise InvalidInputError(f'n_pixels = {n_pixels!r}; give an integer >= 1.')
    image, bad, _ = as_image_and_mask(exposure)
    background, rms = estimate_background(image, bad)
    subtracted = image - background
    subtracted[bad] = 0.0
    with catch_warnings():
        # An empty field gives an empty table, not an error.
        warnings.filterwarnings('ignore', category=NoDetectionsWarning)
        segm = detect_sources(subtracted, threshold_sigma * rms, int(n_pixels),
                              mask=bad)
    stars = find_stars(exposure, threshold_sigma=star_threshold_sigma,
                       all_sources=True)
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
                       n_pixels=_NEIGHBOUR_NPIXELS):
    """Segmentation map of the sources in aligned, background-subtracted bands.

    The bands are combined into one signal-to-noise image (each divided by
    its sigma-clipped standard deviation, summed over the bands valid at a
    pixel, divided by the square root of their number) and segmented with
    `~photutils.segmentation.detect_sources`, so that a neighbour bright in
    any band is found. Touching sources are not deblended: the watershed
    splits galaxies with bright knots into pieces, and a piece of the
    source itself replaced by noise costs more than a touching neighbour
    kept.

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

    Returns
    -------
    `~numpy.ndarray`
        int32 labels, shape (ny, nx); 0 where there is no source.

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
    from astropy.stats import sigma_clipped_stats
    from photutils.segmentation import detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning

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
        _, _, std = sigma_clipped_stats(image, mask=~valid, sigma=3.0)
        if std > 0:
            combined += np.where(valid, image, 0.0) / std
            count += valid
    # Each pixel's sum of unit-noise images over the bands valid there.
    bad = count == 0
    if bad.all():
        return np.zeros(combined.shape, dtype=np.int32)
    combined /= np.sqrt(np.maximum(count, 1))
    with catch_warnings():
        # An empty field is an answer here (no neighbours), not a problem.
        warnings.simplefilter('ignore', NoDetectionsWarning)
        segments = detect_sources(combined, threshold_sigma, n_pixels=n_pixels, mask=bad)
    if segments is None:
        return np.zeros(combined.shape, dtype=np.int32)
    return segments.data.astype(np.int32)


def replace_neighbours(stamps, segments, x, y, noise_sigma, *, index, masks=None,
                       dilation=_NEIGHBOUR_DILATION, seed=_NEIGHBOUR_SEED):
    """Replace the pixels of other sources in stamps by Gaussian noise.

    The source's own segment is the one at its pixel (or the largest within
    3 pixels of it); every other segment of the stamp, dilated by
    ``dilation`` pixels but never into the source's own segment, is a
    neighbour. Its pixels become draws of N(0, ``noise_sigma``), seeded by
    the source's ``index`` so that a source gets the same stamps whatever
    else is processed with it. Without this, a neighbour's light is
    deconvolved with the source and counted in its flux.

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
        entries leave that stamp unchanged.
    index : `~numpy.ndarray`
        Integer identity of each source (e.g. its row), shape (n,).
    masks : `~numpy.ndarray`, optional
        True on bad pixels, shape of ``stamps``; left unchanged.
    dilation : int, optional
        Pixels by which neighbour segments grow.
    seed : int, optional
        Seed of the noise, combined with ``index``.

    Returns
    -------
    stamps : `~numpy.ndarray`
        A copy with the neighbours' pixels replaced.
    neighbour : `~numpy.ndarray`
        bool (n, ny, nx), the replaced pixels.

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

    stamps = np.array(stamps, dtype=float)
    segments = np.asarray(segments)
    n, n_bands, ny, nx = stamps.shape
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=float), (n, n_bands))
    yy, xx = np.mgrid[:ny, :nx]
    structure = np.hypot(*np.mgrid[-dilation:dilation + 1, -dilation:dilation + 1]) \
        <= dilation if dilation > 0 else None
    neighbour = np.zeros((n, ny, nx), dtype=bool)
    for i in range(n):
        labels = segments[i]
        if not labels.any():
            continue
        with np.errstate(invalid='ignore'):
            near = np.hypot(xx - x[i], yy - y[i]) <= _TARGET_RADIUS
        cx, cy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        target = labels[cy, cx] if 0 <= cy < ny and 0 <= cx < nx else 0
        if target == 0 and (labels[near] > 0).any():
            found, counts = np.unique(labels[near][labels[near] > 0], return_counts=True)
            target = found[np.argmax(counts)]
        others = (labels > 0) & (labels != target)
        if not others.any():
            continue
        if structure is not None:
            others = ndimage.binary_dilation(others, structure=structure)
        if target:
            others &= labels != target
        neighbour[i] = others
        rng = np.random.default_rng([seed, int(index[i])])
        for b in range(n_bands):
            replace = others if masks is None else others & ~masks[i, b]
            if np.isfinite(noise_sigma[i, b]) and noise_sigma[i, b] > 0:
                stamps[i, b][replace] = rng.normal(0.0, noise_sigma[i, b], replace.sum())
    return stamps, neighbour
