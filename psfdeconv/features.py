# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The network's input channels: PSF, iPSF and iPSF1 (paper section III.1).

For an observed stamp N and its PSF P, per band:

* ``'psf'``: the matched filter, :math:`C_{PSF} = N \\ast P`;
* ``'ipsf'``: the (regularised) inverse filter,
  :math:`C_{iPSF} = N \\ast P^{-1}`;
* ``'ipsf1'``: the inverse filter followed by a Gaussian of standard
  deviation 1 arcsec, :math:`C_{iPSF1} = N \\ast (P^{-1} \\ast G)`, i.e. the
  stamp matched to a Gaussian PSF of sigma 1 arcsec.

The inverse is the Tikhonov form used by photutils'
`~photutils.psf_matching.make_wiener_kernel` without a penalty,

.. math::

    \\widehat{P^{-1}} = \\frac{\\hat{P}^*}{|\\hat{P}|^2 + \\epsilon},
    \\qquad \\epsilon = r \\max |\\hat{P}|^2 ,

with the regularisation ``r`` explicit (``regularization`` for iPSF,
``regularization_ipsf1`` for iPSF1, where the Gaussian already damps the
high frequencies). Everything is vectorised over objects and bands with
zero-padded FFTs, so a whole batch costs a few FFTs.
"""

import numpy as np

from ._fourier import gaussian_fft, image_fft, inverse_fft, squared_magnitude

__all__ = ['KINDS', 'check_kinds', 'make_channels', 'make_cube', 'cube_scale',
           'inverse_filter_fft']

#: The three kinds of input channel, in the order they are stacked.
KINDS = ('psf', 'ipsf', 'ipsf1')

#: Default Tikhonov regularisation of the iPSF channel (paper-spec 8, #6).
DEFAULT_REGULARIZATION = 1e-3
#: Default regularisation of the iPSF1 channel.
DEFAULT_REGULARIZATION_IPSF1 = 1e-6
#: Standard deviation of the iPSF1 Gaussian, arcsec (paper section III.1).
DEFAULT_GAUSSIAN_SIGMA_ARCSEC = 1.0


#: The regularisation options of `make_channels` and their defaults.
_CHANNEL_DEFAULTS = {'regularization': DEFAULT_REGULARIZATION,
                     'regularization_ipsf1': DEFAULT_REGULARIZATION_IPSF1,
                     'gaussian_sigma': DEFAULT_GAUSSIAN_SIGMA_ARCSEC}


def check_kinds(kinds):
    """The kinds of input channels in the canonical order of `KINDS`; a
    `~psfdeconv.exceptions.ConfigError` unless they are distinct members of it."""
    from .exceptions import ConfigError

    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(f'kinds must be distinct values among {KINDS}, '
                          f'got {kinds}.')
    # Stack in the canonical order whatever the order asked for.
    return tuple(k for k in KINDS if k in kinds)


def _inverse_weight(psf_fft, regularization, power=None):
    """The real factor :math:`1 / (|\\hat{P}|^2 + \\epsilon)` of the inverse
    filter, in the precision of ``psf_fft``; ``power`` (:math:`|\\hat{P}|^2`),
    when given, is not changed."""
    if power is None:
        weight = squared_magnitude(psf_fft)
    else:
        weight = power.copy()
    weight += regularization * weight.max(axis=(-2, -1), keepdims=True)
    return np.reciprocal(weight, out=weight)


def _scale_complex(values, weight, out=None):
    """``values * weight`` (complex times a broadcastable real array) into
    ``out`` (``values`` itself if None)."""
    # numpy multiplies by the real weight as by ``weight + 0j``: the same
    # values as scaling the real and imaginary parts, and several times
    # faster than a (..., 2) view of them, whose inner loop has length 2.
    return np.multiply(values, weight, out=values if out is None else out)


def inverse_filter_fft(psf_fft, regularization):
    """Tikhonov-regularised inverse of PSF transforms.

    Parameters
    ----------
    psf_fft : `~numpy.ndarray`
        Complex transforms of unit-sum PSFs, shape ``(..., fy, fx)``.
    regularization : float
        ``r`` in :math:`\\epsilon = r \\max|\\hat{P}|^2` (per PSF).

    Returns
    -------
    `~numpy.ndarray`
        :math:`\\hat{P}^* / (|\\hat{P}|^2 + \\epsilon)`, same shape and
        precision.
    """
    return _scale_complex(np.conj(psf_fft), _inverse_weight(psf_fft, regularization))


def _channel_planes(stamps, psfs, *, pixel_scale, kinds, regularization,
                    regularization_ipsf1, gaussian_sigma, psf_transforms):
    """Yield ``(k, channel)`` for each kind: the channel's images (n,
    n_bands, ny, nx) in float32 (float64 for float64 stamps), computed one
    kind at a time to bound the complex temporaries."""
    from ._fourier import KernelTransforms

    dtype = stamps.dtype
    image_shape = stamps.shape[-2:]
    if psf_transforms is None:
        psf_transforms = KernelTransforms(psfs, image_shape, dtype=dtype)
    fft_shape = psf_transforms.fft_shape
    psf_fft = psf_transforms.transform
    stamp_fft = image_fft(stamps, fft_shape)
    # N P* and |P|^2 are shared by the iPSF and iPSF1 channels, which only
    # weight N P*.
    inverse = power = None
    if {'ipsf', 'ipsf1'} & set(kinds):
        inverse = stamp_fft * np.conj(psf_fft)
        power = squared_magnitude(psf_fft)
    for k, kind in enumerate(kinds):
        if kind == 'psf':
            spectrum = stamp_fft * psf_fft
        elif kind == 'ipsf':
            spectrum = _scale_complex(inverse, _inverse_weight(psf_fft, regularization, power),
                                      out=np.empty_like(inverse) if 'ipsf1' in kinds else None)
        else:
            weight = _inverse_weight(psf_fft, regularization_ipsf1, power) * _gaussians(
                fft_shape, gaussian_sigma, pixel_scale, stamps.shape[0], stamp_fft.real.dtype
            )[:, None]
            spectrum = _scale_complex(inverse, weight)
        yield k, inverse_fft(spectrum, fft_shape, image_shape)


def _gaussians(fft_shape, gaussian_sigma, pixel_scale, n, dtype):
    """`gaussian_fft` of sigma ``gaussian_sigma / pixel_scale`` pixels per
    object (n, fy, fx // 2 + 1), each distinct scale computed once."""
    scale = np.broadcast_to(np.asarray(pixel_scale, dtype=float), (n,))
    unique, index = np.unique(scale, return_inverse=True)
    return gaussian_fft(fft_shape, gaussian_sigma / unique).astype(dtype)[index]


def make_channels(stamps, psfs, *, pixel_scale, kinds=KINDS,
                  regularization=DEFAULT_REGULARIZATION,
                  regularization_ipsf1=DEFAULT_REGULARIZATION_IPSF1,
                  gaussian_sigma=DEFAULT_GAUSSIAN_SIGMA_ARCSEC, psf_transforms=None):
    """Filter stamps with their PSFs into the PSF/iPSF/iPSF1 channels.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        Observed images, shape (n, n_bands, ny, nx), in any flux unit.
        float32 stamps (or any other type but float64) are filtered in
        float32, float64 stamps in float64.
    psfs : `~numpy.ndarray`
        Unit-sum, odd-sized, centred PSFs, shape (n, n_bands, py, px).
    pixel_scale : float or `~numpy.ndarray`
        Pixel scale in arcsec/pixel, scalar or shape (n,); converts the
        iPSF1 Gaussian's sigma to pixels.
    kinds : sequence of str, optional
        Any non-empty subset of ``('psf', 'ipsf', 'ipsf1')`` (the paper's
        seven configurations); stacked in that canonical order.
    regularization, regularization_ipsf1 : float, optional
        Tikhonov regularisation of the inverse for iPSF and iPSF1.
    gaussian_sigma : float, optional
        Standard deviation of the iPSF1 Gaussian in arcsec.
    psf_transforms : `~psfdeconv._fourier.KernelTransforms`, optional
        The transforms of ``psfs`` on the stamps' FFT grid, when the caller
        has them already (they then replace ``psfs``).

    Returns
    -------
    `~numpy.ndarray`
        Shape (n, n_kinds, n_bands, ny, nx), float32, in the stamps' units.

    Examples
    --------
    A delta-function PSF leaves a stamp unchanged in the PSF channel:

    >>> import numpy as np
    >>> from psfdeconv.features import make_channels
    >>> stamps = np.random.default_rng(0).normal(size=(2, 3, 16, 16))
    >>> psfs = np.zeros((2, 3, 5, 5)); psfs[..., 2, 2] = 1.0
    >>> channels = make_channels(stamps, psfs, pixel_scale=0.2)
    >>> channels.shape
    (2, 3, 3, 16, 16)
    >>> bool(np.allclose(channels[:, 0], stamps, atol=1e-5))
    True
    """
    kinds = check_kinds(kinds)
    stamps = _real_array(stamps)
    channels = np.empty((stamps.shape[0], len(kinds)) + stamps.shape[1:],
                        dtype=np.float32)
    for k, plane in _channel_planes(
            stamps, None if psf_transforms is not None else _real_array(psfs),
            pixel_scale=pixel_scale, kinds=kinds, regularization=regularization,
            regularization_ipsf1=regularization_ipsf1, gaussian_sigma=gaussian_sigma,
            psf_transforms=psf_transforms):
        channels[:, k] = plane
    return channels


def _real_array(values):
    """``values`` as a float32 array, or float64 if they are float64."""
    values = np.asarray(values)
    return values.astype(np.float64 if values.dtype == np.float64 else np.float32, copy=False)


def cube_scale(channels):
    """Per-object maximum-absolute scale of input channels.

    The paper scales each object by its maximum ("maximum value
    scaling", section III.1) over inputs and truth. The truth is unknown
    when the model is applied, so psfdeconv scales by the inputs alone, in
    training as at inference, which keeps the two consistent; the
    amplitude refit (`~psfdeconv.deconvolve.refit_amplitude`) restores the
    flux afterwards.

    Parameters
    ----------
    channels : `~numpy.ndarray`
        Shape (n, ...).

    Returns
    -------
    `~numpy.ndarray`
        Shape (n,), strictly positive (1 for an all-zero object).
    """
    flat = channels.reshape(channels.shape[0], -1)
    # max(|x|) as max(max, -min): no temporary |x| array.
    scale = np.maximum(flat.max(axis=1), -flat.min(axis=1)).astype(np.float64)
    return np.where(scale > 0, scale, 1.0)


def make_cube(stamps, psfs, *, pixel_scale, kinds=KINDS, **kwargs):
    """The scaled, channels-last input cube of the network.

    Parameters
    ----------
    stamps, psfs, pixel_scale, kinds
        As for `make_channels`.
    **kwargs
        Regularisation options of `make_channels` and its
        ``psf_transforms``.

    Returns
    -------
    cube : `~numpy.ndarray`
        Shape (n, ny, nx, n_kinds * n_bands), float32, in [-1, 1]; the
        channel order is kind-major: (kind0: band0, band1, ...), (kind1:
        ...), ...
    scale : `~numpy.ndarray`
        Shape (n,), the per-object factor the channels were divided by.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.features import make_cube
    >>> from psfdeconv.simulate import simulate_stamps
    >>> sims = simulate_stamps(2, seed=3)
    >>> cube, scale = make_cube(sims['observed'], sims['psf'],
    ...                         pixel_scale=sims['pixel_scale'])
    >>> cube.shape, float(np.abs(cube).max())
    ((2, 64, 64, 9), 1.0)
    """
    kinds = check_kinds(kinds)
    psf_transforms = kwargs.pop('psf_transforms', None)
    stamps = _real_array(stamps)
    n, n_bands, ny, nx = stamps.shape
    # Each channel goes straight to its place in the channels-last cube.
    cube = np.empty((n, ny, nx, len(kinds) * n_bands), dtype=np.float32)
    for k, plane in _channel_planes(
            stamps, None if psf_transforms is not None else _real_array(psfs),
            pixel_scale=pixel_scale, kinds=kinds, psf_transforms=psf_transforms,
            **{**_CHANNEL_DEFAULTS, **kwargs}):
        cube[..., k * n_bands:(k + 1) * n_bands] = np.moveaxis(plane, 1, -1)
    scale = cube_scale(cube)
    np.divide(cube, scale.astype(np.float32)[:, None, None, None], out=cube)
    return cube, scale
