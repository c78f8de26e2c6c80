# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Shear calibration of deconvolved images: a ring test through the whole
stamp path and the response calibration of the model card.

Each simulated galaxy (the profiles of `psfdeconv.simulate`) is drawn in a
ring pair, intrinsically rotated by 90 degrees, and each member is sheared
by ``(+g, 0)``, ``(-g, 0)``, ``(0, +g)`` and ``(0, -g)`` before the PSF, an
anisotropic Moffat fixed per galaxy. The four shear states of one member
share one noise field, and the rotated member gets that field rotated with
it, so that both the intrinsic shape and most of the noise cancel in the
averages: the multiplicative bias ``m``, the additive bias ``c`` and the PSF
leakage ``alpha`` are measured to a few 1e-3 with a few thousand stamps.

Shapes are HSM adaptive-moment *distortions* (`~psfdeconv.measure.hsm_moments`,
pixel frame: e1 > 0 along the stamp's x axis). A distortion responds to a
shear by ``R ~ 2 (1 - e_rms^2)``; the response calibration ``R`` fitted here
(per SNR and output size) turns a deconvolved distortion into a shear
estimate ``g = e / R - c - alpha e_PSF`` (`shear_estimates`).
"""

import numpy as np

from .exceptions import ConfigError, InvalidInputError, ModelFileError

__all__ = ['simulate_ring_test', 'measure_ring_test', 'fit_shear_bias',
           'fit_shear_response', 'shear_estimates', 'check_shear_response',
           'ring_shears', 'shear_kernel', 'shear_shapes', 'apply_shear_response',
           'truth_responsivity']

#: Sigma, in pixels, of the round Gaussian the deconvolved images are
#: convolved with before their shapes are measured for shear: images
#: deconvolved to the pixel grid are often narrower than a pixel, where HSM
#: fails or its response to a shear scatters widely from one galaxy to the
#: next; a round kernel leaves the mean response to a shear isotropic and
#: the response calibration absorbs its dilution.
SHEAR_KERNEL_SIGMA = 1.5

#: Shear states of a ring member, in units of the input shear g.
_STATES = np.array([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)])

#: Form of a model card's ``shear_response``.
RESPONSE_FORM = ('g_i = e_i / R_i - c_i - alpha e_PSF_i, e the HSM distortion of the '
                 'deconvolved band image convolved with a round Gaussian of '
                 'kernel_sigma_pixels (pixel frame), R_i interpolated bilinearly in '
                 '(log10 SNR, log10 size) between bin centres and clipped outside, '
                 'SNR = flux / flux_err of the amplitude refit, size = HSM sigma of '
                 'that image in pixels, e_PSF the unweighted-moment '
                 'distortion of the band PSF')


def ring_shears(shear):
    """The input shears ``(g1, g2)`` of the four states of a ring member.

    Examples
    --------
    >>> from psfdeconv.shear import ring_shears
    >>> ring_shears(0.02).tolist()
    [[0.02, 0.0], [-0.02, 0.0], [0.0, 0.02], [0.0, -0.02]]
    """
    shear = float(shear)
    if not 0 < shear < 0.2:
        raise ConfigError(f'shear must be in (0, 0.2), got {shear}.')
    return _STATES * shear


def shear_kernel(sigma):
    """A unit-sum round Gaussian image of ``sigma`` pixels (odd side
    ``2 ceil(4 sigma) + 1``), centred on its middle pixel.

    Examples
    --------
    >>> from psfdeconv.shear import shear_kernel
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
    from .deconvolve import psf_ellipticity

    check_shear_response(response)
    shapes = shear_shapes(images, response['kernel_sigma_pixels'])
    psf_e1, psf_e2 = psf_ellipticity(psfs)
    with np.errstate(divide='ignore', invalid='ignore'):
        snr = np.asarray(flux, float) / np.asarray(flux_err, float)
    r1, r2, g1, g2 = shear_estimates(shapes['e1'], shapes['e2'], snr, shapes['sigma'],
                                     psf_e1, psf_e2, response)
    return {'shear_R1': r1, 'shear_R2': r2, 'shear_g1': g1, 'shear_g2': g2}


def _rotate_position(x, y, k):
    """A position relative to the array centre after ``np.rot90(., k)``
    (arrays indexed [y, x]): each turn maps (x, y) to (y, -x)."""
    for _ in range(k % 4):
        x, y = y, -x
    return x, y


def _ring_galaxy(config, shear, snr_range, seed_sequence):
    """The 2 x 4 stamps of one galaxy (rotation, shear state)."""
    import galsim

    from ._fourier import convolve_same
    from .simulate import (
        _band_transforms,
        _bin,
        _draw_log_uniform,
        _draw_psfs,
        _draw_uniform,
        _galaxy_profile,
    )

    rng = np.random.default_rng(seed_sequence)
    size, nb, ov = config.stamp_size, config.n_bands, config.oversampling
    pixel_scale = float(_draw_uniform(rng, config.pixel_scale_range))
    offset = _draw_uniform(rng, config.offset_range, 2)
    psfs, psf_params = _draw_psfs(rng, config, np.array([pixel_scale]), 1)
    hlr = min(float(_draw_log_uniform(rng, config.half_light_radius_range)),
              config.max_half_light_radius_pixels * pixel_scale)
    profile = _galaxy_profile(rng, config, hlr, max_shift=min(
        22.0, size / 2 - 10) * pixel_scale)
    # One seed for the band transforms of every stamp: the same colours.
    band_seed = int(rng.integers(2**62))
    noise_sigma = _draw_uniform(rng, config.noise_sigma_range, nb)
    target_snr = float(_draw_log_uniform(rng, snr_range))
    noise = rng.normal(size=(nb, size, size))

    shears = ring_shears(shear)
    band1 = np.empty((2, len(shears), size, size))
    for r in range(2):
        # GalSim's rotation by -90 degrees is np.rot90 of the array (y
        # rows increasing upwards): the rotated member with the rotated
        # noise is the first member's stamp turned, except for the PSF.
        rotated = profile.rotate(-90.0 * r * galsim.degrees)
        # Position relative to the array centre (an even image's centre
        # lies between pixels; the stamp centre is pixel size // 2).
        x, y = _rotate_position(0.5 + offset[0], 0.5 + offset[1], r)
        for s, (g1, g2) in enumerate(shears):
            image = rotated.shear(g1=g1, g2=g2).drawImage(
                nx=size * ov, ny=size * ov, scale=pixel_scale / ov, method='no_pixel',
                offset=(ov * x, ov * y))
            band1[r, s] = _bin(image.array, ov)
    truth = np.stack([_band_transforms(np.random.default_rng(band_seed), config,
                                       stamp[None])[0]
                      for stamp in band1.reshape(-1, size, size)])
    truth = truth.reshape(2, len(shears), nb, size, size)
    noiseless = convolve_same(truth, psfs[0].astype(np.float64))
    # Flux set by the band-1 matched-filter SNR of the first stamp.
    scale = target_snr * noise_sigma[0] / np.sqrt((noiseless[0, 0, 0]**2).sum())
    truth, noiseless = truth * scale, noiseless * scale
    fields = np.stack([noise, np.rot90(noise, 1, axes=(-2, -1))])
    observed = noiseless + (fields * noise_sigma[:, None, None])[:, None]
    snr = np.sqrt((noiseless**2).sum(axis=(-2, -1))) / noise_sigma
    return {'truth': truth.astype(np.float32), 'observed': observed.astype(np.float32),
            'psf': psfs[0], 'pixel_scale': pixel_scale, 'noise_sigma': noise_sigma,
            'snr': snr, 'offset': offset, 'half_light_radius': hlr,
            'psf_g1': psf_params['psf_g1'][0], 'psf_g2': psf_params['psf_g2'][0],
            'psf_fwhm': psf_params['psf_fwhm'][0]}


def simulate_ring_test(n_galaxies, *, shear=0.02, snr_range=(10.0, 300.0), seed=0,
                       config=None, start=0):
    """Ring-test stamps: each galaxy in a 90-degree pair, four shears each.

    Parameters
    ----------
    n_galaxies : int
        Galaxies; each gives 2 x 4 stamps.
    shear : float, optional
        Input reduced shear g: the states are ``(+g, 0)``, ``(-g, 0)``,
        ``(0, +g)`` and ``(0, -g)`` (`ring_shears`), applied to the galaxy
        profile before the PSF.
    snr_range : tuple of float, optional
        Band-1 matched-filter SNR (``sqrt(sum I^2) / sigma`` of the
        noiseless observed first stamp) drawn log-uniformly in this range;
        it sets the galaxy's flux.
    seed : int, optional
        Seed; galaxy ``i`` has its own child seed, so the result does not
        depend on how the galaxies are split into calls (``start``).
    config : `~psfdeconv.simulate.SimulationConfig`, optional
        Galaxy, PSF (Moffat, sheared per band by ``psf_shear_range``),
        pixel-scale and noise ranges; the defaults if None. Its flux range
        and blank fraction are not used.
    start : int, optional
        Index of the first galaxy: ``simulate_ring_test(n, start=k)`` gives
        galaxies ``k .. k + n - 1`` of the seed.

    Returns
    -------
    dict of `~numpy.ndarray`
        ``'observed'`` and ``'truth'`` (n, 2, 4, n_bands, ny, nx) (the truth
        sheared and PSF-free), ``'psf'`` (n, n_bands, py, px), ``'shear'``
        (4, 2) the input shears of the states, ``'snr'`` (n, 2, 4, n_bands)
        matched-filter SNR, ``'pixel_scale'`` (n,), ``'noise_sigma'`` (n,
        n_bands), ``'galaxy'`` (n,) indices, and the drawn ``'psf_g1'``,
        ``'psf_g2'``, ``'psf_fwhm'`` (n, n_bands), ``'offset'`` (n, 2),
        ``'half_light_radius'`` (n,).

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.shear import simulate_ring_test
    >>> ring = simulate_ring_test(1, seed=3)
    >>> ring['observed'].shape
    (1, 2, 4, 3, 64, 64)
    >>> noise = ring['observed'] - ring['observed'][:, :, :1]  # same noise field
    >>> bool(np.abs(noise).max() < np.abs(ring['observed']).max())
    True
    """
    from .simulate import SimulationConfig

    config = SimulationConfig() if config is None else config
    if int(n_galaxies) != n_galaxies or n_galaxies < 1:
        raise ConfigError(f'n_galaxies must be a positive integer, got {n_galaxies}.')
    low, high = snr_range
    if not 0 < low <= high:
        raise ConfigError(f'snr_range must satisfy 0 < low <= high, got {snr_range}.')
    if int(start) != start or start < 0:
        raise ConfigError(f'start must be a non-negative integer, got {start}.')
    shears = ring_shears(shear)
    children = np.random.SeedSequence(seed).spawn(int(start) + int(n_galaxies))[start:]
    galaxies = [_ring_galaxy(config, shear, snr_range, child) for child in children]
    out = {key: np.stack([np.asarray(g[key]) for g in galaxies]) for key in galaxies[0]}
    out['shear'] = shears
    out['galaxy'] = np.arange(start, start + n_galaxies)
    return out


def measure_ring_test(ring, *, model=None, symmetries=None, batch_size=64,
                      precision='float32', kernel_sigma=None):
    """Deconvolve ring-test stamps and measure HSM shapes of outputs and truth.

    Runs `~psfdeconv.deconvolve.deconvolve_stamps` (the whole stamp path:
    network, symmetry views, the card's corrections and refit, and its
    shear response where the card has one) with the simulation's noise,
    then `~psfdeconv.measure.hsm_moments` on the deconvolved images and on
    the truth, and the PSF distortions (`~psfdeconv.deconvolve.psf_ellipticity`).

    Parameters
    ----------
    ring : dict
        From `simulate_ring_test`.
    model : `~psfdeconv.model.DeconvolutionModel`, optional
        The shipped default if None.
    symmetries : int, optional
        As for `deconvolve_stamps` (the card's own if None).
    batch_size : int, optional
        Objects per network call.
    precision : str, optional
        As for `deconvolve_stamps`.
    kernel_sigma : float, optional
        Sigma (pixels) of `shear_shapes`' kernel; the card's
        ``shear_response`` value, else `SHEAR_KERNEL_SIGMA`.

    Returns
    -------
    `~astropy.table.Table`
        One row per stamp and band: ``galaxy``, ``rotation`` (0, 1),
        ``state`` (0-3), ``band``, input ``g1``, ``g2``, ``snr_true``
        (matched filter), ``snr`` (flux / flux_err of the refit),
        ``e1``, ``e2``, ``sigma`` (`shear_shapes` of the output, pixels),
        ``hsm_e1``, ``hsm_e2``, ``hsm_sigma`` (HSM of the output itself),
        ``truth_e1``, ``truth_e2``, ``truth_sigma`` (HSM of the truth),
        ``truth_s_e1``, ``truth_s_e2`` (`shear_shapes` of the truth), ``psf_e1``,
        ``psf_e2``, ``pixel_scale`` and, with a card ``shear_response``,
        ``shear_R1``, ``shear_R2``, ``shear_g1``, ``shear_g2``; shapes are
        NaN where HSM fails. ``meta['shear']`` holds g.
    """
    from astropy.table import Table

    from .deconvolve import deconvolve_stamps, psf_ellipticity
    from .measure import hsm_moments
    from .model import load_model

    observed = np.asarray(ring['observed'])
    n, n_rot, n_states, nb = observed.shape[:4]
    stamp_shape = observed.shape[-2:]
    repeat = n_rot * n_states
    stamps = observed.reshape((-1, nb) + stamp_shape)
    psfs = np.repeat(ring['psf'], repeat, axis=0)
    pixel_scale = np.repeat(ring['pixel_scale'], repeat)
    noise_sigma = np.repeat(ring['noise_sigma'], repeat, axis=0)
    if model is None:
        model = load_model(n_bands=nb)
    if kernel_sigma is None:
        kernel_sigma = (model.card.get('shear_response')
                        or {}).get('kernel_sigma_pixels', SHEAR_KERNEL_SIGMA)
    images, details = deconvolve_stamps(stamps, psfs, pixel_scale=pixel_scale,
                                        model=model, noise_sigma=noise_sigma,
                                        batch_size=batch_size, symmetries=symmetries,
                                        return_details=True, strict=None,
                                        precision=precision)
    out = hsm_moments(images)
    smoothed = shear_shapes(images, kernel_sigma)
    truth_images = np.asarray(ring['truth']).reshape(images.shape)
    truth = hsm_moments(truth_images)
    truth_smoothed = shear_shapes(truth_images, kernel_sigma)
    psf_e1, psf_e2 = psf_ellipticity(psfs)
    with np.errstate(divide='ignore', invalid='ignore'):
        snr = details['flux'] / details['flux_err']

    shape = (n, n_rot, n_states, nb)
    index = np.indices(shape)
    shears = np.asarray(ring['shear'])
    columns = {
        'galaxy': np.asarray(ring['galaxy'])[index[0]],
        'rotation': index[1], 'state': index[2], 'band': index[3],
        'g1': shears[index[2], 0], 'g2': shears[index[2], 1],
        'snr_true': np.asarray(ring['snr']).reshape(shape),
        'snr': snr.reshape(shape),
        'e1': smoothed['e1'].reshape(shape), 'e2': smoothed['e2'].reshape(shape),
        'sigma': smoothed['sigma'].reshape(shape),
        'hsm_e1': out['hsm_e1'].reshape(shape), 'hsm_e2': out['hsm_e2'].reshape(shape),
        'hsm_sigma': out['hsm_sigma'].reshape(shape),
        'truth_s_e1': truth_smoothed['e1'].reshape(shape),
        'truth_s_e2': truth_smoothed['e2'].reshape(shape),
        'truth_e1': truth['hsm_e1'].reshape(shape),
        'truth_e2': truth['hsm_e2'].reshape(shape),
        'truth_sigma': truth['hsm_sigma'].reshape(shape),
        'psf_e1': psf_e1.reshape(shape), 'psf_e2': psf_e2.reshape(shape),
        'pixel_scale': np.broadcast_to(np.asarray(ring['pixel_scale'])[:, None, None, None],
                                       shape),
    }
    for key in ('shear_R1', 'shear_R2', 'shear_g1', 'shear_g2'):
        if key in details:
            columns[key] = np.asarray(details[key]).reshape(shape)
    table = Table({key: np.asarray(value).ravel() for key, value in columns.items()})
    table.meta['shear'] = float(np.abs(shears).max())
    table.meta['kernel_sigma_pixels'] = float(kernel_sigma)
    return table


def _ring_arrays(table, columns):
    """Table columns as arrays (n_galaxies, n_bands, 2, 4), NaN where absent,
    and the galaxy ids."""
    galaxies, g_index = np.unique(np.asarray(table['galaxy']), return_inverse=True)
    nb = int(np.max(table['band'])) + 1
    where = (g_index, np.asarray(table['band']), np.asarray(table['rotation']),
             np.asarray(table['state']))
    out = {}
    for name in columns:
        array = np.full((len(galaxies), nb, 2, 4), np.nan)
        array[where] = np.asarray(table[name], dtype=float)
        out[name] = array
    return out, galaxies


def _check_table(table, names):
    missing = [name for name in names if name not in table.colnames]
    if missing:
        raise InvalidInputError(f'the ring-test table lacks the columns {missing}; '
                                f'make it with measure_ring_test.')


def truth_responsivity(e1, e2):
    """Distortion responsivity ``2 (1 - <e_i^2>)`` per component.

    For a distortion ``e`` sheared by a small ``g``, ``de_i/dg_i = 2 (1 -
    e_i^2)`` to first order; a 90-degree pair shares ``e_i^2``, so its mean
    response is this, and ``<e_i> / R_i`` is then an unbiased estimate of
    the shear of the truth (to order g^2 and the pixel integration).

    Examples
    --------
    >>> from psfdeconv.shear import truth_responsivity
    >>> truth_responsivity([0.2, -0.2], [0.0, 0.0])
    (1.92, 2.0)
    """
    e1, e2 = np.asarray(e1, float), np.asarray(e2, float)
    return (float(2 * (1 - np.nanmean(e1**2))), float(2 * (1 - np.nanmean(e2**2))))


def _estimates(table, estimator, response):
    """Per-row shear estimates (g1, g2) of one estimator."""
    if estimator == 'truth':
        r1, r2 = truth_responsivity(table['truth_e1'], table['truth_e2'])
        return np.asarray(table['truth_e1']) / r1, np.asarray(table['truth_e2']) / r2
    if estimator == 'raw':
        # The output's distortions with the truth's responsivity: m is the
        # shear the deconvolution loses relative to the truth's shapes.
        r1, r2 = truth_responsivity(table['truth_e1'], table['truth_e2'])
        return np.asarray(table['hsm_e1']) / r1, np.asarray(table['hsm_e2']) / r2
    if estimator == 'calibrated':
        if response is None:
            if 'shear_g1' not in table.colnames:
                raise InvalidInputError('the calibrated estimator needs a response '
                                        '(fit_shear_response) or shear_g1/shear_g2 columns.')
            return np.asarray(table['shear_g1']), np.asarray(table['shear_g2'])
        _, _, g1, g2 = shear_estimates(table['e1'], table['e2'], table['snr'],
                                       table['sigma'], table['psf_e1'], table['psf_e2'],
                                       response)
        return g1, g2
    raise InvalidInputError(f"estimator must be 'truth', 'raw' or 'calibrated', got "
                            f'{estimator!r}.')


def _unit_statistics(g1, g2, shear):
    """Per (galaxy, band) ring statistics from (n, nb, 2, 4) estimates:
    the response estimates d_i = <(g_i(+) - g_i(-)) / 2g> over rotations
    and the means a_i over the eight stamps (intrinsic shape and shear
    cancel); NaN where any stamp of the unit failed."""
    valid = np.isfinite(g1).all(axis=(2, 3)) & np.isfinite(g2).all(axis=(2, 3))
    d1 = ((g1[..., 0] - g1[..., 1]) / (2 * shear)).mean(axis=2)
    d2 = ((g2[..., 2] - g2[..., 3]) / (2 * shear)).mean(axis=2)
    a1, a2 = g1.mean(axis=(2, 3)), g2.mean(axis=(2, 3))
    return valid, d1, d2, a1, a2


def _bias(valid, d1, d2, a1, a2, p1, p2):
    """m1, m2, c1, c2, alpha from unit statistics: a_i = c_i + alpha p_i
    (least squares, both components with one alpha)."""
    v = valid
    if v.sum() < 3:
        return np.full(5, np.nan)
    x = np.concatenate([p1[v], p2[v]])
    y = np.concatenate([a1[v], a2[v]])
    k = v.sum()
    design = np.zeros((2 * k, 3))
    design[:k, 0] = 1.0
    design[k:, 1] = 1.0
    design[:, 2] = x
    (c1, c2, alpha), *_ = np.linalg.lstsq(design, y, rcond=None)
    return np.array([d1[v].mean() - 1, d2[v].mean() - 1, c1, c2, alpha])


_BIAS_KEYS = ('m1', 'm2', 'c1', 'c2', 'alpha')


def fit_shear_bias(table, *, estimator='calibrated', response=None, snr_edges=None,
                   n_bootstrap=200, seed=0):
    """Multiplicative and additive shear bias and PSF leakage of a ring test.

    For each galaxy and band, ``m_i + 1`` is the mean over its two rotations
    of ``(g_i(+g) - g_i(-g)) / 2g`` (g_i the shear estimate), and the mean
    of ``g_i`` over its eight stamps is fitted as ``c_i + alpha e_PSF_i``
    (e_PSF the band PSF's unweighted-moment distortion); the intrinsic shape
    cancels in both. Errors are the standard deviations over bootstrap
    resamplings of the galaxies (all bands of a galaxy together). A unit
    (galaxy, band) where HSM fails on any of its eight stamps is left out.

    Parameters
    ----------
    table : `~astropy.table.Table`
        From `measure_ring_test`.
    estimator : {'calibrated', 'raw', 'truth'}, optional
        ``'truth'``: the truth's distortions over their responsivity
        (`truth_responsivity`), a check of the ring itself; ``'raw'``: the
        deconvolved distortions over the truth's responsivity (the shear
        the deconvolution loses); ``'calibrated'``: `shear_estimates` with
        ``response`` (or the table's ``shear_g1``, ``shear_g2``).
    response : dict, optional
        A card's ``shear_response`` (`fit_shear_response`).
    snr_edges : sequence of float, optional
        Also fit in bins of the band's true matched-filter SNR.
    n_bootstrap : int, optional
        Bootstrap resamplings.
    seed : int, optional
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``'m1', 'm2', 'c1', 'c2', 'alpha'`` and their ``'<key>_err'``,
        ``'n_galaxies'``, ``'n_units'`` (galaxy-bands used), and with
        ``snr_edges`` ``'bins'``: a list of such dicts with ``'snr_range'``.

    Examples
    --------
    The truth of resolved galaxies (HSM is biased on images narrower than
    a pixel) responds as the analytic responsivity says:

    >>> from psfdeconv.shear import simulate_ring_test, fit_shear_bias
    >>> from psfdeconv.simulate import SimulationConfig
    >>> from psfdeconv.measure import hsm_moments
    >>> from astropy.table import Table
    >>> import numpy as np
    >>> config = SimulationConfig(pixel_scale_range=(0.1, 0.1),
    ...                           half_light_radius_range=(0.4, 0.6))
    >>> ring = simulate_ring_test(4, seed=1, config=config)
    >>> t = hsm_moments(ring['truth'])
    >>> idx = np.indices(t['hsm_e1'].shape)
    >>> table = Table({'galaxy': idx[0].ravel(), 'rotation': idx[1].ravel(),
    ...                'state': idx[2].ravel(), 'band': idx[3].ravel(),
    ...                'truth_e1': t['hsm_e1'].ravel(), 'truth_e2': t['hsm_e2'].ravel(),
    ...                'psf_e1': np.zeros(idx[0].size), 'psf_e2': np.zeros(idx[0].size),
    ...                'snr_true': ring['snr'].ravel()}, meta={'shear': 0.02})
    >>> bias = fit_shear_bias(table, estimator='truth', n_bootstrap=20)
    >>> bool(abs(bias['m1']) < 3 * bias['m1_err']), abs(round(bias['c1'], 8))
    (True, 0.0)
    """
    shear = float(table.meta['shear'])
    _check_table(table, ('galaxy', 'rotation', 'state', 'band', 'psf_e1', 'psf_e2'))
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 2:
        raise InvalidInputError(f'n_bootstrap must be an integer >= 2, got {n_bootstrap}.')
    g1, g2 = _estimates(table, estimator, response)
    work = table[['galaxy', 'rotation', 'state', 'band', 'psf_e1', 'psf_e2']].copy()
    work['est_g1'], work['est_g2'] = g1, g2
    names = ['est_g1', 'est_g2', 'psf_e1', 'psf_e2']
    if snr_edges is not None:
        _check_table(table, ('snr_true',))
        work['snr_true'] = table['snr_true']
        names.append('snr_true')
    arrays, galaxies = _ring_arrays(work, names)
    valid, d1, d2, a1, a2 = _unit_statistics(arrays['est_g1'], arrays['est_g2'], shear)
    p1 = np.nanmean(arrays['psf_e1'], axis=(2, 3))
    p2 = np.nanmean(arrays['psf_e2'], axis=(2, 3))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(galaxies), (int(n_bootstrap), len(galaxies)))

    def summary(mask):
        stats = (d1, d2, a1, a2, p1, p2)
        value = _bias(valid & mask, *stats)
        boot = np.array([_bias((valid & mask)[draw], *(s[draw] for s in stats))
                         for draw in draws])
        err = np.nanstd(boot, axis=0, ddof=1)
        result = {}
        for key, v, e in zip(_BIAS_KEYS, value, err, strict=True):
            result[key], result[key + '_err'] = float(v), float(e)
        result['n_galaxies'] = int((valid & mask).any(axis=1).sum())
        result['n_units'] = int((valid & mask).sum())
        return result

    result = summary(np.ones_like(valid))
    result['estimator'] = estimator
    result['shear'] = shear
    if snr_edges is not None:
        # The band's SNR of its first stamp (the stamps of a unit differ by
        # the shear only).
        snr = arrays['snr_true'][..., 0, 0]
        result['bins'] = []
        for low, high in zip(snr_edges[:-1], snr_edges[1:], strict=True):
            bin_result = summary((snr >= low) & (snr < high))
            bin_result['snr_range'] = [float(low), float(high)]
            result['bins'].append(bin_result)
    return result


