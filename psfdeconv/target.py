# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Target PSFs: deconvolution to a small, well-sampled PSF.

The network returns its estimate of the pixel-integrated truth, which is not well posed
for galaxies smaller than a pixel or two: the observation cannot tell a compact galaxy
from a brighter point, and the output collapses to a spike on which adaptive moments
fail. Convolving the output with a target PSF smaller than the seeing (a round Gaussian
of a given FWHM, or a supplied image) asks only for what the data constrain: the galaxy
as a telescope with that PSF would see it. Shapes and sizes measured on such images are
compared with the truth convolved with the same target.

The functions here take per-stamp pixel scales in arcsec/pixel and return or apply
odd-sized, centred, unit-sum kernels, so that fluxes are kept.

At the target's resolution the observed stamps themselves carry information the network's
output may lack: `residual_update` adds the part of the refit's residuals that the data
constrain (a Wiener filter of the residuals with the network output as prior, pooling
the bands), which brings galaxies' shapes closer to what their noise allows.
"""

import numpy as np
from astropy import units as u
from scipy.special import erf

from ._fourier import (
    convolve_same,
    image_fft,
    inverse_fft,
    kernel_fft,
    padded_shape,
    squared_magnitude,
)
from ._validation import angle_arcsec, check_psfs, pixel_scale_arcsec
from .exceptions import InvalidInputError, InvalidPSFError

__all__ = ['gaussian_target_psfs', 'target_psf_images', 'convolve_to_target',
           'residual_update', 'PRIOR_FRACTION', 'BAND_COHERENCE']

#: Half-size of a Gaussian kernel in standard deviations.
_HALF_WIDTH_SIGMA = 4.0

#: Prior variance of the galaxy about the network's output at each spatial
#: frequency, as a fraction of the output's own power there (`residual_update`).
#: Chosen on 1,000 simulated objects of seed 5 (not the test set) through a
#: 0.5 arcsec target (``validation/target_update.py``): with the bands updated
#: independently, 0.3 gives the smallest HSM ellipticity errors at SNR 40-160
#: among 0.1, 0.2, 0.3, 0.5 and 1, and is within 2.5 % of the smallest
#: elsewhere; with ``BAND_COHERENCE`` 0.3 and 0.5 are within 3 % of each other.
PRIOR_FRACTION = 0.3

#: Share of the prior's variance that is the same relative error in every band
#: (`residual_update`). On the same simulation more is better (0.95 lowers the
#: errors above SNR 160 by a further 3 %), but its bands share one morphology by
#: construction; real galaxies' bands differ by colour gradients, and on the AEGIS
#: galaxies (:doc:`/validation`) 0.8 and 0.95 agree within 2 %.
BAND_COHERENCE = 0.8


def gaussian_target_psfs(fwhm, pixel_scale, *, max_size=None):
    """Pixel-integrated round Gaussians of one FWHM at each stamp's pixel scale.

    Parameters
    ----------
    fwhm : float or `~astropy.units.Quantity`
        FWHM of the Gaussian, arcsec (or an angle).
    pixel_scale : float or array-like
        arcsec/pixel, shape (n,) or scalar.
    max_size : int, optional
        Largest kernel side in pixels (odd); the kernels are cropped to it.

    Returns
    -------
    kernels : `~numpy.ndarray`
        Shape (n, k, k) (n = 1 for a scalar pixel scale), each summing to 1; the
        odd side k spans 4 standard deviations on either side at the smallest
        pixel scale (where the kernel is widest in pixels), or ``max_size``.

    Examples
    --------
    >>> import astropy.units as u
    >>> from psfdeconv.target import gaussian_target_psfs
    >>> kernels = gaussian_target_psfs(0.4 * u.arcsec, [0.2, 0.1])
    >>> kernels.shape, round(float(kernels[1].sum()), 6)
    ((2, 15, 15), 1.0)
    """
    fwhm = angle_arcsec(fwhm, 'target_psf')
    scale = np.atleast_1d(pixel_scale_arcsec(pixel_scale))
    if scale.ndim != 1:
        raise InvalidInputError(f'pixel_scale must be a scalar or have shape (n,), got '
                                f'{scale.shape}.')
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / scale
    half = int(np.ceil(_HALF_WIDTH_SIGMA * sigma.max()))
    if max_size is not None:
        half = min(half, (int(max_size) - 1) // 2)
    x = np.arange(-half, half + 1, dtype=np.float64)
    # Exact integrals of the Gaussian over each pixel.
    edges = (x[None, :] + 0.5) / (np.sqrt(2.0) * sigma[:, None])
    inner = (x[None, :] - 0.5) / (np.sqrt(2.0) * sigma[:, None])
    profile = 0.5 * (erf(edges) - erf(inner))
    kernels = profile[:, :, None] * profile[:, None, :]
    return kernels / kernels.sum(axis=(-2, -1), keepdims=True)


def target_psf_images(target_psf, pixel_scale, n, stamp_shape):
    """One unit-sum target kernel per stamp, from a FWHM or from images.

    Parameters
    ----------
    target_psf : float, `~astropy.units.Quantity` or array-like
        A FWHM (arcsec, or an angle) of a round Gaussian drawn at each stamp's pixel
        scale; or an image (py, px) used for every stamp; or images (n, py, px), one
        per stamp. Images must be odd-sized, centred, with a positive sum (they are
        normalised) and no larger than the stamps.
    pixel_scale : float or array-like
        arcsec/pixel, scalar or shape (n,).
    n : int
        Number of stamps.
    stamp_shape : tuple of int
        (ny, nx) of the stamps.

    Returns
    -------
    kernels : `~numpy.ndarray`
        Shape (n, py, px), float64, each summing to 1.
    """
    if isinstance(target_psf, u.Quantity) or np.ndim(target_psf) == 0:
        scale = np.broadcast_to(np.asarray(pixel_scale, dtype=np.float64), (n,))
        return gaussian_target_psfs(target_psf, scale, max_size=min(stamp_shape))
    kernels = np.asarray(target_psf, dtype=np.float64)
    if kernels.ndim == 2:
        kernels = np.broadcast_to(kernels, (n,) + kernels.shape)
    if kernels.ndim != 3 or kernels.shape[0] != n:
        raise InvalidPSFError(f'target_psf images must have shape (py, px) or ({n}, py, '
                              f'px), got {np.shape(target_psf)}.')
    if not np.all(np.isfinite(kernels)):
        raise InvalidPSFError('target_psf images have NaN or inf pixels; give finite '
                              'images.')
    return check_psfs(kernels, stamp_shape, name='target_psf')


def convolve_to_target(images, kernels):
    """Convolve each stamp's band images with its target kernel.

    Parameters
    ----------
    images : array-like
        Shape (n, n_bands, ny, nx).
    kernels : array-like
        Shape (n, py, px), unit sum (`target_psf_images`).

    Returns
    -------
    `~numpy.ndarray`
        Shape (n, n_bands, ny, nx): the light that stays on the stamp keeps its flux.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.target import convolve_to_target, gaussian_target_psfs
    >>> point = np.zeros((1, 1, 32, 32))
    >>> point[0, 0, 16, 16] = 100.0
    >>> wide = convolve_to_target(point, gaussian_target_psfs(0.5, 0.1))
    >>> print(f'{wide.sum():.2f} {wide.max() < 10}')
    100.00 True
    """
    images = np.asarray(images, dtype=np.float64)
    kernels = np.asarray(kernels, dtype=np.float64)
    return convolve_same(images, kernels[:, None])


def residual_update(images, stamps, psfs, kernels, noise_sigma, *,
                    prior_fraction=PRIOR_FRACTION, band_coherence=BAND_COHERENCE):
    """Deconvolved images at a target's resolution, updated with the data.

    The network's output ``O`` is taken as the mean of a Gaussian prior on
    the galaxy. At each spatial frequency ``k`` its covariance over the bands
    is ``prior_fraction`` times ``(1 - c) diag(|O_b|**2) + c O O^H`` with
    ``c = band_coherence``: an error of the output is mostly the same
    relative error in every band (a galaxy's structure is shared by its
    bands), the rest independent. The observed stamps ``N_b = P_b X_b + n_b``
    (white noise of ``noise_sigma``) update it by the Wiener filter of the
    refit's residuals ``R_b = N_b - P_b O_b``, and the result is convolved
    with the target ``T``::

        T (O + S P^H (P S P^H + sigma^2 n_pix)^-1 R)

    (``S`` the prior covariance, ``P`` the diagonal of the bands' PSF
    transforms), in closed form per frequency (a diagonal plus a rank-one
    matrix). With one band it is ``T (O + P^* S / (|P|^2 S + sigma^2 n_pix) R)``,
    ``S = prior_fraction |O|**2``. Where the PSFs pass a galaxy's structure
    and the noise is low, the data correct the network, pooling the bands;
    where the PSFs remove it or the noise dominates, the output is the
    network's. The update moves light without adding any: its sum is
    removed in proportion to the target-convolved output, so each image's
    sum is that of `convolve_to_target` (the refit's flux, less what the
    target spreads beyond the stamp). The output is not clipped at 0: the
    residual's noise can make faint wings negative. The transforms are in
    single precision (images agree with double precision to a few 1e-7 of
    their peak).

    Parameters
    ----------
    images : `~numpy.ndarray`
        Refitted network outputs (n, n_bands, ny, nx), in the stamps' units.
    stamps : `~numpy.ndarray`
        The observed stamps (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        Unit-sum, odd-sized, centred PSFs (n, n_bands, py, px).
    kernels : `~numpy.ndarray`
        Unit-sum target kernels (n, ty, tx) (`target_psf_images`).
    noise_sigma : array-like
        Per-pixel noise of the stamps, broadcastable to (n, n_bands).
    prior_fraction : float, optional
        The prior's variance over ``|O|**2``: larger trusts the data more.
    band_coherence : float, optional
        ``c`` above, in [0, 1): 0 updates each band from its own stamp.

    Returns
    -------
    `~numpy.ndarray`
        (n, n_bands, ny, nx), float64.

    Examples
    --------
    A network output with the right shape and flux but 20 % too small is
    pulled towards the truth by a bright observation:

    >>> import numpy as np
    >>> from psfdeconv._fourier import convolve_same
    >>> from psfdeconv.measure import hsm_moments
    >>> from psfdeconv.target import (convolve_to_target, gaussian_target_psfs,
    ...                               residual_update)
    >>> y, x = np.mgrid[:64, :64] - 32.0
    >>> def galaxy(sigma):
    ...     image = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    ...     return (1e4 * image / image.sum())[None, None]
    >>> psf = galaxy(2.5)[..., 20:45, 20:45]
    >>> psf = psf / psf.sum()
    >>> truth, output = galaxy(3.0), galaxy(2.4)
    >>> observed = convolve_same(truth, psf) + np.random.default_rng(1).normal(0, 0.1, truth.shape)
    >>> target = gaussian_target_psfs(0.4, 0.2)
    >>> updated = residual_update(output, observed, psf, target, 0.1)
    >>> size = lambda image: float(hsm_moments(image)['hsm_sigma'][0, 0])
    >>> print(f'{size(convolve_to_target(truth, target)):.2f} '
    ...       f'{size(convolve_to_target(output, target)):.2f} {size(updated):.2f}')
    3.13 2.56 3.12
    >>> print(f'{updated.sum():.1f}')
    10000.0
    """
    if not 0 <= band_coherence < 1:
        raise InvalidInputError(f'band_coherence must be in [0, 1), got {band_coherence}.')
    if not 0 < prior_fraction < np.inf:
        raise InvalidInputError(f'prior_fraction must be positive and finite, got '
                                f'{prior_fraction}; use convolve_to_target for no update.')
    images = np.asarray(images, dtype=np.float64)
    stamps = np.asarray(stamps, dtype=np.float64)
    psfs = np.asarray(psfs, dtype=np.float64)
    kernels = np.asarray(kernels, dtype=np.float64)
    noise = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), images.shape[:2])
    out = np.empty(images.shape)
    # Chunks bound the complex temporaries (a few per stamp and band).
    for start in range(0, len(images), _UPDATE_CHUNK):
        part = slice(start, start + _UPDATE_CHUNK)
        out[part] = _residual_update(images[part], stamps[part], psfs[part], kernels[part],
                                     noise[part], prior_fraction, band_coherence)
    return out


#: Stamps per chunk of `residual_update`.
_UPDATE_CHUNK = 128


def _residual_update(images, stamps, psfs, kernels, noise, prior_fraction, coherence):
    """`residual_update` of one chunk of stamps, in float32 (noise (n, n_bands))."""
    image_shape = images.shape[-2:]
    # One grid for both kernels: linear convolutions, no wrap-around.
    fft_shape = padded_shape(image_shape, np.maximum(psfs.shape[-2:], kernels.shape[-2:]))
    psf_fft = kernel_fft(psfs.astype(np.float32), fft_shape)
    output_fft = image_fft(images.astype(np.float32), fft_shape)
    residual = image_fft(stamps.astype(np.float32), fft_shape)
    reconvolved = psf_fft * output_fft
    residual -= reconvolved
    output_power = squared_magnitude(output_fft)
    # |P|^2 |O|^2, shared by the diagonal and the rank-one term's norm.
    signal = squared_magnitude(psf_fft)
    signal *= output_power
    # The observation's covariance P S P^H + D per frequency: a diagonal over
    # the bands plus the rank-one u u^H (u = sqrt(a c) P O), inverted by
    # Sherman-Morrison.
    inverse = signal * np.float32(prior_fraction * (1 - coherence))
    inverse += (noise**2 * image_shape[0] * image_shape[1]).astype(np.float32)[..., None, None]
    np.divide(1.0, inverse, out=inverse, where=inverse > 0)
    residual *= inverse  # D'^-1 R, then A^-1 R below
    projection = np.sum(np.conj(reconvolved) * residual, axis=1, keepdims=True)
    projection *= np.float32(np.sqrt(prior_fraction * coherence))
    signal *= inverse
    projection /= 1 + np.float32(prior_fraction * coherence) * signal.sum(axis=1, keepdims=True)
    projection *= np.float32(np.sqrt(prior_fraction * coherence))
    reconvolved *= inverse
    reconvolved *= projection
    residual -= reconvolved
    # S P^H applied to it: the update of the galaxy's transform.
    residual *= np.conj(psf_fft)
    shared = np.sum(np.conj(output_fft) * residual, axis=1, keepdims=True)
    residual *= output_power * np.float32(prior_fraction * (1 - coherence))
    residual += np.float32(prior_fraction * coherence) * output_fft * shared
    target_fft = kernel_fft(kernels.astype(np.float32), fft_shape)[:, None]
    residual *= target_fft
    output_fft *= target_fft
    update = inverse_fft(residual, fft_shape, image_shape).astype(np.float64)
    convolved = inverse_fft(output_fft, fft_shape, image_shape).astype(np.float64)
    # No net flux from the residual (its noise included): the refit sets it.
    total = convolved.sum(axis=(-2, -1), keepdims=True)
    share = np.divide(convolved, total, out=np.zeros_like(convolved), where=total != 0)
    return convolved + update - update.sum(axis=(-2, -1), keepdims=True) * share
