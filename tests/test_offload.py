# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The helper process (psfdeconv._offload) and run_exposure_set's PSFs built in it."""

import logging
import os
import time
import warnings

import numpy as np
import pytest
from astropy.nddata import NDData

import psfdeconv.pipeline as pipeline
from psfdeconv._offload import Helper, HelperCall
from psfdeconv.exceptions import InvalidInputError, InvalidPSFError, PSFDeconvWarning
from psfdeconv.io import read_catalog
from psfdeconv.pipeline import run_exposure_set


def helper_work(n, *, warn=False, fail=False):
    """Runs in the helper: its pid, a value, optionally a warning, a log
    record and an error."""
    logging.getLogger('psfdeconv.pipeline').info('helper says %d', n)
    if warn:
        warnings.warn(f'helper warning {n}', PSFDeconvWarning, stacklevel=2)
    if fail:
        raise InvalidPSFError(f'band {n!r}: no stars')
    return os.getpid(), np.arange(n)


def test_value_comes_from_another_process():
    pid, value = HelperCall(helper_work, 4).result()
    assert pid != os.getpid()
    np.testing.assert_array_equal(value, np.arange(4))


def test_warnings_and_log_records_come_back(caplog):
    with caplog.at_level(logging.INFO, logger='psfdeconv.pipeline'), \
            pytest.warns(PSFDeconvWarning, match='helper warning 3'):
        pid, _ = HelperCall(helper_work, 3, warn=True).result()
    assert pid != os.getpid()
    assert any(record.getMessage() == 'helper says 3' for record in caplog.records)


def test_error_is_raised_here_with_the_helpers_traceback():
    with pytest.raises(InvalidPSFError, match="band 5: no stars") as info:
        HelperCall(helper_work, 5, fail=True).result()
    notes = '\n'.join(getattr(info.value, '__notes__', []))
    assert 'In the helper process' in notes and 'helper_work' in notes


def test_unpicklable_arguments_run_here():
    call = HelperCall(helper_work, 2, warn=False, fail=False)
    assert call.result()[0] != os.getpid()
    # A lambda cannot be pickled: the call runs in this process instead.
    local = HelperCall(lambda n: (os.getpid(), n), 7)
    assert local.result() == (os.getpid(), 7)


def test_without_an_interpreter_the_call_runs_here(monkeypatch):
    # A frozen application (PyInstaller) would start itself, not Python.
    monkeypatch.setattr('sys.frozen', True, raising=False)
    assert HelperCall(helper_work, 2).result()[0] == os.getpid()


def test_function_the_helper_cannot_import_runs_here(caplog):
    def nested(n):
        return os.getpid(), n

    # A nested function pickles by name but cannot be found by the helper.
    with caplog.at_level(logging.DEBUG, logger='psfdeconv._offload'):
        assert HelperCall(nested, 1).result() == (os.getpid(), 1)
    assert any('calling it in this process' in record.getMessage()
               for record in caplog.records)


def test_cancel_stops_the_helper():
    call = HelperCall(time.sleep, 120)
    start = time.perf_counter()
    call.cancel()
    with pytest.raises(RuntimeError, match='cancelled'):
        call.result()
    assert time.perf_counter() - start < 60
    if call._process is not None:
        assert call._process.poll() is not None


def test_helper_started_ahead_imports_then_takes_one_call():
    helper = Helper(['fractions', 'psfdeconv.exceptions'])
    pid, value = helper.call(helper_work, 3).result()
    assert pid != os.getpid() and pid == helper.process.pid
    np.testing.assert_array_equal(value, np.arange(3))
    with pytest.raises(RuntimeError, match='one call'):
        helper.call(helper_work, 1)
    helper.close()  # given its call: nothing to stop


def test_helper_without_a_call_is_stopped():
    with Helper(['fractions']) as helper:
        process = helper.process
        assert process.poll() is None
    assert process.poll() is not None
    # Also when its call cannot be sent: the call runs here.
    helper = Helper()
    assert helper.call(lambda n: (os.getpid(), n), 4).result() == (os.getpid(), 4)
    assert helper.process.wait(timeout=60) is not None


def test_helper_that_cannot_import_its_modules_leaves_the_call_here(caplog):
    helper = Helper(['psfdeconv_no_such_module'])
    with caplog.at_level(logging.DEBUG, logger='psfdeconv._offload'):
        assert helper.call(helper_work, 2).result()[0] == os.getpid()
    assert any('psfdeconv_no_such_module' in record.getMessage()
               for record in caplog.records)


