# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Sphinx configuration for psfdeconv.

Build with ``tox -e build_docs`` or ``sphinx-build -W -b html docs docs/_build/html``.

The intersphinx inventories (links to the numpy, astropy, photutils, ... docs) are downloaded
at build time, and ``-W`` would turn a failed download into an error.  When
docs.python.org cannot be reached, intersphinx is therefore switched off (a line says so);
``-D disable_intersphinx=1`` switches it off in any case.
"""

import datetime
import socket
import sys
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from sphinx_astropy.conf.v3 import *  # noqa: F403
except ImportError:
    print('ERROR: the documentation requires sphinx-astropy: pip install ".[docs]"')
    sys.exit(1)

# -- Project information ------------------------------------------------------------------
with (Path(__file__).parents[1] / 'pyproject.toml').open('rb') as _file:
    _project_table = tomllib.load(_file)['project']

project = _project_table['name']
author = _project_table['authors'][0]['name']
copyright = f'{datetime.datetime.now(datetime.UTC).year}, {author}'

try:
    release = metadata.version(project)
except metadata.PackageNotFoundError:
    release = 'unknown (psfdeconv is not installed)'
# The short X.Y version.
version = '.'.join(release.split('.')[:2])

# -- General configuration ----------------------------------------------------------------
# sphinx-astropy sets extensions (numpydoc, automodapi, intersphinx, doctestplus, mathjax,
# matplotlib's plot directive, ...); add to them here rather than replacing them.
exclude_patterns.extend(['_templates'])  # noqa: F405

rst_epilog += """
.. _arXiv:2310.19605: https://arxiv.org/abs/2310.19605
"""  # noqa: F405

intersphinx_mapping.update(  # noqa: F405
    {
        'astropy': ('https://docs.astropy.org/en/stable/', None),
        'photutils': ('https://photutils.readthedocs.io/en/stable/', None),
        'galsim': ('https://galsim-developers.github.io/GalSim/_build/html/', None),
        'skimage': ('https://scikit-image.org/docs/stable/', None),
        'dask': ('https://docs.dask.org/en/stable/', None),
    }
)


def _network_reachable(host='docs.python.org', port=443, timeout=3):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


if not _network_reachable():
    print('docs/conf.py: no network, building without intersphinx links')
    disable_intersphinx = 1

# -- Options for HTML output --------------------------------------------------------------
html_title = f'{project} v{release}'
htmlhelp_basename = project + 'doc'

# -- Options for LaTeX / man pages --------------------------------------------------------
latex_documents = [('index', project + '.tex', project + ' Documentation', author, 'manual')]
man_pages = [('index', project.lower(), project + ' Documentation', [author], 1)]
