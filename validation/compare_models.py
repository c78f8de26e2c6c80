"""Compare models (and their numbers of symmetry views) on held-out simulations.

For each simulation file, model and number of symmetries, deconvolve the first N source
stamps with `psfdeconv.deconvolve_stamps` and print the RMS of the HSM distortion errors
against the truth (bands pooled, objects where HSM succeeds on both), the same per band
SNR bin (the simulation's matched-filter ``snr``), the HSM failure rate of the outputs
(objects whose truth fails too included), the median HSM size ratio, the median
``flux_corrected`` / true flux and the stamps per second of the call. With several
symmetry counts, the last line gives each count's e RMS over that of the last count
listed, on the same band images (those every count measures), with a bootstrap error
over objects. With several models, a last line per file gives every model's and count's
e RMS over that of the first model with the last count, on the band images all of them
measure (e.g. a network distilled to one pass against the average it learnt)::

    python validation/compare_models.py TEST.h5 [TEST2.h5 ...] --models A.keras B.keras
        [--n 600] [--symmetries 1 2 4 8]

``--models shipped`` names the shipped model of the files' band count; a single-band model
is run on every band of every object.
"""

import argparse
import time

import numpy as np

SNR_BINS = ((0.0, 20.0), (20.0, 40.0), (40.0, 80.0), (80.0, np.inf))


def _rms(error1, error2):
    return float(np.sqrt(np.mean(np.concatenate([error1, error2]) ** 2)))


def compare(path, model, n, symmetries, n_bootstrap=300, seed=0):
    """One result line per number of symmetries, then their paired e RMS ratios;
    and the errors ``{views: (d1, d2, ok)}``."""
    import psfdeconv
    from psfdeconv.measure import hsm_moments

    sims = psfdeconv.read_simulation(path, 0, n)
    if model.n_bands == 1 < sims['observed'].shape[1]:
        # A single-band model sees every band of every object on its own.
        from psfdeconv.train import split_bands

        sims = split_bands(sims)
    source = ~sims['is_blank']
    truth = hsm_moments(sims['truth'][source])
    snr = sims['snr'][source]
    lines, errors = [], {}
    for views in symmetries:
        start = time.perf_counter()
        images, details = psfdeconv.deconvolve_stamps(
            sims['observed'][source], sims['psf'][source],
            pixel_scale=sims['pixel_scale'][source], model=model,
            noise_sigma=sims['noise_sigma'][source], symmetries=views, return_details=True)
        rate = source.sum() / (time.perf_counter() - start)
        out = hsm_moments(images)
        ok = (out['hsm_status'] == 0) & (truth['hsm_status'] == 0)
        d1, d2 = out['hsm_e1'] - truth['hsm_e1'], out['hsm_e2'] - truth['hsm_e2']
        errors[views] = (d1, d2, ok)
        in_bins = [ok & (snr >= low) & (snr < high) for low, high in SNR_BINS]
        by_snr = ' / '.join(f'{_rms(d1[sel], d2[sel]):.4f}' for sel in in_bins)
        flux = details['flux_corrected'] / sims['truth'][source].sum(axis=(-2, -1))
        size = np.median(out['hsm_sigma'][ok] / truth['hsm_sigma'][ok]) - 1
        lines.append(f'symmetries {views}: HSM e RMS {_rms(d1[ok], d2[ok]):.4f} '
                     f'(SNR <20 / 20-40 / 40-80 / >80: {by_snr}) '
                     f'fail {np.mean(out["hsm_status"] != 0):.3f} size {size:+.3f} '
                     f'flux med {np.median(flux) - 1:+.4f} {rate:.1f} stamps/s')
    if len(symmetries) > 1:
        reference = symmetries[-1]
        ratios, n_common = paired_ratios(errors, reference, n_bootstrap=n_bootstrap, seed=seed)
        lines.append(f'e RMS / that of symmetries {reference} ({n_common} band images): '
                     + ', '.join(f'{views}: {ratio}' for views, ratio in ratios.items()
                                 if views != reference))
    return lines, errors


def paired_ratios(errors, reference, n_bootstrap=300, seed=0):
    """Each entry's e RMS over that of ``reference``, on the band images every entry
    measures, as 'mean +- bootstrap error' over the same resampled objects; and how
    many band images that is."""
    common = np.logical_and.reduce([ok for _, _, ok in errors.values()])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(common), (n_bootstrap, len(common)))

    def draw_rms(d1, d2):
        return np.array([_rms(d1[index][common[index]], d2[index][common[index]])
                         for index in draws])

    reference_rms = draw_rms(*errors[reference][:2])
    ratios = {}
    for key, (d1, d2, _) in errors.items():
        values = draw_rms(d1, d2) / reference_rms
        ratios[key] = f'{np.mean(values):.4f} +- {np.std(values):.4f}'
    return ratios, int(common.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('sims', nargs='+')
    parser.add_argument('--models', nargs='+', default=['shipped'])
    parser.add_argument('--n', type=int, default=600)
    parser.add_argument('--symmetries', type=int, nargs='+', default=[1, 8])
    args = parser.parse_args(argv)

    import psfdeconv

    for path in args.sims:
        every = {}
        for name in args.models:
            model = psfdeconv.load_model(None if name == 'shipped' else name)
            lines, errors = compare(path, model, args.n, args.symmetries)
            for line in lines:
                print(f'{path} {name} {line}', flush=True)
            every.update({(name, views): value for views, value in errors.items()})
        if len(args.models) > 1:
            reference = (args.models[0], args.symmetries[-1])
            ratios, n_common = paired_ratios(every, reference)
            print(f'{path} e RMS / that of {reference[0]} with symmetries {reference[1]} '
                  f'({n_common} band images): '
                  + ', '.join(f'{name} {views}: {ratio}'
                              for (name, views), ratio in ratios.items()
                              if (name, views) != reference), flush=True)


if __name__ == '__main__':
    main()
