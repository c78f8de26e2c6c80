# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Calibrated shear estimates of deconvolved images: the model card's
``shear_response`` as `~psfdeconv.deconvolve.deconvolve_stamps` applies it.

The response is fitted by `psfdeconv.shear.fit_shear_response` on a ring test
(`psfdeconv.shear`); this module measures the shapes it calibrates
(`shear_shapes`), checks a card's entry (`check_shear_response`) and turns
distortions into shear estimates (`shear_estimates`, `apply_shear_response`).
"""

import numpy as np

from .exceptions import InvalidInputError, ModelFileError

__all__ = ['shear_kernel', 'shear_shapes', 'shear_estimates', 'apply_shear_response',
           'check_shear_response', 'SHEAR_KERNEL_SIGMA', 'RESPONSE_FORM']

#: Sigma, in pixels, of the round Gaussian the deconvolved images are
#: convolved with before their shapes are measured for shear: images
#: deconvolved to the pixel grid are often narrower than a pixel, where HSM
#: fails or its response to a shear scatters widely from one galaxy to the
#: next; a round kernel leaves the mean response to a shear isotropic and
#: the response calibration absorbs its dilution.
SHEAR_KERNEL_SIGMA = 1.5

#: Form of a model card's ``shear_response``.
RESPONSE_FORM = ('g_i = e_i / R_i - c_i - alpha e_PSF_i, e the HSM distortion of the '
                 'deconvolved band image convolved with a round Gaussian of '
                 'kernel_sigma_pixels (pixel frame), R_i interpolated bilinearly in '
                 '(log10 SNR, log10 size) between bin centres and clipped outside, '
                 'SNR = flux / flux_err of the amplitude refit, size = HSM sigma of '
                 'that image in pixels, e_PSF the unweighted-moment '
                 'distortion of the band PSF')


def shear_kernel(sigma):
    """A unit-sum round Gaussian image of ``sigma`` pixels (odd side
    ``2 ceil(4 sigma) + 1``), centred on its middle pixel.

    Examples
    --------
    >>> from psfdeconv.shear_response import shear_kernel
    >>> k = shear_kernel(1.5)
    >>> k.shape, round(float(k.sum()), 6)
    ((13, 13), 1.0)
    """
    sigma = float(sigma)
    if not (np.isfinite(sigma) and 0 < sigma <= 8):
        raise InvalidInputError(f'the shear kernel sigma must be in (0, 8] pixels, got '
                                f'{sigma}.')
    half = int(np.ceil(4 * sigma))
    x = np.arange(-half, half + 1)
    profile = np.exp(-0.5 * (x / sigma)**2)
    kernel = np.outer(profile, profile)
    return kernel / kernel.sum()


def shear_shapes(images, kernel_sigma=SHEAR_KERNEL_SIGMA):
    """HSM shapes of images convolved with `shear_kernel`: the input of
    `shear_estimates`.

    Parameters
    ----------
    images : `~numpy.ndarray`
        (..., ny, nx), e.g. deconvolved images (n, n_bands, ny, nx).
    kernel_sigma : float, optional
        Kernel sigma in pixels (a card's ``shear_response['kernel_sigma_pixels']``).

    Returns
    -------
    dict of `~numpy.ndarray`
        ``'e1'``, ``'e2'`` (distortions, pixel frame), ``'sigma'`` (pixels)
        and ``'status'``, of shape (...); NaN where HSM fails.
    """
    from ._fourier import convolve_same
    from .measure import hsm_moments

    images = np.asarray(images, dtype=np.float64)
    smoothed = convolve_same(images, shear_kernel(kernel_sigma))
    shapes = hsm_moments(smoothed, guess_sigma=max(2.0, 2 * float(kernel_sigma)))
    return {'e1': shapes['hsm_e1'], 'e2': shapes['hsm_e2'], 'sigma': shapes['hsm_sigma'],
            'status': shapes['hsm_status']}


def apply_shear_response(images, psfs, flux, flux_err, response):
    """Shear estimates of deconvolved images with a card's ``shear_response``.

    Parameters
    ----------
    images : `~numpy.ndarray`
        Deconvolved images (n, n_bands, ny, nx) on the pixel grid.
    psfs : `~numpy.ndarray`
        Their PSFs (n, n_bands, py, px).
    flux, flux_err : `~numpy.ndarray`
        (n, n_bands), the amplitude refit's.
    response : dict
        `fit_shear_response`.

    Returns
    -------
    dict of `~numpy.ndarray`
        ``'shear_R1'``, ``'shear_R2'``, ``'shear_g1'``, ``'shear_g2'``,
        each (n, n_bands), pixel frame; NaN where HSM fails (e.g. blank or
        undetected images).
    """
    from .measure import image_moments

    check_shear_response(response)
    shapes = shear_shapes(images, response['kernel_sigma_pixels'])
    # The unweighted-moment distortion of the PSFs, as
    # `~psfdeconv.deconvolve.psf_ellipticity` (not imported: deconvolve uses this module).
    psf_moments = image_moments(psfs)
    psf_e1, psf_e2 = psf_moments['e1'], psf_moments['e2']
    with np.errstate(divide='ignore', invalid='ignore'):
        snr = np.asarray(flux, float) / np.asarray(flux_err, float)
    r1, r2, g1, g2 = shear_estimates(shapes['e1'], shapes['e2'], snr, shapes['sigma'],
                                     psf_e1, psf_e2, response)
    return {'shear_R1': r1, 'shear_R2': r2, 'shear_g1': g1, 'shear_g2': g2}


def check_shear_response(response, where='shear_response'):
    """Refuse a malformed or non-finite ``shear_response``.

    Raises
    ------
    psfdeconv.exceptions.ModelFileError
        Naming the key and its value.

    Examples
    --------
    >>> from psfdeconv.shear_response import check_shear_response
    >>> check_shear_response({'log_snr_centres': [1.5], 'log_size_centres': [0.4],
    ...                       'R1': [[1.5]], 'R2': [[float('nan')]], 'c1': 0.0,
    ...                       'c2': 0.0, 'alpha': 0.0, 'kernel_sigma_pixels': 1.5})
    Traceback (most recent call last):
    ...
    psfdeconv.exceptions.ModelFileError: shear_response.R2 = [[nan]]; it must be a 1 x 1 grid ...
    """
    def refuse(key, value, expected):
        raise ModelFileError(f'{where}.{key} = {value!r}; {expected}. Refit it with '
                             f'fit_shear_response (psfdeconv calibrate --shear).')

    if not isinstance(response, dict):
        refuse('(value)', response, 'it must be a JSON object')
    shape = []
    for key in ('log_snr_centres', 'log_size_centres'):
        value = response.get(key)
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            array = np.array([np.nan])
        if (value is None or array.ndim != 1 or array.size < 1
                or not np.isfinite(array).all() or np.any(np.diff(array) <= 0)):
            refuse(key, value, 'it must be an increasing list of finite numbers')
        shape.append(array.size)
    for key in ('R1', 'R2'):
        value = response.get(key)
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            array = np.array([np.nan])
        if array.shape != tuple(shape) or not (np.isfinite(array).all()
                                               and (array > 0).all()):
            refuse(key, value, f'it must be a {shape[0]} x {shape[1]} grid of finite '
                               f'positive numbers')
    for key in ('c1', 'c2', 'alpha', 'kernel_sigma_pixels'):
        value = response.get(key)
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not np.isfinite(value)):
            refuse(key, value, 'it must be a finite number')


def _interpolate(grid, x_centres, y_centres, x, y):
    """Bilinear interpolation of a (nx, ny) grid at (x, y), clipped to the
    centres (constant outside); NaN where x or y is NaN."""
    from scipy.interpolate import RegularGridInterpolator

    grid = np.asarray(grid, float)
    x_centres, y_centres = np.asarray(x_centres, float), np.asarray(y_centres, float)
    # A single centre along an axis is constant along it: duplicate it.
    if x_centres.size == 1:
        x_centres, grid = np.r_[x_centres, x_centres + 1], np.vstack([grid, grid])
    if y_centres.size == 1:
        y_centres, grid = np.r_[y_centres, y_centres + 1], np.hstack([grid, grid])
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    bad = ~(np.isfinite(x) & np.isfinite(y))
    points = np.stack([np.clip(np.where(bad, x_centres[0], x), x_centres[0], x_centres[-1]),
                       np.clip(np.where(bad, y_centres[0], y), y_centres[0], y_centres[-1])],
                      axis=-1)
    values = RegularGridInterpolator((x_centres, y_centres), grid)(points.reshape(-1, 2))
    return np.where(bad, np.nan, values.reshape(x.shape))


def shear_estimates(e1, e2, snr, size, psf_e1, psf_e2, response):
    """Calibrated shear estimates of deconvolved distortions.

    Parameters
    ----------
    e1, e2 : array_like
        HSM distortions of the deconvolved images (pixel frame).
    snr : array_like
        ``flux / flux_err`` of the amplitude refit.
    size : array_like
        HSM sigma of the deconvolved images, pixels.
    psf_e1, psf_e2 : array_like
        Unweighted-moment distortions of the PSFs
        (`~psfdeconv.deconvolve.psf_ellipticity`).
    response : dict
        A model card's ``shear_response`` (`fit_shear_response`).

    Returns
    -------
    R1, R2, g1, g2 : `~numpy.ndarray`
        The response, interpolated bilinearly in ``(log10 snr, log10 size)``
        between the bin centres and constant beyond the outer ones, and the
        shear estimates ``g_i = e_i / R_i - c_i - alpha e_PSF_i``; NaN
        where an input is NaN or snr, size are not positive.

    Examples
    --------
    >>> from psfdeconv.shear_response import shear_estimates
    >>> response = {'log_snr_centres': [1.0, 2.0], 'log_size_centres': [0.3],
    ...             'R1': [[1.2], [1.6]], 'R2': [[1.2], [1.6]],
    ...             'c1': 0.001, 'c2': 0.0, 'alpha': 0.02, 'kernel_sigma_pixels': 1.5}
    >>> R1, R2, g1, g2 = shear_estimates(0.08, 0.0, 10**1.5, 2.0, 0.05, 0.0, response)
    >>> print(f'{float(R1):.2f} {float(g1):.4f}')
    1.40 0.0551
    """
    check_shear_response(response)
    e1, e2, snr, size, psf_e1, psf_e2 = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (e1, e2, snr, size, psf_e1, psf_e2)))
    with np.errstate(divide='ignore', invalid='ignore'):
        x = np.where(snr > 0, np.log10(snr), np.nan)
        y = np.where(size > 0, np.log10(size), np.nan)
    grids = [_interpolate(response[key], response['log_snr_centres'],
                          response['log_size_centres'], x, y) for key in ('R1', 'R2')]
    r1, r2 = grids
    g1 = e1 / r1 - response['c1'] - response['alpha'] * psf_e1
    g2 = e2 / r2 - response['c2'] - response['alpha'] * psf_e2
    return r1, r2, g1, g2
