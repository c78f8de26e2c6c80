# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The deconvolution network, its model card, and safe loading.

The architecture is the convolutional autoencoder of the paper (section
III.2, Fig. 1): three encoder levels of Conv2D -> LeakyReLU -> 2x2
max-pooling -> batch normalisation with 64, 128 and 256 filters, a mirror
decoder of transposed convolutions with 2x2 upsampling, and a softplus
convolution giving one output channel per band. Only standard Keras layers
are used, so a saved ``.keras`` file loads with ``safe_mode=True`` on any
Keras backend.

A model ships as two files: ``<name>.keras`` and ``<name>.json``, the
model card (architecture, input kinds, bands, stamp size, training data
and seed, metrics, the flux-bias correction and SHA-256 checksums). Keras
reports corrupt files as "file not found", so `load_model` checks the
file itself (existence, zip structure, member sizes, checksums,
architecture) before Keras sees it and raises
`~psfdeconv.exceptions.ModelFileError` with the real reason.

Three SHA-256 digests in the card cover everything that decides the
output: ``weights_sha256`` (the weights member), ``config_sha256`` (the
Keras ``config.json`` member: layers and activation slopes) and
``card_sha256`` (the card itself, every key but this one, as canonical
JSON; `card_sha256`). A model without a card, or a card without the three,
is refused unless trusted (``verify=False``, ``--trust-model``).