# --- run_exposure_set ----------------------------------------------------------------


def _detection_by(detector, monkeypatch):
    """Decide who takes the detection claim: 'helper' (the run defers to it) or
    'run' (the claim is taken as soon as it exists, before the helper starts)."""
    claim = pipeline._DetectionClaim
    if detector == 'helper':
        monkeypatch.setattr(claim, 'take', lambda self, **kwargs: False)
    elif detector == 'run':
        original, original_take = claim.__init__, claim.take

        def taken(self, path):
            original(self, path)
            assert original_take(self)  # the helper then finds it taken

        monkeypatch.setattr(claim, '__init__', taken)
        monkeypatch.setattr(claim, 'take', lambda self, **kwargs: True)


def test_the_detection_claim_goes_to_one_taker(tmp_path):
    """Of the run and its helper exactly one detects the sources: the first to
    take the claim; where it cannot be written the helper detects and the run
    waits for it."""
    path = tmp_path / 'detection'
    first, second = pipeline._DetectionClaim(path), pipeline._DetectionClaim(path)
    assert first.take() is True
    assert second.take() is False and second.take(unwritable=True) is False
    unwritable = pipeline._DetectionClaim(tmp_path / 'missing' / 'detection')
    assert unwritable.take() is False
    assert unwritable.take(unwritable=True) is True


@pytest.mark.parametrize(('psfs', 'catalogue', 'detector'), [
    ('epsf', False, 'helper'),
    ('epsf', False, 'run'),
    # The detection uses the known PSF's FWHM, as the run's does (the run's early
    # detection, made before the PSF is known, is made again).
    ('moffat:fwhm=0.8arcsec,beta=3', False, 'helper'),
    ('moffat:fwhm=0.8arcsec,beta=3', False, 'run'),
    # Positions given: the helper builds the PSFs only.
    ('epsf', True, None),
])
def test_psfs_in_a_helper_give_the_same_outputs(psfs, catalogue, detector, simulated_field,
                                                tiny_model, tmp_path, monkeypatch, caplog):
    exposures, truth = simulated_field
    started = []
    original = HelperCall._start

    def counting(self, helper, function, args, kwargs):
        started.append((function.__name__, kwargs.get('detect')))
        original(self, helper, function, args, kwargs)

    positions = None
    if catalogue:
        galaxies = truth[truth['kind'] == 'galaxy']
        positions = np.column_stack([galaxies['x'].value, galaxies['y'].value])[:5]
    monkeypatch.setattr(HelperCall, '_start', counting)
    here, _ = run_exposure_set(exposures, tmp_path / 'here', positions, psfs=psfs,
                               model=tiny_model, symmetries=1, psf_process=False)
    assert started == []
    detections = []
    original_positions = pipeline._positions

    def counting_positions(*args, **kwargs):
        detections.append(args[0] is None)
        return original_positions(*args, **kwargs)

    monkeypatch.setattr(pipeline, '_positions', counting_positions)
    _detection_by(detector, monkeypatch)
    with caplog.at_level(logging.DEBUG, logger='psfdeconv.pipeline'):
        helped, _ = run_exposure_set(exposures, tmp_path / 'helped', positions, psfs=psfs,
                                     model=tiny_model, symmetries=1, psf_process=True)
    assert started == [('_psfs_and_detections', not catalogue)]
    # The log says when the run's own part of the set-up ended, whether it
    # detected the sources meanwhile, and how long the helper kept it waiting.
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith('aligned and segmented the bands in ') for m in messages)
    early = any(m.startswith('detected the sources beside the helper in ') for m in messages)
    assert early == (detector == 'run')
    came_back = "the helper's PSFs and detections" if detector == 'helper' else \
        "the helper's PSFs"
    assert any(m.startswith(came_back + ' came back ') for m in messages)
    # Detections in this process: none where the helper detects; one where the
    # run does, and another once the Moffat PSF's FWHM is known.
    expected = {'helper': [], None: [False], 'run': [True]}[detector]
    if detector == 'run' and psfs.startswith('moffat'):
        expected = [True, True]
    assert detections == expected
    assert len(here) == len(helped) > 0
    assert here.meta['psf_source'] == helped.meta['psf_source']
    assert here.meta['positions'] == helped.meta['positions']
    for name in here.colnames:
        a, b = np.asarray(here[name]), np.asarray(helped[name])
        if a.dtype.kind == 'f':
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert np.array_equal(a, b), name
    written = read_catalog(tmp_path / 'helped' / 'catalog.fits')
    assert len(written) == len(helped)


