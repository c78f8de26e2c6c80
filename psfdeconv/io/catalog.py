# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The files of ``psfdeconv run``: the source table it reads, the catalogue
and the deconvolved stamps it writes.

`write_catalog` and `read_catalog` keep a catalogue's units, its
``sky_centroid`` column and its nested ``meta``; `write_stamps` and
`read_stamps` keep each stamp's WCS, mask and meta. Both write atomically
(`psfdeconv.io.atomic_path`).
"""

import contextlib
from pathlib import Path

import numpy as np

from .._validation import exception_text
from ..exceptions import InvalidInputError
from .files import atomic_path, check_writable, read_table_with_meta, write_table_with_meta

__all__ = ['read_positions', 'check_source_ids', 'write_catalog', 'read_catalog', 'write_stamps',
           'stamp_writer', 'read_stamps']


def read_positions(path):
    """Read a source table (ECSV, FITS or CSV) for `~psfdeconv.pipeline.deconvolve_catalog`.

    Raises `~psfdeconv.exceptions.InvalidInputError` naming the file if it is
    missing or not a table; its columns are checked by `~psfdeconv.pipeline.deconvolve_catalog`.
    """
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'source catalog {path} does not exist; give a '
                                f'table file (.ecsv, .fits, .csv) with ra/dec or '
                                f'x/y columns, or detect the sources.')
    try:
        table = Table.read(path)
    except Exception as exc:  # astropy raises many types for unreadable files
        raise InvalidInputError(f'source catalog {path} cannot be read as a table '
                                f'({exception_text(exc)}); give an ECSV, '
                                f'FITS or CSV table.') from None
    if len(table) == 0:
        raise InvalidInputError(f'source catalog {path} has no rows; give at least '
                                f'one source, or no catalogue to detect them.')
    return table


def _printable_ascii(text):
    """``text`` with every character FITS headers cannot hold replaced by '_'."""
    return ''.join(c if c.isascii() and c.isprintable() else '_' for c in text)


def check_source_ids(ids, *, name='id'):
    """Source ids checked for the files of ``psfdeconv run``.

    The ids go to the catalogue's ``id`` column and to the ``ID`` keyword of
    each stamp's FITS header, which holds printable ASCII only, and they key
    the catalogue's rows and the stamps, so they must be unique.

    Parameters
    ----------
    ids : array-like
        One id per source: integers, floats or strings.
    name : str, optional
        The column's name, for the messages.

    Returns
    -------
    `~numpy.ndarray`
        The ids, strings as `str` (a FITS table's string column reads as
        bytes).

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        For a masked (missing) id, a NaN or infinite number, a string with
        characters other than printable ASCII (accents, newlines), or an id
        that repeats an earlier one, naming the row.

    Examples
    --------
    >>> from psfdeconv.io import check_source_ids
    >>> check_source_ids(['a', 'b']).tolist()
    ['a', 'b']
    >>> check_source_ids(['a', 'a'])
    Traceback (most recent call last):
    ...
    psfdeconv.exceptions.InvalidInputError: id[1] = 'a'; it repeats id[0]...
    """
    mask = np.ma.getmaskarray(ids)
    if mask.any():
        row = int(np.argmax(mask))
        raise InvalidInputError(f'{name}[{row}] is missing (masked); every source '
                                f'needs an id: fill it in, or drop the {name} '
                                f'column to number the sources 0, 1, ...')
    values = np.asarray(np.ma.getdata(ids))
    if values.dtype.kind == 'f':
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            raise InvalidInputError(f'{name}[{row}] = {values[row]}; a source id must '
                                    f'be a finite number or a string: fill it in, '
                                    f'or drop the {name} column to number the '
                                    f'sources 0, 1, ...')
    elif values.dtype.kind in 'USO':
        texts = [value.decode('latin-1') if isinstance(value, bytes) else str(value)
                 for value in values]
        for row, text in enumerate(texts):
            if not (text.isascii() and text.isprintable()):
                raise InvalidInputError(
                    f'{name}[{row}] = {text!r}; source ids are written to FITS '
                    f'headers (the ID keyword of stamps.fits), which hold printable '
                    f'ASCII only (no accents, newlines or tabs): rename it (e.g. '
                    f'{_printable_ascii(text)!r}'
                    f') or drop the {name} column to number the sources 0, 1, ...')
        # A FITS table's string column reads as bytes, which a header refuses.
        values = np.array(texts, dtype=str)
    seen = {}
    for row, value in enumerate(values.tolist()):
        if value in seen:
            raise InvalidInputError(f'{name}[{row}] = {value!r}; it repeats '
                                    f'{name}[{seen[value]}], and the ids key the '
                                    f'catalogue rows and the stamps: make them '
                                    f'unique, or drop the {name} column to number '
                                    f'the sources 0, 1, ...')
        seen[value] = row
    return values


def write_catalog(table, path, *, overwrite=False):
    """Write a `~psfdeconv.pipeline.deconvolve_catalog` table to FITS, atomically.

    Units, descriptions and the ``sky_centroid`` column (stored as
    ``sky_centroid.ra`` and ``sky_centroid.dec`` with astropy's mixin
    serialisation) come back with `~astropy.table.QTable.read`. The
    catalogue's nested ``meta`` is stored as JSON in the header keyword
    ``PSFDMETA`` (restored by `read_catalog`), with the bands, reference
    band, model hash and version also as plain keywords.

    Parameters
    ----------
    table : `~astropy.table.QTable`
        The catalogue.
    path : str or `~pathlib.Path`
        Output FITS file.
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import astropy.units as u
    >>> from astropy.coordinates import SkyCoord
    >>> from astropy.table import QTable
    >>> from psfdeconv.io import read_catalog, write_catalog
    >>> table = QTable({'id': [1], 'flux_r': [2.5] * u.adu,
    ...                 'sky_centroid': SkyCoord([150.0], [2.0], unit='deg')},
    ...                meta={'bands': ['r'], 'model': {'weights_sha256': 'abc'}})
    >>> path = write_catalog(table, pathlib.Path(tempfile.mkdtemp()) / 'cat.fits')
    >>> again = read_catalog(path)
    >>> print(again['flux_r'].unit, type(again['sky_centroid']).__name__,
    ...       again.meta['model'])
    adu SkyCoord {'weights_sha256': 'abc'}
    """
    keywords = {}
    meta = table.meta
    bands = meta.get('bands')
    if bands:
        keywords['BANDS'] = ','.join(str(band) for band in bands)
    if meta.get('reference_band'):
        keywords['REFBAND'] = str(meta['reference_band'])
    model = meta.get('model') or {}
    if model.get('weights_sha256'):
        keywords['MODELSHA'] = str(model['weights_sha256'])
    if meta.get('psfdeconv_version'):
        keywords['PSFDVER'] = str(meta['psfdeconv_version'])
    return write_table_with_meta(table, path, keywords=keywords, overwrite=overwrite)


def read_catalog(path):
    """Read a catalogue written by `write_catalog` (units, SkyCoord column
    and the full ``meta``).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.

    Returns
    -------
    `~astropy.table.QTable`
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'catalogue {path} does not exist; give the path '
                                f'of a file written by write_catalog (psfdeconv '
                                f'run).')
    return read_table_with_meta(path)


