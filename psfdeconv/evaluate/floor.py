# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The information floor of shape measurement: what the noise allows.
"""


import numpy as np
from astropy import units as u
from astropy.table import QTable

from .._fourier import convolve_same
from .._validation import as_image_stack
from ..exceptions import (
    InvalidInputError,
    ShapeMismatchError,
)
from ..target import convolve_to_target, target_psf_images

__all__ = ['shape_information_floor']



#: Parameters of the shape-floor Fisher matrix shared by the bands: shear
#: (g1, g2), centroid (x, y) and dilation (log size); one flux per band.
_FLOOR_SHARED = ('g1', 'g2', 'x', 'y', 'k')


def _shift_images(images, dy, dx):
    from scipy import ndimage

    out = np.empty(images.shape, dtype=float)
    for index in np.ndindex(images.shape[:-2]):
        out[index] = ndimage.shift(images[index], (dy, dx), order=3, mode='constant')
    return out


def _transformed(images, name, step):
    """``images`` sheared, shifted or dilated by ``step`` of parameter ``name``."""
    from ..transforms import dilate_images, shear_images

    if name == 'g1':
        return shear_images(images, step, 0.0)
    if name == 'g2':
        return shear_images(images, 0.0, step)
    if name == 'x':
        return _shift_images(images, 0.0, step)
    if name == 'y':
        return _shift_images(images, step, 0.0)
    return dilate_images(images, step)


def _gaussian_mixture_floor(values, covariances, *, n_draws, rng):
    """Expected error of the posterior mean under the sample's own prior.

    ``values`` (m, d) are the true values, ``covariances`` (m, d, d) the
    Gaussian measurement covariance of each. The prior of object ``i`` is
    a Gaussian kernel density of the other objects' values (Silverman
    width); its posterior mean is exact for that mixture prior.
    """
    m, dim = values.shape
    width = np.std(values, axis=0).mean() * (4.0 / (dim + 2)) ** (1.0 / (dim + 4)) \
        * max(m - 1, 1) ** (-1.0 / (dim + 4))
    errors = np.full((m, dim), np.nan)
    for i in range(m):
        prior = np.delete(values, i, axis=0)
        total = covariances[i] + width**2 * np.eye(dim)
        total_inv = np.linalg.inv(total)
        gain = width**2 * total_inv
        measured = values[i] + rng.standard_normal((n_draws, dim)) @ \
            np.linalg.cholesky(covariances[i]).T
        offsets = measured[:, None, :] - prior[None, :, :]  # (draws, m-1, d)
        log_w = -0.5 * np.einsum('dkj,jl,dkl->dk', offsets, total_inv, offsets)
        weights = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        means = prior[None] + offsets @ gain.T
        estimate = np.einsum('dk,dkj->dj', weights, means)
        errors[i] = np.sqrt(np.mean((estimate - values[i]) ** 2, axis=0))
    return errors


def shape_information_floor(truth, psfs, noise_sigma, *, is_blank=None,
                            target_psf=None, pixel_scale=None,
                            n_draws=16, seed=0, step=0.01):
    """Smallest ellipticity and size errors the noise allows (estimate).

    For each non-blank object the Fisher information of the observed
    stamps (truth convolved with the known PSF, white Gaussian noise) is
    computed for a shear (g1, g2), a centroid shift and a dilation shared
    by the bands and one flux per band, by central differences of
    cubic-spline transforms of the truth. Its inverse, marginalised over
    the centroid and the fluxes and propagated through the response of
    each band's HSM ellipticity and size (`~psfdeconv.measure.hsm_moments`
    of the transformed truth), is the Cramer-Rao bound (``crb_*``) of an
    unbiased estimator. Faint galaxies are better estimated by shrinking
    towards the population: ``floor_*`` is the RMS error of the exact
    posterior mean given a Gaussian measurement with the Cramer-Rao
    covariance and a prior equal to the kernel density of the other
    objects' true values (per band), averaged over ``n_draws`` noise draws.

    The floor is optimistic, a target no method can beat: it assumes the
    galaxy's light profile known up to shear, size, position and flux
    (knots and bulge included), the same shear in every band, and the
    population of the test set known. Errors are HSM distortions as in
    `evaluate_predictions` (``table2_hsm``); sizes are percent of the
    HSM sigma.

    With ``target_psf`` the shapes are those of the truth convolved with
    the target (what `~psfdeconv.deconvolve.deconvolve_stamps` returns with
    the same ``target_psf``): the information in the observed stamps is
    the same, but the structure the target smooths away no longer has to
    be measured.

    Parameters
    ----------
    truth : `~numpy.ndarray`
        PSF-free images (n, n_bands, ny, nx), non-negative.
    psfs : `~numpy.ndarray`
        PSFs (n, n_bands, py, px), any positive sums (normalised here).
    noise_sigma : array-like
        Per-pixel noise of the observed stamps, shape (n, n_bands).
    is_blank : array-like of bool, optional
        (n,); blank objects get no rows.
    target_psf : float, `~astropy.units.Quantity` or array-like, optional
        A target PSF in any form `~psfdeconv.target.target_psf_images`
        takes (a FWHM needs ``pixel_scale``); the floor is then that of the
        HSM shapes of the truth convolved with it.
    pixel_scale : float or array-like, optional
        arcsec/pixel, scalar or (n,); needed for a FWHM ``target_psf``.
    n_draws : int, optional
        Noise draws per object for the posterior-mean floor.
    seed : int, optional
        Seed of those draws.
    step : float, optional
        Finite-difference step of the shear and the dilation, and of the
        shifts in pixels.

    Returns
    -------
    `~astropy.table.QTable`
        One row per non-blank object and band where HSM succeeds on the
        truth: ``id``, ``band``, ``snr`` (matched-filter SNR of the noiseless
        observed stamp), ``truth_e1``, ``truth_e2``, ``truth_size`` (HSM
        sigma, pixels; with ``target_psf``, of the truth convolved with it),
        ``crb_e1``, ``crb_e2``, ``crb_size`` (percent) and ``floor_e1``,
        ``floor_e2``, ``floor_size``. ``meta['n_failed']`` counts the rows
        left out because HSM fails on the truth.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If the shapes of ``truth``, ``psfs``, ``noise_sigma`` or
        ``is_blank`` disagree.
    psfdeconv.exceptions.InvalidInputError
        If ``noise_sigma`` is not positive and finite or fewer than three
        rows remain.

    Examples
    --------
    A round Gaussian galaxy (sigma 3 px) seen through a Gaussian PSF
    (sigma 2 px): the Cramer-Rao bound of its ellipticity is
    ``4 sqrt(pi) sigma_obs**3 noise / (flux sigma**2)``.

    >>> import numpy as np
    >>> from psfdeconv.evaluate import shape_information_floor
    >>> y, x = np.mgrid[:48, :48] - 24.0
    >>> def gaussian(sigma, e1=0.0):
    ...     q = (x**2 / (1 + e1) + y**2 / (1 - e1)) / sigma**2
    ...     return np.exp(-0.5 * q) / (2 * np.pi * sigma**2)
    >>> truth = np.stack([1000 * gaussian(3.0, e1) for e1 in (0.0, 0.2, -0.2)])[:, None]
    >>> ky, kx = np.mgrid[-12:13, -12:13]
    >>> psf = np.exp(-0.5 * (kx**2 + ky**2) / 2.0**2)
    >>> psfs = np.broadcast_to(psf, (3, 1) + psf.shape)
    >>> floor = shape_information_floor(truth, psfs, np.full((3, 1), 0.5))
    >>> expected = 4 * np.sqrt(np.pi) * np.sqrt(13.0)**3 * 0.5 / (1000 * 9)
    >>> print(f"{floor['crb_e1'][0]:.4f} {expected:.4f}")
    0.0185 0.0185
    """
    from ..measure import hsm_moments

    truth = np.asarray(as_image_stack(truth, 'truth'), dtype=float)
    n, n_bands = truth.shape[:2]
    psfs = np.asarray(psfs, dtype=float)
    if psfs.ndim != 4 or psfs.shape[:2] != (n, n_bands):
        raise ShapeMismatchError(f'psfs must have shape ({n}, {n_bands}, py, px) '
                                 f'like truth, got {psfs.shape}.')
    psfs = psfs / psfs.sum(axis=(-2, -1), keepdims=True)
    targets = None
    if target_psf is not None:
        if pixel_scale is None and (isinstance(target_psf, u.Quantity)
                                    or np.ndim(target_psf) == 0):
            raise InvalidInputError('A target_psf FWHM needs pixel_scale (arcsec/pixel); '
                                    'give pixel_scale or target images.')
        targets = target_psf_images(target_psf, 1.0 if pixel_scale is None else pixel_scale,
                                    n, truth.shape[-2:])
    noise_sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=float), (n, n_bands))
    if not np.all(np.isfinite(noise_sigma) & (noise_sigma > 0)):
        raise InvalidInputError('noise_sigma must be positive and finite.')
    is_blank = np.zeros(n, bool) if is_blank is None else np.asarray(is_blank, bool)
    if is_blank.shape != (n,):
        raise ShapeMismatchError(f'is_blank must have shape ({n},), got {is_blank.shape}.')
    ids = np.flatnonzero(~is_blank)
    truth, psfs, noise_sigma = truth[ids], psfs[ids], noise_sigma[ids]

    def measured_shapes(images):
        # HSM of what is compared with a deconvolution: the truth, or it
        # convolved with the target.
        if targets is not None:
            images = convolve_to_target(images, targets[ids])
        return hsm_moments(images)

    observed = convolve_same(truth, psfs)
    # d(observed) / d(parameter) of the shared parameters, (m, 5, bands, ny, nx),
    # and, from the same transformed truths, the response of each band's HSM
    # (e1, e2, log sigma) to (g1, g2, k).
    derivatives = []
    response = np.zeros((len(ids), n_bands, 3, 3))
    for name in _FLOOR_SHARED:
        plus = _transformed(truth, name, step)
        minus = _transformed(truth, name, -step)
        derivatives.append(convolve_same(plus - minus, psfs) / (2 * step))
        if name in ('g1', 'g2', 'k'):
            column = ('g1', 'g2', 'k').index(name)
            plus, minus = measured_shapes(plus), measured_shapes(minus)
            response[..., 0, column] = (plus['hsm_e1'] - minus['hsm_e1']) / (2 * step)
            response[..., 1, column] = (plus['hsm_e2'] - minus['hsm_e2']) / (2 * step)
            response[..., 2, column] = np.log(plus['hsm_sigma'] / minus['hsm_sigma']) / (2 * step)
    shared = np.stack(derivatives, axis=1)
    # Fisher matrix: the shared parameters, then one flux per band (whose
    # derivative is that band's observed stamp over its flux).
    weight = 1.0 / noise_sigma**2
    n_shared = len(_FLOOR_SHARED)
    fisher = np.zeros((len(ids), n_shared + n_bands, n_shared + n_bands))
    fisher[:, :n_shared, :n_shared] = np.einsum('mpbyx,mqbyx,mb->mpq', shared, shared,
                                                weight, optimize=True)
    cross = np.einsum('mpbyx,mbyx,mb->mpb', shared, observed, weight, optimize=True)
    fisher[:, :n_shared, n_shared:] = cross
    fisher[:, n_shared:, :n_shared] = np.swapaxes(cross, 1, 2)
    fisher[:, n_shared:, n_shared:] = np.einsum(
        'mb,bc->mbc', weight * np.sum(observed**2, axis=(-2, -1)), np.eye(n_bands))
    # The marginal covariance of (g1, g2, k); pinv: a blank-looking band
    # (no flux) carries no information rather than failing.
    covariance = np.linalg.pinv(fisher)[:, [0, 1, 4]][:, :, [0, 1, 4]]

    reference = measured_shapes(truth)
    crb = response @ covariance[:, None] @ np.swapaxes(response, -1, -2)
    ok = (reference['hsm_status'] == 0) & np.all(np.isfinite(crb), axis=(-2, -1))

    rows = {key: [] for key in ('id', 'band', 'snr', 'truth_e1', 'truth_e2', 'truth_size',
                                'crb_e1', 'crb_e2', 'crb_size',
                                'floor_e1', 'floor_e2', 'floor_size')}
    rng = np.random.default_rng(seed)
    signal = np.sqrt(np.sum(observed**2, axis=(-2, -1))) / noise_sigma
    for band in range(n_bands):
        keep = ok[:, band]
        if keep.sum() < 3:
            continue
        cov = crb[keep, band]
        e_true = np.stack([reference['hsm_e1'][keep, band],
                           reference['hsm_e2'][keep, band]], axis=-1)
        floor_e = _gaussian_mixture_floor(e_true, cov[:, :2, :2], n_draws=n_draws, rng=rng)
        log_size = np.log(reference['hsm_sigma'][keep, band])[:, None]
        floor_size = _gaussian_mixture_floor(log_size, cov[:, 2:, 2:], n_draws=n_draws,
                                             rng=rng)[:, 0]
        rows['id'].append(ids[keep])
        rows['band'].append(np.full(keep.sum(), band))
        rows['snr'].append(signal[keep, band])
        rows['truth_e1'].append(e_true[:, 0])
        rows['truth_e2'].append(e_true[:, 1])
        rows['truth_size'].append(reference['hsm_sigma'][keep, band])
        rows['crb_e1'].append(np.sqrt(cov[:, 0, 0]))
        rows['crb_e2'].append(np.sqrt(cov[:, 1, 1]))
        rows['crb_size'].append(100.0 * np.sqrt(cov[:, 2, 2]))
        rows['floor_e1'].append(floor_e[:, 0])
        rows['floor_e2'].append(floor_e[:, 1])
        rows['floor_size'].append(100.0 * floor_size)
    if not rows['id'] or sum(len(r) for r in rows['id']) < 3:
        raise InvalidInputError('shape_information_floor needs at least 3 '
                                'non-blank objects where HSM succeeds on the truth.')
    table = QTable({key: np.concatenate(value) for key, value in rows.items()})
    table['truth_size'].unit = u.pix
    for key in ('crb_size', 'floor_size'):
        table[key].unit = u.percent
    table.meta['n_failed'] = int((~ok).sum())
    table.meta['description'] = (
        'Cramer-Rao bounds (crb_*) and posterior-mean floors (floor_*) of the HSM '
        'ellipticity and size errors: profile known up to shear, size, position and '
        'flux, shear shared by the bands, prior = the other objects\' true values')
    return table
