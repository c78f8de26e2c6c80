# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
PSF sources for real exposures, and the stamp-level PSF array.

A band's PSF can come from

* the stars of the exposure: an effective PSF (ePSF, Anderson & King 2000)
  built with photutils (`find_stars` selects isolated, unsaturated,
  point-like stars; `build_epsf` runs `~photutils.psf.extract_stars` and
  `~photutils.psf.EPSFBuilder`);
* a Moffat model with a given FWHM, power index and ellipticity, drawn with
  GalSim (`moffat_psf`);
* an elliptical Moffat fitted to the stars there are (`fit_moffat_psf`),
  which `build_psfs` falls back to when too few stars allow an ePSF;
* a FITS image (`read_psf_image`, written by `write_psf_image`), resampled
  to the exposure's pixel scale when its header says it differs;
* a PSFEx model (`read_psfex`), spatially varying, rendered with GalSim;
* an NDData/CCDData exposure's own ``psf`` array (`build_psfs`);
* ePSFs built per region of the detector, interpolated by a
  `~photutils.psf.GriddedPSFModel` (`build_gridded_psf`).

Each of these is a photutils PSF model (a PSFEx model is a `PSFExModel`).
`render_psf` turns any of them into
what the deconvolution needs (`~psfdeconv.deconvolve.validate_stamps`): an
odd-sized array centred on its middle pixel and summing to 1, as seen by a
source at a given position of the exposure. `psf_from_spec` parses the
command line's ``--psf`` strings.

**Normalisation.** photutils' convention is kept for every model returned
here: the array of an `~photutils.psf.ImagePSF` with ``oversampling=k``
sums to ``k**2``, so that the model evaluated on the native pixel grid
with ``flux=1`` sums to 1. Arrays read from files are renormalised to this
convention whatever their own normalisation. `render_psf` renormalises its
output to unit sum.

