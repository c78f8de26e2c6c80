# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exposure-level orchestration: from multi-band exposures to a catalogue of
deconvolved galaxies.

`deconvolve_catalog` runs every stage for one set of exposures (one image
per band of the same field):

1. read the bands (`psfdeconv.io.read_exposure_set`; paths or NDData);
2. a PSF model per band (`psfdeconv.psf.build_psfs`): an ePSF from the band's own stars
   (`psfdeconv.psf.build_epsf`) unless a model, an array or a ``--psf``
   string is given;
3. the source positions: given (sky or reference-band pixels), or detected
   on the reference band with stars removed
   (`psfdeconv.detection.detect_galaxies`);
4. background subtraction (`psfdeconv.background.subtract_background`);
5. band alignment: bands whose pixel grid differs from the reference
   band's are reprojected onto it (`psfdeconv.cutouts.align_to_reference`), and
   their PSFs pushed through the same resampling
   (`psfdeconv.cutouts.resample_psf`);
6. stamps of the model's size around each source in every band
   (`psfdeconv.cutouts.make_cutouts`; masked and off-image pixels are 0 and
   flagged), the pixels of other (deblended) sources refilled from the
   source's other side or with noise (`psfdeconv.detection.replace_neighbours`;
   blended sources and galaxies larger than a stamp: :doc:`/flags`), and the
   PSF of each source
   rendered at its position (`psfdeconv.psf.render_stamp_psfs`);
7. deconvolution with the amplitude refit and flux-bias correction
   (`psfdeconv.deconvolve.deconvolve_stamps`);
8. measurements of the deconvolved images (`psfdeconv.measure`).

It returns a `~astropy.table.QTable` with one row per source and a list of
`~astropy.nddata.NDData`, the deconvolved stamps with their WCS.
`psfdeconv.io.write_catalog` and `psfdeconv.io.write_stamps` write them to
FITS (`run_exposure_set` does both, chunk by chunk).

**Flags**: the bits of the catalogue's ``flags`` column are defined in
`psfdeconv.flags` (the cutout flags are set when they hold in any band).
"""

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ._cpus import cpu_share
from ._offload import Helper, HelperCall
from ._validation import angle_arcsec, check_output_location, positive_int
from .background import shared_estimates
from .cutouts import align_to_reference
from .detection import (
    NEIGHBOUR_OPTIONS,
    blended_sources,
    detect_galaxies,
    neighbour_segments,
    replace_neighbours,
    segment_extents,
    source_segments,
)
from .exceptions import (
    InvalidInputError,
    InvalidPSFError,
    ModelFileError,
    ShapeMismatchError,
)
from .flags import (
    FLAG_BLENDED,
    FLAG_BLOCK_REDUCED,
    FLAG_CENTROID_FALLBACK,
    FLAG_EDGE,
    FLAG_HSM_FAILED,
    FLAG_NEIGHBOURS,
    FLAG_OUTSIDE_TRAINING,
    FLAG_PSF_EXTRAPOLATED,
    FLAG_PSF_FALLBACK,
    FLAG_TRUNCATED,
    FLAG_UNDETECTED,
    FLAGS,
    UNUSABLE_FLAGS,
    flags_column_description,
    usable_rows,
)
from .io import check_source_ids, read_exposure_set
from .psf import build_psfs, grid_extrapolated, half_peak_fwhm, render_stamp_psfs

__all__ = [
    'deconvolve_catalog',
    'run_exposure_set',
]

#: PSF stamp side used when the model card does not record one.
_DEFAULT_PSF_SIZE = 41
#: Radius, in adaptive-moment widths, of the window of the centroid.
_CENTROID_WINDOW = 6.0
#: Radius in pixels of the centroid window where the adaptive moments fail.
_FALLBACK_WINDOW = 8.0
log = logging.getLogger(__name__)

#: Sources per chunk of `deconvolve_catalog` and `run_exposure_set`: the
#: working memory of cutting, deconvolving and measuring is bounded by the
#: chunk (about 1.5 MB per source), not by the number of sources.
CHUNK_SIZE = 512


# --- Inputs ------------------------------------------------------------------------


def _as_model(model, *, n_bands=None, verify=True):
    from .model import DeconvolutionModel, load_model

    if model is None or isinstance(model, str | Path):
        # A verified network is loaded where it first runs (from OpenVINO's
        # cached conversion, where there is one, without TensorFlow).
        return load_model(model, n_bands=n_bands, verify=verify,
                          network='lazy' if verify else True)
    if isinstance(model, DeconvolutionModel):
        return model
    raise ModelFileError(f'model is a {type(model).__name__}; give a '
                         f'DeconvolutionModel (psfdeconv.load_model), the path of '
                         f'a .keras file, or None for the shipped model.')


def _psf_size(psf_size, model, stamp_size):
    if psf_size is None:
        sim = model.card.get('training', {}).get('simulation_config', {}) or {}
        psf_size = int(sim.get('psf_size', min(_DEFAULT_PSF_SIZE, stamp_size - 1)))
    if isinstance(psf_size, bool) or not isinstance(psf_size, int | np.integer) \
            or psf_size < 3 or psf_size % 2 == 0 or psf_size > stamp_size:
        raise InvalidPSFError(f'psf_size = {psf_size!r}; give an odd number of '
                              f'pixels >= 3 and at most the stamp size '
                              f'{stamp_size} (the model was trained with the '
                              f'psf_size of its card).')
    return int(psf_size)


def _pixels_of(table_column):
    return np.asarray(getattr(table_column, 'value', table_column), dtype=np.float64)


def _sky_from_columns(ra, dec):
    """ICRS positions from ``ra`` and ``dec`` columns: Quantities, numbers
    (degrees) or sexagesimal strings (``'10:00:01.2'``, ``'+02:10:03'``: ra
    in hours, dec in degrees, as catalogues write them)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    def degrees(column):
        if getattr(column, 'unit', None) is not None:
            return u.Quantity(column).to(u.deg)
        try:
            return np.asarray(column, dtype=float) * u.deg
        except (TypeError, ValueError):
            return None

    ra_deg, dec_deg = degrees(ra), degrees(dec)
    if ra_deg is not None and dec_deg is not None:
        return SkyCoord(ra_deg, dec_deg, frame='icrs')
    ra_text = [str(value).strip() for value in np.asarray(ra)]
    dec_text = [str(value).strip() for value in np.asarray(dec)]
    try:
        return SkyCoord(ra_text, dec_text, unit=(u.hourangle, u.deg), frame='icrs')
    except Exception:  # astropy raises several types for unparsable angles
        pass
    for row, (ra_value, dec_value) in enumerate(zip(ra_text, dec_text, strict=True)):
        try:
            SkyCoord(ra_value, dec_value, unit=(u.hourangle, u.deg))
        except Exception as exc:  # as above
            raise InvalidInputError(
                f'(ra, dec)[{row}] = ({ra_value!r}, {dec_value!r}) cannot be read '
                f'({exc}); give ra and dec in degrees (numbers, or columns with '
                f'a unit), or sexagesimal strings with ra in hours and dec in '
                f'degrees (e.g. 10:00:01.2 and +02:10:03).') from None
    raise InvalidInputError('the ra and dec columns cannot be read as sky '
                            'positions; give degrees or sexagesimal strings.')


def _detect_options(detect_options, reference_psf, shape):
    """``detect_options`` with the FWHM of a PSF not built from the image's
    own stars (a Moffat specification, a file; at the image centre): the
    stars' FWHM where the frame has too few compact sources for a stellar
    locus, which its most compact galaxy (a bulge) would otherwise make."""
    options = dict(detect_options or {})
    if 'n_stars' not in (getattr(reference_psf, 'meta', None) or {}):
        centre = ((shape[1] - 1) / 2, (shape[0] - 1) / 2)
        options.setdefault('psf_fwhm', half_peak_fwhm(reference_psf, centre))
    return options


def _early_detection(reference, reference_band, detect_options):
    """The sources of the reference band detected before its PSF is known:
    ``(options, detected)``, with the options `_detect_options` gives for a
    PSF built from the image's own stars (which need no PSF FWHM). The caller
    uses them only if the PSF turns out to be such (the options agree), and
    detects again otherwise. An error of the detection is returned, to be
    raised after any error of the PSFs, as when detecting after them."""
    options = dict(detect_options or {})
    try:
        return options, _positions(None, reference, reference_band, options)
    except InvalidInputError as error:
        return options, error


class _DetectionClaim:
    """Who detects the sources while a helper builds the PSFs: the helper once
    its PSFs are done, or the run once its own set-up is, whichever comes
    first (`take` creates a file exclusively, so exactly one of the two
    processes gets True); the other one leaves the detection to it."""

    def __init__(self, path):
        self.path = str(path)

    def take(self, *, unwritable=False):
        """Whether this process detects the sources; ``unwritable`` where the
        claim cannot be written at all (the helper then detects, the run
        waits for it)."""
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:
            return unwritable
        return True


def _positions(positions, reference, reference_band, detect_options):
    """(x, y) reference-band pixels, ids, and a description of the source."""
    from astropy.coordinates import SkyCoord
    from astropy.table import Table
    from astropy.wcs.utils import skycoord_to_pixel

    def from_sky(sky):
        sky = sky.reshape(-1) if not sky.isscalar else sky.reshape(1)
        # mode='all' includes distortions (SIP, TPV), as the cutouts do.
        x, y = skycoord_to_pixel(sky, reference.wcs, origin=0, mode='all')
        return np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))

    if positions is None:
        galaxies = detect_galaxies(reference, **(detect_options or {}))
        if len(galaxies) == 0:
            raise InvalidInputError(
                f'no galaxies were detected on the reference band '
                f'{reference_band!r} ({galaxies.meta["n_detected"]} detections, '
                f'{galaxies.meta["n_stars"]} of them stars); give positions (a '
                f'catalogue, --catalog), lower the detection threshold '
                f'(--threshold-sigma, threshold_sigma of detect_options in '
                f'Python) or check the image.')
        x, y = _pixels_of(galaxies['x']), _pixels_of(galaxies['y'])
        return x, y, np.asarray(galaxies['id']), 'detected'
    if isinstance(positions, SkyCoord):
        x, y = from_sky(positions)
        return x, y, np.arange(x.size), 'SkyCoord'
    if isinstance(positions, Table):
        table = positions
        ids = check_source_ids(table['id']) if 'id' in table.colnames else \
            np.arange(len(table))
        sky_columns = [name for name in table.colnames
                       if isinstance(table[name], SkyCoord)]
        if sky_columns:
            name = 'sky_centroid' if 'sky_centroid' in sky_columns else sky_columns[0]
            x, y = from_sky(table[name])
            return x, y, ids, f'table column {name!r}'
        if 'ra' in table.colnames and 'dec' in table.colnames:
            x, y = from_sky(_sky_from_columns(table['ra'], table['dec']))
            return x, y, ids, 'table columns ra, dec'
        if 'x' in table.colnames and 'y' in table.colnames:
            return (_pixels_of(table['x']), _pixels_of(table['y']), ids,
                    f'table columns x, y (pixels of band {reference_band!r})')
        raise InvalidInputError(f'the positions table has columns {table.colnames}; '
                                f'give a SkyCoord column, ra and dec (deg), or x '
                                f'and y (0-based pixels of the reference band '
                                f'{reference_band!r}).')
    try:
        array = np.array(positions, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f'positions of type {type(positions).__name__} cannot '
                                f'be read; give a SkyCoord, a table (SkyCoord, '
                                f'ra/dec or x/y columns) or an (n, 2) array of '
                                f'(x, y) pixels of the reference band.')
    return array[:, 0].copy(), array[:, 1].copy(), np.arange(len(array)), \
        f'(x, y) pixels of band {reference_band!r}'