Keras and TensorFlow are imported only when a model is built or loaded.
"""

import hashlib
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from ._validation import exception_text
from .exceptions import BandCountError, ConfigError, ModelFileError
from .io.files import file_sha256

__all__ = ['build_cae', 'build_network', 'ARCHITECTURES',
           'DeconvolutionModel', 'load_model', 'save_model',
           'default_model_path', 'weights_sha256', 'file_sha256',
           'MODEL_CARD_VERSION', 'make_card', 'calibrated_card', 'training_ranges',
           'check_card_version', 'card_sha256', 'config_sha256', 'sign_card',
           'check_card_values', 'MAX_MEMBER_BYTES', 'MAX_COMPRESSION_RATIO']

#: Version of the model card's layout, written by `save_model` and checked
#: by `load_model` (a card of a later version is refused).
MODEL_CARD_VERSION = 1
DEFAULT_MODEL_NAME = 'unet_psf_ipsf_ipsf1'
#: The shipped model for each number of bands (``psfdeconv/data/``).
DEFAULT_MODELS = {3: DEFAULT_MODEL_NAME, 1: 'unet1_psf_ipsf_ipsf1'}
_WEIGHTS_MEMBER = 'model.weights.h5'
_CONFIG_MEMBER = 'config.json'
#: Card keys holding the model's checksums, all required unless trusted.
_HASH_KEYS = ('weights_sha256', 'config_sha256', 'card_sha256')
#: Largest uncompressed archive member accepted (bytes), checked before
#: anything is inflated: a zip bomb is refused, not decompressed.
MAX_MEMBER_BYTES = 200 * 2 ** 20
#: Largest uncompressed/compressed ratio of a member above 1 MiB.
MAX_COMPRESSION_RATIO = 50
#: One Keras load of a ``network='lazy'`` model at a time, also when threads
#: ask for it at once.
_NETWORK_LOCK = threading.Lock()


def _keras():
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import keras

    return keras


def build_cae(input_shape=(64, 64, 9), *, n_outputs=3,
              filters=(64, 128, 256), kernel_size=3, negative_slope=0.2,
              skip_connections=False):
    """Build the paper's convolutional autoencoder (uncompiled).

    Parameters
    ----------
    input_shape : tuple of int, optional
        ``(ny, nx, n_channels)``; ny and nx must be divisible by
        ``2 ** len(filters)``.
    n_outputs : int, optional
        Output channels (bands).
    filters : tuple of int, optional
        Filters per encoder level (the decoder mirrors them).
    kernel_size : int, optional
        Convolution kernel size (3x3 in psfdeconv; stripped in the paper).
    negative_slope : float, optional
        LeakyReLU slope for negative inputs.
    skip_connections : bool, optional
        Concatenate each encoder level's activations to the decoder level
        of the same size (a U-Net; ``architecture='unet'``). The paper's
        CAE has none: everything passes through the 8x8 bottleneck.

    Returns
    -------
    `keras.Model`

    Examples
    --------
    >>> from psfdeconv.model import build_cae
    >>> model = build_cae((64, 64, 9))  # doctest: +IGNORE_OUTPUT
    >>> model.count_params()
    1338499
    """
    keras = _keras()
    layers = keras.layers
    ny, nx = input_shape[:2]
    factor = 2 ** len(filters)
    if ny % factor or nx % factor:
        raise ConfigError(f'stamp shape {(ny, nx)} must be divisible by '
                          f'{factor} for {len(filters)} pooling levels.')
    inputs = keras.Input(shape=tuple(input_shape), name='cube')
    x = inputs
    skips = []
    for level, f in enumerate(filters):
        x = layers.Conv2D(f, kernel_size, padding='same',
                          name=f'encoder{level}_conv')(x)
        x = layers.LeakyReLU(negative_slope=negative_slope,
                             name=f'encoder{level}_act')(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, padding='same',
                                name=f'encoder{level}_pool')(x)
        x = layers.BatchNormalization(name=f'encoder{level}_bn')(x)
    for level, f in enumerate(reversed(filters)):
        x = layers.Conv2DTranspose(f, kernel_size, padding='same',
                                   name=f'decoder{level}_conv')(x)
        x = layers.LeakyReLU(negative_slope=negative_slope,
                             name=f'decoder{level}_act')(x)
        x = layers.UpSampling2D(2, name=f'decoder{level}_up')(x)
        x = layers.BatchNormalization(name=f'decoder{level}_bn')(x)
        if skip_connections:
            x = layers.Concatenate(name=f'decoder{level}_skip')(
                [x, skips[-1 - level]])
    # Start the softplus output near zero (softplus(-3) = 0.049), where the
    # truth is for almost every pixel. From Keras' default zero bias the
    # output starts near 0.7, many pixels above 1, where the clipped binary
    # cross-entropy has no gradient, and training stalls.
    outputs = layers.Conv2D(n_outputs, kernel_size, padding='same',
                            activation='softplus', dtype='float32',
                            bias_initializer=keras.initializers.Constant(
                                OUTPUT_BIAS_INIT),
                            name='output')(x)
    return keras.Model(inputs, outputs,
                       name='unet' if skip_connections else 'cae')


#: Initial bias of the output convolution (see `build_cae`).
OUTPUT_BIAS_INIT = -3.0

#: Architectures `build_network` knows.
ARCHITECTURES = ('cae', 'unet')


def build_network(architecture, input_shape, **kwargs):
    """Build a network by name: ``'cae'`` (the paper's autoencoder) or
    ``'unet'`` (the same with skip connections); see `build_cae`."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(f'architecture must be one of {ARCHITECTURES}, '
                          f'got {architecture!r}.')
    return build_cae(input_shape, skip_connections=architecture == 'unet',
                     **kwargs)


def weights_sha256(path):
    """SHA-256 of the weights member of a ``.keras`` file.

    The whole file's digest changes at every save (its metadata holds the
    date), so the weights member is the model's identity.
    """
    with zipfile.ZipFile(path) as archive:
        return hashlib.sha256(archive.read(_WEIGHTS_MEMBER)).hexdigest()


def config_sha256(path):
    """SHA-256 of the Keras ``config.json`` member of a ``.keras`` file (the
    layers and their settings, e.g. activation slopes)."""
    with zipfile.ZipFile(path) as archive:
        return hashlib.sha256(archive.read(_CONFIG_MEMBER)).hexdigest()


