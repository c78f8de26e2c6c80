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
"""

import numpy as np
from astropy import units as u
from scipy.special import erf

from ._fourier import convolve_same
from ._validation import angle_arcsec, check_psfs, pixel_scale_arcsec
from .exceptions import InvalidInputError, InvalidPSFError

__all__ = ['gaussian_target_psfs', 'target_psf_images', 'convolve_to_target']

#: Half-size of a Gaussian kernel in standard deviations.
_HALF_WIDTH_SIGMA = 4.0


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
