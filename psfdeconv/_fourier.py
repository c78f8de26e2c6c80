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

The transforms keep the precision of their inputs: float32 images give
complex64 transforms (half the memory and time of complex128). Only the
image's own rows are transformed along x (the padding rows are zero) and
only the rows kept by the crop are transformed back, which saves about a
third of each 2-D transform on stamps padded by a large PSF. The
transforms run in `~psfdeconv._cpus.cpu_share` threads: scipy's
``workers=-1`` counts every CPU of the machine, also those a batch worker
process leaves to the others.
"""

import numpy as np
import scipy.fft

from ._cpus import cpu_share

__all__ = []


def padded_shape(image_shape, kernel_shape):
    """Fast FFT grid holding a linear convolution of the two shapes."""
    return tuple(scipy.fft.next_fast_len(int(n + k - 1), real=True)
                 for n, k in zip(image_shape, kernel_shape, strict=True))


def image_fft(images, fft_shape):
    """Real FFT of zero-padded images, shape ``(..., fy, fx // 2 + 1)``."""
    # x first on the ny image rows, then y zero-padded to fy: the same
    # operations as rfft2 on the padded array, without the zero rows' work.
    workers = cpu_share()
    rows = scipy.fft.rfft(images, n=fft_shape[1], axis=-1, workers=workers)
    return scipy.fft.fft(rows, n=fft_shape[0], axis=-2, workers=workers, overwrite_x=True)


def kernel_fft(kernels, fft_shape):
    """Real FFT of centred odd kernels placed with their centre at index 0.

    Placing the centre at the origin (the equivalent of ``ifftshift``)
    makes the product with `image_fft` a convolution that does not move
    the image.
    """
    ky, kx = kernels.shape[-2:]
    fy, fx = fft_shape
    cy, cx = ky // 2, kx // 2
    # The halves around the centre go to both ends of each axis: the same as
    # placing the kernel at [:ky, :kx] and rolling it by its centre. Along x
    # only the ky kernel rows are transformed; their transforms then go to
    # the first and last rows of the y axis.
    rows = np.zeros(kernels.shape[:-2] + (ky, fx),
                    dtype=np.result_type(kernels.dtype, np.float32))
    rows[..., :kx - cx] = kernels[..., cx:]
    rows[..., fx - cx:] = kernels[..., :cx]
    workers = cpu_share()
    rows = scipy.fft.rfft(rows, axis=-1, workers=workers)
    padded = np.zeros(kernels.shape[:-2] + (fy, rows.shape[-1]), dtype=rows.dtype)
    padded[..., :ky - cy, :] = rows[..., cy:, :]
    padded[..., fy - cy:, :] = rows[..., :cy, :]
    return scipy.fft.fft(padded, axis=-2, workers=workers, overwrite_x=True)


def inverse_fft(transform, fft_shape, image_shape):
    """Inverse of `image_fft`, cropped to the original image shape; may
    overwrite ``transform`` (callers pass temporaries)."""
    # y first, then x on the kept rows only (as irfft2, less the cropped rows).
    workers = cpu_share()
    columns = scipy.fft.ifft(transform, axis=-2, workers=workers,
                             overwrite_x=True)[..., :image_shape[0], :]
    out = scipy.fft.irfft(columns, n=fft_shape[1], axis=-1, workers=workers)
    return out[..., :image_shape[1]]


def squared_magnitude(transform):
    """``|transform|**2`` of complex values in their real precision (re^2 +
    im^2: ``abs()**2`` would take a square root and square it)."""
    power = np.square(transform.real)
    power += np.square(transform.imag)
    return power


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
    # One-off transforms, in the precision of the inputs.
    dtype = np.result_type(images.dtype, kernels.dtype, np.float32)
    return KernelTransforms(kernels, images.shape[-2:], dtype=dtype).convolve(images)


class KernelTransforms:
    """Transforms of a stack of kernels on the FFT grid of an image shape,
    computed once and shared by every convolution with the same kernels
    (the input channels and both amplitude refits of
    `~psfdeconv.deconvolve.deconvolve_stamps`).

    Parameters
    ----------
    kernels : `~numpy.ndarray`
        Centred odd kernels, shape ``(..., ky, kx)``.
    image_shape : tuple of int
        ``(ny, nx)`` of the images they will convolve.
    dtype : dtype, optional
        Real precision of the transforms (float32: complex64 transforms).
    """

    def __init__(self, kernels, image_shape, dtype=np.float32):
        kernels = np.asarray(kernels)
        self.image_shape = tuple(image_shape)
        self.kernel_shape = kernels.shape[-2:]
        self.fft_shape = padded_shape(self.image_shape, self.kernel_shape)
        self.transform = kernel_fft(kernels.astype(dtype, copy=False), self.fft_shape)

    @property
    def dtype(self):
        """The real dtype of images convolved with these transforms."""
        return self.transform.real.dtype

    def __getitem__(self, index):
        """The transforms of ``kernels[index]`` (a view, no new FFT)."""
        part = object.__new__(KernelTransforms)
        part.__dict__.update(self.__dict__, transform=self.transform[index])
        return part

    def convolve(self, images):
        """``convolve_same(images, kernels)``, in the transforms' precision."""
        images = np.asarray(images, dtype=self.dtype)
        transform = image_fft(images, self.fft_shape)
        if np.broadcast_shapes(transform.shape, self.transform.shape) == transform.shape:
            transform *= self.transform
        else:
            transform = transform * self.transform
        return inverse_fft(transform, self.fft_shape, self.image_shape)


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