# --- The catalogue ---------------------------------------------------------------------

def _stamp_noise(uncertainty, mask):
    """Per-stamp median of the finite uncertainties on unmasked pixels
    (NaN where there are none)."""
    values = np.where(mask | ~np.isfinite(uncertainty), np.nan, uncertainty)
    flat = values.reshape(len(values), -1)
    out = np.full(len(values), np.nan)
    has = np.isfinite(flat).any(axis=1)
    out[has] = np.nanmedian(flat[has], axis=1)
    return out


def _stamp_mad(stamps, mask):
    """Robust noise of each stamp's unmasked pixels (`MAD_TO_SIGMA` times
    their median absolute deviation; NaN where there are none)."""
    from astropy.stats import median_absolute_deviation

    from .deconvolve import MAD_TO_SIGMA

    values = np.where(mask, np.nan, stamps).reshape(len(stamps), -1)
    out = np.full(len(stamps), np.nan)
    has = np.isfinite(values).any(axis=1)
    out[has] = MAD_TO_SIGMA * median_absolute_deviation(values[has], axis=1,
                                                        ignore_nan=True)
    return out


def _mostly_masked(masks):
    """(n,) True where a stamp of ``masks`` (n, size, size) cannot be measured:
    every pixel masked, or its centre pixel and more than half of it masked --
    a source beyond the footprint of a band that covers part of the field, or
    in a chip gap (zero weights). Its measurements in that band are NaN."""
    size = masks.shape[-1]
    centre = masks[:, size // 2, size // 2]
    fraction = masks.reshape(len(masks), -1).mean(axis=1)
    return masks.all(axis=(-2, -1)) | (centre & (fraction > 0.5))


def deconvolve_catalog(exposures, positions=None, psfs=None, *, model=None, size=None,
                       reference_band=None, psf_size=None, subtract_background=True,
                       epsf_options=None, detect_options=None, neighbours='replace',
                       batch_size=128, chunk_size=CHUNK_SIZE, strict=False,
                       symmetries=None, target_fwhm=None, pixel_scale=None,
                       precision='auto'):
    """Deconvolve the PSF from every galaxy of a multi-band exposure set.

    See the module docstring for the stages. The bands are given in the
    order the model was trained on (the mapping's order); all stamps are cut
    on the reference band's pixel grid.

    Parameters
    ----------
    exposures : mapping of str to str, `~pathlib.Path` or `~astropy.nddata.NDData`
        Band name (a column-name suffix) to the band's exposure: a FITS file
        or an NDData/CCDData, read with `psfdeconv.io.read_exposure`, with a
        celestial WCS or, given ``pixel_scale``, without one. The data are
        in flux per pixel (e.g. adu, electron/s, nanomaggy) or in surface
        brightness (e.g. MJy/sr, nanomaggy/arcsec2), which is multiplied
        by the pixel area; magnitudes and Jy/beam are refused
        (`~psfdeconv.exceptions.UnitsError`). Bands in different but
        convertible units (nJy, uJy) are converted to the reference band's
        unit; the conversions are recorded in the catalogue's meta
        ``unit_conversion``.
    positions : `~astropy.coordinates.SkyCoord`, `~astropy.table.Table` or array-like, optional
        The sources: sky coordinates; a table with a SkyCoord column (e.g.
        ``sky_centroid``), ``ra`` and ``dec`` columns (ICRS; numbers in
        degrees, or sexagesimal strings with ra in hours and dec in degrees,
        ``'10:00:01.2'``, ``'+02:10:03'``), or ``x`` and ``y`` columns
        (0-based pixels of the reference band), used in that order of
        preference, its ``id`` column kept (checked by
        `~psfdeconv.io.check_source_ids`: unique, finite, printable ASCII); or an (n, 2)
        array of reference-band pixels. Default: the galaxies detected on the
        reference band (`~psfdeconv.detection.detect_galaxies`).
    psfs : mapping, str, PSF model or `~numpy.ndarray`, optional
        Per band or for all bands, as for `~psfdeconv.psf.build_psfs`. Default: an ePSF from
        each band's stars.
    model : `~psfdeconv.model.DeconvolutionModel`, str or `~pathlib.Path`, optional
        The network, or the path of a ``.keras`` file; the shipped default
        if None.
    size : int, optional
        Stamp side in pixels; must equal the model's ``stamp_size`` (the
        default).
    reference_band : str, optional
        The band whose pixel grid, WCS and pixel scale are used (positions in
        pixels refer to it, detection runs on it, and the centroid is measured
        on its deconvolved image). Default: the first band.
    psf_size : int, optional
        Odd side of the stamp PSFs; default: the ``psf_size`` of the model's
        training simulations (from its card), else 41.
    subtract_background : bool, optional
        Subtract a `~photutils.background.Background2D` mesh from each band
        first; give False for exposures whose sky is already subtracted.
    epsf_options : dict, optional
        Keyword arguments of `psfdeconv.psf.build_epsf` (e.g.
        ``{'maxiters': 5}``).
    detect_options : dict, optional
        Keyword arguments of `~psfdeconv.detection.detect_galaxies`.
    neighbours : {'replace', 'keep'}, optional
        'replace' (default): the pixels of other sources in each stamp
        (segments of the bands' combined signal-to-noise image,
        deblended, `~psfdeconv.detection.neighbour_segments`) are refilled from
        the pixels point-symmetric about the source, or with noise, before
        deconvolution (`~psfdeconv.detection.replace_neighbours`; flag
        ``NEIGHBOURS``), so that their light is not counted in the source's
        flux and shape. 'keep' deconvolves the stamps as cut (blends are
        flagged either way).
    batch_size : int, optional
        Objects per network call.
    symmetries : {1, 2, 4, 8}, optional
        Symmetries of the square the network output is averaged over
        (`~psfdeconv.deconvolve.deconvolve_stamps`); default: the model
        card's. Fewer run faster (the network's share of the run time
        scales with it) but leave the card's calibrations slightly off.
    precision : {'auto', 'float32', 'bfloat16'}, optional
        Arithmetic of the network, as for
        `~psfdeconv.deconvolve.deconvolve_stamps` (``'auto'``: bfloat16 where
        the CPU has it), recorded in ``meta['model']`` (``precision`` and
        ``runtime``).
    target_fwhm : float or `~astropy.units.Quantity`, optional
        Deconvolve to a round Gaussian PSF of this FWHM (arcsec, or an
        angle) instead of to the pixel grid (``target_psf`` of
        `~psfdeconv.deconvolve.deconvolve_stamps`): the stamps, shapes and
        sizes are those of the galaxies seen through it, the fluxes are
        unchanged; recorded in the catalogue's meta as ``target_fwhm``
        (arcsec).
    chunk_size : int, optional
        Sources cut out, deconvolved and measured together. The working
        memory of those stages grows with it (about 1.5 MB per source of a
        chunk), not with the number of sources; the returned stamps do grow
        with it (use `run_exposure_set`, which writes them chunk by chunk,
        for very many sources). The results do not depend on it.
    strict : bool, optional
        Refuse (`~psfdeconv.exceptions.PixelScaleError`) an exposure whose
        pixel scale, or a source whose PSF FWHM, lies outside the model's
        training range, instead of warning and setting
        `FLAG_OUTSIDE_TRAINING`.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        arcsec/pixel (or an angle per pixel). Required when a band has no
        celestial WCS: the bands are then taken to share one pixel grid
        (they must have the same shape; reproject them first otherwise),
        the positions must be pixels (given or detected; sky positions are
        refused), the catalogue has no ``sky_centroid`` column and its meta
        ``wcs`` is False, and the stamps' ``wcs`` is None. With WCSs too,
        it must agree with the reference band's WCS within 1 percent.
        Recorded in the meta as ``pixel_scale`` and ``pixel_scale_source``
        (``'wcs'`` or ``'argument'``).

    Returns
    -------
    catalog : `~astropy.table.QTable`
        One row per source, in the order of ``positions``: ``id``,
        ``sky_centroid`` (only with a WCS: `~astropy.coordinates.SkyCoord` of the light
        centroid of the reference band's deconvolved image in a window
        around its adaptive-moment centroid, or around the input position
        where HSM fails), ``x``, ``y`` (that centroid
        in reference-band pixels), ``x_input``, ``y_input`` (the given or
        detected position), ``flags`` (see the module docstring), and per
        band ``flux_<band>``, ``flux_err_<band>``, ``flux_corrected_<band>``
        (in the reference band's flux-per-pixel unit, dimensionless for
        dimensionless data; the flux after the model's flux-bias correction),
        ``flux_residual_<band>``, ``flux_residual_err_<band>`` (the flux corrected
        by the refit's residual near the source, `psfdeconv.deconvolve.residual_flux`),
        ``snr_<band>`` (flux / flux_err), ``noise_sigma_<band>`` (per-pixel
        noise used by the amplitude refit), ``e1_<band>``, ``e2_<band>``,
        ``e_<band>``, ``size_<band>`` (arcsec; unweighted moments,
        `psfdeconv.measure.image_moments`), ``hsm_e1_<band>``,
        ``hsm_e2_<band>``, ``hsm_sigma_<band>`` (arcsec) and
        ``hsm_status_<band>`` (`psfdeconv.measure.hsm_moments`), each with a
        description. Measurements of a band whose stamp is off the image,
        entirely masked, or masked at its centre and over more than half of
        it (beyond a band's footprint, in a chip gap) are NaN. ``meta`` holds
        ``bands``, ``reference_band``,
        ``psf_source`` (per band), ``model`` (name, path,
        ``weights_sha256``), ``psfdeconv_version``, ``inputs`` (paths),
        ``positions``, ``pixel_scale`` (arcsec/pixel), ``pixel_scale_source``,
        ``wcs`` (whether the bands had celestial WCSs), ``unit`` (of the
        fluxes), ``unit_conversion`` (per converted band: ``from``, ``to``,
        ``factor``, ``reason``), ``stamp_size``,
        ``psf_size``, ``reprojected`` and ``noise_source`` (per band),
        ``dequantized`` (the lattice step of each band of integer counts
        dithered off it, `~psfdeconv.background.dequantize_exposure`),
        ``background_subtracted``, ``neighbours`` and ``flag_bits``.
    stamps : list of `~astropy.nddata.NDData`
        Per source, the deconvolved images: ``data`` (n_bands, size, size) in
        the catalogue's unit, ``wcs`` the stamp's celestial WCS (None without
        one; pixel (0, 0)
        of the stamp is exposure pixel ``meta['origin']``), ``mask`` (n_bands,
        size, size) the masked or off-image input pixels, and ``meta`` with
        ``id``, ``bands``, ``flags``, ``origin``, ``psf_source`` and
        ``model_weights_sha256``.

    Raises
    ------
    psfdeconv.exceptions.BandCountError
        If the number of bands is not the model's.
    psfdeconv.exceptions.InvalidPSFError
        If a band's ePSF cannot be built (too few stars), naming the band.
    psfdeconv.exceptions.InvalidInputError
        For unreadable exposures, positions or options (every position off
        the image, no galaxy detected, ...).
    psfdeconv.exceptions.ModelFileError
        If the model cannot be loaded.
    psfdeconv.exceptions.UnitsError
        For data in magnitudes or Jy/beam, or bands whose units cannot be
        converted to the reference band's.
    psfdeconv.exceptions.ShapeMismatchError
        Without a WCS, for bands of different shapes.
    psfdeconv.exceptions.PixelScaleError
        If ``pixel_scale`` and a band's WCS disagree by more than 1 percent.

    Examples
    --------
    >>> from psfdeconv.pipeline import deconvolve_catalog
    >>> from psfdeconv.simulate import simulate_exposure
    >>> exposures, truth = simulate_exposure((256, 256), n_galaxies=8, n_stars=25)
    >>> catalog, stamps = deconvolve_catalog(exposures)  # doctest: +SKIP
    >>> catalog['flux_r', 'e1_r', 'size_r', 'flags'][:2]  # doctest: +SKIP
    >>> stamps[0].data.shape  # doctest: +SKIP
    (3, 64, 64)
    """
    _check_chunk_size(chunk_size)
    target_fwhm = _target_fwhm_arcsec(target_fwhm)
    positive_int(batch_size, 'batch_size')
    with shared_estimates():
        setup = _catalog_setup(exposures, positions, psfs, model=model, size=size,
                               reference_band=reference_band, psf_size=psf_size,
                               subtract_background=subtract_background,
                               epsf_options=epsf_options, detect_options=detect_options,
                               neighbours=neighbours, pixel_scale=pixel_scale)
    _check_strict(setup, strict)
    _set_symmetries(setup, symmetries)
    _set_precision(setup, precision)
    _set_target(setup, target_fwhm)
    parts, nddata = [], []
    for part, stamps in _catalog_chunks(setup, chunk_size=chunk_size,
                                        batch_size=batch_size):
        parts.append(part)
        nddata.extend(stamps)
    return _catalog_table(setup, parts), nddata


@dataclasses.dataclass
class _CatalogSetup:
    """What `deconvolve_catalog` prepares once per exposure set, for its
    chunks of sources."""

    #: Band name -> exposure as read, and the same background-subtracted and
    #: on the reference grid.
    exposures: dict
    aligned: dict
    #: Band name -> whether the band was reprojected onto the reference grid.
    reprojected: dict
    #: Band name -> whether the band has an uncertainty.
    has_uncertainty: dict
    bands: list
    reference_band: str
    reference: object
    model: object
    stamp_size: int
    psf_size: int
    #: arcsec/pixel of the reference band.
    scale: float
    #: Band name -> PSF model, and its description.
    psf_models: dict
    psf_sources: dict
    #: Reference-band pixel positions and ids of the sources.
    x_in: np.ndarray
    y_in: np.ndarray
    ids: np.ndarray
    #: Sources whose centre is off the image, and an on-image source that
    #: stands in for a chunk lying entirely off it.
    off_image: np.ndarray
    anchor: int
    #: Neighbour segments on the reference grid (None: neighbours kept).
    segments: object
    frame: object
    stamp_unit: object
    meta: dict
    #: Per source: its light cannot be separated from a brighter source's
    #: (BLENDED); the factor of the block-summed grid its stamps are cut from
    #: (1: the native grid); its light reaches beyond the stamp even there
    #: (TRUNCATED).
    blended: np.ndarray = None
    block_factor: np.ndarray = None
    truncated: np.ndarray = None
    #: Per source: its segment touches the image's border; its own segment's
    #: label.
    segment_at_edge: np.ndarray = None
    segments_of: np.ndarray = None
    #: Per segment label: the label of the segment it was deblended from,
    #: whether a source that is not blended lies in it, whether any source
    #: does, and its light (`_segment_pieces`).
    pieces: tuple = None
    #: Block factor -> (block-summed aligned bands, segments), made as needed.
    coarse: dict = dataclasses.field(default_factory=dict)
    strict: bool = False
    symmetries: int = 1
    #: Network arithmetic (`~psfdeconv.inference.resolve_precision`).
    precision: str = 'auto'
    #: FWHM in arcsec of the Gaussian target PSF (None: the pixel grid).
    target_fwhm: float = None
    #: Whether the bands have celestial WCSs (False: one shared pixel grid,
    #: pixel positions, no sky coordinates).
    use_wcs: bool = True

    @property
    def n(self):
        """Number of sources."""
        return self.x_in.size


def _set_symmetries(setup, symmetries):
    """The symmetries the deconvolution averages over (None: the model
    card's), checked before any stamp is cut and recorded in the
    catalogue's meta."""
    from .deconvolve import check_symmetries

    symmetries = check_symmetries(symmetries, setup.model)
    setup.symmetries = symmetries
    setup.meta['symmetries'] = symmetries


def _set_precision(setup, precision):
    """The network's precision, checked before any stamp is cut; what it
    resolves to here is recorded with the model in the catalogue's meta."""
    from .inference import resolve_precision

    setup.meta['model']['precision'], setup.meta['model']['runtime'] = \
        resolve_precision(precision)
    setup.precision = precision


def _target_fwhm_arcsec(target_fwhm):
    """The target PSF's FWHM in arcsec (None: the pixel grid), checked before
    any work."""
    return None if target_fwhm is None else angle_arcsec(target_fwhm, 'target_fwhm')


def _set_target(setup, target_fwhm):
    """Record the target PSF's FWHM (arcsec) for the chunks and in the
    catalogue's meta."""
    if target_fwhm is not None:
        setup.target_fwhm = target_fwhm
        setup.meta['target_fwhm'] = target_fwhm


def _check_strict(setup, strict):
    """With ``strict``, refuse an exposure set whose pixel scale the model
    was not trained on before any source is deconvolved (PSFs outside the
    trained FWHM range are refused chunk by chunk)."""
    from .deconvolve import check_training_range

    setup.strict = bool(strict)
    if strict:
        check_training_range(setup.model, np.array([setup.scale]), None, strict=True)


#: Seed of the dither of integer-valued exposures (with the band's index).
DITHER_SEED = 20261205


def _dequantized(exposures):
    """The exposures, those on a lattice of integer values dithered off it
    (`~psfdeconv.background.dequantize_exposure`): the median background and
    MAD noise of every later stage would otherwise snap to the lattice."""
    from .background import dequantize_exposure

    return {band: dequantize_exposure(exposure, seed=(DITHER_SEED, b))
            for b, (band, exposure) in enumerate(exposures.items())}


def _catalog_setup(exposures, positions, psfs, *, model, size, reference_band, psf_size,
                   subtract_background, epsf_options, detect_options,
                   neighbours='replace', pixel_scale=None, detection_claim=None):
    """Everything `deconvolve_catalog` does once per exposure set: the
    checked inputs, the PSF models, the positions and the background-
    subtracted, aligned bands (a `_CatalogSetup`). ``psfs`` may be a
    `~psfdeconv._offload.HelperCall` still building them
    (`run_exposure_set`): it is waited for after the bands are aligned and
    segmented, and where that helper has not begun to detect the sources
    (``detection_claim``, a `_DetectionClaim`) they are detected here
    meanwhile."""
    import astropy.units as u
    from astropy.wcs.utils import wcs_to_celestial_frame

    from . import __version__
    from .cutouts import make_cutouts

    if neighbours not in NEIGHBOUR_OPTIONS:
        raise InvalidInputError(f'neighbours = {neighbours!r}; give one of '
                                f'{NEIGHBOUR_OPTIONS}.')
    exposures, paths = read_exposure_set(exposures, require_wcs=False)
    exposures = _dequantized(exposures)
    bands = list(exposures)
    model = _as_model(model, n_bands=len(bands))
    model.check_bands(len(bands))
    stamp_size = model.stamp_size
    if size is not None and size != stamp_size:
        raise ShapeMismatchError(f'size = {size!r}, but the model was trained on '
                                 f'{stamp_size}x{stamp_size} stamps; omit size or '
                                 f'give {stamp_size}.')
    psf_size = _psf_size(psf_size, model, stamp_size)
    if reference_band is None:
        reference_band = bands[0]
    if reference_band not in exposures:
        raise InvalidInputError(f'reference_band = {reference_band!r} is not one of '
                                f'the bands {bands}; give one of them.')
    exposures, unit_conversion, band_scales, scale_source, use_wcs = _matched_bands(
        exposures, reference_band, pixel_scale)
    if not use_wcs:
        positions = _pixel_positions_only(positions, reference_band)
    reference = exposures[reference_band]
    scale = band_scales[reference_band]

    # PSFs still being built in a helper process (run_exposure_set): the work
    # that does not need them is done meanwhile, the detection too if the
    # helper has not begun it.
    pending = isinstance(psfs, HelperCall)
    detected = early = None
    if pending:
        start = time.perf_counter()
        aligned, reprojected, labels, combined, parents = _segmented_bands(
            exposures, reference_band, subtract_background=subtract_background,
            use_wcs=use_wcs)
        segmented = time.perf_counter()
        log.debug('aligned and segmented the bands in %.1f s', segmented - start)
        if positions is None and detection_claim is not None and detection_claim.take():
            early = _early_detection(reference, reference_band, detect_options)
            log.debug('detected the sources beside the helper in %.1f s',
                      time.perf_counter() - segmented)
        waited = time.perf_counter()
        psfs, detected = psfs.result()
        log.debug("the helper's PSFs%s came back %.1f s later",
                  ' and detections' if detected is not None else '',
                  time.perf_counter() - waited)
    psf_models, psf_sources = build_psfs(exposures, psfs, epsf_options=epsf_options,
                                         pixel_scale=scale)
    if detected is None:
        options = _detect_options(detect_options, psf_models[reference_band],
                                  reference.shape)
        if early is not None and early[0].keys() == options.keys():
            if isinstance(early[1], Exception):
                raise early[1]
            detected = early[1]
        else:
            detected = _positions(positions, reference, reference_band, options)
    x_in, y_in, ids, positions_source = detected
    n = x_in.size
    if n == 0:
        raise InvalidInputError('no positions given; give at least one source '
                                '(or positions=None to detect them).')
    if not pending:
        aligned, reprojected, labels, combined, parents = _segmented_bands(
            exposures, reference_band, subtract_background=subtract_background,
            use_wcs=use_wcs)
    from astropy.nddata import NDData

    segments_of = source_segments(labels, x_in, y_in)
    blended, _ = blended_sources(combined, labels, x_in, y_in, segments_of=segments_of)
    pieces = _segment_pieces(labels, parents, segments_of, blended, combined)
    if positions_source == 'detected':
        x_in, y_in = _parent_centroids(x_in, y_in, np.where(blended, 0, segments_of),
                                       pieces, parents, combined)
    extent, segment_at_edge = segment_extents(labels, x_in, y_in, segments_of=segments_of)
    block_factor, truncated = _block_factors(extent, stamp_size, blended)
    segments = None
    if neighbours == 'replace':
        segments = NDData(labels, wcs=aligned[reference_band].wcs)

    # Every band is on the reference grid now, so a source is off the image
    # in all bands or in none. make_cutouts refuses a call whose positions
    # are all off the image: with all of them, that is the user's error
    # (raised here, before any work, with make_cutouts' own message); a
    # chunk of them that happens to be all off gets an on-image anchor.
    off_image = _off_image(x_in, y_in, reference.shape)
    if off_image.all():
        make_cutouts(aligned[reference_band], np.column_stack([x_in, y_in]),
                     size=stamp_size)
    anchor = int(np.argmin(off_image))

    has_uncertainty = {band: getattr(aligned[band], 'uncertainty', None) is not None
                       for band in bands}
    if not any(has_uncertainty.values()):
        noise_source = dict.fromkeys(bands, 'refit residuals (1.4826 MAD)')
    else:
        noise_source = {band: 'uncertainty (median over the stamp)'
                        if has_uncertainty[band] else 'stamp pixels (1.4826 MAD)'
                        for band in bands}
    stamp_unit = aligned[reference_band].unit or u.dimensionless_unscaled
    model_info = {'name': model.card.get('name'), 'path': str(model.path)
                  if model.path is not None else None,
                  'weights_sha256': model.sha256,
                  'verified': bool(getattr(model, 'verified', True))}
    meta = {
        'bands': bands,
        'reference_band': reference_band,
        'psf_source': psf_sources,
        'model': model_info,
        'psfdeconv_version': __version__,
        'inputs': paths,
        'positions': positions_source,
        'pixel_scale': float(scale),
        'pixel_scale_source': scale_source,
        'wcs': use_wcs,
        'unit': stamp_unit.to_string(),
        'unit_conversion': unit_conversion,
        'stamp_size': stamp_size,
        'psf_size': psf_size,
        'reprojected': reprojected,
        'noise_source': noise_source,
        # Bands whose integer values were dithered off their lattice, and its step.
        'dequantized': {band: float(exposures[band].meta['dequantized'])
                        for band in bands if 'dequantized' in (exposures[band].meta or {})},
        'background_subtracted': bool(subtract_background),
        'neighbours': neighbours,
        'flag_bits': dict(FLAGS),
        'shape_frame': _shape_frame(use_wcs),
    }
    return _CatalogSetup(
        exposures=exposures, aligned=aligned, reprojected=reprojected,
        has_uncertainty=has_uncertainty, bands=bands, reference_band=reference_band,
        reference=reference, model=model, stamp_size=stamp_size, psf_size=psf_size,
        scale=scale, psf_models=psf_models, psf_sources=psf_sources, x_in=x_in,
        y_in=y_in, ids=ids, off_image=off_image, anchor=anchor, segments=segments,
        blended=blended, block_factor=block_factor, truncated=truncated,
        segments_of=segments_of, pieces=pieces,
        segment_at_edge=segment_at_edge,
        frame=wcs_to_celestial_frame(reference.wcs) if use_wcs else None,
        stamp_unit=stamp_unit, meta=meta, use_wcs=use_wcs)


def _matched_bands(exposures, reference_band, pixel_scale):
    """The bands as `_catalog_setup` works on them: without their WCS where a
    band has no celestial one, in the reference band's flux-per-pixel unit
    (`~psfdeconv._units.common_flux_unit`). ``(exposures, unit_conversion,
    band_scales, scale_source, use_wcs)``."""
    from ._units import common_flux_unit

    band_scales, scale_source, use_wcs = _band_pixel_scales(exposures, pixel_scale)
    if not use_wcs:
        exposures = {band: _without_wcs(exposure) for band, exposure in exposures.items()}
    exposures, unit_conversion = common_flux_unit(exposures, reference_band, band_scales)
    return exposures, unit_conversion, band_scales, scale_source, use_wcs


def _segmented_bands(exposures, reference_band, *, subtract_background, use_wcs):
    """The bands background-subtracted (if asked) and on the reference grid,
    and the segments of their combined signal-to-noise image: ``(aligned,
    reprojected, labels, combined, parents)``.

    The segments say which sources are blended, how far each one's light
    reaches, and (with ``neighbours='replace'``) which pixels of a stamp
    are its neighbours'.
    """
    from . import background as sky

    bands = list(exposures)
    if subtract_background:
        work = {band: sky.subtract_background(exposure)[0]
                for band, exposure in exposures.items()}
    else:
        work = exposures
    if use_wcs:
        aligned, reprojected = align_to_reference(work, reference_band)
    else:
        # No WCS: the bands share the reference band's pixel grid.
        aligned, reprojected = dict(work), dict.fromkeys(bands, False)
    labels, combined, parents = neighbour_segments(
        [aligned[band].data for band in bands],
        masks=[aligned[band].mask for band in bands], return_image=True,
        return_parents=True)
    return aligned, reprojected, labels, combined, parents


def _shape_frame(use_wcs):
    """``meta['shape_frame']``: the axes of the catalogue's ellipticities."""
    from .measure import SKY_SHAPE_CONVENTION

    frame = {'pixel': 'reference-band pixel axes (e1_<band>, e2_<band>, hsm_e1_<band>, '
                      'hsm_e2_<band>): x = column, y = row, e1 > 0 along the rows'}
    if use_wcs:
        frame['sky'] = ('e1_sky_<band>, e2_sky_<band>, hsm_e1_sky_<band>, hsm_e2_sky_<band>, '
                        'shear_g1_sky_<band>, shear_g2_sky_<band>: ' + SKY_SHAPE_CONVENTION)
    else:
        frame['sky'] = ('none: the exposures have no celestial WCS, so the *_sky_<band> '
                        'columns are absent')
    return frame


#: Relative difference above which a given pixel_scale and a WCS's disagree.
_PIXEL_SCALE_TOLERANCE = 0.01


def _band_pixel_scales(exposures, pixel_scale):
    """arcsec/pixel of each band, where it came from ('wcs' or
    'argument'), and whether every band has a celestial WCS.

    Without a WCS in some band, ``pixel_scale`` is required and the bands
    must share one pixel grid (the same shape); a WCS and ``pixel_scale``
    must agree within `_PIXEL_SCALE_TOLERANCE`.
    """
    import astropy.units as u

    from ._validation import scalar_pixel_scale
    from .exceptions import PixelScaleError
    from .io import pixel_scale_of

    given = None if pixel_scale is None else scalar_pixel_scale(pixel_scale)
    missing = [band for band, exposure in exposures.items() if exposure.wcs is None]
    if missing and given is None:
        where = ', '.join(f'{band!r} ({exposures[band].meta.get("path") or "NDData"})'
                          for band in missing)
        raise InvalidInputError(
            f'band(s) {where} have no celestial WCS; give the pixel scale '
            f'(pixel_scale=ARCSEC, e.g. pixel_scale=0.2; --pixel-scale ARCSEC on '
            f'the command line) and pixel positions (or let psfdeconv detect '
            f'the sources), or add a celestial WCS, e.g. with astrometry.net.')
    scales = {}
    for band, exposure in exposures.items():
        if exposure.wcs is None:
            scales[band] = given
            continue
        scales[band] = float(pixel_scale_of(exposure.wcs).to_value(u.arcsec / u.pix))
        apart = abs(scales[band] / given - 1) if given is not None else 0.0
        if apart > _PIXEL_SCALE_TOLERANCE:
            raise PixelScaleError(
                f'pixel_scale = {given} arcsec/pixel, but the WCS of band {band!r} '
                f'gives {scales[band]:.5f} arcsec/pixel ({100 * apart:.1f} '
                f'percent apart, more than {100 * _PIXEL_SCALE_TOLERANCE:.0f}); '
                f'omit pixel_scale to use the WCS, or fix the WCS or the value.')
    if not missing:
        return scales, 'wcs', True
    shapes = {band: tuple(exposure.shape) for band, exposure in exposures.items()}
    if len(set(shapes.values())) > 1:
        raise ShapeMismatchError(
            f'band(s) {missing} have no celestial WCS, so the bands are taken to '
            f'share one pixel grid, but their shapes differ: {shapes}; reproject '
            f'them onto one grid first, or give every band a celestial WCS.')
    return dict.fromkeys(exposures, given), 'argument', False


def _without_wcs(exposure):
    """The exposure without its WCS (a set with one band lacking a WCS is
    used on one shared pixel grid)."""
    from astropy.nddata import CCDData

    if exposure.wcs is None:
        return exposure
    return CCDData(exposure.data, unit=exposure.unit, mask=exposure.mask,
                   uncertainty=exposure.uncertainty, wcs=None, meta=exposure.meta,
                   copy=False)


def _pixel_positions_only(positions, reference_band):
    """Positions usable without a WCS: pixels. Sky positions are refused;
    a table with both keeps its x, y (and id) columns."""
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    refuse = (f'the positions are sky coordinates, but the exposures have no '
              f'celestial WCS to place them; give pixel positions of the '
              f'reference band {reference_band!r} (x and y columns, or an (n, 2) '
              f'array), omit positions to detect the sources, or give exposures '
              f'with a celestial WCS.')
    if isinstance(positions, SkyCoord):
        raise InvalidInputError(refuse)
    if isinstance(positions, Table):
        if 'x' in positions.colnames and 'y' in positions.colnames:
            keep = [name for name in ('id', 'x', 'y') if name in positions.colnames]
            return positions[keep]
        if any(isinstance(positions[name], SkyCoord) for name in positions.colnames) \
                or ('ra' in positions.colnames and 'dec' in positions.colnames):
            raise InvalidInputError(refuse)
    return positions


#: A source whose segment reaches beyond the stamp is cut from the bands
#: block-summed by the smallest factor that brings its segment within this
#: fraction of the stamp side from the stamp's centre (on DECam's 0.262
#: arcsec/pixel, a galaxy 45 pixels wide at half maximum came out with 0.44,
#: 0.71, 0.81 and 0.99 of its Kron flux for factors 1 to 4, the last one
#: leaving its segment 0.31 stamp sides from the centre), at most
#: `_MAX_BLOCK_FACTOR`; beyond that it is TRUNCATED.
_BLOCK_FILL = 0.33


_MAX_BLOCK_FACTOR = 8


def _block_factors(extent, stamp_size, blended):
    """The block-sum factor of each source (1: the native grid) and whether
    its light stays truncated, from `~psfdeconv.detection.segment_extents`.
    Blended sources stay on the native grid (they are flagged anyway)."""
    extent = np.asarray(extent, dtype=float)
    large = (extent > stamp_size / 2 - 1) & ~np.asarray(blended, dtype=bool)
    needed = np.ceil(extent / (_BLOCK_FILL * stamp_size))
    factor = np.where(large, np.clip(needed, 2, _MAX_BLOCK_FACTOR), 1).astype(np.int64)
    truncated = large & (needed > _MAX_BLOCK_FACTOR)
    return factor, truncated


def _off_image(x, y, shape):
    """Whether each position's nearest pixel lies off an image of ``shape``
    (the rule of `psfdeconv.cutouts.make_cutouts`)."""
    ny, nx = shape
    finite = np.isfinite(x) & np.isfinite(y)
    with np.errstate(invalid='ignore'):
        centre_x = np.floor(np.where(finite, x, 0) + 0.5)
        centre_y = np.floor(np.where(finite, y, 0) + 0.5)
    return ~finite | (centre_x < 0) | (centre_x >= nx) | (centre_y < 0) | \
        (centre_y >= ny)


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) \
            or chunk_size < 1:
        raise InvalidInputError(f'chunk_size = {chunk_size!r}; give a number of '
                                f'sources >= 1 (e.g. {CHUNK_SIZE}).')


