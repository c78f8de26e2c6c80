#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The paper's input ablation: the 7 input configurations at one reduced, equal budget.

Trains the paper's network (``architecture='cae'``) once per non-empty subset of the input
kinds (PSF, iPSF, iPSF1), each with the same seed, the same training objects, the same number
of steps and the same optimiser, then evaluates every model on the same held-out objects
and writes one table of Table 1/2-style figures (``ablation.ecsv`` and the reStructuredText
``ablation_table.txt`` that ``docs/validation.rst`` includes). Resumable: a configuration
whose model and metrics exist is not redone.

    python validation/ablation.py TRAIN.h5 TEST.h5 --out docs/ablation

The budget (``--n-train`` objects x ``--epochs``) is a small fraction of the shipped model's
(4 million stamps); the table ranks the inputs at that budget, it does not give the shipped
model's figures.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ('psf', 'ipsf', 'ipsf1')
LABELS = {'psf': 'PSF', 'ipsf': 'iPSF', 'ipsf1': 'iPSF1'}


def configurations():
    """The 7 non-empty subsets of the input kinds, singles first."""
    return [combo for n in (1, 2, 3) for combo in itertools.combinations(KINDS, n)]


def train_config(kinds, args):
    return {'architecture': 'cae', 'kinds': list(kinds), 'epochs': args.epochs,
            'batch_size': args.batch_size, 'max_train_objects': args.n_train,
            'validation_fraction': args.validation_fraction, 'seed': args.seed,
            'learning_rate': args.learning_rate, 'decay_rate': 0.5,
            'decay_steps': args.decay_steps, 'patience': args.epochs,
            'dtype_policy': 'mixed_bfloat16', 'output_floor': 'median',
            'augment': True, 'symmetries': 1}


def _number(value):
    return float(getattr(value, 'value', value))


def evaluate(model_path, test_path, n_test):
    from psfdeconv.evaluate import evaluate_simulation
    from psfdeconv.model import load_model

    model = load_model(model_path)
    # The inputs are compared, not the post-processing: no detection gate and no
    # PSF-leakage correction (runs finished before they existed have none), one network
    # call per stamp.
    for key in ('detection', 'psf_leakage'):
        model.card.pop(key, None)
    model.card['symmetries'] = 1
    res = evaluate_simulation(test_path, model=model, n_objects=n_test, baselines=())
    hsm = res['table2_hsm']
    unweighted = res['table2']
    table1, table3 = res['table1'], res['table3']
    corr = res['correlations']

    def row(table, quantity, column='model'):
        index = list(table['quantity']).index(quantity)
        return (_number(table[f'{column}_mean'][index]), _number(table[f'{column}_rms'][index]))

    c_psf = corr[(corr['method'] == 'model') & (corr['snr_bin'] == 'all')]
    return {
        'psnr': _number(table1['psnr_mean'][0]),
        'one_minus_ssim': _number(table1['one_minus_ssim_mean'][0]),
        'hsm_e1_rms': row(hsm, 'e1')[1], 'hsm_e2_rms': row(hsm, 'e2')[1],
        'hsm_size_mean': row(hsm, 'size')[0], 'hsm_size_rms': row(hsm, 'size')[1],
        'hsm_failed': row(hsm, 'failed')[0],
        'e1_rms': row(unweighted, 'e1')[1], 'e2_rms': row(unweighted, 'e2')[1],
        'size_mean': row(unweighted, 'size')[0], 'size_rms': row(unweighted, 'size')[1],
        'flux_mean': row(unweighted, 'flux')[0], 'flux_rms': row(unweighted, 'flux')[1],
        'blank_recall': _number(table3['blank_recall'][0]),
        'sources_called_blank': _number(table3['sources_called_blank'][0]),
        'c_psf': _number(c_psf['c_psf'][0]), 'c_psf_err': _number(c_psf['c_psf_err'][0]),
        'n_galaxies': int(table1['n'][0]),
    }