def _helper_part(exposures, **kwargs):
    """The helper's `_psfs_and_detections` for ePSFs, with detection."""
    return pipeline._psfs_and_detections(
        exposures, 'epsf', None, no_wcs_scale=None, reference_band=None,
        detect_options=None, pixel_scale=None, detect=True, **kwargs)


def test_the_helpers_psfs_and_detection_share_the_background_meshes(simulated_field,
                                                                    background_meshes):
    """The helper's ePSFs and its detection start from the same first background mesh of
    the reference band: computed once per band, as in the run's own process."""
    exposures, _ = simulated_field
    models, detected = _helper_part(exposures)
    assert set(models) == set(exposures)
    assert detected[0].size > 0
    assert len(background_meshes) == len(exposures)


def test_the_helper_reads_the_meshes_the_run_wrote(simulated_field, background_meshes,
                                                   tmp_path):
    """The run subtracts the backgrounds (writing each band's first mesh to the
    scratch directory); the helper's ePSFs and detection then compute none
    of their own, and come out as computed alone."""
    from psfdeconv.background import shared_estimates, subtract_background

    exposures, _ = simulated_field
    alone = _helper_part(exposures)
    matched = pipeline._matched_bands(exposures, next(iter(exposures)), None)[0]
    with shared_estimates(tmp_path):
        for exposure in matched.values():
            subtract_background(exposure)
    assert len(list(tmp_path.glob('background-*.npy'))) == len(exposures)
    computed = len(background_meshes)
    models, detected = _helper_part(exposures, shared=str(tmp_path))
    assert len(background_meshes) == computed
    for band in exposures:
        np.testing.assert_array_equal(models[band].data, alone[0][band].data)
    for got, expected in zip(detected, alone[1], strict=True):
        assert np.array_equal(got, expected)


def test_a_detection_error_in_the_helper_is_the_runs(simulated_field, tiny_model, tmp_path):
    """Nothing detected (threshold far above the field): the helper's detection
    raises the error the run's own would, after the PSFs."""
    exposures, _ = simulated_field
    for setting, out in ((False, 'here'), (True, 'helped')):
        with pytest.raises(InvalidInputError, match='no galaxies were detected'):
            run_exposure_set(exposures, tmp_path / out, psfs='epsf', model=tiny_model,
                             detect_options={'threshold_sigma': 1e6}, psf_process=setting)
        assert not (tmp_path / out / 'catalog.fits').exists()


@pytest.mark.parametrize('setting', ['yes', 1, None])
def test_psf_process_must_be_auto_or_a_bool(setting, simulated_field, tiny_model, tmp_path):
    exposures, _ = simulated_field
    with pytest.raises(InvalidInputError, match='psf_process'):
        run_exposure_set(exposures, tmp_path / 'out', psfs='epsf', model=tiny_model,
                         psf_process=setting)
    assert not (tmp_path / 'out').exists()


def large_band(n=1536):
    return NDData(np.zeros((n, n), dtype=np.float32))


def test_auto_uses_a_helper_for_large_epsf_bands_with_cpus_to_spare(monkeypatch):
    wanted = pipeline._psf_process_wanted
    bands = {'g': large_band(), 'r': large_band()}
    monkeypatch.setattr(pipeline, 'cpu_share', lambda: 2)
    assert wanted('auto', bands, 'epsf')
    assert wanted('auto', bands, None)
    # PSFs not built from the stars, or too few pixels of them: not worth a helper.
    assert not wanted('auto', bands, 'moffat:fwhm=0.8arcsec,beta=3')
    assert not wanted('auto', bands, {'g': 'epsf', 'r': 'psf=r.fits'})
    assert not wanted('auto', {'g': large_band(512)}, 'epsf')
    assert not wanted('auto', {'g': NDData(np.zeros((2048, 2048)), psf=np.ones((5, 5)))},
                      None)
    # Forced either way.
    assert wanted(True, {'g': large_band(512)}, 'moffat:fwhm=0.8arcsec,beta=3')
    assert not wanted(False, bands, 'epsf')
    # One CPU (a batch worker's share): the helper would only compete.
    monkeypatch.setattr(pipeline, 'cpu_share', lambda: 1)
    assert not wanted('auto', bands, 'epsf')


