"""How close the model's shapes are to what the noise allows, per SNR.

Deconvolves the first ``--n`` objects of a held-out simulation with the
shipped model and the Wiener baseline, measures HSM ellipticities and
sizes against the truth, and sets them beside the information floor of
`psfdeconv.evaluate.shape_information_floor` (Cramer-Rao bound and the
posterior-mean floor) per matched-filter SNR bin. Writes
``information_floor.ecsv`` and ``information_floor_table.txt`` (the
reStructuredText table of ``docs/validation.rst``) to ``--out``.

    python validation/information_floor.py test_v2_s4.h5 --n 2000 --out docs/report --overwrite

With ``--target-fwhm`` the model deconvolves to that Gaussian target
(``deconvolve_stamps(..., target_psf=...)``), the Wiener output and the
truth are convolved with it, and the floor is that of the target-convolved
truth; the files are then ``information_floor_target*``. ``--no-target-update``
only convolves the model's output with the target (no
`psfdeconv.target.residual_update`; files ``information_floor_target_only*``).

    python validation/information_floor.py test_v2_s4.h5 --n 2000 --target-fwhm 0.5 \
        --out docs/report --overwrite

``model_size_bias`` is the mean of the model's size errors in per cent; the
``*_fail`` columns are the percentages of rows (HSM succeeding on the truth)
where HSM fails on the model's output and on the observed stamp.
"""
import argparse
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import QTable

from psfdeconv.deconvolve import deconvolve_stamps
from psfdeconv.evaluate import shape_information_floor, wiener_deconvolve
from psfdeconv.io import atomic_path
from psfdeconv.measure import hsm_moments
from psfdeconv.model import load_model
from psfdeconv.simulate import read_simulation
from psfdeconv.target import convolve_to_target, target_psf_images

SNR_EDGES = (0, 10, 20, 40, 80, 160, np.inf)


def rms(values):
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else np.nan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('simulation')
    parser.add_argument('--n', type=int, default=2000)
    parser.add_argument('--model', help='a .keras model (default: the shipped one)')
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--target-fwhm', type=float, default=None,
                        help='deconvolve to a Gaussian target of this FWHM (arcsec)')
    parser.add_argument('--no-target-update', action='store_true',
                        help='only convolve the output with the target (no residual update)')
    parser.add_argument('--precision', default='float32',
                        choices=('float32', 'auto', 'bfloat16'),
                        help="the network's arithmetic (deconvolve_stamps' precision)")
    parser.add_argument('--overwrite', action='store_true',
                        help='replace existing information_floor files')
    args = parser.parse_args(argv)

    sims = read_simulation(args.simulation, 0, args.n)
    floor = shape_information_floor(sims['truth'], sims['psf'], sims['noise_sigma'],
                                    is_blank=sims['is_blank'], target_psf=args.target_fwhm,
                                    pixel_scale=sims['pixel_scale'])
    model = None if args.model is None else load_model(args.model)
    wiener = wiener_deconvolve(sims['observed'], sims['psf'], noise_sigma=sims['noise_sigma'])
    if args.target_fwhm is not None:
        wiener = convolve_to_target(wiener, target_psf_images(
            args.target_fwhm, sims['pixel_scale'], len(wiener), wiener.shape[-2:]))
    methods = {'model': deconvolve_stamps(sims['observed'], sims['psf'],
                                          pixel_scale=sims['pixel_scale'], model=model,
                                          target_psf=args.target_fwhm,
                                          target_update=not args.no_target_update,
                                          precision=args.precision),
               'wiener': wiener}
    rows, cols = np.asarray(floor['id']), np.asarray(floor['band'])
    observed_ok = hsm_moments(sims['observed'][rows, cols])['hsm_status'] == 0
    measured = {}
    for name, images in methods.items():
        hsm = hsm_moments(images[rows, cols])
        measured[name] = {
            'ok': hsm['hsm_status'] == 0,
            'e1': hsm['hsm_e1'] - floor['truth_e1'], 'e2': hsm['hsm_e2'] - floor['truth_e2'],
            'size': 100 * (hsm['hsm_sigma'] / floor['truth_size'].value - 1)}
    both = measured['model']['ok'] & measured['wiener']['ok']
    snr = np.asarray(floor['snr'])
    table = QTable(names=('snr_bin', 'n', 'model_e', 'wiener_e', 'floor_e', 'crb_e',
                          'model_size', 'wiener_size', 'floor_size', 'model_size_bias',
                          'model_fail', 'observed_fail'),
                   dtype=(str, int) + (float,) * 10)
    bins = list(zip(SNR_EDGES[:-1], SNR_EDGES[1:], strict=True)) + [(0, np.inf)]
    for low, high in bins:
        sel = both & (snr >= low) & (snr < high)
        label = 'all' if (low, high) == (0, np.inf) else f'{low:g}-{high:g}'
        e = {name: rms(np.concatenate([m['e1'][sel], m['e2'][sel]]))
             for name, m in measured.items()}
        size = {name: rms(m['size'][sel]) for name, m in measured.items()}
        in_bin = (snr >= low) & (snr < high)
        table.add_row((label, int(sel.sum()), e['model'], e['wiener'],
                       rms(np.concatenate([floor['floor_e1'][sel], floor['floor_e2'][sel]])),
                       rms(np.concatenate([floor['crb_e1'][sel], floor['crb_e2'][sel]])),
                       size['model'], size['wiener'], rms(floor['floor_size'][sel].value),
                       float(np.mean(measured['model']['size'][sel])),
                       100 * np.mean(~measured['model']['ok'][in_bin]),
                       100 * np.mean(~observed_ok[in_bin])))
    for key in table.colnames[2:]:
        table[key].format = '.3f' if key.endswith('_e') else '.1f'
    table.meta['command'] = ('python validation/information_floor.py '
                             f'{Path(args.simulation).name} --n {args.n}'
                             + ('' if args.target_fwhm is None
                                else f' --target-fwhm {args.target_fwhm:g}')
                             + (' --no-target-update' if args.no_target_update else ''))
    table.meta['description'] = (
        'RMS of the HSM e1 and e2 errors pooled (_e) and of the HSM size errors in '
        'percent (_size), per matched-filter SNR bin of each object and band, over '
        'rows where HSM succeeds on the truth, the model and Wiener; floor = '
        'shape_information_floor (posterior mean, profile known), crb = Cramer-Rao; '
        'model_size_bias: mean size error of the model in percent; '
        '_fail: percent of the rows where HSM fails on the model output and on the '
        'observed stamp')
    if args.target_fwhm is not None:
        table.meta['target_fwhm'] = args.target_fwhm * u.arcsec
    table.pprint(max_width=200)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = 'information_floor' + ('' if args.target_fwhm is None else '_target') \
        + ('_only' if args.target_fwhm is not None and args.no_target_update else '')
    with atomic_path(args.out / f'{stem}.ecsv', overwrite=args.overwrite) as tmp:
        table.write(tmp, format='ascii.ecsv', overwrite=True)
    # The reStructuredText table docs/validation.rst includes.
    with atomic_path(args.out / f'{stem}_table.txt',
                     overwrite=args.overwrite) as tmp:
        table.write(tmp, format='ascii.rst', overwrite=True)


if __name__ == '__main__':
    main()
