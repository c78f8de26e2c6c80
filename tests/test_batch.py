# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of `psfdeconv.batch` and ``psfdeconv batch``: manifests, the three kinds of
scheduler, failed groups, refused outputs and a batch killed with SIGKILL and resumed; and of
the chunked (streaming) group path of `psfdeconv.pipeline` that the batch relies on.

Four tiny exposure groups (128x128 pixels, 3 galaxies, 3 stars) are deconvolved with the
suite's tiny model and a Moffat PSF (no ePSF to build); the model's output is meaningless, so
these tests compare catalogs between ways of running the same groups, not with the truth.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import QTable, Table
from numpy.testing import assert_allclose, assert_array_equal

import psfdeconv
from psfdeconv.batch import MARKER_NAME, read_manifest, read_summary, run_batch
from psfdeconv.cli import main
from psfdeconv.exceptions import (
    BatchFailureError,
    ConfigError,
    InvalidInputError,
    OutputExistsError,
    StaleLockWarning,
)
from psfdeconv.flags import FLAG_NEIGHBOURS
from psfdeconv.inference import openvino_available
from psfdeconv.io import read_catalog, read_stamps
from psfdeconv.pipeline import deconvolve_catalog, run_exposure_set
from psfdeconv.simulate import simulate_exposure, write_exposure_set

BANDS = ('g', 'r', 'i')
MOFFAT = 'moffat:fwhm=0.8arcsec,beta=3.5'
#: Group f1's r-band PSF, from its psf_r column (differs from the default).
MOFFAT_F1_R = 'moffat:fwhm=0.7arcsec,beta=3'
GROUPS = ('f0', 'f1', 'f2', 'f3')
#: Catalog values computed by different processes may differ by float32 round-off of the
#: network (oneDNN with other thread counts) carried through the refit and HSM.
RTOL, ATOL = 1e-4, 1e-6

_PACKAGE_ROOT = str(Path(psfdeconv.__file__).resolve().parents[1])

# warnings.catch_warnings is process-wide (until Python 3.14's context-local filters): when
# two groups run in threads, one thread leaving a third-party catch_warnings block restores
# the filters under another thread's block, and a warning that block silences (astropy's
# sigma clipping of NaN pixels, silenced by photutils) escapes to pytest's "error" filter.
# Single-threaded runs never show it.
pytestmark = pytest.mark.filterwarnings(
    'ignore:Input data contains invalid values:astropy.utils.exceptions.AstropyUserWarning')


@pytest.fixture(scope='module')
def groups(tmp_path_factory):
    """Four exposure groups in ``groups/<id>/`` and a manifest ``groups.csv`` with relative
    paths: f1 has a source catalog (its first two galaxies) and a psf_r PSF, the others
    detect their sources."""
    directory = tmp_path_factory.mktemp('groups')
    for seed, group in enumerate(GROUPS, start=11):
        exposures, truth = simulate_exposure((128, 128), n_galaxies=3, n_stars=3,
                                             seed=seed)
        write_exposure_set(directory / group, exposures, truth)
        if group == 'f1':
            galaxies = truth[truth['kind'] == 'galaxy'][:2]
            galaxies['id', 'ra', 'dec'].write(directory / group / 'sources.ecsv')
    lines = ['id,g,r,i,catalog,psf_r']
    for group in GROUPS:
        # A specification with a comma is quoted, as CSV requires.
        catalog, psf_r = ('f1/sources.ecsv', f'"{MOFFAT_F1_R}"') if group == 'f1' else \
            ('', '')
        lines.append(f'{group},{group}/g.fits,{group}/r.fits,{group}/i.fits,{catalog},'
                     f'{psf_r}')
    (directory / 'groups.csv').write_text('\n'.join(lines) + '\n')
    return directory


def group_arguments(directory, group):
    """run_exposure_set's exposures, positions and psfs for one group of `groups`."""
    exposures = {band: directory / group / f'{band}.fits' for band in BANDS}
    positions = directory / group / 'sources.ecsv' if group == 'f1' else None
    psfs = dict.fromkeys(BANDS, MOFFAT)
    if group == 'f1':
        psfs['r'] = MOFFAT_F1_R
    return exposures, positions, psfs


