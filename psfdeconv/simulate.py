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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from astropy.nddata import block_reduce

from ._cpus import usable_cpus
from ._fourier import convolve_same
from ._validation import config_from_dict, is_band_name
from .exceptions import ConfigError, OutputExistsError

__all__ = ['SimulationConfig', 'simulate_stamps', 'write_simulation',
           'read_simulation', 'SimulationFile']

#: PSF families `SimulationConfig.psf_families` can draw from.
PSF_FAMILIES = ('moffat', 'kolmogorov', 'optical')

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
    'psf_beta': 'Moffat beta, NaN for other PSF families (n, n_bands)',
    'psf_family': 'index into the config\'s psf_families (n,)',
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
    #: PSF families, one drawn per object with equal probability (all its
    #: bands share it): 'moffat' (beta from psf_beta_range), 'kolmogorov'
    #: (a turbulent atmosphere alone) or 'optical' (a Kolmogorov
    #: atmosphere convolved with an obscured, strutted telescope pupil with
    #: defocus, astigmatism and coma of up to 0.15 waves each;
    #: `galsim.OpticalPSF`, 10x slower to draw than the others).
    psf_families: tuple = ('moffat',)
    #: PSF FWHM range in arcsec, per band and object (for 'optical', the
    #: atmosphere's FWHM is 0.85 of the drawn value and lambda/D 0.2 of
    #: it; the total FWHM is then ~1.1 times the drawn value).
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
    #: Fraction of galaxies that are clumpy and lopsided: their knots carry
    #: a flux fraction from ``clumpy_knot_fraction_range`` and form a cloud
    #: centred off the disk (by up to ``knot_offset_max`` half-light radii)
    #: and sheared independently of it (reduced shear up to 0.5), as in
    #: irregular and star-forming galaxies seen at high resolution.
    clumpy_fraction: float = 0.0
    #: Knot flux fraction range of the clumpy galaxies.
    clumpy_knot_fraction_range: tuple = (0.3, 0.8)
    #: Largest offset of a clumpy galaxy's knot cloud, in disk half-light
    #: radii.
    knot_offset_max: float = 0.8
    #: Fraction of galaxies with a companion (a merger or a projected
    #: pair): a second exponential disk or Sersic bulge at a distance drawn
    #: in ``companion_separation_range`` (in half-light radii of the main
    #: galaxy, at most 22 pixels), with a flux ratio drawn in
    #: ``companion_flux_ratio_range`` and a half-light radius 0.3-1 times
    #: the main galaxy's.
    merger_fraction: float = 0.0
    #: Companion-to-main flux ratio range.
    companion_flux_ratio_range: tuple = (0.1, 1.0)
    #: Companion distance range in half-light radii of the main galaxy.
    companion_separation_range: tuple = (0.7, 2.5)
    #: Band-1 total flux range (log-uniform), in arbitrary units.
    flux_range: tuple = (80.0, 8000.0)
    #: Noise standard deviation range, per band and object.
    noise_sigma_range: tuple = (0.5, 1.5)
    #: Exponents alpha_b of the band transforms I_b = beta_b I_max
    #: (I_1 / I_max)^alpha_b (paper-spec section 1); one per band.
    band_alpha: tuple = (1.0, 0.9, 1.1)
    #: Per-object scatter (standard deviation) of alpha_b for the bands
    #: after the first. With 0 (the paper) every band has a fixed profile
    #: transform, which a network learns as a prior: fed the same galaxy in
    #: every band, it then returns band 2 wider than band 3. Real galaxies
    #: have similar shapes in neighbouring bands with varying colour
    #: gradients: alphas of 1 with a scatter model that.
    band_alpha_scatter: float = 0.0
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
        if not 0 <= self.band_alpha_scatter < 0.5:
            raise ConfigError(f'band_alpha_scatter must be in [0, 0.5), got '
                              f'{self.band_alpha_scatter}.')
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
        for name in ('clumpy_fraction', 'merger_fraction'):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f'{name} must be in [0, 1], got '
                                  f'{getattr(self, name)}.')
        low, high = self.clumpy_knot_fraction_range
        if not 0 <= low <= high <= 1:
            raise ConfigError(f'clumpy_knot_fraction_range must satisfy 0 <= '
                              f'low <= high <= 1, got {(low, high)}.')
        for name in ('companion_flux_ratio_range',
                     'companion_separation_range'):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f'{name} must satisfy 0 < low <= high, got '
                                  f'{(low, high)}.')
        if self.knot_offset_max < 0:
            raise ConfigError(f'knot_offset_max must be >= 0, got '
                              f'{self.knot_offset_max}.')
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
        unknown = sorted(set(self.psf_families) - set(PSF_FAMILIES))
        if not self.psf_families or unknown:
            raise ConfigError(f'psf_families must be a non-empty subset of '
                              f'{PSF_FAMILIES}, got {self.psf_families}.')
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
        return config_from_dict(cls, values, 'simulation')

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
    # Sums, not means: a binned image keeps its flux.
    return block_reduce(image, factor, func=np.sum)