def test_helper_starts_before_the_bands_are_read_wherever_it_may_be_wanted(monkeypatch):
    # Started on what is known before reading (the setting, the PSFs asked
    # for, the CPUs): wherever _psf_process_wanted can say yes once the bands
    # are read, a helper is already running.
    import contextlib

    started = []
    monkeypatch.setattr(pipeline, 'Helper', lambda modules: started.append(modules) or
                        contextlib.nullcontext('helper'))
    monkeypatch.setattr(pipeline, 'cpu_share', lambda: 2)
    bands = {'g': large_band(), 'r': large_band()}

    def early(setting, psfs):
        with pipeline._early_helper(setting, bands, psfs) as helper:
            return helper == 'helper'

    for setting, psfs in [('auto', 'epsf'), ('auto', None), ('auto', {'g': 'epsf', 'r': 'x'}),
                          (True, 'moffat:fwhm=0.8arcsec,beta=3')]:
        assert early(setting, psfs), (setting, psfs)
    for setting, psfs in [('auto', 'moffat:fwhm=0.8arcsec,beta=3'), (False, 'epsf'),
                          (True, {'g': 'epsf'})]:
        assert not early(setting, psfs), (setting, psfs)
        assert not pipeline._psf_process_wanted(setting, bands, psfs) or \
            hasattr(psfs, 'items')
    assert started and all('photutils.psf' in modules for modules in started)
    monkeypatch.setattr(pipeline, 'cpu_share', lambda: 1)
    assert not early('auto', 'epsf')


def test_helper_not_wanted_after_reading_is_stopped(simulated_field, tiny_model, tmp_path,
                                                    monkeypatch):
    # A field too small for a helper: the one started before reading is stopped.
    exposures, _ = simulated_field
    helpers = []

    class Recorded(Helper):
        def __init__(self, modules=()):
            super().__init__(modules)
            helpers.append(self)

    monkeypatch.setattr(pipeline, 'Helper', Recorded)
    monkeypatch.setattr(pipeline, 'cpu_share', lambda: 2)
    assert not pipeline._psf_process_wanted('auto', exposures, 'epsf')
    catalog, _ = run_exposure_set(exposures, tmp_path / 'out', psfs='epsf', model=tiny_model,
                                  symmetries=1)
    assert len(catalog) > 0
    [helper] = helpers
    assert helper.process.poll() is not None


def test_cpu_share_follows_omp_num_threads(monkeypatch):
    from psfdeconv._cpus import cpu_share, usable_cpus

    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert cpu_share() == 1
    monkeypatch.setenv('OMP_NUM_THREADS', 'many')
    assert cpu_share() == usable_cpus()
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert cpu_share() == usable_cpus()


def test_threaded_work_follows_the_cpu_share(monkeypatch):
    # A batch worker process's share of the CPUs (OMP_NUM_THREADS) bounds the
    # threads of its FFTs and of its per-image work, not the machine's CPU count
    # (scipy's workers=-1): 2 workers on 2 CPUs must not run 4 threads.
    import scipy.fft

    from psfdeconv import _fourier
    from psfdeconv._cpus import thread_count

    used = []
    for name in ('rfft', 'fft', 'ifft', 'irfft'):
        original = getattr(scipy.fft, name)

        def recording(*args, _original=original, workers=None, **kwargs):
            used.append(workers)
            return _original(*args, workers=workers, **kwargs)

        monkeypatch.setattr(scipy.fft, name, recording)
    images = np.ones((4, 20, 20), dtype=np.float32)
    kernel = np.ones((5, 5), dtype=np.float32) / 25
    for share in ('1', '3'):
        monkeypatch.setenv('OMP_NUM_THREADS', share)
        used.clear()
        shape = _fourier.padded_shape(images.shape[1:], kernel.shape)
        product = _fourier.image_fft(images, shape) * _fourier.kernel_fft(kernel, shape)
        out = _fourier.inverse_fft(product, shape, images.shape[1:])
        assert len(used) == 6
        assert set(used) == {int(share)}
        # A flat image stays flat away from its edges.
        np.testing.assert_allclose(out[:, 8:12, 8:12], 1, rtol=1e-5)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert thread_count(10_000, 1) == 1


@pytest.mark.parametrize(('option', 'value'), [('on', True), ('off', False),
                                               ('auto', 'auto')])
