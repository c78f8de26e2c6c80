"""Compare models (and their numbers of symmetry views) on held-out simulations.

For each simulation file, model and number of symmetries, deconvolve the first N source
stamps with `psfdeconv.deconvolve_stamps` and print the RMS of the HSM distortion errors
against the truth (bands pooled, objects where HSM succeeds on both), the HSM failure rate
of the outputs (objects whose truth fails too included), the median HSM size ratio and the
median ``flux_corrected`` / true flux::

    python validation/compare_models.py TEST.h5 [TEST2.h5 ...] --models A.keras B.keras
        [--n 600] [--symmetries 1 8]

``--models shipped`` names the shipped model of the files' band count.
"""

import argparse

import numpy as np


def compare(path, model, n, symmetries):
    """One result line per number of symmetries."""
    import psfdeconv
    from psfdeconv.measure import hsm_moments

    sims = psfdeconv.read_simulation(path, 0, n)
    source = ~sims['is_blank']
    truth = hsm_moments(sims['truth'][source])
    lines = []
    for views in symmetries:
        images, details = psfdeconv.deconvolve_stamps(
            sims['observed'][source], sims['psf'][source],
            pixel_scale=sims['pixel_scale'][source], model=model,
            noise_sigma=sims['noise_sigma'][source], symmetries=views, return_details=True)
        out = hsm_moments(images)
        ok = (out['hsm_status'] == 0) & (truth['hsm_status'] == 0)
        error = np.concatenate([(out['hsm_e1'] - truth['hsm_e1'])[ok],
                                (out['hsm_e2'] - truth['hsm_e2'])[ok]])
        flux = details['flux_corrected'] / sims['truth'][source].sum(axis=(-2, -1))
        size = np.median(out['hsm_sigma'][ok] / truth['hsm_sigma'][ok]) - 1
        lines.append(f'symmetries {views}: HSM e RMS {np.sqrt(np.mean(error ** 2)):.4f} '
                     f'fail {np.mean(out["hsm_status"] != 0):.3f} size {size:+.3f} '
                     f'flux med {np.median(flux) - 1:+.4f}')
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('sims', nargs='+')
    parser.add_argument('--models', nargs='+', default=['shipped'])
    parser.add_argument('--n', type=int, default=600)
    parser.add_argument('--symmetries', type=int, nargs='+', default=[1, 8])
    args = parser.parse_args(argv)

    import psfdeconv

    for path in args.sims:
        for name in args.models:
            model = psfdeconv.load_model(None if name == 'shipped' else name)
            for line in compare(path, model, args.n, args.symmetries):
                print(f'{path} {name} {line}', flush=True)


if __name__ == '__main__':
    main()