def _psf_profile(galsim, family, fwhm, beta, aberrations):
    """One PSF profile of the given family (before shear)."""
    if family == 'moffat':
        return galsim.Moffat(beta=beta, fwhm=fwhm)
    if family == 'kolmogorov':
        return galsim.Kolmogorov(fwhm=fwhm)
    defocus, astig1, astig2, coma1, coma2 = aberrations
    # pad_factor 1 is 7x faster than GalSim's 1.5; the aliasing it allows
    # is far below the pixel-binned PSF's precision here.
    optics = galsim.OpticalPSF(lam_over_diam=0.2 * fwhm, obscuration=0.3,
                               nstruts=4, defocus=defocus, astig1=astig1,
                               astig2=astig2, coma1=coma1, coma2=coma2,
                               pad_factor=1.0)
    return galsim.Convolve(galsim.Kolmogorov(fwhm=0.85 * fwhm), optics)


def _draw_psfs(rng, config, pixel_scale, n):
    """Truncated-to-the-stamp, pixel-integrated, unit-sum PSFs."""
    import galsim

    nb, size, ov = config.n_bands, config.psf_size, config.oversampling
    fwhm = _draw_uniform(rng, config.psf_fwhm_range, (n, nb))
    beta = _draw_uniform(rng, config.psf_beta_range, (n, nb))
    g1 = _draw_uniform(rng, config.psf_shear_range, (n, nb))
    g2 = _draw_uniform(rng, config.psf_shear_range, (n, nb))
    # Drawn only when there is a choice, so that Moffat-only simulations
    # keep the random stream (and the files) of earlier versions.
    family = (rng.integers(0, len(config.psf_families), n)
              if len(config.psf_families) > 1 else np.zeros(n, dtype=int))
    # Defocus, astigmatism and coma in waves, for 'optical' only.
    aberrations = (rng.uniform(-0.15, 0.15, (n, nb, 5))
                   if 'optical' in config.psf_families else np.zeros((n, nb, 5)))
    psfs = np.empty((n, nb, size, size), dtype=np.float32)
    for i in range(n):
        name = config.psf_families[family[i]]
        for b in range(nb):
            profile = _psf_profile(galsim, name, fwhm[i, b], beta[i, b],
                                   aberrations[i, b]).shear(
                g1=g1[i, b], g2=g2[i, b])
            # An odd oversampled grid keeps the centre on the middle pixel.
            image = profile.drawImage(nx=size * ov, ny=size * ov,
                                      scale=pixel_scale[i] / ov,
                                      method='no_pixel')
            psf = _bin(image.array, ov)
            psfs[i, b] = psf / psf.sum()
    is_moffat = np.array([config.psf_families[f] == 'moffat' for f in family])
    beta = np.where(is_moffat[:, None], beta, np.nan)
    return psfs, {'psf_fwhm': fwhm, 'psf_beta': beta, 'psf_g1': g1,
                  'psf_g2': g2, 'psf_family': family}


def _galaxy_profile(rng, config, half_light_radius, max_shift=np.inf):
    """A bulge + disk + knots galaxy of unit flux (GalSim profile).

    With ``config.clumpy_fraction`` or ``config.merger_fraction`` above 0,
    some galaxies get a lopsided knot cloud or a companion placed at most
    ``max_shift`` arcsec from the main galaxy's centre.
    """
    import galsim

    # Drawn only when asked for, so that configurations without clumpy
    # galaxies or mergers keep their random stream (and files).
    clumpy = (config.clumpy_fraction > 0
              and rng.random() < config.clumpy_fraction)
    merger = (config.merger_fraction > 0
              and rng.random() < config.merger_fraction)

    bulge_fraction = _draw_uniform(rng, config.bulge_fraction_range)
    knot_fraction = _draw_uniform(rng, config.clumpy_knot_fraction_range
                                  if clumpy else config.knot_fraction_range)
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
    knot_x, knot_y = radius * np.cos(phi), radius * np.sin(phi)
    if clumpy:
        knot_x, knot_y = _lopsided_cloud(rng, knot_x, knot_y,
                                         config.knot_offset_max
                                         * half_light_radius)
    knot_sigma = config.knot_size_ratio * half_light_radius
    for x, y, w in zip(knot_x, knot_y, weights, strict=True):
        parts.append(galsim.Gaussian(sigma=knot_sigma, flux=w).shift(x, y))
    disk = galsim.Add(parts).shear(e=disk_e, beta=angle)

    if bulge_fraction > 0:
        n = rng.choice(config.bulge_sersic_indices)
        ratio = _draw_uniform(rng, config.bulge_size_ratio_range)
        # Bulges are rounder than their disks.
        bulge = galsim.Sersic(n=n, half_light_radius=ratio * half_light_radius,
                              flux=bulge_fraction).shear(
            e=disk_e * rng.uniform(0.0, 0.6), beta=angle)
        galaxy = galsim.Add([disk, bulge])
    else:
        galaxy = disk
    if merger:
        galaxy = galsim.Add([galaxy, _companion(rng, config, half_light_radius,
                                                max_shift)])
    return galaxy


