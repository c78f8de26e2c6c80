# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
psfdeconv: deconvolve the point spread function from multi-band galaxy
images with a convolutional autoencoder (Sreejith, Slosar & Wang 2023,
arXiv:2310.19605).

The public names are imported lazily, so that ``import psfdeconv`` loads
neither TensorFlow/Keras nor GalSim, photutils or reproject.
"""

import importlib

try:
    from ._version import version as __version__
except ImportError:  # not installed, e.g. a source checkout without build
    __version__ = '0.0.0'

# public name -> module that defines it
_LAZY = {
    'load_model': 'model',
    'DeconvolutionModel': 'model',
    'deconvolve_stamps': 'deconvolve',
    'refit_amplitude': 'deconvolve',
    'correct_flux_bias': 'deconvolve',
    'make_cube': 'features',
    'simulate_stamps': 'simulate',
    'write_simulation': 'simulate',
    'read_simulation': 'simulate',
    'SimulationConfig': 'simulate',
    'train_model': 'train',
    'TrainConfig': 'train',
    'calibrate_model': 'calibrate',
    'image_moments': 'measure',
    'measure_table': 'measure',
    'deconvolve_catalog': 'pipeline',
    'simulate_exposure': 'simulate',
    'read_exposure': 'io',
}

__all__ = ['__version__', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f'.{_LAZY[name]}', __name__)
        return getattr(module, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(__all__))
