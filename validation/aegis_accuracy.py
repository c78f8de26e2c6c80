"""Accuracy on real galaxy morphologies: AEGIS HST galaxies re-observed from the ground.

The five AEGIS galaxies of GalSim's real-galaxy test catalogue (HST ACS F606W and F814W at
0.03 arcsec/pixel) are rotated at random, drawn at a ground-based pixel scale (the truth: the
HST image integrated over the coarser pixels, its own 0.1 arcsec PSF negligible beside the
ground seeing), convolved with a Moffat or Kolmogorov PSF and given white noise at a drawn
matched-filter SNR; the stamps are then deconvolved with a psfdeconv model and with an oracle
Wiener filter (per stamp, the regularisation that minimises its error against the truth).
None of these galaxies is ever used in training: this is a check on morphologies the
simulations do not make (clumps, asymmetries, spiral structure, small sizes).

The 3-band models see F606W, the mean of F606W and F814W, and F814W as their three bands;
the 1-band model sees F814W. Per SNR bin the script prints the median flux error of
``flux_corrected`` against the truth, the median HSM size ratio, the RMS of the HSM
ellipticity errors (distortion e1, e2), and the HSM failure rates of the output, the
observed stamp and the Wiener output. Per galaxy it then prints what limits the flux check:
the noise of the truth flux itself (the sum of a noisy HST stamp; the catalogue's pixel
variance with the ACS correlation function) and the errors of ``flux_corrected`` and
``flux_residual`` (the refit's profile error taken from its residual,
`psfdeconv.deconvolve.residual_flux`). With ``--target-fwhm`` the outputs and the truth are
both convolved with a round Gaussian of that FWHM (arcsec) before they are measured: the
shapes of a deconvolution to a small target PSF instead of to the pixel scale, with the
residual update of `psfdeconv.target.residual_update` unless ``--no-target-update``
(``--band-coherence C`` applies the update with that band coherence instead of the
shipped one)::

    python validation/aegis_accuracy.py AEGIS_DIR [--model M.keras] [--n-per-galaxy 64]
        [--seed 0] [--symmetries N] [--target-fwhm ARCSEC] [--no-target-update]
        [--band-coherence C]

AEGIS_DIR holds ``AEGIS_F606w_catalog.fits``, ``AEGIS_F814w_catalog.fits`` and the image
files they name (GalSim's ``tests/real_comparison_images``).
"""

import argparse

import numpy as np
from scipy.signal import fftconvolve

STAMP = 64
PSF_SIZE = 41
SNR_BINS = ((10.0, 20.0), (20.0, 40.0), (40.0, 80.0), (80.0, 200.0))


def _galaxies(directory):
    """InterpolatedImages of the HST images, per galaxy: (F606W, F814W)."""
    import galsim

    catalogs = [galsim.RealGalaxyCatalog(f'AEGIS_{band}_catalog.fits', dir=directory)
                for band in ('F606w', 'F814w')]
    return [tuple(galsim.RealGalaxy(catalog, index=i).original_gal for catalog in catalogs)
            for i in range(catalogs[0].nobjects)]


def _ground_psf(rng, scale):
    """A pixel-integrated, unit-sum ground-based PSF image and its profile."""
    import galsim

    fwhm = rng.uniform(0.6, 1.1)
    if rng.random() < 0.5:
        profile = galsim.Moffat(beta=rng.uniform(2.5, 4.5), fwhm=fwhm)
    else:
        profile = galsim.Kolmogorov(fwhm=fwhm)
    g = rng.uniform(0.0, 0.03)
    angle = rng.uniform(0.0, np.pi)
    profile = profile.shear(g1=g * np.cos(2 * angle), g2=g * np.sin(2 * angle))
    image = profile.drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=scale).array
    return image / image.sum()