def _lopsided_cloud(rng, x, y, max_offset):
    """Knot positions sheared (reduced shear up to 0.5, random direction)
    and shifted together by up to ``max_offset``: a cloud that no longer
    shares the disk's centre or symmetry."""
    g = rng.uniform(0.0, 0.5)
    direction = rng.uniform(0.0, np.pi)
    g1, g2 = g * np.cos(2 * direction), g * np.sin(2 * direction)
    norm = 1.0 / np.sqrt(1.0 - g**2)
    sheared_x = norm * ((1 + g1) * x + g2 * y)
    sheared_y = norm * (g2 * x + (1 - g1) * y)
    offset = rng.uniform(0.0, max_offset)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    return sheared_x + offset * np.cos(phi), sheared_y + offset * np.sin(phi)


def _companion(rng, config, half_light_radius, max_shift):
    """A second galaxy (exponential or Sersic) for a merger, flux relative
    to a unit-flux main galaxy."""
    import galsim

    flux = _draw_uniform(rng, config.companion_flux_ratio_range)
    radius = half_light_radius * rng.uniform(0.3, 1.0)
    if rng.random() < 0.5:
        profile = galsim.Exponential(half_light_radius=radius, flux=flux)
    else:
        profile = galsim.Sersic(n=rng.choice(config.bulge_sersic_indices),
                                half_light_radius=radius, flux=flux)
    profile = profile.shear(e=_draw_uniform(rng, config.ellipticity_range),
                            beta=rng.uniform(0.0, np.pi) * galsim.radians)
    distance = min(half_light_radius * _draw_uniform(
        rng, config.companion_separation_range), max_shift)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    return profile.shift(distance * np.cos(phi), distance * np.sin(phi))


def _draw_truth_band1(rng, config, pixel_scale, offsets, is_blank):
    """Band-1 truth images (pixel-integrated), flux in arbitrary units."""
    n, size, ov = len(pixel_scale), config.stamp_size, config.oversampling
    truth = np.zeros((n, size, size), dtype=np.float64)
    flux = _draw_log_uniform(rng, config.flux_range, n)
    hlr = _draw_log_uniform(rng, config.half_light_radius_range, n)
    hlr = np.minimum(hlr, config.max_half_light_radius_pixels * pixel_scale)
    for i in np.flatnonzero(~is_blank):
        # Companions stay 22 pixels from the centre, inside the stamp.
        profile = _galaxy_profile(rng, config, hlr[i], max_shift=min(
            22.0, size / 2 - 10) * pixel_scale[i]).withFlux(flux[i])
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
        alpha = config.band_alpha[b]
        if b > 0:
            beta = beta * 10.0 ** rng.normal(0.0, config.band_color_scatter_dex,
                                             (n, 1, 1))
            if config.band_alpha_scatter > 0:
                alpha = np.clip(alpha + rng.normal(0.0, config.band_alpha_scatter,
                                                   (n, 1, 1)), 0.5, 2.0)
        out[:, b] = beta * peak * normalised ** alpha
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


def _rotate_position(x, y, k):
    """A position relative to the array centre after ``np.rot90(., k)``
    (arrays indexed [y, x]): each turn maps (x, y) to (y, -x)."""
    for _ in range(k % 4):
        x, y = y, -x
    return x, y


def draw_ring_galaxy(config, shears, snr_range, seed_sequence):
    """The ring-test stamps of one galaxy (`psfdeconv.shear.simulate_ring_test`).

    The galaxy (`_galaxy_profile`, unit flux), its PSFs (`_draw_psfs`, fixed
    for all its stamps) and its band transforms are drawn once; it is drawn
    at two intrinsic orientations 90 degrees apart, each sheared by every
    row ``(g1, g2)`` of ``shears`` before the PSF. One noise field per
    orientation, the second the first turned by 90 degrees with the galaxy,
    is shared by its shear states; the flux sets the band-1 matched-filter
    SNR of the first stamp to a value drawn log-uniformly in ``snr_range``.

    Returns
    -------
    dict
        ``'truth'``, ``'observed'`` (2, n_shears, n_bands, ny, nx), ``'psf'``,
        ``'snr'`` (2, n_shears, n_bands) and the drawn parameters.
    """
    import galsim

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
        Worker processes (default: the CPUs this process may use).
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
    n_workers = usable_cpus() if n_workers is None else n_workers
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


# --- Simulated exposures ------------------------------------------------------------

__all__ += ['simulate_exposure', 'write_exposure_set']

