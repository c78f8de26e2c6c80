# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.plotting: every figure draws on small real inputs and writes a PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable

from psfdeconv.evaluate import read_report
from psfdeconv.exceptions import InvalidInputError, OutputExistsError, ShapeMismatchError
from psfdeconv.plotting import (
    plot_catalog_overview,
    plot_confusion_matrix,
    plot_ellipticity_correlations,
    plot_flux_histogram,
    plot_stamp_grid,
    plot_training_history,
    save_figure,
    write_evaluation_plots,
    write_run_plots,
    write_training_plots,
)

#: Seed of the simulated stamps (12 objects, 8 of them galaxies).
SIMULATION_SEED = 5
N_OBJECTS = 12


def png_shape(path):
    """(height, width) of a PNG, read back with matplotlib."""
    from matplotlib.image import imread

    assert path.stat().st_size > 0
    return imread(path).shape[:2]


def figure_pixels(fig):
    """The (height, width) a PNG of ``fig`` has at the figure's dpi."""
    width, height = fig.get_size_inches() * fig.dpi
    return round(height), round(width)


@pytest.fixture(scope='module')
def sims():
    from psfdeconv.simulate import simulate_stamps

    return simulate_stamps(N_OBJECTS, seed=SIMULATION_SEED)


@pytest.fixture(scope='module')
def deconvolved(sims):
    """The simulated stamps deconvolved with the shipped model."""
    from psfdeconv.deconvolve import deconvolve_stamps

    return deconvolve_stamps(sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'])


@pytest.fixture(scope='module')
def results(sims, deconvolved):
    from psfdeconv.evaluate import evaluate_predictions

    return evaluate_predictions(
        sims['truth'], {'model': deconvolved, 'observed': sims['observed']},
        psfs=sims['psf'], pixel_scale=sims['pixel_scale'], is_blank=sims['is_blank'],
        noise_sigma=sims['noise_sigma'], n_bootstrap=10)


@pytest.fixture
def catalog():
    """A two-band catalogue with the columns of deconvolve_catalog that the plots use."""
    rng = np.random.default_rng(3)
    n = 9
    table = QTable(meta={'bands': ['g', 'r'], 'reference_band': 'r'})
    table['id'] = np.arange(1, n + 1)
    table['x'] = rng.uniform(10, 110, n) * u.pix
    table['y'] = rng.uniform(10, 70, n) * u.pix
    for band in ('g', 'r'):
        flux = rng.uniform(100, 5000, n)
        table[f'flux_{band}'] = flux * u.adu
        table[f'flux_corrected_{band}'] = flux * 1.03 * u.adu
        table[f'snr_{band}'] = flux / 10.0
        for prefix in ('', 'hsm_'):
            table[f'{prefix}e1_{band}'] = rng.uniform(-0.4, 0.4, n)
            table[f'{prefix}e2_{band}'] = rng.uniform(-0.4, 0.4, n)
    table['flux_g'][0] = np.nan * u.adu  # an off-image band
    table['e1_g'][1] = np.nan
    return table


@pytest.fixture
def exposure():
    return np.random.default_rng(4).normal(0.0, 1.0, (80, 120))


def test_import_does_not_load_matplotlib():
    code = ('import json, sys, psfdeconv.plotting\n'
            'print(json.dumps([m for m in ("matplotlib", "tensorflow", "keras", "galsim") '
            'if m in sys.modules]))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


class TestStampGrid:
    def test_writes_png_of_figure_size(self, sims, deconvolved, tmp_path):
        fig = plot_stamp_grid(sims['observed'], sims['psf'], deconvolved,
                              pixel_scale=sims['pixel_scale'], truth=sims['truth'],
                              snr=sims['snr'], band=1)
        # One row per SNR tertile; observed, 3 channels, truth, deconvolved.
        assert len(fig.axes) == 3 * 6
        assert [ax.get_title() for ax in fig.axes[:6]] == [
            'observed', 'PSF channel', 'iPSF channel', 'iPSF1 channel', 'truth', 'deconvolved']
        path = save_figure(fig, tmp_path / 'grid.png')
        assert png_shape(path) == figure_pixels(fig) == (480, 900)

    def test_rows_per_snr_bin_skip_blanks(self, sims, deconvolved):
        fig = plot_stamp_grid(sims['observed'], None, deconvolved, snr=sims['snr'][:, 0],
                              rows_per_bin=2)
        labels = [ax.get_ylabel() for ax in fig.axes[::2]]
        assert len(labels) == 6
        assert [label.split()[0] for label in labels] == ['low'] * 2 + ['medium'] * 2 + \
            ['high'] * 2
        shown = [int(label.split('#')[1].split(',')[0]) for label in labels]
        assert not np.any(sims['is_blank'][shown])
        assert np.all(np.diff(sims['snr'][shown, 0]) > 0)

    def test_indices_and_deconvolved_only(self, deconvolved):
        fig = plot_stamp_grid(None, None, deconvolved, indices=[4, -1], stretch='linear')
        assert len(fig.axes) == 2
        assert [ax.get_ylabel() for ax in fig.axes] == ['#4', f'#{N_OBJECTS - 1}']

    @pytest.mark.parametrize('kwargs, error, match', [
        ({'psfs_only': True}, InvalidInputError, 'need the observed stamps'),
        ({'no_scale': True}, InvalidInputError, 'pixel_scale'),
        ({'band': 3}, InvalidInputError, r'band must be an index in 0\.\.2'),
        ({'indices': [N_OBJECTS]}, InvalidInputError, 'indices must select'),
        ({'snr': np.zeros(N_OBJECTS)}, InvalidInputError, 'no finite positive'),
        ({'snr': np.ones(3)}, ShapeMismatchError, 'snr must have shape'),
        ({'stretch': 'log'}, InvalidInputError, 'stretch'),
    ])
    def test_errors(self, sims, deconvolved, kwargs, error, match):
        observed = None if kwargs.pop('psfs_only', False) else sims['observed']
        scale = None if kwargs.pop('no_scale', False) else sims['pixel_scale']
        with pytest.raises(error, match=match):
            plot_stamp_grid(observed, sims['psf'], deconvolved, pixel_scale=scale, **kwargs)

    def test_shape_mismatch(self, sims, deconvolved):
        with pytest.raises(ShapeMismatchError, match='truth has shape'):
            plot_stamp_grid(None, None, deconvolved, truth=sims['truth'][:, :2])
        with pytest.raises(ShapeMismatchError, match=r'deconvolved\[:, None\]'):
            plot_stamp_grid(None, None, deconvolved[:, 0])


class TestCatalogOverview:
    def test_writes_png(self, catalog, exposure, tmp_path):
        fig = plot_catalog_overview(catalog, image=exposure)
        assert fig.axes[0].get_title(loc='left') == 'r: flux bias correction'
        path = save_figure(fig, tmp_path / 'overview.png')
        assert png_shape(path) == figure_pixels(fig) == (460, 1000)

    def test_band_hsm_mask_and_nans(self, catalog, exposure):
        mask = np.zeros(exposure.shape, bool)
        mask[:10] = True
        fig = plot_catalog_overview(catalog, image=NDData(exposure, mask=mask), band='g',
                                    ellipticity='hsm', whisker_length=5.0)
        assert fig.axes[1].get_title(loc='left') == 'g: ellipticity (hsm)'
        assert '1 non-positive or NaN left out' in [t.get_text() for t in fig.axes[0].texts]
        # The masked rows are blank (NaN) in the image shown.
        shown = fig.axes[1].get_images()[0].get_array()
        assert np.ma.getmaskarray(shown)[:10].all() or np.isnan(shown[:10]).all()

    def test_without_image(self, catalog):
        fig = plot_catalog_overview(catalog, band='g')
        x_low, x_high = fig.axes[1].get_xlim()
        assert x_low < catalog['x'].value.min() and x_high > catalog['x'].value.max()

    def test_errors(self, catalog):
        with pytest.raises(InvalidInputError, match=r"band 'z' is not in the catalog"):
            plot_catalog_overview(catalog, band='z')
        with pytest.raises(InvalidInputError, match="ellipticity must be"):
            plot_catalog_overview(catalog, ellipticity='kaiser')
        catalog.remove_column('e2_r')
        with pytest.raises(InvalidInputError, match=r"lacks the column\(s\) \['e2_r'\]"):
            plot_catalog_overview(catalog)
        with pytest.raises(ShapeMismatchError, match='image must be 2-D'):
            plot_catalog_overview(catalog, band='g', image=np.zeros((2, 8, 8)))


class TestTrainingHistory:
    HISTORY = [{'epoch': 1, 'loss': 0.0046, 'val_loss': 0.0022, 'elapsed_seconds': 9.0},
               {'epoch': 2, 'loss': 0.0022, 'val_loss': 0.0021, 'elapsed_seconds': 18.0},
               {'epoch': 3, 'loss': 0.0020, 'val_loss': None, 'elapsed_seconds': 27.0}]

    def test_forms_of_history(self, tmp_path):
        state = {'epoch': 3, 'history': self.HISTORY, 'best_epoch': 2}
        card = {'name': 'x', 'training': {'history': self.HISTORY}}
        (tmp_path / 'state.json').write_text(json.dumps(state))
        for history in (self.HISTORY, state, card, tmp_path / 'state.json'):
            fig = plot_training_history(history)
            lines = fig.axes[0].get_lines()
            assert [line.get_label() for line in lines] == ['loss', 'val_loss',
                                                            'best (epoch 2)']
            assert np.isnan(lines[1].get_ydata()[2])

    def test_shipped_card_into_own_axes(self):
        from matplotlib.figure import Figure

        from psfdeconv.model import default_model_path

        fig = Figure()
        ax = fig.subplots()
        assert plot_training_history(default_model_path().with_suffix('.json'), ax=ax) is fig
        assert ax.get_yscale() == 'log'

    def test_errors(self, tmp_path):
        with pytest.raises(InvalidInputError, match='does not exist'):
            plot_training_history(tmp_path / 'missing.json')
        with pytest.raises(InvalidInputError, match="neither 'history' nor 'training'"):
            plot_training_history({'epoch': 3})
        with pytest.raises(InvalidInputError, match='non-empty list'):
            plot_training_history([])


class TestEvaluationPlots:
    def test_flux_histogram_snr(self, results, tmp_path):
        fig = plot_flux_histogram(results, bins=10)
        assert [ax.get_title().split(':')[0] for ax in fig.axes[:2]] == ['model', 'observed']
        assert fig.axes[0].get_xlabel() == 'true SNR'
        path = save_figure(fig, tmp_path / 'flux.png')
        assert png_shape(path) == figure_pixels(fig) == (360, 800)

    def test_flux_histogram_truth_flux(self, results, sims):
        from psfdeconv.measure import image_moments

        truth_flux = image_moments(sims['truth'])['flux']
        fig = plot_flux_histogram(results, methods='model', truth_flux=truth_flux, bins=8)
        assert fig.axes[0].get_xlabel() == 'true flux'
        assert fig.axes[0].get_yscale() == 'log'
        fig = plot_flux_histogram(results, methods=['model'], band='b1',
                                  truth_flux=truth_flux[:, 1], bins=8)
        # Measured = true x (1 + d_flux / 100): the histogram holds every non-blank object.
        counts = fig.axes[0].collections[0].get_array()
        assert counts.sum() == np.sum(~sims['is_blank'])
        with pytest.raises(ShapeMismatchError, match='truth_flux has shape'):
            plot_flux_histogram(results, truth_flux=truth_flux[:5])

    def test_flux_histogram_errors(self, results):
        with pytest.raises(InvalidInputError, match=r"methods \['wiener'\] are not"):
            plot_flux_histogram(results, methods='wiener')
        with pytest.raises(InvalidInputError, match="band 'r' is not in the results"):
            plot_flux_histogram(results, band='r')
        no_snr = {'objects': results['objects'][['method', 'is_blank', 'd_flux_b0']]}
        with pytest.raises(InvalidInputError, match='noise_sigma'):
            plot_flux_histogram(no_snr)
        with pytest.raises(InvalidInputError, match="with a 'objects' entry"):
            plot_flux_histogram({})

    def test_correlations(self, results, tmp_path):
        fig = plot_ellipticity_correlations(results)
        psf_panel, true_panel = fig.axes
        assert [t.get_text() for t in psf_panel.get_legend().get_texts()] == [
            'ideal 0', 'truth (null level)', 'model', 'observed']
        # C_true of the truth is 1 by construction: not drawn.
        assert 'truth (null level)' not in [t.get_text()
                                            for t in true_panel.get_legend().get_texts()]
        assert [t.get_text() for t in psf_panel.get_xticklabels()] == [
            'low SNR', 'medium SNR', 'high SNR', 'all']
        assert plot_ellipticity_correlations(results, yscale='symlog').axes[0].get_yscale() \
            == 'symlog'
        path = save_figure(fig, tmp_path / 'corr.png')
        assert png_shape(path) == figure_pixels(fig) == (400, 1000)

    def test_confusion(self, results, tmp_path):
        fig = plot_confusion_matrix(results, methods=['observed', 'model'])
        counts = results['confusion']['model']
        texts = [int(t.get_text()) for t in fig.axes[1].texts]
        assert texts == counts.ravel().tolist()
        path = save_figure(fig, tmp_path / 'confusion.png')
        assert png_shape(path) == figure_pixels(fig) == (340, 740)
        with pytest.raises(InvalidInputError, match='must be a 4x4 matrix'):
            plot_confusion_matrix({'confusion': {'model': np.eye(3, dtype=int)}})

    def test_report_round_trip(self, results, tmp_path):
        from psfdeconv.evaluate import write_report

        write_report(results, tmp_path)
        again = read_report(tmp_path)
        assert again['confusion'].keys() == results['confusion'].keys()
        for method, matrix in results['confusion'].items():
            np.testing.assert_array_equal(again['confusion'][method], matrix)
        np.testing.assert_allclose(again['edges'], results['edges'])
        written = write_evaluation_plots(tmp_path)
        assert [p.name for p in written] == ['flux_histogram.png',
                                             'ellipticity_correlations.png',
                                             'confusion_matrix.png']
        with pytest.raises(InvalidInputError, match='holds no .ecsv table'):
            read_report(tmp_path / 'nothing')


class TestWriters:
    def test_write_evaluation_plots_refuses_existing(self, results, tmp_path):
        (tmp_path / 'confusion_matrix.png').write_bytes(b'keep')
        with pytest.raises(OutputExistsError, match='confusion_matrix.png exists'):
            write_evaluation_plots(tmp_path, results)
        # Checked before drawing: nothing else was written.
        assert sorted(p.name for p in tmp_path.iterdir()) == ['confusion_matrix.png']
        written = write_evaluation_plots(tmp_path, results, overwrite=True)
        assert len(written) == 3
        assert all(png_shape(path) for path in written)

    def test_write_training_plots(self, tmp_path):
        history = TestTrainingHistory.HISTORY
        [path] = write_training_plots(tmp_path, history)
        assert path.name == 'training_history.png'
        assert png_shape(path) == (380, 550)
        with pytest.raises(OutputExistsError):
            write_training_plots(tmp_path, history)
        assert write_training_plots(tmp_path, history, overwrite=True) == [path]

    def test_write_run_plots(self, catalog, exposure, tmp_path):
        rng = np.random.default_rng(5)
        # One stamp per catalogue row, the last ones partly off the 80-row exposure.
        stamps = [NDData(rng.uniform(size=(2, 16, 16)), meta={'id': i, 'origin': (10 * i, 9 * i)})
                  for i in range(len(catalog))]
        written = write_run_plots(tmp_path / 'run', catalog, stamps=stamps,
                                  exposure={'g': exposure * 0, 'r': exposure})
        assert [p.name for p in written] == ['catalog_overview.png', 'stamps.png']
        assert png_shape(written[0]) == (460, 1000)
        # observed and deconvolved columns, two rows per SNR tertile.
        assert png_shape(written[1]) == (930, 300)
        with pytest.raises(OutputExistsError):
            write_run_plots(tmp_path / 'run', catalog)
        assert write_run_plots(tmp_path / 'run', catalog, overwrite=True) == written[:1]

    def test_write_run_plots_exposure_file(self, catalog, exposure, tmp_path):
        from astropy.io import fits

        fits.writeto(tmp_path / 'r.fits', exposure)
        [path] = write_run_plots(tmp_path, catalog, exposure=tmp_path / 'r.fits')
        assert png_shape(path) == (460, 1000)

    def test_save_figure_refuses_existing(self, tmp_path):
        fig = plot_training_history(TestTrainingHistory.HISTORY)
        path = tmp_path / 'a.png'
        path.write_bytes(b'old')
        with pytest.raises(OutputExistsError, match='a.png exists'):
            save_figure(fig, path)
        assert path.read_bytes() == b'old'
        save_figure(fig, path, overwrite=True, dpi=50)
        assert png_shape(path) == (190, 275)
        assert sorted(p.name for p in tmp_path.iterdir()) == ['a.png']  # no temporary left