@pytest.fixture(scope='module')
def reference(groups, tiny_model, tmp_path_factory):
    """Each group run on its own with run_exposure_set (f2 with ``psfdeconv run``): the
    catalogs every batch must reproduce, by group id."""
    out = tmp_path_factory.mktemp('reference')
    catalogs = {}
    for group in GROUPS:
        exposures, positions, psfs = group_arguments(groups, group)
        if group == 'f2':
            arguments = ['run', '--psf', MOFFAT, '--model', str(tiny_model.path),
                         '--out', str(out / group)]
            for band, path in exposures.items():
                arguments += ['--band', f'{band}={path}']
            assert main(arguments) == 0
        else:
            run_exposure_set(exposures, out / group, positions, psfs, model=tiny_model)
        catalogs[group] = read_catalog(out / group / 'catalog.fits')
    return catalogs


def assert_same_catalog(actual, expected):
    """Same columns, rows and values (floats to RTOL/ATOL, the rest exactly)."""
    assert actual.colnames == expected.colnames
    assert len(actual) == len(expected) > 0
    for name in expected.colnames:
        a, e = actual[name], expected[name]
        if name == 'sky_centroid':
            assert a.separation(e).max() < 1e-4 * u.arcsec
        elif np.asarray(e).dtype.kind == 'f':
            assert getattr(a, 'unit', None) == getattr(e, 'unit', None), name
            assert_allclose(np.asarray(getattr(a, 'value', a)),
                            np.asarray(getattr(e, 'value', e)), rtol=RTOL, atol=ATOL,
                            equal_nan=True, err_msg=name)
        else:
            assert_array_equal(np.asarray(a), np.asarray(e), err_msg=name)


def assert_batch_matches(out, reference, ids=GROUPS):
    for group in ids:
        assert (out / group / MARKER_NAME).is_file()
        assert_same_catalog(read_catalog(out / group / 'catalog.fits'), reference[group])
        assert len(read_stamps(out / group / 'stamps.fits')) == len(reference[group])


# --- Manifests -----------------------------------------------------------------------------

def test_read_manifest_resolves_paths(groups):
    manifest = read_manifest(groups / 'groups.csv')
    assert manifest.meta['bands'] == list(BANDS)
    assert list(manifest['id']) == list(GROUPS)
    assert manifest.colnames == ['id', 'g', 'r', 'i', 'catalog', 'psf_g', 'psf_r', 'psf_i']
    assert manifest['i'][2] == str(groups.resolve() / 'f2' / 'i.fits')
    assert manifest['catalog'][1] == str(groups.resolve() / 'f1' / 'sources.ecsv')
    assert manifest['catalog'][0] == '' and manifest['psf_g'][1] == ''
    assert manifest['psf_r'][1] == MOFFAT_F1_R

    # The same groups as ECSV (integer-looking ids stay text in CSV: 007 keeps its zeros).
    table = Table({'id': [7], 'g': ['f0/g.fits'], 'r': ['f0/r.fits'],
                   'i': ['f0/i.fits'], 'psf_g': ['f0/g.fits']})
    table.write(groups / 'one.ecsv', overwrite=True)
    manifest = read_manifest(groups / 'one.ecsv')
    assert list(manifest['id']) == ['7']
    assert manifest['psf_g'][0] == f'psf={groups.resolve() / "f0" / "g.fits"}'
    (groups / 'zeros.csv').write_text('id,g,r,i\n007,f0/g.fits,f0/r.fits,f0/i.fits\n')
    assert list(read_manifest(groups / 'zeros.csv')['id']) == ['007']


