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

from .exceptions import ConfigError, InvalidInputError
from .shear_response import (
    RESPONSE_FORM,
    SHEAR_KERNEL_SIGMA,
    apply_shear_response,
    check_shear_response,
    shear_estimates,
    shear_kernel,
    shear_shapes,
    shear_size,
)

__all__ = ['simulate_ring_test', 'measure_ring_test', 'fit_shear_bias',
           'fit_shear_response', 'shear_estimates', 'check_shear_response',
           'ring_shears', 'shear_kernel', 'shear_shapes', 'apply_shear_response',
           'truth_responsivity', 'ring_test_table']


#: Shear states of a ring member, in units of the input shear g.
_STATES = np.array([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)])



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
    from .simulate import SimulationConfig, draw_ring_galaxy

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
    galaxies = [draw_ring_galaxy(config, shears, snr_range, child) for child in children]
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


def ring_test_table(n_galaxies, *, seed, shear=0.02, snr_range=(10.0, 300.0),
                    config=None, model=None, symmetries=None, chunk=50, directory=None,
                    log=None, precision='float32'):
    """`simulate_ring_test` and `measure_ring_test` in chunks of galaxies.

    Parameters
    ----------
    n_galaxies, seed, shear, snr_range, config :
        As for `simulate_ring_test`.
    model, symmetries, precision :
        As for `measure_ring_test`.
    chunk : int, optional
        Galaxies per call (the result does not depend on it).
    directory : str or `~pathlib.Path`, optional
        Keep each chunk's table there as
        ``ring_seed<seed>_<start>_<n>.ecsv`` and reuse the ones that exist
        (a run can be resumed or extended; the file names hold the seed
        and the galaxies, not ``shear`` or ``snr_range``: use one
        directory per setting).
    log : callable, optional
        Called with a line of progress per chunk.

    Returns
    -------
    `~astropy.table.Table`
        As `measure_ring_test`, all chunks.
    """
    from pathlib import Path

    from astropy.table import Table, vstack

    from .io.files import write_table

    if int(chunk) != chunk or chunk < 1:
        raise InvalidInputError(f'chunk must be a positive integer, got {chunk}.')
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, int(n_galaxies), int(chunk)):
        n = min(int(chunk), int(n_galaxies) - start)
        path = None if directory is None else directory / f'ring_seed{seed}_{start:06d}_{n}.ecsv'
        if path is not None and path.exists():
            parts.append(Table.read(path))
            continue
        ring = simulate_ring_test(n, shear=shear, snr_range=snr_range, seed=seed,
                                  config=config, start=start)
        part = measure_ring_test(ring, model=model, symmetries=symmetries,
                                 precision=precision)
        if path is not None:
            # Atomic, so that a killed run leaves no truncated chunk for the
            # resume to read.
            write_table(part, path, overwrite=True)
        if log is not None:
            log(f'ring test seed {seed}: galaxies {start}-{start + n - 1} measured')
        parts.append(part)
    table = vstack(parts, metadata_conflicts='silent')
    table.meta['shear'] = float(shear)
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
        size = shear_size(table['e1'], table['e2'], table['sigma'],
                          response['kernel_sigma_pixels'])
        _, _, g1, g2 = shear_estimates(table['e1'], table['e2'], table['snr'], size,
                                       table['psf_e1'], table['psf_e2'], response)
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


def fit_shear_response(table, *, n_snr_bins=4, n_size_bins=5, min_units=20,
                       seed=None):
    """Fit the shear response of deconvolved distortions per SNR and size.

    For each ring member (galaxy, band, rotation), ``R_1 = (e_1(+g, 0) -
    e_1(-g, 0)) / 2g`` and ``R_2 = (e_2(0, +g) - e_2(0, -g)) / 2g`` of the
    `shear_shapes` distortions of the output, binned by the member's mean
    ``log10(flux / flux_err)`` and mean ``log10`` `shear_size` (pixels),
    with bin edges at quantiles of the members: the mean R per bin, times
    ``1 + m_sel``, the selection response of binning each stamp by its own
    SNR and size (``selection_m1``, ``selection_m2``, measured on the same
    stamps). The
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
        JSON-serialisable: ``'form'``, ``'log_snr_edges'``,
        ``'log_size_edges'``, ``'R1'``, ``'R2'`` (lists of lists, SNR
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
    kernel_sigma = float(table.meta.get('kernel_sigma_pixels', SHEAR_KERNEL_SIGMA))
    arrays, galaxies = _ring_arrays(table, ('e1', 'e2', 'snr', 'sigma'))
    e1, e2 = arrays['e1'], arrays['e2']
    with np.errstate(divide='ignore', invalid='ignore'):
        log_snr = np.log10(arrays['snr']).mean(axis=3)
        log_size = np.log10(shear_size(e1, e2, arrays['sigma'], kernel_sigma)).mean(axis=3)
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
        'log_snr_edges': snr_edges.tolist(),
        'log_size_edges': size_edges.tolist(),
        'R1': grid_r1.tolist(), 'R2': grid_r2.tolist(),
        'n_members': counts.tolist(),
        'c1': 0.0, 'c2': 0.0, 'alpha': 0.0,
        'shear': shear, 'n_galaxies': int(len(galaxies)),
        'kernel_sigma_pixels': kernel_sigma,
    }
    if seed is not None:
        response['seed'] = int(seed)
    # A stamp is binned by its own SNR and size, which the shear moves a
    # little, across bin edges where R jumps: the mean of the binned estimates
    # then responds by 1 + m_sel instead of 1 (a selection response, -0.01
    # to -0.02 with five size bins). It is measured here, on the fit's own
    # stamps, and folded into R.
    selection = fit_shear_bias(table, estimator='calibrated', response=response,
                               n_bootstrap=2)
    response['R1'] = (grid_r1 * (1 + selection['m1'])).tolist()
    response['R2'] = (grid_r2 * (1 + selection['m2'])).tolist()
    response['selection_m1'], response['selection_m2'] = selection['m1'], selection['m2']
    additive = fit_shear_bias(table, estimator='calibrated', response=response,
                              n_bootstrap=2)
    response.update(c1=additive['c1'], c2=additive['c2'], alpha=additive['alpha'])
    check_shear_response(response)
    return response


