# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exposure catalogues against their simulated truth, and real-frame
catalogues against photutils' own Kron photometry.
"""


import warnings

import numpy as np
from astropy import units as u
from astropy.table import QTable

from ..exceptions import (
    InvalidInputError,
)
from ..flags import unusable_bits

__all__ = ['match_truth', 'exposure_accuracy', 'kron_reference', 'compare_with_kron']



def match_truth(catalog, truth, *, max_separation=0.5 * u.arcsec, kind='galaxy'):
    """Match a catalogue of `~psfdeconv.pipeline.deconvolve_catalog` to the
    truth table of `~psfdeconv.simulate.simulate_exposure`.

    Each truth source of ``kind`` is matched to its nearest catalogue source
    on the sky; pairs farther apart than ``max_separation`` are dropped.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        With a ``sky_centroid`` column.
    truth : `~astropy.table.Table`
        With ``ra``, ``dec`` (degrees) and ``kind`` columns.
    max_separation : `~astropy.units.Quantity`, optional
        Largest separation of a match.
    kind : str or None, optional
        Truth sources to match ('galaxy', 'star' or None for all).

    Returns
    -------
    `~astropy.table.QTable`
        One row per match: ``truth_index``, ``catalog_index`` and
        ``separation`` (arcsec).
    """
    from astropy.coordinates import SkyCoord

    if 'sky_centroid' not in catalog.colnames:
        raise InvalidInputError('the catalogue has no sky_centroid column; give '
                                'the catalogue of deconvolve_catalog.')
    rows = np.arange(len(truth))
    if kind is not None:
        rows = rows[np.asarray(truth['kind']) == kind]
    sky = SkyCoord(u.Quantity(truth['ra'][rows], u.deg),
                   u.Quantity(truth['dec'][rows], u.deg))
    matches = QTable({'truth_index': np.zeros(0, int), 'catalog_index': np.zeros(0, int),
                      'separation': np.zeros(0) * u.arcsec})
    if rows.size == 0 or len(catalog) == 0:
        return matches
    index, separation, _ = sky.match_to_catalog_sky(catalog['sky_centroid'])
    keep = separation <= max_separation
    matches = QTable({'truth_index': rows[keep], 'catalog_index': index[keep],
                      'separation': separation[keep].to(u.arcsec)})
    return matches


def _noise_median_abs(relative_error, n_draws=1000, seed=0):
    """The median |dF/F| that the catalogue's own flux errors alone give:
    the median over objects of |N(0, relative_error)|, averaged over seeded
    draws (None for no objects)."""
    relative_error = np.asarray(relative_error, float)
    if relative_error.size == 0:
        return None
    draws = np.random.default_rng(seed).normal(size=(n_draws, relative_error.size))
    return float(np.mean(np.median(np.abs(draws * relative_error), axis=1)))


def exposure_accuracy(catalog, truth, *, min_snr=20.0,
                      max_separation=0.5 * u.arcsec):
    """Accuracy of an exposure catalogue against its simulated truth.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        From `~psfdeconv.pipeline.deconvolve_catalog`.
    truth : `~astropy.table.Table`
        From `~psfdeconv.simulate.simulate_exposure` (with the ``*_true``
        shape columns).
    min_snr : float, optional
        Flux accuracy is taken over matches with ``snr_<band>`` above this.
    max_separation : `~astropy.units.Quantity`, optional
        Matching radius (`match_truth`).

    Returns
    -------
    dict
        ``n_truth``, ``n_matched``, ``n_unflagged`` (matches without flags),
        ``position_arcsec`` (median and max separation), and per band
        ``flux`` (the median of ``|flux_corrected / true - 1|`` and the bias,
        the median of ``flux_corrected / true - 1``, over matches above
        ``min_snr``, with their count, and ``noise_median_abs``: the median
        that the catalogue's flux errors alone would give, the floor set by
        the photometric noise), ``flux_residual`` (the same two medians of
        ``flux_residual``, where the catalogue has it), ``e1``, ``e2`` (RMS and
        mean of the unweighted ellipticity difference), ``hsm_e1``, ``hsm_e2`` (same, adaptive
        moments, finite values only) and ``size_percent`` (mean and RMS of
        100 (size / size_true - 1)). Statistics use the matches without a
        flag that makes the measurement unusable
        (`~psfdeconv.flags.UNUSABLE_FLAGS`) and without ``HSM_FAILED``;
        ``n_unflagged`` counts them.
    """
    matches = match_truth(catalog, truth, max_separation=max_separation)
    n_truth = int(np.sum(np.asarray(truth['kind']) == 'galaxy'))
    cat = catalog[matches['catalog_index']]
    tru = truth[matches['truth_index']]
    # The catalogue's own name -> bit mapping, read with the registry's
    # unusable names.
    # HSM_FAILED rows are left out too, so that every statistic is over the
    # same rows.
    flag_bits = catalog.meta.get('flag_bits', {})
    unusable = unusable_bits(flag_bits) | flag_bits.get('HSM_FAILED', 0)
    good = (np.asarray(cat['flags']) & (unusable or ~0)) == 0
    sep = matches['separation'].to_value(u.arcsec)
    result = {'n_truth': n_truth, 'n_matched': len(matches),
              'n_unflagged': int(good.sum()),
              'position_arcsec': {'median': float(np.median(sep)) if sep.size else None,
                                  'max': float(np.max(sep)) if sep.size else None}}

    def stats(diff):
        diff = np.asarray(diff, float)
        diff = diff[np.isfinite(diff)]
        if diff.size == 0:
            return {'n': 0, 'mean': None, 'rms': None}
        return {'n': int(diff.size), 'mean': float(diff.mean()),
                'rms': float(np.sqrt(np.mean(diff ** 2)))}

    def flux_medians(ratio):
        return {'n': int(ratio.size),
                'median_abs': float(np.median(np.abs(ratio))) if ratio.size else None,
                'median': float(np.median(ratio)) if ratio.size else None}

    for band in catalog.meta.get('bands', []):
        flux = np.asarray(u.Quantity(cat[f'flux_corrected_{band}']).value)
        true_flux = np.asarray(u.Quantity(tru[f'flux_{band}']).value)
        snr_ok = good & (np.asarray(cat[f'snr_{band}']) > min_snr)
        entry = {'flux': {**flux_medians(flux[snr_ok] / true_flux[snr_ok] - 1.0),
                          'noise_median_abs': _noise_median_abs(
                              np.asarray(u.Quantity(cat[f'flux_err_{band}']).value)[snr_ok]
                              / true_flux[snr_ok])}}
        if f'flux_residual_{band}' in cat.colnames:
            residual = np.asarray(u.Quantity(cat[f'flux_residual_{band}']).value)
            entry['flux_residual'] = flux_medians(residual[snr_ok] / true_flux[snr_ok] - 1.0)
        for name in ('e1', 'e2', 'hsm_e1', 'hsm_e2'):
            if f'{name}_true' in tru.colnames:
                entry[name] = stats(np.asarray(cat[f'{name}_{band}'])[good]
                                    - np.asarray(tru[f'{name}_true'])[good])
        if 'size_true' in tru.colnames:
            size = u.Quantity(cat[f'size_{band}']).to_value(u.arcsec)[good]
            size_true = u.Quantity(tru['size_true']).to_value(u.arcsec)[good]
            entry['size_percent'] = stats(100.0 * (size / size_true - 1.0))
        result[band] = entry
    return result


#: Default lower bound of the Kron signal-to-noise ratio of a reference galaxy.
KRON_MIN_SNR = 50.0
#: Default factor by which a reference galaxy's FWHM exceeds the stellar locus.
KRON_RESOLVED_FACTOR = 1.3


def _half_peak_fwhm(data, segment_image, labels, peak):
    """FWHM (pixels) of a disc with the area of each segment's pixels above
    half its peak -- the definition of `psfdeconv.psf.find_stars`, which,
    unlike second moments, does not grow with a star's flux."""
    from scipy import ndimage

    half = np.zeros(int(labels.max()) + 1)
    half[labels] = 0.5 * peak
    above = (data >= half[segment_image]) & (segment_image > 0)
    area = np.asarray(ndimage.sum_labels(above, segment_image, labels), dtype=float)
    return 2.0 * np.sqrt(area / np.pi)


