# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Test configuration shared by the whole suite.

The environment is set here, at import, because pytest imports this file before it imports
any test module (and so before anything imports keras): Keras reads ``KERAS_BACKEND`` and
``KERAS_HOME`` once, on its first import, and writes ``$KERAS_HOME/keras.json`` then.
"""

import atexit
import os
import shutil
import tempfile

# A throw-away Keras home, so the suite never writes to ~/.keras (it may be read-only on CI).
# An explicit KERAS_HOME from the caller wins.
if 'KERAS_HOME' not in os.environ:
    _keras_home = tempfile.mkdtemp(prefix='psfdeconv-keras-home-')
    os.environ['KERAS_HOME'] = _keras_home
    atexit.register(shutil.rmtree, _keras_home, ignore_errors=True)
# No cache of OpenVINO's conversions (psfdeconv.inference.network_cache_dir), also where the
# command line runs in this process: the suite never writes to ~/.cache, and the tests of the
# cache give it their own directories.
os.environ.setdefault('PSFDECONV_CACHE_DIR', 'off')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
# Hides TensorFlow's C++ INFO and WARNING lines (not the absl ones printed at import).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Tests never open a window.
os.environ['MPLBACKEND'] = 'agg'

try:
    from pytest_astropy_header.display import PYTEST_HEADER_MODULES, TESTED_VERSIONS
except ImportError:  # the header plugin is optional
    PYTEST_HEADER_MODULES = {}
    TESTED_VERSIONS = {}


def pytest_configure(config):
    """Fill the astropy test header with the versions that matter for psfdeconv."""
    PYTEST_HEADER_MODULES.clear()
    PYTEST_HEADER_MODULES.update(
        {
            'Numpy': 'numpy',
            'Scipy': 'scipy',
            'Astropy': 'astropy',
            'photutils': 'photutils',
            'GalSim': 'galsim',
            'Keras': 'keras',
            'h5py': 'h5py',
            'scikit-image': 'skimage',
        }
    )

    try:
        from psfdeconv import __version__ as version
    except ImportError:
        try:
            from importlib.metadata import version as _dist_version

            version = _dist_version('psfdeconv')
        except Exception:
            version = 'unknown'
    TESTED_VERSIONS['psfdeconv'] = version


# --- Shared tiny data and model ---------------------------------------------------------------
# Session-scoped so that the simulation and the training (2 epochs of a (4, 8, 16)-filter
# network) run once for the whole suite. Nothing here is a real model: it only has to be a
# valid, loadable psfdeconv network with a card.

import types  # noqa: E402

import pytest  # noqa: E402

#: Seeds of the shared fixtures (fixed so that failures reproduce).
TINY_SIMULATION_SEED = 20231030
TINY_TRAIN_SEED = 7


def tiny_train_config(**overrides):
    """The tiny float32 training configuration used by the fixtures and the tests."""
    from psfdeconv.train import TrainConfig

    values = dict(epochs=2, batch_size=16, filters=(4, 8, 16), dtype_policy='float32',
                  validation_fraction=0.25, seed=TINY_TRAIN_SEED)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope='session')
def make_tiny_train_config():
    """The `tiny_train_config` factory, for tests that train their own tiny networks."""
    return tiny_train_config


@pytest.fixture(scope='session')
def tiny_simulation_path(tmp_path_factory):
    """160 default-config objects (64x64, 3 bands, 41x41 PSFs) in an HDF5 file."""
    from psfdeconv.simulate import write_simulation

    path = tmp_path_factory.mktemp('tiny_sims') / 'sims.h5'
    return write_simulation(path, 160, seed=TINY_SIMULATION_SEED, n_workers=1)


@pytest.fixture(scope='session')
def tiny_training(tiny_simulation_path, tmp_path_factory):
    """A 2-epoch training of a (4, 8, 16)-filter network on the tiny simulation, saved with a
    card as ``tiny.keras`` + ``tiny.json``.

    Returns a namespace with ``path`` (the .keras file), ``card`` (as written), ``keras_model``
    (the in-memory network that was saved), ``run_dir`` (checkpoints and state.json) and
    ``config`` (the `~psfdeconv.train.TrainConfig`).
    """
    from psfdeconv.model import save_model
    from psfdeconv.train import train_model

    base = tmp_path_factory.mktemp('tiny_model')
    config = tiny_train_config()
    keras_model, card = train_model(tiny_simulation_path, base / 'run', config=config,
                                    verbose=0)
    card['name'] = 'tiny'
    card['flux_bias'] = None
    path = base / 'tiny.keras'
    card = save_model(keras_model, path, card)
    return types.SimpleNamespace(path=path, card=card, keras_model=keras_model,
                                 run_dir=base / 'run', config=config)


@pytest.fixture(scope='session')
def tiny_model_path(tiny_training):
    """Path of the tiny model's .keras file (its card is beside it)."""
    return tiny_training.path