#: Default seeing FWHM per band, arcsec (`simulate_exposure`).
_EXPOSURE_SEEING = {'g': 0.9, 'r': 0.8, 'i': 0.75}
#: Sky position of the centre of a simulated exposure (RA, Dec in degrees): the
#: COSMOS field.
_EXPOSURE_CENTRE = (150.0, 2.0)
#: Largest shift (pixels, each axis) of a band's CRPIX with ``wcs_offsets``.
_EXPOSURE_MAX_WCS_OFFSET = 0.5
#: Half-side of the box a galaxy (or a star, in units of its FWHM) is drawn into.
_GALAXY_DRAW_HALF_SIZE = 40
_STAR_DRAW_HALF_SIZE_FWHM = 6.0
#: Random candidate positions tried per object when placing the sources.
_PLACEMENT_CANDIDATES = 400


def _exposure_seeing(seeing_fwhm, bands):
    """Seeing FWHM (arcsec) per band from a mapping, a scalar or a sequence."""
    if seeing_fwhm is None:
        seeing_fwhm = {b: _EXPOSURE_SEEING.get(b, 0.8) for b in bands}
    elif not hasattr(seeing_fwhm, 'items'):
        import astropy.units as u

        if isinstance(seeing_fwhm, u.Quantity):
            seeing_fwhm = _as_float_array(seeing_fwhm, 'seeing_fwhm')
        values = np.atleast_1d(np.asarray(seeing_fwhm, dtype=float))
        if values.size == 1:
            values = np.repeat(values, len(bands))
        if values.size != len(bands):
            raise ConfigError(f'seeing_fwhm = {seeing_fwhm!r} has {values.size} '
                              f'values for {len(bands)} bands {list(bands)}; give '
                              f'one value, one per band, or a dict band -> FWHM.')
        seeing_fwhm = dict(zip(bands, values.tolist(), strict=True))
    missing = [b for b in bands if b not in seeing_fwhm]
    if missing:
        raise ConfigError(f'seeing_fwhm has no value for band(s) {missing}; give '
                          f'one FWHM in arcsec per band, e.g. {{"g": 0.9, ...}}.')
    out = {}
    for band in bands:
        value = _as_float(seeing_fwhm[band], 'arcsec', f'seeing_fwhm[{band!r}]')
        if not np.isfinite(value) or value <= 0:
            raise ConfigError(f'seeing_fwhm[{band!r}] = {value}; give a positive '
                              f'FWHM in arcsec.')
        out[band] = value
    return out


def _as_float(value, unit, name):
    """A float from a number or a Quantity convertible to ``unit``."""
    import astropy.units as u

    try:
        if isinstance(value, u.Quantity):
            return float(value.to_value(unit, equivalencies=[
                (u.arcsec, u.arcsec / u.pix)]))
        return float(value)
    except (TypeError, ValueError, u.UnitsError):
        raise ConfigError(f'{name} = {value!r}; give a number or a Quantity in '
                          f'{unit}.') from None


def _as_float_array(quantity, name):
    import astropy.units as u

    try:
        return quantity.to_value(u.arcsec)
    except u.UnitsError:
        raise ConfigError(f'{name} = {quantity!r}; give angles, e.g. 0.8 * '
                          f'u.arcsec.') from None


def _check_range(name, value_range, *, low_bound=0.0):
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ConfigError(f'{name} = {value_range!r}; give (low, high).') from None
    if not (np.isfinite(low) and np.isfinite(high) and low_bound < low <= high):
        raise ConfigError(f'{name} = {value_range!r}; give (low, high) with '
                          f'{low_bound} < low <= high.')
    return low, high


def _place_sources(rng, shape, n_galaxies, n_stars, *, min_separation,
                   star_separation, galaxy_margin, star_margin):
    """Random positions (x, y), galaxies first: every galaxy at least
    ``min_separation`` pixels from every other source, stars at least
    ``star_separation`` from each other. Sequential random placement (random
    candidates, the first that fits is kept)."""
    ny, nx = shape
    placed = np.empty((0, 2))
    # Per group: count, margin, distance to galaxies, distance to stars.
    groups = ((n_galaxies, galaxy_margin, min_separation, min_separation),
              (n_stars, star_margin, min_separation, star_separation))
    for count, margin, to_galaxy, to_star in groups:
        low = np.array([margin, margin], dtype=float)
        high = np.array([nx - 1 - margin, ny - 1 - margin], dtype=float)
        if count and np.any(high <= low):
            raise ConfigError(f'the {nx}x{ny} image is too small for sources '
                              f'{margin} pixels from its edges; give a larger '
                              f'shape.')
        for _ in range(count):
            candidates = rng.uniform(low, high, (_PLACEMENT_CANDIDATES, 2))
            limit = np.where(np.arange(len(placed)) < n_galaxies, to_galaxy,
                             to_star)
            distance = np.hypot(candidates[:, None, 0] - placed[None, :, 0],
                                candidates[:, None, 1] - placed[None, :, 1])
            fits = np.all(distance >= limit[None, :], axis=1)
            if not fits.any():
                raise ConfigError(
                    f'cannot place {n_galaxies} galaxies and {n_stars} stars on a '
                    f'{nx}x{ny} image with galaxies {min_separation} pixels and '
                    f'stars {star_separation} pixels apart (placed '
                    f'{min(len(placed), n_galaxies)} galaxies and '
                    f'{max(len(placed) - n_galaxies, 0)} stars); give a larger '
                    f'shape, fewer sources or smaller separations.')
            placed = np.vstack([placed, candidates[np.argmax(fits)]])
    return placed