def kron_reference(exposure, *, threshold_sigma=3.0, n_pixels=10, min_snr=KRON_MIN_SNR,
                   resolved_factor=KRON_RESOLVED_FACTOR, stellar_fwhm=None,
                   smoothing_fwhm=3.0, n_levels=32, contrast=0.001, saturation='auto',
                   all_sources=False):
    """The bright resolved galaxies of one band and their Kron fluxes, found by
    photutils' own detection, deblending and Kron photometry.

    This is the reference of the real-frame acceptance check
    (`compare_with_kron`): photutils' chain, independent of psfdeconv's
    detection, stamps and network. The background is
    `psfdeconv.background.estimate_background` (a
    `~photutils.background.Background2D` mesh, sources masked); sources are
    detected on the background-subtracted image smoothed by a Gaussian of
    ``smoothing_fwhm`` pixels (`~photutils.segmentation.detect_sources`,
    ``threshold_sigma`` times the background rms, ``n_pixels`` connected
    pixels), deblended (`~photutils.segmentation.deblend_sources`) and
    measured with `~photutils.segmentation.SourceCatalog` (``kron_flux``,
    ``kron_flux_err``, ``segment_flux``, ``area``, ``fwhm``). A source is
    selected as a bright resolved galaxy when

    * bright: ``kron_flux / kron_fluxerr > min_snr``;
    * resolved: its FWHM (that of a disc with the area of its pixels above
      half its peak, as `psfdeconv.psf.find_stars` measures it) exceeds
      ``resolved_factor`` times the stellar locus (``stellar_fwhm``, or the
      ``fwhm_locus`` of `psfdeconv.psf.find_stars`), so that stars, whose
      half-peak FWHM does not grow with flux, are not selected;
    * clean: its segment's bounding box does not touch the image edge and
      holds no masked pixel, its raw peak is below ``saturation``, and its
      Kron flux is finite.

    The Kron flux errors are the background noise only: the exposure's
    standard-deviation uncertainty where it has one, else the background
    rms (no Poisson term, the gain being unknown), so the SNR overestimates
    that of the brightest sources, which are selected anyway.

    Parameters
    ----------
    exposure : `~astropy.nddata.NDData` or `~astropy.nddata.CCDData`
        One band, e.g. from `psfdeconv.io.read_exposure`; its mask and
        non-finite pixels are ignored.
    threshold_sigma : float, optional
        Detection threshold, in units of the background rms.
    n_pixels : int, optional
        Minimum number of connected pixels of a detection (and of a
        deblended source).
    min_snr : float, optional
        Minimum Kron signal-to-noise ratio of a selected galaxy.
    resolved_factor : float, optional
        Minimum FWHM of a selected galaxy, in units of the stellar FWHM.
    stellar_fwhm : float, optional
        Stellar FWHM (pixels, half-peak-area definition); default: the
        ``fwhm_locus`` of ``psfdeconv.psf.find_stars(exposure,
        all_sources=True)``.
    smoothing_fwhm : float, optional
        FWHM (pixels) of the Gaussian kernel the detection image is
        smoothed with (a 5-pixel kernel at the default 3).
    n_levels, contrast : int, float, optional
        Deblending options of `~photutils.segmentation.deblend_sources`.
    saturation : float, 'auto' or None, optional
        Sources whose raw peak reaches this level are not selected. 'auto':
        the exposure's ``meta['SATURATE']``, else half the image's largest
        pixel value (a frame without a saturation level, such as the KiDS
        test frame, whose saturated stars have large half-peak FWHMs and
        would otherwise pass as resolved galaxies); None: no limit.
    all_sources : bool, optional
        Return every detection with the selection columns instead of the
        selected galaxies only.

    Returns
    -------
    `~astropy.table.QTable`
        One row per galaxy, brightest first: ``label`` (segment label),
        ``x``, ``y`` (centroid, 0-based pixels), ``kron_flux``,
        ``kron_flux_err``, ``snr``, ``segment_flux`` (data units, background
        subtracted), ``area`` (pixels in the segment), ``fwhm`` (pixels,
        half-peak area), ``fwhm_moments`` (pixels, `SourceCatalog.fwhm
        <photutils.segmentation.SourceCatalog.fwhm>`), ``semimajor_axis``
        (pixels), ``kron_radius`` (in units of the semi-axes), and the
        booleans ``bright``, ``resolved``, ``edge``, ``masked``,
        ``saturated`` and ``selected``. ``meta`` holds ``stellar_fwhm``,
        ``background_rms``, ``n_detected``, ``n_selected`` and the options.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If the image is not 2-D or has no good pixel, an option is out of
        range, or no stellar locus can be found and ``stellar_fwhm`` is not
        given.
    """
    from astropy.convolution import convolve
    from photutils.segmentation import (
        SourceCatalog,
        deblend_sources,
        detect_sources,
        make_2dgaussian_kernel,
    )
    from photutils.utils.exceptions import NoDetectionsWarning
    from scipy import ndimage

    from .._validation import as_image_and_mask
    from .._warnings import catch_warnings
    from ..background import estimate_background
    from ..psf import find_stars

    for name, value in (('threshold_sigma', threshold_sigma), ('min_snr', min_snr),
                        ('resolved_factor', resolved_factor),
                        ('smoothing_fwhm', smoothing_fwhm)):
        if not (np.isfinite(value) and value > 0):
            raise InvalidInputError(f'{name} = {value}; give a positive number.')
    if int(n_pixels) != n_pixels or n_pixels < 1:
        raise InvalidInputError(f'n_pixels = {n_pixels}; give a positive integer '
                                f'(e.g. 10).')
    image, bad, meta = as_image_and_mask(exposure)
    if isinstance(saturation, str) and saturation == 'auto':
        saturation = meta.get('SATURATE')
        if saturation is None:
            # Without a saturation level in the header, the brightest pixels
            # of a survey frame are saturated stars' cores (and their bleed
            # trails and spikes); half the maximum keeps them out.
            saturation = 0.5 * float(np.max(np.where(bad, -np.inf, image)))
    if stellar_fwhm is None:
        stellar_fwhm = float(u.Quantity(
            find_stars(exposure, all_sources=True).meta['fwhm_locus']).value)
    if not (np.isfinite(stellar_fwhm) and stellar_fwhm > 0):
        raise InvalidInputError(f'the stellar FWHM is {stellar_fwhm}: find_stars '
                                f'found no point-like source; give stellar_fwhm '
                                f'(pixels).')
    background, rms = estimate_background(image, bad, mask_sources=True)
    data = np.where(bad, 0.0, image - background)
    error = np.full(image.shape, rms)
    uncertainty = getattr(exposure, 'uncertainty', None)
    if uncertainty is not None and getattr(uncertainty, 'uncertainty_type', '') == 'std':
        error = np.array(uncertainty.array, dtype=float)
        error = np.where(np.isfinite(error) & (error > 0), error, rms)

    size = 2 * int(np.ceil(0.85 * smoothing_fwhm)) + 1  # 5 pixels at FWHM 3
    convolved = convolve(data, make_2dgaussian_kernel(smoothing_fwhm, size=size),
                         mask=bad)
    convolved[bad] = 0.0
    with catch_warnings():
        warnings.filterwarnings('ignore', category=NoDetectionsWarning)
        segments = detect_sources(convolved, threshold_sigma * rms, int(n_pixels),
                                  mask=bad)
    options = {'threshold_sigma': threshold_sigma, 'n_pixels': int(n_pixels),
               'min_snr': min_snr, 'resolved_factor': resolved_factor,
               'smoothing_fwhm': smoothing_fwhm, 'n_levels': n_levels,
               'contrast': contrast}
    names = ('label', 'x', 'y', 'kron_flux', 'kron_flux_err', 'snr', 'segment_flux',
             'area', 'fwhm', 'fwhm_moments', 'semimajor_axis', 'kron_radius')
    flags = ('bright', 'resolved', 'edge', 'masked', 'saturated', 'selected')
    table = QTable()
    if segments is None:
        for name in names + flags:
            table[name] = np.zeros(0, dtype=bool if name in flags else float)
    else:
        with catch_warnings():
            # photutils falls back to linear deblending thresholds for some
            # segments and says so; that is not a problem here.
            warnings.filterwarnings('ignore', message='The deblending mode',
                                    category=Warning)
            segments = deblend_sources(convolved, segments, int(n_pixels),
                                       n_levels=n_levels, contrast=contrast,
                                       progress_bar=False)
        catalog = SourceCatalog(data, segments, convolved_data=convolved, error=error,
                                mask=bad)
        labels = np.asarray(segments.labels)
        peak = np.asarray(catalog.max_value, dtype=float)
        table['label'] = labels
        table['x'] = np.asarray(catalog.x_centroid, dtype=float)
        table['y'] = np.asarray(catalog.y_centroid, dtype=float)
        table['kron_flux'] = np.asarray(catalog.kron_flux, dtype=float)
        table['kron_flux_err'] = np.asarray(catalog.kron_flux_err, dtype=float)
        table['snr'] = table['kron_flux'] / table['kron_flux_err']
        table['segment_flux'] = np.asarray(catalog.segment_flux, dtype=float)
        table['area'] = np.asarray(u.Quantity(catalog.area).value, dtype=float)
        table['fwhm'] = _half_peak_fwhm(data, segments.data, labels, peak)
        table['fwhm_moments'] = np.asarray(u.Quantity(catalog.fwhm).value, dtype=float)
        table['semimajor_axis'] = np.asarray(
            u.Quantity(catalog.semimajor_axis).value, dtype=float)
        table['kron_radius'] = np.asarray(u.Quantity(catalog.kron_radius).value,
                                          dtype=float)
        ny, nx = image.shape
        slices = ndimage.find_objects(segments.data)
        edge = np.zeros(len(labels), dtype=bool)
        masked = np.zeros(len(labels), dtype=bool)
        for i, label in enumerate(labels):
            box = slices[label - 1]
            edge[i] = (box[0].start == 0 or box[1].start == 0
                       or box[0].stop == ny or box[1].stop == nx)
            masked[i] = bool(bad[box].any())
        if saturation is None:
            saturated = np.zeros(len(labels), dtype=bool)
        else:
            raw_peak = np.asarray(ndimage.maximum(np.where(bad, -np.inf, image),
                                                  segments.data, labels))
            saturated = raw_peak >= float(saturation)
        with np.errstate(invalid='ignore', divide='ignore'):
            table['bright'] = np.asarray(table['snr'] > min_snr)
        table['resolved'] = np.asarray(table['fwhm'] > resolved_factor * stellar_fwhm)
        table['edge'] = edge
        table['masked'] = masked
        table['saturated'] = saturated
        table['selected'] = (table['bright'] & table['resolved'] & ~table['edge']
                             & ~table['masked'] & ~table['saturated']
                             & np.isfinite(table['kron_flux']))
        table.sort('kron_flux', reverse=True)
    table.meta.update(options)
    table.meta['stellar_fwhm'] = float(stellar_fwhm)
    table.meta['background_rms'] = float(rms)
    table.meta['n_detected'] = len(table)
    table.meta['n_selected'] = int(np.sum(table['selected']))
    if not all_sources:
        table = table[table['selected']]
    return table


