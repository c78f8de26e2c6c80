"""Flux accuracy on held-out simulations: ``flux_corrected`` against ``flux_residual``.

Deconvolve the first N source stamps of a simulation file (blanks left out) with
`psfdeconv.deconvolve_stamps` and print, per third of the true flux (bands pooled, stamps
the detection gate keeps), the median and the normalised median absolute deviation of
``flux_corrected / true - 1`` and of ``flux_residual / true - 1``
(`psfdeconv.deconvolve.residual_flux`), then the same per bin of the refit's SNR, with the
median weight k the residual gets::

    python validation/flux_accuracy.py TEST.h5 [--n 2000] [--model M.keras]
"""

import argparse

import numpy as np

SNR_BINS = ((0.0, 20.0), (20.0, 40.0), (40.0, 80.0), (80.0, np.inf))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('simulation')
    parser.add_argument('--n', type=int, default=2000)
    parser.add_argument('--model', default=None,
                        help='a .keras model (default: the shipped model of the band count)')
    parser.add_argument('--precision', default='float32',
                        choices=('float32', 'auto', 'bfloat16'),
                        help="the network's arithmetic (deconvolve_stamps' precision)")
    args = parser.parse_args(argv)

    from astropy.stats import mad_std

    import psfdeconv
    from psfdeconv.deconvolve import normalize_psfs, residual_flux

    sims = psfdeconv.read_simulation(args.simulation, 0, args.n)
    source = ~np.asarray(sims['is_blank'], bool)
    observed, psfs = sims['observed'][source], sims['psf'][source]
    model = psfdeconv.load_model(args.model, n_bands=observed.shape[1])
    images, details = psfdeconv.deconvolve_stamps(
        observed, psfs, pixel_scale=sims['pixel_scale'][source], model=model,
        return_details=True, precision=args.precision)
    # The weights k of the residual, recomputed from the refitted images; the gate
    # leaves out what it empties.
    fitted = details['network_output'] * details['amplitude'][..., None, None]
    weight = residual_flux(fitted, observed, normalize_psfs(psfs), details['flux_corrected'],
                           details['flux_err'], details['noise_sigma'])[2]
    kept = np.repeat(details['detected'][:, None], observed.shape[1], axis=1).ravel()
    true = sims['truth'][source].sum(axis=(-2, -1)).ravel()[kept]
    errors = {name: (details[name].ravel()[kept] / true - 1)
              for name in ('flux_corrected', 'flux_residual')}
    snr = (details['flux'] / details['flux_err']).ravel()[kept]
    weight = weight.ravel()[kept]

    print(f'model {model.card.get("name")} (weights SHA-256 '
          f'{model.card.get("weights_sha256", "?")[:12]}), {source.sum()} sources of '
          f'{args.simulation}, {kept.sum()} band stamps kept by the gate')
    print('flux / true - 1, median / MAD')
    print(f'{"bin":>14s} {"n":>5s} {"flux_corrected":>16s} {"flux_residual":>16s} {"k":>5s}')
    thirds = np.array_split(np.argsort(true), 3)
    bins = [(f'{name} third', index) for name, index in zip(('low', 'middle', 'high'),
                                                             thirds, strict=True)]
    bins += [(f'SNR {low:g}-{high:g}', np.flatnonzero((snr >= low) & (snr < high)))
             for low, high in SNR_BINS]
    for label, index in bins:
        row = [(np.median(errors[name][index]), mad_std(errors[name][index]))
               for name in ('flux_corrected', 'flux_residual')]
        print(f'{label:>14s} {len(index):5d} ' + ' '.join(
            f'{m:+8.4f}/{s:.4f}' for m, s in row) + f' {np.median(weight[index]):5.2f}')


if __name__ == '__main__':
    main()