**photutils 3.0.** The ePSF builder of photutils 3.0 (the last release for
Python 3.11) has two bugs fixed only in 3.1 (a dotted pattern at
oversampling > 1, photutils issue 1404, and stale fluxes in the
renormalisation). Oversampling 2 is the default here because it was the
most accurate on simulated Moffat stars; the test suite checks the ePSF
against the known PSF.
"""

import re
import warnings
from pathlib import Path

import numpy as np

from ._validation import angle_arcsec, as_image_and_mask, exception_text, scalar_pixel_scale
from ._warnings import catch_warnings
from .background import estimate_background
from .exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPSFError,
    PSFDeconvWarning,
)

__all__ = [
    'find_stars',
    'build_epsf',
    'build_gridded_psf',
    'moffat_psf',
    'fit_moffat_psf',
    'read_psf_image',
    'read_psfex',
    'PSFExModel',
    'write_psf_image',
    'render_psf',
    'half_peak_fwhm',
    'MIN_MOFFAT_BETA',
    'psf_from_spec',
    'build_psfs',
    'grid_extrapolated',
    'render_stamp_psfs',
]

#: Detection threshold (in background sigma) of the segmentation. It is
#: lower than the star threshold so that faint neighbours count against
#: isolation.
_DETECTION_SIGMA = 3.0
#: Minimum number of connected pixels of a detection.
_DETECTION_NPIXELS = 5
#: Largest ellipticity (1 - b/a) of a point-like source.
_MAX_ELLIPTICITY = 0.25
#: Largest shift between the isophotal and windowed centroids of a
#: point-like source, in units of its FWHM (at least 0.2 pixel).
_MAX_CENTROID_SHIFT = 0.1
#: A point-like source's FWHM lies within this factor of the stellar locus.
_FWHM_TOLERANCE = 1.25
#: The stellar locus is the most compact cluster of at least this fraction
#: of the largest cluster's members ...
_LOCUS_MIN_FRACTION = 0.2
#: ... and of at least this many sources.
_LOCUS_MIN_MEMBERS = 5
#: Smallest Moffat power index `moffat_psf` draws (GalSim's FFT of a Moffat
#: of beta 1.2 would take petabytes; 1.5 takes a second) and `fit_moffat_psf`
#: fits: seeing has 2 to 5.
MIN_MOFFAT_BETA = 1.5
#: Smallest FWHM (pixels) of a star: a single hot pixel's is 1.13.
_MIN_STAR_FWHM = 1.2
#: A rendered PSF whose model sum over the stamp falls outside this range
#: (before renormalisation) triggers a warning.
_RENDER_SUM_RANGE = (0.8, 1.25)

#: Largest Moffat FWHM, arcsec and native pixels: seeing is a few arcsec,
#: and a PSF this wide would not fit in any stamp (nor, drawn, in memory).
_MAX_FWHM_ARCSEC = 100.0
_MAX_FWHM_PIXELS = 100
#: Smallest side (native pixels) of a PSF image: a 3x3 image cannot hold a
#: core and its wings (the ePSFs are 25 pixels, the simulations' PSFs 41).
_MIN_PSF_SIZE = 5
#: A PSF image's pedestal (soft bias) is subtracted when the median of its
#: border is above this fraction of the peak and the border is flat (its
#: 10-90 percentile spread below `_PEDESTAL_FLATNESS` of its median).
_PEDESTAL_FRACTION = 0.01
_PEDESTAL_FLATNESS = 0.1

_SPEC_FORMS = ("'epsf', 'epsf:grid=NYxNX' (e.g. 'epsf:grid=2x2'), "
               "'moffat:fwhm=0.8arcsec,beta=3[,e1=0.0,e2=0.0]' and "
               "'psf=FILE'")


# --- Input helpers ---------------------------------------------------------

def _saturation_level(saturation, meta):
    if saturation is None:
        for key in ('SATURATE', 'SATURATION', 'SATLEVEL'):
            if key in meta:
                saturation = meta[key]
                break
    if saturation is None:
        return None
    saturation = float(saturation)
    if not np.isfinite(saturation):
        raise InvalidInputError(f'saturation = {saturation}; give a finite '
                                f'level in the units of the raw data, or '
                                f'None.')
    return saturation


# --- Star selection ----------------------------------------------------------

def _segment_peaks(subtracted, segm):
    """The highest pixel of each segment of ``segm`` (in ``segm.labels`` order).

    Over each segment's bounding box: `scipy.ndimage.maximum` visits every
    pixel of the frame with a slow generic loop (a second per 3k x 3k frame).
    """
    data = segm.data
    return np.array([subtracted[box][data[box] == label].max()
                     for label, box in zip(segm.labels, segm.slices, strict=True)],
                    dtype=float)


def _bright_labels(subtracted, segm, rms, threshold_sigma):
    """The labels of the segments whose peak signal-to-noise reaches
    ``threshold_sigma`` (the test of ``_bright``, on the same pixels)."""
    return np.asarray(segm.labels)[_segment_peaks(subtracted, segm) / rms >= threshold_sigma]


def _area_fwhm(area):
    """FWHM (pixels) from the area above half the peak: the diameter of a disc
    of that area (a star's in `find_stars`, a PSF's in `half_peak_fwhm`)."""
    return 2.0 * np.sqrt(np.asarray(area, dtype=float) / np.pi)


def _detect(image, mask, background, rms, *, threshold_sigma, box_size,
            saturation, bright_only=False, segments=None):
    """Every detection with its measurements and flags (no locus yet).

    With ``bright_only`` only the detections whose peak reaches
    ``threshold_sigma`` are deblended and measured: the others can be
    neither a star nor a locus source, and deblending a segment never gives
    a child brighter than its parent, so the bright rows are those of the
    full table (their segments, and so the isolation test, are the same);
    their ``centroid_shift`` is measured only where the other tests of a
    compact source (`_select`) pass, NaN elsewhere.
    ``segments``: the deblended segmentation of this image at the detection
    threshold and pixels of this module, when the caller already has it.
    """
    from astropy.table import QTable
    from photutils.segmentation import SourceCatalog
    from scipy import ndimage

    from ._segments import deblend, segments_above

    subtracted = image - background
    subtracted[mask] = 0.0
    if segments is not None:
        segm = segments
    else:
        detection_sigma = min(_DETECTION_SIGMA, threshold_sigma)
        # None for an empty field: an empty table, not an error.
        segm = segments_above(subtracted, detection_sigma * rms, _DETECTION_NPIXELS,
                              mask=mask)
    if segm is not None and segments is None:
        # Deblending splits a star from a galaxy it sits on (or from a
        # close companion), so that the isolation test below sees both.
        # It is most of the cost on a large frame; faint segments, which
        # hold no star candidate, need not be split.
        to_split = _bright_labels(subtracted, segm, rms, threshold_sigma) \
            if bright_only else None
        segm = deblend(subtracted, segm, _DETECTION_NPIXELS, labels=to_split)
    measured = None
    if segm is not None and bright_only:
        measured = _bright_labels(subtracted, segm, rms, threshold_sigma)
        if not len(measured):
            segm = None
    table = QTable()
    names = ('id', 'x', 'y', 'flux', 'peak', 'snr', 'fwhm', 'ellipticity',
             'centroid_shift', 'saturated', 'edge', 'masked', 'isolated', 'point_like',
             'selected')
    if segm is None:
        flags = names[9:] + ('_bright',)
        for name in names + ('_bright',):
            table[name] = np.zeros(0, dtype=bool if name in flags else float)
        return table
    catalog = SourceCatalog(subtracted, segm, mask=mask)
    if measured is not None:
        catalog = catalog.select_labels(measured)
    labels = np.asarray(catalog.labels)
    peak = np.asarray(catalog.max_value, dtype=float)
    snr = peak / rms
    bright = snr >= threshold_sigma

    # FWHM from the area above half the peak: unlike the second moments of
    # the segment it does not grow with the star's flux (Moffat wings).
    half = np.zeros(segm.max_label + 1)
    half[labels] = 0.5 * peak
    above = (subtracted >= half[segm.data]) & (segm.data > 0)
    area = ndimage.sum_labels(above, segm.data, labels)
    fwhm = _area_fwhm(area)

    x = np.asarray(catalog.x_centroid, dtype=float)
    y = np.asarray(catalog.y_centroid, dtype=float)
    ny, nx = image.shape
    half_box = box_size // 2
    ix = np.round(x).astype(int)
    iy = np.round(y).astype(int)
    edge = ((ix - half_box < 0) | (iy - half_box < 0)
            | (ix + half_box > nx - 1) | (iy + half_box > ny - 1))
    ellipticity = np.asarray(catalog.ellipticity, dtype=float)
    isolated = np.zeros(len(labels), dtype=bool)
    masked = np.zeros(len(labels), dtype=bool)
    for i, label in enumerate(labels):
        sl = (slice(max(iy[i] - half_box, 0), iy[i] + half_box + 1),
              slice(max(ix[i] - half_box, 0), ix[i] + half_box + 1))
        others = segm.data[sl]
        isolated[i] = not np.any((others != 0) & (others != label))
        masked[i] = bool(mask[sl].any())

    if saturation is None:
        saturated = np.zeros(len(labels), dtype=bool)
    else:
        raw = np.where(mask, -np.inf, image)
        raw_peak = np.asarray(ndimage.maximum(raw, segm.data, labels))
        saturated = raw_peak >= saturation

    # A star on a galaxy (or on a companion too close to deblend) has an
    # isophotal centroid pulled away from its windowed (local) centroid.
    # photutils' windowed centroid (a Kron radius and flux, a half-light
    # radius, then the iterations) is the dearest measurement here: with
    # bright_only it is measured only where the other tests of `_select`'s
    # compact sources pass (NaN elsewhere, which fails that test too).
    windowed = np.ones(len(labels), dtype=bool)
    if bright_only:
        windowed = _compact_but_centroid(bright, saturated, edge, ellipticity, fwhm)
    centroid_shift = np.full(len(labels), np.nan)
    if windowed.any():
        tested = catalog if windowed.all() else catalog.select_labels(labels[windowed])
        x_win = np.asarray(tested.x_centroid_win, dtype=float).reshape(-1)
        y_win = np.asarray(tested.y_centroid_win, dtype=float).reshape(-1)
        centroid_shift[windowed] = np.hypot(x[windowed] - x_win, y[windowed] - y_win)

    table['id'] = labels
    table['x'] = x
    table['y'] = y
    table['flux'] = np.asarray(catalog.segment_flux, dtype=float)
    table['peak'] = peak
    table['snr'] = snr
    table['fwhm'] = fwhm
    table['ellipticity'] = ellipticity
    table['centroid_shift'] = centroid_shift
    table['saturated'] = saturated
    table['edge'] = edge
    table['masked'] = masked
    table['isolated'] = isolated
    table['point_like'] = np.zeros(len(labels), dtype=bool)
    table['selected'] = np.zeros(len(labels), dtype=bool)
    table['_bright'] = bright
    return table


def _compact_but_centroid(bright, saturated, edge, ellipticity, fwhm):
    """Every test of a compact source (`_select`) but the centroid shift:
    bright, unsaturated, inside, round and with a FWHM."""
    return (np.asarray(bright) & ~np.asarray(saturated) & ~np.asarray(edge)
            & (np.asarray(ellipticity) < _MAX_ELLIPTICITY) & (np.asarray(fwhm) > 0))


def _stellar_locus(fwhm):
    """The FWHM of the most compact well-populated cluster of sources.

    Each source counts the sources within the tolerance of its FWHM; the
    locus is the smallest FWHM whose count reaches `_LOCUS_MIN_FRACTION` of
    the largest count (and `_LOCUS_MIN_MEMBERS`), the median of its
    members. Stars are the most compact sources, but on a deep frame the
    compact galaxies can outnumber them: the largest cluster (a mode) then
    sits on the galaxies and every star is rejected as too small. Single-pixel
    spikes (FWHM below `_MIN_STAR_FWHM`) cannot be stars.
    """
    fwhm = np.asarray(fwhm, dtype=float)
    if (fwhm >= _MIN_STAR_FWHM).any():
        fwhm = fwhm[fwhm >= _MIN_STAR_FWHM]
    log_fwhm = np.log(fwhm)
    window = np.log(_FWHM_TOLERANCE)
    counts = (np.abs(log_fwhm[:, None] - log_fwhm[None, :]) <= window).sum(1)
    needed = min(max(_LOCUS_MIN_FRACTION * counts.max(), _LOCUS_MIN_MEMBERS),
                 counts.max())
    candidates = np.flatnonzero(counts >= needed)
    start = candidates[np.argmin(fwhm[candidates])]
    # The densest point of that cluster: the most compact clusters' edges
    # reach the counts needed before their centres.
    near = np.flatnonzero(np.abs(log_fwhm - log_fwhm[start]) <= window)
    best = near[counts[near] == counts[near].max()]
    centre = fwhm[best[np.argmin(fwhm[best])]]
    members = np.abs(log_fwhm - np.log(centre)) <= window
    return float(np.median(fwhm[members])), int(members.sum())


def _select(table, *, fwhm_guess, max_stars, psf_fwhm=None):
    """Fill ``point_like`` and ``selected`` in a `_detect` table (in place)
    and return the stellar-locus FWHM (NaN when there is no candidate):
    ``fwhm_guess`` if given, else the locus of the compact sources, or
    ``psf_fwhm`` where fewer than `_LOCUS_MIN_MEMBERS` of them make it."""
    fwhm = np.asarray(table['fwhm'])
    compact = (_compact_but_centroid(table['_bright'], table['saturated'], table['edge'],
                                     table['ellipticity'], fwhm)
               & (np.asarray(table['centroid_shift'])
                  <= np.maximum(_MAX_CENTROID_SHIFT * fwhm, 0.2)))
    if fwhm_guess is not None:
        locus = float(fwhm_guess)
    elif compact.any():
        # The brightest compact sources define the locus (at most 200, so
        # the pairwise mode stays cheap on crowded frames).
        index = np.flatnonzero(compact)
        index = index[np.argsort(-np.asarray(table['flux'][index]))][:200]
        locus, members = _stellar_locus(np.asarray(table['fwhm'][index]))
        if members < _LOCUS_MIN_MEMBERS and psf_fwhm is not None:
            # Too few compact sources to tell stars from compact galaxies
            # (a lone bulge would be its own locus): a known PSF decides.
            locus = float(psf_fwhm)
    elif psf_fwhm is not None:
        locus = float(psf_fwhm)
    else:
        locus = np.nan
    if np.isfinite(locus):
        ratio = np.asarray(table['fwhm']) / locus
        point_like = (compact & (ratio <= _FWHM_TOLERANCE)
                      & (ratio >= 1 / _FWHM_TOLERANCE))
    else:
        point_like = np.zeros(len(table), dtype=bool)
    table['point_like'] = point_like
    good = np.flatnonzero(point_like & table['isolated'] & ~table['masked'])
    good = good[np.argsort(-np.asarray(table['flux'][good]))][:max_stars]
    selected = np.zeros(len(table), dtype=bool)
    selected[good] = True
    table['selected'] = selected
    return locus


def _finish_table(table, *, locus, background, rms, all_sources):
    import astropy.units as u

    table.remove_column('_bright')
    table.sort('flux', reverse=True)
    table.meta['fwhm_locus'] = locus
    table.meta['background'] = float(np.median(background))
    table.meta['background_rms'] = rms
    table.meta['n_detected'] = len(table)
    table.meta['n_selected'] = int(table['selected'].sum())
    if not all_sources:
        table = table[table['selected']]
    for name in ('x', 'y', 'fwhm', 'centroid_shift'):
        table[name] = table[name] * u.pix
    return table


def _validate_positive_int(name, value, minimum=1):
    try:
        valid = (not isinstance(value, bool) and int(value) == value
                 and value >= minimum)
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise InvalidInputError(f'{name} = {value!r}; give an integer >= '
                                f'{minimum}.')
    return int(value)


def find_stars(data, *, mask=None, threshold_sigma=10.0, fwhm_guess=None,
               box_size=25, max_stars=100, saturation=None,
               all_sources=False, psf_fwhm=None):
    """Find isolated, unsaturated, point-like stars in an exposure.

    The background (a 64-pixel `~photutils.background.Background2D` mesh,
    or sigma-clipped statistics on small images) is subtracted and sources
    are detected by image segmentation
    (`~photutils.segmentation.detect_sources`, 3 sigma, 5 connected
    pixels) and measured with `~photutils.segmentation.SourceCatalog`. A
    detection is selected as a star when it is

    * bright: peak above ``threshold_sigma`` times the background rms;
    * unsaturated: raw peak below ``saturation``;
    * isolated: no pixel of another detection within the
      ``box_size`` x ``box_size`` box centred on it, and no masked pixel;
    * inside: that box lies within the image;
    * point-like: ellipticity :math:`1 - b/a < 0.25`, isophotal and
      windowed centroids within 0.1 FWHM (at least 0.2 pixel) of each
      other (a star sitting on a galaxy fails this), and a FWHM within a
      factor 1.25 of the stellar locus. The FWHM is that of a disc with
      the area of the pixels above half the peak; the locus is
      ``fwhm_guess`` or, by default, the most compact cluster of FWHMs
      among the 200 brightest compact sources that holds at least a fifth
      as many sources as the largest cluster (so that compact galaxies,
      which outnumber the stars on a deep frame, and blends do not move it
      off the stars).

    Detections are deblended (`~photutils.segmentation.deblend_sources`)
    before the isolation test, so that a star and a galaxy or companion
    it touches count as two sources. Without ``all_sources`` only the
    detections whose peak reaches ``threshold_sigma`` are deblended and
    measured (the fainter ones cannot be stars; the stars found are the
    same), which is most of the time saved on a large frame.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.nddata.NDData` or `~astropy.nddata.CCDData`
        The exposure (2-D). NaN/inf pixels and the NDData mask are masked.
        An NDData's ``meta['SATURATE']`` is used when ``saturation`` is
        None.
    mask : array_like of bool, optional
        Pixels to ignore (True = bad), the shape of the image.
    threshold_sigma : float, optional
        Minimum peak signal-to-noise ratio of a star.
    fwhm_guess : float, optional
        Stellar FWHM in pixels; replaces the automatic stellar locus.
    box_size : int, optional
        Side of the isolation box in pixels (use the ePSF cutout size).
    max_stars : int, optional
        Keep at most this many stars (the brightest).
    saturation : float, optional
        Saturation level of the raw data (before background subtraction).
        Default: the ``SATURATE`` header value of an NDData, else none.
    all_sources : bool, optional
        Return every detection with its flags instead of the selected
        stars only.
    psf_fwhm : float, optional
        The FWHM (pixels) of a known PSF (e.g. `half_peak_fwhm`): the stellar
        locus where fewer than 5 compact sources make one, so that a frame
        with few stars does not take its most compact galaxy (a bulge) for
        the stars' FWHM.

    Returns
    -------
    stars : `~astropy.table.QTable`
        One row per star, brightest first: ``id`` (segment label),
        ``x``, ``y`` (centroid, 0-based pixels), ``flux`` and ``peak``
        (background-subtracted, data units), ``snr`` (peak over background
        rms), ``fwhm`` (pixels), ``ellipticity``, ``centroid_shift``
        (pixels, isophotal minus windowed centroid), and the flags
        ``saturated``, ``edge``, ``masked``, ``isolated``, ``point_like``
        and ``selected``. ``meta`` holds ``fwhm_locus`` (pixels),
        ``background``, ``background_rms``, ``n_detected`` (the rows
        measured: every detection with ``all_sources``, else those bright
        enough to be a star) and ``n_selected``.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the image is not 2-D, is entirely masked, or an option is out
        of range.

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.psf import MoffatPSF, make_psf_model_image
    >>> from psfdeconv.psf import find_stars
    >>> image, truth = make_psf_model_image(
    ...     (151, 151), MoffatPSF(alpha=3.9, beta=3.0), 12,
    ...     model_shape=(41, 41), min_separation=30, flux=(2000, 20000),
    ...     seed=0)
    >>> image += 1.0 + 0.5 * np.random.default_rng(1).standard_normal(image.shape)
    >>> stars = find_stars(image)
    >>> print(len(stars), round(stars.meta['fwhm_locus'], 1))
    ... # doctest: +FLOAT_CMP
    12 4.2
    """
    _validate_positive_int('box_size', box_size, 3)
    _validate_positive_int('max_stars', max_stars, 1)
    if not np.isfinite(threshold_sigma) or threshold_sigma <= 0:
        raise InvalidInputError(f'threshold_sigma = {threshold_sigma}; give '
                                f'a positive number of sigma (e.g. 10).')
    for name, value in (('fwhm_guess', fwhm_guess), ('psf_fwhm', psf_fwhm)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InvalidInputError(f'{name} = {value}; give a positive FWHM in '
                                    f'pixels, or None.')
    image, bad, meta = as_image_and_mask(data, mask)
    saturation = _saturation_level(saturation, meta)
    background, rms = estimate_background(image, bad)
    table = _detect(image, bad, background, rms,
                    threshold_sigma=threshold_sigma, box_size=box_size,
                    saturation=saturation, bright_only=not all_sources)
    locus = _select(table, fwhm_guess=fwhm_guess, max_stars=max_stars, psf_fwhm=psf_fwhm)
    return _finish_table(table, locus=locus, background=background, rms=rms,
                         all_sources=all_sources)


def point_sources(image, bad, background, rms, segments, *, threshold_sigma, meta,
                  psf_fwhm=None):
    """The bright detections of `find_stars` with their ``point_like`` flag and
    the ``fwhm_locus``, from a segmentation the caller already made.

    ``image``, ``bad``, ``background`` and ``rms`` as `find_stars` makes them
    from the exposure, and ``segments`` the deblended segmentation of the
    background-subtracted image at `find_stars`'s threshold and connected
    pixels (as `~psfdeconv.detection.detect_galaxies` makes it with its
    defaults): the same point-like rows and locus as
    ``find_stars(exposure, threshold_sigma=..., all_sources=True,
    psf_fwhm=...)``, without segmenting and deblending the image a second
    time (``centroid_shift`` is NaN where the other point-like tests fail).
    """
    table = _detect(image, bad, background, rms, threshold_sigma=threshold_sigma,
                    box_size=25, saturation=_saturation_level(None, meta),
                    bright_only=True, segments=segments)
    locus = _select(table, fwhm_guess=None, max_stars=100, psf_fwhm=psf_fwhm)
    return _finish_table(table, locus=locus, background=background, rms=rms,
                         all_sources=True)


# --- ePSF ------------------------------------------------------------------

def _star_positions(stars):
    """(x, y) arrays from a star table (honouring a ``selected`` column)."""
    names = getattr(stars, 'colnames', None)
    if names is None or 'x' not in names or 'y' not in names:
        raise InvalidInputError(f'stars must be a table with x and y '
                                f'columns (0-based pixels), got columns '
                                f'{names}; use find_stars to make one.')
    if 'selected' in names:
        stars = stars[np.asarray(stars['selected'], dtype=bool)]
    x = np.asarray(getattr(stars['x'], 'value', stars['x']), dtype=float)
    y = np.asarray(getattr(stars['y'], 'value', stars['y']), dtype=float)
    return x, y


def _build_epsf_from_positions(subtracted, bad, x, y, *, size, oversampling,
                               maxiters, min_stars, where=''):
    from astropy.modeling.fitting import LevMarLSQFitter
    from astropy.nddata import NDData
    from astropy.table import Table
    from photutils.psf import EPSFBuilder, ImagePSF, extract_stars

    ny, nx = subtracted.shape
    half = size // 2
    ix = np.round(x).astype(int)
    iy = np.round(y).astype(int)
    # extract_stars drops (with a warning) stars whose cutout leaves the
    # image; drop them here instead.
    inside = ((ix - half >= 0) & (iy - half >= 0) & (ix + half <= nx - 1)
              & (iy + half <= ny - 1) & np.isfinite(x) & np.isfinite(y))
    n_stars = int(inside.sum())
    if n_stars < min_stars:
        raise InvalidPSFError(
            f'found {n_stars} usable star(s){where} for the ePSF, fewer than '
            f'min_stars = {min_stars}; give --psf moffat:fwhm=...,beta=... '
            f'or a PSF file (--psf psf=FILE), or relax the star selection '
            f'(--star-threshold-sigma, --box-size, --min-stars; threshold_sigma, '
            f'box_size and min_stars of epsf_options in Python).')
    catalog = Table({'x': x[inside], 'y': y[inside]})
    stars = extract_stars(NDData(subtracted, mask=bad), catalog,
                          size=(size, size))
    # Each iteration fits every star's centre and flux: MINPACK's
    # Levenberg-Marquardt finds the minimum of photutils' default (TRF) in
    # 0.6 of the time, the ePSF within 2e-7 of its peak
    # (benchmarks/bench_epsf.py).
    builder = EPSFBuilder(oversampling=oversampling, maxiters=maxiters,
                          fitter=LevMarLSQFitter(calc_uncertainties=False),
                          progress_bar=False)
    with catch_warnings():
        # Stars whose fit fails are excluded one warning each; the count
        # is checked below instead.
        warnings.filterwarnings('ignore', message='.*excluded from ePSF',
                                category=Warning)
        result = builder(stars)
    n_used = n_stars - int(result.n_excluded_stars)
    if n_used < min_stars:
        raise InvalidPSFError(
            f'only {n_used} of {n_stars} star(s){where} could be fitted by '
            f'the ePSF builder, fewer than min_stars = {min_stars} (--min-stars); '
            f'give --psf moffat:fwhm=...,beta=... or a PSF file (--psf psf=FILE).')
    epsf = result.epsf
    total = float(np.sum(epsf.data))
    if not np.all(np.isfinite(epsf.data)) or total <= 0:
        raise InvalidPSFError(f'the ePSF{where} built from {n_used} stars '
                              f'sums to {total}; check the star selection or '
                              f'give --psf moffat:... or a PSF file.')
    # Enforce photutils' convention exactly (sum = oversampling**2). A new
    # model, because ImagePSF caches its interpolator.
    normalised = ImagePSF(epsf.data * (oversampling ** 2 / total),
                          origin=epsf.origin, oversampling=epsf.oversampling)
    normalised.meta.update({'n_stars': n_used, 'oversampling': oversampling})
    return normalised


def _check_epsf_options(size, oversampling, maxiters, min_stars):
    _validate_positive_int('size', size, 3)
    if size % 2 == 0:
        raise InvalidPSFError(f'size = {size}; the ePSF cutout size must be '
                              f'odd (e.g. {size + 1}).')
    _validate_positive_int('oversampling', oversampling, 1)
    _validate_positive_int('maxiters', maxiters, 1)
    _validate_positive_int('min_stars', min_stars, 1)


def build_epsf(data, *, stars=None, mask=None, size=25, oversampling=2,
               maxiters=10, min_stars=5, **find_kwargs):
    """Build an effective PSF from the stars of an exposure.

    The background is subtracted (as in `find_stars`), ``size`` x
    ``size`` cutouts are extracted around the stars with
    `~photutils.psf.extract_stars`, and `~photutils.psf.EPSFBuilder`
    stacks them on a grid ``oversampling`` times finer than the pixels.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.nddata.NDData` or `~astropy.nddata.CCDData`
        The exposure (2-D); the NDData mask and non-finite pixels are
        masked (weight 0).
    stars : `~astropy.table.Table`, optional
        Star positions in ``x``, ``y`` columns (0-based pixels). If the
        table has a boolean ``selected`` column, only those rows are used.
        Default: `find_stars` with ``box_size=size`` and ``find_kwargs``.
    mask : array_like of bool, optional
        Pixels to ignore (True = bad).
    size : int, optional
        Odd side of the star cutouts, in pixels; the ePSF array has
        ``size * oversampling`` (+1 if even) fine pixels a side.
    oversampling : int, optional
        ePSF oversampling factor. 2 is the most accurate with photutils
        3.0 (see the module notes).
    maxiters : int, optional
        Iterations of the builder.
    min_stars : int, optional
        Fewest stars accepted.
    **find_kwargs
        Passed to `find_stars` (``threshold_sigma``, ``fwhm_guess``,
        ``max_stars``, ``saturation``, ``box_size``).

    Returns
    -------
    epsf : `~photutils.psf.ImagePSF`
        Its array sums to ``oversampling**2``; ``meta`` holds
        ``n_stars`` and ``oversampling``.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        With the number of stars found, if fewer than ``min_stars`` are
        usable, or if the ePSF does not have a positive sum.
    psfdeconv.exceptions.InvalidInputError
        For a bad image, table or option.

    Notes
    -----
    Accuracy (oversampling 2): ``tests/test_psf.py`` checks the rendered
    ePSF against the true PSF of simulated Moffat fields, pixel by pixel
    and in FWHM.

    Speed: with oversampling > 1, fine pixels on the ePSF border that no
    star happens to sample are filled by photutils' cubic interpolation,
    which takes about 0.1-2 s per iteration on its own; with fewer than
    about 50 stars this is common, and dominates the run time (0.2 s
    without it for 20 stars, up to tens of seconds with it). Lower
    ``maxiters`` or use ``oversampling=1`` (no such pixels) when speed
    matters more than sub-pixel accuracy.

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.psf import MoffatPSF, make_psf_model_image
    >>> from psfdeconv.psf import build_epsf, render_psf
    >>> image, truth = make_psf_model_image(
    ...     (201, 201), MoffatPSF(alpha=3.9, beta=3.0), 20,
    ...     model_shape=(41, 41), min_separation=25, flux=(5000, 20000),
    ...     seed=14)
    >>> image += 0.5 * np.random.default_rng(1).standard_normal(image.shape)
    >>> epsf = build_epsf(image, maxiters=3)
    >>> print(epsf.meta['n_stars'])
    20
    >>> print(epsf.data.shape, round(float(epsf.data.sum()), 6))
    (51, 51) 4.0
    >>> psf = render_psf(epsf, size=25)
    >>> print(psf.shape, round(float(psf.sum()), 6))
    (25, 25) 1.0
    """
    _check_epsf_options(size, oversampling, maxiters, min_stars)
    image, bad, meta = as_image_and_mask(data, mask)
    background, rms = estimate_background(image, bad)
    if stars is None:
        options = dict(threshold_sigma=10.0, fwhm_guess=None, box_size=size,
                       max_stars=100, saturation=None)
        unknown = set(find_kwargs) - set(options)
        if unknown:
            raise InvalidInputError(f'unknown option(s) {sorted(unknown)} for '
                                    f'build_epsf; star selection accepts '
                                    f'{sorted(options)}.')
        options.update(find_kwargs)
        saturation = _saturation_level(options['saturation'], meta)
        table = _detect(image, bad, background, rms,
                        threshold_sigma=options['threshold_sigma'],
                        box_size=options['box_size'], saturation=saturation,
                        bright_only=True)
        _select(table, fwhm_guess=options['fwhm_guess'],
                max_stars=options['max_stars'])
        keep = np.asarray(table['selected'], dtype=bool)
        x = np.asarray(table['x'])[keep]
        y = np.asarray(table['y'])[keep]
    else:
        if find_kwargs:
            raise InvalidInputError(f'star selection options '
                                    f'{sorted(find_kwargs)} have no effect '
                                    f'when stars are given; drop them.')
        x, y = _star_positions(stars)
    subtracted = image - background
    subtracted[bad] = 0.0
    return _build_epsf_from_positions(subtracted, bad, x, y, size=size,
                                      oversampling=oversampling,
                                      maxiters=maxiters, min_stars=min_stars)


def build_gridded_psf(data, *, grid_shape=(2, 2), mask=None, size=25,
                      oversampling=2, maxiters=10, min_stars=5,
                      **find_kwargs):
    """Build a spatially varying PSF from ePSFs of detector regions.

    The image is cut into ``grid_shape`` equal regions. Sources are
    detected once on the whole image (so isolation and background do not
    stop at region borders); the point-like selection (stellar locus) is
    then made separately in each region, so that a PSF width that changes
    across the detector does not reject the stars of one side. Each
    region's ePSF comes from the stars whose centroids fall in it and is
    placed at the region's centre; `~photutils.psf.GriddedPSFModel`
    interpolates bilinearly between them.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.nddata.NDData` or `~astropy.nddata.CCDData`
        The exposure (2-D).
    grid_shape : tuple of int, optional
        Regions along (y, x). Either (1, 1) or at least 2 along each axis
        (photutils needs a rectangular grid of 1 or at least 4 PSFs).
    mask, size, oversampling, maxiters, min_stars, **find_kwargs
        As for `build_epsf` (``min_stars`` applies to every region).

    Returns
    -------
    model : `~photutils.psf.GriddedPSFModel`
        ``grid_xypos`` holds the region centres (x, y); ``oversampling``
        the factor. Each ePSF array sums to ``oversampling**2``.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        Naming the region, if a region has fewer than ``min_stars`` stars.
    psfdeconv.exceptions.InvalidInputError
        For a bad image or option.

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.psf import MoffatPSF, make_psf_model_image
    >>> from psfdeconv.psf import build_gridded_psf, render_psf
    >>> image, truth = make_psf_model_image(
    ...     (240, 240), MoffatPSF(alpha=3.9, beta=3.0), 36,
    ...     model_shape=(41, 41), min_separation=24, flux=(5000, 20000),
    ...     seed=2)
    >>> image += 0.5 * np.random.default_rng(1).standard_normal(image.shape)
    >>> model = build_gridded_psf(image, grid_shape=(2, 2), size=15,
    ...                           oversampling=1, maxiters=2, min_stars=3)
    >>> print(model.grid_xypos.tolist())
    [[59.5, 59.5], [179.5, 59.5], [59.5, 179.5], [179.5, 179.5]]
    >>> psf = render_psf(model, (100.0, 150.0), size=15)
    >>> print(psf.shape, round(float(psf.sum()), 6))
    (15, 15) 1.0
    """
    from astropy.nddata import NDData
    from photutils.psf import GriddedPSFModel

    _check_epsf_options(size, oversampling, maxiters, min_stars)
    try:
        n_gy, n_gx = (int(v) for v in grid_shape)
    except (TypeError, ValueError):
        raise InvalidInputError(f'grid_shape = {grid_shape!r}; give two '
                                f'integers (ny, nx), e.g. (2, 2).') from None
    if (n_gy, n_gx) != (1, 1) and (n_gy < 2 or n_gx < 2):
        raise InvalidInputError(f'grid_shape = {grid_shape!r}; use (1, 1) or '
                                f'at least 2 regions along each axis, e.g. '
                                f'(2, 2) (photutils interpolates on a '
                                f'rectangular grid of 1 or >= 4 PSFs).')
    options = dict(threshold_sigma=10.0, fwhm_guess=None, box_size=size,
                   max_stars=100, saturation=None)
    unknown = set(find_kwargs) - set(options)
    if unknown:
        raise InvalidInputError(f'unknown option(s) {sorted(unknown)} for '
                                f'build_gridded_psf; star selection accepts '
                                f'{sorted(options)}.')
    options.update(find_kwargs)

    image, bad, meta = as_image_and_mask(data, mask)
    saturation = _saturation_level(options['saturation'], meta)
    background, rms = estimate_background(image, bad)
    table = _detect(image, bad, background, rms,
                    threshold_sigma=options['threshold_sigma'],
                    box_size=options['box_size'], saturation=saturation,
                    bright_only=True)
    subtracted = image - background
    subtracted[bad] = 0.0

    ny, nx = image.shape
    y_edges = np.linspace(0, ny, n_gy + 1)
    x_edges = np.linspace(0, nx, n_gx + 1)
    x_all = np.asarray(table['x'], dtype=float)
    y_all = np.asarray(table['y'], dtype=float)
    epsfs, grid_xypos = [], []
    for j in range(n_gy):
        for i in range(n_gx):
            in_region = ((x_all + 0.5 >= x_edges[i])
                         & (x_all + 0.5 < x_edges[i + 1])
                         & (y_all + 0.5 >= y_edges[j])
                         & (y_all + 0.5 < y_edges[j + 1]))
            region = table[in_region]
            _select(region, fwhm_guess=options['fwhm_guess'],
                    max_stars=options['max_stars'])
            keep = np.asarray(region['selected'], dtype=bool)
            # Region centres in 0-based pixel coordinates.
            centre = (0.5 * (x_edges[i] + x_edges[i + 1]) - 0.5,
                      0.5 * (y_edges[j] + y_edges[j + 1]) - 0.5)
            where = (f' in region (row {j}, column {i}) of grid_shape '
                     f'{(n_gy, n_gx)} around (x, y) = '
                     f'({centre[0]:.1f}, {centre[1]:.1f})')
            epsf = _build_epsf_from_positions(
                subtracted, bad, np.asarray(region['x'])[keep],
                np.asarray(region['y'])[keep], size=size,
                oversampling=oversampling, maxiters=maxiters,
                min_stars=min_stars, where=where)
            epsfs.append(epsf.data)
            grid_xypos.append(centre)
    shapes = {e.shape for e in epsfs}
    if len(shapes) != 1:  # pragma: no cover - same size and oversampling
        raise InvalidPSFError(f'the regional ePSFs have different shapes '
                              f'{sorted(shapes)}.')
    nddata = NDData(np.stack(epsfs),
                    meta={'grid_xypos': grid_xypos,
                          'oversampling': oversampling})
    return GriddedPSFModel(nddata)


# --- Moffat model ------------------------------------------------------------

def moffat_psf(fwhm, beta, *, pixel_scale, e1=0.0, e2=0.0, size=None,
               oversampling=2):
    r"""A pixel-integrated, optionally elliptical Moffat PSF.

    The Moffat profile :math:`I(r) \propto (1 + (r/\alpha)^2)^{-\beta}`,
    with :math:`\mathrm{FWHM} = 2 \alpha \sqrt{2^{1/\beta} - 1}`, is
    sheared by the distortion :math:`(e_1, e_2)` (area-preserving,
    ``galsim.Shear(e1=e1, e2=e2)``), convolved with the native pixel and
    sampled on a grid ``oversampling`` times finer. This is the effective
    PSF (photutils' ePSF convention): evaluated at native pixel centres it
    gives, at any sub-pixel offset, what
    ``drawImage(method='auto')`` gives at the native scale.

    Parameters
    ----------
    fwhm : float or `~astropy.units.Quantity`
        FWHM of the round profile (before the shear), arcsec if a float.
    beta : float
        Moffat power index (>= `MIN_MOFFAT_BETA`: below it GalSim needs an FFT
        too large to draw the untruncated profile; seeing has 2 to 5).
    pixel_scale : float or `~astropy.units.Quantity`
        Native pixel scale, arcsec/pixel if a float.
    e1, e2 : float, optional
        Distortion ellipticity :math:`(a^2 - b^2)/(a^2 + b^2)` components
        (the second-moment ellipticity of `psfdeconv.measure.image_moments`);
        :math:`e_1^2 + e_2^2 < 1`.
    size : int, optional
        Odd side of the model in native pixels. Default: about 8 FWHM
        (along the major axis), made odd.
    oversampling : int, optional
        Oversampling factor of the array.

    Returns
    -------
    psf : `~photutils.psf.ImagePSF`
        Array of odd side ``size * oversampling`` (+1 if even) summing to
        ``oversampling**2`` (photutils' convention); ``meta`` records the
        parameters.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        For a FWHM, beta, ellipticity or size out of range.
    psfdeconv.exceptions.PixelScaleError
        For a pixel scale that is not a positive angle per pixel.

    Examples
    --------
    >>> import astropy.units as u
    >>> from psfdeconv.psf import moffat_psf, render_psf
    >>> psf = moffat_psf(0.8 * u.arcsec, 3.0, pixel_scale=0.2 * u.arcsec / u.pix)
    >>> print(psf.data.shape, psf.oversampling.tolist(),
    ...       round(float(psf.data.sum()), 6))
    (67, 67) [2, 2] 4.0
    >>> stamp_psf = render_psf(psf, size=25)
    >>> print(round(float(stamp_psf.sum()), 6), stamp_psf.argmax() == 12 * 25 + 12)
    1.0 True
    """
    import galsim
    from photutils.psf import ImagePSF

    fwhm_arcsec = angle_arcsec(fwhm, 'fwhm', error=InvalidPSFError)
    scale = scalar_pixel_scale(pixel_scale)
    if fwhm_arcsec > _MAX_FWHM_ARCSEC or fwhm_arcsec / scale > _MAX_FWHM_PIXELS:
        raise InvalidPSFError(
            f'fwhm = {fwhm_arcsec:g} arcsec ({fwhm_arcsec / scale:g} pixels of '
            f'{scale:g} arcsec); a PSF FWHM must be at most {_MAX_FWHM_ARCSEC:g} '
            f'arcsec and {_MAX_FWHM_PIXELS} pixels (wider than any stamp); check '
            f'the value and its unit (e.g. 0.8arcsec or 4pix).')
    beta = float(beta)
    if not np.isfinite(beta) or beta < MIN_MOFFAT_BETA:
        raise InvalidPSFError(f'beta = {beta}; the Moffat power index must '
                              f'be >= {MIN_MOFFAT_BETA} (typical seeing: 2.5 to 4.5).')
    e1, e2 = float(e1), float(e2)
    e = float(np.hypot(e1, e2))
    if not np.isfinite(e) or e >= 1:
        raise InvalidPSFError(f'(e1, e2) = ({e1}, {e2}) has |e| = {e}; the '
                              f'ellipticity must be below 1 (typically < '
                              f'0.2).')
    _validate_positive_int('oversampling', oversampling, 1)
    if size is None:
        major = (fwhm_arcsec / scale) * ((1 + e) / (1 - e)) ** 0.25
        size = max(int(np.ceil(8 * major)), 3)
        size += 1 - size % 2
    else:
        _validate_positive_int('size', size, 3)
        if size % 2 == 0:
            raise InvalidPSFError(f'size = {size}; the PSF size must be odd '
                                  f'(e.g. {size + 1}).')
    n_fine = size * oversampling
    n_fine += 1 - n_fine % 2

    profile = galsim.Moffat(beta=beta, fwhm=fwhm_arcsec)
    if e > 0:
        profile = profile.shear(galsim.Shear(e1=e1, e2=e2))
    # PSF convolved with the *native* pixel, sampled at the fine pixel
    # centres ('no_pixel'): the ePSF. Drawing with method='auto' at the
    # fine scale would integrate over fine pixels instead.
    effective = galsim.Convolve(profile, galsim.Pixel(scale))
    image = effective.drawImage(nx=n_fine, ny=n_fine,
                                scale=scale / oversampling,
                                method='no_pixel').array.astype(np.float64)
    data = image * (oversampling ** 2 / image.sum())
    psf = ImagePSF(data, oversampling=oversampling)
    psf.meta.update({'model': 'moffat', 'fwhm_arcsec': fwhm_arcsec,
                     'beta': beta, 'e1': e1, 'e2': e2,
                     'pixel_scale': scale, 'oversampling': oversampling})
    return psf


# --- Moffat fitted to a few stars ---------------------------------------------

#: Peak signal-to-noise ratio of the stars a Moffat fit accepts (lower than
#: the ePSF's 10: a few faint stars still constrain four parameters).
_FIT_THRESHOLD_SIGMA = 5.0
#: Sub-pixels per axis over which the fitted profile is integrated.
_FIT_SUBSAMPLING = 4


def _moffat_pixels(dx, dy, fwhm, beta, e1, e2):
    r"""A unit-flux elliptical Moffat integrated over pixels (sub-sampled).

    ``dx``, ``dy`` are pixel-centre offsets from the profile centre. The
    round profile :math:`(1 + r^2/\alpha^2)^{-\beta}` has the integral
    :math:`\pi \alpha^2 / (\beta - 1)`; the shear (GalSim's, from the
    distortion :math:`(e_1, e_2)`) preserves area.
    """
    e = np.hypot(e1, e2)
    factor = 1.0 / (1.0 + np.sqrt(max(1.0 - e * e, 1e-12)))  # g = e / (1 + sqrt(1 - e^2))
    g1, g2 = e1 * factor, e2 * factor
    norm = 1.0 / np.sqrt(max(1.0 - (g1 * g1 + g2 * g2), 1e-12))
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = (np.arange(_FIT_SUBSAMPLING) + 0.5) / _FIT_SUBSAMPLING - 0.5
    total = 0.0
    for oy in sub:
        for ox in sub:
            x, y = dx + ox, dy + oy
            # Inverse of the shear matrix (1 + g1, g2; g2, 1 - g1) * norm.
            u = norm * ((1 - g1) * x - g2 * y)
            v = norm * (-g2 * x + (1 + g1) * y)
            total = total + (1.0 + (u * u + v * v) / alpha ** 2) ** (-beta)
    return total * ((beta - 1.0) / (np.pi * alpha ** 2) / _FIT_SUBSAMPLING ** 2)


def _fit_cutouts(subtracted, bad, x, y, half):
    """Cutouts (n, 2 half + 1, 2 half + 1), their good-pixel weights and
    the integer centres."""
    ix = np.round(x).astype(int)
    iy = np.round(y).astype(int)
    sl = [(slice(j - half, j + half + 1), slice(i - half, i + half + 1))
          for i, j in zip(ix, iy, strict=True)]
    data = np.stack([subtracted[s] for s in sl])
    good = np.stack([~bad[s] for s in sl]).astype(float)
    return data, good, ix, iy


def _fit_moffat(data, good, offsets, fwhm_guess):
    """Least squares of elliptical Moffats sharing (FWHM, beta, e1, e2),
    each star with its own flux, centre and background."""
    from scipy.optimize import least_squares

    n, size, _ = data.shape
    half = size // 2
    grid = np.arange(size) - half
    flux0 = np.maximum((data * good).sum(axis=(1, 2)), 1e-3 * np.abs(data).max())
    scale = np.abs(flux0)
    shape0 = [np.log(fwhm_guess), 3.0, 0.0, 0.0]
    stars0 = np.column_stack([flux0 / scale, offsets[:, 0], offsets[:, 1],
                              np.zeros(n)])
    p0 = np.concatenate([shape0, stars0.ravel()])
    lower = np.concatenate([[np.log(0.5), MIN_MOFFAT_BETA, -0.6, -0.6],
                            np.tile([0.0, -2.0, -2.0, -np.inf], n)])
    upper = np.concatenate([[np.log(4.0 * half), 20.0, 0.6, 0.6],
                            np.tile([np.inf, 2.0, 2.0, np.inf], n)])
    p0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
    # Each star's residuals in units of its peak, so that one bright star
    # does not decide the shape alone.
    weights = good / np.maximum(data.max(axis=(1, 2)), 1e-30)[:, None, None]
    yy, xx = np.meshgrid(grid, grid, indexing='ij')

    def residuals(p):
        fwhm, beta, e1, e2 = np.exp(p[0]), p[1], p[2], p[3]
        out = np.empty_like(data)
        for k in range(n):
            f, cx, cy, b = p[4 + 4 * k: 8 + 4 * k]
            model = f * scale[k] * _moffat_pixels(xx - cx, yy - cy, fwhm, beta, e1, e2)
            out[k] = (data[k] - model - b * scale[k] / size ** 2) * weights[k]
        return out.ravel()

    result = least_squares(residuals, p0, bounds=(lower, upper), x_scale='jac')
    p = result.x
    return {'fwhm': float(np.exp(p[0])), 'beta': float(p[1]),
            'e1': float(p[2]), 'e2': float(p[3]), 'success': bool(result.success),
            'cost': float(result.cost)}


def _fit_candidates(image, bad, background, rms, *, threshold_sigma, fwhm_guess,
                    saturation, max_stars):
    """Positions of point-like, isolated, unsaturated sources for a fit,
    with relaxed thresholds, and the fit cutout half-size."""
    table = _detect(image, bad, background, rms,
                    threshold_sigma=min(threshold_sigma, _FIT_THRESHOLD_SIGMA),
                    box_size=25, saturation=saturation, bright_only=True)
    locus = _select(table, fwhm_guess=fwhm_guess, max_stars=max_stars)
    if not np.isfinite(locus):
        return table, np.zeros(0), np.zeros(0), locus, 0
    # A cutout of about 5 FWHM: enough wings for beta, small enough to
    # stay clear of neighbours.
    half = int(np.clip(np.ceil(2.5 * locus), 5, 20))
    table = _detect(image, bad, background, rms,
                    threshold_sigma=min(threshold_sigma, _FIT_THRESHOLD_SIGMA),
                    box_size=2 * half + 1, saturation=saturation, bright_only=True)
    _select(table, fwhm_guess=locus, max_stars=max_stars)
    keep = np.asarray(table['selected'], dtype=bool)
    return (table, np.asarray(table['x'])[keep], np.asarray(table['y'])[keep],
            locus, half)


def fit_moffat_psf(data, *, stars=None, mask=None, pixel_scale=None,
                   threshold_sigma=10.0, fwhm_guess=None, max_stars=20,
                   saturation=None, box_size=None):
    r"""Fit an elliptical Moffat PSF to the stars of an exposure.

    For frames with too few stars for an ePSF (`build_epsf`). Candidate
    stars are found as by `find_stars` but with a peak signal-to-noise
    ratio of only ``min(threshold_sigma, 5)`` and an isolation box of
    about 5 FWHM. A Moffat (`moffat_psf`: FWHM, :math:`\beta`,
    :math:`e_1`, :math:`e_2`, integrated over the pixels) is fitted by
    least squares to the background-subtracted cutouts of all the stars at
    once, each star with its own flux, centre and constant background;
    residuals are weighted by each star's peak so that the brightest star
    does not decide alone.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.nddata.NDData` or `~astropy.nddata.CCDData`
        The exposure (2-D).
    stars : `~astropy.table.Table`, optional
        Star positions (``x``, ``y``, 0-based pixels; a ``selected``
        column is honoured). Default: found as described above.
    mask : array_like of bool, optional
        Pixels to ignore (True = bad).
    pixel_scale : float or `~astropy.units.Quantity`, optional
        Native pixel scale (arcsec/pixel), recorded in the model's meta
        (``fwhm_arcsec``). Default: 1 (the FWHM is then in pixels).
    threshold_sigma, fwhm_guess, max_stars, saturation : optional
        As for `find_stars` (``threshold_sigma`` is capped at 5).
    box_size : int, optional
        Ignored (accepted so that `build_epsf`'s options can be passed).

    Returns
    -------
    psf : `~photutils.psf.ImagePSF`
        From `moffat_psf`; ``meta`` holds ``fwhm_pixels``, ``fwhm_arcsec``,
        ``beta``, ``e1``, ``e2``, ``n_stars`` and ``model = 'moffat'``.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        If no usable star is found (naming what was found and the fixes).

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.psf import MoffatPSF, make_psf_model_image
    >>> from psfdeconv.psf import fit_moffat_psf
    >>> image, _ = make_psf_model_image(
    ...     (101, 101), MoffatPSF(alpha=3.0, beta=3.0), 3, model_shape=(41, 41),
    ...     min_separation=30, flux=(5000, 20000), seed=3)
    >>> image += 0.5 * np.random.default_rng(1).standard_normal(image.shape)
    >>> psf = fit_moffat_psf(image)
    >>> print(psf.meta['n_stars'], round(psf.meta['fwhm_pixels'], 1))  # true: 3.06
    3 3.0
    """
    del box_size
    _validate_positive_int('max_stars', max_stars, 1)
    image, bad, meta = as_image_and_mask(data, mask)
    saturation = _saturation_level(saturation, meta)
    background, rms = estimate_background(image, bad)
    subtracted = image - background
    subtracted[bad] = 0.0
    ny, nx = image.shape
    if stars is None:
        table, x, y, locus, half = _fit_candidates(
            image, bad, background, rms, threshold_sigma=threshold_sigma,
            fwhm_guess=fwhm_guess, saturation=saturation, max_stars=max_stars)
        found = (f'{len(table)} detections, {int(np.sum(table["point_like"]))} '
                 f'point-like, none isolated and unmasked' if len(table) else
                 'no detection')
    else:
        x, y = _star_positions(stars)
        locus = float(fwhm_guess) if fwhm_guess is not None else 4.0
        half = int(np.clip(np.ceil(2.5 * locus), 5, 20))
        found = f'{len(x)} given star(s), none inside the image'
    inside = ((np.round(x) - half >= 0) & (np.round(y) - half >= 0)
              & (np.round(x) + half <= nx - 1) & (np.round(y) + half <= ny - 1))
    x, y = x[inside], y[inside]
    if len(x) == 0:
        raise InvalidPSFError(
            f'stars = 0 usable for a Moffat fit ({found} above '
            f'{min(threshold_sigma, _FIT_THRESHOLD_SIGMA):g} sigma); give the '
            f'PSF: --psf moffat:fwhm=...arcsec,beta=3 (psfs=\'moffat:...\') or '
            f'--psf psf=FILE.')
    cutouts, good, ix, iy = _fit_cutouts(subtracted, bad, x, y, half)
    offsets = np.column_stack([x - ix, y - iy])
    fit = _fit_moffat(cutouts, good, offsets, locus)
    if fit['beta'] <= MIN_MOFFAT_BETA + 1e-3:
        # Wings as heavy as the fit allows: the sources fitted are galaxies
        # (a compact bulge in its disc), not stars.
        raise InvalidPSFError(
            f'the Moffat fit to the {len(x)} point-like source(s) of this frame '
            f'(FWHM {fit["fwhm"]:.3g} pixels) has beta = {fit["beta"]:.3g}, at its '
            f'lower bound {MIN_MOFFAT_BETA}: they are not stars (a galaxy\'s bulge?); '
            f'give the PSF: --psf moffat:fwhm=...arcsec,beta=3 (psfs=\'moffat:...\') '
            f'or --psf psf=FILE.')
    scale = 1.0 if pixel_scale is None else scalar_pixel_scale(pixel_scale)
    e1, e2 = fit['e1'], fit['e2']
    psf = moffat_psf(fit['fwhm'] * scale, fit['beta'], pixel_scale=scale,
                     e1=e1, e2=e2)
    psf.meta.update({'fwhm_pixels': fit['fwhm'], 'n_stars': int(len(x)),
                     'fit_success': fit['success'],
                     'star_x': x.tolist(), 'star_y': y.tolist()})
    if pixel_scale is None:
        psf.meta['fwhm_arcsec'] = None
        psf.meta['pixel_scale'] = None
    return psf


# --- FITS files -------------------------------------------------------------

def _first_image_hdu(hdulist, path):
    for index, hdu in enumerate(hdulist):
        if hdu.is_image and hdu.data is not None and hdu.data.ndim == 2:
            return index
    raise InvalidPSFError(f'{path} has no 2-D image HDU; give a FITS file '
                          f'whose PSF image is 2-D.')


def _pad_to_odd(data, after=(False, False)):
    """Pad each even axis by one zero row/column on the side that puts the
    brightest pixel at (or nearest to) the centre of the new axis (after
    it where ``after`` says so)."""
    peak = np.unravel_index(np.argmax(data), data.shape)
    pad = []
    for n, p, last in zip(data.shape, peak, after, strict=True):
        if n % 2:
            pad.append((0, 0))
        elif last:
            pad.append((0, 1))
        elif p >= n // 2:   # peak at n/2 (numpy/FFT convention): pad after
            pad.append((0, 1))
        else:               # peak at n/2 - 1: pad before
            pad.append((1, 0))
    return np.pad(data, pad)


def _half_maximum_centroid(data):
    """(y, x) centroid of the pixels at or above half the peak: the core,
    free of truncated or noisy wings."""
    core = np.where(data >= 0.5 * data.max(), data, 0.0)
    y, x = np.indices(data.shape)
    return float((core * y).sum() / core.sum()), float((core * x).sum() / core.sum())


def _check_psf_size(data, name, oversampling=1):
    smallest = _MIN_PSF_SIZE * oversampling
    if min(data.shape) < smallest:
        raise InvalidPSFError(
            f'{name} is {data.shape[0]}x{data.shape[1]} samples; a PSF image must '
            f'be at least {smallest}x{smallest} ({_MIN_PSF_SIZE} native pixels '
            f'per side) to describe a core and its wings; give a larger image '
            f'(e.g. 25x25 pixels).')


def _centred_odd(data, name, oversampling=1):
    """A PSF image on an odd grid with its core on the centre sample.

    An image smaller than `_MIN_PSF_SIZE` native pixels is refused. An even
    axis whose core is centred on a pixel corner (its half-maximum centroid
    within a quarter sample of ``(n - 1) / 2``) gets a row (column) of zeros
    after it and is shifted by half a sample with a Fourier shift on the odd
    grid (exact for a band-limited image; the sum is kept); another even
    axis is padded as `_pad_to_odd` does. An image whose peak is then more
    than one native pixel from the centre is refused.

    Returns ``(data, padded, recentred)``.
    """
    _check_psf_size(data, name, oversampling)
    padded = data.shape[0] % 2 == 0 or data.shape[1] % 2 == 0
    recentred = False
    if padded:
        centroid = _half_maximum_centroid(data)
        corner = [n % 2 == 0 and abs(c - (n - 1) / 2) < 0.25
                  for n, c in zip(data.shape, centroid, strict=True)]
        data = _pad_to_odd(data, corner)
        if any(corner):
            from scipy.ndimage import fourier_shift

            shift = [0.5 if axis else 0.0 for axis in corner]
            data = np.fft.ifftn(fourier_shift(np.fft.fftn(data), shift)).real
            recentred = True
    peak = np.unravel_index(np.argmax(data), data.shape)
    centre = tuple(n // 2 for n in data.shape)
    off = max(abs(p - c) for p, c in zip(peak, centre, strict=True)) / oversampling
    if off > 1:
        raise InvalidPSFError(
            f'{name} peaks at sample (y, x) = {tuple(int(p) for p in peak)}, '
            f'{off:g} pixel(s) from its centre {centre}; a PSF must peak within '
            f'one pixel of its centre: recentre the image on its peak (e.g. '
            f'scipy.ndimage.shift) or crop it around the peak to an odd size.')
    return data, padded, recentred


def read_psf_image(path, *, hdu=None, background=None, pixel_scale=None,
                   psfex_offset=(0.0, 0.0)):
    """Read a PSF image from a FITS file as a photutils `~photutils.psf.ImagePSF`.

    The array is renormalised to photutils' convention (sum =
    ``oversampling**2``) whatever its normalisation (files written by
    `write_psf_image`, with that sum, and older files summing to 1 both
    read the same); integer, scaled (BZERO/BSCALE) and big-endian data are
    converted to native float64. The oversampling factor comes from the
    header keyword ``OVERSAMP`` (or ``OVERSAMPLING``), else from a PSFEx
    ``PSF_SAMP`` (sampling step in image pixels: oversampling
    ``1 / PSF_SAMP`` when that is an integer), default 1.

    **Pixel scale.** The scale of the file's samples (arcsec per sample)
    is read from the first of ``PIXSCALE``, ``PIXSCAL1``, ``SECPIX``
    (arcsec), ``CDELT1`` or ``CD1_1``/``CD1_2`` (degrees; the CD matrix's
    geometric mean scale). The file's native pixel scale is that times the
    oversampling. When ``pixel_scale`` (the exposure's) is given and the
    two differ by more than 1 percent, the array is resampled to the
    exposure's grid (`psfdeconv.cutouts.resample_psf`, keeping the
    oversampling) and ``meta['resampled_from']`` records the file's
    scale.

    **PSFEx.** A file without a 2-D image but with a PSFEx table (a
    ``PSF_MASK`` column and POLNAME/POLZERO/POLSCAL keywords, or the
    columns of legacypipe's merged files) is read with `read_psfex`
    (``psfex_offset`` is passed on) and gives a `PSFExModel` instead.

    **Even sizes.** A PSF needs a centre pixel. An even axis is padded with
    one row (column) of zeros: after the array when the brightest pixel
    is at index ``n // 2`` or beyond (the numpy/FFT convention), before it
    otherwise, so that the peak lands on the centre of the odd axis. A PSF
    centred on a pixel corner (its core's centroid within a quarter sample
    of ``(n - 1) / 2``) is padded after and shifted by half a sample with
    a Fourier shift, so that its core is centred on the odd grid
    (``meta['recentred']``). An image smaller than 5x5 native pixels, or
    whose peak is more than one native pixel from its centre, is refused.

    **Pedestal.** Without ``background``, a border whose median is above
    1 percent of the peak and flat (10-90 percentile spread below 10
    percent of the median: a soft bias, such as the 1000 of SDSS PSF
    reconstructions) is subtracted; a border above 1 percent that is not
    flat (a PSF cropped inside its wings) only warns. ``meta['background']``
    records what was subtracted; pass ``background=0`` to subtract nothing.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.
    hdu : int or str, optional
        HDU index or name. Default: the first HDU with 2-D image data.
    background : float or 'border', optional
        A constant to subtract first (e.g. the soft bias of 1000 of SDSS
        PSF reconstructions), or ``'border'`` for the median of the
        outermost ring of pixels. Default: a flat pedestal is subtracted
        (see above).
    pixel_scale : float or `~astropy.units.Quantity`, optional
        The exposure's native pixel scale (arcsec/pixel): the PSF is
        resampled to it when the file's differs by more than 1 percent.
    psfex_offset : tuple of float, optional
        For a PSFEx file: see `read_psfex`.

    Returns
    -------
    psf : `~photutils.psf.ImagePSF` or `PSFExModel`
        With odd dimensions and the file's oversampling; ``meta`` holds
        ``path``, ``oversampling``, ``padded``, ``pixel_scale`` (native,
        arcsec/pixel, or None if unknown) and, if resampled,
        ``resampled_from``.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        Naming the file, if it is not a FITS file, has no 2-D image,
        NaN/inf pixels, a non-positive sum, a bad ``OVERSAMP``, fewer than
        5x5 pixels or a peak more than one pixel off centre.

    Warns
    -----
    psfdeconv.exceptions.PSFDeconvWarning
        If the border is well above zero but not flat and ``background``
        was not given.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import astropy.units as u
    >>> from psfdeconv.psf import moffat_psf, read_psf_image, write_psf_image
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'psf.fits'
    >>> psf = moffat_psf(0.8 * u.arcsec, 3.0, pixel_scale=0.2, size=21)
    >>> _ = write_psf_image(psf, path)
    >>> again = read_psf_image(path)
    >>> print(again.data.shape, again.oversampling.tolist(),
    ...       round(float(again.data.sum()), 6))
    (43, 43) [2, 2] 4.0
    """
    from astropy.io import fits
    from photutils.psf import ImagePSF

    path = Path(path)
    if not path.exists():
        raise InvalidPSFError(f'PSF file {path} does not exist; give the path '
                              f'of a FITS image.')
    try:
        opened = fits.open(path)
    except OSError as exc:
        raise InvalidPSFError(f'PSF file {path} is not a FITS file '
                              f'({exception_text(exc)}); give a FITS image (or a PSFEx '
                              f'.psf file).') from None
    with opened as hdulist:
        if hdu is None and _psfex_hdu(hdulist) is not None and not any(
                h.is_image and h.data is not None and h.data.ndim == 2
                for h in hdulist):
            return read_psfex(path, offset=psfex_offset)
        index = _first_image_hdu(hdulist, path) if hdu is None else hdu
        try:
            image_hdu = hdulist[index]
        except (KeyError, IndexError):
            raise InvalidPSFError(f'{path} has no HDU {index!r}; it has '
                                  f'{len(hdulist)} HDU(s).') from None
        if image_hdu.data is None or image_hdu.data.ndim != 2:
            raise InvalidPSFError(f'HDU {index!r} of {path} is not a 2-D '
                                  f'image; choose another with hdu=.')
        data = np.array(image_hdu.data, dtype=np.float64)
        header = image_hdu.header.copy()
        oversampling = header.get('OVERSAMP', header.get('OVERSAMPLING'))
    if oversampling is None:
        samp = header.get('PSF_SAMP')
        oversampling = 1
        if isinstance(samp, int | float) and 0 < samp < 1 and \
                abs(1 / samp - round(1 / samp)) < 1e-6:
            oversampling = int(round(1 / samp))
    if (isinstance(oversampling, bool) or not isinstance(oversampling, int | float)
            or oversampling != int(oversampling) or oversampling < 1):
        raise InvalidPSFError(f'{path}: OVERSAMP = {oversampling!r}; it must '
                              f'be a positive integer.')
    oversampling = int(oversampling)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InvalidPSFError(f'{path} has {int(bad.sum())} NaN/inf pixel(s); '
                              f'a PSF image must be finite (replace them, '
                              f'e.g. by 0).')
    _check_psf_size(data, f'the PSF image in {path}', oversampling)
    border = np.concatenate([data[0], data[-1], data[1:-1, 0],
                             data[1:-1, -1]])
    subtracted = 0.0
    if background is None:
        pedestal = float(np.median(border))
        peak = float(data.max())
        spread = float(np.subtract(*np.percentile(border, [90, 10])))
        if peak > 0 and pedestal > _PEDESTAL_FRACTION * peak and \
                spread <= _PEDESTAL_FLATNESS * pedestal:
            # A flat border well above zero: a soft bias (SDSS adds 1000).
            data = data - pedestal
            subtracted = pedestal
        elif peak > 0 and pedestal > _PEDESTAL_FRACTION * peak:
            warnings.warn(f'{path}: the border median {pedestal:g} is '
                          f'{100 * pedestal / peak:.1f} percent of the peak '
                          f'{peak:g}; if this is a pedestal (a soft bias), '
                          f"pass background='border' or its value.",
                          PSFDeconvWarning, stacklevel=2)
    elif isinstance(background, str) and background == 'border':
        subtracted = float(np.median(border))
        data = data - subtracted
    else:
        try:
            value = float(background)
        except (TypeError, ValueError):
            raise InvalidPSFError(f"background = {background!r}; give a "
                                  f"number, 'border' or None.") from None
        if not np.isfinite(value):
            raise InvalidPSFError(f'background = {value}; give a finite '
                                  f'number.')
        data = data - value
        subtracted = value
    total = float(data.sum())
    if not np.isfinite(total) or total <= 0:
        raise InvalidPSFError(f'the PSF image in {path} sums to {total}; a PSF '
                              f'must have a positive, finite sum.')
    data, padded, recentred = _centred_odd(data, f'the PSF image in {path}',
                                           oversampling)
    data /= total
    sample_scale = _header_sample_scale(header)
    file_scale = None if sample_scale is None else sample_scale * oversampling
    meta = {'path': str(path), 'oversampling': oversampling, 'padded': padded,
            'recentred': recentred, 'background': subtracted,
            'pixel_scale': file_scale}
    if pixel_scale is not None:
        target = scalar_pixel_scale(pixel_scale)
        if file_scale is not None and abs(file_scale / target - 1) > 0.01:
            from .cutouts import resample_psf

            # 'hann', the narrower kernel: a PSF image is well sampled and
            # needs no anti-aliasing (peak 2.6 percent low after 0.2 -> 0.25
            # arcsec, against 12 percent with 'gaussian').
            data = resample_psf(data, from_scale=sample_scale,
                                to_scale=target / oversampling, kernel='hann')
            meta['resampled_from'] = file_scale
        meta['pixel_scale'] = target
    psf = ImagePSF(data * oversampling ** 2, oversampling=oversampling)
    psf.meta.update(meta)
    return psf


#: Header keywords of a PSF image's sample scale, in arcsec, then in degrees.
_SCALE_KEYWORDS_ARCSEC = ('PIXSCALE', 'PIXSCAL1', 'SECPIX')
_SCALE_KEYWORDS_DEGREES = ('CDELT1',)


def _header_sample_scale(header):
    """Arcsec per sample of a PSF image from its header, or None."""
    for key in _SCALE_KEYWORDS_ARCSEC:
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and np.isfinite(value) and value > 0:
            return float(value)
    if 'CD1_1' in header:
        cd = np.array([[header.get('CD1_1', 0.0), header.get('CD1_2', 0.0)],
                       [header.get('CD2_1', 0.0), header.get('CD2_2', 0.0)]],
                      dtype=float)
        scale = np.sqrt(abs(np.linalg.det(cd))) * 3600.0
        if np.isfinite(scale) and scale > 0:
            return float(scale)
    for key in _SCALE_KEYWORDS_DEGREES:
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and np.isfinite(value) and value != 0:
            return abs(float(value)) * 3600.0
    return None


# --- PSFEx ------------------------------------------------------------------

def _psfex_hdu(hdulist):
    """Index of a PSFEx table HDU (standard or legacypipe-merged), or None."""
    for index, hdu in enumerate(hdulist):
        if hdu.is_image or getattr(hdu, 'columns', None) is None:
            continue
        names = [n.upper() for n in hdu.columns.names]
        if 'PSF_MASK' in names and ('POLNAME1' in hdu.header or 'POLNAME1' in names):
            return index
    return None


def _standard_psfex_hdu(table_hdu, path, ccdname):
    """A standard PSFEx ``PSF_DATA`` HDU (keywords in the header), as
    `galsim.des.DES_PSFEx` reads it, from a standard or legacypipe-merged
    table (one row per CCD, the keywords as columns)."""
    from astropy.io import fits

    if 'POLNAME1' in table_hdu.header:
        return table_hdu
    rows = table_hdu.data
    names = [n.lower() for n in table_hdu.columns.names]
    if 'ccdname' in names and len(rows) > 1:
        ccds = [str(c).strip() for c in rows['ccdname']]
        if ccdname is None or str(ccdname).strip() not in ccds:
            raise InvalidPSFError(f'ccdname = {ccdname!r}; {path} holds the PSFEx '
                                  f'models of CCDs {ccds}; choose one with '
                                  f'ccdname=.')
        row = rows[ccds.index(str(ccdname).strip())]
    else:
        row = rows[0]
    header = fits.Header()
    for key in ('POLNAXIS', 'POLGRP1', 'POLGRP2', 'POLNAME1', 'POLNAME2',
                'POLZERO1', 'POLZERO2', 'POLSCAL1', 'POLSCAL2', 'POLNGRP',
                'POLDEG1', 'PSFNAXIS', 'PSFAXIS1', 'PSFAXIS2', 'PSFAXIS3',
                'PSF_SAMP', 'PSF_FWHM'):
        if key.lower() in names:
            value = row[key.lower()]
            header[key] = value.strip() if isinstance(value, str) else value.item()
    mask = np.asarray(row['psf_mask'], dtype=np.float32)
    column = fits.Column(name='PSF_MASK', format=f'{mask.size}E',
                         dim=str(mask.shape[::-1]), array=mask[None])
    return fits.BinTableHDU.from_columns([column], header=header, name='PSF_DATA')


class PSFExModel:
    """A spatially varying PSFEx model, rendered with GalSim.

    Made by `read_psfex`. `render_psf` and `render_stamp_psfs` evaluate it
    at any (x, y) of the exposure (0-based pixels) through
    `galsim.des.DES_PSFEx`: the polynomial of the PSFEx basis at
    ``(x + 1 + offset_x, y + 1 + offset_y)`` (PSFEx positions are
    SExtractor's 1-based ``X_IMAGE``, ``Y_IMAGE``), drawn on the native
    grid without a further pixel (the PSFEx basis already includes it),
    centred on the middle pixel and normalised to unit sum.

    Attributes
    ----------
    meta : dict
        ``path``, ``offset``, ``psfex_zero`` (POLZERO1, POLZERO2),
        ``psfex_scale`` (POLSCAL1, POLSCAL2), ``psf_samp``, ``psf_fwhm``
        (PSFEx's FWHM in pixels, if recorded), ``oversampling`` (1).
    """

    def __init__(self, psfex, *, offset=(0.0, 0.0), meta=None):
        self._psfex = psfex
        self.offset = (float(offset[0]), float(offset[1]))
        self.meta = dict(meta or {})

    @property
    def default_position(self):
        """(x, y), 0-based exposure pixels, of the PSFEx polynomial's zero
        point (the mean position of its stars)."""
        return (self._psfex.x_zero - 1.0 - self.offset[0],
                self._psfex.y_zero - 1.0 - self.offset[1])

    def render(self, position, size):
        """Unit-sum (size, size) PSF at ``position`` (x, y, 0-based)."""
        import galsim

        x, y = self.default_position if position is None else position
        image_pos = galsim.PositionD(float(x) + 1.0 + self.offset[0],
                                     float(y) + 1.0 + self.offset[1])
        profile = self._psfex.getPSF(image_pos)
        image = profile.drawImage(nx=size, ny=size, scale=1.0, method='no_pixel')
        return np.asarray(image.array, dtype=np.float64)

    def __repr__(self):
        return f'<PSFExModel {self.meta.get("path")}>'


def read_psfex(path, *, offset=(0.0, 0.0), ccdname=None):
    """Read a PSFEx model (``*.psf``) as a spatially varying `PSFExModel`.

    Standard PSFEx files (a ``PSF_DATA`` BINTABLE with the POLNAME*,
    POLZERO*, POLSCAL*, POLDEG1, PSFAXIS* and PSF_SAMP keywords and a
    ``PSF_MASK`` basis cube) are read by `galsim.des.DES_PSFEx`;
    legacypipe's merged files (one row per CCD, those keywords as
    columns) are converted first.

    **Coordinates.** PSFEx fits its polynomial in the pixel coordinates of
    the image it ran on (1-based). ``offset`` is added to the exposure's
    0-based (x, y), plus 1, to get them: give the position of the
    exposure's first pixel in that image, e.g. ``(x0, y0)`` for a cutout
    ``image[y0:, x0:]`` of the full CCD the PSFEx model describes. IRAF's
    ``LTV1``/``LTV2`` and ``DETSEC`` relate a CCD image to the detector,
    not to the PSFEx run, so they are not used. The DECam test frame
    (``tests/data/decam-r-N6.fits``, a legacypipe test case) needs no
    offset: legacypipe's ``create_testcase.py`` shifted both the header's
    CRPIX and the PSFEx model (by ``ccd_x0``, ``ccd_y0``) to the cutout,
    which is why its POLZERO (747.1, -851.3) are not near the centre of
    the full CCD (about 1024, 2048).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The PSFEx FITS file.
    offset : tuple of float, optional
        (x, y) added to exposure pixel coordinates, see above.
    ccdname : str, optional
        The CCD of a merged file holding several.

    Returns
    -------
    model : `PSFExModel`

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        If the file is missing, is not PSFEx, or GalSim cannot read it.

    Examples
    --------
    >>> from psfdeconv.psf import read_psfex, render_psf
    >>> model = read_psfex('tests/data/decam-r-psfex.fits')  # doctest: +SKIP
    >>> psf = render_psf(model, (140.0, 187.0), size=25)  # doctest: +SKIP
    """
    import galsim.des
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise InvalidPSFError(f'PSF file {path} does not exist; give the path '
                              f'of a PSFEx file.')
    with fits.open(path) as hdulist:
        index = _psfex_hdu(hdulist)
        if index is None:
            raise InvalidPSFError(f'{path} has no PSFEx table (a BINTABLE with '
                                  f'PSF_MASK and POLNAME1); give a PSFEx .psf '
                                  f'file or a PSF image.')
        table = _standard_psfex_hdu(hdulist[index], path, ccdname)
        try:
            psfex = galsim.des.DES_PSFEx(table)
        except (OSError, KeyError, ValueError) as error:
            raise InvalidPSFError(f'{path}: GalSim cannot read its PSFEx model '
                                  f'({error}); check that it is a PSFEx file '
                                  f'with POLNGRP = 1 in X_IMAGE, Y_IMAGE.'
                                  ) from error
        header = table.header
    meta = {'path': str(path), 'model': 'psfex', 'oversampling': 1,
            'offset': tuple(float(v) for v in offset),
            'psfex_zero': (float(header['POLZERO1']), float(header['POLZERO2'])),
            'psfex_scale': (float(header['POLSCAL1']), float(header['POLSCAL2'])),
            'psf_samp': float(header['PSF_SAMP']),
            'psf_fwhm': float(header['PSF_FWHM']) if 'PSF_FWHM' in header else None}
    return PSFExModel(psfex, offset=offset, meta=meta)


def write_psf_image(psf_model, path, *, overwrite=False, pixel_scale=None):
    """Write an `~photutils.psf.ImagePSF` (or a 2-D array) to a FITS file.

    The array is written in photutils' convention, summing to
    ``OVERSAMP**2``, so that ``photutils.psf.ImagePSF(data,
    oversampling=OVERSAMP)`` evaluated with ``flux=1`` sums to 1 over
    native pixels. Header keywords: ``OVERSAMP`` (oversampling factor),
    ``PSFNORM`` (the array's sum) and, when the pixel scale is known,
    ``PIXSCALE`` (arcsec per *sample* of the array: the exposure's pixel
    scale divided by the oversampling). `read_psf_image` reads it back.
    The file is written atomically (`psfdeconv.io.atomic_path`).

    Parameters
    ----------
    psf_model : `~photutils.psf.ImagePSF` or `~numpy.ndarray`
        The PSF; an array is taken as not oversampled.
    path : str or `~pathlib.Path`
        Output file.
    overwrite : bool, optional
        Replace an existing file.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        The exposure's native pixel scale (arcsec/pixel). Default: the
        model's ``meta['pixel_scale']`` if any (e.g. `moffat_psf`), else
        no ``PIXSCALE``.

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If ``path`` exists and ``overwrite`` is False.
    psfdeconv.exceptions.InvalidPSFError
        For a model that is not an image PSF, or without a positive sum.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.io import fits
    >>> from psfdeconv.psf import moffat_psf, write_psf_image
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'psf.fits'
    >>> _ = write_psf_image(moffat_psf(0.8, 3.0, pixel_scale=0.2, size=21), path)
    >>> print(fits.getval(path, 'OVERSAMP'), fits.getval(path, 'PIXSCALE'),
    ...       round(float(fits.getdata(path).sum()), 6))
    2 0.1 4.0
    """
    from astropy.io import fits

    from .io import atomic_path

    if isinstance(psf_model, np.ndarray):
        data, oversampling = psf_model, 1
    elif hasattr(psf_model, 'data') and hasattr(psf_model, 'oversampling') \
            and np.ndim(psf_model.data) == 2:
        data = psf_model.data
        oversampling = np.atleast_1d(psf_model.oversampling)
        if oversampling[0] != oversampling[-1]:
            raise InvalidPSFError(f'oversampling {oversampling.tolist()} '
                                  f'differs between the axes; only equal '
                                  f'factors can be written.')
        oversampling = int(oversampling[0])
    else:
        raise InvalidPSFError(f'cannot write a {type(psf_model).__name__} as '
                              f'a PSF image; give an ImagePSF or a 2-D array '
                              f'(render a gridded model with render_psf '
                              f'first).')
    data = np.asarray(data, dtype=np.float64)
    total = float(data.sum())
    if data.ndim != 2 or not np.isfinite(total) or total <= 0:
        raise InvalidPSFError(f'the PSF (shape {data.shape}) sums to {total}; '
                              f'a PSF must be 2-D with a positive, finite '
                              f'sum.')
    if pixel_scale is None:
        pixel_scale = (getattr(psf_model, 'meta', None) or {}).get('pixel_scale')
    header = fits.Header()
    header['OVERSAMP'] = (oversampling, 'PSF oversampling factor')
    header['PSFNORM'] = (float(oversampling ** 2),
                         'sum of the array (photutils: OVERSAMP**2)')
    if pixel_scale is not None:
        header['PIXSCALE'] = (scalar_pixel_scale(pixel_scale) / oversampling,
                              '[arcsec] per sample of this array')
    hdu = fits.PrimaryHDU(data * (oversampling ** 2 / total), header=header)
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        hdu.writeto(tmp, overwrite=True)
    return path


# --- The stamp-level PSF -----------------------------------------------------

def half_peak_fwhm(psf_model, position=None):
    """FWHM (pixels) of a PSF as `find_stars` measures a star's: the diameter
    of a disc with the area of the pixels above half the peak.

    Parameters
    ----------
    psf_model : PSF model or `~numpy.ndarray`
        As for `render_psf`.
    position : tuple of float, optional
        As for `render_psf`.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.psf import half_peak_fwhm, moffat_psf
    >>> model = moffat_psf(1.0, 3.0, pixel_scale=0.2)
    >>> bool(abs(half_peak_fwhm(model) - 5.0) < 0.5)
    True
    """
    image = render_psf(psf_model, position, size=61)
    return float(_area_fwhm(np.count_nonzero(image >= 0.5 * image.max())))


def render_psf(psf_model, position=None, *, size=41):
    """The PSF seen by a source at ``position``, as a stamp-level array.

    The model is evaluated with ``flux=1`` and its centre ``(x_0, y_0)`` on
    the middle pixel of a ``size`` x ``size`` grid of native pixels
    (`~photutils.psf.ImagePSF` interpolates its oversampled array there),
    then renormalised to unit sum. The PSF is centred on the middle pixel:
    the source's own sub-pixel offset belongs to the stamp, not to the
    PSF. For a `~photutils.psf.GriddedPSFModel` the position selects the
    PSF interpolated between the grid points, for a `PSFExModel` the PSFEx
    polynomial's PSF there (default: its stars' mean position); any other
    model is the same everywhere and ignores it.

    Parameters
    ----------
    psf_model : PSF model or `~numpy.ndarray`
        A photutils PSF model (`~photutils.psf.ImagePSF`,
        `~photutils.psf.GriddedPSFModel`, ...), any 2-D astropy model with ``x_0``, ``y_0``
        and ``flux`` parameters (e.g. `~photutils.psf.MoffatPSF`, sampled at
        pixel centres), or a native-pixel PSF array (centred on its middle).
    position : tuple of float, optional
        (x, y) of the source in the exposure, 0-based pixels. Needed for a
        `~photutils.psf.GriddedPSFModel`.
    size : int, optional
        Odd side of the output.

    Returns
    -------
    psf : `~numpy.ndarray`
        float64 (size, size), summing to 1, centred on ``[size // 2,
        size // 2]``.

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        If ``size`` is not odd and >= 3, the model does not sum to a
        positive finite value over the stamp, or its peak is more than one
        pixel off the centre.
    psfdeconv.exceptions.InvalidInputError
        If a gridded model gets no position.

    Warns
    -----
    psfdeconv.exceptions.PSFDeconvWarning
        If the model sums to less than 0.8 or more than 1.25 over the stamp
        before renormalisation: the stamp is smaller than the PSF, or the
        model's array does not follow photutils' normalisation (an
        oversampled array must sum to ``oversampling**2``).

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPRF
    >>> from psfdeconv.psf import render_psf
    >>> psf = render_psf(CircularGaussianPRF(fwhm=3.0), size=15)
    >>> print(psf.shape, round(float(psf.sum()), 6), round(float(psf[7, 7]), 4))
    (15, 15) 1.0 0.0932
    """
    from photutils.psf import GriddedPSFModel, ImagePSF

    if isinstance(size, bool) or not isinstance(size, int | np.integer) \
            or size < 3 or size % 2 == 0:
        raise InvalidPSFError(f'size = {size!r}; the stamp PSF size must be an '
                              f'odd integer >= 3 (e.g. 41).')
    size = int(size)
    centre = (size - 1) / 2
    if isinstance(psf_model, PSFExModel):
        return _finish_render(psf_model.render(position, size), size)
    if isinstance(psf_model, np.ndarray):
        array = np.asarray(psf_model, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] % 2 == 0 or \
                array.shape[1] % 2 == 0:
            raise InvalidPSFError(f'a PSF array must be 2-D with odd sides, '
                                  f'got shape {array.shape}; pad or crop it '
                                  f'to an odd size.')
        total = float(array.sum())
        if not np.isfinite(total) or total <= 0:
            raise InvalidPSFError(f'the PSF array sums to {total}; a PSF must '
                                  f'have a positive, finite sum.')
        psf_model = ImagePSF(array / total)
    if isinstance(psf_model, GriddedPSFModel):
        if position is None:
            raise InvalidInputError('a GriddedPSFModel varies across the '
                                    'detector; give position=(x, y) of the '
                                    'source in pixels.')
        x_pos, y_pos = (float(v) for v in position)
        if not (np.isfinite(x_pos) and np.isfinite(y_pos)):
            raise InvalidInputError(f'position = {position!r}; give finite '
                                    f'(x, y) pixel coordinates.')
    else:
        # Position-independent model: evaluate anywhere.
        x_pos = y_pos = centre
    if not all(hasattr(psf_model, name) for name in ('x_0', 'y_0', 'flux')):
        raise InvalidPSFError(f'cannot render a {type(psf_model).__name__}; '
                              f'give a photutils PSF model (ImagePSF, '
                              f'GriddedPSFModel, MoffatPSF, ...) or a 2-D '
                              f'array.')
    model = psf_model.copy()
    model.x_0 = x_pos
    model.y_0 = y_pos
    model.flux = 1.0
    offsets = np.arange(size) - centre
    yy, xx = np.meshgrid(y_pos + offsets, x_pos + offsets, indexing='ij')
    psf = np.asarray(model(xx, yy), dtype=np.float64)
    return _finish_render(psf, size)


def _finish_render(psf, size):
    """Check the sum and centre of a rendered PSF; normalise it."""
    total = float(psf.sum())
    if not np.isfinite(total) or total <= 0:
        raise InvalidPSFError(f'the PSF model sums to {total} over the '
                              f'{size}x{size} stamp; a PSF must have a '
                              f'positive, finite sum.')
    low, high = _RENDER_SUM_RANGE
    if not low <= total <= high:
        warnings.warn(f'the PSF model sums to {total:.4g} over the '
                      f'{size}x{size} stamp (expected about 1); either the '
                      f'stamp is smaller than the PSF (increase size) or the '
                      f"model's array does not follow photutils' convention "
                      f'(an oversampled ImagePSF array sums to '
                      f'oversampling**2). The PSF was renormalised to 1.',
                      PSFDeconvWarning, stacklevel=2)
    psf /= total
    peak_y, peak_x = np.unravel_index(np.argmax(psf), psf.shape)
    middle = size // 2
    if abs(peak_y - middle) > 1 or abs(peak_x - middle) > 1:
        raise InvalidPSFError(f'the rendered PSF peaks at pixel (y, x) = '
                              f'({peak_y}, {peak_x}), not at the centre '
                              f'({middle}, {middle}); recentre the model '
                              f'(its origin must be the PSF centre).')
    return psf


# --- Command-line specifications --------------------------------------------

def _parse_options(text, spec, allowed):
    options = {}
    for item in text.split(','):
        key, sep, value = item.partition('=')
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value or key not in allowed or \
                key in options:
            raise ConfigError(f'--psf {spec!r}: cannot read {item.strip()!r} '
                              f'(options are {", ".join(allowed)}, each '
                              f'once); accepted forms are {_SPEC_FORMS}.')
        options[key] = value
    return options


def _parse_fwhm(text, spec, pixel_scale_arcsec):
    import astropy.units as u

    try:
        value = u.Quantity(text)
    except (TypeError, ValueError):
        raise ConfigError(f'--psf {spec!r}: fwhm={text!r} is not a number '
                          f'with an optional unit (e.g. 0.8arcsec or '
                          f'4pix).') from None
    if value.unit == u.dimensionless_unscaled:
        return value.value * u.arcsec
    if value.unit == u.pix:
        return value.value * pixel_scale_arcsec * u.arcsec
    if value.unit.physical_type == 'angle':
        return value
    raise ConfigError(f'--psf {spec!r}: fwhm={text!r} must be an angle (e.g. '
                      f'0.8arcsec) or pixels (e.g. 4pix).')


def psf_from_spec(spec, *, data=None, pixel_scale=None):
    """The PSF model described by a command-line ``--psf`` string.

    Accepted forms:

    ``'epsf'``
        An ePSF from the stars of ``data`` (`build_epsf`).
    ``'epsf:grid=NYxNX'``
        A spatially varying PSF from ePSFs of NY x NX detector regions
        (`build_gridded_psf`), e.g. ``'epsf:grid=2x2'``.
    ``'moffat:fwhm=0.8arcsec,beta=3[,e1=0.0,e2=0.0]'``
        A Moffat model (`moffat_psf`). ``fwhm`` is an angle, a plain
        number in arcsec, or pixels (``4pix``); needs ``pixel_scale``.
    ``'psf=FILE'``
        A FITS PSF image (`read_psf_image`, resampled to ``pixel_scale``
        when the file's header gives another), or a PSFEx model
        (`read_psfex`).

    Parameters
    ----------
    spec : str
        The specification.
    data : `~numpy.ndarray` or `~astropy.nddata.NDData`, optional
        The exposure, for ``epsf``.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        Native pixel scale (arcsec/pixel), for ``moffat``.

    Returns
    -------
    psf_model : `~photutils.psf.ImagePSF`, `~photutils.psf.GriddedPSFModel` or `PSFExModel`

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        For a malformed specification (naming it and the accepted forms),
        a missing ``data`` or ``pixel_scale``, or Moffat parameters out of
        range.
    psfdeconv.exceptions.InvalidPSFError
        If the ePSF or the file cannot give a PSF (e.g. too few stars).

    Examples
    --------
    >>> from psfdeconv.psf import psf_from_spec
    >>> psf = psf_from_spec('moffat:fwhm=0.8arcsec,beta=3,e1=0.05',
    ...                     pixel_scale=0.2)
    >>> print(psf.meta['fwhm_arcsec'], psf.meta['beta'], psf.meta['e1'])
    0.8 3.0 0.05
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f'--psf {spec!r} is empty or not a string; '
                          f'accepted forms are {_SPEC_FORMS}.')
    text = spec.strip()
    kind, _, rest = text.partition(':')
    kind = kind.strip().lower()

    if text.lower().startswith('psf='):
        path = text[4:].strip()
        if not path:
            raise ConfigError(f'--psf {spec!r} names no file; accepted forms '
                              f'are {_SPEC_FORMS}.')
        return read_psf_image(path, pixel_scale=pixel_scale)

    if kind == 'epsf':
        if data is None:
            raise ConfigError(f'--psf {spec!r} builds the PSF from the stars '
                              f'of the exposure, but no image was given; '
                              f'pass data= (or use moffat:... or psf=FILE).')
        if not rest.strip():
            return build_epsf(data)
        options = _parse_options(rest, spec, ('grid',))
        match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', options['grid'])
        if match is None:
            raise ConfigError(f'--psf {spec!r}: grid={options["grid"]!r} must '
                              f'be NYxNX, e.g. 2x2; accepted forms are '
                              f'{_SPEC_FORMS}.')
        grid_shape = (int(match.group(1)), int(match.group(2)))
        try:
            return build_gridded_psf(data, grid_shape=grid_shape)
        except InvalidPSFError:
            raise
        except InvalidInputError as err:
            raise ConfigError(f'--psf {spec!r}: {err}') from err

    if kind == 'moffat':
        if pixel_scale is None:
            raise ConfigError(f'--psf {spec!r} needs the pixel scale of the '
                              f'exposure (pixel_scale=, arcsec/pixel).')
        scale = scalar_pixel_scale(pixel_scale)
        options = _parse_options(rest, spec, ('fwhm', 'beta', 'e1', 'e2'))
        missing = [k for k in ('fwhm', 'beta') if k not in options]
        if missing:
            raise ConfigError(f'--psf {spec!r} lacks {" and ".join(missing)}; '
                              f'write e.g. moffat:fwhm=0.8arcsec,beta=3.')
        fwhm = _parse_fwhm(options['fwhm'], spec, scale)
        numbers = {}
        for key in ('beta', 'e1', 'e2'):
            if key in options:
                try:
                    numbers[key] = float(options[key])
                except ValueError:
                    raise ConfigError(f'--psf {spec!r}: {key}='
                                      f'{options[key]!r} is not a number.'
                                      ) from None
        try:
            return moffat_psf(fwhm, numbers['beta'], pixel_scale=scale,
                              e1=numbers.get('e1', 0.0),
                              e2=numbers.get('e2', 0.0))
        except InvalidPSFError as err:
            raise ConfigError(f'--psf {spec!r}: {err}') from err

    raise ConfigError(f'--psf {spec!r} is not a PSF specification; accepted '
                      f'forms are {_SPEC_FORMS}.')


def _psf_description(model):
    from photutils.psf import GriddedPSFModel

    meta = dict(getattr(model, 'meta', None) or {})
    if meta.get('psf_source'):  # set by build_psfs
        return str(meta['psf_source'])
    if isinstance(model, np.ndarray):
        return f'array {model.shape}'
    if isinstance(model, GriddedPSFModel):
        return f'gridded ({len(model.grid_xypos)} PSFs)'
    if meta.get('model') == 'moffat':
        return (f'moffat:fwhm={meta["fwhm_arcsec"]:g}arcsec,beta={meta["beta"]:g},'
                f'e1={meta["e1"]:g},e2={meta["e2"]:g}')
    if 'path' in meta:
        return f'psf={meta["path"]}'
    return type(model).__name__


def _psf_from_array(array, name):
    """An `~photutils.psf.ImagePSF` from a native-pixel PSF array (an
    NDData's ``psf``): checked as `psfdeconv._validation.check_psfs` checks
    stamp PSFs, padded to odd sides (`_pad_to_odd`) and normalised."""
    from photutils.psf import ImagePSF

    try:
        data = np.array(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidPSFError(f'{name} is a {type(array).__name__}, not an array '
                              f'of numbers; give a 2-D PSF image.') from None
    if data.ndim != 2 or min(data.shape) < 1:
        raise InvalidPSFError(f'{name} has shape {data.shape}; a PSF must be a '
                              f'2-D image in the exposure\'s pixels.')
    n_bad = int((~np.isfinite(data)).sum())
    if n_bad:
        raise InvalidPSFError(f'{name} has {n_bad} NaN/inf pixel(s); a PSF image '
                              f'must be finite (replace them, e.g. by 0).')
    total = float(data.sum())
    if not total > 0:
        raise InvalidPSFError(f'{name} sums to {total}; a PSF must have a '
                              f'positive, finite sum.')
    data, padded, recentred = _centred_odd(data, name)
    psf = ImagePSF(data / total)
    psf.meta.update({'oversampling': 1, 'padded': padded, 'recentred': recentred})
    return psf


def _epsf_or_moffat(exposure, epsf_options, *, fallback, pixel_scale=None):
    """`build_epsf`, or with too few stars a `fit_moffat_psf` marked as a
    fallback (``meta['psf_fallback']``); the model and its description."""
    options = dict(epsf_options or {})
    # Bad options are errors, not a reason to fall back.
    _check_epsf_options(options.get('size', 25), options.get('oversampling', 2),
                        options.get('maxiters', 10), options.get('min_stars', 5))
    try:
        model = build_epsf(exposure, **options)
    except InvalidPSFError as error:
        if not fallback:
            raise
        reason = ('too few for an ePSF' if 'min_stars' in str(error)
                  else 'the ePSF failed')
        find = {key: options[key] for key in
                ('threshold_sigma', 'fwhm_guess', 'saturation') if key in options}
        # arcsec/pixel (the given one for an exposure without a WCS), for
        # the model's meta only.
        scale = None if pixel_scale is None else scalar_pixel_scale(pixel_scale)
        if getattr(exposure, 'wcs', None) is not None:
            from .io import pixel_scale_of

            with catch_warnings():
                # Only recorded in the model's meta (fwhm_arcsec); the pipeline
                # warns about non-square pixels where the scale matters.
                warnings.filterwarnings('ignore', message='the WCS pixel scales differ',
                                        category=PSFDeconvWarning)
                scale = pixel_scale_of(exposure.wcs)
        try:
            model = fit_moffat_psf(exposure, pixel_scale=scale, **find)
        except InvalidPSFError as fit_error:
            raise InvalidPSFError(f'{error} The Moffat fallback failed too: '
                                  f'{fit_error}') from fit_error
        n_stars = model.meta['n_stars']
        model.meta.update({'psf_fallback': True, 'epsf_error': str(error)})
        return model, f'moffat fit ({n_stars} star{"s" * (n_stars != 1)}; {reason})'
    model.meta['psf_fallback'] = False
    return model, f'epsf ({model.meta["n_stars"]} stars)'


def build_psfs(exposures, psfs=None, *, epsf_options=None, fallback=True, pixel_scale=None):
    """A PSF model per band, in each band's own pixels.

    Parameters
    ----------
    exposures : mapping of str to `~astropy.nddata.NDData`, str or `~pathlib.Path`
        Band name to exposure (as from `psfdeconv.io.read_exposure`), or
        to a FITS file read with it.
    psfs : mapping, str, PSF model or `~numpy.ndarray`, optional
        Per band (a mapping with one entry per band) or for every band (any
        other value): a photutils PSF model (`~photutils.psf.ImagePSF`,
        `~photutils.psf.GriddedPSFModel`, ...), a native-pixel PSF array
        (odd, centred), or a command-line specification
        (`psfdeconv.psf.psf_from_spec`: ``'epsf'``, ``'epsf:grid=2x2'``,
        ``'moffat:fwhm=0.8arcsec,beta=3'``, ``'psf=FILE'``). Default: the
        exposure's own ``psf`` (`~astropy.nddata.NDData.psf`, a native-pixel
        array; source ``'NDData.psf'``) if it has one, else an ePSF from the
        band's stars (`psfdeconv.psf.build_epsf`). ``'epsf'`` forces the
        ePSF even when the exposure has a ``psf``.
    epsf_options : dict, optional
        Keyword arguments of `psfdeconv.psf.build_epsf` (``maxiters``,
        ``size``, ``threshold_sigma``, ``min_stars``, ...) for the default ePSF.
    fallback : bool, optional
        When fewer than ``min_stars`` stars (or no fit) allow an ePSF
        (default or ``'epsf'``), fit an elliptical Moffat to the stars
        there are (`fit_moffat_psf`) instead of raising. The model's
        ``meta['psf_fallback']`` is then True (the pipeline flags the
        band's rows ``PSF_FALLBACK``) and its source says so, e.g.
        ``'moffat fit (4 stars; too few for an ePSF)'``.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        arcsec/pixel of the bands without a celestial WCS, for
        specifications in arcsec (``'moffat:fwhm=0.8arcsec'``); a band with
        a WCS uses its own.

    Returns
    -------
    models : dict of str to PSF model or `~numpy.ndarray`
        Band name to the PSF.
    sources : dict of str to str
        Band name to a description of where the PSF came from
        (``'epsf (40 stars)'``, a Moffat specification, a file, ...).

    Raises
    ------
    psfdeconv.exceptions.InvalidPSFError
        Naming the band, if its ePSF cannot be built and (with
        ``fallback``) no star at all can be fitted, or a PSF is unusable.
    psfdeconv.exceptions.InvalidInputError
        If a mapping lacks a band or names one that is not an exposure.
    psfdeconv.exceptions.ConfigError
        For a malformed specification string.

    Examples
    --------
    >>> from psfdeconv.psf import build_psfs
    >>> from psfdeconv.simulate import simulate_exposure
    >>> exposures, _ = simulate_exposure((96, 96), n_galaxies=1, n_stars=2)
    >>> models, sources = build_psfs(exposures, 'moffat:fwhm=0.8arcsec,beta=3.5')
    >>> print(sources['r'], models['r'].meta['fwhm_arcsec'])
    moffat:fwhm=0.8arcsec,beta=3.5 0.8
    """
    from astropy.nddata import NDData

    from .exceptions import ConfigError
    from .io import pixel_scale_of, read_exposure_set

    if not hasattr(exposures, 'items') or \
            not all(isinstance(e, NDData) for e in exposures.values()):
        exposures, _ = read_exposure_set(exposures,
                                         require_wcs=pixel_scale is None)
    bands = list(exposures)
    if hasattr(psfs, 'items'):
        unknown = [band for band in psfs if band not in exposures]
        missing = [band for band in bands if band not in psfs]
        if unknown or missing:
            raise InvalidInputError(f'psfs has entries for {list(psfs)} but the '
                                    f'bands are {bands}; give one PSF per band '
                                    f'(or one value for all bands).')
        per_band = dict(psfs)
    else:
        per_band = dict.fromkeys(bands, psfs)
    models, sources = {}, {}
    for band in bands:
        value = per_band[band]
        exposure = exposures[band]
        created = True
        try:
            nddata_psf = getattr(exposure, 'psf', None)
            if value is None and nddata_psf is not None:
                model = _psf_from_array(nddata_psf, 'NDData.psf')
                sources[band] = 'NDData.psf'
            elif value is None or (isinstance(value, str) and
                                   value.strip().lower() == 'epsf'):
                model, sources[band] = _epsf_or_moffat(
                    exposure, epsf_options, fallback=fallback, pixel_scale=pixel_scale)
            elif isinstance(value, str):
                scale = pixel_scale_of(exposure.wcs) if getattr(
                    exposure, 'wcs', None) is not None else pixel_scale
                model = psf_from_spec(value, data=exposure, pixel_scale=scale)
                sources[band] = value.strip()
                resampled = (getattr(model, 'meta', None) or {}).get('resampled_from')
                if resampled is not None:
                    sources[band] += (f' (resampled from {resampled:.4g} to '
                                      f'{model.meta["pixel_scale"]:.4g} arcsec/pixel)')
                if 'n_stars' in (getattr(model, 'meta', None) or {}):
                    sources[band] += f' ({model.meta["n_stars"]} stars)'
            else:
                created = False
                model = np.asarray(value, dtype=np.float64) \
                    if isinstance(value, np.ndarray | list) else value
                sources[band] = _psf_description(model)
        except (InvalidPSFError, ConfigError) as error:
            raise type(error)(f'band {band!r}: {error}') from error
        if created and getattr(model, 'meta', None) is not None:
            # Later descriptions of this model (deconvolve_catalog) reuse it.
            model.meta['psf_source'] = sources[band]
        models[band] = model
    return models, sources


def grid_extrapolated(model, x, y):
    """Whether positions lie outside the grid of a PSF model.

    Parameters
    ----------
    model : PSF model
        A `~photutils.psf.GriddedPSFModel` (other models have no grid).
    x, y : `~numpy.ndarray`
        Positions in the model's pixels.

    Returns
    -------
    `~numpy.ndarray` of bool
        True where the nearest grid PSFs are used beyond the grid.
    """
    from photutils.psf import GriddedPSFModel

    if not isinstance(model, GriddedPSFModel):
        return np.zeros(np.shape(x), dtype=bool)
    grid = np.asarray(model.grid_xypos, dtype=float)
    return ((x < grid[:, 0].min()) | (x > grid[:, 0].max())
            | (y < grid[:, 1].min()) | (y > grid[:, 1].max()))


def render_stamp_psfs(model, x, y, *, psf_size, aligned_meta):
    """Unit-sum PSF stamps at band pixels on the reference grid.

    Parameters
    ----------
    model : PSF model
        The band's PSF (`build_psfs`).
    x, y : `~numpy.ndarray`
        (n,) positions in the band's own pixels.
    psf_size : int
        Odd side of the stamps.
    aligned_meta : dict
        The meta of the band as `~psfdeconv.cutouts.align_bands` reprojected
        it (empty for a band on the reference grid): the PSFs are resampled
        as its image was.

    Returns
    -------
    `~numpy.ndarray`
        (n, psf_size, psf_size), each rendered with `render_psf`.
    """
    from photutils.psf import GriddedPSFModel

    from .cutouts import resample_psf

    reprojected = bool(aligned_meta.get('reprojected', False))
    if reprojected:
        ratio = aligned_meta['reference_pixel_scale'] / aligned_meta['pixel_scale']
        # The band-pixel PSF must cover the reference-pixel PSF, plus a margin
        # for the resampling kernel.
        native_size = 2 * int(np.ceil((psf_size // 2) * ratio)) + 3
    else:
        native_size = psf_size

    def one(position):
        psf = render_psf(model, position, size=native_size)
        if not reprojected:
            return psf
        if aligned_meta.get('parity_flip'):
            psf = psf[:, ::-1]
        return resample_psf(psf, from_scale=aligned_meta['pixel_scale'],
                            to_scale=aligned_meta['reference_pixel_scale'],
                            rotation=aligned_meta['rotation'], size=psf_size,
                            kernel=aligned_meta['kernel'])

    n = len(x)
    if isinstance(model, PSFExModel):
        default = model.default_position
    elif isinstance(model, GriddedPSFModel):
        default = tuple(np.mean(np.asarray(model.grid_xypos, float), axis=0))
    else:
        return np.broadcast_to(one(None), (n, psf_size, psf_size))
    out = np.empty((n, psf_size, psf_size))
    for i in range(n):
        # Off-image sources (NaN positions) get the PSF at the image centre
        # (a PSFEx model: at its stars' mean position).
        position = (x[i], y[i]) if np.isfinite(x[i]) and np.isfinite(y[i]) else \
            default
        out[i] = one(position)
    return out