def _match_one_to_one(catalog_xy, reference_xy, match_radius):
    """Pairs (reference index, catalogue index, separation) within
    ``match_radius``, closest first, each row used once.

    ``catalog_xy`` is a list of ``(n_catalog, 2)`` position arrays (e.g. input
    and measured positions); a pair's separation is the smallest over them.
    """
    distance = np.full((len(reference_xy), len(catalog_xy[0])), np.inf)
    for xy in catalog_xy:
        d = np.hypot(reference_xy[:, None, 0] - xy[None, :, 0],
                     reference_xy[:, None, 1] - xy[None, :, 1])
        distance = np.fmin(distance, d)
    pairs = []
    used_reference, used_catalog = set(), set()
    for flat in np.argsort(distance, axis=None, kind='stable'):
        i, j = np.unravel_index(flat, distance.shape)
        if not distance[i, j] <= match_radius:
            break
        if i in used_reference or j in used_catalog:
            continue
        used_reference.add(i)
        used_catalog.add(j)
        pairs.append((int(i), int(j), float(distance[i, j])))
    return pairs


def compare_with_kron(catalog, reference, *, band, match_radius=3.0,
                      min_usable_fraction=0.5, ratio_range=(0.85, 1.2),
                      max_fraction_off=0.05):
    """A catalogue's corrected fluxes against photutils' Kron fluxes: the
    real-frame acceptance check.

    The rule (docs/validation.rst): over the reference galaxies matched by a
    catalogue row, the usable rows' ``flux_corrected_<band> / kron_flux`` has
    a median within ``ratio_range`` (0.85-1.2), no more than
    ``max_fraction_off`` (5 %) of them are off by more than a factor 2 (ratio
    above 2 or below 0.5), and at least ``min_usable_fraction`` of the
    matched rows are usable (0.5 on KiDS, 0.3 on DECam).

    Each reference galaxy is matched to the nearest catalogue row whose
    input position (``x_input``, ``y_input``) or measured position (``x``,
    ``y``) lies within ``match_radius`` pixels; pairs are taken closest
    first and each row and galaxy is used once.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        A catalogue of `~psfdeconv.pipeline.deconvolve_catalog` (or
        ``psfdeconv run``'s ``catalog.fits``) with ``x``, ``y``,
        ``x_input``, ``y_input`` (pixels of the exposure of ``reference``),
        ``usable`` and ``flux_corrected_<band>``; ``id`` and ``flags`` are
        copied when present.
    reference : `~astropy.table.QTable`
        From `kron_reference` on the same image: ``x``, ``y``, ``kron_flux``.
    band : str
        The band whose ``flux_corrected_<band>`` is compared.
    match_radius : float, optional
        Largest separation of a match, in pixels.
    min_usable_fraction : float, optional
        Smallest passing fraction of usable rows among the matched ones.
    ratio_range : tuple of float, optional
        Passing range of the median ratio.
    max_fraction_off : float, optional
        Largest passing fraction of usable rows off by more than 2x.

    Returns
    -------
    dict
        ``n_reference``, ``n_matched``, ``n_usable`` (usable matched rows),
        ``usable_fraction`` (``n_usable / n_matched``), ``median_ratio``
        and ``fraction_off_2x`` (over the usable matched rows; None when
        there is none), ``passes_ratio``, ``passes_off_2x``,
        ``passes_usable`` and ``passes`` (all three), and ``matches``: a
        `~astropy.table.QTable` with one row per match (``reference_index``,
        ``catalog_index``, ``label``, ``id``, ``separation`` (pixels),
        ``kron_flux``, ``flux_corrected``, ``ratio``, ``flags``,
        ``usable``), ordered by reference row.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If a column is missing or an option is out of range.

    Examples
    --------
    >>> from astropy.table import QTable
    >>> from psfdeconv.evaluate import compare_with_kron
    >>> reference = QTable({'x': [10.0, 50.0], 'y': [10.0, 50.0],
    ...                     'kron_flux': [100.0, 200.0]})
    >>> catalog = QTable({'x': [10.5, 50.0], 'y': [10.0, 51.0],
    ...                   'x_input': [10.0, 50.0], 'y_input': [10.0, 50.0],
    ...                   'usable': [True, True],
    ...                   'flux_corrected_r': [95.0, 210.0]})
    >>> result = compare_with_kron(catalog, reference, band='r')
    >>> result['n_matched'], result['median_ratio'], result['passes']
    (2, 1.0, True)
    """
    column = f'flux_corrected_{band}'
    for table, table_name, needed in (
            (catalog, 'catalog', ('x', 'y', 'x_input', 'y_input', 'usable', column)),
            (reference, 'reference', ('x', 'y', 'kron_flux'))):
        missing = [name for name in needed if name not in table.colnames]
        if missing:
            raise InvalidInputError(f'the {table_name} has no column(s) {missing}; '
                                    f'give a psfdeconv catalogue and a kron_reference '
                                    f'table of the same image (band {band!r}).')
    if not (np.isfinite(match_radius) and match_radius > 0):
        raise InvalidInputError(f'match_radius = {match_radius}; give a positive '
                                f'number of pixels.')
    low, high = ratio_range
    if not 0 < low < high:
        raise InvalidInputError(f'ratio_range = {ratio_range}; give (low, high) with '
                                f'0 < low < high.')

    def values(table, name):
        return np.asarray(u.Quantity(table[name]).value, dtype=float)

    reference_xy = np.column_stack([values(reference, 'x'), values(reference, 'y')])
    catalog_xy = [np.column_stack([values(catalog, 'x_input'), values(catalog, 'y_input')]),
                  np.column_stack([values(catalog, 'x'), values(catalog, 'y')])]
    pairs = []
    if len(reference) and len(catalog):
        pairs = sorted(_match_one_to_one(catalog_xy, reference_xy, match_radius))
    ref_index = np.array([p[0] for p in pairs], dtype=int)
    cat_index = np.array([p[1] for p in pairs], dtype=int)
    kron = values(reference, 'kron_flux')[ref_index]
    flux = values(catalog, column)[cat_index]
    with np.errstate(invalid='ignore', divide='ignore'):
        ratio = flux / kron
    usable = np.asarray(catalog['usable'], dtype=bool)[cat_index]
    matches = QTable({'reference_index': ref_index, 'catalog_index': cat_index})
    matches['label'] = (np.asarray(reference['label'])[ref_index]
                        if 'label' in reference.colnames else ref_index)
    matches['id'] = (np.asarray(catalog['id'])[cat_index]
                     if 'id' in catalog.colnames else cat_index)
    matches['separation'] = np.array([p[2] for p in pairs], dtype=float)
    matches['kron_flux'] = kron
    matches['flux_corrected'] = flux
    matches['ratio'] = ratio
    matches['flags'] = (np.asarray(catalog['flags'], dtype=np.int64)[cat_index]
                        if 'flags' in catalog.colnames else np.zeros(len(pairs), np.int64))
    matches['usable'] = usable

    good = ratio[usable]
    n_usable = int(usable.sum())
    median_ratio = float(np.median(good)) if n_usable else None
    fraction_off = (float(np.mean(~((good >= 0.5) & (good <= 2.0))))
                    if n_usable else None)
    usable_fraction = n_usable / len(pairs) if pairs else None
    result = {'band': band, 'n_reference': len(reference), 'n_matched': len(pairs),
              'n_usable': n_usable, 'usable_fraction': usable_fraction,
              'median_ratio': median_ratio, 'fraction_off_2x': fraction_off,
              'passes_ratio': bool(n_usable and low <= median_ratio <= high),
              'passes_off_2x': bool(n_usable and fraction_off <= max_fraction_off),
              'passes_usable': bool(pairs and usable_fraction >= min_usable_fraction)}
    result['passes'] = (result['passes_ratio'] and result['passes_off_2x']
                        and result['passes_usable'])
    result['matches'] = matches
    return result