@pytest.mark.parametrize(('text', 'error', 'message'), [
    ('g,r,i\nf0/g.fits,f0/r.fits,f0/i.fits\n', ConfigError, 'has no id column'),
    ('id,catalog\nx,\n', ConfigError, 'has no band columns'),
    ('id,g,r,psf_z\nx,f0/g.fits,f0/r.fits,\n', ConfigError,
     r"column\(s\) \['psf_z'\] but no band column\(s\) \['z'\]"),
    ('id,g,r,i\n', ConfigError, 'has no rows'),
    ('id,g,r,i\nA,f0/g.fits,f0/r.fits,f0/i.fits\na,f1/g.fits,f1/r.fits,f1/i.fits\n',
     ConfigError, r"row 2: id 'a' repeats the id of row 1"),
    ('id,g,r,i\n../up,f0/g.fits,f0/r.fits,f0/i.fits\n', ConfigError,
     r"row 1: id '../up' is not a safe directory name"),
    ('id,g,r,i\nmy field,f0/g.fits,f0/r.fits,f0/i.fits\n', ConfigError,
     r"id 'my field' is not a safe directory name"),
    ('id,g,r,i\nsummary.fits,f0/g.fits,f0/r.fits,f0/i.fits\n', ConfigError,
     'is not a safe directory name'),
    ('id,g,r,i\nx,f0/g.fits,,f0/i.fits\n', ConfigError,
     r"row 1 \(id 'x'\): column 'r' is empty"),
    ('id,g,r,i\nx,f0/g.fits,f0/nothing.fits,f0/i.fits\n', InvalidInputError,
     r"row 1 \(id 'x'\), column 'r': exposure .*nothing.fits does not exist"),
    ('id,g,r,i,catalog\nx,f0/g.fits,f0/r.fits,f0/i.fits,no.ecsv\n', InvalidInputError,
     r"column 'catalog': source table .*no.ecsv does not exist"),
    ('id,g,r,i,psf_i\nx,f0/g.fits,f0/r.fits,f0/i.fits,psf=no_psf.fits\n',
     InvalidInputError, r"column 'psf_i': PSF file .*no_psf.fits does not exist"),
])
def test_manifest_errors(groups, tmp_path, text, error, message):
    path = groups / f'bad_{abs(hash(text))}.csv'
    path.write_text(text)
    with pytest.raises(error, match=message):
        read_manifest(path)


def test_manifest_files_that_are_not_tables(groups, tmp_path, capsys):
    with pytest.raises(InvalidInputError, match='manifest .*missing.csv does not exist'):
        read_manifest(tmp_path / 'missing.csv')
    (tmp_path / 'binary.csv').write_bytes(b'\x00\xff\xfe\x00' * 64)
    with pytest.raises(InvalidInputError, match='cannot be read as a CSV or ECSV table'):
        read_manifest(tmp_path / 'binary.csv')
    # On the command line: 3 for bad input, 2 for a malformed manifest.
    assert main(['batch', str(tmp_path / 'missing.csv'), '--out', str(tmp_path)]) == 3
    (tmp_path / 'no_id.csv').write_text('g,r,i\na,b,c\n')
    assert main(['batch', str(tmp_path / 'no_id.csv'), '--out', str(tmp_path)]) == 2
    assert 'psfdeconv batch: error:' in capsys.readouterr().err


def test_option_errors(groups, tiny_model, tmp_path):
    manifest = groups / 'groups.csv'
    for options, message in [
            ({'scheduler': 'gpu'}, r"scheduler = 'gpu'; give one of"),
            ({'workers': 0}, 'workers = 0; give a number'),
            ({'scheduler': 'tcp://127.0.0.1:1', 'workers': 2}, 'cannot be set for a dask'),
            ({'resume': True, 'overwrite': True}, 'resume and overwrite exclude'),
            ({'symmetries': 3}, r'symmetries must be one of \(1, 2, 4, 8\), got 3')]:
        with pytest.raises(ConfigError, match=message):
            run_batch(manifest, tmp_path / 'out', model=tiny_model, **options)
    assert not (tmp_path / 'out').exists()
    with pytest.raises(SystemExit) as exit_info:
        main(['batch', str(manifest), '--out', str(tmp_path), '--resume', '--overwrite'])
    assert exit_info.value.code == 2


# --- Running batches ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def threads_batch(groups, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp('threads') / 'out'
    summary = run_batch(groups / 'groups.csv', out, psfs=MOFFAT, model=tiny_model,
                        workers=2)
    return out, summary


