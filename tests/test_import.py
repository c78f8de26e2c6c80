# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the package namespace: light import, lazy public names, honest ``__all__``."""

import importlib
import json
import subprocess
import sys

import pytest

import psfdeconv

HEAVY = ('tensorflow', 'keras', 'galsim', 'photutils', 'reproject')

MODULES = ('_fourier', '_validation', 'background', 'batch', 'calibrate', 'cli', 'cutouts',
           'deconvolve', 'detection', 'evaluate', 'evaluate.baselines', 'evaluate.exposures',
           'evaluate.floor', 'evaluate.metrics', 'evaluate.report', 'exceptions', 'features',
           'flags', 'io', 'io.catalog', 'io.exposures', 'io.files', 'pipeline', 'measure', 'model',
           'plotting', 'psf', 'simulate', 'train', 'transforms')


def run_python(code):
    """Run ``code`` in a fresh interpreter and return its stdout parsed as JSON."""
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_is_light():
    # A fresh process: in this one the other tests have imported everything already.
    loaded = run_python(
        'import json, sys, psfdeconv\n'
        f'print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules],\n'
        '                  "version": psfdeconv.__version__}))')
    assert loaded['heavy'] == []
    assert isinstance(loaded['version'], str) and loaded['version']


def test_lazy_attribute_loads_only_its_module():
    # make_cube lives in features (numpy + scipy): still no TensorFlow, Keras or GalSim.
    loaded = run_python(
        'import json, sys, psfdeconv\n'
        'lazy = psfdeconv.make_cube\n'
        'from psfdeconv.features import make_cube\n'
        'ok = lazy is make_cube\n'
        f'print(json.dumps({{"ok": ok, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))')
    assert loaded == {'ok': True, 'heavy': []}


def test_cli_import_is_light():
    loaded = run_python(
        'import json, sys, psfdeconv.cli\n'
        f'print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))')
    assert loaded == []


def test_version_is_a_string():
    assert isinstance(psfdeconv.__version__, str)
    assert psfdeconv.__version__


def test_lazy_attributes():
    from psfdeconv.features import make_cube

    assert psfdeconv.make_cube is make_cube
    for name in psfdeconv.__all__:
        assert getattr(psfdeconv, name) is not None, name
    assert set(psfdeconv.__all__) <= set(dir(psfdeconv))


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        psfdeconv.no_such_name  # noqa: B018
    assert not hasattr(psfdeconv, 'make_channels')  # not public at the top level


@pytest.mark.parametrize('name', MODULES)
def test_module_all_is_honest(name):
    module = importlib.import_module(f'psfdeconv.{name}')
    names = module.__all__
    assert len(names) == len(set(names))
    for public in names:
        assert hasattr(module, public), f'psfdeconv.{name}.__all__ names missing {public!r}'