#: Whether `_catalog_chunks` cuts the next chunk's stamps in a thread while
#: the current chunk is deconvolved.
_PREFETCH = True


def _catalog_chunks(setup, *, chunk_size, batch_size):
    """Deconvolve and measure the sources of a `_catalog_setup` in chunks of
    ``chunk_size``: yields, per chunk, the catalogue columns (a dict of name
    to (values, description)) and the stamps (a list of NDData).

    With `_PREFETCH`, the stamps of chunk k + 1 are cut (`_cut_chunk`) in a
    thread while chunk k is deconvolved and measured: at most two chunks'
    stamps exist at once, and each source's stamps do not depend on when
    they are cut.
    """
    from concurrent.futures import ThreadPoolExecutor

    indices = [np.arange(start, min(start + int(chunk_size), setup.n))
               for start in range(0, setup.n, int(chunk_size))]
    if not _PREFETCH or len(indices) == 1:
        for index in indices:
            yield _deconvolve_chunk(setup, index, batch_size=batch_size)
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_cut_chunk, setup, indices[0])
        for k, index in enumerate(indices):
            cut = pending.result()
            if k + 1 < len(indices):
                pending = pool.submit(_cut_chunk, setup, indices[k + 1])
            yield _deconvolve_chunk(setup, index, batch_size=batch_size, cut=cut)