def write_table(results, args, out):
    from astropy.table import QTable

    names = ['inputs', 'channels', 'val_loss', 'psnr', 'one_minus_ssim', 'hsm_e1_rms',
             'hsm_e2_rms', 'hsm_size_mean', 'hsm_size_rms', 'hsm_failed', 'e1_rms', 'e2_rms',
             'size_mean', 'size_rms', 'flux_mean', 'flux_rms', 'blank_recall',
             'sources_called_blank', 'c_psf', 'c_psf_err', 'train_minutes']
    rows = [[r[name] for name in names] for r in results]
    table = QTable(rows=rows, names=names)
    table.meta['command'] = args.command
    table.meta['description'] = (
        "The paper's 7 input configurations, CAE, equal budget; HSM and unweighted "
        'moment differences (prediction - truth) on the held-out objects')
    table.write(out / 'ablation.ecsv', overwrite=True)

    # The validation losses are in the ECSV only: each configuration scales its
    # targets by its own inputs' maximum, so the losses are not comparable.
    best = {name: min(r[name] for r in results) for name in ('hsm_e1_rms', 'hsm_e2_rms')}
    header = ('inputs', 'PSNR', 'HSM e1 RMS', 'HSM e2 RMS', 'HSM size %',
              'unw. e1 RMS', 'unw. size %', 'flux %', 'blank recall', 'C_PSF')

    def mark(r, name, text):
        return f'**{text}**' if r[name] == best.get(name) else text

    lines = []
    for r in results:
        lines.append((
            r['inputs'], f"{r['psnr']:.1f}",
            mark(r, 'hsm_e1_rms', f"{r['hsm_e1_rms']:.3f}"),
            mark(r, 'hsm_e2_rms', f"{r['hsm_e2_rms']:.3f}"),
            f"{r['hsm_size_mean']:+.0f} / {r['hsm_size_rms']:.0f}",
            f"{r['e1_rms']:.3f}", f"{r['size_mean']:+.0f} / {r['size_rms']:.0f}",
            f"{r['flux_mean']:+.1f} / {r['flux_rms']:.1f}", f"{100 * r['blank_recall']:.0f} %",
            f"{r['c_psf']:.2f} +- {r['c_psf_err']:.2f}"))
    widths = [max(len(h), *(len(line[k]) for line in lines)) for k, h in enumerate(header)]
    rule = ' '.join('=' * w for w in widths)
    text = [rule, ' '.join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    text += [' '.join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.append(rule)
    (out / 'ablation_table.txt').write_text('\n'.join(text) + '\n')
    (out / 'command.txt').write_text(args.command + '\n')
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('train', help='training simulation file')
    parser.add_argument('test', help='held-out simulation file')
    parser.add_argument('--out', required=True, help='directory of the table')
    parser.add_argument('--runs', help='directory of the training runs (default OUT/runs)')
    parser.add_argument('--n-train', type=int, default=12000)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--learning-rate', type=float, default=5e-4)
    parser.add_argument('--decay-steps', type=int, default=500)
    parser.add_argument('--validation-fraction', type=float, default=0.012)
    parser.add_argument('--n-test', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    args.command = 'python validation/ablation.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv)

    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / 'runs'
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for kinds in configurations():
        name = '_'.join(kinds)
        run = runs / name
        metrics_path = run / 'ablation_metrics.json'
        if metrics_path.exists():
            results.append(json.loads(metrics_path.read_text()))
            continue
        run.mkdir(exist_ok=True)
        config_path = run / 'ablation_config.json'
        config_path.write_text(json.dumps(train_config(kinds, args), indent=2))
        command = [sys.executable, '-m', 'psfdeconv.cli', '-q', 'train', args.train,
                   '--out', str(run), '--config', str(config_path), '--name', 'model']
        if (run / 'state.json').exists():
            command.append('--resume')
        start = time.perf_counter()
        if not (run / 'model.keras').exists():
            print(f'[{time.strftime("%H:%M:%S")}] training {name}', flush=True)
            subprocess.run(command, check=True, env=dict(os.environ))
        state = json.loads((run / 'state.json').read_text())
        print(f'[{time.strftime("%H:%M:%S")}] evaluating {name}', flush=True)
        result = {'inputs': '-'.join(LABELS[k] for k in kinds), 'channels': 3 * len(kinds),
                  'val_loss': float(state['best_val_loss']),
                  'train_minutes': round(state['elapsed_seconds'] / 60, 1),
                  **evaluate(run / 'model.keras', args.test, args.n_test)}
        metrics_path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
        results.append(result)
        print(f'[{time.strftime("%H:%M:%S")}] done {name} in '
              f'{(time.perf_counter() - start) / 60:.1f} min', flush=True)
    table = write_table(results, args, out)
    ranked = np.argsort([r['hsm_e1_rms'] + r['hsm_e2_rms'] for r in results])
    print('ranked by HSM e1 + e2 RMS:', ', '.join(results[k]['inputs'] for k in ranked))
    print((out / 'ablation_table.txt').read_text())
    return table


if __name__ == '__main__':
    main()
