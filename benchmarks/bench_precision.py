#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Speed and accuracy of the network's precisions and runtimes.

Speed: stamps per second of the network alone on the same cubes
(``simulate_stamps(N, seed=1)`` + ``make_cube``), for the shipped U-Net and
the paper's CAE (``build_cae``, random weights: the speed does not depend on
them), each run as

* ``eager float32``: ``keras_model(x, training=False)`` per batch;
* ``graph float32``: the ``tf.function`` runner of ``precision='float32'``;
* ``OpenVINO float32`` (the runner of ``precision='float32'`` where OpenVINO is
  installed) and ``OpenVINO bfloat16`` (if installed);
* ``TF mixed bfloat16 graph``: the runner used for bfloat16 without OpenVINO.

Every variant runs once per round, the rounds interleave them (the machine's
load hits them alike) and the best round counts.

Accuracy: ``deconvolve_stamps(..., symmetries=1)`` of a held-out simulation
(``simulate_stamps(M, seed=4)``) in float32 and in bfloat16 (``--accuracy
bfloat16``), or in float32 through OpenVINO and through TensorFlow's graph
(``--accuracy float32``): the flux ratio of the objects with SNR > 10, and the
change of the HSM ellipticity (``hsm_moments``) of the deconvolved images.

Usage::

    python benchmarks/bench_precision.py --n 512 --n-accuracy 2000 [--accuracy both]