@pytest.fixture(scope='session')
def tiny_model(tiny_model_path):
    """The tiny model loaded with `psfdeconv.model.load_model`."""
    from psfdeconv.model import load_model

    return load_model(tiny_model_path)


# --- Shared runs of the bundled example and simulated fields ---------------------------------
# Each of these takes seconds; they run once per session and the tests read them. A test
# that changes an output works on a copy (``example_run.copy_to(tmp_path)``).


@pytest.fixture(scope='session')
def example_run(tmp_path_factory):
    """``psfdeconv run --example --plots --out DIR`` (README command 1 with --plots), run
    once in-process.

    Returns a namespace with ``argv``, ``code`` (the exit status), ``out`` (DIR), ``stdout``
    and ``stderr`` (what the run printed), and ``copy_to(directory)``, which copies DIR into
    ``directory / 'example'`` for a test that writes there.
    """
    import contextlib
    import io
    import shutil

    from psfdeconv.cli import main

    out = tmp_path_factory.mktemp('example_run') / 'example'
    argv = ['run', '--example', '--plots', '--out', str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)

    def copy_to(directory):
        return shutil.copytree(out, directory / 'example')

    return types.SimpleNamespace(argv=argv, code=code, out=out, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue(), copy_to=copy_to)


#: `simulate_exposure` arguments of the shared `simulated_field`.
SIMULATED_FIELD = dict(shape=(256, 256), n_galaxies=8, n_stars=25, seed=4)


@pytest.fixture(scope='session')
def simulated_field():
    """``simulate_exposure(**SIMULATED_FIELD)``: 8 galaxies and 25 stars on 256x256 pixels in
    g, r, i, the r and i pixel grids offset from g's by sub-pixel amounts; ``(exposures,
    truth)``.

    Shared by the tests of the simulation and of the pipeline. The
    pixel arrays are read-only, so a test that changed them in place would fail rather
    than change the field under the others.
    """
    from psfdeconv.simulate import simulate_exposure

    exposures, truth = simulate_exposure(**SIMULATED_FIELD)
    for exposure in exposures.values():
        exposure.data.flags.writeable = False
        if exposure.uncertainty is not None:
            exposure.uncertainty.array.flags.writeable = False
    return exposures, truth


@pytest.fixture
def background_meshes(monkeypatch):
    """A list that grows by the image shape of each photutils ``Background2D`` mesh
    computed in this process during the test."""
    import photutils.background

    meshes = []
    original = photutils.background.Background2D

    def counting(data, *args, **kwargs):
        meshes.append(data.shape)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(photutils.background, 'Background2D', counting)
    return meshes


@pytest.fixture(scope='session')
def simulated_field_reused(simulated_field):
    """A context manager in which `psfdeconv.simulate.simulate_exposure`, called with
    `SIMULATED_FIELD`'s arguments (its defaults filled in), returns the session's
    `simulated_field` instead of simulating it again; any other call simulates.

    For ``psfdeconv simulate-exposure`` with those options: the command still parses them,
    calls the function (imported when it runs) and writes the files; only the seeded, and so
    identical, simulation is not repeated.
    """
    import contextlib
    import inspect

    import psfdeconv.simulate as simulate

    original = simulate.simulate_exposure
    signature = inspect.signature(original)

    def arguments(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return {name: tuple(value) if isinstance(value, list) else value
                for name, value in bound.arguments.items()}

    field_arguments = arguments(**SIMULATED_FIELD)
    calls = []

    def simulate_exposure(*args, **kwargs):
        reused = arguments(*args, **kwargs) == field_arguments
        calls.append(reused)
        return simulated_field if reused else original(*args, **kwargs)

    @contextlib.contextmanager
    def reusing():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(simulate, 'simulate_exposure', simulate_exposure)
            yield calls

    return reusing