def _exposure_wcs(shape, pixel_scale, centre, offset):
    """A TAN WCS with north up, east left, the reference pixel at the image
    centre shifted by ``offset`` (x, y) pixels."""
    from astropy.wcs import WCS

    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.cunit = ['deg', 'deg']
    wcs.wcs.crval = list(centre)
    wcs.wcs.crpix = [(nx + 1) / 2 + offset[0], (ny + 1) / 2 + offset[1]]
    wcs.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    wcs.wcs.radesys = 'ICRS'
    wcs.pixel_shape = (nx, ny)
    return wcs


def _draw_at(profile, image, x, y, half_size):
    """Add ``profile`` (pixel-integrated) into the GalSim ``image`` with its
    centre at 0-based pixel (x, y), drawn on the box of ``half_size`` pixels
    around the nearest pixel."""
    import galsim

    ix, iy = int(np.floor(x + 0.5)) + 1, int(np.floor(y + 0.5)) + 1  # 1-based
    bounds = galsim.BoundsI(ix - half_size, ix + half_size, iy - half_size,
                            iy + half_size) & image.bounds
    if not bounds.isDefined():
        return
    # GalSim pixel centres are at integers starting from 1.
    profile.drawImage(image=image[bounds], add_to_image=True, method='auto',
                      center=galsim.PositionD(x + 1.0, y + 1.0))