def make_stamps(directory, n_per_galaxy, seed, n_bands):
    """Truth, observed stamps, PSFs, pixel scales and noise of the re-observed galaxies."""
    import galsim

    rng = np.random.default_rng(seed)
    galaxies = _galaxies(directory)
    n = len(galaxies) * n_per_galaxy
    truth = np.empty((n, n_bands, STAMP, STAMP))
    psfs = np.empty((n, n_bands, PSF_SIZE, PSF_SIZE))
    scale = rng.uniform(0.15, 0.25, n)
    snr = np.exp(rng.uniform(np.log(SNR_BINS[0][0]), np.log(SNR_BINS[-1][1]), n))
    angle = rng.uniform(0.0, 2 * np.pi, n)
    offset = rng.uniform(-0.5, 0.5, (n, 2))
    galaxy_index = np.repeat(np.arange(len(galaxies)), n_per_galaxy)
    for i in range(n):
        f606, f814 = (g.rotate(angle[i] * galsim.radians) for g in galaxies[galaxy_index[i]])
        # Each band's flux in its own HST units; the network sees per-band max-scaled inputs.
        bands = ([f606, 0.5 * (f606 + f814), f814] if n_bands == 3 else [f814])
        for b, profile in enumerate(bands):
            # GalSim centres an even image between pixels: half a pixel puts the galaxy on
            # the stamp's centre pixel (n // 2), as in psfdeconv's simulations.
            truth[i, b] = profile.drawImage(nx=STAMP, ny=STAMP, scale=scale[i],
                                            offset=tuple(0.5 + offset[i])).array
            psfs[i, b] = _ground_psf(rng, scale[i])
    noiseless = np.stack([[fftconvolve(t, p, mode='same') for t, p in zip(ti, pi, strict=True)]
                          for ti, pi in zip(truth, psfs, strict=True)])
    # The matched-filter SNR of psfdeconv's simulations, in the reddest band.
    sigma = np.sqrt((noiseless[:, -1] ** 2).sum(axis=(-2, -1))) / snr
    noise_sigma = np.repeat(sigma[:, None], n_bands, axis=1)
    observed = noiseless + rng.normal(size=noiseless.shape) * noise_sigma[..., None, None]
    return dict(truth=truth, observed=observed, psf=psfs, pixel_scale=scale,
                noise_sigma=noise_sigma, snr=snr, galaxy=galaxy_index)


def truth_flux_noise(directory):
    """Per galaxy, F814W: catalogue IDENT, HST stamp shape and the relative 1-sigma
    noise of the stamp's flux.

    The truth flux is the sum of a noisy HST stamp: the noise of the sum over N pixels
    is sqrt(N var sum(xi) / xi(0)), xi the correlation function of the ACS noise (the
    catalogue's ``NOISE_FILENAME``; its sum is 6 times its peak, so the noise is 2.4 times
    that of white noise).
    """
    import galsim
    from astropy.io import fits

    catalog = galsim.RealGalaxyCatalog('AEGIS_F814w_catalog.fits', dir=directory)
    rows = []
    for i in range(catalog.nobjects):
        image = catalog.getGalImage(i).array.astype(float)
        flux = image.sum()
        cf = fits.getdata(catalog.noise_file_name[i])
        variance = catalog.variance[i] * image.size * cf.sum() / cf.max()
        rows.append(dict(ident=int(catalog.ident[i]), shape=image.shape,
                         noise=np.sqrt(variance) / flux))
    return rows


def per_galaxy_flux(sims, flux_corrected, flux_residual):
    """Per galaxy, reddest band: stamps, median ``flux_corrected`` error (all and SNR > 80)
    and median ``flux_residual`` error (SNR > 80)."""
    true_flux = sims['truth'][:, -1].sum(axis=(-2, -1))
    error = flux_corrected[:, -1] / true_flux - 1
    residual = flux_residual[:, -1] / true_flux - 1
    rows = []
    for g in np.unique(sims['galaxy']):
        sel = sims['galaxy'] == g
        high = sel & (sims['snr'] >= SNR_BINS[-1][0])
        rows.append(dict(n=int(sel.sum()), n_high=int(high.sum()),
                         flux=np.median(error[sel]), flux_high=np.median(error[high]),
                         residual_high=np.median(residual[high])))
    return rows


def per_tertile_flux(sims, flux_corrected, flux_residual):
    """Per tertile of the matched-filter SNR, reddest band: stamps, and the median
    errors of ``flux_corrected`` and ``flux_residual`` with the error of each median
    (1.25 MAD / sqrt(n), as standard deviation)."""
    from astropy.stats import mad_std

    true_flux = sims['truth'][:, -1].sum(axis=(-2, -1))
    edges = np.quantile(sims['snr'], [0, 1 / 3, 2 / 3, 1])
    third = np.clip(np.searchsorted(edges, sims['snr'], side='right') - 1, 0, 2)
    rows = []
    for k in range(3):
        sel = third == k
        row = dict(snr=f'{edges[k]:.0f}-{edges[k + 1]:.0f}', n=int(sel.sum()))
        for name, flux in (('flux_corrected', flux_corrected), ('flux_residual', flux_residual)):
            error = flux[sel, -1] / true_flux[sel] - 1
            row[name] = (np.median(error), 1.25 * mad_std(error) / np.sqrt(sel.sum()))
        rows.append(row)
    return rows


