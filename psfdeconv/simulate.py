# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
GalSim simulations of multi-band galaxy stamps for training and testing.

The data follow section II of Sreejith, Slosar & Wang (2023,
arXiv:2310.19605): a truth image per object, offset from the stamp centre
by U(-5, 5) pixels; bands 2 and 3 made from band 1 by non-linear
transforms; an independent random Moffat PSF per band and per object; one
pixel scale per object; Gaussian noise per band; and a fraction of blank
stamps (noise only). The paper's galaxies come from a flow-VAE generator
trained on HST COSMOS, which cannot be had offline, so the galaxies here
are GalSim parametric profiles with a varied morphology: a Sersic bulge,
an exponential disk and Gaussian star-forming knots that follow the disk,
with random sizes, ellipticities, orientations and bulge fractions.

Every range is a field of `SimulationConfig`; every run is seeded, and
the result does not depend on the number of worker processes (each chunk
of objects has its own child seed).

The truth is drawn once per object, three times oversampled and binned
(a pixel-integrated image), and convolved with the pixelised PSFs by
batched FFT, which is both exact for the forward model N = T * P + n of
the paper's Eq. 1 and ~30x faster than drawing each band through GalSim's
convolution.
"""

import contextlib
import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ._fourier import convolve_same
from .exceptions import ConfigError, OutputExistsError

__all__ = ['SimulationConfig', 'simulate_stamps', 'write_simulation',
           'read_simulation', 'SimulationFile']

#: Arrays of a simulation, their per-object shape and meaning.
SIMULATION_FIELDS = {
    'truth': 'noiseless, PSF-free images (n, n_bands, ny, nx)',
    'observed': 'truth convolved with the PSF plus noise (n, n_bands, ny, nx)',
    'psf': 'pixelised unit-sum PSFs (n, n_bands, py, px)',
    'pixel_scale': 'pixel scale in arcsec/pixel (n,)',
    'noise_sigma': 'Gaussian noise standard deviation per band (n, n_bands)',
    'is_blank': 'True where the truth is empty (n,)',
    'snr': 'matched-filter SNR sqrt(sum I^2)/sigma per band (n, n_bands)',
    'psf_fwhm': 'PSF FWHM in arcsec (n, n_bands)',
    'psf_beta': 'Moffat beta (n, n_bands)',
    'psf_g1': 'PSF reduced shear, first component (n, n_bands)',
    'psf_g2': 'PSF reduced shear, second component (n, n_bands)',
    'offset': 'galaxy centre minus stamp centre (x, y) in pixels (n, 2)',
    'half_light_radius': 'disk half-light radius in arcsec (n,)',
}


@dataclasses.dataclass
class SimulationConfig:
    """Ranges of a simulation; every random quantity is drawn uniformly
    (or log-uniformly where noted) within them.

    The defaults follow the paper where it gives numbers (stamp size,
    offsets, pixel scales 0.088-0.255 arcsec/pixel, the blank fraction
    27k/117k) and ``paper-spec.md`` section 8 where it does not (FWHM,
    beta, shear, band transforms). Fluxes and noise are calibrated so
    that the matched-filter SNR of galaxies spans ~5 to a few hundred.
    """

    #: Stamp side in pixels (the network needs a multiple of 8).
    stamp_size: int = 64
    #: PSF image side in pixels (odd).
    psf_size: int = 41
    #: Number of bands; band 1 is drawn, the others are transforms of it.
    n_bands: int = 3
    #: Fraction of blank stamps (paper: 27,000 of 117,000).
    blank_fraction: float = 0.23
    #: Pixel scale range, arcsec/pixel, one per object.
    pixel_scale_range: tuple = (0.088, 0.255)
    #: Galaxy centre offset range in pixels, x and y independently.
    offset_range: tuple = (-5.0, 5.0)
    #: Moffat FWHM range in arcsec, per band and object.
    psf_fwhm_range: tuple = (0.3, 0.8)
    #: Moffat beta range.
    psf_beta_range: tuple = (2.0, 5.0)
    #: PSF reduced-shear components g1, g2 drawn in this range.
    psf_shear_range: tuple = (-0.05, 0.05)
    #: Disk half-light radius range in arcsec (log-uniform).
    half_light_radius_range: tuple = (0.15, 0.8)
    #: Largest disk half-light radius in pixels (keeps galaxies on the stamp).
    max_half_light_radius_pixels: float = 7.0
    #: Disk ellipticity ``|e|`` range (distortion, (a^2-b^2)/(a^2+b^2)).
    ellipticity_range: tuple = (0.0, 0.7)
    #: Bulge flux fraction range.
    bulge_fraction_range: tuple = (0.0, 0.6)
    #: Bulge Sersic indices (a discrete set keeps GalSim's tables cached).
    bulge_sersic_indices: tuple = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    #: Bulge to disk half-light radius ratio range.
    bulge_size_ratio_range: tuple = (0.2, 0.6)
    #: Flux fraction in star-forming knots.
    knot_fraction_range: tuple = (0.0, 0.3)
    #: Number of knots range (inclusive).
    n_knots_range: tuple = (3, 15)
    #: Knot Gaussian sigma as a fraction of the disk half-light radius.
    knot_size_ratio: float = 0.12
    #: Band-1 total flux range (log-uniform), in arbitrary units.
    flux_range: tuple = (80.0, 8000.0)
    #: Noise standard deviation range, per band and object.
    noise_sigma_range: tuple = (0.5, 1.5)
    #: Exponents alpha_b of the band transforms I_b = beta_b I_max
    #: (I_1 / I_max)^alpha_b (paper-spec section 1); one per band.
    band_alpha: tuple = (1.0, 0.9, 1.1)
    #: Flux factors beta_b of the band transforms; one per band.
    band_beta: tuple = (1.0, 1.0, 1.0)
    #: Per-object colour scatter of beta_b in dex (bands after the first).
    band_color_scatter_dex: float = 0.15
    #: Oversampling of the truth and PSF drawings before binning.
    oversampling: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                setattr(self, field.name, tuple(value))
        self.validate()

    def validate(self):
        """Raise `~psfdeconv.exceptions.ConfigError` on an invalid value."""
        if self.stamp_size < 8 or self.stamp_size % 8:
            raise ConfigError(f'stamp_size must be a positive multiple of 8, '
                              f'got {self.stamp_size}.')
        if self.psf_size % 2 == 0 or not 3 <= self.psf_size <= self.stamp_size:
            raise ConfigError(f'psf_size must be odd and at most stamp_size '
                              f'({self.stamp_size}), got {self.psf_size}.')
        if self.n_bands < 1:
            raise ConfigError(f'n_bands must be >= 1, got {self.n_bands}.')
        for name in ('band_alpha', 'band_beta'):
            if len(getattr(self, name)) < self.n_bands:
                raise ConfigError(f'{name} needs one value per band '
                                  f'({self.n_bands}), got {getattr(self, name)}.')
        if not 0 <= self.blank_fraction < 1:
            raise ConfigError(f'blank_fraction must be in [0, 1), got '
                              f'{self.blank_fraction}.')
        for name in ('pixel_scale_range', 'psf_fwhm_range', 'psf_beta_range',
                     'half_light_radius_range', 'flux_range',
                     'noise_sigma_range'):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f'{name} must satisfy 0 < low <= high, got '
                                  f'{(low, high)}.')
        low, high = self.ellipticity_range
        if not 0 <= low <= high < 1:
            raise ConfigError(f'ellipticity_range must satisfy 0 <= low <= '
                              f'high < 1, got {self.ellipticity_range}.')
        for name in ('bulge_fraction_range', 'knot_fraction_range'):
            low, high = getattr(self, name)
            if not 0 <= low <= high <= 1:
                raise ConfigError(f'{name} must satisfy 0 <= low <= high <= '
                                  f'1, got {(low, high)}.')
        low, high = self.n_knots_range
        if int(low) != low or int(high) != high or not 1 <= low <= high:
            raise ConfigError(f'n_knots_range must be integers with 1 <= low '
                              f'<= high, got {self.n_knots_range}.')
        low, high = self.psf_shear_range
        if not -1 < low <= high < 1:
            raise ConfigError(f'psf_shear_range must lie within (-1, 1) with '
                              f'low <= high, got {self.psf_shear_range}.')
        low, high = self.bulge_size_ratio_range
        if not 0 < low <= high or self.knot_size_ratio <= 0:
            raise ConfigError(f'bulge_size_ratio_range and knot_size_ratio '
                              f'must be positive, got {(low, high)} and '
                              f'{self.knot_size_ratio}.')
        if self.psf_beta_range[0] <= 1.1:
            raise ConfigError(f'Moffat beta must exceed 1.1, got '
                              f'psf_beta_range={self.psf_beta_range}.')
        if self.oversampling < 1 or self.oversampling % 2 == 0:
            raise ConfigError(f'oversampling must be a positive odd integer, '
                              f'got {self.oversampling}.')

    def to_dict(self):
        """The configuration as a JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        """Build a configuration from a dict, refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f'unknown simulation config keys {unknown}; '
                              f'valid keys are {sorted(known)}.')
        return cls(**values)

    @classmethod
    def from_json(cls, path):
        """Read a configuration from a JSON file."""
        with open(path) as f:
            return cls.from_dict(json.load(f))


# Objects per independently seeded chunk: results do not depend on how
# chunks are spread over workers.
_CHUNK_SIZE = 500


def _draw_uniform(rng, value_range, size=None):
    return rng.uniform(value_range[0], value_range[1], size)


def _draw_log_uniform(rng, value_range, size=None):
    return np.exp(rng.uniform(np.log(value_range[0]), np.log(value_range[1]),
                              size))


def _bin(image, factor):
    ny, nx = image.shape
    return image.reshape(ny // factor, factor, nx // factor, factor).sum(
        axis=(1, 3))


def _draw_psfs(rng, config, pixel_scale, n):
    """Truncated-to-the-stamp, pixel-integrated, unit-sum Moffat PSFs."""
    import galsim

    nb, size, ov = config.n_bands, config.psf_size, config.oversampling
    fwhm = _draw_uniform(rng, config.psf_fwhm_range, (n, nb))
    beta = _draw_uniform(rng, config.psf_beta_range, (n, nb))
    g1 = _draw_uniform(rng, config.psf_shear_range, (n, nb))
    g2 = _draw_uniform(rng, config.psf_shear_range, (n, nb))
    psfs = np.empty((n, nb, size, size), dtype=np.float32)
    for i in range(n):
        for b in range(nb):
            profile = galsim.Moffat(beta=beta[i, b], fwhm=fwhm[i, b]).shear(
                g1=g1[i, b], g2=g2[i, b])
            # An odd oversampled grid keeps the centre on the middle pixel.
            image = profile.drawImage(nx=size * ov, ny=size * ov,
                                      scale=pixel_scale[i] / ov,
                                      method='no_pixel')
            psf = _bin(image.array, ov)
            psfs[i, b] = psf / psf.sum()
    return psfs, {'psf_fwhm': fwhm, 'psf_beta': beta, 'psf_g1': g1,
                  'psf_g2': g2}


def _galaxy_profile(rng, config, half_light_radius):
    """A bulge + disk + knots galaxy of unit flux (GalSim profile)."""
    import galsim

    bulge_fraction = _draw_uniform(rng, config.bulge_fraction_range)
    knot_fraction = _draw_uniform(rng, config.knot_fraction_range)
    disk_e = _draw_uniform(rng, config.ellipticity_range)
    angle = rng.uniform(0.0, np.pi) * galsim.radians

    disk_flux = (1.0 - bulge_fraction) * (1.0 - knot_fraction)
    knots_flux = (1.0 - bulge_fraction) * knot_fraction
    parts = [galsim.Exponential(half_light_radius=half_light_radius,
                                flux=disk_flux)]
    # Knots trace the disk: radii from the exponential's radial density
    # r exp(-r / r_s), i.e. Gamma(2, r_s), at uniform angles.
    n_knots = rng.integers(config.n_knots_range[0],
                           config.n_knots_range[1] + 1)
    scale_radius = half_light_radius / 1.6783469900166605
    radius = rng.gamma(2.0, scale_radius, n_knots)
    phi = rng.uniform(0.0, 2.0 * np.pi, n_knots)
    weights = rng.dirichlet(np.ones(n_knots)) * knots_flux
    knot_sigma = config.knot_size_ratio * half_light_radius
    for r, p, w in zip(radius, phi, weights, strict=True):
        parts.append(galsim.Gaussian(sigma=knot_sigma, flux=w).shift(
            r * np.cos(p), r * np.sin(p)))
    disk = galsim.Add(parts).shear(e=disk_e, beta=angle)

    if bulge_fraction > 0:
        n = rng.choice(config.bulge_sersic_indices)
        ratio = _draw_uniform(rng, config.bulge_size_ratio_range)
        # Bulges are rounder than their disks.
        bulge = galsim.Sersic(n=n, half_light_radius=ratio * half_light_radius,
                              flux=bulge_fraction).shear(
            e=disk_e * rng.uniform(0.0, 0.6), beta=angle)
        return galsim.Add([disk, bulge])
    return disk


def _draw_truth_band1(rng, config, pixel_scale, offsets, is_blank):
    """Band-1 truth images (pixel-integrated), flux in arbitrary units."""
    n, size, ov = len(pixel_scale), config.stamp_size, config.oversampling
    truth = np.zeros((n, size, size), dtype=np.float64)
    flux = _draw_log_uniform(rng, config.flux_range, n)
    hlr = _draw_log_uniform(rng, config.half_light_radius_range, n)
    hlr = np.minimum(hlr, config.max_half_light_radius_pixels * pixel_scale)
    for i in np.flatnonzero(~is_blank):
        profile = _galaxy_profile(rng, config, hlr[i]).withFlux(flux[i])
        # The stamp centre is pixel (size // 2, size // 2); GalSim centres
        # an even image between pixels, hence the extra half pixel.
        offset = ov * (0.5 + offsets[i])
        image = profile.drawImage(nx=size * ov, ny=size * ov,
                                  scale=pixel_scale[i] / ov,
                                  method='no_pixel', offset=tuple(offset))
        truth[i] = _bin(image.array, ov)
    return truth, hlr


def _band_transforms(rng, config, band1):
    """Bands 2.. from band 1: I_b = beta_b I_max (I_1 / I_max)^alpha_b."""
    n = band1.shape[0]
    nb = config.n_bands
    out = np.empty((n, nb) + band1.shape[1:], dtype=np.float64)
    peak = band1.reshape(n, -1).max(axis=1)[:, None, None]
    safe_peak = np.where(peak > 0, peak, 1.0)
    normalised = np.clip(band1, 0.0, None) / safe_peak
    for b in range(nb):
        beta = config.band_beta[b]
        if b > 0:
            beta = beta * 10.0 ** rng.normal(0.0, config.band_color_scatter_dex,
                                             (n, 1, 1))
        out[:, b] = beta * peak * normalised ** config.band_alpha[b]
    return out


def _simulate_chunk(n, config, seed_sequence):
    """Simulate ``n`` objects with one child seed (runs in a worker)."""
    rng = np.random.default_rng(seed_sequence)
    size, nb = config.stamp_size, config.n_bands
    pixel_scale = _draw_uniform(rng, config.pixel_scale_range, n)
    offsets = _draw_uniform(rng, config.offset_range, (n, 2))
    is_blank = rng.random(n) < config.blank_fraction
    offsets[is_blank] = 0.0
    psfs, psf_params = _draw_psfs(rng, config, pixel_scale, n)
    band1, hlr = _draw_truth_band1(rng, config, pixel_scale, offsets, is_blank)
    truth = _band_transforms(rng, config, band1)
    noiseless = convolve_same(truth, psfs.astype(np.float64))
    noise_sigma = _draw_uniform(rng, config.noise_sigma_range, (n, nb))
    observed = noiseless + rng.normal(size=(n, nb, size, size)) * \
        noise_sigma[..., None, None]
    snr = np.sqrt((noiseless**2).sum(axis=(-2, -1))) / noise_sigma
    hlr[is_blank] = 0.0
    return {
        'truth': truth.astype(np.float32),
        'observed': observed.astype(np.float32),
        'psf': psfs,
        'pixel_scale': pixel_scale,
        'noise_sigma': noise_sigma,
        'is_blank': is_blank,
        'snr': snr,
        'offset': offsets,
        'half_light_radius': hlr,
        **psf_params,
    }


def _chunk_plan(n_objects, seed):
    sizes = [_CHUNK_SIZE] * (n_objects // _CHUNK_SIZE)
    if n_objects % _CHUNK_SIZE:
        sizes.append(n_objects % _CHUNK_SIZE)
    children = np.random.SeedSequence(seed).spawn(len(sizes))
    return list(zip(sizes, children, strict=True))


def _iter_chunks(n_objects, config, seed, n_workers):
    plan = _chunk_plan(n_objects, seed)
    if n_workers <= 1 or len(plan) == 1:
        for size, child in plan:
            yield _simulate_chunk(size, config, child)
        return
    with ProcessPoolExecutor(max_workers=n_workers) as pool:
        yield from pool.map(_simulate_chunk, [p[0] for p in plan],
                            [config] * len(plan), [p[1] for p in plan])


def simulate_stamps(n_objects, *, config=None, seed=0, n_workers=1):
    """Simulate multi-band galaxy stamps, their PSFs and their truth.

    Parameters
    ----------
    n_objects : int
        Number of objects (galaxies and blanks).
    config : `SimulationConfig`, optional
        The ranges to draw from; the defaults if `None`.
    seed : int, optional
        Seed of the run. The same seed gives the same stamps for any
        ``n_workers``.
    n_workers : int, optional
        Worker processes.

    Returns
    -------
    dict of `~numpy.ndarray`
        The arrays described in ``SIMULATION_FIELDS``: ``'truth'`` and
        ``'observed'`` of shape (n, n_bands, ny, nx), ``'psf'`` of shape
        (n, n_bands, py, px), ``'pixel_scale'`` (n,), and the drawn
        parameters.

    Examples
    --------
    >>> from psfdeconv.simulate import simulate_stamps
    >>> sims = simulate_stamps(4, seed=1)
    >>> sims['observed'].shape, sims['psf'].shape
    ((4, 3, 64, 64), (4, 3, 41, 41))
    >>> print(f"{sims['psf'][0, 0].sum():.4f}")
    1.0000
    """
    config = SimulationConfig() if config is None else config
    if n_objects < 1:
        raise ConfigError(f'n_objects must be >= 1, got {n_objects}.')
    chunks = list(_iter_chunks(n_objects, config, seed, n_workers))
    return {key: np.concatenate([c[key] for c in chunks])
            for key in chunks[0]}


def write_simulation(path, n_objects, *, config=None, seed=0, n_workers=None,
                     overwrite=False, progress=False, compression=None):
    """Simulate stamps and write them to an HDF5 file, chunk by chunk.

    The file holds one dataset per field of ``SIMULATION_FIELDS`` (chunked
    along objects, so that training reads it lazily), and the run's
    configuration, seed and package version as attributes. It is written
    to a temporary file in the same directory and renamed at the end, so
    an interrupted run leaves no partial file.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Output ``.h5`` file.
    n_objects : int
        Number of objects.
    config : `SimulationConfig`, optional
        Ranges; the defaults if `None`.
    seed : int, optional
        Seed of the run.
    n_workers : int, optional
        Worker processes (default: the number of CPUs).
    overwrite : bool, optional
        Replace an existing file.
    progress : bool, optional
        Show a progress bar.
    compression : {None, 'gzip', 'lzf'}, optional
        HDF5 compression of the datasets (noise compresses poorly; worth
        it for small shipped files only).

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Raises
    ------
    `~psfdeconv.exceptions.OutputExistsError`
        If ``path`` exists and ``overwrite`` is False.
    """
    import h5py

    from . import __version__
    from .io import atomic_path

    config = SimulationConfig() if config is None else config
    if n_objects < 1:
        raise ConfigError(f'n_objects must be >= 1, got {n_objects}.')
    n_workers = os.cpu_count() if n_workers is None else n_workers
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f'{path} exists; pass overwrite=True '
                                f'(--overwrite) to replace it.')
    with atomic_path(path, overwrite=overwrite) as tmp_path:
        with _hdf5_writer(h5py, tmp_path, path) as h5:
            h5.attrs['config'] = json.dumps(config.to_dict())
            h5.attrs['seed'] = seed
            h5.attrs['n_objects'] = n_objects
            h5.attrs['psfdeconv_version'] = __version__
            start = 0
            chunks = _iter_chunks(n_objects, config, seed, n_workers)
            if progress:
                from tqdm.auto import tqdm
                chunks = tqdm(chunks, total=len(_chunk_plan(n_objects, seed)),
                              unit='chunk', desc='simulate')
            for chunk in chunks:
                stop = start + len(chunk['pixel_scale'])
                for key, value in chunk.items():
                    if start == 0:
                        h5.create_dataset(
                            key, shape=(n_objects,) + value.shape[1:],
                            dtype=value.dtype,
                            chunks=(min(64, n_objects),) + value.shape[1:],
                            compression=compression)
                        h5[key].attrs['description'] = SIMULATION_FIELDS[key]
                    h5[key][start:stop] = value
                start = stop
    return path


@contextlib.contextmanager
def _hdf5_writer(h5py, tmp_path, path):
    """An HDF5 file open for writing whose close cannot mask the error.

    After a failed write (full disk, size limit) h5py's close fails too,
    with an obscure RuntimeError; the original error is the one to report.
    """
    h5 = h5py.File(tmp_path, 'w')
    try:
        yield h5
    except BaseException:
        with contextlib.suppress(Exception):
            h5.close()
        raise
    try:
        h5.close()
    except RuntimeError as exc:
        raise OSError(f'cannot finish writing {path}: {exc}') from exc


class SimulationFile:
    """Lazy, read-only access to a simulation written by `write_simulation`.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The ``.h5`` file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from psfdeconv.simulate import write_simulation, SimulationFile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'sims.h5'
    >>> _ = write_simulation(path, 3, seed=2, n_workers=1)
    >>> with SimulationFile(path) as sims:
    ...     print(len(sims), sims['observed'].shape, sims.seed)
    3 (3, 3, 64, 64) 2
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        try:
            self._h5 = h5py.File(self.path, 'r')
        except OSError as exc:
            from .exceptions import InvalidInputError
            raise InvalidInputError(f'cannot read simulation file {self.path}: '
                                    f'{exc}. Make one with `psfdeconv '
                                    f'simulate`.') from None
        self.config = SimulationConfig.from_dict(
            json.loads(self._h5.attrs['config']))
        self.seed = int(self._h5.attrs['seed'])

    def __len__(self):
        return self._h5['pixel_scale'].shape[0]

    def __getitem__(self, key):
        """The h5py dataset ``key`` (sliced lazily)."""
        return self._h5[key]

    def keys(self):
        """Names of the stored arrays."""
        return list(self._h5.keys())

    def read(self, start=0, stop=None, *, fields=None):
        """Read objects ``start:stop`` of the given fields into memory."""
        fields = self.keys() if fields is None else fields
        return {key: self._h5[key][start:stop] for key in fields}

    def close(self):
        """Close the file."""
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_simulation(path, start=0, stop=None, *, fields=None):
    """Read objects ``start:stop`` of a simulation file into memory.

    Returns
    -------
    dict of `~numpy.ndarray`
        As returned by `simulate_stamps`.
    """
    with SimulationFile(path) as sims:
        return sims.read(start, stop, fields=fields)
