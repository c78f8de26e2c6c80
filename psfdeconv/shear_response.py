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

__all__ = ['shear_kernel', 'shear_shapes', 'shear_size', 'shear_estimates', 'apply_shear_response',
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
                 'kernel_sigma_pixels (pixel frame), R_i the mean response of the '
                 '(log10 SNR, log10 size) bin (the outer bins extend to infinity), '
                 'SNR = flux / flux_err of the amplitude refit, size = det(M - k^2 I)^(1/4) '
                 'in pixels, M the HSM moments of that image and k the kernel sigma '
                 '(shear_size), e_PSF the unweighted-moment '
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


def shear_size(e1, e2, sigma, kernel_sigma):
    """Size of a deconvolved image from the HSM shape of its smoothed version.

    ``det(M - k^2 I)^(1/4)``, M the adaptive moments (distortion ``e``, width
    ``sigma = det(M)^(1/4)``) of the image convolved with the round kernel of
    sigma ``k``: the kernel's moments removed, the size no longer changes at
    first order with a shear (the smoothed image's width does, by ``e g``),
    so that a galaxy's shear states fall in the same size bin of the
    response. A small floor (0.05 pixels) where the determinant is not
    positive; NaN where an input is NaN.

    Examples
    --------
    >>> from psfdeconv.shear_response import shear_size
    >>> print(f'{float(shear_size(0.0, 0.0, 2.5, 1.5)):.3f}')
    2.000
    """
    e1, e2, sigma = (np.asarray(v, dtype=float) for v in (e1, e2, sigma))
    with np.errstate(invalid='ignore'):
        scale = sigma**2 / np.sqrt(1 - e1**2 - e2**2)
        k2 = float(kernel_sigma)**2
        det = (scale * (1 + e1) - k2) * (scale * (1 - e1) - k2) - (scale * e2)**2
        size = np.where(det > 0, np.abs(det)**0.25, 0.05)
    return np.where(np.isfinite(det), size, np.nan)


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
    size = shear_size(shapes['e1'], shapes['e2'], shapes['sigma'],
                      response['kernel_sigma_pixels'])
    r1, r2, g1, g2 = shear_estimates(shapes['e1'], shapes['e2'], snr, size,
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
    >>> check_shear_response({'log_snr_edges': [1, 2], 'log_size_edges': [0.2, 0.6],
    ...                       'R1': [[1.5]], 'R2': [[float('nan')]], 'c1': 0.0,
    ...                       'c2': 0.0, 'alpha': 0.0, 'kernel_sigma_pixels': 1.5})
    Traceback (most recent call last):
    ...
    psfdeconv.exceptions.ModelFileError: shear_response.R2 = [[nan]]; it must be a 1 x 1 grid ...
    """
    def refuse(key, value, expected):
        raise ModelFileError(f'{where}.{key} = {value!r}; {expected}. Refit it with '
                             f'fit_shear_response (psfdeconv calibrate --shear).')

    def as_floats(value):
        try:
            return np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            return np.array([np.nan])

    if not isinstance(response, dict):
        refuse('(value)', response, 'it must be a JSON object')
    shape = []
    for key in ('log_snr_edges', 'log_size_edges'):
        value = response.get(key)
        array = as_floats(value)
        if (value is None or array.ndim != 1 or array.size < 2
                or not np.isfinite(array).all() or np.any(np.diff(array) <= 0)):
            refuse(key, value, 'it must be an increasing list of at least two finite numbers')
        shape.append(array.size - 1)
    for key in ('R1', 'R2'):
        value = response.get(key)
        array = as_floats(value)
        if array.shape != tuple(shape) or not (np.isfinite(array).all()
                                               and (array > 0).all()):
            refuse(key, value, f'it must be a {shape[0]} x {shape[1]} grid of finite '
                               f'positive numbers')
    for key in ('c1', 'c2', 'alpha', 'kernel_sigma_pixels'):
        value = response.get(key)
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not np.isfinite(value)):
            refuse(key, value, 'it must be a finite number')


def _bin_values(grid, x_edges, y_edges, x, y):
    """The value of the (x, y) bin of a grid, the outer bins extending to
    infinity; NaN where x or y is NaN."""
    grid = np.asarray(grid, float)
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    bad = ~(np.isfinite(x) & np.isfinite(y))
    i = np.searchsorted(np.asarray(x_edges, float)[1:-1], np.where(bad, 0.0, x), side='right')
    j = np.searchsorted(np.asarray(y_edges, float)[1:-1], np.where(bad, 0.0, y), side='right')
    return np.where(bad, np.nan, grid[i, j])


def shear_estimates(e1, e2, snr, size, psf_e1, psf_e2, response):
    """Calibrated shear estimates of deconvolved distortions.

    Parameters
    ----------
    e1, e2 : array_like
        HSM distortions of the deconvolved images (pixel frame).
    snr : array_like
        ``flux / flux_err`` of the amplitude refit.
    size : array_like
        `shear_size` of the deconvolved images, pixels.
    psf_e1, psf_e2 : array_like
        Unweighted-moment distortions of the PSFs
        (`~psfdeconv.deconvolve.psf_ellipticity`).
    response : dict
        A model card's ``shear_response`` (`fit_shear_response`).

    Returns
    -------
    R1, R2, g1, g2 : `~numpy.ndarray`
        The response of the ``(log10 snr, log10 size)`` bin (the outer bins
        extend to infinity; a bin's mean response divides its members'
        distortions, so that their mean shear is unbiased even where R varies
        steeply across bins, as it does with size), and the shear estimates
        ``g_i = e_i / R_i - c_i - alpha e_PSF_i``; NaN where an input is NaN
        or snr, size are not positive.

    Examples
    --------
    >>> from psfdeconv.shear_response import shear_estimates
    >>> response = {'log_snr_edges': [1.0, 1.5, 2.0], 'log_size_edges': [0.2, 0.6],
    ...             'R1': [[1.2], [1.4]], 'R2': [[1.2], [1.4]],
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
    grids = [_bin_values(response[key], response['log_snr_edges'],
                         response['log_size_edges'], x, y) for key in ('R1', 'R2')]
    r1, r2 = grids
    g1 = e1 / r1 - response['c1'] - response['alpha'] * psf_e1
    g2 = e2 / r2 - response['c2'] - response['alpha'] * psf_e2
    return r1, r2, g1, g2