def oracle_wiener(observed, psfs, truth):
    """The Wiener filter whose constant regularisation minimises each stamp's squared
    error against the truth (an upper bound of what a Wiener filter can do)."""
    from psfdeconv.evaluate import wiener_deconvolve

    best = np.zeros_like(truth)
    best_error = np.full(truth.shape[:2], np.inf)
    for balance in np.logspace(-4, 1, 16):
        images = wiener_deconvolve(observed, psfs, balance=balance)
        error = ((images - truth) ** 2).sum(axis=(-2, -1))
        better = error < best_error
        best[better] = images[better]
        best_error = np.minimum(error, best_error)
    return best


def to_target(images, pixel_scale, fwhm):
    """Images convolved with a round Gaussian of ``fwhm`` arcsec (flux kept), the
    kernels of ``deconvolve_stamps(..., target_psf=fwhm)``."""
    from psfdeconv.target import convolve_to_target, target_psf_images

    kernels = target_psf_images(fwhm, pixel_scale, len(images), images.shape[-2:])
    return convolve_to_target(images, kernels)


def _median_and_mad_std(values):
    from astropy.stats import mad_std

    return np.median(values), mad_std(values)


def summarise(name, sims, images, flux_corrected=None, target_fwhm=None,
              flux_residual=None):
    """Rows per SNR bin for one method (reddest band)."""
    from psfdeconv.measure import hsm_moments

    truth_images = sims['truth']
    if target_fwhm is not None and name != 'observed':
        truth_images = to_target(truth_images, sims['pixel_scale'], target_fwhm)
        if name != 'psfdeconv':  # deconvolve_stamps applied the target itself
            images = to_target(images, sims['pixel_scale'], target_fwhm)
    truth = hsm_moments(truth_images[:, -1])
    out = hsm_moments(images[:, -1])
    rows = []
    for low, high in SNR_BINS:
        sel = (sims['snr'] >= low) & (sims['snr'] < high)
        ok = sel & (truth['hsm_status'] == 0) & (out['hsm_status'] == 0)
        de = np.concatenate([out['hsm_e1'][ok] - truth['hsm_e1'][ok],
                             out['hsm_e2'][ok] - truth['hsm_e2'][ok]])
        flux = (flux_corrected[sel, -1] if flux_corrected is not None
                else images[sel, -1].sum(axis=(-2, -1)))
        true_flux = sims['truth'][sel, -1].sum(axis=(-2, -1))
        residual = (None if flux_residual is None
                    else _median_and_mad_std(flux_residual[sel, -1] / true_flux - 1))
        rows.append(dict(method=name, snr=f'{low:g}-{high:g}', n=int(sel.sum()),
                         flux=_median_and_mad_std(flux / true_flux - 1), flux_residual=residual,
                         size=np.median(out['hsm_sigma'][ok] / truth['hsm_sigma'][ok]) - 1,
                         e_rms=np.sqrt(np.mean(de ** 2)),
                         hsm_failed=np.mean(out['hsm_status'][sel] != 0)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('aegis_dir')
    parser.add_argument('--model', default=None,
                        help='a .keras model (default: the shipped 3-band model)')
    parser.add_argument('--n-per-galaxy', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--symmetries', type=int, default=None)
    parser.add_argument('--precision', default='float32',
                        choices=('float32', 'auto', 'bfloat16'),
                        help="the network's arithmetic (deconvolve_stamps' precision)")
    parser.add_argument('--target-fwhm', type=float, default=None,
                        help='measure shapes after a Gaussian of this FWHM (arcsec)')
    parser.add_argument('--no-target-update', action='store_true',
                        help='only convolve the output with the target (no residual update)')
    parser.add_argument('--band-coherence', type=float, default=None,
                        help='the residual update\'s band coherence (default: the shipped one)')
    args = parser.parse_args(argv)
    if args.band_coherence is not None and (args.target_fwhm is None
                                            or args.no_target_update):
        parser.error('--band-coherence needs --target-fwhm and the residual update')

    import psfdeconv

    model = psfdeconv.load_model(args.model)
    n_bands = model.card['n_bands']
    sims = make_stamps(args.aegis_dir, args.n_per_galaxy, args.seed, n_bands)
    own_update = args.band_coherence is not None
    images, details = psfdeconv.deconvolve_stamps(
        sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'], model=model,
        noise_sigma=sims['noise_sigma'], symmetries=args.symmetries,
        target_psf=None if own_update else args.target_fwhm,
        target_update=not args.no_target_update, return_details=True,
        precision=args.precision)
    if own_update:
        # deconvolve_stamps' own last step, with another band coherence.
        from psfdeconv.target import residual_update, target_psf_images

        kernels = target_psf_images(args.target_fwhm, sims['pixel_scale'], len(images),
                                    images.shape[-2:])
        psfs = sims['psf'] / sims['psf'].sum(axis=(-2, -1), keepdims=True)
        images = residual_update(images, sims['observed'].astype(np.float32), psfs, kernels,
                                 details['noise_sigma'], band_coherence=args.band_coherence)
    wiener = oracle_wiener(sims['observed'], sims['psf'], sims['truth'])
    rows = (summarise('psfdeconv', sims, images, details['flux_corrected'],
                      target_fwhm=args.target_fwhm, flux_residual=details['flux_residual'])
            + summarise('wiener_oracle', sims, wiener, target_fwhm=args.target_fwhm)
            + summarise('observed', sims, sims['observed']))
    print(f'model {model.card.get("name")} (weights SHA-256 '
          f'{model.card.get("weights_sha256", "?")[:12]}), {len(sims["snr"])} stamps, '
          f'seed {args.seed}, target FWHM {args.target_fwhm} arcsec'
          + (', no residual update' if args.no_target_update else '')
          + (f', band coherence {args.band_coherence:g}' if own_update else ''))
    print('flux: flux_corrected and flux_residual against the truth, median / MAD')
    print(f'{"method":14s} {"SNR":>7s} {"n":>4s} {"flux-1":>13s} {"resid-1":>13s} '
          f'{"size-1":>7s} {"e RMS":>6s} {"HSM fail":>8s}')
    for row in rows:
        size = '' if row['method'] == 'observed' else f'{row["size"]:+7.3f}'
        e_rms = '' if row['method'] == 'observed' else f'{row["e_rms"]:6.3f}'
        flux = ('' if row['method'] == 'observed'
                else '{:+7.3f}/{:.3f}'.format(*row['flux']))
        resid = ('' if row['flux_residual'] is None
                 else '{:+7.3f}/{:.3f}'.format(*row['flux_residual']))
        print(f'{row["method"]:14s} {row["snr"]:>7s} {row["n"]:4d} {flux:>13s} {resid:>13s} '
              f'{size:>7s} {e_rms:>6s} {row["hsm_failed"]:8.1%}')
    if args.target_fwhm is None:
        print(f'\nper galaxy, {"F814W" if n_bands == 3 else "the band"}: truth flux noise, '
              f'flux_corrected-1 (all, SNR > 80), flux_residual-1 (SNR > 80)')
        print(f'{"IDENT":>6s} {"HST px":>8s} {"noise":>6s} {"n":>3s} '
              f'{"flux-1":>7s} {"n>80":>4s} {"flux-1":>7s} {"resid-1":>7s}')
        noise_rows = truth_flux_noise(args.aegis_dir)
        flux_rows = per_galaxy_flux(sims, details['flux_corrected'],
                                    details['flux_residual'])
        for nr, fr in zip(noise_rows, flux_rows, strict=True):
            shape = f'{nr["shape"][1]}x{nr["shape"][0]}'
            print(f'{nr["ident"]:6d} {shape:>8s} {nr["noise"]:6.1%} '
                  f'{fr["n"]:3d} {fr["flux"]:+7.3f} {fr["n_high"]:4d} {fr["flux_high"]:+7.3f} '
                  f'{fr["residual_high"]:+7.3f}')
        print('\nper SNR tertile: median flux error +- the error of the median')
        print(f'{"SNR":>8s} {"n":>4s} {"flux_corrected":>16s} {"flux_residual":>16s}')
        for row in per_tertile_flux(sims, details['flux_corrected'], details['flux_residual']):
            cells = ['{:+.3f} +- {:.3f}'.format(*row[name])
                     for name in ('flux_corrected', 'flux_residual')]
            print(f'{row["snr"]:>8s} {row["n"]:4d} {cells[0]:>16s} {cells[1]:>16s}')


if __name__ == '__main__':
    main()
