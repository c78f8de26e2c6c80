# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
pytest configuration for the doctests in the documentation pages (``--doctest-rst``).

Sets the same environment as ``tests/conftest.py`` so that ``pytest docs`` works on its own.
"""

import atexit
import os
import shutil
import tempfile

if 'KERAS_HOME' not in os.environ:
    _keras_home = tempfile.mkdtemp(prefix='psfdeconv-keras-home-')
    os.environ['KERAS_HOME'] = _keras_home
    atexit.register(shutil.rmtree, _keras_home, ignore_errors=True)
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['MPLBACKEND'] = 'agg'

# conf.py needs sphinx-astropy, which the `test` extra does not install.  (doctestplus skips
# conf.py, _build/ and api/ by itself; this keeps plain pytest away from them too.)
collect_ignore = ['conf.py', '_build', 'api']