def write_stamps(images, path, *, overwrite=False):
    """Write deconvolved stamps to one FITS file, atomically.

    The file holds an empty primary HDU (with ``NSTAMPS`` and ``BANDS``),
    one image HDU per source (``EXTNAME = 'STAMP'``, ``EXTVER`` = 1, 2, ...;
    data (n_bands, size, size) float32 with the stamp's celestial WCS, whose
    two axes are the image axes, and ``ID``, ``FLAGS``, ``BUNIT``, ``BANDS``,
    ``ORIGINX``, ``ORIGINY``, ``BLOCKFAC``: the block-sum factor of the grid
    the stamp was cut from, 1 for the exposure's own), an image HDU ``MASKS``
    with every stamp's mask
    (n, n_bands, size, size) uint8, and a binary table ``INDEX`` (``id``,
    ``extver``, ``flags``, ``origin_x``, ``origin_y``).

    Parameters
    ----------
    images : list of `~astropy.nddata.NDData`
        The stamps of `~psfdeconv.pipeline.deconvolve_catalog`.
    path : str or `~pathlib.Path`
        Output FITS file.
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    `~pathlib.Path`
        The written file.

    Raises
    ------
    psfdeconv.exceptions.OutputExistsError
        If ``path`` exists and ``overwrite`` is False.
    psfdeconv.exceptions.InvalidInputError
        If there are no stamps or they differ in shape.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astropy.nddata import NDData
    >>> from psfdeconv.io import read_stamps, write_stamps
    >>> stamps = [NDData(np.ones((3, 8, 8)), unit='adu',
    ...                  meta={'id': 7, 'bands': ['g', 'r', 'i']})]
    >>> path = write_stamps(stamps, pathlib.Path(tempfile.mkdtemp()) / 's.fits')
    >>> again = read_stamps(path)
    >>> print(len(again), again[0].data.shape, again[0].unit, again[0].meta['id'])
    1 (3, 8, 8) adu 7
    """
    path = check_writable(path, overwrite=overwrite)
    images = list(images)
    if not images:
        raise InvalidInputError('no stamps to write; give the list returned by '
                                'deconvolve_catalog.')
    shapes = {np.shape(image.data) for image in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InvalidInputError(f'stamps must all have one shape (n_bands, size, '
                                f'size), got {sorted(shapes)}.')
    with stamp_writer(path, len(images), overwrite=overwrite) as writer:
        writer.write(images)
    return path


@contextlib.contextmanager
def stamp_writer(path, n_stamps, *, overwrite=False):
    """Context manager yielding a writer of the file of `write_stamps`,
    chunk by chunk, atomically (`psfdeconv.io.atomic_path`): memory does not
    grow with the number of stamps.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Output FITS file.
    n_stamps : int
        Number of stamps that will be written.
    overwrite : bool, optional
        Replace an existing file.

    Yields
    ------
    writer
        Its ``write(stamps)`` takes a list of `~astropy.nddata.NDData` (as
        `write_stamps`), called once per chunk.
    """
    import tempfile

    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp, \
            tempfile.TemporaryFile(dir=path.parent, prefix=f'.{path.name}.') as spill:
        writer = _StampFile(tmp, n_stamps, spill)
        yield writer
        writer.finish()


class _StampFile:
    """The FITS file of `write_stamps`, written one stamp at a time.

    Each stamp HDU is appended to the file as it comes (`_append_image`); the
    masks, whose HDU follows all the stamps, wait in the ``spill`` file and
    are streamed into place by `finish` (`astropy.io.fits.StreamingHDU`),
    which also appends the ``INDEX`` table. Only the index grows with the
    number of stamps.
    """

    def __init__(self, path, n_stamps, spill):
        # A str: astropy's StreamingHDU takes a Path for its bare file name.
        self.path, self.n_stamps, self.spill = str(path), int(n_stamps), spill
        self.count = 0
        self.shape = None
        self.structural = self.end = None
        self.index = {'id': [], 'extver': [], 'flags': [], 'origin_x': [],
                      'origin_y': []}

    def _start(self, image):
        from astropy.io import fits

        first_meta = dict(image.meta or {})
        primary = fits.PrimaryHDU()
        primary.header['NSTAMPS'] = (self.n_stamps, 'number of stamp HDUs')
        if first_meta.get('bands'):
            primary.header['BANDS'] = ','.join(first_meta['bands'])
        if first_meta.get('model_weights_sha256'):
            primary.header['MODELSHA'] = first_meta['model_weights_sha256']
        # EXTEND = T, as HDUList.writeto sets it for a file with extensions.
        primary.header['EXTEND'] = True
        primary.writeto(self.path, overwrite=True)

    def _append_image(self, data, cards):
        """Append a float32 image HDU with these header cards (after the
        structural ones): the bytes `astropy.io.fits.ImageHDU` writes, without
        building an `astropy.io.fits.Header`, whose card handling took most
        of the time of writing many stamps."""
        from astropy.io import fits

        if self.structural is None:
            structural = [fits.Card('XTENSION', 'IMAGE', 'Image extension'),
                          fits.Card('BITPIX', -32, 'array data type'),
                          fits.Card('NAXIS', data.ndim, 'number of array dimensions')]
            structural += [fits.Card(f'NAXIS{k + 1}', n)
                           for k, n in enumerate(data.shape[::-1])]
            structural += [fits.Card('PCOUNT', 0, 'number of parameters'),
                           fits.Card('GCOUNT', 1, 'number of groups')]
            self.structural = ''.join(card.image for card in structural)
            self.end = 'END'.ljust(80)
        text = ''.join([self.structural] + [card.image for card in cards] + [self.end])
        text += ' ' * (-len(text) % 2880)
        raw = np.ascontiguousarray(data, dtype='>f4').tobytes()
        with open(self.path, 'ab') as stream:
            stream.write(text.encode('ascii'))
            stream.write(raw)
            stream.write(bytes(-len(raw) % 2880))

    def write(self, images):
        """Append stamps (an iterable of `~astropy.nddata.NDData`)."""
        from astropy.io import fits

        for image in images:
            data = np.asarray(image.data, dtype=np.float32)
            if self.shape is None:
                if data.ndim != 3:
                    raise InvalidInputError(f'stamps must have the shape (n_bands, '
                                            f'size, size), got {data.shape}.')
                self.shape = data.shape
                self._start(image)
            elif data.shape != self.shape:
                raise InvalidInputError(f'stamps must all have one shape (n_bands, '
                                        f'size, size), got {self.shape} and '
                                        f'{data.shape}.')
            if self.count >= self.n_stamps:
                raise InvalidInputError(f'more than the {self.n_stamps} stamps '
                                        f'announced for {self.path}.')
            k = self.count
            meta = dict(image.meta or {})
            wcs = getattr(image.wcs, 'low_level_wcs', image.wcs)
            cards = list(wcs.to_header(relax=True).cards) if wcs is not None else []
            identifier = meta.get('id', k)
            identifier = identifier.item() if hasattr(identifier, 'item') else identifier
            flags = int(meta.get('flags', 0))
            origin = [int(value) for value in meta.get('origin', (0, 0))]
            stamp_cards = [('EXTNAME', 'STAMP'), ('EXTVER', k + 1), ('ID', identifier),
                           ('FLAGS', flags)]
            if image.unit is not None:
                from .exposures import fits_unit_string

                stamp_cards.append(('BUNIT', fits_unit_string(image.unit)))
            if meta.get('bands'):
                stamp_cards.append(('BANDS', ','.join(meta['bands'])))
            stamp_cards += [('ORIGINX', origin[0], 'exposure column of stamp pixel 0'),
                            ('ORIGINY', origin[1], 'exposure row of stamp pixel 0'),
                            ('BLOCKFAC', int(meta.get('block_factor', 1)),
                             'cut from the exposure block-summed by this')]
            # The stamp's own keywords win over a WCS card of the same name
            # (a celestial WCS has none of them).
            ours = {card[0] for card in stamp_cards}
            cards = [card for card in cards if card.keyword not in ours]
            cards += [fits.Card(*card) for card in stamp_cards]
            self._append_image(data, cards)
            mask = np.zeros(self.shape, dtype=np.uint8)
            if image.mask is not None:
                mask[...] = np.asarray(image.mask, dtype=bool)
            self.spill.write(mask.tobytes())
            self.index['id'].append(identifier)
            self.index['extver'].append(k + 1)
            self.index['flags'].append(flags)
            self.index['origin_x'].append(origin[0])
            self.index['origin_y'].append(origin[1])
            self.count += 1

    def finish(self):
        """Write the ``MASKS`` and ``INDEX`` HDUs after the last stamp."""
        from astropy.io import fits
        from astropy.table import Table

        if self.count != self.n_stamps:
            raise InvalidInputError(f'{self.count} stamps were written to '
                                    f'{self.path}, not the {self.n_stamps} '
                                    f'announced.')
        header = fits.ImageHDU(np.zeros((1,) + self.shape, dtype=np.uint8),
                               name='MASKS').header
        header['NAXIS4'] = self.n_stamps
        stream = fits.StreamingHDU(self.path, header)
        stamp_bytes = int(np.prod(self.shape))
        per_block = max(1, 2 ** 24 // stamp_bytes)
        self.spill.seek(0)
        while block := self.spill.read(per_block * stamp_bytes):
            stream.write(np.frombuffer(block, dtype=np.uint8).reshape(
                (-1,) + self.shape))
        stream.close()
        index = fits.BinTableHDU(Table(self.index), name='INDEX')
        fits.append(self.path, index.data, index.header, verify=False)


def read_stamps(path):
    """Read stamps written by `write_stamps` as a list of
    `~astropy.nddata.NDData` (data, unit, WCS, mask and meta ``id``,
    ``flags``, ``bands``, ``origin``).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.

    Returns
    -------
    list of `~astropy.nddata.NDData`
    """
    import astropy.units as u
    from astropy.io import fits
    from astropy.nddata import NDData
    from astropy.wcs import WCS

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'stamp file {path} does not exist; give the path '
                                f'of a file written by write_stamps (psfdeconv '
                                f'run).')
    out = []
    with fits.open(path) as hdulist:
        masks = hdulist['MASKS'].data.astype(bool)
        for k in range(int(hdulist[0].header['NSTAMPS'])):
            hdu = hdulist['STAMP', k + 1]
            header = hdu.header
            wcs = WCS(header, naxis=2) if 'CTYPE1' in header else None
            unit = u.Unit(header['BUNIT']) if 'BUNIT' in header else None
            meta = {'id': header['ID'], 'flags': header['FLAGS'],
                    'bands': header['BANDS'].split(',') if 'BANDS' in header else None,
                    'origin': [header['ORIGINX'], header['ORIGINY']],
                    'block_factor': int(header.get('BLOCKFAC', 1))}
            out.append(NDData(np.array(hdu.data, dtype=np.float64), unit=unit,
                              wcs=wcs, mask=masks[k].copy(), meta=meta))
    return out