def _deconvolve_chunk(setup, index, *, batch_size, cut=None):
    """The catalogue columns and the stamps of the sources ``index`` (their
    `_cut_chunk`, if already cut)."""
    from .deconvolve import check_training_range, deconvolve_stamps
    from .measure import hsm_moments, image_moments

    if cut is None:
        cut = _cut_chunk(setup, index)
    flags = cut['flags']
    # arcsec/pixel of each source's stamps (coarser for block-summed ones).
    scale = setup.scale * cut['factor']
    native = cut['factor'] == 1
    # The training range is checked (refused with strict, else warned) on
    # the stamps on the exposure's own grid: a block-summed stamp's coarse
    # pixels are the pipeline's choice, flagged BLOCK_REDUCED and
    # OUTSIDE_TRAINING, not the user's input.
    if native.any():
        check_training_range(setup.model, scale[native], cut['psfs'][native],
                             strict=setup.strict)
    images, details = deconvolve_stamps(cut['stamps'], cut['psfs'], pixel_scale=scale,
                                        model=setup.model, noise_sigma=cut['noise_sigma'],
                                        batch_size=batch_size, return_details=True,
                                        strict=None, symmetries=setup.symmetries,
                                        target_psf=setup.target_fwhm,
                                        precision=setup.precision)
    flags[details['outside_training']] |= FLAG_OUTSIDE_TRAINING
    flags[~details['detected']] |= FLAG_UNDETECTED
    del cut['stamps'], cut['psfs']
    moments = image_moments(images, pixel_scale=scale[:, None])
    shapes = hsm_moments(images, pixel_scale=scale[:, None])
    hsm_failed = (shapes['hsm_status'] != 0) & ~cut['empty']
    flags[hsm_failed.any(axis=1)] |= FLAG_HSM_FAILED
    x_stamp, y_stamp = _reference_centroid(setup, images, shapes, cut['reference'], flags,
                                           cut['factor'])
    columns = _chunk_columns(setup, index, cut, details, moments, shapes, x_stamp, y_stamp)
    return columns, _chunk_stamps(setup, index, images, cut)


