#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Throughput of psfdeconv's stages, measured in one run on the same stamps.

Prints stamps per second for:

* simulation (``simulate_stamps``, 1 and N worker processes);
* feature cubes (``make_cube``);
* training steps of the paper's CAE in float32 and mixed bfloat16;
* network forward passes (float32) and the full ``deconvolve_stamps``
  (cubes + network on the card's symmetries + amplitude refit) with the
  shipped model, and with ``symmetries=1``;
* the Wiener and Richardson-Lucy (50 iterations) baselines;

and the ratios between them. Results go into ``docs/benchmarks.rst``
with the command line that produced them.

Usage::

    python benchmarks/bench_throughput.py --n 512
"""

import argparse
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _rate(n, seconds):
    return n / seconds if seconds > 0 else float('inf')


def _time(func, *args, repeat=1, **kwargs):
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        result = func(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--n', type=int, default=512,
                        help='stamps per measurement')
    parser.add_argument('--train-steps', type=int, default=20,
                        help='training steps per dtype policy')
    parser.add_argument('--workers', type=int, default=os.cpu_count())
    parser.add_argument('--skip-training', action='store_true')
    args = parser.parse_args()


    import psfdeconv
    from psfdeconv.deconvolve import check_symmetries
    from psfdeconv.evaluate import richardson_lucy_deconvolve, wiener_deconvolve
    from psfdeconv.features import make_cube
    from psfdeconv.simulate import simulate_stamps

    n = args.n
    rates = {}
    seconds, _ = _time(simulate_stamps, n, seed=1, n_workers=1)
    rates['simulate (1 process)'] = _rate(n, seconds)
    seconds, sims = _time(simulate_stamps, n, seed=1,
                          n_workers=args.workers)
    rates[f'simulate ({args.workers} processes)'] = _rate(n, seconds)
    observed, psfs, scale = sims['observed'], sims['psf'], sims['pixel_scale']

    seconds, (cube, _) = _time(make_cube, observed, psfs, pixel_scale=scale,
                               repeat=2)
    rates['make_cube (PSF, iPSF, iPSF1)'] = _rate(n, seconds)

    model = psfdeconv.load_model()
    model.predict(cube[:64])  # build the graph once
    seconds, _ = _time(model.predict, cube, repeat=2)
    rates['network forward (float32, batch 128)'] = _rate(n, seconds)
    symmetries = check_symmetries(None, model)
    seconds, _ = _time(psfdeconv.deconvolve_stamps, observed, psfs,
                       pixel_scale=scale, model=model, repeat=2)
    rates['deconvolve_stamps (end to end)'] = _rate(n, seconds)
    if symmetries > 1:
        seconds, _ = _time(psfdeconv.deconvolve_stamps, observed, psfs,
                           pixel_scale=scale, model=model, symmetries=1, repeat=2)
        rates['deconvolve_stamps (symmetries=1)'] = _rate(n, seconds)
    seconds, _ = _time(wiener_deconvolve, observed, psfs,
                       noise_sigma=sims['noise_sigma'], repeat=2)
    rates['Wiener baseline'] = _rate(n, seconds)
    n_rl = min(n, 64)
    seconds, _ = _time(richardson_lucy_deconvolve, observed[:n_rl],
                       psfs[:n_rl], num_iter=50)
    rates['Richardson-Lucy baseline (50 iterations)'] = _rate(n_rl, seconds)

    if not args.skip_training:
        import keras

        from psfdeconv.model import build_cae
        from psfdeconv.train import scaled_batch

        x, y = scaled_batch(observed, psfs, scale, sims['truth'])
        batch = 32
        steps = min(args.train_steps, len(x) // batch)
        for policy in ('float32', 'mixed_bfloat16'):
            keras.config.set_dtype_policy(policy)
            net = build_cae(x.shape[1:], n_outputs=y.shape[-1])
            net.compile(optimizer='adam', loss='binary_crossentropy')
            net.fit(x[:2 * batch], y[:2 * batch], batch_size=batch,
                    verbose=0)  # compile the step first
            m = steps * batch
            seconds, _ = _time(net.fit, x[:m], y[:m], batch_size=batch,
                               epochs=1, verbose=0)
            rates[f'training steps ({policy}, batch {batch})'] = _rate(
                m, seconds)
        keras.config.set_dtype_policy('float32')

    width = max(len(k) for k in rates)
    print(f'{"stage":{width}s}  stamps/s   (n={n}, {os.cpu_count()} CPUs)')
    for name, value in rates.items():
        print(f'{name:{width}s}  {value:9.1f}')
    end_to_end = rates['deconvolve_stamps (end to end)']
    print()
    print(f'end to end / network forward        '
          f'{end_to_end / rates["network forward (float32, batch 128)"]:.2f}'
          f'   (the card averages {symmetries} network calls per stamp)')
    if symmetries > 1:
        print(f'end to end / symmetries=1           '
              f'{end_to_end / rates["deconvolve_stamps (symmetries=1)"]:.2f}')
    print(f'end to end / Wiener                 '
          f'{end_to_end / rates["Wiener baseline"]:.2f}')
    print(f'end to end / Richardson-Lucy        '
          f'{end_to_end / rates["Richardson-Lucy baseline (50 iterations)"]:.2f}')
    if not args.skip_training:
        bf16 = rates['training steps (mixed_bfloat16, batch 32)']
        print(f'training bf16 / float32             '
              f'{bf16 / rates["training steps (float32, batch 32)"]:.2f}')



if __name__ == '__main__':
    main()
