# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Classical deconvolution baselines: a Wiener filter and Richardson-Lucy, and
the predictions of every baseline on simulated stamps.

PSFs are odd-sized, centred arrays of shape ``(n, n_bands, py, px)``.
"""


import numpy as np

from .._fourier import kernel_fft
from .._validation import as_stamps_and_psfs
from ..exceptions import (
    ConfigError,
    ShapeMismatchError,
)

__all__ = ['BASELINES', 'wiener_deconvolve', 'richardson_lucy_deconvolve', 'baseline_predictions']


# Stamps per FFT block: bounds the memory of the padded transforms
# (~70 MB per complex array for 64x64 stamps).
_FFT_BLOCK = 512


# Richardson-Lucy works on stamps scaled to unit peak; the pedestal added
# after lifting the minimum to zero keeps every pixel strictly positive.
_RL_PEDESTAL = 1e-4


def _per_stamp(value, leading, name):
    value = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(value) & (value >= 0)):
        msg = f'{name} must be finite and >= 0, got {value.tolist()!r}.'
        raise ConfigError(msg)
    try:
        return np.broadcast_to(value, leading)
    except ValueError as exc:
        msg = (f'{name} of shape {value.shape} does not broadcast to the '
               f'stamps\' leading shape {leading}.')
        raise ShapeMismatchError(msg) from exc


def wiener_deconvolve(stamps, psfs, *, noise_sigma=None, balance=None):
    r"""Deconvolve stamps with a Fourier Wiener filter (a baseline).

    .. math::

        \hat T = \mathcal{F}^{-1}\left[\frac{P^*}{|P|^2 + K}
        \mathcal{F}(N)\right],

    with :math:`P` the PSF transform and :math:`K` the noise-to-signal
    power ratio, taken constant over frequency (a flat-spectrum Wiener,
    or Tikhonov, filter). The stamps are zero-padded to twice their size
    to avoid wrap-around and cropped back; where :math:`|P|^2 + K = 0`
    the filter is set to 0.

    With ``noise_sigma`` :math:`\sigma` the ratio is estimated per stamp
    from Parseval's theorem: white noise has power
    :math:`n_{\rm pix}\sigma^2` at every frequency and a flat signal
    spectrum has power :math:`\sum T^2`, estimated as
    :math:`\sum N^2 - n_{\rm pix}\sigma^2` (the observed power minus the
    noise), so :math:`K = n_{\rm pix}\sigma^2 / (\sum N^2 -
    n_{\rm pix}\sigma^2)`. The observed power is that of the convolved
    image, a lower bound of the true image's, so :math:`K` errs towards
    more regularisation; a stamp consistent with pure noise is capped at
    :math:`K = 10^3` (it is returned nearly zeroed). A flat :math:`K`
    also damps the zero frequency, so the total flux is multiplied by
    :math:`1 / (1 + K)`: the baseline is biased low at low SNR, as the
    Wiener filter should be.

    Parameters
    ----------
    stamps : array_like
        Observed images, shape ``(..., ny, nx)``, e.g.
        ``(n, n_bands, ny, nx)``, background-subtracted.
    psfs : array_like
        Odd-sized centred PSFs, shape ``(..., py, px)`` with ``py <= ny``,
        ``px <= nx`` and leading axes broadcasting to the stamps'. They
        are normalised to unit sum, so the flux units are kept.
    noise_sigma : float or array_like, optional
        Per-pixel noise standard deviation, broadcastable to the leading
        shape, in the units of the stamps (>= 0; 0 gives the plain
        inverse filter).
    balance : float or array_like, optional
        A fixed :math:`K` (>= 0), broadcastable to the leading shape; the
        ``balance`` of `skimage.restoration.wiener` with a unit
        regulariser. Give exactly one of ``noise_sigma`` and ``balance``.

    Returns
    -------
    deconvolved : `~numpy.ndarray`
        Shape of ``stamps``, same flux units.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        If neither or both of ``noise_sigma`` and ``balance`` are given,
        or one is negative or not finite.
    psfdeconv.exceptions.InvalidPSFError
        If a PSF has even dimensions, is larger than the stamp or has a
        non-positive sum.
    psfdeconv.exceptions.ShapeMismatchError
        If the PSFs do not match the stamps.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import wiener_deconvolve
    >>> stamp = np.zeros((1, 1, 16, 16)); stamp[0, 0, 8, 7] = 5.0
    >>> delta = np.zeros((1, 1, 3, 3)); delta[0, 0, 1, 1] = 1.0
    >>> out = wiener_deconvolve(stamp, delta, balance=0.0)
    >>> print(f'{out[0, 0, 8, 7]:.3f} {abs(out).sum():.3f}')
    5.000 5.000
    """
    if (noise_sigma is None) == (balance is None):
        msg = ('give exactly one of noise_sigma (K estimated per stamp) '
               'and balance (fixed K), got '
               f'noise_sigma={noise_sigma!r}, balance={balance!r}.')
        raise ConfigError(msg)
    stamps, psfs = as_stamps_and_psfs(stamps, psfs)
    leading = stamps.shape[:-2]
    ny, nx = stamps.shape[-2:]
    fft_shape = (2 * ny, 2 * nx)
    if balance is not None:
        k = _per_stamp(balance, leading, 'balance')
    else:
        sigma = _per_stamp(noise_sigma, leading, 'noise_sigma')
        noise_power = ny * nx * sigma**2
        signal_power = np.sum(stamps**2, axis=(-2, -1)) - noise_power
        with np.errstate(divide='ignore', invalid='ignore'):
            k = np.where(noise_power > 0,
                         np.minimum(noise_power / np.maximum(signal_power, 0.0), 1e3),
                         0.0)

    flat_stamps = stamps.reshape((-1, ny, nx))
    flat_psfs = np.broadcast_to(psfs, leading + psfs.shape[-2:]).reshape(
        (-1,) + psfs.shape[-2:])
    flat_k = np.asarray(k, dtype=float).reshape(-1)
    out = np.empty_like(flat_stamps)
    for start in range(0, flat_stamps.shape[0], _FFT_BLOCK):
        block = slice(start, start + _FFT_BLOCK)
        stamp_ft = np.fft.rfft2(flat_stamps[block], s=fft_shape, axes=(-2, -1))
        psf_ft = kernel_fft(flat_psfs[block], fft_shape)
        denominator = np.abs(psf_ft)**2 + flat_k[block, None, None]
        with np.errstate(divide='ignore', invalid='ignore'):
            wiener = np.where(denominator > 0, np.conj(psf_ft) / denominator, 0.0)
        deconvolved = np.fft.irfft2(wiener * stamp_ft, s=fft_shape, axes=(-2, -1))
        out[block] = deconvolved[:, :ny, :nx]
    return out.reshape(stamps.shape)


def richardson_lucy_deconvolve(stamps, psfs, *, num_iter=50):
    """Deconvolve stamps with Richardson-Lucy iterations (a baseline).

    Runs `skimage.restoration.richardson_lucy` with ``clip=False`` on each
    2-D stamp. Richardson-Lucy assumes non-negative data, while
    background-subtracted stamps have negative noise, so each stamp is

    1. divided by its largest absolute value (skimage starts from 0.5 and
       adds 1e-12 to denominators, which assumes values of order 1);
    2. lifted by a pedestal ``-min + 1e-4`` so that every pixel is
       strictly positive (a constant is a fixed point of the iteration
       for a unit-sum PSF);
    3. zero-padded by the PSF size and filled with the pedestal there
       too, because skimage convolves with zero boundaries: without the
       padding the constant pedestal would fall off at the stamp edges and
       leave artefacts that bias the unweighted sizes;

    and after the iterations the padding is cropped, the pedestal
    subtracted and the scale restored. All-zero stamps are returned as
    zeros. The pedestal slows the convergence of faint structure and the
    non-negativity of the iteration biases noise slightly positive.

    Parameters
    ----------
    stamps : array_like
        Observed images, shape ``(..., ny, nx)``, e.g.
        ``(n, n_bands, ny, nx)``.
    psfs : array_like
        Odd-sized centred PSFs ``(..., py, px)`` matching the stamps,
        normalised to unit sum internally.
    num_iter : int, optional
        Number of iterations (>= 1).

    Returns
    -------
    deconvolved : `~numpy.ndarray`
        Shape of ``stamps``, same flux units; finite.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        If ``num_iter`` is not a positive integer.
    psfdeconv.exceptions.InvalidPSFError
        If a PSF has even dimensions, is larger than the stamp or has a
        non-positive sum.
    psfdeconv.exceptions.ShapeMismatchError
        If the PSFs do not match the stamps.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.evaluate import richardson_lucy_deconvolve
    >>> stamp = np.zeros((1, 1, 16, 16)); stamp[0, 0, 8, 7] = 5.0
    >>> delta = np.zeros((1, 1, 3, 3)); delta[0, 0, 1, 1] = 1.0
    >>> out = richardson_lucy_deconvolve(stamp, delta, num_iter=10)
    >>> print(f'{out[0, 0, 8, 7]:.3f} {out.sum():.3f}')
    5.000 5.000
    """
    from skimage.restoration import richardson_lucy

    if isinstance(num_iter, bool) or int(num_iter) != num_iter or num_iter < 1:
        msg = f'num_iter must be a positive integer, got {num_iter!r}.'
        raise ConfigError(msg)
    stamps, psfs = as_stamps_and_psfs(stamps, psfs)
    psfs = np.broadcast_to(psfs, stamps.shape[:-2] + psfs.shape[-2:])
    ny, nx = stamps.shape[-2:]
    pad = max(psfs.shape[-2:])
    flat_stamps = stamps.reshape((-1, ny, nx))
    flat_psfs = psfs.reshape((-1,) + psfs.shape[-2:])
    out = np.zeros_like(flat_stamps)
    for i, (stamp, psf) in enumerate(zip(flat_stamps, flat_psfs, strict=True)):
        scale = np.abs(stamp).max()
        if scale == 0:
            continue
        scaled = stamp / scale
        pedestal = max(0.0, -scaled.min()) + _RL_PEDESTAL
        lifted = np.pad(scaled, pad) + pedestal
        estimate = richardson_lucy(lifted, psf, num_iter=int(num_iter), clip=False)
        out[i] = (estimate[pad:pad + ny, pad:pad + nx] - pedestal) * scale
    return out.reshape(stamps.shape)


#: Baselines `baseline_predictions` knows, by name.
BASELINES = ('observed', 'wiener', 'richardson_lucy', 'ipsf', 'ipsf1')


def baseline_predictions(observed, psfs, *, pixel_scale, noise_sigma,
                         baselines=BASELINES):
    """Classical deconvolutions of the same stamps, for comparison.

    Parameters
    ----------
    observed : `~numpy.ndarray`
        Stamps (n, n_bands, ny, nx).
    psfs : `~numpy.ndarray`
        Unit-sum PSFs (n, n_bands, py, px).
    pixel_scale : `~numpy.ndarray`
        Arcsec/pixel, (n,).
    noise_sigma : `~numpy.ndarray`
        Per-pixel noise (n, n_bands), for the Wiener filter.
    baselines : sequence of str, optional
        Any of ``'observed'`` (no deconvolution), ``'wiener'``
        (`wiener_deconvolve`), ``'richardson_lucy'`` (50 iterations of
        `richardson_lucy_deconvolve`), ``'ipsf'`` and ``'ipsf1'`` (the
        network's regularised-inverse input channels alone; iPSF1 is
        matched to a 1-arcsec Gaussian, not PSF-free).

    Returns
    -------
    dict
        Name -> images (n, n_bands, ny, nx) in the input's flux units.
    """
    from ..features import make_channels

    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f'unknown baselines {unknown}; choose among '
                          f'{list(BASELINES)}.')
    out = {}
    for name in baselines:
        if name == 'observed':
            out[name] = np.asarray(observed)
        elif name == 'wiener':
            out[name] = wiener_deconvolve(observed, psfs,
                                          noise_sigma=noise_sigma)
        elif name == 'richardson_lucy':
            out[name] = richardson_lucy_deconvolve(observed, psfs,
                                                   num_iter=50)
        else:
            out[name] = make_channels(observed, psfs, pixel_scale=pixel_scale,
                                      kinds=(name,))[:, 0]
    return out