def _cut_chunk(setup, index):
    """The stamps of the sources ``index`` in every band, with their masks,
    PSFs, noise and flags, the neighbours replaced (`replace_neighbours`);
    sources larger than a stamp are cut from block-summed copies of the
    bands (``factor`` > 1, `_block_factors`)."""
    factors = setup.block_factor[index]
    groups = [(factor, np.flatnonzero(factors == factor)) for factor in np.unique(factors)]
    if len(groups) == 1:
        return _cut_sources(setup, index, int(groups[0][0]))
    parts = [(rows, _cut_sources(setup, index[rows], int(factor)))
             for factor, rows in groups]
    return _merge_cuts(parts, index.size)


def _merge_cuts(parts, n):
    """One `_cut_sources` result from those of groups of rows (``parts``:
    (rows, cut) pairs) of a chunk of ``n`` sources."""
    def merge(values):
        first = values[0][1]
        if isinstance(first, dict):
            return {key: merge([(rows, value[key]) for rows, value in values])
                    for key in first}
        if first is None:
            return None
        if isinstance(first, list):
            out = [None] * n
            for rows, value in values:
                for row, item in zip(rows, value, strict=True):
                    out[row] = item
            return out
        if isinstance(first, np.ndarray) and first.ndim >= 1 and len(first) == len(values[0][0]):
            out = np.empty((n,) + first.shape[1:], dtype=first.dtype)
            for rows, value in values:
                out[rows] = value
            return out
        return first

    return merge(parts)


def _segment_pieces(labels, parents, segments_of, blended, image):
    """For each deblended segment label: the label of the segment it was
    split from, whether a source that is not blended lies in it, whether any
    source does, and the sum of ``image`` over it (arrays indexed by
    label)."""
    from scipy import ndimage

    n = int(labels.max()) if labels.size else 0
    parent = np.zeros(n + 1, dtype=np.int64)
    light = np.zeros(n + 1)
    if n:
        # Every pixel of a piece lies in its parent: any one of them will do,
        # so a scatter over the pixels (ndimage.maximum sorts them).
        parent[labels.ravel()] = parents.ravel()
        parent[0] = 0
        light[1:] = ndimage.sum_labels(np.where(np.isfinite(image), image, 0.0), labels,
                                       np.arange(1, n + 1))
    inside = (segments_of > 0) & (segments_of <= n)
    claimed = np.zeros(n + 1, dtype=bool)
    claimed[segments_of[inside & ~blended]] = True
    occupied = np.zeros(n + 1, dtype=bool)
    occupied[segments_of[inside]] = True
    return parent, claimed, occupied, light


def _parent_centroids(x, y, segments_of, pieces, parents, image):
    """Detected positions moved to the light centroid of their whole segment
    before deblending, for the sources alone in a segment the deblending
    split (``segments_of`` 0 for
    the sources to leave, e.g. blended ones): the deblending may split a
    knotty galaxy, and the piece a detection lands on is off its centre
    (the stamps are centred on the position, HSM starts there)."""
    from scipy import ndimage

    parent = pieces[0]
    x, y = x.copy(), y.copy()
    has = segments_of > 0
    source_parent = np.where(has, parent[np.where(has, segments_of, 0)], 0)
    counts = np.bincount(source_parent[has], minlength=parent.max() + 1)
    n_pieces = np.bincount(parent, minlength=parent.max() + 1)
    # Alone in a segment the deblending split: an unsplit one's detection is
    # already its centroid.
    alone = has & (counts[source_parent] == 1) & (n_pieces[source_parent] > 1)
    if not alone.any():
        return x, y
    positive = np.where(np.isfinite(image), np.maximum(image, 0.0), 0.0)
    centres = np.atleast_2d(ndimage.center_of_mass(positive, parents,
                                                   source_parent[alone]))
    x[alone], y[alone] = centres[:, 1], centres[:, 0]
    return x, y


def _with_own_pieces(labels, targets, pieces):
    """Stamp labels with the pieces deblended off each source's own segment
    merged into it, unless they hold another source that is not blended, or
    a blended source brighter than the target's segment: a galaxy's knots
    (or its other half) split off by the deblending are its light, not a
    neighbour's, and so are the pieces of faint sources on its disc, whose
    light cannot be told from its own (they are BLENDED; a galaxy losing a
    knot costs it more than keeping a faint source). A brighter blended
    source in the same parent segment (a faint galaxy in a bright pair's
    halo, connected to it at the segmentation threshold) is a neighbour: as
    its own light, it doubled the faint galaxy's flux."""
    parent, claimed, occupied, light = pieces
    labels = labels.copy()
    for i, target in enumerate(targets):
        if target <= 0 or target >= parent.size:
            continue
        stamp = labels[i]
        inside = (stamp > 0) & (stamp < parent.size)
        piece = stamp[inside]
        own = inside.copy()
        own[inside] = ((parent[piece] == parent[target]) & ~claimed[piece]
                       & (~occupied[piece] | (light[piece] <= light[target])))
        stamp[own] = target
    return labels


def _coarse_bands(setup, factor):
    """The aligned bands and the segment labels block-summed by ``factor``
    (cached on the setup)."""
    from astropy.nddata import NDData

    from .cutouts import block_reduce_exposure, block_wcs

    if factor not in setup.coarse:
        bands = {band: block_reduce_exposure(setup.aligned[band], factor)
                 for band in setup.bands}
        segments = None
        if setup.segments is not None:
            labels = np.asarray(setup.segments.data)
            ny, nx = bands[setup.reference_band].shape
            # The label at each block's centre pixel.
            centre = factor // 2
            labels = labels[centre::factor, centre::factor][:ny, :nx]
            segments = NDData(labels, wcs=block_wcs(setup.segments.wcs, factor))
        setup.coarse[factor] = (bands, segments)
    return setup.coarse[factor]