"""

import argparse
import os
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def _runners(keras_model):
    """Name -> callable(batch) for every variant available here."""
    import numpy as np

    from psfdeconv import inference

    runners = {
        'eager float32': lambda batch: np.asarray(keras_model(batch, training=False)),
        'graph float32': inference._tensorflow_runner(keras_model),
    }
    if inference.openvino_available():
        runners['OpenVINO float32'] = inference._openvino_float32_runner(keras_model)
        runners['OpenVINO bfloat16'] = inference._openvino_runner(keras_model, 'bf16')
    runners['TF mixed bfloat16 graph'] = inference._mixed_bfloat16_runner(keras_model)
    return runners


def speed(keras_model, cube, batch_size, rounds):
    """Best stamps/s of each variant over interleaved rounds."""
    runners = _runners(keras_model)
    for run in runners.values():  # build and warm up every variant first
        run(cube[:batch_size])
    best = dict.fromkeys(runners, float('inf'))
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for first in range(0, len(cube), batch_size):
                run(cube[first:first + batch_size])
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(cube) / seconds for name, seconds in best.items()}


def _tensorflow_float32(model):
    """The model with its network run by TensorFlow's float32 graph, whatever
    runtime ``precision='float32'`` would pick."""
    import numpy as np

    from psfdeconv import inference

    class TensorFlowModel(type(model)):
        def predict(self, cubes, *, batch_size=128, precision='float32'):
            run = self.__dict__.setdefault(
                '_tf_runner', inference._tensorflow_runner(self.keras_model))
            return np.concatenate([run(cubes[first:first + batch_size])
                                   for first in range(0, len(cubes), batch_size)]
                                  ).transpose(0, 3, 1, 2)

    return TensorFlowModel(model.keras_model, model.card, path=model.path)


def accuracy(model, n, seed, compare='bfloat16'):
    """Flux ratio and HSM ellipticity change of ``compare`` against float32:
    ``'bfloat16'`` (precision='bfloat16' against 'float32') or ``'float32'``
    (float32 through OpenVINO against TensorFlow's graph)."""
    import numpy as np

    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.measure import hsm_moments
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(n, seed=seed)
    runs = ([(model, 'float32'), (model, 'bfloat16')] if compare == 'bfloat16'
            else [(_tensorflow_float32(model), 'float32'), (model, 'float32')])
    results = []
    for network, precision in runs:
        images, details = deconvolve_stamps(
            sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'], model=network,
            symmetries=1, return_details=True, precision=precision)
        results.append((images, details))
    (im32, d32), (im16, d16) = results
    bright = (d32['flux'] / d32['flux_err'] > 10) & ~sims['is_blank'][:, None]
    ratio = d16['flux'][bright] / d32['flux'][bright]
    m32, m16 = hsm_moments(im32[bright]), hsm_moments(im16[bright])
    ok = (m32['hsm_status'] == 0) & (m16['hsm_status'] == 0)
    de = np.hypot(m16['hsm_e1'][ok] - m32['hsm_e1'][ok], m16['hsm_e2'][ok] - m32['hsm_e2'][ok])
    return {'n_bright': int(bright.sum()), 'n_hsm': int(ok.sum()),
            'precision': d16['precision'],
            'flux_ratio_median': float(np.median(ratio)),
            'flux_change_median': float(np.median(np.abs(ratio - 1))),
            'flux_change_p99': float(np.percentile(np.abs(ratio - 1), 99)),
            'de_median': float(np.median(de)), 'de_p99': float(np.percentile(de, 99))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--n', type=int, default=512, help='stamps for the speed')
    parser.add_argument('--n-accuracy', type=int, default=2000,
                        help='objects for the accuracy (0: skip it)')
    parser.add_argument('--accuracy', choices=('bfloat16', 'float32', 'both'),
                        default='both', help='what the accuracy compares with float32')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    import psfdeconv
    from psfdeconv.features import make_cube
    from psfdeconv.inference import available_runtimes, cpu_has_bfloat16
    from psfdeconv.model import build_cae
    from psfdeconv.simulate import simulate_stamps

    model = psfdeconv.load_model()
    sims = simulate_stamps(args.n, seed=1)
    cube, _ = make_cube(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                        kinds=model.kinds, **model.feature_options)
    cube = np.ascontiguousarray(cube, dtype=np.float32)
    print(f'CPU: {_cpu_name()}, {os.cpu_count()} logical cores, bfloat16: '
          f'{"yes" if cpu_has_bfloat16() else "no"}; runtimes: '
          f'{", ".join(available_runtimes())}')
    print(f'{args.n} stamps, batch {args.batch_size}, best of {args.rounds} interleaved '
          f'rounds')
    networks = {'U-Net (shipped)': model.keras_model,
                'CAE (paper)': build_cae(cube.shape[1:])}
    rates = {name: speed(network, cube, args.batch_size, args.rounds)
             for name, network in networks.items()}
    print(f'\n{"variant":26s}' + ''.join(f'{name:>26s}' for name in networks))
    for variant in rates['U-Net (shipped)']:
        cells = []
        for name in networks:
            rate = rates[name][variant]
            cells.append(f'{rate:8.0f}/s ({rate / rates[name]["eager float32"]:4.2f}x)')
        print(f'{variant:26s}' + ''.join(f'{cell:>26s}' for cell in cells))

    compares = ('bfloat16', 'float32') if args.accuracy == 'both' else (args.accuracy,)
    for compare in compares if args.n_accuracy else ():
        if compare == 'float32' and 'openvino' not in available_runtimes():
            continue
        result = accuracy(model, args.n_accuracy, seed=4, compare=compare)
        what = (f'bfloat16 ({result["precision"][1]}) vs float32' if compare == 'bfloat16'
                else 'float32 OpenVINO vs float32 TensorFlow graph')
        print(f'\n{what}, deconvolve_stamps '
              f'symmetries=1, {args.n_accuracy} objects (seed 4), {result["n_bright"]} '
              f'band images with SNR > 10:')
        print(f'  flux ratio median {result["flux_ratio_median"]:.5f}; |ratio - 1| median '
              f'{result["flux_change_median"]:.2e}, 99th percentile '
              f'{result["flux_change_p99"]:.2e}')
        print(f'  HSM |delta e| ({result["n_hsm"]} images): median {result["de_median"]:.2e}, '
              f'99th percentile {result["de_p99"]:.2e}')


if __name__ == '__main__':
    main()
