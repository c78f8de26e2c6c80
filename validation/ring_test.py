# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Ring test of the shear bias of deconvolved images (docs/validation.rst).

Simulates ring-test galaxies (`psfdeconv.shear.simulate_ring_test`: 90-degree
pairs, input shears (+-g, 0), (0, +-g), anisotropic Moffat PSFs, one noise
field per pair member), runs them through `psfdeconv.deconvolve_stamps` with
a model card, measures HSM shapes of the outputs and of the truth
(`measure_ring_test`) and prints m1, m2, c1, c2 and alpha with bootstrap
errors for the truth, the raw outputs and the calibrated shear estimates
(the card's ``shear_response``, or one given with ``--response``), overall and
per SNR bin. The per-stamp table is written in chunks to ``--out`` (a
directory) and reused when it exists, so a run can be resumed::

    python validation/ring_test.py --n-galaxies 1200 --seed 2 --out ring_seed2

With ``--fit-response FILE`` the response is fitted on this run's table and
written as JSON (the held-out figures must come from another seed).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _table(args, model):
    from psfdeconv.shear import ring_test_table

    return ring_test_table(args.n_galaxies, seed=args.seed, shear=args.shear,
                           snr_range=args.snr_range, model=model,
                           symmetries=args.symmetries, chunk=args.chunk,
                           directory=args.out, log=lambda line: print(line, flush=True),
                           precision=args.precision)


def _print(name, bias):
    keys = ('m1', 'm2', 'c1', 'c2', 'alpha')
    print(f'{name:<11} ' + '  '.join(f'{k}={bias[k]:+.4f}+-{bias[k + "_err"]:.4f}'
                                     for k in keys)
          + f"  n_gal={bias['n_galaxies']} n_units={bias['n_units']}")
    for b in bias.get('bins', []):
        low, high = b['snr_range']
        print(f'  snr {low:>5.0f}-{high:<5.0f} ' + '  '.join(
            f'{k}={b[k]:+.4f}+-{b[k + "_err"]:.4f}' for k in keys)
            + f"  n_gal={b['n_galaxies']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n-galaxies', type=int, default=1200)
    parser.add_argument('--seed', type=int, default=2)
    parser.add_argument('--shear', type=float, default=0.02)
    parser.add_argument('--snr-range', type=float, nargs=2, default=(10.0, 300.0))
    parser.add_argument('--snr-edges', type=float, nargs='+',
                        default=(10.0, 20.0, 40.0, 80.0, 1e4))
    parser.add_argument('--model', default=None, help='.keras file (default: shipped)')
    parser.add_argument('--symmetries', type=int, default=None)
    parser.add_argument('--precision', default='float32',
                        choices=('float32', 'auto', 'bfloat16'),
                        help="the network's arithmetic (deconvolve_stamps' precision)")
    parser.add_argument('--chunk', type=int, default=50, help='galaxies per table part')
    parser.add_argument('--out', required=True, help='directory of the table parts')
    parser.add_argument('--response', default=None,
                        help='JSON shear_response to evaluate (default: the card\'s)')
    parser.add_argument('--fit-response', default=None,
                        help='fit the response on this run and write it here (JSON)')
    parser.add_argument('--bootstrap', type=int, default=300)
    parser.add_argument('--json', default=None, help='write the figures here')
    args = parser.parse_args(argv)

    from psfdeconv.model import load_model
    from psfdeconv.shear import fit_shear_bias, fit_shear_response

    model = load_model(args.model, n_bands=3)
    table = _table(args, model)
    print(f'{len(table)} rows, {len(np.unique(table["galaxy"]))} galaxies, seed {args.seed}, '
          f'g = {args.shear}, symmetries {args.symmetries or model.card.get("symmetries")}')
    response = model.card.get('shear_response')
    if args.response:
        response = json.loads(Path(args.response).read_text())
    if args.fit_response:
        response = fit_shear_response(table, seed=args.seed)
        Path(args.fit_response).write_text(json.dumps(response, indent=2) + '\n')
        print(f'response written to {args.fit_response} (fitted on this seed)')
    results = {}
    for estimator in ('truth', 'raw', 'calibrated'):
        if estimator == 'calibrated' and response is None:
            continue
        bias = fit_shear_bias(table, estimator=estimator, response=response,
                              snr_edges=args.snr_edges, n_bootstrap=args.bootstrap,
                              seed=args.seed)
        results[estimator] = bias
        _print(estimator, bias)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