def test_threads_batch_gives_the_catalogs_of_single_runs(threads_batch, reference,
                                                          tiny_model):
    out, summary = threads_batch
    assert_batch_matches(out, reference)
    assert list(summary['id']) == list(GROUPS)
    assert list(summary['status']) == ['ok'] * 4
    assert list(summary['n_sources']) == [len(reference[group]) for group in GROUPS]
    # NEIGHBOURS is informational and not counted.
    assert list(summary['n_flagged']) == [int(((reference[group]['flags']
                                                & ~FLAG_NEIGHBOURS) != 0).sum())
                                          for group in GROUPS]
    assert summary['seconds'].unit == u.s and np.all(summary['seconds'] > 0 * u.s)
    assert list(summary['error']) == [''] * 4
    # The file holds the same table and the run's provenance.
    written = read_summary(out / 'summary.fits')
    assert list(written['status']) == ['ok'] * 4
    assert written.meta['model']['weights_sha256'] == tiny_model.sha256
    assert written.meta['counts'] == {'ok': 4, 'skipped': 0, 'failed': 0, 'pending': 0}
    assert written.meta['scheduler'] == 'threads' and written.meta['workers'] == 2
    assert written.meta['versions']['dask'] == __import__('dask').__version__
    # f1 used its own catalog and psf_r; the others detected their sources.
    meta = read_catalog(out / 'f1' / 'catalog.fits').meta
    assert meta['positions'] == 'table columns ra, dec'
    assert meta['psf_source'] == {'g': MOFFAT, 'r': MOFFAT_F1_R, 'i': MOFFAT}
    assert read_catalog(out / 'f0' / 'catalog.fits').meta['positions'] == 'detected'


def test_default_scheduler_is_processes_for_a_model_file(tiny_model, tiny_model_path):
    from psfdeconv.batch import _default_scheduler

    path = str(tiny_model_path)
    # A model file and several workers: one group per process.
    assert _default_scheduler(path, path, 2, 4) == 'processes'
    assert _default_scheduler(None, path, None, 4) == ('processes' if (os.cpu_count() or 1) > 1
                                                       else 'threads')
    # One worker (or one group) gains nothing from a second process.
    assert _default_scheduler(path, path, 1, 4) == 'threads'
    assert _default_scheduler(path, path, None, 1) == 'threads'
    # A model in memory stays in this process.
    assert _default_scheduler(tiny_model, path, 2, 4) == 'threads'
    assert _default_scheduler(tiny_model, None, 2, 4) == 'threads'


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='needs CPU affinity')
def test_default_workers_follow_the_cpu_affinity(tiny_model_path):
    # A batch job given one CPU of a larger machine (SLURM, taskset): one worker, in
    # threads, not one process per CPU of the machine.
    from psfdeconv._cpus import usable_cpus
    from psfdeconv.batch import _default_scheduler

    path = str(tiny_model_path)
    allowed = os.sched_getaffinity(0)
    assert usable_cpus() == len(allowed)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        assert usable_cpus() == 1
        assert _default_scheduler(path, path, None, 4) == 'threads'
    finally:
        os.sched_setaffinity(0, allowed)


def test_batch_process_checks_the_model_without_tensorflow(tiny_model_path, tiny_model):
    # The groups load the network where they run: a verified model file is only
    # checked in the batch's own process, which then need not start TensorFlow
    # (seconds) before its worker processes do.
    code = ('import sys; from psfdeconv.batch import _load_batch_model; '
            f'model = _load_batch_model({str(tiny_model_path)!r}, 3); '
            'print(model.network_loaded, model.sha256, "tensorflow" in sys.modules)')
    child = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           check=True)
    assert child.stdout.split() == ['False', tiny_model.sha256, 'False']


@pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO')
def test_worker_runs_the_cached_network_without_tensorflow(tiny_model_path, tiny_model,
                                                           tmp_path, monkeypatch):
    # A worker process whose model was converted before (by any process) compiles the
    # cached conversion: it starts neither TensorFlow nor Keras, and keeps to its threads.
    from psfdeconv.model import load_model

    monkeypatch.setenv('PSFDECONV_CACHE_DIR', str(tmp_path / 'cache'))
    cubes = np.random.default_rng(2).random((4, 64, 64, 9), dtype=np.float32)
    expected = load_model(tiny_model_path, network='lazy').predict(cubes, precision='auto')
    np.save(tmp_path / 'cubes.npy', cubes)
    code = ('import os, sys; import numpy as np; '
            'from psfdeconv.batch import _worker_model; '
            f'model = _worker_model({str(tiny_model_path)!r}, {tiny_model.sha256!r}, 3, '
            'threads=1); '
            f'out = model.predict(np.load({str(tmp_path / "cubes.npy")!r}), precision="auto"); '
            f'np.save({str(tmp_path / "out.npy")!r}, out); '
            'print("tensorflow" in sys.modules, "keras" in sys.modules, '
            'os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["OMP_NUM_THREADS"])')
    child = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           check=False)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ['False', 'False', '1', '1']
    assert np.array_equal(np.load(tmp_path / 'out.npy'), expected)


def test_worker_processes_start_with_their_thread_share(monkeypatch):
    # numpy's BLAS reads its thread count when numpy loads, before the worker
    # runs any task: the variables must be in the environment it starts with.
    from psfdeconv.batch import _worker_threads

    monkeypatch.setenv('OMP_NUM_THREADS', '7')
    monkeypatch.delenv('OPENBLAS_NUM_THREADS', raising=False)
    with _worker_threads(1):
        child = subprocess.run(
            [sys.executable, '-c', 'import os; print(os.environ["OMP_NUM_THREADS"], '
             'os.environ["OPENBLAS_NUM_THREADS"], os.environ["MKL_NUM_THREADS"])'],
            capture_output=True, text=True, check=True)
    assert child.stdout.split() == ['1', '1', '1']
    # Restored after: a variable that was set keeps its value, one that was not
    # is removed again.
    assert os.environ['OMP_NUM_THREADS'] == '7'
    assert 'OPENBLAS_NUM_THREADS' not in os.environ


@pytest.mark.slow
def test_processes_batch(groups, reference, tiny_model, tmp_path):
    (groups / 'two.csv').write_text(
        '\n'.join((groups / 'groups.csv').read_text().splitlines()[:3]) + '\n')
    # One worker process (each one starts TensorFlow, which takes seconds).
    summary = run_batch(groups / 'two.csv', tmp_path, psfs=MOFFAT, model=tiny_model.path,
                        scheduler='processes', workers=1)
    assert list(summary['status']) == ['ok', 'ok']
    assert_batch_matches(tmp_path, reference, ids=('f0', 'f1'))
    # The groups ran in worker processes, not in this one.
    pids = {int(worker.rsplit(':', 1)[1]) for worker in summary['worker']}
    assert os.getpid() not in pids


def test_local_cluster_address(groups, reference, tiny_model, tmp_path):
    distributed = pytest.importorskip('distributed')
    # Workers in this process (they find the loaded model in its cache), reached through
    # a tcp:// address on localhost (pytest-remotedata refuses any other host).
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol='tcp://', host='127.0.0.1',
                                  dashboard_address='127.0.0.1:0',
                                  worker_dashboard_address='127.0.0.1:0') as cluster:
        summary = run_batch(groups / 'groups.csv', tmp_path, psfs=MOFFAT,
                            model=tiny_model, scheduler=cluster.scheduler_address)
    assert list(summary['status']) == ['ok'] * 4
    assert summary.meta['scheduler'].startswith('tcp://127.0.0.1:')
    assert_batch_matches(tmp_path, reference)


def test_unreachable_cluster(groups, tiny_model, tmp_path):
    pytest.importorskip('distributed')
    import dask

    with dask.config.set({'distributed.comm.timeouts.connect': '1s'}), \
            pytest.raises(ConfigError, match='cannot connect to the dask scheduler'):
        run_batch(groups / 'groups.csv', tmp_path, psfs=MOFFAT, model=tiny_model,
                  scheduler='tcp://127.0.0.1:9')
    assert not (tmp_path / 'summary.fits').exists()  # refused before any output