def test_cli_psf_process(option, value, monkeypatch, tmp_path):
    from psfdeconv import cli

    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise InvalidInputError('stop here')

    monkeypatch.setattr(pipeline, 'run_exposure_set', fake_run)
    code = cli.main(['run', '--example', '--out', str(tmp_path / 'out'),
                     '--psf-process', option])
    assert code != 0
    assert seen['psf_process'] == value


def test_psfs_naming_other_bands_are_refused_before_the_helper_starts(
        simulated_field, tiny_model, tmp_path, monkeypatch):
    exposures, _ = simulated_field
    for cls, name in ((HelperCall, '_start'), (Helper, '__init__')):
        monkeypatch.setattr(cls, name, lambda *args, **kwargs: pytest.fail(
            'the helper started'))
    with pytest.raises(InvalidInputError, match='give one PSF per band'):
        run_exposure_set(exposures, tmp_path / 'out', psfs={'g': 'epsf'}, model=tiny_model,
                         psf_process=True)


def test_an_error_beside_the_helper_stops_it(simulated_field, tiny_model, tmp_path,
                                             monkeypatch):
    exposures, _ = simulated_field
    calls = []
    original = HelperCall._start

    def keeping(self, *args):
        calls.append(self)
        original(self, *args)

    def failing(*args, **kwargs):
        raise InvalidInputError('the alignment failed')

    monkeypatch.setattr(HelperCall, '_start', keeping)
    monkeypatch.setattr(pipeline, '_segmented_bands', failing)
    with pytest.raises(InvalidInputError, match='the alignment failed'):
        run_exposure_set(exposures, tmp_path / 'out', psfs='epsf', model=tiny_model,
                         psf_process=True)
    [call] = calls
    assert call._cancelled
    call._thread.join(timeout=60)
    assert call._process is None or call._process.poll() is not None


# --- overlapped steps ------------------------------------------------------------------------

def _record_steps(overlap, fail=None):
    """`overlapped` over 5 items, recording the calls and the compute's threads."""
    import threading

    from psfdeconv._cpus import overlapped

    calls, threads = [], set()

    def prepare(item):
        calls.append(('prepare', item))
        if fail == ('prepare', item):
            raise ValueError(f'prepare {item}')
        return item * 10

    def compute(prepared):
        threads.add(threading.current_thread().name)
        if fail == ('compute', prepared):
            raise RuntimeError(f'compute {prepared}')
        return prepared + 1

    def finish(prepared, computed):
        calls.append(('finish', prepared))
        return (prepared, computed)

    results = overlapped(list(range(5)), prepare, compute, finish, overlap=overlap)
    return results, calls, threads


def test_overlapped_computes_beside_the_next_prepare():
    import threading

    results, calls, threads = _record_steps(overlap=True)
    assert results == [(10 * k, 10 * k + 1) for k in range(5)]
    assert threading.current_thread().name not in threads and len(threads) == 1
    # Item k + 1 is prepared before item k is finished (its compute runs meanwhile).
    assert calls.index(('prepare', 1)) < calls.index(('finish', 0))
    serial, serial_calls, serial_threads = _record_steps(overlap=False)
    assert serial == results
    assert serial_threads == {threading.current_thread().name}
    assert serial_calls == [(name, item) for k in range(5)
                            for name, item in (('prepare', k), ('finish', 10 * k))]


@pytest.mark.parametrize('fail', [('compute', 20), ('prepare', 3)])
def test_overlapped_raises_the_first_error(fail):
    error = RuntimeError if fail[0] == 'compute' else ValueError
    with pytest.raises(error, match=f'{fail[0]} {fail[1]}'):
        _record_steps(overlap=True, fail=fail)


def test_overlapped_interrupt_does_not_start_the_queued_compute():
    """An interrupt while this thread waits for a compute cancels the one
    queued behind it (Ctrl-C does not wait for another network step)."""
    import signal
    import threading

    from psfdeconv._cpus import overlapped

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    started, release = [], threading.Event()

    def compute(item):
        started.append(item)
        if item == 0:
            release.wait(10)
        return item

    def send_interrupt():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        # Compute 0 ends after the interrupt has reached this thread.
        threading.Timer(0.3, release.set).start()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        # Sent while this thread waits for compute 0, with compute 1 queued.
        threading.Timer(0.5, send_interrupt).start()
        with pytest.raises(Interrupted):
            overlapped([0, 1, 2], lambda item: item, compute, lambda prepared, computed: computed)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    assert started == [0]