def card_sha256(card):
    """SHA-256 of a model card's canonical JSON without its ``card_sha256``.

    Canonical: keys sorted, no whitespace (``separators=(',', ':')``), so the
    digest does not depend on how the card file is indented.

    Examples
    --------
    >>> from psfdeconv.model import card_sha256
    >>> card_sha256({'a': 1, 'card_sha256': 'x'}) == card_sha256({'a': 1})
    True
    """
    body = {key: value for key, value in card.items() if key != 'card_sha256'}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sign_card(path):
    """Record the checksums of a ``.keras`` file and of its card in the card.

    Sets ``weights_sha256``, ``config_sha256`` (and ``card_sha256`` over
    the rest) in ``<name>.json`` beside ``path``; no other value changes.
    Use it on a model you trust whose card predates ``config_sha256`` or
    ``card_sha256``.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The ``.keras`` file; its card must exist.

    Returns
    -------
    dict
        The card as written.
    """
    from .io import atomic_path

    path = Path(path)
    card = _read_card(_card_path(path))
    check_card_values(card, path)
    _check_members(path)
    card['weights_sha256'] = weights_sha256(path)
    card['config_sha256'] = config_sha256(path)
    card['card_sha256'] = card_sha256(card)
    with atomic_path(_card_path(path), overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + '\n')
    return card


def default_model_path(n_bands=3):
    """Path of the shipped model for ``n_bands`` bands (``psfdeconv/data/``).

    Raises `~psfdeconv.exceptions.BandCountError` if no model for that many
    bands ships.
    """
    if n_bands not in DEFAULT_MODELS:
        raise BandCountError(
            f'psfdeconv ships models for {sorted(DEFAULT_MODELS)} band(s), not '
            f'{n_bands}; give that many bands, or train a model for {n_bands} '
            f'bands (psfdeconv simulate with n_bands={n_bands} in its config, '
            f'then psfdeconv train) and pass it as the model.')
    return Path(__file__).parent / 'data' / f'{DEFAULT_MODELS[n_bands]}.keras'


def _card_path(model_path):
    return Path(model_path).with_suffix('.json')


# --- The model card ---------------------------------------------------------------
#
# Every key of a card is written here: `make_card` (what training gives),
# `calibrated_card` (what the calibration adds) and `save_model` (version and
# checksums); `training_ranges` reads the ranges back.

def make_card(*, architecture, architecture_config, input_kinds, n_bands, stamp_size,
              features, output_floor, symmetries, training):
    """The model card of a trained, not yet calibrated network.

    Parameters
    ----------
    architecture : str
        One of `ARCHITECTURES`.
    architecture_config : dict
        ``filters``, ``kernel_size`` and ``negative_slope`` of the network.
    input_kinds : list of str
        The input channels (`~psfdeconv.features.KINDS`).
    n_bands, stamp_size : int
        Bands and stamp side (pixels) of the network.
    features : dict
        Keyword arguments of `~psfdeconv.features.make_cube`.
    output_floor : str or None
        `~psfdeconv.deconvolve.remove_output_floor` method.
    symmetries : int
        Symmetries `~psfdeconv.deconvolve.symmetric_output` averages.
    training : dict
        The training record (configuration, simulation, split, history).

    Returns
    -------
    dict
    """
    return {
        'architecture': architecture,
        'architecture_config': dict(architecture_config),
        'input_kinds': list(input_kinds),
        'n_bands': n_bands,
        'stamp_size': stamp_size,
        'features': dict(features),
        'output_floor': output_floor,
        'symmetries': symmetries,
        'training': training,
    }


def calibrated_card(card, calibration, metrics):
    """A card with its calibrations, validation metrics and training ranges.

    Parameters
    ----------
    card : dict
        From `make_card` (a ``name`` may have been added).
    calibration : dict
        ``psf_leakage``, ``size_bias``, ``flux_bias`` and ``detection``
        (`~psfdeconv.calibrate.calibrate_card`).
    metrics : dict
        `~psfdeconv.calibrate.validation_metrics`.

    Returns
    -------
    dict
        A new card; the training ranges are repeated at its top
        (``pixel_scale_range``, ``psf_fwhm_range_arcsec``) with
        ``n_validation_objects``.
    """
    card = dict(card)
    card.update(calibration)
    card['metrics'] = metrics
    card['pixel_scale_range'], card['psf_fwhm_range_arcsec'] = training_ranges(card)
    card['n_validation_objects'] = card['training']['n_validation']
    return card


