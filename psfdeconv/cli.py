# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The ``psfdeconv`` command line.

Subcommands: ``simulate`` (GalSim training/test stamps), ``train`` (fit
and calibrate a network), ``evaluate`` (metrics and baselines on
simulations), ``deconvolve`` (deconvolve stamps, e.g. the bundled example),
``info`` (versions and models), ``run`` (exposures to a deconvolved,
measured catalog), ``simulate-exposure`` (multi-band exposures with
known truth) and ``batch`` (many exposure groups on dask).

Exit codes: 0 success, 1 other failure (an I/O error writing an output,
Keras or its backend not installed, or an internal error: one line, the
traceback with ``-v``), 2 usage error, 3 bad input data, 4 model file problem, 5 output
exists without ``--overwrite``, 6 partial batch failure, 128 + N killed by
signal N (SIGTERM: 143, after removing temporary files).
"""

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .exceptions import PSFDeconvError

__all__ = ['main']

log = logging.getLogger('psfdeconv')

EXAMPLE_STAMPS = Path(__file__).parent / 'data' / 'example_stamps.h5'


def _plural(count, noun):
    """'1 band', '3 bands'."""
    return f'{count} {noun}' + ('' if count == 1 else 's')


def _progress_wanted(args, stream=None):
    """Whether to draw progress bars on ``stream`` (default standard error).

    Never with ``--quiet``, and never when the stream is not a terminal (a
    pipe, a file, a batch system's log), where a bar's redraws would only
    fill the log.
    """
    if args.quiet:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # None, or a closed/replaced stream
        return False


def _cmd_simulate(args):
    from ._validation import check_output_location
    from .io import check_writable
    from .simulate import SimulationConfig, write_simulation

    # Refuse before simulating rather than after.
    check_output_location(args.out, '--out')
    check_writable(args.out, overwrite=args.overwrite)
    config = (SimulationConfig.from_json(args.config) if args.config
              else SimulationConfig())
    path = write_simulation(args.out, args.n, config=config, seed=args.seed,
                            n_workers=args.workers, overwrite=args.overwrite,
                            progress=_progress_wanted(args))
    log.info('wrote %d objects (seed %d) to %s', args.n, args.seed, path)
    return 0


def _cmd_train(args):
    _require_network(args)
    from ._validation import check_output_location
    from .calibrate import calibrate_model
    from .model import save_model
    from .train import TrainConfig, train_model

    values = json.loads(Path(args.config).read_text()) if args.config else {}
    for key in ('epochs', 'batch_size', 'seed', 'max_minutes',
                'validation_fraction', 'max_train_objects', 'dtype_policy',
                'patience'):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.kinds:
        values['kinds'] = args.kinds.split(',')
    config = TrainConfig.from_dict(values)
    out = Path(args.out)
    check_output_location(out, '--out', directory=True)
    model_path = out / f'{args.name}.keras'
    if model_path.exists() and not args.overwrite:
        from .exceptions import OutputExistsError
        raise OutputExistsError(f'{model_path} exists; pass --overwrite to '
                                f'replace it.')

    keras_model, card = train_model(args.sims, out, config=config,
                                    resume=args.resume,
                                    # Keras draws its bar on standard output.
                                    verbose=0 if args.quiet else
                                    1 if _progress_wanted(args, sys.stdout)
                                    else 2)
    card['name'] = args.name
    # The corrections, the detection threshold and the card's metrics come
    # from the validation objects, which the weights never trained on.
    card = calibrate_model(keras_model, card, args.sims)
    card = save_model(keras_model, model_path, card,
                      overwrite=args.overwrite)
    log.info('wrote %s (weights SHA-256 %s)', model_path,
             card['weights_sha256'])
    if args.plots:
        from .plotting import write_training_plots

        for path in write_training_plots(out, card, overwrite=args.overwrite):
            log.info('wrote %s', path)
    print(json.dumps(card['metrics'], indent=2))
    return 0


def _cmd_evaluate(args):
    _require_network(args)
    from .evaluate import evaluate_simulation

    if args.plots and not args.report:
        from .exceptions import ConfigError

        raise ConfigError('--plots writes the figures into the report '
                          'directory: give --report DIR too.')
    if args.report:
        from ._validation import check_output_location

        check_output_location(args.report, '--report', directory=True)
    results = evaluate_simulation(
        args.sims, model=_load(args.model) if args.model else None, n_objects=args.n,
        baselines=args.baselines.split(',') if args.baselines else (),
        report_dir=args.report, overwrite=args.overwrite, precision=args.precision)
    print(results['summary_text'])
    if args.plots:
        from .plotting import write_evaluation_plots

        for path in write_evaluation_plots(args.report, results,
                                           overwrite=args.overwrite):
            log.info('wrote %s', path)
    return 0


def _cmd_calibrate(args):
    _require_network(args)
    from .calibrate import recalibrate_model

    card = recalibrate_model(args.model, args.sims, out=args.out,
                             symmetries=args.symmetries, overwrite=args.overwrite)
    log.info('wrote %s (card SHA-256 %s)', Path(args.out).with_suffix('.json'),
             card['card_sha256'])
    print(json.dumps(card['metrics'], indent=2))
    return 0


def _cmd_calibrate_shear(args):
    _require_network(args)
    from .calibrate import calibrate_shear

    card = calibrate_shear(args.model, n_galaxies=args.galaxies, seed=args.seed,
                           test_galaxies=args.test_galaxies, test_seed=args.test_seed,
                           shear=args.shear, out=args.out, tables=args.tables,
                           overwrite=args.overwrite, log=log.info)
    out = Path(args.out or args.model).with_suffix('.json')
    log.info('wrote %s (card SHA-256 %s)', out, card['card_sha256'])
    validation = card['shear_response']['validation']
    print(json.dumps({key: validation[key] for key in
                      ('m1', 'm1_err', 'm2', 'm2_err', 'c1', 'c1_err', 'c2', 'c2_err',
                       'alpha', 'alpha_err', 'n_galaxies', 'seed')}, indent=2))
    return 0


def _keras_backend():
    """The Keras backend ``KERAS_BACKEND`` names (default tensorflow): its
    name, the distribution ``importlib.metadata`` knows it by, and whether
    Keras and it can be imported (found without importing them, which takes
    seconds)."""
    import importlib.util
    import os

    def importable(module):
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # 'a.b' without 'a'; a spec-less module
            return False

    name = os.environ.get('KERAS_BACKEND', '').strip() or 'tensorflow'
    return name, importable('keras') and importable(name)


def _backend_version(name):
    """'tensorflow 2.16.1' (tensorflow or tensorflow-cpu), or 'tensorflow
    (not installed)'."""
    import importlib.metadata

    for distribution in (name, f'{name}-cpu', f'{name}-gpu', f'{name}lib'):
        try:
            return f'{name} {importlib.metadata.version(distribution)}'
        except importlib.metadata.PackageNotFoundError:
            pass
    return f'{name} (not installed)'


def _require_network(args):
    """Refuse, before any work, a command that runs the network where Keras
    or its backend is not installed (``pip install psfdeconv`` without the
    ``cpu`` or ``gpu`` extra)."""
    from .exceptions import MissingDependencyError

    name, found = _keras_backend()
    if not found:
        raise MissingDependencyError(
            f'KERAS_BACKEND = {name!r}; keras or {name} is not installed, and '
            f'psfdeconv {args.command} runs the network; install them with pip '
            f"install 'psfdeconv[cpu]' (or 'psfdeconv[gpu]' for a GPU).")


def _load(path, n_bands=None, verify=True):
    from .model import load_model

    # A verified network is loaded where it first runs: from OpenVINO's
    # cached conversion, where there is one, without starting TensorFlow.
    return load_model(path, n_bands=n_bands, verify=verify,
                      network='lazy' if verify else True)


def _add_symmetries_argument(parser):
    # deconvolve.SYMMETRY_COUNTS, not imported: building the parser stays fast.
    parser.add_argument('--symmetries', type=int, choices=(1, 2, 4, 8),
                        help='average the network over this many flips and turns of '
                             'each stamp (default: the model card\'s, 8 for the shipped '
                             'models; 1 runs the network once per stamp, fastest)')


def _add_precision_argument(parser, default='auto'):
    # inference.PRECISIONS, not imported: building the parser stays fast.
    parser.add_argument('--precision', choices=('auto', 'float32', 'bfloat16'),
                        default=default,
                        help=f'arithmetic of the network (default: {default}); auto is '
                             f'bfloat16 where the CPU has it (AVX512-BF16 or AMX), faster, '
                             f'else float32; float32 is what the model card was calibrated '
                             f'in, the same on every CPU; the catalogue meta records what '
                             f'ran')


def _add_target_fwhm_argument(parser):
    parser.add_argument('--target-fwhm', type=_positive_float, metavar='ARCSEC',
                        help='deconvolve to a round Gaussian PSF of this FWHM in arcsec '
                             '(e.g. 0.3) instead of to the pixel grid: small galaxies keep '
                             'a measurable size; fluxes are unchanged')


def _add_trust_model_argument(parser):
    parser.add_argument('--trust-model', action='store_true',
                        help='use a model without a card, or whose card lacks the '
                             'checksums of its weights, configuration and card, '
                             'unverified (recorded in the catalogue meta as '
                             'model.verified = false)')


def _add_exposure_set_options(parser, *, first_band, psf_for='every band'):
    """The options ``run`` and ``batch`` share: the PSF, the model, the
    reference band, the network batch and the symmetries."""
    parser.add_argument('--psf', action='append', metavar='[BAND=]SPEC',
                        help=f"PSF of {psf_for}: 'epsf' (from the stars, default), "
                             f"'epsf:grid=NYxNX', 'moffat:fwhm=0.8arcsec,beta=3' or "
                             f"'psf=FILE'; with a band prefix (--psf r=psf=FILE "
                             f"--psf g=epsf, repeatable) the PSF of that band, and a "
                             f"bare SPEC the one of the other bands")
    parser.add_argument('--model', help='model .keras file (default: shipped)')
    _add_trust_model_argument(parser)
    parser.add_argument('--reference-band', metavar='NAME',
                        help=f'band whose pixel grid the stamps are cut on (default: '
                             f'{first_band})')
    parser.add_argument('--batch-size', type=_positive_int, default=128, metavar='N',
                        help='objects per network call')
    _add_symmetries_argument(parser)
    _add_precision_argument(parser)
    group = parser.add_argument_group('real exposures')
    group.add_argument('--unit', action='append', metavar='BAND=UNIT',
                       help='data unit of a band whose header has no BUNIT (e.g. '
                            'r=adu, r=electron/s, r=nanomaggy); repeatable')
    group.add_argument('--pixel-scale', type=_positive_float, metavar='ARCSEC',
                       help='arcsec per pixel, for exposures without a celestial '
                            'WCS (give --catalog with x/y pixel columns, or detect); '
                            'with a WCS it must agree with it within 1 %%')
    group = parser.add_argument_group('PSF stars and detection')
    group.add_argument('--min-stars', type=_positive_int, metavar='N',
                       help='fewest usable stars an ePSF is built from (default 5)')
    group.add_argument('--star-threshold-sigma', type=_positive_float, metavar='SIGMA',
                       help='peak signal-to-noise above which a source may be an ePSF '
                            'star (default 10)')
    group.add_argument('--box-size', type=_positive_int, metavar='PIXELS',
                       help='side of the box an ePSF star must have to itself (no '
                            'neighbour, no masked pixel; default: the ePSF size)')
    group.add_argument('--threshold-sigma', type=_positive_float, metavar='SIGMA',
                       help='galaxy detection threshold in background rms (default '
                            '3 per pixel, 5 connected pixels)')


def _positive_float(text):
    """argparse type: a positive finite number."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive finite number')
    return value


def _positive_int(text):
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number >= 1')
    return value


def _band_values(items, option, bands):
    """{band: value} from the repeated ``BAND=VALUE`` items of ``option``."""
    from .exceptions import ConfigError

    values = {}
    for item in items or ():
        band, sep, value = item.partition('=')
        band, value = band.strip(), value.strip()
        if not sep or not band or not value:
            raise ConfigError(f'{option} {item!r}: write BAND=VALUE, e.g. {option} '
                              f'r=...')
        if band not in bands:
            raise ConfigError(f'{option} {item!r}: {band!r} is not one of the bands '
                              f'{list(bands)}; prefix the value with a band name.')
        if band in values:
            raise ConfigError(f'{option} {band}=... is given twice; give each band '
                              f'once.')
        values[band] = value
    return values


def _psf_specs(items, bands):
    """The PSF of each band from the ``--psf`` items: ``BAND=SPEC`` (a band
    prefix only if it names one of ``bands``: ``psf=FILE`` contains '=' too)
    or a bare SPEC for the bands without their own. Returns one spec (str)
    when no band has its own, else a dict band -> spec."""
    from .exceptions import ConfigError

    default, own = None, {}
    for item in items or ():
        prefix, sep, rest = item.partition('=')
        if sep and prefix.strip() in bands:
            band = prefix.strip()
            if band in own:
                raise ConfigError(f'--psf {band}=... is given twice; give each '
                                  f'band once.')
            if not rest.strip():
                raise ConfigError(f'--psf {item!r}: give the PSF after {band}=, e.g. '
                                  f'--psf {band}=moffat:fwhm=0.8arcsec,beta=3.')
            own[band] = rest.strip()
        else:
            default = item.strip()  # the last one, as for any repeated option
    default = default or 'epsf'
    if not own:
        return default
    return {band: own.get(band, default) for band in bands}


def _epsf_options(args):
    """``epsf_options`` and ``detect_options`` of the pipeline from the
    command line (None where no option is given)."""
    epsf = {key: value for key, value in (
        ('min_stars', args.min_stars), ('threshold_sigma', args.star_threshold_sigma),
        ('box_size', args.box_size)) if value is not None}
    detect = ({'threshold_sigma': args.threshold_sigma}
              if args.threshold_sigma is not None else {})
    return epsf or None, detect or None


def _check_unit(band, text, option='--unit'):
    from ._units import unit_text

    return unit_text(text, f'{option} {band}={text!r}')


def _pixel_scale_keyword(pixel_scale):
    """``pixel_scale=`` for `run_exposure_set` (empty without --pixel-scale)."""
    return {} if pixel_scale is None else {'pixel_scale': pixel_scale}


def _cmd_deconvolve(args):
    _require_network(args)
    from ._validation import check_output_location
    from .deconvolve import deconvolve_stamps
    from .io import check_writable
    from .simulate import read_simulation

    source = EXAMPLE_STAMPS if args.example else args.stamps
    if args.out:
        check_output_location(args.out, '--out')
        check_writable(args.out, overwrite=args.overwrite)
    sims = read_simulation(source)
    model = _load(args.model, n_bands=sims['observed'].shape[1],
                  verify=not args.trust_model)
    images, details = deconvolve_stamps(
        sims['observed'], sims['psf'], pixel_scale=sims['pixel_scale'],
        model=model, return_details=True, strict=args.strict,
        symmetries=args.symmetries, target_psf=args.target_fwhm,
        precision=args.precision)
    n = len(images)
    print(f'deconvolved {n} stamps of {_plural(images.shape[1], "band")} with '
          f'{Path(model.path).name} (weights SHA-256 {model.sha256[:12]})')
    if 'truth' in sims:
        _print_truth_comparison(sims, images)
    if args.out:
        _write_deconvolved(args.out, images, details, sims,
                           overwrite=args.overwrite)
        print(f'wrote {args.out}')
    return 0


def _print_truth_comparison(sims, images):
    """RMS shape, size and flux errors of the input and the output."""
    import numpy as np

    from .measure import hsm_moments

    source = ~sims['is_blank']
    scale = sims['pixel_scale'][source, None]
    truth = hsm_moments(sims['truth'][source], pixel_scale=scale)
    true_flux = sims['truth'][source].sum(axis=(-2, -1))
    print(f'{int(source.sum())} galaxies, RMS of (measured - truth) over '
          f'bands, HSM adaptive moments:')
    print(f'{"":12s} {"e1":>7s} {"e2":>7s} {"size %":>7s} {"flux %":>7s}')
    for name, data in (('observed', sims['observed'][source]),
                       ('deconvolved', images[source])):
        measured = hsm_moments(data, pixel_scale=scale)
        ok = (measured['hsm_status'] == 0) & (truth['hsm_status'] == 0)
        values = [measured[k][ok] - truth[k][ok] for k in ('hsm_e1',
                                                           'hsm_e2')]
        values.append(100 * (measured['hsm_sigma'][ok] /
                             truth['hsm_sigma'][ok] - 1))
        values.append(100 * (data.sum(axis=(-2, -1)) / true_flux - 1)[ok])
        print(f'{name:12s} ' + ' '.join(
            f'{np.sqrt(np.mean(v ** 2)):7.3f}' for v in values))


def _write_deconvolved(path, images, details, sims, *, overwrite):
    from astropy.io import fits
    from astropy.table import Table

    from .io import atomic_path

    table = Table()
    n_bands = images.shape[1]
    for key in ('flux', 'flux_err', 'flux_corrected', 'flux_residual', 'flux_residual_err',
                'amplitude'):
        for b in range(n_bands):
            table[f'{key}_{b}'] = details[key][:, b]
    table['pixel_scale'] = sims['pixel_scale']
    hdul = fits.HDUList([fits.PrimaryHDU(),
                         fits.ImageHDU(images, name='DECONVOLVED'),
                         fits.BinTableHDU(table, name='FLUXES')])
    with atomic_path(path, overwrite=overwrite) as tmp:
        hdul.writeto(tmp, overwrite=True)


#: Distributions whose versions ``psfdeconv info`` reports (when installed).
_INFO_PACKAGES = ('numpy', 'scipy', 'astropy', 'photutils', 'galsim', 'scikit-image',
                 'h5py', 'keras', 'tensorflow', 'tensorflow-cpu', 'matplotlib', 'dask',
                 'distributed')


def _versions():
    import importlib.metadata
    import platform

    from . import __version__

    versions = {'psfdeconv': __version__, 'python': platform.python_version(),
                'keras backend': _backend_version(_keras_backend()[0])}
    for name in _INFO_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _precision_text():
    """What ``precision='auto'`` runs here and the runtimes available."""
    from .inference import available_runtimes, cpu_has_bfloat16, resolve_precision

    precision, runtime = resolve_precision('auto')
    return (f'auto = {precision} ({runtime}); CPU bfloat16: '
            f'{"yes" if cpu_has_bfloat16() else "no"}; runtimes: '
            f'{", ".join(available_runtimes())}')


def _model_info(path):
    """What ``psfdeconv info`` reports of one model file (a JSON-able dict).

    ``check`` is 'verified' (the SHA-256 of the weights, of the Keras
    configuration and of the card itself all match what the card records, as
    `~psfdeconv.model.load_model` checks them), 'MISMATCH' (one does not:
    ``checksums`` says which), 'unsigned' (the card records not all three),
    'no card' (no NAME.json beside the file) or 'error' (the file is missing
    or corrupt, or the card unreadable: ``error`` says why).
    """
    from .exceptions import ModelFileError
    from .model import (
        card_sha256,
        check_model_file,
        config_sha256,
        file_sha256,
        training_ranges,
        weights_sha256,
    )

    path = Path(path)
    card_path = path.with_suffix('.json')
    info = {'name': path.stem, 'path': str(path),
            'card': str(card_path) if card_path.exists() else None,
            'check': None, 'error': None, 'weights_sha256': None, 'file_sha256': None}
    card = {}
    try:
        if card_path.exists():
            log.debug('reading the model card %s', card_path)
            try:
                card = json.loads(card_path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelFileError(f'model card {card_path} is not valid JSON '
                                     f'({exc}); download or retrain the model.') from None
        log.debug('checking the model file %s', path)
        check_model_file(path, {})  # exists, zip, CRCs, Keras members
        info['weights_sha256'] = weights_sha256(path)
        info['file_sha256'] = file_sha256(path)
        actual = {'weights_sha256': info['weights_sha256'],
                  'config_sha256': config_sha256(path),
                  'card_sha256': card_sha256(card) if card else None}
        info['checksums'] = {key: {'actual': value, 'card': card.get(key)}
                             for key, value in actual.items()}
    except ModelFileError as exc:
        info['check'], info['error'] = 'error', str(exc)
    info['name'] = card.get('name', info['name'])
    for key in ('n_bands', 'input_kinds', 'stamp_size', 'pixel_scale_range',
                'psf_fwhm_range_arcsec', 'detection', 'symmetries', 'psf_leakage',
                'size_bias'):
        info[key] = card.get(key)
    training = card.get('training') or {}
    # The ranges the deconvolution's training-range check reads.
    info['pixel_scale_range'], info['psf_fwhm_range_arcsec'] = training_ranges(card)
    info['training'] = {key: training[key] for key in (
        'epochs_run', 'best_epoch', 'n_train_stamps', 'n_train', 'elapsed_seconds',
        'keras_backend', 'compute_device', 'keras_version') if key in training}
    info['metrics'] = card.get('metrics')
    info['card_weights_sha256'] = card.get('weights_sha256')
    if info['check'] is None:
        checksums = info['checksums'].values()
        info['check'] = ('no card' if not card else
                         'MISMATCH' if any(c['card'] and c['card'] != c['actual']
                                           for c in checksums) else
                         'unsigned' if not all(c['card'] for c in checksums) else
                         'verified')
    return info


def _range_text(values, unit):
    if not values:
        return 'not recorded in the card'
    low, high = values
    return f'{low:g} to {high:g} {unit} (training range)'


def _training_text(training):
    if not training:
        return 'not recorded in the card'
    parts = []
    if 'epochs_run' in training:
        epochs = training['epochs_run']
        text = f'{epochs} epoch{"" if epochs == 1 else "s"}'
        if 'best_epoch' in training:
            text += f' (best {training["best_epoch"]})'
        parts.append(text)
    stamps = training.get('n_train_stamps', training.get('n_train'))
    if stamps is not None:
        parts.append(f'{stamps} training stamps')
    if training.get('elapsed_seconds') is not None:
        parts.append(f'{training["elapsed_seconds"] / 60:.0f} min')
    text = ', '.join(parts)
    if training.get('keras_backend'):
        text += f'; keras backend {training["keras_backend"]}'
        if training.get('compute_device'):
            text += f' on {training["compute_device"]}'
    elif training.get('compute_device'):
        text += f'; on {training["compute_device"]}'
    return text


def _metric_lines(metrics):
    """The card's headline metrics (deconvolved - truth on the validation
    objects) as short aligned lines."""
    def value(key, field):
        entry = metrics.get(key)
        return entry.get(field) if isinstance(entry, dict) else None

    lines = []
    for key, label in (('e1', 'e1'), ('e2', 'e2')):
        rms = value(key, 'rms')
        if rms is not None:
            lines.append(f'    {label:<13s}RMS {rms:6.3f}')
    for key, label in (('size_percent', 'size'), ('flux_percent', 'flux')):
        mean, rms = value(key, 'mean'), value(key, 'rms')
        if mean is not None and rms is not None:
            lines.append(f'    {label:<13s}RMS {rms:6.1f} %   mean {mean:+6.1f} %')
    return lines


def _print_model_info(info):
    label = '  {:<17s}'.format
    print(f'model {info["name"]} ({info["path"]})')
    if info['error']:
        print(label('check') + f'ERROR: {info["error"]}')
    if info['card'] is None:
        print(label('card') + f'none ({Path(info["path"]).with_suffix(".json").name} '
              f'not found beside the model): nothing to check it against')
    else:
        if info['n_bands'] is not None:
            kinds = ', '.join(info['input_kinds'] or ())
            print(label('bands') + f'{info["n_bands"]} (inputs {kinds} per band; '
                  f'{info["stamp_size"]}x{info["stamp_size"]}-pixel stamps)')
        print(label('pixel scale') + _range_text(info['pixel_scale_range'],
                                                 'arcsec/pixel'))
        print(label('PSF FWHM') + _range_text(info['psf_fwhm_range_arcsec'], 'arcsec'))
        print(label('training') + _training_text(info['training']))
        print(label('symmetries') + (
            f'output averaged over {info["symmetries"]} symmetries of the square'
            if (info.get('symmetries') or 1) > 1 else 'none (one network call per stamp)'))
        leakage = info.get('psf_leakage')
        print(label('PSF leakage') + (
            f'counter-shear alpha = {leakage["alpha"]:.3f} (validation leakage '
            f'{leakage["measured_leakage"]:.3f} -> {leakage["residual_leakage"]:.3f})'
            if leakage else 'no correction'))
        size_bias = info.get('size_bias')
        print(label('size bias') + (
            'dilation c0 + c1 L + c2 L^2, L = log10 SNR: '
            + ', '.join(f'{c:.4f}' for c in size_bias['coefficients'])
            if size_bias else 'no correction'))
        detection = info.get('detection')
        print(label('detection') + (
            f'images set to 0 below SNR {detection["snr_threshold"]:.2f} (validation: '
            f'{100 * detection["blank_recall"]:.1f} % of blanks, '
            f'{100 * detection["sources_below"]:.2f} % of sources below)'
            if detection else 'no threshold (every stamp is deconvolved)'))
        metrics = info['metrics']
        if metrics:
            count = (f'{metrics["n_objects"]} validation objects, '
                     if 'n_objects' in metrics else '')
            print(label('metrics') + f'({count}deconvolved - truth)')
            for line in _metric_lines(metrics):
                print(line)
    if info.get('weights_sha256'):
        for key, name in (('weights_sha256', 'weights'), ('config_sha256', 'config'),
                          ('card_sha256', 'card')):
            checksum = info['checksums'][key]
            if checksum['actual'] is None:
                continue  # no card to hash
            text = f'{checksum["actual"]} '
            if not info['card']:
                text += '(no card)'
            elif not checksum['card']:
                text += '(NOT verified: the card does not record it)'
            elif checksum['card'] == checksum['actual']:
                text += '(verified)'
            else:
                text += f'MISMATCH (NOT verified): the card records {checksum["card"]}'
            print(label(f'{name} SHA-256') + text)
        print(label('file SHA-256') + info['file_sha256'])


def _cmd_info(args):
    from .exceptions import ModelFileError
    from .model import default_model_path

    versions = _versions()
    paths = [Path(args.model)] if args.model else sorted(
        default_model_path().parent.glob('*.keras'))
    models = [_model_info(path) for path in paths]
    from .inference import network_cache_dir

    cache = network_cache_dir()
    if args.json:
        print(json.dumps({'versions': versions, 'precision': _precision_text(),
                          'network_cache': None if cache is None else str(cache),
                          'models': models}, indent=2))
    else:
        print(f'psfdeconv {versions["psfdeconv"]}')
        width = max(len(name) for name in versions)
        for name, version in versions.items():
            if name != 'psfdeconv':
                print(f'  {name:<{width}s}  {version}')
        print(f'  {"precision":<{width}s}  {_precision_text()}')
        # Where OpenVINO's conversions of the models are kept (PSFDECONV_CACHE_DIR).
        print(f"  {'network cache':<{width}s}  {cache or 'off'}")
        for info in models:
            print()
            _print_model_info(info)
    errors = [info['error'] for info in models if info['error']]
    if errors:
        # Exit status 4, as for any command given a broken model file.
        raise ModelFileError('; '.join(errors))
    return 0


def _cmd_run(args):
    """Deconvolve the galaxies of one set of multi-band exposures."""
    _require_network(args)
    import numpy as np

    from ._validation import check_output_location, is_band_name
    from .batch import read_group_exposures
    from .exceptions import ConfigError
    from .flags import FLAG_NEIGHBOURS, n_flagged
    from .io import example_exposures
    from .pipeline import run_exposure_set

    real = (args.weight, args.variance, args.mask, args.unit, args.pixel_scale)
    # Refuse an --out that can never be written before reading anything.
    check_output_location(args.out, '--out', directory=True)
    if args.example:
        if args.band or args.catalog or any(value is not None for value in real):
            raise ConfigError('--example runs on the bundled exposures; give '
                              'either --example or --band/--catalog (with '
                              '--weight, --variance, --mask, --unit, --pixel-scale).')
        exposures, truth_path = example_exposures()
    elif not args.band:
        raise ConfigError('give the exposures with --band NAME=FILE (one per '
                          'band), or --example for the bundled ones.')
    else:
        files = {}
        for item in args.band:
            band, sep, path = item.partition('=')
            band, path = band.strip(), path.strip()
            if not sep or not band or not path:
                raise ConfigError(f'--band {item!r}: write NAME=FILE, e.g. --band '
                                  f'r=r.fits or r=r.fits[1] (one --band per band, in '
                                  f'the order the model was trained on).')
            if not is_band_name(band):
                raise ConfigError(f'--band {item!r}: the band name {band!r} is not an '
                                  f'ASCII identifier; band names become column names '
                                  f'(flux_{{band}}) and FITS header values, so use '
                                  f'ASCII letters, digits and underscores, e.g. '
                                  f'--band g=g.fits.')
            if band in files:
                raise ConfigError(f'--band {band} is given twice; give each band '
                                  f'once.')
            files[band] = path
        weights = _band_values(args.weight, '--weight', files)
        variances = _band_values(args.variance, '--variance', files)
        both = [band for band in weights if band in variances]
        if both:
            raise ConfigError(f'--weight and --variance both given for band(s) '
                              f'{both}; give one of them per band (they describe '
                              f'the same noise).')
        masks = _band_values(args.mask, '--mask', files)
        units = {band: _check_unit(band, text) for band, text in
                 _band_values(args.unit, '--unit', files).items()}
        reads = {band: {'weight_hdu': weights.get(band),
                        'variance_hdu': variances.get(band),
                        'mask_hdu': masks.get(band), 'unit': units.get(band)}
                 for band in files}
        exposures = read_group_exposures(files, reads, pixel_scale=args.pixel_scale)
    psfs = _psf_specs(args.psf, list(exposures))
    epsf_options, detect_options = _epsf_options(args)
    catalog, paths = run_exposure_set(
        exposures, args.out, args.catalog, psfs, model=args.model,
        trust_model=args.trust_model,
        reference_band=args.reference_band, batch_size=args.batch_size,
        overwrite=args.overwrite, strict=args.strict,
        neighbours='keep' if args.keep_neighbours else 'replace',
        symmetries=args.symmetries, target_fwhm=args.target_fwhm,
        precision=args.precision, epsf_options=epsf_options, detect_options=detect_options,
        plots=args.plots, progress=_progress_wanted(args),
        psf_process={'on': True, 'off': False}.get(args.psf_process, 'auto'),
        **_pixel_scale_keyword(args.pixel_scale))
    n_rows_flagged = n_flagged(catalog['flags'])
    n_neighbours = int(((np.asarray(catalog['flags']) & FLAG_NEIGHBOURS) != 0).sum())
    model = catalog.meta['model']
    n_bands = len(exposures)
    n_usable = int(np.sum(np.asarray(catalog['usable'], dtype=bool)))
    print(f'deconvolved {len(catalog)} sources in {_plural(n_bands, "band")} '
          f'({n_usable} usable; {n_rows_flagged} flagged; neighbours replaced in '
          f'{n_neighbours}) with '
          f'{Path(str(model["path"])).name} (weights SHA-256 '
          f'{str(model["weights_sha256"])[:12]}); wrote {paths["catalog"]}, '
          f'{paths["stamps"]} and {_plural(n_bands, "PSF file")}')
    if args.example:
        _print_exposure_truth_comparison(catalog, truth_path)
    return 0


def _cmd_batch(args):
    _require_network(args)
    from ._validation import check_output_location
    from .batch import SUMMARY_NAME, read_manifest, run_batch

    check_output_location(args.out, '--out', directory=True)
    manifest = read_manifest(args.manifest)
    bands = list(manifest.meta['bands'])
    units = {band: _check_unit(band, text) for band, text in
             _band_values(args.unit, '--unit', bands).items()}
    epsf_options, detect_options = _epsf_options(args)
    summary = run_batch(manifest, args.out, psfs=_psf_specs(args.psf, bands),
                        model=args.model, trust_model=args.trust_model,
                        scheduler=args.scheduler,
                        workers=args.workers, resume=args.resume,
                        overwrite=args.overwrite, reference_band=args.reference_band,
                        batch_size=args.batch_size, symmetries=args.symmetries,
                        precision=args.precision,
                        units=units, epsf_options=epsf_options,
                        detect_options=detect_options, pixel_scale=args.pixel_scale,
                        progress=_progress_wanted(args))
    counts = summary.meta['counts']
    print(f'{len(summary)} groups: {counts["ok"]} done, {counts["skipped"]} '
          f'finished earlier, {counts["failed"]} failed; '
          f'{int(summary["n_sources"][summary["n_sources"] > 0].sum())} sources; '
          f'wrote {Path(args.out) / SUMMARY_NAME}')
    return 0


def _print_exposure_truth_comparison(catalog, truth_path):
    """Accuracy of a catalogue of the bundled example against its truth."""
    from astropy.table import QTable

    from .evaluate import exposure_accuracy

    accuracy = exposure_accuracy(catalog, QTable.read(truth_path))
    position = accuracy['position_arcsec']
    print(f'against the truth ({truth_path.name}): {accuracy["n_matched"]} of '
          f'{accuracy["n_truth"]} galaxies matched ({accuracy["n_unflagged"]} '
          f'unflagged), median position error {position["median"]:.3f} arcsec')
    for band in catalog.meta['bands']:
        entry = accuracy[band]
        flux, e1, e2 = entry['flux'], entry['hsm_e1'], entry['hsm_e2']
        if flux['n']:
            print(f'  {band}: median |flux_corrected/true - 1| {flux["median_abs"]:.3f} '
                  f'(SNR > 20, {flux["n"]} galaxies); HSM e1, e2 RMS error '
                  f'{e1["rms"]:.3f}, {e2["rms"]:.3f}')


def _cmd_simulate_exposure(args):
    """Simulate a multi-band exposure set with its truth."""
    from ._validation import check_output_location
    from .exceptions import ConfigError
    from .io import check_writable
    from .simulate import simulate_exposure, write_exposure_set

    bands = tuple(band.strip() for band in args.bands.split(','))
    # Refuse before simulating rather than after.
    check_output_location(args.out, '--out', directory=True)
    for name in (*(f'{band}.fits' for band in bands), 'truth.ecsv'):
        check_writable(Path(args.out) / name, overwrite=args.overwrite)
    seeing = None
    if args.seeing:
        try:
            if '=' in args.seeing:
                seeing = {}
                for item in args.seeing.split(','):
                    band, _, value = item.partition('=')
                    seeing[band.strip()] = float(value)
            else:
                seeing = float(args.seeing)
        except ValueError:
            raise ConfigError(f'--seeing {args.seeing!r}: give one FWHM in arcsec '
                              f'(0.8) or one per band (g=0.9,r=0.8,i=0.75).') from None
    exposures, truth = simulate_exposure(
        (args.size, args.size), bands=bands, n_galaxies=args.n_galaxies,
        n_stars=args.n_stars, pixel_scale=args.pixel_scale, seeing_fwhm=seeing,
        sky_sigma=args.sky_sigma, seed=args.seed,
        wcs_offsets=not args.no_wcs_offsets)
    paths = write_exposure_set(args.out, exposures, truth, overwrite=args.overwrite)
    log.info('wrote %d galaxies and %d stars (seed %d) to %s', args.n_galaxies,
             args.n_stars, args.seed, ', '.join(str(path) for path in paths.values()))
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        prog='psfdeconv',
        description='Deconvolve the PSF from multi-band galaxy stamps with a '
                    'convolutional autoencoder\n(arXiv:2310.19605).',
        epilog='examples:\n'
               '  psfdeconv run --example --out example_run\n'
               '  psfdeconv run --band g=g.fits --band r=r.fits --band i=i.fits '
               '--out my_run --plots\n'
               '  psfdeconv deconvolve --example\n'
               '  psfdeconv info\n'
               '  psfdeconv simulate --n 20000 --seed 1 --out train.h5\n'
               '  psfdeconv train train.h5 --out run/ --epochs 20\n'
               '  psfdeconv evaluate test.h5 --model run/model.keras '
               '--report report/\n\n'
               '"psfdeconv COMMAND --help" shows the options and examples of a '
               'command;\n'
               '-v/--verbose and -q/--quiet go before or after COMMAND.',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_output_options(parser)
    sub = parser.add_subparsers(dest='command', required=True,
                                metavar='COMMAND')
    _add_simulate_parser(sub)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_calibrate_parser(sub)
    _add_calibrate_shear_parser(sub)
    _add_deconvolve_parser(sub)
    _add_info_parser(sub)
    _add_run_parser(sub)
    _add_simulate_exposure_parser(sub)
    _add_batch_parser(sub)
    return parser


def _add_simulate_parser(sub):
    """The ``simulate`` subcommand."""
    p = _add_command(
        sub, 'simulate', help='simulate training/test stamps',
        description='Simulate GalSim multi-band stamps to an HDF5 file (config and '
                    'seed stored in it).',
        examples=('psfdeconv simulate --n 64000 --seed 1 --out train.h5',
                  'psfdeconv simulate --n 3000 --seed 2 --out test.h5 --workers 2',
                  'psfdeconv simulate --n 20000 --seed 3 --config my_ranges.json '
                  '--out my_survey.h5'),
        notes='my_ranges.json holds SimulationConfig values, e.g.\n'
              '  {"pixel_scale_range": [0.2, 0.27], "psf_fwhm_range": [0.6, 1.2]}')
    p.add_argument('--n', type=int, required=True, help='number of objects')
    p.add_argument('--seed', type=int, default=0, help='seed of the run')
    p.add_argument('--config', help='JSON file of SimulationConfig values')
    p.add_argument('--workers', type=int, default=None,
                   help='worker processes (default: the CPUs this process may use)')
    p.add_argument('--out', required=True, help='output .h5 file')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_simulate)


def _add_train_parser(sub):
    """The ``train`` subcommand."""
    p = _add_command(
        sub, 'train', help='train and calibrate a model',
        description='Train the network on a simulation file; writes OUT/NAME.keras '
                    'and its card OUT/NAME.json, checkpoints each epoch.',
        examples=('psfdeconv train train.h5 --out run/ --name my_model --epochs 30 '
                  '--max-minutes 120',
                  'psfdeconv train train.h5 --out run/ --name my_model --resume',
                  'psfdeconv train train.h5 --out run/ --name my_model '
                  '--config train.json --plots'),
        notes='--resume continues an interrupted run from OUT/checkpoint.keras; '
              'train.json holds\nTrainConfig values, e.g. {"filters": [32, 64, 128], '
              '"patience": 5}.')
    p.add_argument('sims', help='simulation .h5 file')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--name', default='model', help='model file name stem')
    p.add_argument('--config', help='JSON file of TrainConfig values')
    p.add_argument('--epochs', type=int)
    p.add_argument('--batch-size', type=int)
    p.add_argument('--seed', type=int)
    p.add_argument('--kinds', help='comma-separated subset of psf,ipsf,ipsf1')
    p.add_argument('--max-minutes', type=float,
                   help='stop (after checkpointing) after this many minutes')
    p.add_argument('--validation-fraction', type=float)
    p.add_argument('--max-train-objects', type=int)
    p.add_argument('--patience', type=int)
    p.add_argument('--dtype-policy', choices=('float32', 'mixed_bfloat16'))
    p.add_argument('--resume', action='store_true',
                   help='continue from OUT/checkpoint.keras')
    p.add_argument('--plots', action='store_true',
                   help='also write OUT/training_history.png')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_train)


def _add_evaluate_parser(sub):
    """The ``evaluate`` subcommand."""
    p = _add_command(
        sub, 'evaluate', help='metrics and baselines on simulations',
        description='Evaluate a model and classical baselines on simulated stamps '
                    'with known truth.',
        examples=('psfdeconv evaluate test.h5 --report report/',
                  'psfdeconv evaluate test.h5 --model run/my_model.keras '
                  '--report report/ --plots',
                  'psfdeconv evaluate test.h5 --n 500 --baselines observed,wiener'))
    p.add_argument('sims', help='simulation .h5 file (not used in training)')
    p.add_argument('--model', help='model .keras file (default: shipped)')
    p.add_argument('--n', type=int, help='use the first N objects')
    p.add_argument('--baselines', default='observed,wiener,richardson_lucy',
                   help='comma-separated baselines (empty for none)')
    p.add_argument('--report', help='directory for the report tables')
    p.add_argument('--plots', action='store_true',
                   help='also write the flux, ellipticity-correlation and '
                        'confusion-matrix PNGs into the --report directory')
    # float32 by default: the metrics compare with the card's, fitted in float32.
    _add_precision_argument(p, default='float32')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_evaluate)


def _add_calibrate_parser(sub):
    """The ``calibrate`` subcommand."""
    p = _add_command(
        sub, 'calibrate', help="refit a trained model's card",
        description="Refit a trained model's calibrations and metrics on the validation "
                    'objects of its training run, without training; the weights are '
                    'copied unchanged and the new card is signed.',
        examples=('psfdeconv calibrate run/my_model.keras train.h5 --symmetries 1 '
                  '--out one_pass/my_model.keras',
                  'psfdeconv calibrate run/my_model.keras train.h5 --out run/my_model.keras '
                  '--overwrite'),
        notes='sims is the file the model was trained on (the card\'s training '
              'configuration\ngives the validation split); a card without a size-bias '
              'correction stays without.')
    p.add_argument('model', help='model .keras file with its card')
    p.add_argument('sims', help='the simulation .h5 file it was trained on')
    p.add_argument('--symmetries', type=int, choices=(1, 2, 4, 8),
                   help='symmetries to average the network over (default: the card\'s)')
    p.add_argument('--out', required=True, help='output .keras file (card beside it)')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_calibrate)


def _add_calibrate_shear_parser(sub):
    """The ``calibrate-shear`` subcommand."""
    p = _add_command(
        sub, 'calibrate-shear', help="fit a model card's shear response on a ring test",
        description='Run a ring test (90-degree galaxy pairs sheared by +-g in both '
                    'components, anisotropic PSFs) through deconvolve_stamps, fit the '
                    'response of the deconvolved shapes per SNR and size on one seed, '
                    'measure the calibrated m, c and PSF leakage on another, and store '
                    'both in the card (signed; the weights are not touched).',
        examples=('psfdeconv calibrate-shear run/my_model.keras --out run/shear/my_model.keras',
                  'psfdeconv calibrate-shear run/my_model.keras --galaxies 1000 --seed 1 '
                  '--test-galaxies 2000 --test-seed 2 --tables ring/'),
        notes='Each galaxy gives 8 stamps; 1000 galaxies take ~5 minutes on 2 CPU cores '
              'with 4 symmetries.\n--tables keeps the per-chunk tables and reuses them.')
    p.add_argument('model', help='model .keras file with its card')
    p.add_argument('--galaxies', type=int, default=1000, help='galaxies of the fit')
    p.add_argument('--seed', type=int, default=1, help='seed of the fit')
    p.add_argument('--test-galaxies', type=int, default=1000,
                   help='galaxies of the held-out validation')
    p.add_argument('--test-seed', type=int, default=2, help='seed of the validation')
    p.add_argument('--shear', type=float, default=0.02, help='input shear g')
    p.add_argument('--tables', help='directory for the ring-test tables')
    p.add_argument('--out', help='output .keras file (default: rewrite the model\'s card)')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_calibrate_shear)


def _add_deconvolve_parser(sub):
    """The ``deconvolve`` subcommand."""
    p = _add_command(
        sub, 'deconvolve', help='deconvolve stamps',
        description='Deconvolve the stamps of a simulation file (or the bundled '
                    'example) and print shape metrics when the truth is known.',
        examples=('psfdeconv deconvolve --example',
                  'psfdeconv deconvolve --stamps test.h5 --out deconvolved.fits',
                  'psfdeconv deconvolve --stamps test.h5 --model run/my_model.keras '
                  '--strict'))
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument('--example', action='store_true',
                       help='the bundled example stamps')
    group.add_argument('--stamps', help='simulation .h5 file')
    p.add_argument('--model', help='model .keras file (default: shipped)')
    _add_trust_model_argument(p)
    p.add_argument('--out', help='write the images and fluxes to this FITS')
    p.add_argument('--strict', action='store_true',
                   help='refuse (exit 3) stamps whose pixel scale or PSF the model '
                        'was not trained on, instead of warning')
    _add_symmetries_argument(p)
    _add_precision_argument(p)
    _add_target_fwhm_argument(p)
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_deconvolve)


def _add_info_parser(sub):
    """The ``info`` subcommand."""
    p = _add_command(
        sub, 'info', help='versions, models and their checks',
        description='Print the versions of psfdeconv and its dependencies and, for '
                    'each shipped model (or --model), its bands, training ranges, '
                    'training summary, headline metrics and whether its weights '
                    'match the SHA-256 of its card. Exit status 4 if a model file '
                    'is missing or corrupt.',
        examples=('psfdeconv info',
                  'psfdeconv info --model run/my_model.keras',
                  'psfdeconv info --json > psfdeconv_info.json'))
    p.add_argument('--model', help='a model .keras file to describe (its card '
                                   'NAME.json beside it)')
    p.add_argument('--json', action='store_true',
                   help='print one JSON document (versions and models) instead')
    p.set_defaults(func=_cmd_info)


def _add_run_parser(sub):
    """The ``run`` subcommand."""
    p = _add_command(
        sub, 'run', help='deconvolve the galaxies of multi-band exposures',
        description='Detect (or read) the galaxies of one set of multi-band '
                    'exposures, build the PSF of each band, deconvolve them and '
                    'write OUT/catalog.fits (one row per source, with units and '
                    'sky_centroid), OUT/stamps.fits (the deconvolved stamps with '
                    'their WCS) and OUT/psf_<band>.fits.',
        examples=('psfdeconv run --example --out example_run --plots',
                  'psfdeconv run --band g=g.fits --band r=r.fits --band i=i.fits '
                  '--out run1/',
                  'psfdeconv run --band r=decam-r-N6.fits[1] --weight '
                  'r=decam-r-N6-weight.fits[1] --psf moffat:fwhm=1.05arcsec,beta=3 '
                  '--out n6/',
                  'psfdeconv run --band r=kids-r.fits --unit r=adu --pixel-scale 0.2 '
                  '--psf moffat:fwhm=0.7arcsec,beta=3 --out kids/'))
    p.add_argument('--example', action='store_true',
                   help='run on the bundled example exposures (g, r, i) and '
                        'compare with their truth')
    p.add_argument('--band', action='append', metavar='NAME=FILE',
                   help='a band and its FITS exposure (with a celestial WCS, or '
                        'see --pixel-scale), FILE[1], FILE[SCI] or FILE[SCI,2] for '
                        'an HDU; repeat, in the order the model was trained on')
    p.add_argument('--weight', action='append', metavar='BAND=FILE',
                   help='inverse-variance image of a band (FILE[HDU] as for --band; '
                        'weight <= 0 is masked); repeatable')
    p.add_argument('--variance', action='append', metavar='BAND=FILE',
                   help='variance image of a band (variance <= 0 is masked); '
                        'instead of --weight')
    p.add_argument('--mask', action='append', metavar='BAND=FILE',
                   help='bad-pixel image of a band (non-zero = bad); repeatable')
    group = p.add_mutually_exclusive_group()
    group.add_argument('--catalog', metavar='FILE',
                       help='table of sources (ECSV/FITS/CSV) with a SkyCoord '
                            'column, ra/dec (degrees, or sexagesimal strings with ra in '
                            'hours) or x/y (pixels of the reference band) columns')
    group.add_argument('--detect', action='store_true',
                       help='detect the galaxies on the reference band (the '
                            'default without --catalog)')
    _add_exposure_set_options(p, first_band='the first --band')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--plots', action='store_true',
                   help='also write OUT/catalog_overview.png and OUT/stamps.png')
    p.add_argument('--strict', action='store_true',
                   help='refuse (exit 3) exposures whose pixel scale or PSF the model '
                        'was not trained on, instead of warning and flagging them')
    p.add_argument('--keep-neighbours', action='store_true',
                   help='deconvolve the stamps as cut; by default the pixels of other '
                        'sources in a stamp are replaced, from the source\'s other side '
                        'or by noise (flag NEIGHBOURS), '
                        'so that their light does not enter the flux and shape')
    _add_target_fwhm_argument(p)
    p.add_argument('--psf-process', choices=('auto', 'on', 'off'), default='auto',
                   help='build the PSFs in a helper process while the bands are '
                        'background-subtracted, aligned and segmented, the sources '
                        'then detected by whichever is free first (same outputs); auto '
                        '(default): for ePSFs from at least 4 million pixels where two '
                        'CPUs are free')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_run)


def _add_simulate_exposure_parser(sub):
    """The ``simulate-exposure`` subcommand."""
    p = _add_command(
        sub, 'simulate-exposure', help='simulate a multi-band exposure set',
        description='Simulate GalSim exposures of galaxies and stars with a TAN '
                    'WCS per band; writes OUT/<band>.fits and OUT/truth.ecsv.',
        examples=('psfdeconv simulate-exposure --out field/ --seed 3',
                  'psfdeconv simulate-exposure --out big_field/ --seed 4 --size 1024 '
                  '--n-galaxies 300 --n-stars 80',
                  'psfdeconv simulate-exposure --out field_r/ --bands r --seeing 0.7 '
                  '--pixel-scale 0.2'),
        notes='then: psfdeconv run --band g=field/g.fits --band r=field/r.fits '
              '--band i=field/i.fits --out field_run/')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--seed', type=int, default=0, help='seed of the run')
    p.add_argument('--size', type=int, default=512, help='image side in pixels')
    p.add_argument('--bands', default='g,r,i', help='comma-separated band names')
    p.add_argument('--n-galaxies', type=int, default=60)
    p.add_argument('--n-stars', type=int, default=40)
    p.add_argument('--pixel-scale', type=float, default=0.2,
                   help='arcsec per pixel')
    p.add_argument('--seeing', help='Moffat FWHM in arcsec, one value or per band '
                                    '(g=0.9,r=0.8,i=0.75, the default)')
    p.add_argument('--sky-sigma', type=float, default=1.0,
                   help='sky noise standard deviation per pixel (0: none)')
    p.add_argument('--no-wcs-offsets', action='store_true',
                   help='give every band the same pixel grid')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cmd_simulate_exposure)


def _add_batch_parser(sub):
    """The ``batch`` subcommand."""
    p = _add_command(
        sub, 'batch', help='deconvolve many exposure groups (a manifest) on dask',
        description='Run "psfdeconv run" on every exposure group of a manifest (CSV '
                    'or ECSV: id, one column per band with the FITS paths, FILE[HDU] '
                    'allowed, optional catalog and per band psf_<band>, '
                    'weight_<band>, variance_<band>, mask_<band> and unit_<band>), '
                    'one dask task per group, into OUT/<id>/, '
                    'and write OUT/summary.fits (status, counts, time and error per '
                    'group). A failed group does not stop the others (exit code 6 at '
                    'the end); a killed batch continues with --resume.',
        examples=('psfdeconv batch groups.csv --out night1/',
                  'psfdeconv batch groups.csv --out night1/ --scheduler processes '
                  '--workers 2',
                  'psfdeconv batch groups.csv --out night1/ --scheduler '
                  'tcp://10.0.0.5:8786',
                  'psfdeconv batch groups.csv --out night1/ --resume'),
        notes='manifest (groups.csv):\n'
              '  id,g,r,i,catalog\n'
              '  f001,f001/g.fits,f001/r.fits,f001/i.fits,\n'
              '  f002,f002/g.fits,f002/r.fits,f002/i.fits,f002/sources.ecsv\n'
              'DECam CCDs with weight maps (n6.csv):\n'
              '  id,r,weight_r\n'
              '  N6,decam-r-N6.fits[1],decam-r-N6-weight.fits[1]')
    p.add_argument('manifest', help='CSV or ECSV table of exposure groups (relative '
                                    'paths are relative to its directory)')
    p.add_argument('--out', required=True,
                   help='output directory: OUT/<id>/ per group and OUT/summary.fits')
    p.add_argument('--scheduler', default=None,
                   help="'processes' (default with more than one worker: one group "
                        "per process, TensorFlow threads = CPUs / workers), "
                        "'threads' (default with one worker), 'synchronous' or the "
                        "address of a dask.distributed scheduler (tcp://host:8786; "
                        "pip install 'psfdeconv[dask]')")
    p.add_argument('--workers', type=int,
                   help='threads or processes of a local scheduler (default: one '
                        'per CPU this process may use, at most one per group)')
    _add_exposure_set_options(p, first_band='the first band column',
                              psf_for='the bands without a psf_<band> value')
    group = p.add_mutually_exclusive_group()
    group.add_argument('--resume', action='store_true',
                       help='keep the groups finished by an earlier run into OUT '
                            '(OUT/<id>/done.json) and run the others')
    group.add_argument('--overwrite', action='store_true',
                       help='redo every group, replacing an earlier run in OUT')
    p.set_defaults(func=_cmd_batch)


def _add_output_options(parser, subcommand=False):
    """``-v``/``-q``, on the main parser and (so that they may also follow the
    command) on each subcommand, where they leave the main parser's value
    alone unless given."""
    default = argparse.SUPPRESS if subcommand else False
    group = parser.add_argument_group('output')
    group.add_argument('-v', '--verbose', action='store_true', default=default,
                       help="log psfdeconv's debugging messages (other libraries "
                            "stay at warnings)")
    group.add_argument('-q', '--quiet', action='store_true', default=default,
                       help='only warnings and errors, no progress bars')


def _add_command(sub, name, *, help, description, examples, notes=None):
    """A subcommand parser with an ``examples:`` epilog and ``-v``/``-q``."""
    epilog = 'examples:\n' + ''.join(f'  {line}\n' for line in examples)
    if notes:
        epilog += '\n' + notes
    import textwrap

    parser = sub.add_parser(name, help=help,
                            description=textwrap.fill(description, 79),
                            epilog=epilog.rstrip('\n'),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_output_options(parser, subcommand=True)
    return parser


def main(argv=None):
    """Run the command line; returns the exit code."""
    from .inference import use_default_network_cache

    args = _parser().parse_args(argv)
    restore_logging = _configure_logging(verbose=args.verbose, quiet=args.quiet)
    # Each command is a new process: OpenVINO's conversions kept on disk spare
    # it TensorFlow's start (PSFDECONV_CACHE_DIR, where set, decides).
    use_default_network_cache()
    # SIGTERM unwinds like Ctrl-C, so temporary files are removed.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except PSFDeconvError as exc:
        print(f'psfdeconv {args.command}: error: {exc}', file=sys.stderr)
        return exc.exit_code or 1
    except BrokenPipeError:
        # The reader went away (`psfdeconv info | head`): not an error of
        # ours. Point stdout at devnull so the interpreter's final flush
        # does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # Disk full, permissions, ...: the system's message, no traceback.
        print(f'psfdeconv {args.command}: error: {exc}', file=sys.stderr)
        return 1
    except Exception as exc:
        # A bug of ours or of a library: one line, the traceback only with -v.
        log.debug('traceback of the internal error:', exc_info=True)
        print(f'psfdeconv {args.command}: internal error: {type(exc).__name__}: {exc} '
              f'(run with -v for the traceback)', file=sys.stderr)
        return 1
    finally:
        restore_logging()


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes
    (tests and notebooks replace it)."""

    def __init__(self):
        super().__init__(stream=None)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(*, verbose=False, quiet=False):
    """Send the 'psfdeconv' logger to standard error at the level of the flags.

    Only the 'psfdeconv' logger is configured: DEBUG with ``verbose``, WARNING
    with ``quiet``, INFO otherwise. The root logger, and with it the loggers
    of TensorFlow, JAX, absl, astropy, ..., is left alone (WARNING unless the
    caller set it), so ``-v`` does not flood the output with other libraries'
    debugging lines. The 'psfdeconv' records do not propagate to the root
    logger either, so no message is printed twice. Returns a function that
    puts the logger back as it was (``main`` calls it on the way out).
    """
    logger = logging.getLogger('psfdeconv')
    saved = logger.level, logger.propagate, list(logger.handlers)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(
        '%(levelname)s %(name)s: %(message)s' if verbose else
        '%(levelname)s: %(message)s'))
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG if verbose else
                    logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    def restore():
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]

    return restore


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == '__main__':
    sys.exit(main())