def _cut_sources(setup, index, factor=1):
    """`_cut_chunk` for sources on one grid: the native one (``factor`` 1) or
    the bands block-summed by ``factor``."""
    from .cutouts import block_psf_size, block_psfs, make_cutouts

    bands, reference_band = setup.bands, setup.reference_band
    stamp_size, psf_size = setup.stamp_size, setup.psf_size
    x_in, y_in = setup.x_in[index], setup.y_in[index]
    n = index.size
    if factor == 1:
        aligned, segments = setup.aligned, setup.segments
    else:
        aligned, segments = _coarse_bands(setup, factor)
    # A chunk entirely off the image gets the anchor as an extra last source,
    # dropped from make_cutouts' results (see _catalog_setup).
    cut_index = index if not setup.off_image[index].all() else \
        np.append(index, setup.anchor)
    # Native pixel x lies at (x + 0.5) / factor - 0.5 on the coarse grid.
    xy = (np.column_stack([setup.x_in[cut_index], setup.y_in[cut_index]]) + 0.5) \
        / factor - 0.5

    sky_in = setup.reference.wcs.pixel_to_world(x_in, y_in) if setup.use_wcs else None
    flags = np.zeros(n, dtype=np.int32)
    stamps = np.empty((n, len(bands), stamp_size, stamp_size))
    masks = np.empty(stamps.shape, dtype=bool)
    stamp_psfs = np.empty((n, len(bands), psf_size, psf_size))
    noise = np.full((n, len(bands)), np.nan)
    empty = np.zeros((n, len(bands)), dtype=bool)
    for b, band in enumerate(bands):
        # Only the reference band's stamps need their WCS (the catalogue's and
        # the output stamps').
        cut = make_cutouts(aligned[band], xy, size=stamp_size,
                           stamp_wcs=band == reference_band)
        cut = {key: value[:n] if isinstance(value, np.ndarray | list) else value
               for key, value in cut.items()}
        if band == reference_band:
            ref_cut = cut
        flags |= cut['flags']
        masks[:, b] = cut['mask']
        stamps[:, b] = np.where(cut['mask'], 0.0, cut['data'])
        empty[:, b] = _mostly_masked(cut['mask'])
        # The PSF where the source is in the band's own pixels.
        if band == reference_band or not setup.use_wcs:
            bx, by = x_in, y_in
        else:
            with np.errstate(invalid='ignore'):
                bx, by = (np.asarray(v, float) for v in
                          setup.exposures[band].wcs.world_to_pixel(sky_in))
        extrapolated = grid_extrapolated(setup.psf_models[band], bx, by)
        flags[extrapolated] |= FLAG_PSF_EXTRAPOLATED
        if (getattr(setup.psf_models[band], 'meta', None) or {}).get('psf_fallback'):
            flags |= FLAG_PSF_FALLBACK
        meta = setup.aligned[band].meta if setup.reprojected[band] else {}
        if factor == 1:
            stamp_psfs[:, b] = render_stamp_psfs(setup.psf_models[band], bx, by,
                                                 psf_size=psf_size, aligned_meta=meta)
        else:
            native = render_stamp_psfs(setup.psf_models[band], bx, by,
                                       psf_size=block_psf_size(psf_size, factor),
                                       aligned_meta=meta)
            stamp_psfs[:, b] = block_psfs(native, factor)
        if cut['uncertainty'] is not None:
            noise[:, b] = _stamp_noise(cut['uncertainty'], cut['mask'])
    if not any(setup.has_uncertainty.values()):
        noise_sigma = None
    else:
        for b, band in enumerate(bands):
            if not setup.has_uncertainty[band]:
                noise[:, b] = _stamp_mad(stamps[:, b], masks[:, b])
        # Empty stamps have no noise estimate; any positive value will do
        # (their measurements are set to NaN below).
        noise_sigma = np.where(np.isfinite(noise) & (noise > 0), noise, 1.0)
    if segments is not None:
        labels = make_cutouts(segments, xy, size=stamp_size, stamp_wcs=False)['data'][:n]
        sigma = noise.copy()
        for b in range(len(bands)):
            missing = ~np.isfinite(sigma[:, b])
            if missing.any():
                sigma[missing, b] = _stamp_mad(stamps[missing, b], masks[missing, b])
        labels = _with_own_pieces(np.rint(labels).astype(np.int64),
                                  setup.segments_of[index], setup.pieces)
        stamps, replaced = replace_neighbours(
            stamps, labels, ref_cut['x_stamp'], ref_cut['y_stamp'], sigma, index=index,
            masks=masks)
        flags[replaced.any(axis=(-2, -1))] |= FLAG_NEIGHBOURS
    flags[setup.blended[index]] |= FLAG_BLENDED
    flags[setup.truncated[index]] |= FLAG_TRUNCATED
    if factor > 1:
        flags |= FLAG_BLOCK_REDUCED
        # A coarse stamp is wide: its padding beyond the image matters only
        # where the source's own light reaches the image's border.
        inside = ~setup.segment_at_edge[index]
        flags[inside] &= ~FLAG_EDGE

    return {'stamps': stamps, 'masks': masks, 'psfs': stamp_psfs,
            'noise_sigma': noise_sigma, 'empty': empty, 'reference': ref_cut,
            'flags': flags, 'factor': np.full(n, factor, dtype=np.int64)}


def _reference_centroid(setup, images, shapes, ref_cut, flags, cut_factor):
    """The centroid (stamp pixels) of the reference band's deconvolved
    images; sets ``FLAG_CENTROID_FALLBACK`` in ``flags`` where there is none
    and the input position is used."""
    from .measure import windowed_centroid

    ref_index = setup.bands.index(setup.reference_band)
    # The light centroid within _CENTROID_WINDOW adaptive-moment widths of
    # the adaptive-moment centroid: the stamp-wide centroid takes in every
    # neighbour and noise peak, and the adaptive one is pulled towards the
    # peak of an asymmetric galaxy. Where HSM fails, the light centroid in
    # a window of _FALLBACK_WINDOW pixels around the input position: the
    # stamp-wide one follows the brightest neighbour.
    hsm_ok = shapes['hsm_status'][:, ref_index] == 0
    x_start = np.where(hsm_ok, shapes['hsm_x'][:, ref_index], ref_cut['x_stamp'])
    y_start = np.where(hsm_ok, shapes['hsm_y'][:, ref_index], ref_cut['y_stamp'])
    radius = np.where(hsm_ok, _CENTROID_WINDOW * shapes['hsm_sigma'][:, ref_index]
                      / (setup.scale * cut_factor), _FALLBACK_WINDOW)
    x_stamp, y_stamp = windowed_centroid(images[:, ref_index], x_start, y_start, radius)
    fallback = ~(np.isfinite(x_stamp) & np.isfinite(y_stamp))
    flags[fallback] |= FLAG_CENTROID_FALLBACK
    x_stamp = np.where(fallback, ref_cut['x_stamp'], x_stamp)
    y_stamp = np.where(fallback, ref_cut['y_stamp'], y_stamp)
    return x_stamp, y_stamp


def _chunk_columns(setup, index, cut, details, moments, shapes, x_stamp, y_stamp):
    """The catalogue columns of a chunk: name -> (values, description)."""
    import astropy.units as u

    from .measure import sky_ellipticity, sky_jacobian, sky_shear

    bands, reference_band = setup.bands, setup.reference_band
    ids, x_in, y_in = setup.ids[index], setup.x_in[index], setup.y_in[index]
    ref_cut, flags, empty = cut['reference'], cut['flags'], cut['empty']
    n = index.size
    # Coarse stamp pixel j of a block-summed source lies at native pixel
    # factor * (j + 0.5) - 0.5.
    factor = cut['factor']
    x_exposure = factor * (ref_cut['origin'][:, 0] + x_stamp + 0.5) - 0.5
    y_exposure = factor * (ref_cut['origin'][:, 1] + y_stamp + 0.5) - 0.5
    columns = []  # (name, values, description)
    columns += [
        ('id', np.asarray(ids), 'Source identifier (the input id or detection label)')]
    if setup.use_wcs:
        lon, lat = np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            lon[i], lat[i] = ref_cut['wcs'][i].pixel_to_world_values(x_stamp[i],
                                                                     y_stamp[i])
        # (lon, lat) in degrees: the SkyCoord is made once, by _catalog_table.
        columns += [
            ('sky_centroid', (lon, lat),
             f'Light centroid of the deconvolved {reference_band} image in a '
             f'window around its HSM centroid (around the input position where '
             f'HSM fails)')]
    columns += [
        ('x', x_exposure * u.pix,
         f'Column of the deconvolved {reference_band} centroid in the '
         f'{reference_band} exposure, 0-based'),
        ('y', y_exposure * u.pix,
         f'Row of the deconvolved {reference_band} centroid in the '
         f'{reference_band} exposure, 0-based'),
        ('x_input', x_in * u.pix, 'Input (given or detected) column, 0-based'),
        ('y_input', y_in * u.pix, 'Input (given or detected) row, 0-based'),
        ('flags', flags,
         flags_column_description()),
        ('usable', usable_rows(flags),
         'True where no flag of the unusable set (' + ', '.join(UNUSABLE_FLAGS)
         + ') is raised'),
    ]
    if setup.use_wcs:
        # Every band is measured on the reference grid, so one local
        # Jacobian per source carries all its shapes to the sky; a
        # block-summed stamp's coarse WCS has the same rotation.
        jacobian = np.full((n, 2, 2), np.nan)
        for i in range(n):
            jacobian[i] = sky_jacobian(ref_cut['wcs'][i], x_stamp[i], y_stamp[i])
    for b, band in enumerate(bands):
        unit = setup.aligned[band].unit or u.dimensionless_unscaled
        nan = empty[:, b]

        def band_values(values, nan=nan):
            return np.where(nan, np.nan, np.asarray(values, dtype=float))

        flux = band_values(details['flux'][:, b])
        flux_err = band_values(details['flux_err'][:, b])
        with np.errstate(divide='ignore', invalid='ignore'):
            snr = flux / flux_err
        columns += [
            (f'flux_{band}', flux * unit, f'Flux of the deconvolved {band} image '
             f'(refitted amplitude times the network output sum)'),
            (f'flux_err_{band}', flux_err * unit, f'1-sigma error of flux_{band}'),
            (f'flux_corrected_{band}',
             band_values(details['flux_corrected'][:, b]) * unit,
             f'flux_{band} after the flux-bias correction of the model card'),
            (f'flux_residual_{band}',
             band_values(details['flux_residual'][:, b]) * unit,
             f'flux_{band} corrected by the refit residual within twice the 90 % '
             f'light radius, as far as its noise allows, else by the card '
             f'(psfdeconv.deconvolve.residual_flux)'),
            (f'flux_residual_err_{band}',
             band_values(details['flux_residual_err'][:, b]) * unit,
             f'1-sigma error of flux_residual_{band}'),
            (f'snr_{band}', snr, f'flux_{band} / flux_err_{band}'),
            (f'noise_sigma_{band}', band_values(details['noise_sigma'][:, b]) * unit,
             f'Per-pixel noise of the {band} stamp used by the amplitude refit'),
            (f'e1_{band}', band_values(moments['e1'][:, b]),
             f'Unweighted ellipticity (Mxx-Myy)/(Mxx+Myy), deconvolved {band}'),
            (f'e2_{band}', band_values(moments['e2'][:, b]),
             f'Unweighted ellipticity 2Mxy/(Mxx+Myy), deconvolved {band}'),
            (f'e_{band}', band_values(moments['e'][:, b]),
             f'Unweighted |e|, deconvolved {band}'),
            (f'size_{band}', band_values(moments['size'][:, b]) * u.arcsec,
             f'Unweighted size sqrt(Mxx+Myy), deconvolved {band}'),
            (f'hsm_e1_{band}', band_values(shapes['hsm_e1'][:, b]),
             f'HSM adaptive-moment distortion e1, deconvolved {band}'),
            (f'hsm_e2_{band}', band_values(shapes['hsm_e2'][:, b]),
             f'HSM adaptive-moment distortion e2, deconvolved {band}'),
            (f'hsm_sigma_{band}', band_values(shapes['hsm_sigma'][:, b]) * u.arcsec,
             f'HSM adaptive-moment width det(M)^(1/4), deconvolved {band}'),
            (f'hsm_status_{band}', np.asarray(shapes['hsm_status'][:, b], dtype=np.int32),
             'HSM status: 0 ok, -1 failed, -2 non-positive fit'),
        ]
        # NaN without a card shear_response (e.g. the 1-band model).
        shear = {key: band_values(details[key][:, b]) if key in details
                 else np.full(n, np.nan)
                 for key in ('shear_g1', 'shear_g2', 'shear_R1', 'shear_R2')}
        frame = (f'pixel frame as hsm_e1_{band} (g1 > 0 elongated along the exposure '
                 f'x axis, g2 > 0 along x = y)')
        columns += [
            (f'shear_g1_{band}', shear['shear_g1'],
             f'Calibrated shear estimate g1 of the deconvolved {band} image (HSM '
             f'distortion of the image convolved with the card shear kernel, divided by '
             f'shear_R1_{band}, minus the card additive bias and PSF leakage), {frame}'),
            (f'shear_g2_{band}', shear['shear_g2'],
             f'Calibrated shear estimate g2, as shear_g1_{band}'),
            (f'shear_R1_{band}', shear['shear_R1'],
             f'Shear response d<e1>/dg1 of the model card at this SNR and size, '
             f'used by shear_g1_{band}'),
            (f'shear_R2_{band}', shear['shear_R2'],
             f'Shear response d<e2>/dg2, used by shear_g2_{band}'),
        ]
        if setup.use_wcs:
            e1_sky, e2_sky = sky_ellipticity(band_values(moments['e1'][:, b]),
                                             band_values(moments['e2'][:, b]), jacobian)
            hsm_e1_sky, hsm_e2_sky = sky_ellipticity(band_values(shapes['hsm_e1'][:, b]),
                                                     band_values(shapes['hsm_e2'][:, b]),
                                                     jacobian)
            sky = 'on the sky axes (east, north)'
            columns += [
                (f'e1_sky_{band}', e1_sky,
                 f'e1_{band} {sky}: > 0 elongated east-west, < 0 north-south'),
                (f'e2_sky_{band}', e2_sky,
                 f'e2_{band} {sky}: > 0 along NE-SW, < 0 along NW-SE'),
                (f'hsm_e1_sky_{band}', hsm_e1_sky,
                 f'hsm_e1_{band} {sky}: > 0 elongated east-west, < 0 north-south'),
                (f'hsm_e2_sky_{band}', hsm_e2_sky,
                 f'hsm_e2_{band} {sky}: > 0 along NE-SW, < 0 along NW-SE'),
            ]
            shear_g1_sky, shear_g2_sky = sky_shear(shear['shear_g1'], shear['shear_g2'],
                                                   jacobian)
            columns += [
                (f'shear_g1_sky_{band}', shear_g1_sky,
                 f'shear_g1_{band} {sky} (turned by the local WCS, its own shear '
                 f'left out): > 0 east-west'),
                (f'shear_g2_sky_{band}', shear_g2_sky,
                 f'shear_g2_{band} {sky}: > 0 along NE-SW'),
            ]
    return {name: (values, description) for name, values, description in columns}