def training_ranges(card):
    """The pixel scales (arcsec/pixel) and PSF FWHMs (arcsec) a model was
    trained on, as ``(low, high)`` pairs (None where the card has none).

    Read from the training simulation's configuration, or from the top of
    the card for cards without one.
    """
    simulation = (card.get('training') or {}).get('simulation_config') or {}
    pixel_scale = simulation.get('pixel_scale_range', card.get('pixel_scale_range'))
    fwhm = simulation.get('psf_fwhm_range', card.get('psf_fwhm_range_arcsec'))
    return pixel_scale, fwhm


def check_card_version(card, path=None):
    """Refuse a card of a later layout than `MODEL_CARD_VERSION`.

    Cards without ``card_version`` (the minimal card of a bare ``.keras``
    file) are read as the current version.

    Raises
    ------
    psfdeconv.exceptions.ModelFileError
        If the card's version is later than this psfdeconv reads.
    """
    version = card.get('card_version', MODEL_CARD_VERSION)
    if not isinstance(version, int) or version > MODEL_CARD_VERSION:
        raise ModelFileError(f'the card of model {path or ""} has card_version = {version!r}, '
                             f'but this psfdeconv reads versions up to '
                             f'{MODEL_CARD_VERSION}; upgrade psfdeconv.')


#: Card keys that must hold lists of finite numbers (dotted paths; a missing
#: or null key is allowed).
_NUMBER_LISTS = ('flux_bias.coefficients', 'flux_bias.log_snr_range',
                 'flux_bias.per_band_coefficients', 'pixel_scale_range',
                 'psf_fwhm_range_arcsec', 'training.simulation_config.pixel_scale_range',
                 'training.simulation_config.psf_fwhm_range', 'size_bias.coefficients',
                 'psf_leakage.coefficients')
#: Card keys that must hold positive integers.
_INTEGERS = ('n_bands', 'stamp_size', 'card_version', 'symmetries')


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def _walk(value, where):
    """Yield (dotted key, value) of every leaf of a card."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f'{where}.{key}' if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f'{where}[{index}]')
    else:
        yield where, value


def _lookup(card, dotted):
    value = card
    for key in dotted.split('.'):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def check_card_values(card, path=None):
    """Refuse a card with non-finite numbers or values of the wrong type.

    Every number anywhere in the card must be finite; the calibration
    coefficients and training ranges must be lists of numbers; ``n_bands``,
    ``stamp_size``, ``card_version`` and ``symmetries`` positive integers;
    ``input_kinds`` a list of strings.

    Raises
    ------
    psfdeconv.exceptions.ModelFileError
        Naming the key and its value.
    """
    def refuse(key, value, expected):
        raise ModelFileError(f'the card of model {path or ""} has {key} = {value!r}; '
                             f'{expected}. The card was edited or damaged: restore it '
                             f'from the model release.')

    if not isinstance(card, dict):
        refuse('(top level)', type(card).__name__, 'a card is a JSON object')
    for key, value in _walk(card, ''):
        if isinstance(value, float) and not np.isfinite(value):
            refuse(key, value, 'numbers in a card must be finite')
    for key in _NUMBER_LISTS:
        value = _lookup(card, key)
        if value is None:
            continue
        if key.endswith('per_band_coefficients'):
            ok = isinstance(value, list) and all(
                isinstance(row, list) and row and all(map(_is_number, row)) for row in value)
        else:
            ok = isinstance(value, list) and value and all(map(_is_number, value))
        if not ok:
            refuse(key, value, 'it must be a list of numbers')
    for key in _INTEGERS:
        value = card.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            refuse(key, value, 'it must be a positive integer')
    if card.get('shear_response') is not None:
        from .shear_response import check_shear_response

        check_shear_response(card['shear_response'],
                             where=f'the card of model {path or ""} has shear_response')
    kinds = card.get('input_kinds')
    if kinds is not None and not (isinstance(kinds, list) and kinds
                                  and all(isinstance(kind, str) for kind in kinds)):
        refuse('input_kinds', kinds, 'it must be a list of kind names')
    for key in _HASH_KEYS + ('file_sha256',):
        value = card.get(key)
        if value is not None and not isinstance(value, str):
            refuse(key, value, 'it must be a SHA-256 hex string')


def _check_members(path):
    """Refuse archive members too large to inflate (a zip bomb), from the
    sizes the archive declares, before any member is decompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f'model file {path} is corrupt ({exc}); '
                             f'download or retrain it.') from None
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > MAX_MEMBER_BYTES or (
                info.file_size > 2 ** 20 and ratio > MAX_COMPRESSION_RATIO):
            raise ModelFileError(
                f'model file {path}: member {info.filename!r} would inflate to '
                f'{info.file_size} bytes ({ratio:.0f} times its compressed size; the '
                f'limits are {MAX_MEMBER_BYTES} bytes and {MAX_COMPRESSION_RATIO} times): '
                f'refused unread as a likely zip bomb; use a model file made by '
                f'psfdeconv train.')


