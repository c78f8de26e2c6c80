"""The prior of the residual update, chosen on a simulation.

Deconvolves the first ``--n`` objects of a simulation with the shipped model
(once, on the pixel grid), then applies `psfdeconv.target.residual_update`
through a Gaussian target with each prior fraction of ``--fractions`` (0: the
target's convolution alone) and band coherence of ``--coherences``, and prints,
per matched-filter SNR bin, the RMS of the HSM ellipticity errors (e1 and e2
pooled) against the target-convolved truth and its ratio to the information
floor of `psfdeconv.evaluate.shape_information_floor` through the same target. The
shipped ``PRIOR_FRACTION`` and ``BAND_COHERENCE`` were chosen with a
simulation that is not the test set::

    psfdeconv simulate --n 1000 --seed 5 --config test_overrides.json --out val_s5.h5
    python validation/target_update.py val_s5.h5 --n 1000 --target-fwhm 0.5
"""
import argparse
import itertools

import numpy as np

from psfdeconv.deconvolve import deconvolve_stamps
from psfdeconv.evaluate import shape_information_floor
from psfdeconv.measure import hsm_moments
from psfdeconv.simulate import read_simulation
from psfdeconv.target import convolve_to_target, residual_update, target_psf_images

SNR_EDGES = (0, 10, 20, 40, 80, 160, np.inf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('simulation')
    parser.add_argument('--n', type=int, default=1000)
    parser.add_argument('--target-fwhm', type=float, default=0.5)
    parser.add_argument('--fractions', default='0,0.1,0.2,0.3,0.5,1',
                        help='comma-separated prior fractions (0: no update)')
    parser.add_argument('--coherences', default='0,0.5,0.8,0.95',
                        help='comma-separated band coherences')
    args = parser.parse_args(argv)

    sims = read_simulation(args.simulation, 0, args.n)
    floor = shape_information_floor(sims['truth'], sims['psf'], sims['noise_sigma'],
                                    is_blank=sims['is_blank'], target_psf=args.target_fwhm,
                                    pixel_scale=sims['pixel_scale'])
    images, details = deconvolve_stamps(sims['observed'], sims['psf'],
                                        pixel_scale=sims['pixel_scale'], return_details=True)
    kernels = target_psf_images(args.target_fwhm, sims['pixel_scale'], len(images),
                                images.shape[-2:])
    psfs = sims['psf'] / sims['psf'].sum(axis=(-2, -1), keepdims=True)
    rows, cols = np.asarray(floor['id']), np.asarray(floor['band'])
    snr = np.asarray(floor['snr'])
    bins = list(zip(SNR_EDGES[:-1], SNR_EDGES[1:], strict=True))
    print(f'{args.n} objects of {args.simulation}, target FWHM {args.target_fwhm} arcsec; '
          'HSM e RMS (ratio to the floor) per SNR bin')
    print(f'{"fraction":>8s} {"coherence":>9s} '
          + ' '.join(f'{f"{lo:g}-{hi:g}":>14s}' for lo, hi in bins))
    fractions = [float(value) for value in args.fractions.split(',')]
    coherences = [float(value) for value in args.coherences.split(',')]
    for fraction, coherence in itertools.product(fractions, coherences):
        if fraction == 0 and coherence != coherences[0]:
            continue  # no update: the coherence does not matter
        if fraction == 0:
            updated = convolve_to_target(images, kernels)
        else:
            updated = residual_update(images, sims['observed'], psfs, kernels,
                                      details['noise_sigma'], prior_fraction=fraction,
                                      band_coherence=coherence)
        hsm = hsm_moments(updated[rows, cols])
        ok = hsm['hsm_status'] == 0
        cells = []
        for low, high in bins:
            sel = ok & (snr >= low) & (snr < high)
            errors = np.concatenate([hsm['hsm_e1'][sel] - floor['truth_e1'][sel],
                                     hsm['hsm_e2'][sel] - floor['truth_e2'][sel]])
            floor_e = np.concatenate([floor['floor_e1'][sel], floor['floor_e2'][sel]])
            rms = np.sqrt(np.mean(errors**2))
            cells.append(f'{rms:.4f} ({rms / np.sqrt(np.mean(floor_e**2)):.2f})')
        print(f'{fraction:8g} {coherence:9g} ' + ' '.join(f'{cell:>14s}' for cell in cells))


if __name__ == '__main__':
    main()
