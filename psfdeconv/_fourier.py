# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Batched FFT helpers shared by the simulation, the input channels and the
amplitude refit.

All functions work on stacks of images of shape ``(..., ny, nx)`` and of
odd-sized, centred kernels of shape ``(..., ky, kx)`` whose leading axes
broadcast against the images. Convolutions are linear (not circular): the
images are zero-padded to a grid at least ``ny + ky - 1`` wide, rounded up
to a fast FFT size, and the result is cropped back to ``(ny, nx)`` ("same"
mode, the kernel centre at pixel ``ky // 2``).
"""

import numpy as np
import scipy.fft

__all__ = []


def padded_shape(image_shape, kernel_shape):
    """Fast FFT grid holding a linear convolution of the two shapes."""
    return tuple(scipy.fft.next_fast_len(int(n + k - 1), real=True)
                 for n, k in zip(image_shape, kernel_shape, strict=True))


def image_fft(images, fft_shape):
    """Real FFT of zero-padded images, shape ``(..., fy, fx // 2 + 1)``."""
    return scipy.fft.rfft2(images, s=fft_shape, axes=(-2, -1), workers=-1)


def kernel_fft(kernels, fft_shape):
    """Real FFT of centred odd kernels placed with their centre at index 0.

    Placing the centre at the origin (the equivalent of ``ifftshift``)
    makes the product with `image_fft` a convolution that does not move
    the image.
    """
    ky, kx = kernels.shape[-2:]
    padded = np.zeros(kernels.shape[:-2] + tuple(fft_shape),
                      dtype=np.result_type(kernels.dtype, np.float32))
    # The four quadrants around the centre go to the four corners: the
    # same as placing the kernel at [:ky, :kx] and rolling it by its centre,
    # without the roll's copy of the whole padded stack.
    fy, fx = padded.shape[-2:]
    cy, cx = ky // 2, kx // 2
    padded[..., :ky - cy, :kx - cx] = kernels[..., cy:, cx:]
    padded[..., :ky - cy, fx - cx:] = kernels[..., cy:, :cx]
    padded[..., fy - cy:, :kx - cx] = kernels[..., :cy, cx:]
    padded[..., fy - cy:, fx - cx:] = kernels[..., :cy, :cx]
    return scipy.fft.rfft2(padded, axes=(-2, -1), workers=-1)


def inverse_fft(transform, fft_shape, image_shape):
    """Inverse of `image_fft`, cropped to the original image shape."""
    out = scipy.fft.irfft2(transform, s=fft_shape, axes=(-2, -1), workers=-1)
    return out[..., :image_shape[0], :image_shape[1]]


def convolve_same(images, kernels):
    """Linear convolution of images with centred odd kernels ("same" size).

    Parameters
    ----------
    images : `~numpy.ndarray`
        Shape ``(..., ny, nx)``.
    kernels : `~numpy.ndarray`
        Shape ``(..., ky, kx)``, odd sizes, broadcasting against `images`.

    Returns
    -------
    `~numpy.ndarray`
        Shape of the broadcast ``(..., ny, nx)``.
    """
    image_shape = images.shape[-2:]
    fft_shape = padded_shape(image_shape, kernels.shape[-2:])
    transform = image_fft(images, fft_shape) * kernel_fft(kernels, fft_shape)
    return inverse_fft(transform, fft_shape, image_shape)


def gaussian_fft(fft_shape, sigma_pixels):
    """Real FFT of unit-sum circular Gaussians of the given widths.

    Parameters
    ----------
    fft_shape : tuple of int
        The FFT grid ``(fy, fx)``.
    sigma_pixels : `~numpy.ndarray`
        Standard deviations in pixels, any shape ``S``.

    Returns
    -------
    `~numpy.ndarray`
        Shape ``S + (fy, fx // 2 + 1)``; the analytic transform
        ``exp(-2 pi^2 sigma^2 |k|^2)`` of a Gaussian centred at index 0.
    """
    ky = scipy.fft.fftfreq(fft_shape[0])[:, None]
    kx = scipy.fft.rfftfreq(fft_shape[1])[None, :]
    k2 = ky**2 + kx**2
    sigma = np.asarray(sigma_pixels, dtype=float)[..., None, None]
    return np.exp(-2.0 * np.pi**2 * sigma**2 * k2)