def _read_card(card_path):
    try:
        return json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f'model card {card_path} is not valid JSON '
                             f'({exc}); restore it from the model '
                             f'release.') from None


def _untrusted(path, why):
    return ModelFileError(
        f'model {path} {why}, so its weights, configuration and calibrations cannot '
        f'be verified; use a model with its card as made by psfdeconv train, record '
        f'the checksums of a model you trust (psfdeconv.model.sign_card), or pass '
        f'--trust-model (load_model(..., verify=False)) to use it unverified.')


def _check_hashes(path, card):
    """The three checksums of the card against the file and the card."""
    missing = [key for key in _HASH_KEYS if not card.get(key)]
    if missing:
        raise _untrusted(path, f'has a card {_card_path(path)} without '
                               f'{", ".join(missing)}')
    actual = card_sha256(card)
    if actual != card['card_sha256']:
        raise ModelFileError(
            f'the card {_card_path(path)} of model {path} has SHA-256 {actual}, but '
            f'it records '
            f'card_sha256 = {card["card_sha256"]}: the card (calibrations, ranges or '
            f'other values) was edited; restore it from the model release.')
    actual = config_sha256(path)
    if actual != card['config_sha256']:
        raise ModelFileError(
            f'model configuration (config.json) in {path} has SHA-256 {actual}, but '
            f'its card {_card_path(path)} records {card["config_sha256"]}: the '
            f'network configuration was modified or belongs to another card; '
            f'restore the model file from its release.')


def check_model_file(path, card):
    """Everything Keras would misreport, checked before it sees the file."""
    if not path.exists():
        raise ModelFileError(f'model file {path} does not exist; give the '
                             f'path of a .keras file made by `psfdeconv '
                             f'train`, or omit it to use the shipped model.')
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise ModelFileError(f'model file {path} is not a .keras (zip) '
                             f'archive: it is truncated or corrupt; '
                             f'download or retrain it.')
    # Before testzip and Keras, both of which inflate every member.
    _check_members(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f'model file {path} is corrupt ({exc}); '
                             f'download or retrain it.') from None
    if bad is not None:
        raise ModelFileError(f'model file {path} is corrupt: member {bad!r} '
                             f'fails its CRC check; download or retrain it.')
    missing = {'config.json', _WEIGHTS_MEMBER} - names
    if missing:
        raise ModelFileError(f'model file {path} lacks {sorted(missing)}; it '
                             f'is not a Keras 3 .keras model.')
    expected = card.get('weights_sha256')
    if expected:
        actual = weights_sha256(path)
        if actual != expected:
            raise ModelFileError(
                f'model weights in {path} have SHA-256 {actual}, but its '
                f'card {_card_path(path)} records {expected}: the file was '
                f'modified or belongs to another card; restore it from its release.')