def _chunk_stamps(setup, index, images, cut):
    """The deconvolved stamps of a chunk as `~astropy.nddata.NDData`."""
    from astropy.nddata import NDData

    bands, ids = setup.bands, setup.ids[index]
    masks, ref_cut, flags = cut['masks'], cut['reference'], cut['flags']
    nddata = []
    for i in range(index.size):
        nddata.append(NDData(
            images[i].astype(np.float64), unit=setup.stamp_unit, mask=masks[i].copy(),
            wcs=ref_cut['wcs'][i],
            meta={'id': ids[i].item() if hasattr(ids[i], 'item') else ids[i],
                  'bands': list(bands), 'flags': int(flags[i]),
                  'origin': [int(v) for v in ref_cut['origin'][i]],
                  'block_factor': int(cut['factor'][i]),
                  'psf_source': dict(setup.psf_sources),
                  'model_weights_sha256': setup.model.sha256,
                  'units': {band: str(setup.aligned[band].unit) for band in bands}}))
    return nddata


def _catalog_table(setup, parts):
    """The `deconvolve_catalog` table from the columns of its chunks."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import QTable

    catalog = QTable()
    for name, (_, description) in parts[0].items():
        chunks = [part[name][0] for part in parts]
        if name == 'sky_centroid':
            lon, lat = (np.concatenate(values) for values in zip(*chunks, strict=True))
            values = SkyCoord(lon * u.deg, lat * u.deg, frame=setup.frame)
        else:
            values = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        catalog[name] = values
        catalog[name].info.description = description
    catalog.meta.update(setup.meta)
    return catalog


def run_exposure_set(exposures, out_dir, positions=None, psfs='epsf', *, model=None,
                     reference_band=None, batch_size=128, overwrite=False,
                     chunk_size=CHUNK_SIZE, strict=False, neighbours='replace',
                     symmetries=None, target_fwhm=None, epsf_options=None,
                     detect_options=None, progress=None, pixel_scale=None,
                     trust_model=False, precision='auto', plots=False,
                     psf_process='auto'):
    """Deconvolve one exposure set and write its outputs (``psfdeconv run``).

    Writes ``OUT/catalog.fits`` (`~psfdeconv.io.write_catalog`), ``OUT/stamps.fits``
    (`~psfdeconv.io.write_stamps`) and ``OUT/psf_<band>.fits`` (the PSF model of each band;
    a spatially varying one as its PSF at the image centre) as one transaction
    (`~psfdeconv.io.output_transaction`): they are written into a staging
    directory inside ``out_dir`` and moved into place together, and the
    marker ``OUT/.psfdeconv-complete.json`` (names, sizes, SHA-256) is
    written last, so a run that is killed, or meets a full disk, leaves the
    earlier outputs or a directory without a marker
    (`~psfdeconv.io.run_is_complete` is False), never a mix read as complete.
    The directory is locked meanwhile (``OUT/.psfdeconv.lock``,
    `~psfdeconv.io.output_lock`): a second run into it fails at once.
    Existing outputs are refused before any work unless ``overwrite``.

    The sources are cut out, deconvolved and measured ``chunk_size`` at a
    time (as `deconvolve_catalog`), and each chunk's stamps are written to
    the stamp file before the next chunk starts, so memory does not grow
    with the number of sources beyond the catalogue's rows (a few hundred
    bytes each).

    Parameters
    ----------
    exposures : mapping of str to str, `~pathlib.Path` or `~astropy.nddata.NDData`
        Band name to exposure, as for `deconvolve_catalog`.
    out_dir : str or `~pathlib.Path`
        Output directory (created if needed).
    positions : str, `~pathlib.Path` or as for `deconvolve_catalog`, optional
        The sources, or the path of a table of them (`~psfdeconv.io.read_positions`);
        detected if None.
    psfs : optional
        As for `~psfdeconv.psf.build_psfs`; default ``'epsf'``.
    model, reference_band, batch_size, chunk_size, strict, neighbours, symmetries, target_fwhm
        As for `deconvolve_catalog`.
    precision : {'auto', 'float32', 'bfloat16'}, optional
        As for `deconvolve_catalog`.
    epsf_options, detect_options
        As for `deconvolve_catalog`.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        arcsec/pixel, as for `deconvolve_catalog` (required for exposures
        without a celestial WCS; ``--pixel-scale``).
    overwrite : bool, optional
        Replace existing outputs.
    trust_model : bool, optional
        Load a model given as a path with ``verify=False``
        (`~psfdeconv.model.load_model`; ``--trust-model``).
    plots : bool, optional
        Also write the figures of `~psfdeconv.plotting.write_run_plots`
        (``catalog_overview.png``, ``stamps.png``; ``--plots``), as part of
        the same transaction.
    psf_process : {'auto', True, False}, optional
        Build the PSFs in a helper Python process, then detect the sources
        there (with ``positions=None``), while this one subtracts the
        backgrounds, aligns the bands and segments them; the outputs are
        the same. ``'auto'`` does so where the PSFs are built from the
        bands' stars (ePSFs, the default), the bands hold at least 4 million
        such pixels and this process may keep two CPUs or more busy
        (``OMP_NUM_THREADS``, else its CPU affinity); ``--psf-process``.
        The helper starts before the bands are read, so that its imports
        overlap the reading, and is stopped where the bands turn out too
        small for it.
    progress : bool, optional
        Draw a `tqdm` progress bar on standard error for each long stage:
        the PSFs (per band), the sources (detection, background, alignment)
        and the deconvolution and measurement (per source). Each stage's
        start and duration are logged (``logging``, the ``psfdeconv.pipeline``
        logger, level DEBUG) either way.

    Returns
    -------
    catalog : `~astropy.table.QTable`
        The catalogue written.
    paths : dict
        ``'catalog'``, ``'stamps'`` and each band name to the file written.
    """
    import warnings

    from ._warnings import catch_warnings
    from .exceptions import PSFDeconvWarning
    from .io import (
        check_writable,
        output_lock,
        output_transaction,
        pixel_scale_of,
        read_positions,
        stamp_writer,
        write_catalog,
    )
    from .psf import render_psf, write_psf_image

    _check_chunk_size(chunk_size)
    _check_psf_process(psf_process)
    target_fwhm = _target_fwhm_arcsec(target_fwhm)
    positive_int(batch_size, 'batch_size')
    out_dir = check_output_location(out_dir, 'out_dir', directory=True)
    paths = {'catalog': out_dir / 'catalog.fits', 'stamps': out_dir / 'stamps.fits'}
    paths.update({str(band): out_dir / f'psf_{band}.fits' for band in exposures})
    if plots:
        from .plotting import RUN_PLOTS

        paths.update({name: out_dir / name for name in RUN_PLOTS})
    # Refuse before any work rather than after it.
    for path in paths.values():
        check_writable(path, overwrite=overwrite)
    with output_lock(out_dir), _early_helper(psf_process, exposures, psfs) as helper:
        if not overwrite:
            # Again under the lock: another run may have finished meanwhile.
            for path in paths.values():
                check_writable(path, overwrite=overwrite)
        model = _as_model(model, n_bands=len(exposures), verify=not trust_model)
        model.check_bands(len(exposures))
        exposures, _ = read_exposure_set(exposures, require_wcs=False)
        exposures = _dequantized(exposures)
        if isinstance(positions, str | Path):
            positions = read_positions(positions)
        # Checked before the PSFs are built (a Moffat FWHM in arcsec needs it).
        band_scales, _, use_wcs = _band_pixel_scales(exposures, pixel_scale)
        # The ePSFs, the detection and the background subtraction start from
        # the same background mesh of each band: computed once, also with the
        # PSFs in a helper process (which reads the meshes this one wrote in
        # the scratch directory, and the other way round).
        scratch_dir = tempfile.TemporaryDirectory(prefix='psfdeconv-',
                                                  ignore_cleanup_errors=True)
        with scratch_dir as scratch, shared_estimates(scratch):
            no_wcs_scale = None if use_wcs else next(iter(band_scales.values()))
            detection_claim = None
            if _psf_process_wanted(psf_process, exposures, psfs):
                _check_psf_bands(exposures, psfs)
                _stage_start(f'building the PSFs of {len(exposures)} band(s) in a helper '
                             f'process' + (', then detecting the sources there or here, '
                                           'whichever is free first'
                                           if positions is None else ''))
                # Waited for after the background, the alignment and the
                # segments (_catalog_setup), which may detect the sources
                # meanwhile.
                detection_claim = _DetectionClaim(Path(scratch) / 'detection')
                psf_models = (helper or Helper()).call(
                    _psfs_and_detections, exposures, psfs, epsf_options,
                    no_wcs_scale=no_wcs_scale, reference_band=reference_band,
                    detect_options=detect_options, pixel_scale=pixel_scale,
                    detect=positions is None, claim=detection_claim, shared=scratch)
            else:
                if helper is not None:
                    helper.close()  # not needed: stopped at once
                psf_models = _build_psfs_with_progress(exposures, psfs, epsf_options,
                                                       progress, pixel_scale=no_wcs_scale)
            start = _stage_start('finding the sources (detection, background, alignment)')
            with _progress_bar(progress, total=1, desc='sources', unit='stage') as bar:
                try:
                    setup = _catalog_setup(exposures, positions, psf_models, model=model,
                                           size=None, reference_band=reference_band,
                                           psf_size=None, subtract_background=True,
                                           epsf_options=epsf_options,
                                           detect_options=detect_options,
                                           neighbours=neighbours, pixel_scale=pixel_scale,
                                           detection_claim=detection_claim)
                finally:
                    if isinstance(psf_models, HelperCall):
                        psf_models.cancel()  # still running only after an error here
                bar.update(1)
        log.debug('found %d sources in %.1f s', setup.n, time.perf_counter() - start)
        _check_strict(setup, strict)
        _set_symmetries(setup, symmetries)
        _set_precision(setup, precision)
        _set_target(setup, target_fwhm)
        parts = []
        start = _stage_start(f'deconvolving and measuring {setup.n} sources')
        with output_transaction(out_dir) as staging:
            with stamp_writer(staging / paths['stamps'].name, setup.n) as writer, \
                    _progress_bar(progress, total=setup.n, desc='deconvolve',
                                  unit='source') as bar:
                for part, stamps in _catalog_chunks(setup, chunk_size=chunk_size,
                                                    batch_size=batch_size):
                    parts.append(part)
                    writer.write(stamps)
                    bar.update(len(stamps))
            log.debug('deconvolved and measured %d sources in %.1f s', setup.n,
                      time.perf_counter() - start)
            catalog = _catalog_table(setup, parts)
            write_catalog(catalog, staging / paths['catalog'].name)
            for band, psf_model in setup.psf_models.items():
                if not (hasattr(psf_model, 'data') and hasattr(psf_model, 'oversampling')
                        and getattr(psf_model.data, 'ndim', 0) == 2):
                    ny, nx = exposures[band].shape
                    psf_model = render_psf(psf_model, ((nx - 1) / 2, (ny - 1) / 2),
                                           size=catalog.meta['psf_size'])
                wcs = getattr(exposures[band], 'wcs', None)
                with catch_warnings():
                    # For PIXSCALE only; non-square pixels were reported at set-up.
                    warnings.simplefilter('ignore', PSFDeconvWarning)
                    # Without a WCS: the pixel_scale argument.
                    scale = band_scales[band] if wcs is None else pixel_scale_of(wcs)
                write_psf_image(psf_model, staging / paths[band].name,
                                pixel_scale=scale)
            if plots:
                # Inside the transaction: figures of older outputs never stay
                # beside a new catalogue.
                from .io import read_stamps
                from .plotting import write_run_plots

                write_run_plots(staging, catalog,
                                stamps=read_stamps(staging / paths['stamps'].name),
                                exposure=exposures)
        if not plots:
            from .plotting import RUN_PLOTS

            # Figures of the outputs just replaced would describe another run.
            for name in RUN_PLOTS:
                (out_dir / name).unlink(missing_ok=True)
    return catalog, paths


def _stage_start(text):
    """Log the start of a stage of `run_exposure_set`; its start time."""
    log.debug('%s', text)
    return time.perf_counter()


def _progress_bar(progress, *, total, desc, unit):
    """A tqdm bar on standard error, or one that draws nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress,
                leave=False, dynamic_ncols=True)