def simulate_exposure(shape=(512, 512), *, bands=('g', 'r', 'i'), n_galaxies=60,
                      n_stars=40, pixel_scale=0.2, seeing_fwhm=None, psf_beta=3.5,
                      sky_sigma=1.0, galaxy_flux_range=(1500.0, 15000.0),
                      star_flux_range=(5000.0, 50000.0),
                      half_light_radius_range=(0.8, 1.6), min_separation=40.0,
                      star_separation=25.0, config=None, unit='adu', seed=0,
                      wcs_offsets=True):
    """Simulate multi-band exposures of a field of galaxies and stars.

    Each band is an image with a TAN WCS (north up, east left, centred on
    RA 150, Dec 2) in which every galaxy is drawn by GalSim as its profile
    convolved with the band's Moffat PSF (``galsim.Convolve``, pixel-integrated
    with ``method='auto'``), every star as the PSF itself, plus Gaussian sky
    noise. Galaxies are the bulge + disk + knots profiles of the stamp
    simulations (`simulate_stamps`, drawn with the morphology ranges of
    ``config``), shifted so that their light centroid is the catalogued
    position. A galaxy's shape is the same in every band; its colour is a flux
    ratio drawn per galaxy (``config.band_beta`` times a log-normal scatter of
    ``config.band_color_scatter_dex``, as in the stamp simulations) -- the
    stamp simulations' non-linear band transforms act on pixels and have no
    counterpart for a profile drawn through GalSim's convolution. Stars get a
    colour the same way.

    Sources are placed at random: galaxies at least ``min_separation`` pixels
    from every other source and 32 pixels from the edges (so that 64x64 stamps
    around them hold one source and lie on the image), stars at least
    ``star_separation`` pixels from each other and 13 pixels from the edges
    (isolated in the 25x25 boxes of `psfdeconv.psf.find_stars`). Nothing is
    saturated and the sky level is 0 (a background-subtracted exposure).

    Parameters
    ----------
    shape : tuple of int, optional
        (ny, nx) of every band.
    bands : sequence of str, optional
        Band names; the first band's pixels give the truth's ``x``, ``y``.
    n_galaxies, n_stars : int, optional
        Numbers of sources.
    pixel_scale : float or `~astropy.units.Quantity`, optional
        arcsec/pixel, the same in every band.
    seeing_fwhm : dict, float or sequence, optional
        Moffat FWHM per band in arcsec (or angle Quantities). Default
        ``{'g': 0.9, 'r': 0.8, 'i': 0.75}`` (0.8 for other band names).
    psf_beta : float, optional
        Moffat power index of every band's PSF.
    sky_sigma : float, optional
        Standard deviation of the Gaussian sky noise per pixel, in ``unit``;
        0 for noise-free images.
    galaxy_flux_range, star_flux_range : tuple of float, optional
        Log-uniform range of the first band's total flux, in ``unit``.
    half_light_radius_range : tuple of float, optional
        Log-uniform range of the galaxies' disk half-light radius, arcsec.
        Its lower end keeps galaxies resolved (wider than the stars by more
        than the 25 percent of `~psfdeconv.psf.find_stars`).
    min_separation, star_separation : float, optional
        Smallest distances in pixels (see above).
    config : `SimulationConfig`, optional
        Morphology ranges (bulge fraction, knots, ellipticity) and colours.
    unit : str or `~astropy.units.Unit`, optional
        Unit of the pixel values (``BUNIT``).
    seed : int, optional
        Seed: the same seed gives identical exposures and truth.
    wcs_offsets : bool, optional
        Shift the reference pixel (CRPIX) of each band after the first by a
        random amount in [-0.5, 0.5] pixel per axis, so that the bands' pixel
        grids differ slightly (as in real, separately registered exposures).

    Returns
    -------
    exposures : dict of str to `~astropy.nddata.CCDData`
        Per band: float64 (ny, nx) data in ``unit``, the celestial ``wcs``,
        a `~astropy.nddata.StdDevUncertainty` of ``sky_sigma`` (None when it
        is 0), and ``meta`` with ``BAND``, ``SEEING`` (arcsec), ``PSFBETA``,
        ``SKYSIG``, ``PIXSCALE`` and ``SEED``.
    truth : `~astropy.table.QTable`
        One row per source, galaxies first: ``id``, ``kind`` ('galaxy' or
        'star'), ``ra``, ``dec`` (deg; the light centroid), ``x``, ``y``
        (0-based pixels of the first band), ``x_<band>``, ``y_<band>`` per
        band, ``flux_<band>`` (the profile's total flux in ``unit``; the
        drawn image holds that minus the wings beyond the drawing box) and
        ``half_light_radius`` (arcsec, 0 for stars). ``meta`` records the
        parameters.

    Raises
    ------
    psfdeconv.exceptions.ConfigError
        For a parameter out of range, or sources that cannot be placed
        with the requested separations.

    Examples
    --------
    >>> from psfdeconv.simulate import simulate_exposure
    >>> exposures, truth = simulate_exposure((128, 128), n_galaxies=2, n_stars=3,
    ...                                      seed=1)
    >>> print(list(exposures), exposures['r'].shape, exposures['r'].unit)
    ['g', 'r', 'i'] (128, 128) adu
    >>> print(len(truth), truth['kind'].tolist())
    5 ['galaxy', 'galaxy', 'star', 'star', 'star']
    """
    import astropy.units as u
    import galsim
    from astropy.nddata import CCDData, StdDevUncertainty
    from astropy.table import QTable

    config = SimulationConfig() if config is None else config
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ConfigError(f'shape = {shape!r}; give (ny, nx) in pixels.') from None
    if ny < 16 or nx < 16:
        raise ConfigError(f'shape = {shape!r}; give at least 16x16 pixels.')
    if isinstance(bands, str):
        bands = (bands,)
    bands = tuple(str(b) for b in bands)
    if not bands or len(set(bands)) != len(bands) or \
            not all(is_band_name(b) for b in bands):
        raise ConfigError(f'bands = {bands!r}; give distinct band names made of '
                          f'ASCII letters, digits and underscores, e.g. ("g", "r", "i").')
    for name, value in (('n_galaxies', n_galaxies), ('n_stars', n_stars)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ConfigError(f'{name} = {value!r}; give an integer >= 0.')
    n_galaxies, n_stars = int(n_galaxies), int(n_stars)
    if n_galaxies + n_stars == 0:
        raise ConfigError('n_galaxies = n_stars = 0; give at least one source.')
    scale = _as_float(pixel_scale, u.arcsec / u.pix, 'pixel_scale')
    if not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f'pixel_scale = {pixel_scale!r}; give a positive '
                          f'number of arcsec per pixel.')
    seeing = _exposure_seeing(seeing_fwhm, bands)
    psf_beta = float(psf_beta)
    if not np.isfinite(psf_beta) or psf_beta <= 1.1:
        raise ConfigError(f'psf_beta = {psf_beta}; the Moffat index must exceed '
                          f'1.1.')
    sky_sigma = float(sky_sigma)
    if not np.isfinite(sky_sigma) or sky_sigma < 0:
        raise ConfigError(f'sky_sigma = {sky_sigma}; give a noise standard '
                          f'deviation >= 0.')
    galaxy_flux_range = _check_range('galaxy_flux_range', galaxy_flux_range)
    star_flux_range = _check_range('star_flux_range', star_flux_range)
    half_light_radius_range = _check_range('half_light_radius_range',
                                           half_light_radius_range)
    for name, value in (('min_separation', min_separation),
                        ('star_separation', star_separation)):
        if not np.isfinite(value) or value < 0:
            raise ConfigError(f'{name} = {value!r}; give a distance >= 0 in '
                              f'pixels.')
    try:
        unit = u.Unit(unit)
    except (TypeError, ValueError):
        raise ConfigError(f'unit = {unit!r} is not an astropy unit; give e.g. '
                          f'"adu" or "electron".') from None

    rng = np.random.default_rng(seed)
    offsets = np.zeros((len(bands), 2))
    if wcs_offsets:
        offsets[1:] = rng.uniform(-_EXPOSURE_MAX_WCS_OFFSET,
                                  _EXPOSURE_MAX_WCS_OFFSET, (len(bands) - 1, 2))
    wcs = {band: _exposure_wcs((ny, nx), scale, _EXPOSURE_CENTRE, offsets[b])
           for b, band in enumerate(bands)}
    positions = _place_sources(rng, (ny, nx), n_galaxies, n_stars,
                               min_separation=float(min_separation),
                               star_separation=float(star_separation),
                               galaxy_margin=32, star_margin=13)
    n = n_galaxies + n_stars
    is_galaxy = np.arange(n) < n_galaxies
    sky = wcs[bands[0]].pixel_to_world(positions[:, 0], positions[:, 1])
    pixels = {band: np.transpose(wcs[band].world_to_pixel(sky)) for band in bands}
    pixels[bands[0]] = positions  # exact, not round-tripped through the sky

    flux = np.empty((n, len(bands)))
    flux[:, 0] = np.where(is_galaxy, _draw_log_uniform(rng, galaxy_flux_range, n),
                          _draw_log_uniform(rng, star_flux_range, n))
    for b in range(1, len(bands)):
        beta = config.band_beta[b] if b < len(config.band_beta) else 1.0
        flux[:, b] = flux[:, 0] * beta * 10.0 ** rng.normal(
            0.0, config.band_color_scatter_dex, n)
    half_light_radius = np.where(
        is_galaxy, _draw_log_uniform(rng, half_light_radius_range, n), 0.0)
    # Unit-flux galaxy profiles, their light centroid moved to the origin
    # (random knots and bulge shifts move it off the nominal centre).
    profiles = []
    for i in np.flatnonzero(is_galaxy):
        profile = _galaxy_profile(rng, config, half_light_radius[i])
        centroid = profile.centroid
        profiles.append(profile.shift(-centroid.x, -centroid.y))

    exposures = {}
    for b, band in enumerate(bands):
        psf = galsim.Moffat(beta=psf_beta, fwhm=seeing[band])
        image = galsim.ImageD(nx, ny, scale=scale)
        star_half = int(np.ceil(_STAR_DRAW_HALF_SIZE_FWHM * seeing[band] / scale))
        for i in range(n):
            x, y = pixels[band][i]
            if is_galaxy[i]:
                source = galsim.Convolve(profiles[i].withFlux(flux[i, b]), psf)
                _draw_at(source, image, x, y, _GALAXY_DRAW_HALF_SIZE)
            else:
                _draw_at(psf.withFlux(flux[i, b]), image, x, y, star_half)
        data = image.array.astype(np.float64)
        uncertainty = None
        if sky_sigma > 0:
            data += rng.normal(0.0, sky_sigma, data.shape)
            uncertainty = StdDevUncertainty(np.full(data.shape, sky_sigma))
        meta = {'BAND': band, 'SEEING': seeing[band], 'PSFBETA': psf_beta,
                'SKYSIG': sky_sigma, 'PIXSCALE': scale, 'SEED': seed}
        exposures[band] = CCDData(data, unit=unit, wcs=wcs[band],
                                  uncertainty=uncertainty, meta=meta)

    truth = QTable()
    truth['id'] = np.arange(n)
    truth['kind'] = np.where(is_galaxy, 'galaxy', 'star')
    truth['ra'] = sky.ra.to(u.deg)
    truth['dec'] = sky.dec.to(u.deg)
    truth['x'] = positions[:, 0] * u.pix
    truth['y'] = positions[:, 1] * u.pix
    for band in bands:
        truth[f'x_{band}'] = pixels[band][:, 0] * u.pix
        truth[f'y_{band}'] = pixels[band][:, 1] * u.pix
    for b, band in enumerate(bands):
        truth[f'flux_{band}'] = flux[:, b] * unit
    truth['half_light_radius'] = half_light_radius * u.arcsec
    for name, values in _truth_shapes(profiles, is_galaxy, scale).items():
        truth[name] = values
    descriptions = {
        'id': 'Source index', 'kind': "'galaxy' or 'star'",
        'ra': 'Right ascension of the light centroid (ICRS)',
        'dec': 'Declination of the light centroid (ICRS)',
        'x': f'Column of the light centroid in band {bands[0]}, 0-based',
        'y': f'Row of the light centroid in band {bands[0]}, 0-based',
        'half_light_radius': 'Disk half-light radius (0 for stars)',
        'e1_true': 'Unweighted e1 of the PSF-free, pixel-integrated profile '
                   '(NaN for stars)',
        'e2_true': 'Unweighted e2 of the PSF-free, pixel-integrated profile',
        'size_true': 'Unweighted size sqrt(Mxx+Myy) of the PSF-free profile',
        'hsm_e1_true': 'HSM adaptive-moment e1 of the PSF-free profile',
        'hsm_e2_true': 'HSM adaptive-moment e2 of the PSF-free profile',
        'hsm_sigma_true': 'HSM adaptive-moment width of the PSF-free profile'}
    for band in bands:
        descriptions[f'x_{band}'] = f'Column in band {band}, 0-based'
        descriptions[f'y_{band}'] = f'Row in band {band}, 0-based'
        descriptions[f'flux_{band}'] = f'Total flux of the profile, band {band}'
    for name, text in descriptions.items():
        truth[name].info.description = text
    truth.meta.update({
        'bands': list(bands), 'shape': [ny, nx], 'pixel_scale': scale,
        'seeing_fwhm': dict(seeing), 'psf_beta': psf_beta, 'sky_sigma': sky_sigma,
        'seed': seed, 'unit': unit.to_string(),
        'crpix_offsets': {band: offsets[b].tolist() for b, band in enumerate(bands)},
    })
    return exposures, truth


