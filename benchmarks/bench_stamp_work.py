#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The per-stamp work of deconvolve_stamps around the network, float64 against float32.

On the same simulated stamps, in one run, interleaved (``--repeat`` rounds,
best of each), it times:

* the input cube: a float64 reference (plain 2-D FFTs of the padded stamps
  and PSFs, as the package computed it before) and ``make_cube`` on float32
  stamps with the PSF transforms shared;
* one amplitude refit: a float64 reference (``fftconvolve``-style 2-D FFTs,
  astropy's MAD) and ``refit_amplitude`` in float32 with the shared
  transforms;
* the corrections (``correct_size_bias`` and ``correct_psf_leakage``, cubic
  splines);
* ``deconvolve_stamps(..., symmetries=1)`` end to end and the network alone
  (``model.predict`` on the same cube), whose difference is the non-network
  work.

Usage::

    python benchmarks/bench_stamp_work.py --n 512
"""

import argparse
import os
import time

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def reference_cube(stamps, psfs, pixel_scale, r=1e-3, r1=1e-6, sigma_arcsec=1.0):
    """The PSF/iPSF/iPSF1 cube in float64 with full 2-D FFTs (the former code path)."""
    import scipy.fft

    ny, nx = stamps.shape[-2:]
    py, px = psfs.shape[-2:]
    shape = tuple(scipy.fft.next_fast_len(n + k - 1, real=True) for n, k in ((ny, py), (nx, px)))
    padded = np.zeros(psfs.shape[:-2] + shape)
    padded[..., :py, :px] = psfs
    p = scipy.fft.rfft2(np.roll(padded, (-(py // 2), -(px // 2)), axis=(-2, -1)), workers=-1)
    s = scipy.fft.rfft2(stamps, s=shape, workers=-1)
    power = np.abs(p) ** 2
    k2 = scipy.fft.fftfreq(shape[0])[:, None] ** 2 + scipy.fft.rfftfreq(shape[1])[None, :] ** 2
    sigma = sigma_arcsec / np.asarray(pixel_scale)[:, None, None, None]
    filters = [p, np.conj(p) / (power + r * power.max(axis=(-2, -1), keepdims=True)),
               np.exp(-2 * np.pi**2 * sigma**2 * k2) * np.conj(p)
               / (power + r1 * power.max(axis=(-2, -1), keepdims=True))]
    channels = np.stack([scipy.fft.irfft2(s * f, s=shape, workers=-1)[..., :ny, :nx]
                         for f in filters], axis=1).astype(np.float32)
    scale = np.abs(channels).reshape(len(channels), -1).max(axis=1)
    n, n_kinds, n_bands = channels.shape[:3]
    cube = (channels / scale[:, None, None, None, None]).reshape(n, n_kinds * n_bands, ny, nx)
    return np.ascontiguousarray(cube.transpose(0, 2, 3, 1)), scale


def reference_refit(model_images, observed, psfs):
    """Amplitude, error and noise of one refit in float64 (the former code path)."""
    from astropy.stats import median_absolute_deviation

    from psfdeconv._fourier import convolve_same

    reconvolved = convolve_same(model_images.astype(np.float64), psfs)
    power = (reconvolved ** 2).sum(axis=(-2, -1))
    amplitude = (reconvolved * observed).sum(axis=(-2, -1)) / power
    noise = 1.4826 * median_absolute_deviation(
        observed - amplitude[..., None, None] * reconvolved, axis=(-2, -1))
    return amplitude, noise / np.sqrt(power), noise


def best_of(rounds, timings):
    """The shortest time of each entry over the rounds."""
    return {key: min(r[key] for r in rounds) for key in timings}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--n', type=int, default=512, help='stamps')
    parser.add_argument('--repeat', type=int, default=3, help='interleaved rounds')
    args = parser.parse_args()

    import psfdeconv
    from psfdeconv._fourier import KernelTransforms
    from psfdeconv.deconvolve import (
        correct_psf_leakage,
        correct_size_bias,
        refit_amplitude,
        refit_images,
        remove_output_floor,
        validate_stamps,
    )
    from psfdeconv.features import make_cube
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(args.n, seed=1, n_workers=2)
    stamps, psfs, scale = validate_stamps(sims['observed'], sims['psf'], sims['pixel_scale'])
    model = psfdeconv.load_model()
    card = model.card
    stamps32 = stamps.astype(np.float32)
    cube, _ = make_cube(stamps32, psfs, pixel_scale=scale)
    output = remove_output_floor(model.predict(cube), card['output_floor'])
    first = refit_images(output, stamps32, psfs, None)

    steps = {
        'cube, float64 reference': lambda: reference_cube(stamps, psfs, scale),
        'cube, float32 (with the PSF FFT)': lambda: make_cube(
            stamps32, None, pixel_scale=scale,
            psf_transforms=KernelTransforms(psfs, stamps.shape[-2:])),
        'refit, float64 reference': lambda: reference_refit(output, stamps, psfs),
        'refit, float32 (PSF FFT shared)': lambda: refit_amplitude(
            output, stamps32, None, psf_transforms=shared),
        'size + leakage corrections': lambda: correct_psf_leakage(
            correct_size_bias(output, first['flux'], first['flux_err'], card.get('size_bias')),
            psfs, card.get('psf_leakage')),
        'network alone (model.predict)': lambda: model.predict(cube),
        'deconvolve_stamps(symmetries=1)': lambda: psfdeconv.deconvolve_stamps(
            stamps, psfs, pixel_scale=scale, model=model, symmetries=1),
    }
    shared = KernelTransforms(psfs, stamps.shape[-2:])
    rounds = []
    for _ in range(args.repeat):
        timing = {}
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            timing[name] = time.perf_counter() - start
        rounds.append(timing)
    best = best_of(rounds, steps)

    print(f'{args.n} stamps of {stamps.shape[1:]} with {psfs.shape[-2:]} PSFs, '
          f'best of {args.repeat} interleaved rounds')
    for name, seconds in best.items():
        print(f'  {name:36s} {seconds:7.3f} s  {args.n / seconds:8.0f} stamps/s')
    for step, old, new in (('cube', 'cube, float64 reference', 'cube, float32 (with the PSF FFT)'),
                           ('refit', 'refit, float64 reference',
                            'refit, float32 (PSF FFT shared)')):
        print(f'  {step} speed-up {best[old] / best[new]:.2f}x')
    rest = best['deconvolve_stamps(symmetries=1)'] - best['network alone (model.predict)']
    print(f'  non-network work of deconvolve_stamps: {rest:.3f} s, {args.n / rest:.0f} stamps/s')


if __name__ == '__main__':
    main()