class DeconvolutionModel:
    """A trained network together with its model card.

    Use `load_model` to get one from a file.

    Parameters
    ----------
    keras_model : `keras.Model` or None
        The network; None for one loaded later (``load_network``) or never.
    card : dict
        The model card (see `save_model`).
    path : `~pathlib.Path`, optional
        Where it was loaded from.
    verified : bool, optional
        Whether its checksums were verified (False: loaded with
        ``verify=False``, ``--trust-model``).
    load_network : callable, optional
        Where ``keras_model`` is None: returns the Keras network on the
        first use of `keras_model` (``load_model(..., network='lazy')``).
    """

    def __init__(self, keras_model, card, path=None, *, verified=True, load_network=None):
        self._keras_model = keras_model
        self._load_network = None if keras_model is not None else load_network
        self.card = card
        self.path = path
        self.verified = verified
        # Compiled runners by (precision, runtime): psfdeconv.inference.get_runner.
        self._runners = {}

    @property
    def keras_model(self):
        """The Keras network (`keras.Model`), loaded on first use where the
        model was loaded with ``network='lazy'``; None for ``network=False``."""
        if self._keras_model is None and self._load_network is not None:
            with _NETWORK_LOCK:
                if self._keras_model is None:
                    self._keras_model = self._load_network()
        return self._keras_model

    @keras_model.setter
    def keras_model(self, keras_model):
        # Runners built from the network it replaces are dropped.
        self._keras_model = keras_model
        self._load_network = None
        self._runners = {}

    @property
    def has_network(self):
        """Whether the network can run: loaded, or to be loaded on first use
        (False for a model loaded with ``network=False``)."""
        return self._keras_model is not None or self._load_network is not None

    @property
    def network_loaded(self):
        """Whether Keras has loaded the network in this process (False for a
        ``network='lazy'`` model before its first use of `keras_model`)."""
        return self._keras_model is not None

    @property
    def kinds(self):
        """Input channel kinds, e.g. ``('psf', 'ipsf', 'ipsf1')``."""
        return tuple(self.card['input_kinds'])

    @property
    def n_bands(self):
        """Number of bands the model was trained for."""
        return int(self.card['n_bands'])

    @property
    def stamp_size(self):
        """Stamp side in pixels."""
        return int(self.card['stamp_size'])

    @property
    def feature_options(self):
        """Keyword arguments of `~psfdeconv.features.make_cube`."""
        return dict(self.card.get('features', {}))

    @property
    def sha256(self):
        """SHA-256 of the weights (the model's identity)."""
        return self.card.get('weights_sha256')

    def check_network_shapes(self, input_shape, output_shape):
        """Raise `~psfdeconv.exceptions.ModelFileError` unless a network's
        input and output shapes, ``(None, ny, nx, channels)``, are those the
        card describes (stamp size, bands x input kinds, one output per
        band): for a network not loaded by Keras (OpenVINO's cached
        conversion, `~psfdeconv.inference`)."""
        _check_network_shapes(input_shape, output_shape, self.card, self.path)

    def check_bands(self, n_bands):
        """Raise `~psfdeconv.exceptions.BandCountError` unless ``n_bands``
        matches the model."""
        if n_bands != self.n_bands:
            raise BandCountError(
                f'the data have {n_bands} band(s) but the model '
                f'{self.path or ""} was trained for {self.n_bands}; give '
                f'{self.n_bands} bands or a model trained for {n_bands}.')

    def predict(self, cubes, *, batch_size=128, precision='float32'):
        """Run the network on input cubes.

        Parameters
        ----------
        cubes : `~numpy.ndarray`
            Shape (n, ny, nx, n_channels) from `~psfdeconv.features.make_cube`.
        batch_size : int, optional
            Objects per forward pass.
        precision : {'auto', 'float32', 'bfloat16'}, optional
            Arithmetic of the network (`~psfdeconv.inference`), float32 by
            default; ``'auto'`` is bfloat16 where the CPU has it, else float32;
            `~psfdeconv.inference.resolve_precision` says what it gives.

        Returns
        -------
        `~numpy.ndarray`
            Shape (n, n_bands, ny, nx), float32, in the scaled units.
        """
        from .inference import get_runner

        runner, _ = get_runner(self, precision)
        cubes = np.asarray(cubes, dtype=np.float32)
        out = np.empty((cubes.shape[0], self.n_bands) + cubes.shape[1:3],
                       dtype=np.float32)
        for start in range(0, cubes.shape[0], batch_size):
            pred = runner(cubes[start:start + batch_size])
            out[start:start + batch_size] = pred.transpose(0, 3, 1, 2)
        return out

    def __repr__(self):
        return (f'<DeconvolutionModel {self.card.get("name", "?")} '
                f'kinds={self.kinds} bands={self.n_bands} '
                f'sha256={str(self.sha256)[:12]}>')