#: Pixels, summed over the bands whose PSFs are built from their stars, from
#: which ``psf_process='auto'`` builds them in a helper process. An ePSF takes
#: about 1 s per million pixels on 2 cores of an AMD EPYC, the helper about
#: 0.4 s to start (and more to receive the bands): below this the overlap
#: saves about a second, against one more process.
_PSF_PROCESS_MIN_PIXELS = 4_000_000


#: What the helper of ``psf_process`` imports while the bands are read: the
#: module of its function and the photutils modules its first ePSF would
#: otherwise import (1.1 s on an AMD EPYC).
_PSF_HELPER_IMPORTS = (__name__, 'photutils.psf', 'photutils.segmentation')


def _early_helper(setting, exposures, psfs):
    """The helper process of `run_exposure_set`, started before the bands
    are read where it may be wanted (`_psf_process_wanted` decides once they
    are), so that its imports overlap the reading; else a context that gives
    None. The helper is stopped on leaving the context unless it was given
    its call."""
    # A mapping naming other bands is refused once the bands are read
    # (_check_psf_bands); the pixels are counted then.
    wanted = (not (hasattr(psfs, 'items') and set(psfs) != set(exposures)) and
              _psf_process_wanted(setting, exposures, psfs, min_pixels=0))
    return Helper(_PSF_HELPER_IMPORTS) if wanted else contextlib.nullcontext()


def _check_psf_process(setting):
    """``psf_process`` is 'auto', True or False."""
    if not (isinstance(setting, bool) or (isinstance(setting, str) and setting == 'auto')):
        raise InvalidInputError(f"psf_process = {setting!r}; give 'auto', True or False.")


def _psf_process_wanted(setting, exposures, psfs, *, min_pixels=_PSF_PROCESS_MIN_PIXELS):
    """Whether `run_exposure_set` builds the PSFs in a helper process: some
    band's PSF is built from its stars, and those bands hold ``min_pixels``
    (0: not counted, for bands not read yet, `_early_helper`)."""
    if isinstance(setting, bool):
        return setting
    if cpu_share() < 2:
        return False
    per_band = psfs if hasattr(psfs, 'items') else dict.fromkeys(exposures, psfs)
    from_stars = [exposure for band, exposure in exposures.items()
                  if _psf_from_stars(exposure, per_band.get(band))]
    return bool(from_stars) and (
        min_pixels == 0 or sum(exposure.data.size for exposure in from_stars) >= min_pixels)


def _psf_from_stars(exposure, value):
    """Whether `build_psfs` builds a band's PSF from its stars (an ePSF)."""
    if value is None:
        return getattr(exposure, 'psf', None) is None
    return isinstance(value, str) and value.strip().lower().startswith('epsf')


def _check_psf_bands(exposures, psfs):
    """A mapping of PSFs must name the bands: refused before any PSF is built."""
    if hasattr(psfs, 'items') and set(psfs) != set(exposures):
        build_psfs(exposures, psfs)  # raises the error naming the bands


def _psfs_and_detections(exposures, psfs, epsf_options, *, no_wcs_scale, reference_band,
                         detect_options, pixel_scale, detect, claim=None, shared=None):
    """The helper process's part of `run_exposure_set`: the PSFs
    (`_build_psfs_with_progress`), then, with ``detect`` (and ``claim``, a
    `_DetectionClaim`, taken here: the run has not begun to detect them
    itself), the sources of the reference band as `_catalog_setup` would
    detect them (`_positions`, on the band as `_matched_bands` gives it, with
    the options `_detect_options` makes of its PSF), else None:
    ``(psf_models, detected)``. The ePSFs and the detection share the
    background meshes of the bands, as in the parent
    (`~psfdeconv.background.shared_estimates`), and with the parent through
    the directory ``shared``."""
    import warnings

    from ._warnings import catch_warnings

    if reference_band is None:
        reference_band = next(iter(exposures))
    with shared_estimates(shared):
        models = _build_psfs_with_progress(exposures, psfs, epsf_options, None,
                                           pixel_scale=no_wcs_scale)
        if not detect or reference_band not in exposures:
            return models, None  # the parent refuses a band that is not there
        if claim is not None and not claim.take(unwritable=True):
            return models, None  # the run detects them
        with catch_warnings():
            # The parent prepares the same bands and reports what it finds.
            warnings.simplefilter('ignore')
            reference = _matched_bands(exposures, reference_band,
                                       pixel_scale)[0][reference_band]
        options = _detect_options(detect_options, models[reference_band], reference.shape)
        return models, _positions(None, reference, reference_band, options)


def _build_psfs_with_progress(exposures, psfs, epsf_options, progress, pixel_scale=None):
    """`build_psfs`, one band at a time so that a bar can count the bands
    (``pixel_scale``: that of bands without a WCS)."""
    bands = list(exposures)
    _check_psf_bands(exposures, psfs)
    start = _stage_start(f'building the PSFs of {len(bands)} band(s)')
    models = {}
    with _progress_bar(progress, total=len(bands), desc='PSFs', unit='band') as bar:
        for band in bands:
            value = psfs[band] if hasattr(psfs, 'items') else psfs
            band_start = time.perf_counter()
            built, sources = build_psfs({band: exposures[band]}, value,
                                        epsf_options=epsf_options,
                                        pixel_scale=pixel_scale)
            models[band] = built[band]
            log.debug('band %s: PSF %s in %.1f s', band, sources[band],
                      time.perf_counter() - band_start)
            bar.update(1)
    log.debug('built the PSFs in %.1f s', time.perf_counter() - start)
    return models


# --- Files -----------------------------------------------------------------------------

