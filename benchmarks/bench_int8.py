#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Would int8 inference pay? The shipped 3-band U-Net quantised to int8 by NNCF's
post-training quantisation (``nncf.quantize``, default preset, fast bias
correction) against the bfloat16 network that ``precision='auto'`` runs, both
through OpenVINO.

* **calibration**: the input cubes of ``simulate_stamps(--n-calibration,
  seed=5)`` (captured from ``deconvolve_stamps``, one view);
* **speed**: stamps per second of the two OpenVINO networks alone on 256 of
  those cubes (both compiled as the bfloat16 runner of ``precision='auto'``),
  interleaved rounds, best round;
* **accuracy**: ``deconvolve_stamps(..., symmetries=1)`` of a held-out
  simulation (``simulate_stamps(--n-accuracy, seed=4)``) with the int8 network
  in place of the bfloat16 one: the flux ratio of the objects with SNR > 10
  (the refit's ``flux / flux_err``) and the HSM ellipticity change of the
  images, against bfloat16, and bfloat16 against float32 for scale.

NNCF is not a dependency of psfdeconv (``pip install nncf`` to run this);
OpenVINO is needed as well.

Usage::

    python benchmarks/bench_int8.py [--n-calibration 300] [--n-accuracy 1000]
"""

import argparse
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')


def _flux_and_shapes(images, details):
    import numpy as np

    from psfdeconv.measure import hsm_moments

    shapes = hsm_moments(images, pixel_scale=None)
    return (np.asarray(details['flux']), np.asarray(details['flux_err']),
            np.asarray(shapes['hsm_e1']), np.asarray(shapes['hsm_e2']))


def _compare(reference, other):
    """Median and 99th percentile of |flux ratio - 1| (SNR > 10) and of the
    ellipticity change."""
    import numpy as np

    flux, flux_err, e1, e2 = reference
    flux_b, _, e1_b, e2_b = other
    bright = flux / flux_err > 10
    ratio = np.abs(flux_b[bright] / flux[bright] - 1)
    de = np.hypot(e1_b - e1, e2_b - e2)
    de = de[np.isfinite(de)]
    return np.median(ratio), np.percentile(ratio, 99), np.median(de), np.percentile(de, 99)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--n-calibration', type=int, default=300)
    parser.add_argument('--n-accuracy', type=int, default=1000)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()

    import nncf
    import numpy as np

    from psfdeconv import inference
    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.model import load_model
    from psfdeconv.simulate import simulate_stamps

    model = load_model()
    openvino = inference._import_openvino()
    captured = []
    predict = model.predict

    def capturing(cubes, **kwargs):
        captured.append(np.array(cubes))
        return predict(cubes, **kwargs)

    calibration = simulate_stamps(args.n_calibration, seed=5)
    model.predict = capturing
    deconvolve_stamps(calibration['observed'], calibration['psf'],
                      pixel_scale=calibration['pixel_scale'], model=model, symmetries=1)
    model.predict = predict
    cubes = np.concatenate(captured)

    network = openvino.convert_model(inference._graph(model.keras_model))
    start = time.perf_counter()
    quantised = nncf.quantize(network, nncf.Dataset([cubes[i:i + 1] for i in range(len(cubes))]),
                              subset_size=len(cubes), fast_bias_correction=True)
    print(f'quantised on {len(cubes)} cubes in {time.perf_counter() - start:.1f} s')

    # The bfloat16 runner of precision='auto', and the same for the int8 network.
    runners = {'bfloat16': inference._openvino_runner(model.keras_model, 'bf16'),
               'int8': inference._openvino_runner(model.keras_model, 'bf16',
                                                  network=quantised)}
    batch = cubes[:256]
    best = dict.fromkeys(runners, 0.0)
    for runner in runners.values():
        runner(batch[:32])
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(batch)
            best[name] = max(best[name], len(batch) / (time.perf_counter() - start))

    test = simulate_stamps(args.n_accuracy, seed=4)
    kwargs = dict(pixel_scale=test['pixel_scale'], model=model, symmetries=1,
                  return_details=True)
    results = {'float32': deconvolve_stamps(test['observed'], test['psf'],
                                            precision='float32', **kwargs),
               'bfloat16': deconvolve_stamps(test['observed'], test['psf'],
                                             precision='bfloat16', **kwargs)}
    # The int8 network in the bfloat16 runner's place.
    model._runners[inference.resolve_precision('bfloat16')] = runners['int8']
    results['int8'] = deconvolve_stamps(test['observed'], test['psf'], precision='bfloat16',
                                        **kwargs)
    measured = {name: _flux_and_shapes(*result) for name, result in results.items()}

    print(f'\nnetwork alone, OpenVINO, 256 cubes (stamps/s, best of {args.rounds}):')
    for name, rate in best.items():
        print(f'  {name:10s} {rate:8.1f}')
    print(f'  int8 / bfloat16 {best["int8"] / best["bfloat16"]:.2f}')
    print(f'\ndeconvolve_stamps on {args.n_accuracy} held-out stamps, one view:')
    print('                        |flux ratio - 1|, SNR > 10      |delta e| (HSM)')
    print('                        median     99th pct             median     99th pct')
    for name, reference in (('bfloat16 vs float32', 'float32'), ('int8 vs bfloat16', 'bfloat16')):
        other = name.split()[0]
        values = _compare(measured[reference], measured[other])
        print(f'  {name:20s}  {values[0]:.4f}     {values[1]:.4f}               '
              f'{values[2]:.4f}     {values[3]:.4f}')


if __name__ == '__main__':
    main()