def test_failed_group_does_not_stop_the_others(groups, reference, tiny_model_path,
                                               tmp_path, capsys):
    # f2's g band is not FITS; the manifest points at a copy of the groups.
    shutil.copytree(groups, tmp_path / 'in')
    (tmp_path / 'in' / 'f2' / 'g.fits').write_bytes(b'not a FITS file' * 200)
    out = tmp_path / 'out'
    arguments = ['batch', str(tmp_path / 'in' / 'groups.csv'), '--out', str(out),
                 '--psf', MOFFAT, '--model', str(tiny_model_path)]
    assert main(arguments) == 6
    err = capsys.readouterr().err
    assert 'psfdeconv batch: error: 1 of 4 groups failed (f2)' in err
    summary = read_summary(out)
    assert list(summary['status']) == ['ok', 'ok', 'failed', 'ok']
    assert summary['error'][2].startswith('InvalidInputError: ')
    assert 'f2/g.fits' in summary['error'][2]
    assert summary['n_sources'][2] == -1 and summary.meta['counts']['failed'] == 1
    assert not (out / 'f2' / MARKER_NAME).exists()
    assert_batch_matches(out, reference, ids=('f0', 'f1', 'f3'))

    # In Python the error carries the summary.
    with pytest.raises(BatchFailureError, match='rerun with --resume') as error_info:
        run_batch(tmp_path / 'in' / 'groups.csv', tmp_path / 'out_python', psfs=MOFFAT,
                  model=tiny_model_path, workers=1)
    assert list(error_info.value.summary['status']).count('failed') == 1

    # Fixed input: --resume runs f2 only.
    shutil.copy(groups / 'f2' / 'g.fits', tmp_path / 'in' / 'f2' / 'g.fits')
    before = {group: (out / group / 'catalog.fits').stat().st_mtime_ns
              for group in ('f0', 'f1', 'f3')}
    assert main([*arguments, '--resume']) == 0
    summary = read_summary(out)
    assert list(summary['status']) == ['skipped', 'skipped', 'ok', 'skipped']
    assert summary['n_sources'][0] == len(reference['f0'])
    assert {group: (out / group / 'catalog.fits').stat().st_mtime_ns
            for group in ('f0', 'f1', 'f3')} == before
    assert_batch_matches(out, reference)
    # A finished group whose outputs were removed since is run again.
    (out / 'f3' / 'stamps.fits').unlink()
    assert main([*arguments, '--resume']) == 0
    assert list(read_summary(out)['status']) == ['skipped', 'skipped', 'skipped', 'ok']
    assert_batch_matches(out, reference, ids=('f3',))


def test_existing_summary_is_refused(threads_batch, groups, tiny_model_path, capsys):
    out, _ = threads_batch
    before = (out / 'summary.fits').read_bytes()
    arguments = ['batch', str(groups / 'groups.csv'), '--out', str(out), '--psf', MOFFAT,
                 '--model', str(tiny_model_path)]
    assert main(arguments) == 5
    assert 'summary.fits exists' in capsys.readouterr().err
    assert (out / 'summary.fits').read_bytes() == before
    # Group outputs without a summary are refused too.
    (out / 'summary.fits').rename(out / 'summary.bak')
    try:
        with pytest.raises(OutputExistsError, match='f0 exists and is not empty'):
            run_batch(groups / 'groups.csv', out, psfs=MOFFAT, model=tiny_model_path)
    finally:
        (out / 'summary.bak').rename(out / 'summary.fits')


def test_overwrite_redoes_every_group(groups, reference, tiny_model, tmp_path):
    (groups / 'one.csv').write_text(
        '\n'.join((groups / 'groups.csv').read_text().splitlines()[:2]) + '\n')
    run_batch(groups / 'one.csv', tmp_path, psfs=MOFFAT, model=tiny_model)
    before = (tmp_path / 'f0' / MARKER_NAME).stat().st_mtime_ns
    summary = run_batch(groups / 'one.csv', tmp_path, psfs=MOFFAT, model=tiny_model,
                        overwrite=True)
    assert list(summary['status']) == ['ok']
    assert (tmp_path / 'f0' / MARKER_NAME).stat().st_mtime_ns > before
    assert_batch_matches(tmp_path, reference, ids=('f0',))


