# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Deconvolution to a target PSF: kernels from a FWHM or an image, and their use in
`deconvolve_stamps`."""

import astropy.units as u
import numpy as np
import pytest
from numpy.testing import assert_allclose

from psfdeconv.exceptions import InvalidInputError, InvalidPSFError
from psfdeconv.target import (
    convolve_to_target,
    gaussian_target_psfs,
    residual_update,
    target_psf_images,
)


@pytest.mark.parametrize('fwhm, scale', [(0.3, 0.1), (0.3 * u.arcsec, 0.2),
                                         (300 * u.mas, 0.25), (0.6, 0.15)])
def test_gaussian_kernels_have_the_asked_fwhm(fwhm, scale):
    import galsim

    kernel = gaussian_target_psfs(fwhm, scale)[0]
    assert kernel.shape[0] % 2 == 1 and kernel.shape[0] == kernel.shape[1]
    assert_allclose(kernel.sum(), 1.0, rtol=1e-12)
    # Centred: the peak on the middle pixel and zero first moments.
    centre = kernel.shape[0] // 2
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (centre, centre)
    y, x = np.mgrid[:kernel.shape[0], :kernel.shape[1]] - centre
    assert abs((kernel * x).sum()) < 1e-12 and abs((kernel * y).sum()) < 1e-12
    # Its second moments are the Gaussian's plus a pixel's 1/12 (pixel integration).
    fwhm_arcsec = u.Quantity(fwhm, u.arcsec).to_value(u.arcsec)
    sigma = fwhm_arcsec / 2.3548200450309493 / scale
    assert_allclose((kernel * x ** 2).sum(), sigma ** 2 + 1 / 12, rtol=0.02)
    if fwhm_arcsec / scale >= 3:  # well sampled: the pixel box widens it little
        measured = galsim.Image(kernel, scale=scale).calculateFWHM()
        assert_allclose(measured, fwhm_arcsec, rtol=0.1)


def test_kernels_follow_each_stamps_pixel_scale():
    kernels = gaussian_target_psfs(0.4, [0.1, 0.2])
    y, x = np.mgrid[:kernels.shape[1], :kernels.shape[2]] - kernels.shape[1] // 2
    variance = (kernels * x ** 2).sum(axis=(-2, -1))
    # Twice the pixel scale: a quarter of the variance in pixels (less the pixel term).
    assert_allclose((variance[0] - 1 / 12) / (variance[1] - 1 / 12), 4.0, rtol=0.02)


def test_image_targets_are_normalised_and_broadcast():
    image = gaussian_target_psfs(0.5, 0.2)[0] * 7.0
    kernels = target_psf_images(image, 0.2, 3, (64, 64))
    assert kernels.shape == (3,) + image.shape
    assert_allclose(kernels.sum(axis=(-2, -1)), 1.0)


@pytest.mark.parametrize('target, error, match', [
    (-0.3, InvalidInputError, 'positive and finite'),
    (np.nan, InvalidInputError, 'positive and finite'),
    (0.3 * u.m, InvalidInputError, 'give an angle'),
    ('wide', InvalidInputError, 'number of arcsec or an angle'),
    (np.ones((4, 4)), InvalidPSFError, 'odd sizes'),
    (np.ones((71, 71)), InvalidPSFError, 'larger than the stamps'),
    (-np.ones((5, 5)), InvalidPSFError, 'positive, finite sum'),
    (np.full((5, 5), np.nan), InvalidPSFError, 'NaN or inf'),
    (np.ones((2, 5, 5)), InvalidPSFError, r'shape \(py, px\) or \(3, py, px\)'),
])
def test_bad_targets_are_refused(target, error, match):
    with pytest.raises(error, match=match):
        target_psf_images(target, 0.2, 3, (64, 64))


def test_convolution_keeps_flux_and_widens():
    rng = np.random.default_rng(1)
    images = np.zeros((2, 3, 32, 32))
    images[:, :, 14:18, 14:18] = rng.uniform(1, 2, (2, 3, 4, 4))
    wide = convolve_to_target(images, gaussian_target_psfs(0.5, [0.1, 0.2]))
    assert_allclose(wide.sum(axis=(-2, -1)), images.sum(axis=(-2, -1)), rtol=1e-9)
    assert np.all(wide.max(axis=(-2, -1)) < images.max(axis=(-2, -1)))


def test_deconvolve_stamps_to_a_target(tiny_model):
    from psfdeconv import deconvolve_stamps
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(3, seed=5)
    kwargs = dict(pixel_scale=sims['pixel_scale'], model=tiny_model,
                  noise_sigma=sims['noise_sigma'], return_details=True)
    plain, details = deconvolve_stamps(sims['observed'], sims['psf'], **kwargs)
    target, target_details = deconvolve_stamps(sims['observed'], sims['psf'],
                                               target_psf=0.3 * u.arcsec, **kwargs)
    convolved, _ = deconvolve_stamps(sims['observed'], sims['psf'], target_psf=0.3 * u.arcsec,
                                     target_update=False, **kwargs)
    # The target (and the residual update) apply to the refitted images, nothing
    # else changes.
    kernels = target_details['target_psf']
    assert kernels.shape[0] == 3
    assert_allclose(convolved, convolve_to_target(plain, kernels), atol=1e-9)
    psfs = sims['psf'] / sims['psf'].sum(axis=(-2, -1), keepdims=True)
    # (float32 arithmetic: the stamps are float32 inside deconvolve_stamps.)
    assert_allclose(target, residual_update(plain, sims['observed'], psfs, kernels,
                                            sims['noise_sigma']), atol=1e-5 * target.max())
    assert np.abs(target - convolved).max() > 1e-3 * np.abs(convolved).max()
    for key in ('flux', 'flux_err', 'flux_corrected', 'amplitude'):
        assert_allclose(target_details[key], details[key])
    assert 'target_psf' not in details


def _gaussian_galaxies(sigmas, e1=0.0, size=64, flux=1e4):
    y, x = np.mgrid[:size, :size] - size / 2
    images = []
    for sigma in sigmas:
        image = np.exp(-0.5 * (x**2 / (1 + e1) + y**2 / (1 - e1)) / sigma**2)
        images.append(flux * image / image.sum())
    return np.array(images)[:, None]


def _psf(sigma=2.5, half=12):
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    psf = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return (psf / psf.sum())[None, None]


def test_residual_update_leaves_a_right_output_alone():
    from psfdeconv._fourier import convolve_same

    truth = _gaussian_galaxies([2.0, 3.0], e1=0.2)
    psfs = np.broadcast_to(_psf(), (2, 1, 25, 25))
    kernels = gaussian_target_psfs(0.4, 0.2)[[0, 0]]
    observed = convolve_same(truth, psfs)
    updated = residual_update(truth, observed, psfs, kernels, 0.01)
    assert_allclose(updated, convolve_to_target(truth, kernels), atol=1e-6 * truth.max())


@pytest.mark.parametrize('noise, pulled', [(0.01, True), (100.0, False)])
def test_residual_update_pulls_a_wrong_shape_where_the_noise_allows(noise, pulled):
    from psfdeconv._fourier import convolve_same
    from psfdeconv.measure import hsm_moments

    truth = _gaussian_galaxies([3.0], e1=0.3)
    output = _gaussian_galaxies([3.0], e1=0.0)  # right size and flux, round
    psfs = _psf()
    kernels = gaussian_target_psfs(0.4, 0.2)
    observed = convolve_same(truth, psfs) + np.random.default_rng(3).normal(0, noise, truth.shape)
    updated = residual_update(output, observed, psfs, kernels, noise)
    e1 = {name: float(hsm_moments(image)['hsm_e1'][0, 0]) for name, image in
          [('truth', convolve_to_target(truth, kernels)),
           ('output', convolve_to_target(output, kernels)), ('updated', updated)]}
    # The flux is the output's (the refit's) whatever the residual.
    assert_allclose(updated.sum(), output.sum(), rtol=1e-6)
    if pulled:
        assert abs(e1['updated'] - e1['truth']) < 0.1 * abs(e1['output'] - e1['truth'])
    else:
        assert abs(e1['updated'] - e1['output']) < 0.1 * abs(e1['truth'] - e1['output'])


def test_residual_update_keeps_blank_outputs_blank():
    psfs = _psf()
    kernels = gaussian_target_psfs(0.4, 0.2)
    observed = np.random.default_rng(4).normal(0, 1.0, (1, 1, 64, 64))
    updated = residual_update(np.zeros((1, 1, 64, 64)), observed, psfs, kernels, 1.0)
    assert np.all(updated == 0)


def test_deconvolve_stamps_refuses_a_bad_target_before_the_network(tiny_model):
    from psfdeconv import deconvolve_stamps
    from psfdeconv.simulate import simulate_stamps

    sims = simulate_stamps(1, seed=5)
    with pytest.raises(InvalidInputError, match='positive and finite'):
        deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
                          model=tiny_model, target_psf=0.0)


def test_run_to_a_target_records_it_and_keeps_fluxes(tmp_path, example_run):
    # The bundled example through 'psfdeconv run --target-fwhm 0.4': same sources and
    # fluxes as the shared run on the pixel grid, wider (never narrower) HSM sizes, and
    # the target in the catalogue's meta.
    from psfdeconv.cli import main
    from psfdeconv.io import read_catalog

    assert main(['run', '--example', '--target-fwhm', '0.4', '--out', str(tmp_path)]) == 0
    target = read_catalog(tmp_path / 'catalog.fits')
    plain = read_catalog(example_run.out / 'catalog.fits')
    assert target.meta['target_fwhm'] == 0.4 and 'target_fwhm' not in plain.meta
    assert_allclose(target['flux_r'].value, plain['flux_r'].value)
    both = np.isfinite(target['hsm_sigma_r'].value) & np.isfinite(plain['hsm_sigma_r'].value)
    assert both.sum() >= 20
    assert np.all(target['hsm_sigma_r'][both] >= plain['hsm_sigma_r'][both] * 0.99)


def test_cli_refuses_a_bad_target_fwhm(tmp_path, capsys):
    from psfdeconv.cli import main

    # argparse refuses it (exit 2), naming the option.
    with pytest.raises(SystemExit) as exit_info:
        main(['run', '--example', '--target-fwhm', '-1', '--out', str(tmp_path)])
    assert exit_info.value.code == 2
    assert '--target-fwhm' in capsys.readouterr().err


def _three_band_case(noise, seed=5):
    from psfdeconv._fourier import convolve_same

    truth = np.repeat(_gaussian_galaxies([3.0], e1=0.3), 3, axis=1)
    output = np.repeat(_gaussian_galaxies([3.0], e1=0.0), 3, axis=1)
    psfs = np.concatenate([_psf(2.0), _psf(2.5), _psf(3.0)], axis=1)
    observed = convolve_same(truth, psfs)
    observed += np.random.default_rng(seed).normal(0, noise, observed.shape)
    return truth, output, psfs, observed, gaussian_target_psfs(0.4, 0.2)


def test_residual_update_pools_the_bands_when_they_are_coherent():
    from psfdeconv.measure import hsm_moments

    squared = {0.0: [], 0.8: []}
    for seed in range(6):
        truth, output, psfs, observed, kernels = _three_band_case(noise=3.0, seed=seed)
        reference = hsm_moments(convolve_to_target(truth, kernels))['hsm_e1'][0]
        for coherence in squared:
            updated = residual_update(output, observed, psfs, kernels, 3.0,
                                      band_coherence=coherence)
            squared[coherence].append((hsm_moments(updated)['hsm_e1'][0] - reference) ** 2)
    rms = {c: np.sqrt(np.mean(values)) for c, values in squared.items()}
    # Three stamps of the same structure tell more than one.
    assert rms[0.8] < 0.8 * rms[0.0]


def test_residual_update_bands_are_independent_without_coherence():
    truth, output, psfs, observed, kernels = _three_band_case(noise=0.1)
    other = observed.copy()
    other[:, 2] += 5.0 * np.random.default_rng(9).normal(size=other.shape[-2:])
    for coherence, same in ((0.0, True), (0.8, False)):
        first = residual_update(output, observed, psfs, kernels, 0.1, band_coherence=coherence)
        second = residual_update(output, other, psfs, kernels, 0.1, band_coherence=coherence)
        assert np.allclose(first[:, 0], second[:, 0], rtol=0, atol=1e-9) == same
    # One band: the coherence has nothing to pool.
    one = [residual_update(output[:, :1], observed[:, :1], psfs[:, :1], kernels, 0.1,
                           band_coherence=c) for c in (0.0, 0.8)]
    assert_allclose(one[0], one[1], atol=1e-6 * one[0].max())
    with pytest.raises(InvalidInputError, match='band_coherence must be in'):
        residual_update(output, observed, psfs, kernels, 0.1, band_coherence=1.0)
    with pytest.raises(InvalidInputError, match='prior_fraction must be positive'):
        residual_update(output, observed, psfs, kernels, 0.1, prior_fraction=0.0)
