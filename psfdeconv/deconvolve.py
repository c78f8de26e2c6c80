# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Deconvolution of stamps: network, amplitude refit, flux-bias correction.

`deconvolve_stamps` is the public stamp API. It checks the inputs, builds
the input cube (`~psfdeconv.features.make_cube`), runs the network and
refits each band's amplitude by maximum likelihood against the observed
stamp (paper section III.3, Eq. 2):

.. math::

    A_b = \\frac{\\sum \\tilde{P}_b N_b}{\\sum \\tilde{P}_b^2},
    \\qquad \\tilde{P}_b = O_b \\ast \\mathrm{PSF}_b ,
    \\qquad \\sigma_{A_b} = \\frac{\\sigma_b}{\\sqrt{\\sum \\tilde{P}_b^2}} ,

with O the network output, N the observed stamp and sigma the per-pixel
noise. The deconvolved image is A O, in the input's flux units, so its
sum is the flux.

The remaining flux bias ("sources are still biased low at a few percent",
section IV.1) is removed by a quadratic fitted on simulations
(`~psfdeconv.calibrate.fit_flux_bias`, `correct_flux_bias`). The paper fits the true flux as a
quadratic of the measured flux, which depends on the flux unit; psfdeconv
fits the ratio true/measured as a quadratic in log10 of the measured
flux's signal-to-noise ratio, which is unit-free and so applies to any
survey's units.

On real galaxies the network's profile can differ from the galaxy's (wings it adds or
misses), which the refit cannot see: `residual_flux` takes that error from the refit's
residual near the source, as far as the noise allows, instead of from the flux-bias
correction (``flux_residual``).

Further steps, beyond the paper, are calibrated on the same simulations
and recorded in the model card: the network output is the average over
the symmetries of the square (the network run on flipped and rotated
copies of the input, `symmetric_output`), the ellipticity the network
leaves from the PSF is removed by a small counter-shear
(`correct_psf_leakage`), and the size bias of faint galaxies by a
dilation that depends on the signal-to-noise ratio (`correct_size_bias`).
This module applies the corrections; `psfdeconv.calibrate` fits them.