def load_model(path=None, *, n_bands=None, verify=True, network=True):
    """Load a deconvolution model and its card, checking the file first.

    Parameters
    ----------
    path : str or `~pathlib.Path`, optional
        A ``.keras`` file with its ``.json`` card beside it; the shipped
        model for ``n_bands`` bands if `None`.
    n_bands : int, optional
        Number of bands of the data, which picks the shipped model when
        ``path`` is None (default 3: g, r, i; 1 for single-band data).
    verify : bool, optional
        Require a card and check the SHA-256 of the weights, of the Keras
        configuration and of the card itself against those it records.
        False (``--trust-model``) loads a model without a card or whose card
        lacks or contradicts them; the model's ``verified`` is then False,
        and catalogues record it (``meta['model']['verified']``). The card's
        values are checked for type and finiteness, and the archive's member
        sizes, either way.
    network : {True, 'lazy', False}, optional
        True: load the network with Keras now. ``'lazy'``: check the file
        and its card as above, and load the network on first use of
        `DeconvolutionModel.keras_model`; OpenVINO runs it from the
        conversion cached for this file where there is one
        (`~psfdeconv.inference.network_cache_dir`) without starting Keras
        or TensorFlow (the worker processes of
        `~psfdeconv.batch.run_batch`). False: the checks alone, for a
        process that only hands the file to others (``keras_model`` is
        None, and the model cannot run). A model without a card
        (``verify=False``) is loaded whole either way: its card is made
        from the network.

    Returns
    -------
    `DeconvolutionModel`

    Raises
    ------
    `~psfdeconv.exceptions.ModelFileError`
        If the file is missing, not a zip archive, corrupt, a zip bomb,
        modified (checksums of weights, configuration or card), without a
        card or checksums (unless ``verify=False``), with non-finite or
        wrongly typed card values, unsafe (e.g. a ``Lambda`` layer) or not a
        psfdeconv network.

    Examples
    --------
    >>> import psfdeconv
    >>> model = psfdeconv.load_model()
    >>> model.kinds, model.n_bands, model.stamp_size
    (('psf', 'ipsf', 'ipsf1'), 3, 64)
    """
    path = (default_model_path(3 if n_bands is None else n_bands)
            if path is None else Path(path))
    card_path = _card_path(path)
    card = {}
    if card_path.exists():
        card = _read_card(card_path)
    elif path.parent == default_model_path().parent:
        raise ModelFileError(f'the shipped model card {card_path} is missing;'
                             f' reinstall psfdeconv.')
    check_card_values(card, path)
    check_card_version(card, path)
    check_model_file(path, card if verify else {})
    if verify and not card_path.exists():
        raise _untrusted(path, f'has no card ({card_path.name} beside it)')
    if verify:
        _check_hashes(path, card)
    if network not in (True, False, 'lazy'):
        raise ConfigError(f"network must be True, 'lazy' or False, got {network!r}.")
    if network is not True and card:
        if not verify:
            card['weights_sha256'] = weights_sha256(path)
            card['config_sha256'] = config_sha256(path)
        loader = None
        if network == 'lazy':
            def loader():
                keras_model = _load_keras_model(path)
                _check_architecture(keras_model, card, path)
                return keras_model
        return DeconvolutionModel(None, card, path=path, verified=bool(verify),
                                  load_network=loader)

    keras_model = _load_keras_model(path)
    if not card:
        card = _card_from_keras(keras_model)
    _check_architecture(keras_model, card, path)
    if not verify:
        # The identity of what was actually used, not what a card claims.
        card['weights_sha256'] = weights_sha256(path)
        card['config_sha256'] = config_sha256(path)
    return DeconvolutionModel(keras_model, card, path=path, verified=bool(verify))