def _bin_centres(values, edges):
    """Median of the values in each bin (the bin's midpoint where empty)."""
    centres = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = values[(values >= low) & (values < high)]
        centres.append(float(np.median(inside)) if inside.size else 0.5 * (low + high))
    return np.array(centres)


def fit_shear_response(table, *, n_snr_bins=4, n_size_bins=3, min_units=20,
                       seed=None):
    """Fit the shear response of deconvolved distortions per SNR and size.

    For each ring member (galaxy, band, rotation), ``R_1 = (e_1(+g, 0) -
    e_1(-g, 0)) / 2g`` and ``R_2 = (e_2(0, +g) - e_2(0, -g)) / 2g`` of the
    deconvolved HSM distortions, binned by the member's mean ``log10(flux /
    flux_err)`` and mean ``log10`` HSM size (pixels) of the output, with
    bin edges at quantiles of the members: the mean R per bin. The
    additive ``c_i`` and leakage ``alpha`` are then fitted on ``e_i / R_i``
    (`fit_shear_bias` with that response) and stored so that
    `shear_estimates` subtracts them.

    Parameters
    ----------
    table : `~astropy.table.Table`
        From `measure_ring_test`.
    n_snr_bins, n_size_bins : int, optional
        Bins along each axis.
    min_units : int, optional
        Bins with fewer ring members take the mean response of their SNR row
        (of all members if the row has too few).
    seed : int, optional
        The ring test's seed, recorded.

    Returns
    -------
    dict
        JSON-serialisable: ``'form'``, ``'log_snr_centres'``,
        ``'log_size_centres'``, ``'R1'``, ``'R2'`` (lists of lists, SNR
        rows by size columns), ``'n_members'`` per bin, ``'c1'``, ``'c2'``,
        ``'alpha'``, ``'shear'``, ``'n_galaxies'``, ``'seed'``.

    Examples
    --------
    A table with a known response (``e = 1.6 g + 0.01`` for every stamp):

    >>> import numpy as np
    >>> from astropy.table import Table
    >>> from psfdeconv.shear import fit_shear_response, ring_shears
    >>> idx = np.indices((30, 1, 2, 4)).reshape(4, -1)
    >>> g = ring_shears(0.02)[idx[3]]
    >>> table = Table({'galaxy': idx[0], 'band': idx[1], 'rotation': idx[2],
    ...                'state': idx[3], 'e1': 1.6 * g[:, 0] + 0.01, 'e2': 1.6 * g[:, 1],
    ...                'snr': np.full(idx[0].size, 50.0), 'sigma': np.full(idx[0].size, 3.0),
    ...                'psf_e1': np.zeros(idx[0].size), 'psf_e2': np.zeros(idx[0].size)},
    ...               meta={'shear': 0.02})
    >>> r = fit_shear_response(table, n_snr_bins=1, n_size_bins=1)
    >>> print(f"{r['R1'][0][0]:.3f} {r['c1']:.5f}")
    1.600 0.00625
    """
    shear = float(table.meta['shear'])
    _check_table(table, ('galaxy', 'rotation', 'state', 'band', 'e1', 'e2', 'snr',
                         'sigma', 'psf_e1', 'psf_e2'))
    for name, value in (('n_snr_bins', n_snr_bins), ('n_size_bins', n_size_bins)):
        if int(value) != value or value < 1:
            raise InvalidInputError(f'{name} must be a positive integer, got {value}.')
    arrays, galaxies = _ring_arrays(table, ('e1', 'e2', 'snr', 'sigma'))
    e1, e2 = arrays['e1'], arrays['e2']
    with np.errstate(divide='ignore', invalid='ignore'):
        log_snr = np.log10(arrays['snr']).mean(axis=3)
        log_size = np.log10(arrays['sigma']).mean(axis=3)
    r1 = (e1[..., 0] - e1[..., 1]) / (2 * shear)
    r2 = (e2[..., 2] - e2[..., 3]) / (2 * shear)
    ok = (np.isfinite(e1).all(axis=3) & np.isfinite(e2).all(axis=3)
          & np.isfinite(log_snr) & np.isfinite(log_size))
    if ok.sum() < max(min_units, 2):
        raise InvalidInputError(f'only {ok.sum()} ring members have finite shapes; '
                                f'simulate more galaxies.')
    x, y, r1, r2 = log_snr[ok], log_size[ok], r1[ok], r2[ok]
    quantiles = np.linspace(0, 1, int(n_snr_bins) + 1)
    snr_edges = np.quantile(x, quantiles)
    size_edges = np.quantile(y, np.linspace(0, 1, int(n_size_bins) + 1))
    # The last edges are inclusive.
    snr_edges[-1] = np.nextafter(snr_edges[-1], np.inf)
    size_edges[-1] = np.nextafter(size_edges[-1], np.inf)
    i = np.clip(np.searchsorted(snr_edges, x, side='right') - 1, 0, n_snr_bins - 1)
    j = np.clip(np.searchsorted(size_edges, y, side='right') - 1, 0, n_size_bins - 1)
    grid_r1 = np.empty((n_snr_bins, n_size_bins))
    grid_r2 = np.empty((n_snr_bins, n_size_bins))
    counts = np.zeros((n_snr_bins, n_size_bins), dtype=int)
    for a in range(n_snr_bins):
        row = i == a
        fallback = row if row.sum() >= min_units else np.ones_like(row)
        for b in range(n_size_bins):
            inside = row & (j == b)
            counts[a, b] = inside.sum()
            use = inside if inside.sum() >= min_units else fallback
            grid_r1[a, b], grid_r2[a, b] = r1[use].mean(), r2[use].mean()
    response = {
        'form': RESPONSE_FORM,
        'log_snr_centres': _bin_centres(x, snr_edges).tolist(),
        'log_size_centres': _bin_centres(y, size_edges).tolist(),
        'R1': grid_r1.tolist(), 'R2': grid_r2.tolist(),
        'n_members': counts.tolist(),
        'c1': 0.0, 'c2': 0.0, 'alpha': 0.0,
        'shear': shear, 'n_galaxies': int(len(galaxies)),
        'kernel_sigma_pixels': float(table.meta.get('kernel_sigma_pixels',
                                                    SHEAR_KERNEL_SIGMA)),
    }
    if seed is not None:
        response['seed'] = int(seed)
    additive = fit_shear_bias(table, estimator='calibrated', response=response,
                              n_bootstrap=2)
    response.update(c1=additive['c1'], c2=additive['c2'], alpha=additive['alpha'])
    check_shear_response(response)
    return response


def check_shear_response(response, where='shear_response'):
    """Refuse a malformed or non-finite ``shear_response``.

    Raises
    ------
    psfdeconv.exceptions.ModelFileError
        Naming the key and its value.

    Examples
    --------
    >>> from psfdeconv.shear import check_shear_response
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
    >>> from psfdeconv.shear import shear_estimates
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