def _truth_shapes(profiles, is_galaxy, scale, size=64):
    """Moments of each galaxy's PSF-free profile drawn on a ``size`` stamp at
    the exposure's pixel scale, as `psfdeconv.measure` measures a
    deconvolved stamp (NaN for stars)."""
    import astropy.units as u

    from .measure import hsm_moments, image_moments

    n = is_galaxy.size
    columns = {name: np.full(n, np.nan) for name in
               ('e1_true', 'e2_true', 'size_true', 'hsm_e1_true', 'hsm_e2_true',
                'hsm_sigma_true')}
    index = np.flatnonzero(is_galaxy)
    if index.size:
        images = np.stack([profile.drawImage(nx=size, ny=size, scale=scale).array
                           for profile in profiles])[:, None]
        moments = image_moments(images, pixel_scale=scale)
        shapes = hsm_moments(images, pixel_scale=scale)
        for name, values in (('e1', moments['e1']), ('e2', moments['e2']),
                             ('size', moments['size']), ('hsm_e1', shapes['hsm_e1']),
                             ('hsm_e2', shapes['hsm_e2']),
                             ('hsm_sigma', shapes['hsm_sigma'])):
            columns[f'{name}_true'][index] = np.asarray(values, float)[:, 0]
    for name in ('size_true', 'hsm_sigma_true'):
        columns[name] = columns[name] * u.arcsec
    return columns


