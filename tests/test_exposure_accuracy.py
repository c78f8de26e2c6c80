# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the exposure-level accuracy machinery: the truth shapes of
`simulate_exposure`, source-masked background subtraction, the windowed centroid,
`match_truth` / `exposure_accuracy`, and ``psfdeconv run --example`` on the bundled set.
"""

import astropy.units as u
import numpy as np
import pytest
from _images import elliptical_gaussian
from astropy.table import QTable
from numpy.testing import assert_allclose

from psfdeconv.cli import main
from psfdeconv.evaluate import exposure_accuracy, match_truth
from psfdeconv.io import EXAMPLE_BANDS, EXAMPLE_EXPOSURES, read_catalog, read_stamps
from psfdeconv.measure import image_moments, windowed_centroid
from psfdeconv.simulate import simulate_exposure


@pytest.fixture(scope='module')
def small_field():
    # Not the session's `simulated_field` (conftest.py): one of its galaxies has NaN truth
    # moments, and test_truth_shape_columns needs every galaxy's.
    return simulate_exposure((256, 256), n_galaxies=6, n_stars=4, seed=12)


def test_truth_shape_columns(small_field):
    _, truth = small_field
    galaxy = np.asarray(truth['kind']) == 'galaxy'
    for name in ('e1_true', 'e2_true', 'hsm_e1_true', 'hsm_e2_true'):
        values = np.asarray(truth[name])
        assert np.isfinite(values[galaxy]).all() and np.isnan(values[~galaxy]).all()
        assert (np.abs(values[galaxy]) < 1).all()
    assert truth['size_true'].unit == u.arcsec
    # The truth size follows the drawn half-light radius.
    size = truth['size_true'][galaxy].value
    radius = truth['half_light_radius'][galaxy].value
    assert np.corrcoef(size, radius)[0, 1] > 0.5


def test_windowed_centroid_ignores_neighbours_and_matches_isolated_centroid():
    image = elliptical_gaussian((64, 64), 3.5, 2.5, 0.4, 30.4, 33.1)
    neighbour = elliptical_gaussian((64, 64), 2.0, 2.0, 0.0, 58.0, 6.0)
    x, y = windowed_centroid(np.stack([image, image + 3 * neighbour]), [32.0, 32.0],
                             [32.0, 32.0], 15.0)
    assert_allclose(x, 30.4, atol=0.02)
    assert_allclose(y, 33.1, atol=0.02)
    # The stamp-wide centroid is pulled far off by the neighbour.
    whole = image_moments((image + 3 * neighbour)[None, None])
    assert abs(whole['x'][0, 0] - 30.4) > 5
    # No light in the window: NaN, not a division warning.
    x, y = windowed_centroid(np.zeros((1, 16, 16)), [8.0], [8.0], 3.0)
    assert np.isnan(x[0]) and np.isnan(y[0])


def test_background_with_sources_masked_keeps_galaxy_wings():
    # Galaxies on a sky of exactly 0: under the galaxies, the plain sigma-clipped mesh
    # rises into their faint wings (taking their flux); the source-masked one stays at 0.
    from psfdeconv.background import estimate_background

    exposures, truth = simulate_exposure((256, 256), n_galaxies=12, n_stars=5, seed=3)
    image = np.asarray(exposures['g'].data)
    mask = np.zeros(image.shape, bool)
    plain, _ = estimate_background(image, mask)
    masked, rms = estimate_background(image, mask, mask_sources=True)
    assert rms == pytest.approx(1.0, rel=0.1)  # the simulated sky sigma
    galaxies = truth[truth['kind'] == 'galaxy']
    rows = np.round(galaxies['y'].value).astype(int)
    cols = np.round(galaxies['x'].value).astype(int)
    assert abs(np.mean(masked[rows, cols])) < 0.03
    assert np.mean(plain[rows, cols]) > 3 * abs(np.mean(masked[rows, cols]))


def test_match_truth_and_accuracy_of_a_perfect_catalog(small_field):
    from astropy.coordinates import SkyCoord

    _, truth = small_field
    galaxies = truth[truth['kind'] == 'galaxy']
    catalog = QTable()
    catalog['sky_centroid'] = SkyCoord(galaxies['ra'], galaxies['dec'])[::-1]
    catalog['flags'] = np.zeros(len(galaxies), np.int32)
    catalog.meta['bands'] = ['g']
    reverse = galaxies[::-1]
    catalog['flux_corrected_g'] = 1.02 * reverse['flux_g']
    catalog['snr_g'] = np.full(len(galaxies), 100.0)
    catalog['flux_err_g'] = 0.04 * reverse['flux_g']
    for name in ('e1', 'e2', 'hsm_e1', 'hsm_e2'):
        catalog[f'{name}_g'] = reverse[f'{name}_true'] + 0.01
    catalog['size_g'] = reverse['size_true'] * 1.1
    matches = match_truth(catalog, truth)
    assert len(matches) == len(galaxies)
    assert (np.asarray(matches['catalog_index']) ==
            len(galaxies) - 1 - np.arange(len(galaxies))).all()
    accuracy = exposure_accuracy(catalog, truth)
    assert accuracy['n_matched'] == accuracy['n_truth'] == len(galaxies)
    assert accuracy['position_arcsec']['max'] < 1e-6
    assert accuracy['g']['flux']['median'] == pytest.approx(0.02)
    # Errors of 4 %: the median |dF/F| that noise alone gives is 0.674 x 4 % (its
    # sampling spread over the few galaxies allows 10 %).
    assert accuracy['g']['flux']['noise_median_abs'] == pytest.approx(0.6745 * 0.04, rel=0.1)
    assert accuracy['g']['hsm_e1']['mean'] == pytest.approx(0.01)
    assert accuracy['g']['size_percent']['mean'] == pytest.approx(10.0)
    # Moved by 1 arcsec: nothing matches within 0.5 arcsec.
    catalog['sky_centroid'] = catalog['sky_centroid'].spherical_offsets_by(0 * u.deg,
                                                                        1 * u.arcsec)
    assert len(match_truth(catalog, truth)) == 0


def test_run_example_end_to_end(example_run, tmp_path):
    # README command 1: the bundled exposures, ePSFs from their stars, the shipped model.
    # `example_run` (conftest.py) runs `psfdeconv run --example --plots --out DIR` once per
    # session.
    out = example_run.out
    assert example_run.argv == ['run', '--example', '--plots', '--out', str(out)]
    assert example_run.code == 0
    for name in ('catalog_overview.png', 'stamps.png'):
        assert (out / name).stat().st_size > 10_000
    printed = example_run.stdout
    catalog = read_catalog(out / 'catalog.fits')
    truth = QTable.read(EXAMPLE_EXPOSURES / 'truth.ecsv')
    assert catalog.meta['bands'] == list(EXAMPLE_BANDS)
    assert all('epsf' in str(source).lower()
               for source in catalog.meta['psf_source'].values())
    accuracy = exposure_accuracy(catalog, truth)
    # Nearly every galaxy is found (29 of 30 with the shipped model) and placed within a
    # fraction of a pixel (0.2 arcsec).
    assert accuracy['n_matched'] >= 0.9 * accuracy['n_truth']
    assert accuracy['position_arcsec']['median'] < 0.1
    for band in EXAMPLE_BANDS:
        assert abs(accuracy[band]['flux']['median']) < 0.2
    assert 'against the truth' in printed
    assert len(read_stamps(out / 'stamps.fits')) == len(catalog)
    # The same again without --overwrite: exit 5, the catalogue untouched (on a copy of the
    # shared run's directory).
    out = example_run.copy_to(tmp_path)
    before = (out / 'catalog.fits').read_bytes()
    assert main(['run', '--example', '--out', str(out)]) == 5
    assert (out / 'catalog.fits').read_bytes() == before


def test_psf_fwhm_of_moffat_and_gaussian_images():
    import galsim

    from psfdeconv.deconvolve import psf_fwhm

    images = [galsim.Moffat(beta=2.5, fwhm=fwhm).drawImage(nx=41, ny=41, scale=0.1).array
              for fwhm in (0.5, 0.9)]
    images.append(galsim.Gaussian(fwhm=1.2).drawImage(nx=41, ny=41, scale=0.2).array)
    fwhm = psf_fwhm(np.stack(images), np.array([0.1, 0.1, 0.2]))
    assert_allclose(fwhm, [0.5, 0.9, 1.2], rtol=0.08)


def test_outside_training_range_warns_flags_or_refuses():
    import galsim

    from psfdeconv.deconvolve import deconvolve_stamps, outside_training_range
    from psfdeconv.exceptions import OutsideTrainingRangeWarning, PixelScaleError
    from psfdeconv.model import load_model
    from psfdeconv.simulate import simulate_stamps

    model = load_model()
    sim = model.card['training']['simulation_config']
    sims = simulate_stamps(3, seed=21)
    # A pixel scale twice the largest trained one, and a PSF three times the widest.
    scale = sims['pixel_scale'].copy()
    scale[0] = 2 * sim['pixel_scale_range'][1]
    psfs = sims['psf'].copy()
    wide = galsim.Moffat(beta=3, fwhm=3 * sim['psf_fwhm_range'][1])
    psfs[2, 1] = wide.drawImage(nx=41, ny=41, scale=float(scale[2])).array
    outside, reasons = outside_training_range(model, scale, psfs)
    assert outside.tolist() == [True, False, True]
    assert 'pixel scales outside' in reasons[0] and 'FWHM outside' in reasons[1]
    with pytest.warns(OutsideTrainingRangeWarning, match='extrapolations'):
        _, details = deconvolve_stamps(sims['observed'], psfs, pixel_scale=scale,
                                       model=model, return_details=True)
    assert details['outside_training'].tolist() == [True, False, True]
    with pytest.raises(PixelScaleError, match=r'trained range.*--strict'):
        deconvolve_stamps(sims['observed'], psfs, pixel_scale=scale, model=model,
                          strict=True)


def test_run_strict_refuses_an_untrained_pixel_scale(tmp_path, capsys):
    # 0.5 arcsec/pixel: outside every shipped model's range. --strict: exit 3 and no
    # output; without it: the catalogue, each source flagged OUTSIDE_TRAINING.
    from psfdeconv.flags import FLAG_OUTSIDE_TRAINING

    field = tmp_path / 'field'
    assert main(['simulate-exposure', '--out', str(field), '--seed', '8', '--size', '256',
                 '--n-galaxies', '5', '--n-stars', '10', '--pixel-scale', '0.5']) == 0
    bands = []
    for band in EXAMPLE_BANDS:
        bands += ['--band', f'{band}={field / f"{band}.fits"}']
    psf = ['--psf', 'moffat:fwhm=0.8arcsec,beta=3.5']
    assert main(['run', *bands, *psf, '--strict', '--out', str(tmp_path / 'strict')]) == 3
    err = capsys.readouterr().err
    assert 'pixel scales outside the trained range' in err and '0.500' in err
    assert not (tmp_path / 'strict' / 'catalog.fits').exists()
    with pytest.warns(Warning, match='outside the trained range'):
        assert main(['run', *bands, *psf, '--out', str(tmp_path / 'loose')]) == 0
    catalog = read_catalog(tmp_path / 'loose' / 'catalog.fits')
    assert len(catalog) and (np.asarray(catalog['flags']) & FLAG_OUTSIDE_TRAINING).all()


def test_run_one_band_picks_the_single_band_model(tmp_path, capsys):
    from psfdeconv.model import DEFAULT_MODELS

    out = tmp_path / 'r_only'
    assert main(['run', '--band', f'r={EXAMPLE_EXPOSURES / "r.fits.gz"}', '--psf',
                 'moffat:fwhm=0.8arcsec,beta=3.5', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert ' in 1 band (' in printed and printed.rstrip().endswith('and 1 PSF file')
    catalog = read_catalog(out / 'catalog.fits')
    assert catalog.meta['bands'] == ['r']
    assert catalog.meta['model']['name'] == DEFAULT_MODELS[1]
    assert 'flux_corrected_r' in catalog.colnames and 'flux_g' not in catalog.colnames
    truth = QTable.read(EXAMPLE_EXPOSURES / 'truth.ecsv')
    accuracy = exposure_accuracy(catalog, truth)
    assert accuracy['n_matched'] >= accuracy['n_truth'] - 1


def test_evaluate_plots_need_a_report_directory(capsys):
    assert main(['evaluate', 'missing.h5', '--plots']) == 2
    assert '--report' in capsys.readouterr().err


# --- Neighbour replacement --------------------------------------------------------------

def test_replace_neighbours_noise_seed_and_target():
    from psfdeconv.detection import replace_neighbours

    stamps = np.zeros((2, 2, 64, 64))
    stamps[:, :, 28:36, 28:36] = 5.0           # the source
    stamps[:, :, 2:14, 44:60] = 80.0           # a neighbour
    segments = np.zeros((2, 64, 64), dtype=int)
    segments[:, 28:36, 28:36] = 7
    segments[:, 2:14, 44:60] = 3
    masks = np.zeros(stamps.shape, dtype=bool)
    masks[1, 0, 5, 50] = True                  # a masked pixel stays as it is
    sigma = np.array([[1.0, 2.0], [1.0, 2.0]])
    # The second source sits 2 pixels off its segment: it is still its own.
    x, y = np.array([31.5, 37.0]), np.array([31.5, 31.5])
    out, replaced = replace_neighbours(stamps, segments, x, y, sigma, index=np.array([4, 4]),
                                       masks=masks, dilation=2)
    # The source is untouched; the neighbour (12 x 16 pixels + the dilation rim)
    # takes the values of the pixels point-symmetric about the source's pixel
    # (here the empty sky, 0) and noise where those lie off the stamp.
    assert (out[:, :, 28:36, 28:36] == 5.0).all()
    assert replaced[0].sum() > 12 * 16 and not replaced[:, 28:36, 28:36].any()
    yy, xx = np.mgrid[:64, :64]
    mirror_off = (2 * 32 - xx < 0) | (2 * 32 - xx > 63) | (2 * 32 - yy < 0) | \
        (2 * 32 - yy > 63)
    noisy, mirrored = replaced[0] & mirror_off, replaced[0] & ~mirror_off
    assert noisy.sum() >= 10 and mirrored.sum() > 150
    for b, s in enumerate((1.0, 2.0)):
        assert (out[0, b][mirrored] == 0.0).all()
        values = out[0, b][noisy]
        assert abs(values.mean()) < 0.8 * s and 0.4 * s < values.std() < 1.6 * s
    # Seeded by the index: the same source gets the same noise.
    again, _ = replace_neighbours(stamps[:1], segments[:1], x[:1], y[:1], sigma[:1],
                                  index=np.array([4]))
    assert_allclose(again[0], out[0])
    other, _ = replace_neighbours(stamps[:1], segments[:1], x[:1], y[:1], sigma[:1],
                                  index=np.array([5]))
    assert not np.allclose(other[0], out[0])
    assert out[1, 0, 5, 50] == 80.0
    # The input is not modified; a stamp without other segments is unchanged.
    assert stamps[0, 0, 5, 50] == 80.0
    alone = segments.copy()
    alone[:, 2:14, 44:60] = 0
    same, none = replace_neighbours(stamps, alone, x, y, sigma, index=np.array([1, 2]))
    assert_allclose(same, stamps) and not none.any()


def test_neighbour_segments_combine_the_bands():
    from psfdeconv.detection import neighbour_segments

    rng = np.random.default_rng(3)
    shape = (96, 96)
    g = rng.normal(0, 1, shape) + elliptical_gaussian(shape, 2.0, 2.0, 0.0, 30.0, 30.0, 1000.0)
    r = rng.normal(0, 1, shape) + elliptical_gaussian(shape, 2.0, 2.0, 0.0, 70.0, 60.0, 1000.0)
    labels = neighbour_segments([g, r])
    # A source bright in one band only is found; the two are separate segments.
    assert labels[30, 30] > 0 and labels[60, 70] > 0 and labels[30, 30] != labels[60, 70]
    assert labels.dtype == np.int32 and labels[5, 90] == 0
    # A band masked everywhere drops out; all bands masked: no segments.
    one = neighbour_segments([g, r], masks=[np.ones(g.shape, bool), None])
    assert one[30, 30] == 0 and one[60, 70] > 0
    assert not neighbour_segments([g], masks=[np.ones(g.shape, bool)]).any()


def test_neighbour_light_is_not_counted_in_the_flux():
    """A galaxy with a 5x brighter galaxy 36 pixels away, inside its stamp: the
    replaced stamps recover the flux, the kept ones take in the neighbour's."""
    import galsim
    from astropy.nddata import CCDData, StdDevUncertainty
    from astropy.wcs import WCS

    from psfdeconv.flags import FLAG_NEIGHBOURS
    from psfdeconv.pipeline import deconvolve_catalog

    scale, size = 0.2, 200
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [100.0, 100.0]
    wcs.wcs.cdelt = [-scale / 3600, scale / 3600]
    psf = galsim.Moffat(beta=3.0, fwhm=0.8)
    galaxy = galsim.Convolve(galsim.Exponential(half_light_radius=0.6, flux=2000.0)
                             .shear(e1=0.2, e2=0.0), psf)
    neighbour = galsim.Convolve(galsim.Sersic(n=1.5, half_light_radius=0.8, flux=10000.0),
                                psf)
    rng = np.random.default_rng(8)
    exposures = {}
    for band in ('g', 'r', 'i'):
        image = galsim.ImageD(size, size, scale=scale)
        galaxy.drawImage(image=image, add_to_image=True, center=galsim.PositionD(81, 101))
        neighbour.drawImage(image=image, add_to_image=True,
                            center=galsim.PositionD(81 + 30, 101 + 20))
        data = image.array + rng.normal(0, 1.0, (size, size))
        exposures[band] = CCDData(data, unit='adu', wcs=wcs,
                                  uncertainty=StdDevUncertainty(np.ones((size, size))))
    position = np.array([[80.0, 100.0]])
    fluxes = {}
    for mode in ('replace', 'keep'):
        catalog, _ = deconvolve_catalog(exposures, position, 'moffat:fwhm=0.8arcsec,beta=3',
                                        neighbours=mode)
        fluxes[mode] = np.array([catalog[f'flux_corrected_{b}'][0].value for b in 'gri'])
        assert catalog.meta['neighbours'] == mode
        assert bool(catalog['flags'][0] & FLAG_NEIGHBOURS) == (mode == 'replace')
    error = {mode: np.abs(flux / 2000.0 - 1) for mode, flux in fluxes.items()}
    assert (error['replace'] < 0.05).all(), fluxes
    assert (fluxes['keep'] > fluxes['replace']).all() and error['keep'].min() > 0.05, fluxes


def test_psf_fwhm_resolves_sub_pixel_differences():
    # 2.0, 2.3 and 2.6 pixel PSFs: counting the pixels above half the peak
    # gives one value for all three; the interpolated radius orders them.
    import galsim

    from psfdeconv.deconvolve import psf_fwhm

    widths = (2.0, 2.3, 2.6)
    images = np.stack([galsim.Moffat(beta=3, fwhm=w).drawImage(nx=41, ny=41, scale=1.0).array
                       for w in widths])
    fwhm = psf_fwhm(images, 1.0)
    assert np.all(np.diff(fwhm) > 0.2)
    # The pixelated image is broader than the profile by under a quarter pixel.
    assert np.all((fwhm - widths > 0) & (fwhm - widths < 0.25))
