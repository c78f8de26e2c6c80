# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exceptions and warnings raised by psfdeconv.

Every error is a subclass of `PSFDeconvError`, and also of the builtin
exception it refines (``ValueError``, ``FileExistsError``, ...), so that
``except ValueError`` keeps working for callers who do not know psfdeconv.
Messages name the value at fault and say how to fix it.

Each error class carries ``exit_code``, the status the command-line
interface exits with when it is raised (1 a missing dependency, 2 usage,
3 bad input data, 4 model file, 5 output exists, 6 partial batch failure).
"""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    'PSFDeconvError',
    'InvalidInputError',
    'InvalidPixelsError',
    'InvalidPSFError',
    'ShapeMismatchError',
    'BandCountError',
    'PixelScaleError',
    'UnitsError',
    'OutputLockedError',
    'OutputWriteError',
    'StaleLockWarning',
    'ConfigError',
    'ModelFileError',
    'OutputExistsError',
    'BatchFailureError',
    'MissingDependencyError',
    'PSFDeconvWarning',
    'OutsideTrainingRangeWarning',
]


class PSFDeconvError(Exception):
    """Base class of every psfdeconv error."""

    exit_code = 1


class InvalidInputError(PSFDeconvError, ValueError):
    """Input data that cannot be processed (exit code 3)."""

    exit_code = 3


class InvalidPixelsError(InvalidInputError):
    """Non-finite (NaN/inf) or fully masked pixels in an image or stamp."""


class InvalidPSFError(InvalidInputError):
    """A PSF whose sum is not positive and finite, whose size is even or
    larger than the stamp, or whose peak is off centre."""


class ShapeMismatchError(InvalidInputError):
    """Arrays whose shapes do not agree (e.g. stamps vs PSFs)."""


class BandCountError(InvalidInputError):
    """A number of bands the model was not trained for."""


class PixelScaleError(InvalidInputError):
    """A pixel scale that is not positive and finite, or outside the
    trained range when strict checking is asked for."""


class UnitsError(InvalidInputError):
    """A data unit psfdeconv cannot turn into flux per pixel (magnitudes,
    Jy/beam), or bands whose units cannot be converted to one another."""


class ConfigError(PSFDeconvError, ValueError):
    """An invalid configuration value (exit code 2, a usage error)."""

    exit_code = 2


class ModelFileError(PSFDeconvError, OSError):
    """A model file that is missing, truncated, corrupt, unsafe, of the
    wrong architecture, or whose checksum does not match (exit code 4)."""

    exit_code = 4


class OutputExistsError(PSFDeconvError, FileExistsError):
    """An output file exists and overwriting was not asked for (exit
    code 5)."""

    exit_code = 5


class OutputLockedError(OutputExistsError):
    """Another process is writing into the output directory (its lock file
    ``OUT/.psfdeconv.lock`` names it)."""


class OutputWriteError(PSFDeconvError, OSError):
    """The outputs cannot be written (full disk, read-only file system, not
    a directory, no permission); the earlier outputs are left whole."""

    exit_code = 5


class BatchFailureError(PSFDeconvError, RuntimeError):
    """Some groups of a batch failed; the others were written (exit
    code 6)."""

    exit_code = 6


class MissingDependencyError(PSFDeconvError, ImportError):
    """An optional dependency a task needs is not installed, e.g. Keras and
    its backend without the ``cpu``/``gpu`` extra (exit code 1)."""

    exit_code = 1


class PSFDeconvWarning(AstropyUserWarning):
    """Base class of psfdeconv warnings."""


class OutsideTrainingRangeWarning(PSFDeconvWarning):
    """An input (pixel scale, PSF size, ...) lies outside the range the
    model was trained on; results there are extrapolations."""


class StaleLockWarning(PSFDeconvWarning):
    """An output directory's lock was left by a process that no longer runs;
    it is taken over."""
