# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
File input and output: atomic writes (`psfdeconv.io.files`), exposures
(`psfdeconv.io.exposures`) and the catalogue and stamp files of
``psfdeconv run`` (`psfdeconv.io.catalog`).
"""

from .catalog import *  # noqa: F403
from .catalog import __all__ as _catalog_all
from .exposures import *  # noqa: F403
from .exposures import __all__ as _exposures_all
from .files import *  # noqa: F403
from .files import __all__ as _files_all

__all__ = [*_files_all, *_exposures_all, *_catalog_all]