`deconvolve_stamps` works in steps of a few dozen stamps, and overlaps the
network's forward pass on one step (in a worker thread: TensorFlow and
OpenVINO release the GIL) with the NumPy and SciPy work on its neighbours,
much of which runs in one thread and would leave a core idle on its own.
"""

import functools

import numpy as np

from ._cpus import cpu_share, overlapped, run_in_threads, thread_count
from ._fourier import KernelTransforms, convolve_same
from ._validation import check_psfs, pixel_scale_arcsec, positive_int
from .exceptions import (
    ConfigError,
    InvalidInputError,
    InvalidPixelsError,
    InvalidPSFError,
    PixelScaleError,
    ShapeMismatchError,
    UnitsError,
)
from .target import convolve_to_target, residual_update, target_psf_images
from .transforms import dilate_images, shear_images, square_symmetry

__all__ = ['deconvolve_stamps', 'validate_stamps', 'normalize_psfs',
           'estimate_noise_sigma', 'refit_amplitude', 'refit_images', 'log10_snr',
           'detection_snr', 'apply_detection', 'correct_flux_bias',
           'light_radius', 'residual_flux', 'RESIDUAL_MISMATCH', 'RESIDUAL_APERTURE',
           'OUTPUT_FLOORS', 'remove_output_floor', 'SYMMETRY_COUNTS',
           'check_symmetries', 'symmetric_output', 'symmetric_predict', 'psf_ellipticity',
           'correct_psf_leakage', 'correct_size_bias', 'psf_fwhm',
           'outside_training_range', 'check_training_range', 'MAD_TO_SIGMA']

#: Standard deviation of Gaussian noise per unit median absolute deviation,
#: to the 5 digits the shipped models' calibrations were fitted with
#: (`astropy.stats.mad_std` uses 1.482602...).
MAD_TO_SIGMA = 1.4826

#: Largest absolute pixel value `validate_stamps` accepts: squares and sums
#: of such pixels stay finite in float64 and the network's scaled inputs
#: in float32.
MAX_PIXEL_VALUE = 1e30


def validate_stamps(stamps, psfs, pixel_scale):
    """Check stamps, PSFs and pixel scales at the public boundary.

    Returns
    -------
    stamps : `~numpy.ndarray`
        float64 (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        float64 (n, n_bands, py, px), each normalised to unit sum.
    pixel_scale : `~numpy.ndarray`
        float64 (n,) in arcsec/pixel.

    Raises
    ------
    `~psfdeconv.exceptions.InvalidInputError`
        The subclass for the problem (`~psfdeconv.exceptions.ShapeMismatchError`,
        `~psfdeconv.exceptions.InvalidPixelsError`,
        `~psfdeconv.exceptions.InvalidPSFError`,
        `~psfdeconv.exceptions.PixelScaleError`), with the offending index
        and value in its message.
    """
    if np.ma.isMaskedArray(stamps) and np.ma.getmaskarray(stamps).any():
        raise InvalidPixelsError(
            f'stamps has {int(np.ma.getmaskarray(stamps).sum())} masked '
            f'pixel(s); fill them (e.g. with the local background) and flag '
            f'those objects before deconvolution.')
    stamps = np.asarray(np.ma.getdata(stamps))
    psfs = np.asarray(psfs)
    if stamps.ndim != 4:
        raise ShapeMismatchError(f'stamps must have shape (n, n_bands, ny, '
                                 f'nx), got {stamps.shape}.')
    if 0 in stamps.shape:
        raise ShapeMismatchError(f'stamps have shape {stamps.shape}: no pixels to '
                                 f'deconvolve; give at least one object, band and pixel.')
    if psfs.ndim != 4 or psfs.shape[:2] != stamps.shape[:2]:
        raise ShapeMismatchError(
            f'psfs must have shape (n, n_bands, py, px) with (n, n_bands) = '
            f'{stamps.shape[:2]} as the stamps, got {psfs.shape}.')
    if not np.issubdtype(stamps.dtype, np.number) or \
            np.iscomplexobj(stamps):
        raise InvalidPixelsError(f'stamps must be real numbers, got dtype '
                                 f'{stamps.dtype}.')
    stamps = stamps.astype(np.float64)
    # One pass each for the largest and smallest values (NaN propagates);
    # the pixels are located only when one is out of range.
    if not (-MAX_PIXEL_VALUE <= stamps.min() and stamps.max() <= MAX_PIXEL_VALUE):
        _refuse_stamp_pixels(stamps)
    psfs = check_psfs(psfs, stamps.shape[-2:])
    py, px = psfs.shape[-2:]
    peak = psfs.reshape(psfs.shape[:2] + (-1,)).argmax(axis=-1)
    peak_y, peak_x = np.divmod(peak, px)
    off = (np.abs(peak_y - py // 2) > 1) | (np.abs(peak_x - px // 2) > 1)
    if off.any():
        i, b = (int(v) for v in np.argwhere(off)[0])
        raise InvalidPSFError(
            f'psfs[{i}, {b}] peaks at pixel (y, x) = ({peak_y[i, b]}, '
            f'{peak_x[i, b]}), not at its centre ({py // 2}, {px // 2}); '
            f'recentre the PSF.')

    pixel_scale = _pixel_scale_array(pixel_scale, stamps.shape[0])
    return stamps, psfs, pixel_scale


def _refuse_stamp_pixels(stamps):
    """Raise `~psfdeconv.exceptions.InvalidPixelsError` for the first
    non-finite pixel, else the first beyond `MAX_PIXEL_VALUE`."""
    bad = ~np.isfinite(stamps)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidPixelsError(
            f'stamps contain {int(bad.sum())} non-finite pixel(s), the first '
            f'at index {index} = {stamps[index]}; replace them (e.g. by the '
            f'local background) and flag those objects.')
    big = np.abs(stamps) > MAX_PIXEL_VALUE
    if big.any():
        index = tuple(int(i) for i in np.argwhere(big)[0])
        raise InvalidPixelsError(
            f'stamps{list(index)} = {stamps[index]:g}; {int(big.sum())} pixel(s) lie '
            f'beyond +-{MAX_PIXEL_VALUE:g}, where the float32 network and the flux fit '
            f'overflow; divide the stamps by a constant (or give them in a larger '
            f'flux unit) and multiply the fluxes back.')


def normalize_psfs(psfs):
    """PSFs divided by their sums (shape (..., py, px))."""
    psfs = np.asarray(psfs, dtype=np.float64)
    return psfs / psfs.sum(axis=(-2, -1), keepdims=True)


def _pixel_scale_array(pixel_scale, n):
    # One scale for every stamp is checked (and named) per stamp.
    scale = pixel_scale_arcsec(pixel_scale, scalar_to=(n,))
    if scale.shape != (n,):
        raise ShapeMismatchError(f'pixel_scale must be a scalar or have shape '
                                 f'({n},), got {scale.shape}.')
    return scale


def estimate_noise_sigma(residuals):
    """Robust per-image noise standard deviation, 1.4826 times the median
    absolute deviation (`~astropy.stats.median_absolute_deviation`).

    Parameters
    ----------
    residuals : `~numpy.ndarray`
        Shape (..., ny, nx): observed minus model, or a blank region.

    Returns
    -------
    `~numpy.ndarray`
        Shape (...).
    """
    residuals = np.asarray(residuals)
    return _noise_sigma(np.array(residuals, dtype=np.result_type(residuals, np.float32)))


def _noise_sigma(residuals):
    """`estimate_noise_sigma` of a temporary array, which it overwrites
    (the medians partition it in place), as float64."""
    rows = residuals.reshape(-1, residuals.shape[-2] * residuals.shape[-1])
    sigma = np.empty(len(rows))

    def mad(part):
        # astropy's median_absolute_deviation, without its copies.
        values = rows[part]
        values -= _median_rows(values)[:, None]
        np.abs(values, out=values)
        sigma[part] = MAD_TO_SIGMA * _median_rows(values).astype(np.float64)

    # numpy's partition releases the GIL.
    run_in_threads(mad, len(rows), thread_count(len(rows), _MIN_ROWS_PER_THREAD))
    # [()]: a float64 scalar for a single image, as before.
    return sigma.reshape(residuals.shape[:-2])[()]


#: Fewest images per thread of the noise estimate's medians (below, one thread).
_MIN_ROWS_PER_THREAD = 128


def _median_rows(values):
    """``np.median(values, axis=-1)`` of a 2-D array, which it reorders.

    One selection (`numpy.ndarray.partition` at the middle) where np.median
    makes three (the two middle values, and the last for NaNs): below the
    middle lie only values no larger than it, so the other middle value of
    an even row is their maximum. The same values as np.median, in the
    array's precision (a NaN anywhere gives NaN). On residuals, whose values
    are all different, this took 25 us per 4096-pixel row against
    np.median's 46 (AMD EPYC Zen 4, numpy 2.4); on rows of many equal values
    (the network's output floor) numpy's single selection is the slower (104
    against 23 us), so `remove_output_floor` keeps np.median.
    """
    if not np.isfinite(values).all():
        return np.median(values, axis=-1, overwrite_input=True)
    half = values.shape[-1] // 2
    values.partition(half, axis=-1)
    upper = values[:, half]
    if values.shape[-1] % 2:
        return upper.copy()
    # np.median's mean of the two: their sum in the array's precision, halved.
    return (values[:, :half].max(axis=-1) + upper) / 2


def refit_amplitude(model_images, observed, psfs, *, noise_sigma=None,
                    psf_transforms=None):
    """Maximum-likelihood amplitude of model images against observations.

    Parameters
    ----------
    model_images : `~numpy.ndarray`
        PSF-free images O, shape (..., ny, nx).
    observed : `~numpy.ndarray`
        Observed images N, same shape.
    psfs : `~numpy.ndarray`
        Unit-sum centred odd PSFs, shape (..., py, px).
    noise_sigma : `~numpy.ndarray`, optional
        Per-pixel noise standard deviation, shape (...); estimated from
        the fit residuals if not given.
    psf_transforms : `~psfdeconv._fourier.KernelTransforms`, optional
        The transforms of ``psfs`` on the images' FFT grid, when the caller
        has them already (they then replace ``psfs``, and set the
        precision of the re-convolution).

    The re-convolution runs in float32 unless an input is float64 (or the
    transforms are); the sums are accumulated in float64 either way.

    Returns
    -------
    amplitude, amplitude_err, noise_sigma : `~numpy.ndarray`
        Shape (...) each; the amplitude is 0 (error inf) where the model
        image is zero.

    Examples
    --------
    A noiseless stamp that is 2.5 times the model re-convolved with the
    PSF gives back exactly 2.5:

    >>> import numpy as np
    >>> from psfdeconv.deconvolve import refit_amplitude
    >>> from psfdeconv._fourier import convolve_same
    >>> yy, xx = np.mgrid[:32, :32]
    >>> model = np.exp(-((xx - 16)**2 + (yy - 15)**2) / 8.0)
    >>> psf = np.exp(-((np.mgrid[:9, :9] - 4)**2).sum(0) / 4.0)
    >>> psf /= psf.sum()
    >>> observed = 2.5 * convolve_same(model, psf)
    >>> a, err, sigma = refit_amplitude(model, observed, psf, noise_sigma=1.0)
    >>> print(f'{float(a):.6f}')
    2.500000
    """
    return _refit_amplitude(model_images, observed, psfs, noise_sigma=noise_sigma,
                            psf_transforms=psf_transforms)[:3]


def _refit_amplitude(model_images, observed, psfs, *, noise_sigma, psf_transforms):
    """`refit_amplitude`, and the refitted model re-convolved, ``A (O * PSF)``."""
    if psf_transforms is None:
        dtype = np.result_type(np.asarray(model_images).dtype, np.asarray(observed).dtype,
                               np.float32)
        reconvolved = convolve_same(np.asarray(model_images, dtype=dtype),
                                    np.asarray(psfs, dtype=dtype))
    else:
        reconvolved = psf_transforms.convolve(model_images)
    power = _sum_of_products(reconvolved, reconvolved)
    cross = _sum_of_products(reconvolved, observed)
    with np.errstate(divide='ignore', invalid='ignore'):
        amplitude = np.where(power > 0, cross / power, 0.0)
    reconvolved *= amplitude.astype(reconvolved.dtype)[..., None, None]
    if noise_sigma is None:
        noise_sigma = _noise_sigma(np.subtract(observed, reconvolved, dtype=reconvolved.dtype,
                                               casting='same_kind'))
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, float),
                                  amplitude.shape)
    with np.errstate(divide='ignore'):
        amplitude_err = np.where(power > 0, noise_sigma / np.sqrt(power),
                                 np.inf)
    return amplitude, amplitude_err, noise_sigma, reconvolved


def _sum_of_products(a, b):
    """``sum(a * b)`` over the image axes, accumulated in float64."""
    return np.sum(a * b, axis=(-2, -1), dtype=np.float64)


def log10_snr(flux, flux_err):
    """``log10(flux / flux_err)``, the ratio clipped at 1e-3 (so 0 and
    negative fluxes give -3): the variable of the flux- and size-bias
    corrections."""
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.log10(np.clip(flux / flux_err, 1e-3, None))


def detection_snr(flux, flux_err):
    """Signal-to-noise ratio of a stamp's source, all bands together.

    ``sum(flux) / sqrt(sum(flux_err**2))`` over the last (band) axis: the
    significance of the amplitude refit. On a blank stamp the network
    still draws something from the noise, and its refit is biased
    positive (the template was made from that noise), so the threshold
    that separates blanks is calibrated on simulations
    (`~psfdeconv.calibrate.fit_detection_threshold`), not taken from a normal distribution.

    Parameters
    ----------
    flux, flux_err : `~numpy.ndarray`
        Shape (..., n_bands).

    Returns
    -------
    `~numpy.ndarray`
        Shape (...); NaN where the errors are not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import detection_snr
    >>> float(detection_snr(np.array([30.0, 40.0]), np.array([3.0, 4.0])))
    14.0
    """
    flux = np.asarray(flux, dtype=float)
    flux_err = np.asarray(flux_err, dtype=float)
    with np.errstate(invalid='ignore', divide='ignore'):
        snr = flux.sum(axis=-1) / np.sqrt((flux_err ** 2).sum(axis=-1))
    return np.where(np.isfinite(snr), snr, np.nan)


def apply_detection(images, snr, detection):
    """Empty the images of stamps whose `detection_snr` is below a threshold.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (n, n_bands, ny, nx), changed in place.
    snr : `~numpy.ndarray`
        (n,), `detection_snr`.
    detection : dict or None
        A model card's ``detection`` (`~psfdeconv.calibrate.fit_detection_threshold`);
        None: no gate.

    Returns
    -------
    `~numpy.ndarray` of bool
        (n,), which stamps were detected.
    """
    if not detection:
        return np.ones(snr.shape, dtype=bool)
    # No significant source: the deconvolved image is empty, not the
    # network's rendering of the noise.
    detected = snr >= detection['snr_threshold']
    images[~detected] = 0.0
    return detected


#: Relative RMS error of the refitted flux from the model profile on real galaxies, the
#: prior of `residual_flux`: the per-stamp scatter of ``flux_corrected`` on the AEGIS HST
#: galaxies at SNR > 80, where the noise is several times smaller (:doc:`/validation`).
RESIDUAL_MISMATCH = 0.05

#: Aperture radius of `residual_flux` in units of the re-convolved model's 90 % light
#: radius: wide enough for the wings a profile error puts at 1.5-2 r90.
RESIDUAL_APERTURE = 2.0


@functools.lru_cache(maxsize=8)
def _annuli(shape):
    """The pixels of a (ny, nx) stamp grouped by their annulus ceil(r) about the
    stamp centre ``(ny // 2, nx // 2)``: ``(order, starts, counts)``, the flat
    pixel indices sorted by annulus, where each annulus starts in that order,
    and its number of pixels (read-only arrays)."""
    ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    annulus = np.ceil(np.hypot(y - ny // 2, x - nx // 2)).astype(int).ravel()
    order = np.argsort(annulus, kind='stable')
    counts = np.bincount(annulus)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for array in (order, starts, counts):
        array.setflags(write=False)
    return order, starts, counts


def _enclosed(images):
    """Cumulative annulus sums (..., n_annuli) of images (..., ny, nx) in float64:
    the light within each whole radius about the stamp centre (`_annuli`).

    Summed per annulus by `numpy.add.reduceat`, not as a product with a
    one-hot matrix: that product runs in the BLAS library's threads, which
    spin after each call and took the cores of the network running beside
    it in `deconvolve_stamps` (on 2 cores the product was 3-4 times slower
    there than alone, and the network a fifth slower beside it:
    ``benchmarks/bench_setup_parts.py``).
    """
    order, starts, counts = _annuli(np.shape(images)[-2:])
    flat = np.reshape(images, np.shape(images)[:-2] + (-1,))
    sums = np.zeros(flat.shape[:-1] + counts.shape)
    # reduceat needs increasing starts: an empty annulus (none in a square
    # stamp) keeps its 0.
    filled = counts > 0
    sums[..., filled] = np.add.reduceat(flat[..., order], starts[filled], axis=-1,
                                        dtype=np.float64)
    return np.cumsum(sums, axis=-1)


def _enclosing_radius(enclosed, fraction):
    """The first whole radius whose enclosed light (`_enclosed`) reaches
    ``fraction`` of the total."""
    return np.argmax(enclosed >= fraction * enclosed[..., -1:], axis=-1)


def light_radius(images, fraction):
    """The smallest whole radius (pixels) about the stamp centre ``(ny // 2, nx // 2)``
    within which lies a fraction of each image's sum.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx).
    fraction : float
        In (0, 1].

    Returns
    -------
    `~numpy.ndarray`
        (...) of int; 0 where an image's sum is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import light_radius
    >>> image = np.zeros((9, 9))
    >>> image[4, 4], image[4, 7] = 1.0, 1.0
    >>> int(light_radius(image, 0.5)), int(light_radius(image, 0.9))
    (0, 3)
    """
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        images = images.astype(float)
    enclosed = _enclosed(images)
    return np.where(enclosed[..., -1] > 0, _enclosing_radius(enclosed, fraction), 0)


def residual_flux(images, stamps, psfs, flux_corrected, flux_err, noise_sigma, *,
                  mismatch=RESIDUAL_MISMATCH, aperture=RESIDUAL_APERTURE,
                  psf_transforms=None, reconvolved=None):
    """The refitted flux corrected by the residual near the source, as far as
    the noise lets it.

    The refit measures the flux through the model's profile; where the profile
    is wrong (wings the network adds or misses) the light it misplaces stays in
    the residual ``r``, the sum of ``N - P * O`` (O the refitted images, P the
    PSF) within ``aperture`` times the 90 % light radius of ``P * O``
    (`light_radius`, whole pixels). The flux-bias correction of the model card
    expects a profile error ``c = flux_corrected - flux`` (``flux`` the sum of O); ``r``
    measures it with the noise ``sigma_r = noise_sigma sqrt(N_aperture)``
    (white noise). With a prior spread of ``s = mismatch |flux_corrected|``
    about ``c``, the estimate weighs the two by ``k = s^2 / (s^2 + sigma_r^2)``::

        flux_residual = flux + k r + (1 - k) c
        flux_residual_err = sqrt(flux_err^2 + k^2 sigma_r^2)

    Bright stamps (``k`` near 1) take their profile error from the data, so
    their flux no longer rests on the network's wings; faint ones keep the
    card's correction and nearly all of their noise level (on the simulated
    test set the median k is 0.03 below SNR 20, 0.4 at SNR 40-80 and 0.9
    above 80).

    Parameters
    ----------
    images : `~numpy.ndarray`
        Refitted images (n, n_bands, ny, nx), before any detection gate: their
        sums are the refit's fluxes.
    stamps, psfs : `~numpy.ndarray`
        The observed stamps and their unit-sum PSFs.
    flux_corrected, flux_err, noise_sigma : `~numpy.ndarray`
        (n, n_bands): the bias-corrected flux (`correct_flux_bias`; the sums of
        ``images`` where the card has no correction), the refit's flux error and
        the per-pixel noise.
    mismatch : float, optional
        Prior relative RMS of the profile error; 0 returns ``flux_corrected``.
    aperture : float, optional
        Aperture radius in 90 % light radii.
    psf_transforms : `~psfdeconv._fourier.KernelTransforms`, optional
        Transforms of ``psfs`` on the stamps' FFT grid (replace ``psfs``).
    reconvolved : `~numpy.ndarray`, optional
        ``images`` re-convolved with their PSFs, when the caller has them
        (`refit_images` with ``return_reconvolved``); ``psfs`` and
        ``psf_transforms`` are then not used.

    Returns
    -------
    flux_residual, flux_residual_err, weight : `~numpy.ndarray`
        (n, n_bands) each; ``weight`` is k.

    Examples
    --------
    A model that lacks the outer third of a source's light gets nearly all of it
    back where the noise is low, and little of it where the noise is high:

    >>> import numpy as np
    >>> from psfdeconv._fourier import convolve_same
    >>> from psfdeconv.deconvolve import residual_flux
    >>> yy, xx = np.mgrid[:64, :64] - 32
    >>> galaxy = np.exp(-np.hypot(yy, xx) / 2.0)
    >>> galaxy /= galaxy.sum()
    >>> psf = np.exp(-(np.mgrid[:15, :15] - 7.0)**2 / 8.0).prod(0)
    >>> psf /= psf.sum()
    >>> stamp = 1000.0 * convolve_same(galaxy, psf)
    >>> model = 1000.0 * np.where(np.hypot(yy, xx) < 5, galaxy, 0.0)
    >>> for sigma in (0.01, 10.0):
    ...     flux, err, k = residual_flux(model[None, None], stamp[None, None],
    ...                                  psf[None, None], np.array([[model.sum()]]),
    ...                                  np.array([[1.0]]), np.array([[sigma]]))
    ...     print(f'{model.sum():.0f} -> {flux[0, 0]:.0f}, k = {k[0, 0]:.3f}')
    682 -> 972, k = 1.000
    682 -> 689, k = 0.026
    """
    flux_corrected = np.asarray(flux_corrected, dtype=float)
    flux = np.sum(images, axis=(-2, -1), dtype=np.float64)
    if reconvolved is None:
        if psf_transforms is None:
            psf_transforms = KernelTransforms(psfs, np.shape(stamps)[-2:],
                                              dtype=np.result_type(images, np.float32))
        reconvolved = psf_transforms.convolve(images)
    _, _, counts = _annuli(reconvolved.shape[-2:])
    # The aperture: the whole annuli within aperture x r90 (the 90 % radius of
    # the re-convolved model, as `light_radius`).
    r90 = _enclosing_radius(_enclosed(reconvolved), 0.9)
    edge = np.minimum(np.floor(aperture * r90).astype(int), counts.size - 1)[..., None]
    residual = np.take_along_axis(
        _enclosed(np.subtract(stamps, reconvolved, dtype=float)), edge, axis=-1)[..., 0]
    n_inside = np.cumsum(counts)[edge[..., 0]]
    sigma_r = np.asarray(noise_sigma, dtype=float) * np.sqrt(n_inside)
    prior = (mismatch * flux_corrected) ** 2
    with np.errstate(divide='ignore', invalid='ignore'):
        weight = np.where(prior > 0, prior / (prior + sigma_r ** 2), 0.0)
    weight = np.where(np.isfinite(weight), weight, 0.0)
    expected = flux_corrected - flux
    return (flux_corrected + weight * (residual - expected),
            np.hypot(np.asarray(flux_err, dtype=float), weight * sigma_r), weight)


def correct_flux_bias(flux, flux_err, flux_bias):
    """Apply a fitted flux-bias correction (see `~psfdeconv.calibrate.fit_flux_bias`).

    Parameters
    ----------
    flux, flux_err : `~numpy.ndarray` or `~astropy.units.Quantity`
        Recovered fluxes and errors.
    flux_bias : dict or None
        From `~psfdeconv.calibrate.fit_flux_bias` (a model card's
        ``flux_bias``); `None` returns the flux unchanged. With
        ``'per_band_coefficients'`` and a last axis of that many bands,
        each band gets its own correction.

    Returns
    -------
    `~numpy.ndarray` or `~astropy.units.Quantity`
        The corrected flux (non-positive fluxes are left unchanged).

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.deconvolve import correct_flux_bias
    >>> bias = {'coefficients': [1.05, 0.0, 0.0], 'log_snr_range': [1, 3]}
    >>> print(f'{correct_flux_bias(100.0, 5.0, bias):.1f}')
    105.0
    >>> bias['per_band_coefficients'] = [[1.0, 0, 0], [1.1, 0, 0]]
    >>> np.round(correct_flux_bias(np.array([[100.0, 100.0]]), 5.0, bias),
    ...          6).tolist()
    [[100.0, 110.0]]
    """
    if not flux_bias:
        return flux
    c0, c1, c2 = flux_bias['coefficients']
    per_band = flux_bias.get('per_band_coefficients')
    if per_band is not None and np.ndim(flux) >= 1 and \
            np.shape(flux)[-1] == len(per_band):
        # Along the last (band) axis, one fit per band.
        c0, c1, c2 = np.asarray(per_band, dtype=float).T
    low, high = flux_bias['log_snr_range']
    ratio_values = np.asarray(getattr(flux, 'value', flux), dtype=float)
    err_values = np.asarray(getattr(flux_err, 'value', flux_err),
                            dtype=float)
    log_snr = np.clip(log10_snr(ratio_values, err_values), low, high)
    factor = np.where(ratio_values > 0, c0 + c1 * log_snr + c2 * log_snr**2,
                      1.0)
    return flux * factor


#: Ways to remove the network output's floor (`remove_output_floor`).
OUTPUT_FLOORS = (None, 'median', 'outer')


def remove_output_floor(output, method):
    """Subtract the floor of network outputs (softplus never reaches 0).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs, shape (..., ny, nx).
    method : {None, 'median', 'outer'}
        None leaves the output unchanged; 'median' subtracts each image's
        median; 'outer' the median of its pixels farther than 7/16 of the
        stamp side from the centre (the corners and the middle of the
        edges). A large galaxy fills more than half of the stamp above the
        floor, so the whole-stamp median takes a slice of its wings; the
        outer pixels are the stamp's empty sky.

    Returns
    -------
    `~numpy.ndarray`
        The outputs minus their floors, clipped at 0.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.full((1, 16, 16), 0.1)
    >>> image[0, 2:14, 2:14] += 1.0  # a source covering most of the stamp
    >>> float(remove_output_floor(image, 'median').sum())
    0.0
    >>> round(float(remove_output_floor(image, 'outer').sum()), 6)
    144.0
    """
    if method is None:
        return output
    if method not in OUTPUT_FLOORS:
        raise ConfigError(f'output_floor must be one of {OUTPUT_FLOORS}, got '
                          f'{method!r}.')
    if method == 'median':
        floor = np.median(output, axis=(-2, -1), keepdims=True)
    else:
        ny, nx = output.shape[-2:]
        yy, xx = np.mgrid[:ny, :nx]
        outer = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) > 7 / 16 * min(ny, nx)
        floor = np.median(output[..., outer], axis=-1)[..., None, None]
    return np.clip(output - floor, 0.0, None)


#: Numbers of symmetries of the square `symmetric_output` can average.
SYMMETRY_COUNTS = (1, 2, 4, 8)
# The transforms each count averages: t % 4 quarter turns, then for t >= 4
# a left-right flip (as `~psfdeconv.train.augment_batch`).
_SYMMETRY_TRANSFORMS = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def check_symmetries(symmetries, model=None):
    """The number of symmetries to average over: ``symmetries``, or the
    model card's (1 for a card without one) if None; a
    `~psfdeconv.exceptions.ConfigError` unless it is 1, 2, 4 or 8."""
    if symmetries is None and model is not None:
        symmetries = model.card.get('symmetries') or 1
    if symmetries not in SYMMETRY_COUNTS:
        raise ConfigError(f'symmetries must be one of {SYMMETRY_COUNTS}, got '
                          f'{symmetries!r}.')
    return symmetries


def symmetric_output(model, stamps, psfs, pixel_scale, *, symmetries=8,
                     batch_size=128, psf_transforms=None, precision='float32'):
    """Network output averaged over symmetries of the square.

    The network runs on flipped and rotated copies of each stamp and its
    PSF, and each output is turned back before averaging (test-time
    augmentation). The input channels are convolutions with centred
    kernels, which commute with these symmetries, so every copy is an
    equally valid view of the same object; averaging them removes the part
    of the network's error that is not symmetric, for that many network
    calls (:doc:`/benchmarks` gives the gain and the cost).

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        The network.
    stamps, psfs, pixel_scale
        As returned by `validate_stamps`.
    symmetries : {1, 2, 4, 8}, optional
        1: the stamp as given; 2: and its mirror image; 4: its four
        quarter turns; 8: all eight symmetries.
    batch_size : int, optional
        Objects per network call.
    psf_transforms : `~psfdeconv._fourier.KernelTransforms`, optional
        The transforms of ``psfs`` on the stamps' FFT grid, if computed
        already (`~psfdeconv.features.make_channels`).
    precision : {'auto', 'float32', 'bfloat16'}, optional
        Arithmetic of the network (`~psfdeconv.inference.resolve_precision`).

    Returns
    -------
    `~numpy.ndarray`
        float32 (n, n_bands, ny, nx), in the network's scaled units.
    """
    from .features import make_cube

    transforms = _SYMMETRY_TRANSFORMS[check_symmetries(symmetries)]
    n = stamps.shape[0]
    output = np.empty(stamps.shape, dtype=np.float32)
    # Features in chunks keep the FFT buffers bounded for large n.
    for start in range(0, n, 4 * batch_size):
        sl = slice(start, start + 4 * batch_size)
        cube, _ = make_cube(stamps[sl], psfs[sl], pixel_scale=pixel_scale[sl],
                            kinds=model.kinds, **model.feature_options,
                            psf_transforms=None if psf_transforms is None else psf_transforms[sl])
        output[sl] = _symmetric_predict(model, cube, transforms, batch_size=batch_size,
                                        precision=precision)
    return output


def symmetric_predict(model, cubes, *, symmetries=8, batch_size=128, precision='float32'):
    """The network's output on input cubes averaged over symmetries of the
    square: `symmetric_output` of cubes already built
    (`~psfdeconv.features.make_cube`), e.g. the cached cubes of a training run.

    Returns
    -------
    `~numpy.ndarray`
        float32 (n, n_bands, ny, nx), in the network's scaled units.
    """
    transforms = _SYMMETRY_TRANSFORMS[check_symmetries(symmetries)]
    return _symmetric_predict(model, cubes, transforms, batch_size=batch_size,
                              precision=precision)


def _symmetric_predict(model, cube, transforms, *, batch_size, precision):
    """The network's output on ``cube`` averaged over the views of
    ``transforms`` (`symmetric_output` of an input cube)."""
    output = np.zeros((len(cube), model.n_bands) + cube.shape[1:3], dtype=np.float32)
    for transform in transforms:
        # The cube of a flipped or turned stamp and PSF is the flipped or
        # turned cube: built once, turned for each view (a view of the
        # cube itself, no copy, for the identity).
        view = np.ascontiguousarray(square_symmetry(cube, transform, axes=(1, 2)))
        output += square_symmetry(model.predict(view, batch_size=batch_size,
                                                precision=precision),
                                  transform, inverse=True)
    output /= len(transforms)
    return output


def psf_ellipticity(psfs):
    """Unweighted-moment ellipticity (distortion) of PSF images.

    Parameters
    ----------
    psfs : `~numpy.ndarray`
        (..., py, px), positive sums.

    Returns
    -------
    e1, e2 : `~numpy.ndarray`
        Shape (...), as `~psfdeconv.measure.image_moments`.
    """
    from .measure import image_moments

    moments = image_moments(psfs)
    return moments['e1'], moments['e2']


#: Range of the size correction factor (it is not extrapolated beyond).
_SIZE_FACTOR_RANGE = (0.5, 2.0)

#: Size factors closer to 1 than this are not applied (no spline). The
#: refitted flux of a bright simulated galaxy moved by 3.3 times the
#: dilation when its spline was skipped (the spline itself smooths a sharp
#: template), so this keeps fluxes within 3e-5 of the dilated ones.
SIZE_FACTOR_TOLERANCE = 1e-5

#: Counter-shears smaller than this are not applied (no spline): they change
#: an ellipticity by 2e-5 at most, a twentieth of the residual leakage of the
#: shipped calibrations (4e-4), and, as for `SIZE_FACTOR_TOLERANCE`, fluxes
#: by a few 1e-5.
SHEAR_TOLERANCE = 1e-5


def _size_factor(flux, flux_err, size_bias):
    c0, c1, c2 = size_bias['coefficients']
    low, high = size_bias['log_snr_range']
    log_snr = np.clip(log10_snr(flux, flux_err), low, high)
    factor = np.clip(c0 + c1 * log_snr + c2 * log_snr**2, *_SIZE_FACTOR_RANGE)
    return np.where(np.asarray(flux) > 0, factor, 1.0)


def correct_size_bias(output, flux, flux_err, size_bias):
    """Apply a fitted size-bias correction (see `~psfdeconv.calibrate.fit_size_bias`).

    Parameters
    ----------
    output : `~numpy.ndarray`
        Deconvolved images (n, n_bands, ny, nx).
    flux, flux_err : `~numpy.ndarray`
        (n, n_bands), the amplitude refit's flux and error of ``output``.
    size_bias : dict or None
        A model card's ``size_bias``; `None` returns ``output`` unchanged.

    Returns
    -------
    `~numpy.ndarray`
        The dilated images (sums conserved); bands without positive flux,
        or with a factor within `SIZE_FACTOR_TOLERANCE` of 1, unchanged.
    """
    if not size_bias:
        return output
    return dilate_images(output, _dilation(flux, flux_err, size_bias))


def _dilation(flux, flux_err, size_bias):
    """``f - 1`` of `correct_size_bias`, 0 where within `SIZE_FACTOR_TOLERANCE`
    (or without a ``size_bias``)."""
    if not size_bias:
        return 0.0
    factor = _size_factor(np.asarray(flux, float), np.asarray(flux_err, float), size_bias)
    return np.where(np.abs(factor - 1.0) > SIZE_FACTOR_TOLERANCE, factor - 1.0, 0.0)


def _leakage_shear(psfs, psf_leakage):
    """The counter-shear ``(g1, g2)`` of `correct_psf_leakage`, 0 where its
    size is within `SHEAR_TOLERANCE` (or without a ``psf_leakage``)."""
    if not psf_leakage:
        return 0.0, 0.0
    # A PSF without defined moments gets no correction.
    psf_e1, psf_e2 = (np.nan_to_num(e) for e in psf_ellipticity(psfs))
    g1 = -psf_leakage['alpha'] * psf_e1 / 2
    g2 = -psf_leakage['alpha'] * psf_e2 / 2
    small = np.hypot(g1, g2) <= SHEAR_TOLERANCE
    return np.where(small, 0.0, g1), np.where(small, 0.0, g2)


def correct_psf_leakage(output, psfs, psf_leakage):
    """Remove the PSF ellipticity the network leaves in its output.

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs, (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        PSFs, (n, n_bands, py, px).
    psf_leakage : dict or None
        From `~psfdeconv.calibrate.fit_psf_leakage` (a model card's ``psf_leakage``); None
        returns ``output`` unchanged.

    Returns
    -------
    `~numpy.ndarray`
        The output, each band sheared by ``-alpha e_PSF / 2`` (bands whose
        shear is within `SHEAR_TOLERANCE` of 0 unchanged).
    """
    if not psf_leakage:
        return output
    return shear_images(output, *_leakage_shear(psfs, psf_leakage))


def refit_images(output, stamps, psfs, noise_sigma, *, psf_transforms=None,
                 return_reconvolved=False):
    """The amplitude refit of `deconvolve_stamps`: images and fluxes.

    Parameters
    ----------
    output : `~numpy.ndarray`
        Network outputs (corrections applied), (n, n_bands, ny, nx).
    stamps, psfs : `~numpy.ndarray`
        As returned by `validate_stamps`.
    noise_sigma : `~numpy.ndarray` or None
        (n, n_bands); None estimates it from the residuals.
    psf_transforms : `~psfdeconv._fourier.KernelTransforms`, optional
        As for `refit_amplitude`.
    return_reconvolved : bool, optional
        Also return ``'reconvolved'``: the refitted images re-convolved with
        their PSFs (for `residual_flux`).

    Returns
    -------
    dict
        ``'images'`` (the refitted images, in the precision of ``output``), ``'amplitude'``,
        ``'amplitude_err'``, ``'noise_sigma'``, ``'flux'``, ``'flux_err'``
        (each (n, n_bands)) and ``'detection_snr'`` (n,).
    """
    amplitude, amplitude_err, noise_sigma, reconvolved = _refit_amplitude(
        output, stamps, psfs, noise_sigma=noise_sigma, psf_transforms=psf_transforms)
    total = output.sum(axis=(-2, -1), dtype=np.float64)
    flux = amplitude * total
    flux_err = amplitude_err * total
    fit = {'images': output * amplitude.astype(output.dtype)[..., None, None],
           'amplitude': amplitude, 'amplitude_err': amplitude_err,
           'noise_sigma': noise_sigma, 'flux': flux, 'flux_err': flux_err,
           'detection_snr': detection_snr(flux, flux_err)}
    if return_reconvolved:
        fit['reconvolved'] = reconvolved
    return fit


def float32_work(stamps, psfs):
    """The stamps in float32 and one transform of each PSF on their FFT
    grid: the per-stamp work of `deconvolve_stamps` (and of the calibration
    that must reproduce it) runs in float32, the sums of the refit in
    float64, with the PSF transforms shared by the input channels and both
    refits."""
    return (stamps.astype(np.float32),
            KernelTransforms(psfs, stamps.shape[-2:], dtype=np.float32))


def _correct_output(output, stamps, psfs, noise_sigma, card, psf_transforms):
    """`correct_size_bias` then `correct_psf_leakage` of the card, with the
    first refit sharing the PSF transforms."""
    size_bias = card.get('size_bias')
    if size_bias:
        # The dilation depends on the refit's SNR; the images are refitted after it.
        first = refit_amplitude(output, stamps, psfs, noise_sigma=noise_sigma,
                                psf_transforms=psf_transforms)
        # flux / flux_err = amplitude / amplitude_err: the sum of the image cancels.
        output = dilate_images(output, _dilation(first[0], first[1], size_bias))
    # Two interpolations, as the calibration: one map f S about the centroid
    # would save a spline but moved fluxes by up to 7e-4 on simulations.
    return correct_psf_leakage(output, psfs, card.get('psf_leakage'))


#: The entries of `deconvolve_stamps`' details in the stamps' unit.
_FLUX_DETAILS = ('amplitude', 'amplitude_err', 'flux', 'flux_err', 'flux_corrected',
                 'flux_residual', 'flux_residual_err', 'noise_sigma')


def _strip_units(stamps, noise_sigma):
    """Plain stamps and noise, and the stamps' unit (None for plain
    arrays); a Quantity noise_sigma is converted to the stamps' unit."""
    import astropy.units as u

    unit = stamps.unit if isinstance(stamps, u.Quantity) else None
    if unit is not None:
        stamps = stamps.value
    if isinstance(noise_sigma, u.Quantity):
        if unit is None:
            if noise_sigma.unit.physical_type != 'dimensionless':
                raise UnitsError(f'noise_sigma is in {noise_sigma.unit} but the '
                                 f'stamps are a plain array; give the stamps as '
                                 f'a Quantity in the same unit, or plain '
                                 f'numbers for both.')
            noise_sigma = noise_sigma.to_value(u.dimensionless_unscaled)
        else:
            try:
                noise_sigma = noise_sigma.to_value(unit)
            except u.UnitConversionError:
                raise UnitsError(f'noise_sigma is in {noise_sigma.unit} but the '
                                 f'stamps are in {unit}; give noise_sigma in '
                                 f'the stamps\' unit.') from None
    return stamps, noise_sigma, unit


def _check_noise_sigma(noise_sigma, shape):
    """``noise_sigma`` broadcast to ``shape`` (n, n_bands), refusing values
    that are not positive and finite: a noise of 0 would make every flux
    error 0 and a negative one negative, so neither can be a real noise."""
    try:
        values = np.broadcast_to(np.asarray(noise_sigma, float), shape)
    except (TypeError, ValueError):
        raise ShapeMismatchError(
            f'noise_sigma of shape {np.shape(noise_sigma)} does not broadcast to '
            f'(n, n_bands) = {shape}; give one value, one per band or one per '
            f'stamp and band.') from None
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(
            f'noise_sigma{list(index)} = {values[index]}; a per-pixel noise standard '
            f'deviation must be positive and finite; give the noise in the stamps\' '
            f'unit, or noise_sigma=None to estimate it from the residuals.')
    return values


def deconvolve_stamps(stamps, psfs, *, pixel_scale, model=None,
                      noise_sigma=None, batch_size=128, symmetries=None,
                      target_psf=None, target_update=True, return_details=False,
                      strict=False, precision='auto'):
    """Remove the PSF from multi-band stamps.

    Parameters
    ----------
    stamps : array-like or `~astropy.units.Quantity`
        Observed, background-subtracted stamps of shape (n, n_bands, ny,
        nx) in any flux unit; ny and nx must equal the model's stamp size.
        A Quantity gives Quantity images and fluxes in its unit.
    psfs : array-like
        PSF images of shape (n, n_bands, py, px): odd sizes, centred, any
        positive sum (they are normalised here), py, px <= ny, nx.
    pixel_scale : float, `~astropy.units.Quantity` or array-like
        Pixel scale in arcsec/pixel: a scalar, or one value per object
        (shape (n,)).
    model : `~psfdeconv.model.DeconvolutionModel`, optional
        A loaded model; the shipped default if `None`.
    noise_sigma : array-like or `~astropy.units.Quantity`, optional
        Per-pixel noise standard deviation, shape (n, n_bands) or
        broadcastable (a Quantity in a unit convertible to the stamps');
        estimated from the refit residuals if not given.
    batch_size : int, optional
        Most objects per network call. The stamps go through in steps of at
        most 32 objects (fewer with a smaller ``batch_size``): with two CPUs
        or more, the network runs on one step in a worker thread while this
        thread builds the next step's input cube and corrects and refits the
        step before (the results do not depend on the steps).
    symmetries : {1, 2, 4, 8}, optional
        Average the network over this many symmetries of the square
        (`symmetric_output`); default: the model card's ``symmetries``
        (1 if it has none). The card's calibrations were fitted with its
        own value; fewer run faster.
    target_psf : float, `~astropy.units.Quantity` or array-like, optional
        Deconvolve to this PSF instead of to the pixel grid: the images are
        convolved with it after the refit (`~psfdeconv.target`). A FWHM
        (arcsec, or an angle Quantity) gives a round Gaussian at each
        stamp's pixel scale; an image (py, px) or images (n, py, px) are
        used as given (odd-sized, centred, normalised here). Fluxes are
        unchanged. Small galaxies then keep a measurable size instead of
        collapsing to a spike; compare their shapes with the truth
        convolved with the same target.
    target_update : bool, optional
        With ``target_psf``, add to the output the part of the refit's
        residuals the observed stamps constrain at the target's resolution,
        pooling the bands (`~psfdeconv.target.residual_update`): galaxies'
        shapes come closer to what their noise allows (:doc:`/validation`).
        False only convolves the output with the target.
    return_details : bool, optional
        Also return a dict with ``'amplitude'``, ``'amplitude_err'``,
        ``'flux'``, ``'flux_err'``, ``'flux_corrected'``, ``'flux_residual'``,
        ``'flux_residual_err'`` (`residual_flux`) and
        ``'noise_sigma'`` (each (n, n_bands)), ``'network_output'`` (the
        template refitted: the network output with its floor removed and,
        where the card has ``psf_leakage``, `correct_psf_leakage` applied),
        ``'outside_training'`` (n,), True where the pixel scale or a PSF's
        FWHM lies outside the model's training range
        (`outside_training_range`), ``'detection_snr'`` (n,) (`detection_snr`),
        ``'detected'`` (n,): False where it is below the card's
        ``detection`` threshold, whose images are set to 0 (fluxes are
        still reported), with ``target_psf`` the kernels applied,
        ``'target_psf'`` (n, py, px), and where the card has a
        ``shear_response`` (:doc:`/validation`), the calibrated shear
        estimates ``'shear_g1'``, ``'shear_g2'`` and their responses
        ``'shear_R1'``, ``'shear_R2'`` (each (n, n_bands), pixel frame: g1 > 0
        along the x axis; NaN where HSM fails, e.g. undetected stamps;
        measured on the pixel-grid images, before any ``target_psf``;
        `psfdeconv.shear.apply_shear_response`).
    strict : bool or None, optional
        Refuse stamps outside the training range
        (`~psfdeconv.exceptions.PixelScaleError`) instead of warning
        (`~psfdeconv.exceptions.OutsideTrainingRangeWarning`); None does
        neither (the caller has checked), ``details['outside_training']``
        still says which stamps are outside.
    precision : {'auto', 'float32', 'bfloat16'}, optional
        Arithmetic of the network: ``'auto'`` (the default) is bfloat16
        where the CPU has it (AVX512-BF16 or AMX), else float32. bfloat16 ran
        one view 1.7 times as fast on a 2-core AMD Zen 4, moves fluxes by
        about 0.1 %, and keeps the validation figures that have targets
        within them (:doc:`/precision`); ``'float32'`` is what the card's
        calibrations were fitted in, with the same results on every CPU.
        ``details['precision']`` records the ``(precision, runtime)`` that
        ran (`~psfdeconv.inference.resolve_precision`).

    Returns
    -------
    images : `~numpy.ndarray` or `~astropy.units.Quantity`
        Deconvolved images (n, n_bands, ny, nx) in the input's flux units
        (a Quantity if ``stamps`` is one, as are then the details
        ``'amplitude'``, ``'amplitude_err'``, ``'flux'``, ``'flux_err'``,
        ``'flux_corrected'``, ``'flux_residual'``, ``'flux_residual_err'`` and
        ``'noise_sigma'``), after the amplitude refit: the sum of an image is its flux. Where
        the model's card has a ``detection`` threshold and a stamp's
        `detection_snr` lies below it, the images are 0 (no significant
        source).
    details : dict
        Only if ``return_details``.

    Raises
    ------
    `~psfdeconv.exceptions.InvalidInputError`
        Subclasses for non-finite pixels, bad PSFs, shape or band-count
        mismatches and invalid pixel scales (and, with ``strict``, pixel
        scales or PSFs outside the training range);
        `~psfdeconv.exceptions.UnitsError` for a Quantity ``noise_sigma``
        not convertible to the stamps' unit.

    Examples
    --------
    >>> import psfdeconv
    >>> from psfdeconv.simulate import simulate_stamps
    >>> sims = simulate_stamps(4, seed=7)
    >>> images = psfdeconv.deconvolve_stamps(
    ...     sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'])
    >>> images.shape
    (4, 3, 64, 64)
    """
    from .features import make_cube
    from .inference import get_runner, resolve_precision
    from .model import load_model

    # A bad precision is refused before any work.
    resolved_precision = resolve_precision(precision)
    stamps, noise_sigma, unit = _strip_units(stamps, noise_sigma)
    stamps, psfs, pixel_scale = validate_stamps(stamps, psfs, pixel_scale)
    batch_size = positive_int(batch_size, 'batch_size')
    if noise_sigma is not None:
        noise_sigma = _check_noise_sigma(noise_sigma, stamps.shape[:2])
    if model is None:
        model = load_model(n_bands=stamps.shape[1], network='lazy')
    model.check_bands(stamps.shape[1])
    if stamps.shape[-2:] != (model.stamp_size, model.stamp_size):
        raise ShapeMismatchError(
            f'stamps are {stamps.shape[-2:]} pixels but the model was trained '
            f'on {model.stamp_size}x{model.stamp_size}; cut stamps of that '
            f'size.')
    target_kernels = (None if target_psf is None else target_psf_images(
        target_psf, pixel_scale, len(stamps), stamps.shape[-2:]))
    outside = check_training_range(model, pixel_scale, psfs, strict=strict)
    transforms = _SYMMETRY_TRANSFORMS[check_symmetries(symmetries, model)]
    step = min(batch_size, _PIPELINE_STEP)

    def prepare(sl):
        stamps32, psf_transforms = float32_work(stamps[sl], psfs[sl])
        cube, _ = make_cube(stamps32, None, pixel_scale=pixel_scale[sl], kinds=model.kinds,
                            **model.feature_options, psf_transforms=psf_transforms)
        return sl, stamps32, psf_transforms, cube

    def network(prepared):
        return _symmetric_predict(model, prepared[-1], transforms, batch_size=batch_size,
                                  precision=precision)

    def finish(prepared, output):
        sl, stamps32, psf_transforms, _ = prepared
        return _finish_stamps(
            output, stamps32, psfs[sl], psf_transforms,
            None if noise_sigma is None else noise_sigma[sl], model.card,
            None if target_kernels is None else target_kernels[sl],
            target_update=target_update, return_details=return_details)

    # The runner is built here, in the calling thread, as when models were
    # loaded whole: a lazily loaded network (load_model(..., network='lazy'))
    # would otherwise start TensorFlow in the compute thread below.
    if getattr(model, 'has_network', False):
        get_runner(model, precision)
    # The network of one step overlaps the input cube of the next and the
    # corrections and refits of the one before.
    parts = overlapped([slice(start, start + step) for start in range(0, len(stamps), step)],
                       prepare, network, finish, overlap=_OVERLAP and cpu_share() >= 2)
    images = np.concatenate([part[0] for part in parts])
    if unit is not None:
        images = images * unit
    if not return_details:
        return images
    details = {key: np.concatenate([part[1][key] for part in parts]) for key in parts[0][1]}
    details.update(outside_training=outside, precision=resolved_precision)
    if target_kernels is not None:
        details['target_psf'] = target_kernels
    if unit is not None:
        details = {key: value * unit if key in _FLUX_DETAILS else value
                   for key, value in details.items()}
    return images, details


#: Most objects per step of `deconvolve_stamps`, whose network runs on one
#: step while the caller's thread makes the next step's input cube and refits
#: the step before. Small steps leave little work unoverlapped at the start
#: and end of a call, and keep each step's FFT buffers in the CPU's caches.
#: On 2 cores (AMD EPYC Zen 4), 512 stamps, one view in bfloat16, steps of 16
#: to 64 ran at about the same speed, 128 slower (:doc:`/benchmarks`).
_PIPELINE_STEP = 32

#: Whether `deconvolve_stamps` overlaps its steps (with two CPUs or more).
_OVERLAP = True


def _finish_stamps(output, stamps32, psfs, psf_transforms, noise_sigma, card, target_kernels,
                   *, target_update, return_details):
    """`deconvolve_stamps` after the network, for one step: the images and
    the details that are per object."""
    output = remove_output_floor(output, card.get('output_floor'))
    output = _correct_output(output, stamps32, psfs, noise_sigma, card, psf_transforms)
    fit = refit_images(output, stamps32, psfs, noise_sigma, psf_transforms=psf_transforms,
                       return_reconvolved=return_details)
    images = fit.pop('images')
    reconvolved = fit.pop('reconvolved', None)
    flux_corrected = correct_flux_bias(fit['flux'], fit['flux_err'], card.get('flux_bias'))
    if return_details:
        # Before the detection gate empties the images of faint stamps.
        flux_residual, flux_residual_err, _ = residual_flux(
            images, stamps32, psfs, flux_corrected, fit['flux_err'], fit['noise_sigma'],
            reconvolved=reconvolved)
        del reconvolved
    detected = apply_detection(images, fit['detection_snr'], card.get('detection'))
    shear = None
    if return_details and card.get('shear_response'):
        from .shear_response import apply_shear_response

        # Measured on the pixel-grid images the response was fitted on,
        # before any target PSF.
        shear = apply_shear_response(images, psfs, fit['flux'], fit['flux_err'],
                                     card['shear_response'])
    if target_kernels is not None and target_update:
        images = residual_update(images, stamps32, psfs, target_kernels,
                                 fit['noise_sigma'])
    elif target_kernels is not None:
        images = convolve_to_target(images, target_kernels)
    if not return_details:
        return images, None
    details = {
        **fit,
        'flux_corrected': flux_corrected,
        'flux_residual': flux_residual,
        'flux_residual_err': flux_residual_err,
        'network_output': output,
        'detected': detected,
    }
    if shear is not None:
        details.update(shear)
    return images, details


def psf_fwhm(psfs, pixel_scale):
    """FWHM of PSF images in arcsec (`galsim.Image.calculateFWHM`).

    Each PSF is first averaged over the eight symmetries of the square about
    its centre pixel (`~psfdeconv.transforms.square_symmetry`), which makes
    an elliptical PSF round with the mean of its axes' half-maximum radii;
    GalSim then takes the radius at which the pixel values, sorted by their
    distance from the centre, fall below half the peak, interpolated
    between pixels. Unlike a count of the pixels above half the peak, this
    resolves sub-pixel differences (2.0, 2.3 and 2.6 pixels). It measures
    the pixelated image, so a PSF only a few pixels wide comes out broader
    than its intrinsic profile by up to a quarter of a pixel.

    Parameters
    ----------
    psfs : array-like
        Shape (..., py, px), odd sizes, centred.
    pixel_scale : float or array-like
        arcsec/pixel, broadcastable to ``psfs.shape[:-2]``.

    Returns
    -------
    `~numpy.ndarray`
        Shape ``psfs.shape[:-2]``, arcsec.

    Examples
    --------
    >>> import galsim
    >>> from psfdeconv.deconvolve import psf_fwhm
    >>> image = galsim.Moffat(beta=3, fwhm=0.8).drawImage(nx=41, ny=41, scale=0.1)
    >>> print(f'{psf_fwhm(image.array, 0.1):.1f}')
    0.8
    """
    psfs = np.asarray(psfs, dtype=np.float64)
    py, px = psfs.shape[-2:]
    side = max(py, px)
    pad = [(0, 0)] * (psfs.ndim - 2) + [((side - py) // 2,) * 2, ((side - px) // 2,) * 2]
    square = np.pad(psfs, pad)
    # The views added in turn, as np.mean of their stack adds them, without
    # that stack (eight copies of the PSFs).
    round_psfs = square.copy()
    for transform in range(1, 8):
        round_psfs += square_symmetry(square, transform)
    round_psfs /= 8
    return _half_maximum_width(round_psfs) * np.asarray(pixel_scale, dtype=np.float64)


def _half_maximum_width(images):
    """`galsim.Image.calculateFWHM` (pixel units) of each square image of a
    stack, vectorised: twice the radius at which the pixel values, sorted by
    their distance from the centre, fall below half the peak, interpolated
    linearly in r**2 between the means of the pixels at tied radii."""
    n = images.shape[-1]
    flat = images.reshape(-1, n * n)
    # GalSim's pixel centres 1..n about its true centre (n + 1) / 2.
    offsets = np.arange(1, n + 1, dtype=float) - (n + 1) / 2
    rsq = (offsets[None, :] ** 2 + offsets[:, None] ** 2).ravel()
    order = np.argsort(rsq)
    rsq = rsq[order]
    peak = np.maximum(flat.max(axis=1), 0.0)
    # The half maximum is usually among the innermost pixels: those first, the
    # whole image only for the images that do not fall to it there.
    inner = min(len(order), 256)
    result = _half_maximum_rsq(flat[:, order[:inner]], rsq[:inner], peak,
                               complete=inner == len(order))
    wide = np.isnan(result)
    if wide.any():
        result[wide] = _half_maximum_rsq(flat[wide][:, order], rsq, peak[wide], complete=True)
    return (2.0 * np.sqrt(result)).reshape(images.shape[:-2])


def _half_maximum_rsq(data, rsq, peak, *, complete):
    """r**2 at half maximum of the rows of ``data`` (pixels sorted by ``rsq``);
    NaN where no pixel falls below half the peak, unless the rows are
    ``complete`` images (GalSim's rule for that case then applies)."""
    below = data < 0.5 * peak[:, None]
    k = np.argmax(below, axis=1)
    cumulative = np.concatenate([np.zeros((len(data), 1)), np.cumsum(data, axis=1)], axis=1)
    rows = np.arange(len(data))
    # GalSim's means: data[k:k2] (k to the end of its tie) and data[k1:k] (the
    # tie of the pixel before k).
    k2 = np.searchsorted(rsq, rsq[k], side='right')
    ik = (cumulative[rows, k2] - cumulative[rows, k]) / (k2 - k) / peak
    before = np.maximum(k - 1, 0)
    k1 = np.searchsorted(rsq, rsq[before], side='left')
    with np.errstate(divide='ignore', invalid='ignore'):
        ikm1 = (cumulative[rows, k] - cumulative[rows, k1]) / (k - k1) / peak
        between = (rsq[before] * (ik - 0.5) + rsq[k] * (0.5 - ikm1)) / (ik - ikm1)
        result = np.where(k == 0, rsq[0] * (0.5 / ik), between)
    return result if complete else np.where(below.any(axis=1), result, np.nan)


def outside_training_range(model, pixel_scale, psfs=None):
    """Which stamps lie outside the model's training range.

    Parameters
    ----------
    model : `~psfdeconv.model.DeconvolutionModel`
        Its card gives the ranges of the pixel scale and of the PSF FWHM
        (`~psfdeconv.model.training_ranges`).
    pixel_scale : array-like
        arcsec/pixel, shape (n,).
    psfs : array-like, optional
        PSF images (n, n_bands, py, px); their FWHM (`psf_fwhm`) is checked
        too, with a leeway for the error of the estimate (15 %, or a pixel
        for PSFs only a few pixels wide).

    Returns
    -------
    outside : `~numpy.ndarray` of bool
        Shape (n,).
    reasons : list of str
        One sentence per range that is left, naming a value and the range.
    """
    from .model import training_ranges

    pixel_scale_range, fwhm_range = training_ranges(model.card)
    pixel_scale = np.atleast_1d(np.asarray(pixel_scale, dtype=np.float64))
    outside = np.zeros(pixel_scale.shape, dtype=bool)
    reasons = []
    low, high = pixel_scale_range or (None, None)
    if low is not None:
        bad = (pixel_scale < low) | (pixel_scale > high)
        if bad.any():
            outside |= bad
            reasons.append(f'{int(bad.sum())} stamp(s) have pixel scales outside '
                           f'the trained range [{low}, {high}] arcsec/pixel (e.g. '
                           f'{pixel_scale[bad][0]:.3f})')
    low, high = fwhm_range or (None, None)
    if low is not None and psfs is not None:
        scale = pixel_scale[:, None]
        fwhm = psf_fwhm(psfs, scale)
        # The leeway covers the pixelisation of the estimate (up to a
        # quarter of a pixel) and the PSF's centring.
        bad_band = ((fwhm < low - np.maximum(0.15 * low, scale)) |
                    (fwhm > high + np.maximum(0.15 * high, scale)))
        bad = bad_band.any(axis=1)
        if bad.any():
            outside |= bad
            reasons.append(f'{int(bad.sum())} stamp(s) have PSFs with FWHM outside '
                           f'the trained range [{low}, {high}] arcsec (e.g. '
                           f'{fwhm[bad_band][0]:.2f})')
    return outside, reasons


def check_training_range(model, pixel_scale, psfs, *, strict):
    """`outside_training_range`, raised as a
    `~psfdeconv.exceptions.PixelScaleError` with ``strict``, else warned as an
    `~psfdeconv.exceptions.OutsideTrainingRangeWarning` (``strict=None``:
    neither); returns the (n,) bool array of stamps outside."""
    import warnings

    from .exceptions import OutsideTrainingRangeWarning

    outside, reasons = outside_training_range(model, pixel_scale, psfs)
    if strict is None:
        return outside
    if reasons and strict:
        raise PixelScaleError('; '.join(reasons) + '. Use a model trained on '
                              'such data (psfdeconv train), or drop strict '
                              '(--strict) to deconvolve them with a warning and '
                              'a flag.')
    if reasons:
        warnings.warn('; '.join(reasons) + '; results there are extrapolations.',
                      OutsideTrainingRangeWarning, stacklevel=3)
    return outside