def write_exposure_set(directory, exposures, truth=None, *, overwrite=False):
    """Write simulated exposures as ``<band>.fits`` and the truth as
    ``truth.ecsv``.

    Each FITS file holds the image (float32) with its WCS, ``BUNIT`` and the
    exposure's ``meta`` as header keywords in the primary HDU and, when the
    exposure has an uncertainty, the inverse variance in an extension
    ``WEIGHT`` (read it with ``psfdeconv.io.read_exposure(path,
    weight_hdu='WEIGHT')``). Every file is written atomically
    (`psfdeconv.io.atomic_path`), and nothing is written when one of them
    exists and ``overwrite`` is False.

    Parameters
    ----------
    directory : str or `~pathlib.Path`
        Output directory (created if needed).
    exposures : dict of str to `~astropy.nddata.CCDData`
        From `simulate_exposure`.
    truth : `~astropy.table.Table`, optional
        The truth table, written as ECSV.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    paths : dict of str to `~pathlib.Path`
        Band name (and ``'truth'``) to the written file.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If a file exists and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile
    >>> from psfdeconv.simulate import simulate_exposure, write_exposure_set
    >>> exposures, truth = simulate_exposure((96, 96), n_galaxies=1, n_stars=2)
    >>> paths = write_exposure_set(tempfile.mkdtemp(), exposures, truth)
    >>> print(sorted(path.name for path in paths.values()))
    ['g.fits', 'i.fits', 'r.fits', 'truth.ecsv']
    """
    from astropy.io import fits
    from astropy.nddata import InverseVariance

    from .io import atomic_path, check_writable, fits_unit_string, write_table

    if not hasattr(exposures, 'items') or not exposures:
        raise ConfigError('exposures must be a non-empty dict of band name to '
                          'CCDData (from simulate_exposure).')
    directory = Path(directory)
    targets = {band: directory / f'{band}.fits' for band in exposures}
    if truth is not None:
        targets['truth'] = directory / 'truth.ecsv'
    for path in targets.values():
        check_writable(path, overwrite=overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    for band, exposure in exposures.items():
        header = exposure.wcs.to_header() if exposure.wcs is not None \
            else fits.Header()
        unit = getattr(exposure, 'unit', None)
        if unit is not None:
            header['BUNIT'] = fits_unit_string(unit)
        for key, value in dict(exposure.meta or {}).items():
            if isinstance(value, str | int | float | bool) and len(key) <= 8:
                header[key.upper()] = value
        hdus = [fits.PrimaryHDU(np.asarray(exposure.data, dtype=np.float32),
                                header=header)]
        if exposure.uncertainty is not None:
            weight = exposure.uncertainty.represent_as(InverseVariance).array
            hdus.append(fits.ImageHDU(np.asarray(weight, dtype=np.float32),
                                      name='WEIGHT'))
        with atomic_path(targets[band], overwrite=overwrite) as tmp:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
    if truth is not None:
        write_table(truth, targets['truth'], overwrite=overwrite)
    return targets