def _load_keras_model(path):
    """Keras' own load of a checked ``.keras`` file (``safe_mode``), its
    failures as `~psfdeconv.exceptions.ModelFileError`."""
    keras = _keras()
    try:
        keras_model = keras.saving.load_model(path, compile=False,
                                              safe_mode=True)
    except ValueError as exc:
        if 'safe_mode' in str(exc) or 'Lambda' in str(exc):
            raise ModelFileError(
                f'model file {path} contains code (e.g. a Lambda layer) '
                f'that is refused for safety: {exc}') from None
        raise ModelFileError(f'model file {path} cannot be loaded by Keras: '
                             f'{exc}') from None
    except Exception as exc:  # Keras raises many types on bad configs
        raise ModelFileError(f'model file {path} cannot be loaded by Keras '
                             f'({exception_text(exc)}).') from None
    return keras_model


def _card_from_keras(keras_model):
    """A minimal card for a bare .keras file without one (9 channels are
    taken as the three kinds of the paper's full cube)."""
    from .features import KINDS

    _, ny, nx, n_channels = keras_model.input_shape
    n_bands = keras_model.output_shape[-1]
    n_kinds = n_channels // n_bands
    return {'name': 'unnamed', 'input_kinds': list(KINDS[-n_kinds:]) if
            n_kinds < 3 else list(KINDS), 'n_bands': n_bands,
            'stamp_size': ny, 'flux_bias': None}


def _check_architecture(keras_model, card, path):
    _check_network_shapes(keras_model.input_shape, keras_model.output_shape, card, path)


def _check_network_shapes(input_shape, output_shape, card, path=None):
    try:
        _, ny, nx, n_channels = input_shape
        n_out = output_shape[-1]
    except (TypeError, ValueError, IndexError):
        raise ModelFileError(f'model file {path} is not an image-to-image '
                             f'network (input {input_shape}).') from None
    expected_channels = len(card['input_kinds']) * int(card['n_bands'])
    if (n_channels != expected_channels or n_out != int(card['n_bands'])
            or ny != int(card['stamp_size'])):
        raise ModelFileError(
            f'model file {path} has input {tuple(input_shape)} and '
            f'output {tuple(output_shape)}, but its card describes '
            f'{card["n_bands"]} bands x kinds {card["input_kinds"]} on '
            f'{card["stamp_size"]}-pixel stamps: wrong architecture for '
            f'this card.')


def save_model(keras_model, path, card, *, overwrite=False):
    """Save a network and its card atomically; fill in the checksums.

    Parameters
    ----------
    keras_model : `keras.Model`
        The network.
    path : str or `~pathlib.Path`
        Output ``.keras`` file; the card goes to the same name with
        ``.json``.
    card : dict
        The model card; ``weights_sha256``, ``config_sha256``,
        ``file_sha256``, ``card_version`` and (last, over all the others)
        ``card_sha256`` are set here.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    dict
        The card as written.
    """
    from .io import atomic_path

    path = Path(path)
    card = dict(card)
    with atomic_path(path, overwrite=overwrite) as tmp:
        # Keras insists on a .keras suffix: save beside the temporary file.
        keras_path = tmp.with_suffix('.keras')
        try:
            keras_model.save(keras_path)
            os.replace(keras_path, tmp)
        finally:
            keras_path.unlink(missing_ok=True)
        card['card_version'] = MODEL_CARD_VERSION
        card['weights_sha256'] = weights_sha256(tmp)
        card['config_sha256'] = config_sha256(tmp)
        card['file_sha256'] = file_sha256(tmp)
        card.pop('card_sha256', None)
        card['card_sha256'] = card_sha256(card)
    with atomic_path(_card_path(path), overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + '\n')
    return card
