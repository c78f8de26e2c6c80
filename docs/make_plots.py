#!/usr/bin/env python
"""Make the PNGs of docs/plotting.rst (docs/plots/) with psfdeconv.plotting.

Usage (about 30 s on two cores; --overwrite replaces the existing images)::

    python docs/make_plots.py [--overwrite]

* evaluation figures from the report in docs/report/ (``psfdeconv evaluate --report``);
* the training history of the shipped model, from its card;
* a stamp grid of 30 simulated stamps (seed 5) deconvolved with the shipped model;
* a catalogue overview of a simulated 384x384 exposure set (seed 3) run through
  `psfdeconv.pipeline.deconvolve_catalog`.
"""

import argparse
from pathlib import Path

DOCS = Path(__file__).resolve().parent
OUT = DOCS / 'plots'
# Smaller than the package's 100 dpi: the pages show them at about this size anyway.
DPI = 80


def main(overwrite=False):
    from psfdeconv.deconvolve import deconvolve_stamps
    from psfdeconv.evaluate import read_report
    from psfdeconv.model import default_model_path, load_model
    from psfdeconv.pipeline import deconvolve_catalog
    from psfdeconv.plotting import (
        plot_catalog_overview,
        plot_confusion_matrix,
        plot_ellipticity_correlations,
        plot_flux_histogram,
        plot_stamp_grid,
        plot_training_history,
        save_figure,
    )
    from psfdeconv.simulate import simulate_exposure, simulate_stamps

    def save(fig, name):
        path = save_figure(fig, OUT / name, overwrite=overwrite, dpi=DPI)
        print(f'wrote {path.relative_to(DOCS.parent)} ({path.stat().st_size // 1024} KiB)')

    results = read_report(DOCS / 'report')
    save(plot_flux_histogram(results), 'flux_histogram.png')
    save(plot_ellipticity_correlations(results), 'ellipticity_correlations.png')
    save(plot_confusion_matrix(results), 'confusion_matrix.png')

    model = load_model()
    save(plot_training_history(model.card), 'training_history.png')

    sims = simulate_stamps(30, seed=5)
    deconvolved = deconvolve_stamps(sims['observed'], sims['psf'],
                                    pixel_scale=sims['pixel_scale'], model=model)
    save(plot_stamp_grid(sims['observed'], sims['psf'], deconvolved,
                         pixel_scale=sims['pixel_scale'], truth=sims['truth'],
                         snr=sims['snr'], band=0, feature_options=model.feature_options),
         'stamp_grid.png')

    exposures, _ = simulate_exposure((384, 384), n_galaxies=20, n_stars=30, seed=3)
    catalog, _ = deconvolve_catalog(exposures, model=model)
    save(plot_catalog_overview(catalog, image=exposures[catalog.meta['reference_band']]),
         'catalog_overview.png')
    print(f'model: {default_model_path().name}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--overwrite', action='store_true', help='replace existing PNGs')
    main(**vars(parser.parse_args()))
