# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of psfdeconv.io: atomic, non-overwriting writes and tables."""

import os
import stat
import threading
import time
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.table import QTable, Table
from astropy.utils.exceptions import AstropyUserWarning
from numpy.testing import assert_array_equal

from psfdeconv._warnings import catch_warnings
from psfdeconv.exceptions import OutputExistsError
from psfdeconv.io import atomic_path, check_writable, write_table
from psfdeconv.io.exposures import _header_warnings_into


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_path_writes(tmp_path):
    target = tmp_path / 'sub' / 'out.txt'  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        assert not target.exists()  # nothing at the final path until the end
        tmp.write_text('done')
    assert target.read_text() == 'done'
    assert sorted(p.name for p in target.parent.iterdir()) == ['out.txt']


def test_new_file_permissions(tmp_path):
    # mkstemp creates 0o600 files; a finished output gets the usual 0o644.
    target = tmp_path / 'out.txt'
    with atomic_path(target) as tmp:
        tmp.write_text('x')
    assert mode(target) == 0o644


def test_overwrite_keeps_existing_permissions(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')
    os.chmod(target, 0o640)
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text('new')
    assert target.read_text() == 'new'
    assert mode(target) == 0o640


def test_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')
    with pytest.raises(OutputExistsError, match='exists; pass overwrite=True') as info:
        with atomic_path(target) as tmp:
            tmp.write_text('new')  # never reached
    assert isinstance(info.value, FileExistsError)
    assert str(target) in str(info.value)
    assert target.read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.txt']
    with pytest.raises(FileExistsError):
        check_writable(target)
    assert check_writable(target, overwrite=True) == target
    assert check_writable(str(tmp_path / 'new.txt')) == tmp_path / 'new.txt'


def test_exception_inside_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')
    with pytest.raises(RuntimeError, match='crash'):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text('half of the new')
            raise RuntimeError('crash')
    assert target.read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.txt']


def test_exception_inside_leaves_nothing_for_a_new_file(tmp_path):
    target = tmp_path / 'out.txt'
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('partial')
            raise RuntimeError('crash')
    assert list(tmp_path.iterdir()) == []


def test_file_appearing_meanwhile_is_not_overwritten(tmp_path):
    # Another process writes the target while we write ours: the check at the end refuses.
    target = tmp_path / 'out.txt'
    with pytest.raises(OutputExistsError):
        with atomic_path(target) as tmp:
            tmp.write_text('ours')
            target.write_text('theirs')
    assert target.read_text() == 'theirs'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.txt']


@pytest.fixture
def table():
    result = QTable()
    result['id'] = np.arange(4)
    result['flux'] = [1.5, 2.5, 3.5, 4.5] * u.nJy
    result['size'] = [0.1, 0.2, 0.3, 0.4] * u.arcsec
    result['e1'] = [0.0, 0.1, -0.1, 0.05]
    result.meta['MODEL'] = 'tiny'
    return result


@pytest.mark.parametrize('name', ['table.fits', 'table.ecsv'])
def test_write_table_round_trip_with_units(tmp_path, table, name):
    path = write_table(table, tmp_path / name)
    assert path == tmp_path / name
    assert mode(path) == 0o644
    read = QTable.read(path)
    assert read.colnames == table.colnames
    assert read['flux'].unit == u.nJy
    assert read['size'].unit == u.arcsec
    assert_array_equal(read['flux'].value, table['flux'].value)
    assert_array_equal(read['size'].to_value(u.arcsec), table['size'].value)
    assert_array_equal(read['id'], table['id'])
    assert_array_equal(read['e1'], table['e1'])
    assert read.meta['MODEL'] == 'tiny'
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_table_refuses_to_overwrite(tmp_path, table):
    path = write_table(table, tmp_path / 'table.fits')
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        write_table(table[:2], path)
    assert path.read_bytes() == before
    write_table(table[:2], path, overwrite=True)
    assert len(Table.read(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['table.fits']


def test_write_table_explicit_format(tmp_path, table):
    path = write_table(table, tmp_path / 'table.txt', format='ascii.ecsv')
    assert QTable.read(path, format='ascii.ecsv')['flux'].unit == u.nJy


def test_warning_blocks_wait_for_each_other():
    # The warning filters are process-wide: while one thread silences a warning,
    # another thread's recording block (reading a FITS header) must not start,
    # or it records the silenced warning and emits it again (a dask batch runs
    # exposure groups in threads).
    silencing = threading.Event()
    order = []

    def silence():
        with catch_warnings():
            warnings.simplefilter('ignore', AstropyUserWarning)
            silencing.set()
            time.sleep(0.2)
            warnings.warn('silenced in this thread', AstropyUserWarning, stacklevel=1)
            order.append('silenced')

    thread = threading.Thread(target=silence)
    thread.start()
    assert silencing.wait(10)
    store = []
    with _header_warnings_into(store):
        order.append('recording')
    thread.join()
    assert order == ['silenced', 'recording']
    assert store == []


def test_streamed_stamp_headers_are_astropys(tmp_path):
    # write_stamps formats each stamp's header cards itself: the HDUs must be those
    # astropy.io.fits writes for the same header, and the file must verify.
    from astropy.io import fits
    from astropy.nddata import NDData
    from astropy.wcs import WCS

    from psfdeconv.io import read_stamps, write_stamps

    rng = np.random.default_rng(3)
    stamps = []
    for k in range(3):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ['RA---TAN-SIP', 'DEC--TAN-SIP'] if k == 2 else ['RA---TAN', 'DEC--TAN']
        wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [10.5 - k, -3.25 * k]
        wcs.wcs.cd = [[-5e-5, 1e-6], [1e-6, 5e-5]]
        if k == 2:  # with SIP distortion cards
            header = wcs.to_header(relax=True)
            header.update({'A_ORDER': 2, 'B_ORDER': 2, 'A_2_0': 1e-6, 'B_0_2': -2e-6})
            wcs = WCS(header)
        meta = {'id': np.int64(7 + k), 'flags': 5 * k, 'bands': ['g', 'r'],
                'origin': (np.int64(100 + k), 40), 'block_factor': 1 + k}
        stamps.append(NDData(rng.normal(size=(2, 16, 16)).astype(np.float32), wcs=wcs,
                             unit=u.nJy, mask=rng.random((2, 16, 16)) > 0.9, meta=meta))
    path = tmp_path / 'stamps.fits'
    write_stamps(stamps, path)
    with fits.open(path) as hdus:
        hdus.verify('exception')
        for k, stamp in enumerate(stamps):
            header = stamp.wcs.to_header(relax=True)
            header['EXTNAME'] = 'STAMP'
            header['EXTVER'] = k + 1
            header['ID'] = 7 + k
            header['FLAGS'] = 5 * k
            header['BUNIT'] = 'nJy'
            header['BANDS'] = 'g,r'
            header['ORIGINX'] = (100 + k, 'exposure column of stamp pixel 0')
            header['ORIGINY'] = (40, 'exposure row of stamp pixel 0')
            header['BLOCKFAC'] = (1 + k, 'cut from the exposure block-summed by this')
            expected = fits.ImageHDU(stamp.data, header=header)
            assert hdus[k + 1].header.tostring() == expected.header.tostring()
            assert_array_equal(hdus[k + 1].data, stamp.data)
        assert hdus[3].header['A_ORDER'] == 2
    read = read_stamps(path)
    assert [int(stamp.meta['id']) for stamp in read] == [7, 8, 9]
    assert_array_equal(read[2].mask, stamps[2].mask)
