# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The flag bits of psfdeconv's catalogues and stamps, in one registry.

Every bit of the ``flags`` column of `~psfdeconv.pipeline.deconvolve_catalog`
(and of the ``flags`` array of `~psfdeconv.cutouts.make_cutouts`, which sets
the first three) is defined here with its name, its meaning and whether it
makes a measurement unusable. The catalogue records the name -> bit mapping
in its meta (``flag_bits``), so a catalogue read back can be interpreted
without this module.

Examples
--------
>>> from psfdeconv.flags import FLAGS, flag_names
>>> FLAGS['OFF_IMAGE']
4
>>> flag_names(4 | 1)
['EDGE', 'OFF_IMAGE']
"""

import numpy as np

__all__ = [
    'FLAG_EDGE',
    'FLAG_MASKED',
    'FLAG_OFF_IMAGE',
    'FLAG_HSM_FAILED',
    'FLAG_PSF_EXTRAPOLATED',
    'FLAG_CENTROID_FALLBACK',
    'FLAG_OUTSIDE_TRAINING',
    'FLAG_NEIGHBOURS',
    'FLAG_UNDETECTED',
    'FLAG_BLENDED',
    'FLAG_TRUNCATED',
    'FLAG_PSF_FALLBACK',
    'FLAG_BLOCK_REDUCED',
    'FLAGS',
    'FLAG_DESCRIPTIONS',
    'UNUSABLE_FLAGS',
    'INFORMATIONAL_FLAGS',
    'flag_names',
    'flags_column_description',
    'unusable_bits',
    'n_flagged',
    'usable_rows',
]

#: The stamp reaches beyond the image; the pixels outside are 0 and masked.
FLAG_EDGE = 1
#: The stamp has masked pixels inside the image (the exposure's mask, NaN/inf
#: data, or a non-positive or non-finite uncertainty).
FLAG_MASKED = 2
#: The source's centre is off the image (outside ``-0.5 <= x < nx - 0.5``,
#: ``-0.5 <= y < ny - 0.5``); its stamp is all 0 and masked. `FLAG_EDGE` is
#: set too.
FLAG_OFF_IMAGE = 4
#: The adaptive-moment (HSM) measurement failed on the deconvolved image of
#: at least one band.
FLAG_HSM_FAILED = 8
#: The PSF at the source was extrapolated: the source lies outside the grid
#: of PSFs of a `~photutils.psf.GriddedPSFModel` in at least one band (the
#: nearest grid PSFs are used there).
FLAG_PSF_EXTRAPOLATED = 16
#: The deconvolved image of the reference band has no positive flux, so it
#: has no centroid: ``x``, ``y`` and ``sky_centroid`` are the input position.
FLAG_CENTROID_FALLBACK = 32
#: The source's pixel scale or PSF lies outside the range the model was
#: trained on (`psfdeconv.deconvolve.outside_training_range`): its
#: measurements are extrapolations.
FLAG_OUTSIDE_TRAINING = 64
#: Pixels of other sources (their deblended segments, dilated) lay in the
#: stamp and were replaced before deconvolution, by the pixels point-symmetric
#: about the source or by noise (`psfdeconv.detection.replace_neighbours`);
#: informational, the measurement is usable.
FLAG_NEIGHBOURS = 128
#: The stamp holds no significant source: its detection SNR lies below the
#: model card's detection threshold, so the deconvolved images are 0
#: (`psfdeconv.deconvolve.deconvolve_stamps`); the fluxes are still reported.
FLAG_UNDETECTED = 256
#: The source's light cannot be separated from another source's: a brighter
#: source's light under its segment is more than
#: `psfdeconv.detection.BLEND_LIMIT` of its own
#: (`psfdeconv.detection.blend_fractions`), or another source lies in the
#: same segment nearer its centre (`psfdeconv.detection.blended_sources`),
#: so its flux and shape would include the other's light.
FLAG_BLENDED = 512
#: The source's segment reaches beyond the stamp even on the exposure
#: block-summed by the largest factor the pipeline uses (8): its flux and
#: size are underestimated.
FLAG_TRUNCATED = 1024
#: The band's PSF is an elliptical Moffat fitted to the few stars there were
#: instead of an ePSF (`psfdeconv.psf.build_psfs`); informational.
FLAG_PSF_FALLBACK = 2048
#: The source is larger than a stamp on the exposure's pixel grid: it was
#: cut from a block-summed copy of the exposure (coarser pixels, PSF
#: block-summed the same way, `psfdeconv.cutouts.block_reduce_exposure`);
#: informational.
FLAG_BLOCK_REDUCED = 4096

#: Every flag bit with its name, as recorded in the catalogue's meta.
FLAGS = {
    'EDGE': FLAG_EDGE,
    'MASKED': FLAG_MASKED,
    'OFF_IMAGE': FLAG_OFF_IMAGE,
    'HSM_FAILED': FLAG_HSM_FAILED,
    'PSF_EXTRAPOLATED': FLAG_PSF_EXTRAPOLATED,
    'CENTROID_FALLBACK': FLAG_CENTROID_FALLBACK,
    'OUTSIDE_TRAINING': FLAG_OUTSIDE_TRAINING,
    'NEIGHBOURS': FLAG_NEIGHBOURS,
    'UNDETECTED': FLAG_UNDETECTED,
    'BLENDED': FLAG_BLENDED,
    'TRUNCATED': FLAG_TRUNCATED,
    'PSF_FALLBACK': FLAG_PSF_FALLBACK,
    'BLOCK_REDUCED': FLAG_BLOCK_REDUCED,
}

#: One line per flag name, for tables and help texts.
FLAG_DESCRIPTIONS = {
    'EDGE': 'the stamp reaches beyond the image (padded with 0 and masked)',
    'MASKED': 'masked pixels (mask, NaN/inf data, bad uncertainty) in the stamp',
    'OFF_IMAGE': "the source's centre is off the image; the stamp is empty",
    'HSM_FAILED': 'the adaptive moments failed in at least one band',
    'PSF_EXTRAPOLATED': 'the PSF was extrapolated beyond its grid in at least one band',
    'CENTROID_FALLBACK': 'no centroid of the deconvolved image; the input position is used',
    'OUTSIDE_TRAINING': "pixel scale or PSF outside the model's training range",
    'NEIGHBOURS': 'pixels of other sources were replaced (informational)',
    'UNDETECTED': "detection SNR below the model card's threshold; images are 0",
    'BLENDED': "another source's light under the source's segment cannot be separated",
    'TRUNCATED': 'the segment reaches beyond the stamp even block-summed by 8',
    'PSF_FALLBACK': 'the PSF is a Moffat fitted to too few stars for an ePSF '
                    '(informational)',
    'BLOCK_REDUCED': 'cut from a block-summed copy of the exposure, the source being '
                     'larger than a stamp (informational)',
}

#: Flags that make a row's flux and shape unusable: its stamp lacks part of
#: the source (EDGE, MASKED, OFF_IMAGE, TRUNCATED), holds another source's
#: light (BLENDED), or holds no source (UNDETECTED, CENTROID_FALLBACK).
#: ``HSM_FAILED`` (the adaptive-moment columns are NaN; the flux and the
#: unweighted moments stand), ``OUTSIDE_TRAINING`` and ``PSF_EXTRAPOLATED``
#: only qualify a row.
UNUSABLE_FLAGS = ('EDGE', 'MASKED', 'OFF_IMAGE', 'CENTROID_FALLBACK', 'UNDETECTED',
                  'BLENDED', 'TRUNCATED')

#: Flags that say something about a measurement without making it worse
#: (a stamp whose neighbours were replaced is the better measurement).
INFORMATIONAL_FLAGS = ('NEIGHBOURS', 'PSF_FALLBACK', 'BLOCK_REDUCED')


def flag_names(value, flag_bits=None):
    """The names of the flags set in ``value``.

    Parameters
    ----------
    value : int
        A ``flags`` bitmask.
    flag_bits : dict, optional
        Name -> bit (a catalogue's ``flag_bits`` meta); default `FLAGS`.

    Returns
    -------
    list of str
        In the order of the registry.
    """
    flag_bits = FLAGS if flag_bits is None else flag_bits
    return [name for name, bit in flag_bits.items() if int(value) & bit]


def flags_column_description():
    """The description of a catalogue's ``flags`` column: every bit and name."""
    return 'Bitmask: ' + ', '.join(f'{bit} {name}' for name, bit in FLAGS.items())


def unusable_bits(flag_bits=None):
    """The bitmask of `UNUSABLE_FLAGS` under ``flag_bits`` (default `FLAGS`);
    names the mapping lacks count as 0."""
    flag_bits = FLAGS if flag_bits is None else flag_bits
    return sum(flag_bits.get(name, 0) for name in UNUSABLE_FLAGS)


def n_flagged(flags):
    """Number of rows with a flag set other than the `INFORMATIONAL_FLAGS`,
    as the run and batch summaries count them.

    Parameters
    ----------
    flags : array-like of int
        A catalogue's ``flags`` column.

    Examples
    --------
    >>> n_flagged([0, FLAG_NEIGHBOURS, FLAG_EDGE, FLAG_EDGE | FLAG_NEIGHBOURS])
    2
    """
    informational = sum(FLAGS[name] for name in INFORMATIONAL_FLAGS)
    return int(((np.asarray(flags) & ~informational) != 0).sum())


def usable_rows(flags, flag_bits=None):
    """The catalogue's ``usable`` column: True where no flag of
    `UNUSABLE_FLAGS` is set.

    Parameters
    ----------
    flags : array-like of int
        A catalogue's ``flags`` column.
    flag_bits : dict, optional
        Name -> bit (a catalogue's ``flag_bits`` meta); default `FLAGS`.

    Examples
    --------
    >>> usable_rows([0, FLAG_NEIGHBOURS, FLAG_BLENDED, FLAG_PSF_FALLBACK | FLAG_EDGE])
    array([ True,  True, False, False])
    """
    return (np.asarray(flags, dtype=np.int64) & unusable_bits(flag_bits)) == 0
