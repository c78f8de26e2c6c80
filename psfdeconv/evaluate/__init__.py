# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Metrics, classical baselines and the paper's evaluation tables.

The names below are importable from ``psfdeconv.evaluate``; they live in
`psfdeconv.evaluate.metrics`, `psfdeconv.evaluate.baselines`,
`psfdeconv.evaluate.report`, `psfdeconv.evaluate.floor` and
`psfdeconv.evaluate.exposures`.


* Image quality: `image_quality` (PSNR and SSIM of Table 1, paper-spec
  5.4).
* Moments: `moment_differences` and `summarize_differences` (Table 2,
  paper-spec 5.1-5.2).
* Shear response: `ellipticity_correlation` (C_PSF and C_true of Fig. 7,
  paper-spec 5.3).
* Detection: `flux_bin_edges`, `flux_classes`, `confusion_matrix` and
  `classification_summary` (Table 3, paper-spec 5.5).
* Baselines: `wiener_deconvolve` and `richardson_lucy_deconvolve`.
* Everything at once: `evaluate_predictions` and `write_report`.
* What the noise allows: `shape_information_floor` (Cramer-Rao and
  posterior-mean floors of the ellipticity and size errors).
* Exposure catalogues against simulated truth: `match_truth` and
  `exposure_accuracy`.
* Real frames against photutils' own Kron photometry (the real-frame
  acceptance check): `kron_reference` and `compare_with_kron`.

Images are arrays of shape ``(n, n_bands, ny, nx)`` (channel first); PSFs
are odd-sized, centred arrays of shape ``(n, n_bands, py, px)``.
"""

from .baselines import *  # noqa: F403
from .baselines import __all__ as _baselines_all
from .exposures import *  # noqa: F403
from .exposures import __all__ as _exposures_all
from .floor import *  # noqa: F403
from .floor import __all__ as _floor_all
from .metrics import *  # noqa: F403
from .metrics import __all__ as _metrics_all
from .report import *  # noqa: F403
from .report import __all__ as _report_all

__all__ = [*_metrics_all, *_baselines_all, *_report_all, *_floor_all, *_exposures_all]