def test_resume_keeps_only_groups_of_the_same_symmetries(groups, tiny_model, tmp_path):
    (groups / 'one.csv').write_text(
        '\n'.join((groups / 'groups.csv').read_text().splitlines()[:2]) + '\n')
    summary = run_batch(groups / 'one.csv', tmp_path, psfs=MOFFAT, model=tiny_model,
                        symmetries=1)
    assert summary.meta['symmetries'] == 1
    assert read_catalog(tmp_path / 'f0' / 'catalog.fits').meta['symmetries'] == 1
    before = (tmp_path / 'f0' / MARKER_NAME).read_bytes()
    # The card's 4 symmetries would not give these catalogues: refused, nothing touched.
    with pytest.raises(ConfigError, match=r"groups \['f0'\] .* another model or symmetries"):
        run_batch(groups / 'one.csv', tmp_path, psfs=MOFFAT, model=tiny_model, resume=True)
    assert (tmp_path / 'f0' / MARKER_NAME).read_bytes() == before
    summary = run_batch(groups / 'one.csv', tmp_path, psfs=MOFFAT, model=tiny_model,
                        resume=True, symmetries=1)
    assert list(summary['status']) == ['skipped']


@pytest.mark.slow
def test_killed_batch_resumes_without_losing_or_redoing_groups(groups, reference,
                                                                tiny_model_path, tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get('PYTHONPATH'))
                                        if p)
    process = subprocess.Popen(
        [sys.executable, '-m', 'psfdeconv.cli', 'batch', str(groups / 'groups.csv'),
         '--out', str(out), '--psf', MOFFAT, '--model', str(tiny_model_path),
         '--workers', '1'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any((out / group / MARKER_NAME).exists() for group in GROUPS):
            assert process.poll() is None, 'the batch ended before its first group did'
            assert time.monotonic() < deadline, 'no group finished within 120 s'
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()

    done = [group for group in GROUPS if (out / group / MARKER_NAME).exists()]
    assert 1 <= len(done) < len(GROUPS), 'the kill should land in the middle'
    # The killed batch left a valid summary of every group, finished or not.
    summary = read_summary(out)
    assert list(summary['id']) == list(GROUPS)
    assert set(summary['status']) <= {'ok', 'pending'}
    for group in done:
        assert_same_catalog(read_catalog(out / group / 'catalog.fits'), reference[group])
    stamps = {group: (out / group / 'catalog.fits').stat().st_mtime_ns for group in done}

    # The killed batch's lock (and its running group's) are taken over, with a warning.
    with pytest.warns(StaleLockWarning, match='no longer runs'):
        assert main(['batch', str(groups / 'groups.csv'), '--out', str(out), '--psf',
                     MOFFAT, '--model', str(tiny_model_path), '--resume']) == 0
    summary = read_summary(out)
    assert list(summary['id']) == list(GROUPS)  # every group once
    assert [group for group in GROUPS
            if summary['status'][GROUPS.index(group)] == 'skipped'] == done
    assert set(summary['status']) == {'skipped', 'ok'}
    assert {group: (out / group / 'catalog.fits').stat().st_mtime_ns
            for group in done} == stamps  # none done twice
    assert_batch_matches(out, reference)
    # No temporary file of the killed run is left behind.
    assert not [path for path in out.rglob('.*.tmp')]


# --- Streaming inside a group -----------------------------------------------------------

def test_chunks_do_not_change_the_catalog(groups, tiny_model, tmp_path):
    exposures, _, _ = group_arguments(groups, 'f3')
    # Two sources off the image first: with chunk_size=2 one chunk is entirely off it.
    positions = QTable({'x': [-500.0, 900.0, 40.0, 64.0, 90.0],
                        'y': [-500.0, 900.0, 50.0, 64.0, 80.0]})
    # float32: bfloat16 kernels can differ with the number of stamps per network call.
    whole, whole_stamps = deconvolve_catalog(exposures, positions, MOFFAT,
                                             model=tiny_model, precision='float32')
    chunked, chunked_stamps = deconvolve_catalog(exposures, positions, MOFFAT,
                                                 model=tiny_model, chunk_size=2,
                                                 precision='float32')
    assert chunked.meta == whole.meta
    assert_same_catalog(chunked, whole)
    assert [int(f) & 4 for f in chunked['flags']] == [4, 4, 0, 0, 0]  # FLAG_OFF_IMAGE
    for a, b in zip(chunked_stamps, whole_stamps, strict=True):
        assert_allclose(a.data, b.data, rtol=RTOL, atol=1e-6)
        assert_array_equal(a.mask, b.mask)
        assert a.meta['origin'] == b.meta['origin']

    # run_exposure_set streams the stamps to their file chunk by chunk.
    _, paths = run_exposure_set(exposures, tmp_path, positions, MOFFAT, model=tiny_model,
                                chunk_size=2, precision='float32')
    written = read_stamps(paths['stamps'])
    assert [stamp.meta['id'] for stamp in written] == list(range(5))
    for a, b in zip(written, whole_stamps, strict=True):
        assert_allclose(a.data, b.data, rtol=RTOL, atol=1e-5)
        assert_array_equal(a.mask, b.mask)
    assert_same_catalog(read_catalog(paths['catalog']), whole)
    with pytest.raises(InvalidInputError, match='chunk_size = 0'):
        deconvolve_catalog(exposures, positions, MOFFAT, model=tiny_model, chunk_size=0)
    with pytest.raises(InvalidInputError, match='chunk_size = 0'):
        run_exposure_set(exposures, tmp_path / 'none', positions, MOFFAT, model=tiny_model,
                         chunk_size=0)
    assert not (tmp_path / 'none').exists()  # refused before any work


def test_worker_cpu_sets_split_the_allowed_cpus(monkeypatch):
    from psfdeconv import batch

    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {7, 0, 1, 2, 3, 6}, raising=False)
    assert batch._worker_cpu_sets(2, 3) == [[0, 1, 2], [3, 6, 7]]
    assert batch._worker_cpu_sets(3, 2) == [[0, 1], [2, 3], [6, 7]]
    # One worker keeps the affinity it inherits; workers that do not fill the
    # CPUs exactly (fewer threads, or more than there are CPUs) are not pinned.
    assert batch._worker_cpu_sets(1, 6) is None
    assert batch._worker_cpu_sets(2, 2) is None
    assert batch._worker_cpu_sets(4, 2) is None
    assert batch._worker_cpu_sets(2, None) is None


def test_pin_worker_takes_the_next_cpu_set_or_stays_unpinned(monkeypatch):
    import queue

    from psfdeconv import batch

    pinned = []
    monkeypatch.setattr(os, 'sched_setaffinity', lambda pid, cpus: pinned.append(cpus),
                        raising=False)
    cpu_sets = queue.Queue()
    cpu_sets.put([1])
    batch._pin_worker(cpu_sets)
    assert pinned == [[1]]

    def empty(timeout):
        raise queue.Empty

    monkeypatch.setattr(cpu_sets, 'get', empty)
    batch._pin_worker(cpu_sets)  # no set left: unpinned, no error
    assert pinned == [[1]]


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs 2 CPUs and CPU affinity')
def test_worker_processes_keep_to_their_own_cpus():
    # Two worker processes of the 'processes' scheduler, on two CPUs: each
    # task sees its worker's affinity, one CPU, not both.
    import dask

    from psfdeconv.batch import _compute_locally

    allowed = os.sched_getaffinity(0)
    two = set(sorted(allowed)[:2])
    tasks = [dask.delayed(os.sched_getaffinity, pure=False)(0, dask_key_name=f'cpus-{k}')
             for k in range(4)]
    seen = []
    os.sched_setaffinity(0, two)
    try:
        _compute_locally(tasks, {f'cpus-{k}': k for k in range(4)}, seen.append,
                         'processes', 2, threads=1)
    finally:
        os.sched_setaffinity(0, allowed)
    assert len(seen) == 4
    assert all(len(cpus) == 1 and cpus <= two for cpus in seen)
