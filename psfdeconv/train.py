# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Seeded, resumable training of the deconvolution network.

`train_model` reads a simulation file (`~psfdeconv.simulate.write_simulation`),
splits it into training and validation objects with the seed, builds the
input cubes batch by batch (`~psfdeconv.features.make_cube`) and fits the
network with the paper's recipe (section III.2 and appendix A): binary
cross-entropy between the output and the truth scaled like the inputs,
Adam with a learning rate of 1e-4 decaying exponentially by 0.6 every
100,000 steps.

After every epoch the full training state (weights and optimizer) goes to
``OUT/checkpoint.keras`` and the history to ``OUT/state.json``; the best
weights by validation loss go to ``OUT/best.keras``. ``resume=True``
continues from the last checkpoint with the same data split. Training
stops at ``epochs``, when the validation loss has not improved for
``patience`` epochs, or when ``max_minutes`` is spent (the epoch in
progress is checkpointed).
"""

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ._cpus import usable_cpus
from ._validation import config_from_dict
from .deconvolve import OUTPUT_FLOORS, check_symmetries
from .exceptions import ConfigError, InvalidInputError
from .features import KINDS, check_kinds, make_cube
from .transforms import square_symmetry

__all__ = ['TrainConfig', 'train_model', 'split_indices', 'scaled_batch',
           'split_bands', 'augment_batch', 'build_cache', 'validation_objects',
           'moment_loss', 'distilled_targets']

#: Targets are the truth over this many times the inputs' scale (see
#: `scaled_batch`).
DEFAULT_TARGET_HEADROOM = 4.0


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run (all recorded in the model card)."""

    #: Input channel kinds (the paper's best: all three).
    kinds: tuple = KINDS
    #: Maximum number of epochs.
    epochs: int = 30
    #: Objects per step.
    batch_size: int = 32
    #: Initial Adam learning rate (paper appendix A).
    learning_rate: float = 1e-4
    #: Exponential decay of the learning rate (paper: 0.6 per 100k steps).
    decay_rate: float = 0.6
    #: Steps per decay factor.
    decay_steps: int = 100_000
    #: Fraction of objects held out for validation.
    validation_fraction: float = 0.05
    #: Use at most this many training objects (None: all).
    max_train_objects: int = None
    #: Seed of the split, the shuffling and the weights.
    seed: int = 0
    #: Epochs without validation improvement before stopping.
    patience: int = 5
    #: Stop (after checkpointing) once this many minutes are spent.
    max_minutes: float = None
    #: Network: 'cae' (the paper's) or 'unet' (with skip connections).
    architecture: str = 'cae'
    #: Encoder filters per level.
    filters: tuple = (64, 128, 256)
    #: LeakyReLU negative slope.
    negative_slope: float = 0.2
    #: Keras dtype policy: 'float32' or 'mixed_bfloat16' (about twice as
    #: fast on CPUs with AVX-512 BF16; weights stay float32).
    dtype_policy: str = 'mixed_bfloat16'
    #: Options of `~psfdeconv.features.make_channels`.
    features: dict = dataclasses.field(default_factory=dict)
    #: Targets are truth / (target_headroom x the inputs' scale).
    target_headroom: float = DEFAULT_TARGET_HEADROOM
    #: Post-processing of the network output recorded in the card: None,
    #: 'median' or 'outer', how the softplus floor is removed before the
    #: amplitude refit (`~psfdeconv.deconvolve.remove_output_floor`).
    output_floor: str = None
    #: Symmetries of the square the network output is averaged over at
    #: inference (`~psfdeconv.deconvolve.symmetric_output`), recorded in
    #: the card: 1, 2, 4 or 8. The card's calibrations are fitted with it.
    #: 4 (the quarter turns), as the shipped 3-band card: their mirror
    #: images add nothing measurable to the average (``docs/validation.rst``).
    symmetries: int = 4
    #: Train a single-band model: every band of every simulated object
    #: becomes a 1-band object of its own (`split_bands`).
    split_bands: bool = False
    #: A ``.keras`` file of the same network whose weights start the run
    #: (fine-tuning on new simulations); None: seeded random weights.
    initial_weights: str = None
    #: Build every object's input cube and target once, before training,
    #: and keep them in memory (150 kB per 3-band object) instead of per
    #: batch: the same arrays, built once. Pays where the network runs on
    #: an accelerator that the per-batch FFTs would starve.
    cache_cubes: bool = False
    #: Apply one of the 8 symmetries of the square (flips and quarter
    #: turns), drawn per training batch with the seed, to cube and target
    #: alike. Exact: the channels are convolutions with centred kernels,
    #: which commute with these symmetries.
    augment: bool = False
    #: Threads preparing training batches (Keras ``PyDataset`` workers).
    data_workers: int = 1
    #: Weight of the shape term added to the paper's binary cross-entropy
    #: (`moment_loss`: squared errors of the weighted-moment ellipticity
    #: and log size against the target's); 0 trains on the
    #: cross-entropy alone, as the paper.
    moment_loss_weight: float = 0.0
    #: Distil a symmetry average into one network pass: the training
    #: targets become the ``initial_weights`` network's output averaged over
    #: this many views (`~psfdeconv.deconvolve.symmetric_output`, float32),
    #: mixed with the truth's targets by ``distill_weight``. The teacher
    #: runs once on the cached cubes (``cache_cubes``); the validation
    #: targets stay the truth's, so the best epoch is the one closest to
    #: the truth. None: the truth alone, as the paper.
    distill_symmetries: int = None
    #: Weight of the teacher's output in the distilled targets: 1 the
    #: teacher alone, 0 the truth alone.
    distill_weight: float = 1.0

    def __post_init__(self):
        self.kinds = check_kinds(self.kinds)
        self.filters = tuple(self.filters)
        if self.epochs < 1 or self.batch_size < 1 or self.data_workers < 1:
            raise ConfigError(f'epochs, batch_size and data_workers must be '
                              f'>= 1, got {self.epochs}, {self.batch_size} and '
                              f'{self.data_workers}.')
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f'validation_fraction must be in (0, 1), got '
                              f'{self.validation_fraction}.')
        if self.output_floor not in OUTPUT_FLOORS:
            raise ConfigError(f"output_floor must be one of {OUTPUT_FLOORS}, got "
                              f"{self.output_floor!r}.")
        check_symmetries(self.symmetries)
        if not self.target_headroom >= 1:
            raise ConfigError(f'target_headroom must be >= 1, got '
                              f'{self.target_headroom}.')
        if self.architecture not in ('cae', 'unet'):
            raise ConfigError(f"architecture must be 'cae' or 'unet', got "
                              f"{self.architecture!r}.")
        if self.dtype_policy not in ('float32', 'mixed_bfloat16'):
            raise ConfigError(f"dtype_policy must be 'float32' or "
                              f"'mixed_bfloat16', got {self.dtype_policy!r}.")
        if not (np.isfinite(self.moment_loss_weight) and self.moment_loss_weight >= 0):
            raise ConfigError(f'moment_loss_weight must be a finite number >= 0, '
                              f'got {self.moment_loss_weight!r}.')
        if self.distill_symmetries is not None:
            check_symmetries(self.distill_symmetries)
            if self.initial_weights is None or not self.cache_cubes:
                raise ConfigError(
                    f'distill_symmetries = {self.distill_symmetries} distils the '
                    f'initial_weights network over the cached cubes: set '
                    f'initial_weights to its .keras file (with its card) and '
                    f'cache_cubes to true, or distill_symmetries to None.')
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f'distill_weight must be in [0, 1], got '
                              f'{self.distill_weight!r}.')

    def to_dict(self):
        """JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        out['kinds'] = list(self.kinds)
        out['filters'] = list(self.filters)
        return out

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, refusing unknown keys."""
        return config_from_dict(cls, values, 'training')


def split_indices(n_objects, *, validation_fraction, seed):
    """Seeded split of ``range(n_objects)`` into (train, validation)."""
    order = np.random.default_rng(seed).permutation(n_objects)
    n_val = max(1, int(round(validation_fraction * n_objects)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def scaled_batch(observed, psfs, pixel_scale, truth, *, kinds=KINDS,
                 target_headroom=DEFAULT_TARGET_HEADROOM, **feature_options):
    """Input cubes and targets of one batch.

    The inputs are scaled by their own per-object maximum
    (`~psfdeconv.features.cube_scale`), as they are at inference, and the
    targets are the truth divided by the same factor times
    ``target_headroom``, clipped to [0, 1] as binary cross-entropy
    requires. The paper divides inputs and truth by one common maximum
    that includes the truth; the truth is unknown at inference, so
    psfdeconv scales by the inputs alone. The truth then peaks above the
    inputs for most galaxies (the PSF-filtered and regularised channels
    peak lower; up to ~4.7 times in the default simulations), hence the
    headroom. The target stays proportional to the inputs, so the network
    learns a map that scales with its input, as a deconvolution does (a
    target normalised to its own peak does not, and trains far worse);
    the amplitude refit (`~psfdeconv.deconvolve.refit_amplitude`, paper
    Eq. 2) sets the flux afterwards.

    Returns
    -------
    cube : `~numpy.ndarray`
        (n, ny, nx, n_kinds * n_bands).
    target : `~numpy.ndarray`
        (n, ny, nx, n_bands).
    """
    cube, scale = make_cube(observed, psfs, pixel_scale=pixel_scale,
                            kinds=kinds, **feature_options)
    factor = (target_headroom * scale).astype(np.float32)
    target = np.clip(truth / factor[:, None, None, None], 0.0, 1.0)
    return cube, np.ascontiguousarray(target.transpose(0, 2, 3, 1),
                                      dtype=np.float32)


def split_bands(data):
    """Turn every band of every object into a 1-band object.

    ``data`` maps field names to arrays of a simulation file's layout
    (``observed``, ``truth`` and ``psf`` of shape (n, n_bands, ...);
    ``pixel_scale`` and ``is_blank`` of shape (n,); per-band scalars such
    as ``noise_sigma`` of shape (n, n_bands)). The result has n x n_bands
    objects of one band, object-major (object i band b is row
    ``i * n_bands + b``), so a split by object stays a split by object;
    per-band arrays keep a band axis of length 1, as in a 1-band
    simulation (``noise_sigma`` becomes (n x n_bands, 1)).

    Examples
    --------
    >>> import numpy as np
    >>> data = {'observed': np.zeros((2, 3, 8, 8)),
    ...         'pixel_scale': np.array([0.2, 0.1])}
    >>> out = split_bands(data)
    >>> out['observed'].shape, out['pixel_scale'].tolist()
    ((6, 1, 8, 8), [0.2, 0.2, 0.2, 0.1, 0.1, 0.1])
    """
    n_bands = data['observed'].shape[1]
    out = {}
    for key, value in data.items():
        value = np.asarray(value)
        # 'offset' is (n, 2) x/y, not per band, even with two bands.
        if key != 'offset' and value.ndim >= 2 and value.shape[1] == n_bands:
            # Per-band arrays keep a band axis of length 1: (n, n_bands, ...)
            # becomes (n * n_bands, 1, ...), as a 1-band simulation has them.
            shape = (value.shape[0] * n_bands, 1) + value.shape[2:]
            out[key] = value.reshape(shape)
        else:
            out[key] = np.repeat(value, n_bands, axis=0)
    return out


def _take(dataset, indices):
    """``dataset[indices]`` for sorted indices into an HDF5 dataset."""
    if len(indices) > 0.2 * len(dataset):
        # A whole read and an in-memory take: h5py's point selections of
        # ~1e5 indices are far slower.
        return dataset[()][indices]
    return dataset[indices]


def _load_split(sims, indices, fields=('observed', 'psf', 'pixel_scale',
                                       'truth'), *, single_band=False):
    data = {key: _take(sims[key], indices) for key in fields}
    return split_bands(data) if single_band else data


def validation_objects(simulation_path, config, fields=(
        'observed', 'psf', 'pixel_scale', 'truth', 'is_blank')):
    """The validation objects of a training run on a simulation file.

    The same seeded split as `train_model` (and, with
    ``config.split_bands``, the same 1-band objects), so the weights never
    trained on them: ``psfdeconv train`` calibrates the flux-bias
    correction and measures the card's metrics on them.

    Returns
    -------
    dict
        ``fields`` of the validation objects, arrays in memory.
    """
    from .simulate import SimulationFile

    with SimulationFile(simulation_path) as sims:
        _, val_idx = split_indices(len(sims),
                                   validation_fraction=config.validation_fraction,
                                   seed=config.seed)
        return _load_split(sims, val_idx, fields, single_band=config.split_bands)


def augment_batch(cube, target, transform):
    """Apply symmetry ``transform`` of the square to a batch.

    Transform t in 0..7 is ``t % 4`` quarter turns followed, for t >= 4,
    by a left-right flip, on the (ny, nx) axes of channels-last arrays.

    Examples
    --------
    >>> import numpy as np
    >>> cube = np.arange(2 * 4 * 4 * 1.0).reshape(2, 4, 4, 1)
    >>> out, _ = augment_batch(cube, cube, 4)
    >>> bool(np.array_equal(out, cube[:, :, ::-1]))
    True
    """
    def apply(array):
        return np.ascontiguousarray(square_symmetry(array, transform, axes=(1, 2)))

    return apply(cube), apply(target)


#: The arrays `_cache_chunk` reads, inherited by forked workers.
_CACHE_SOURCE = {}


def _cache_chunk(task):
    start, stop, options = task
    data = _CACHE_SOURCE
    return start, scaled_batch(data['observed'][start:stop],
                               data['psf'][start:stop],
                               data['pixel_scale'][start:stop],
                               data['truth'][start:stop], **options)


def build_cache(data, *, n_workers=1, chunk=1024, **options):
    """Input cubes and targets of every object (`scaled_batch`), built in
    ``n_workers`` forked processes.

    Call it before Keras is imported: forking a process that runs a
    backend's threads is unsafe.

    Returns
    -------
    cubes, targets : `~numpy.ndarray`
        As `scaled_batch` returns for all objects at once.
    """
    import multiprocessing

    n = len(data['pixel_scale'])
    tasks = [(start, min(n, start + chunk), options)
             for start in range(0, n, chunk)]
    _CACHE_SOURCE.update(data)
    pool = None
    try:
        if (n_workers > 1 and len(tasks) > 1 and
                'fork' in multiprocessing.get_all_start_methods()):
            pool = multiprocessing.get_context('fork').Pool(
                min(n_workers, len(tasks)))
            results = pool.imap_unordered(_cache_chunk, tasks)
        else:
            results = map(_cache_chunk, tasks)
        cubes = targets = None
        for start, (cube, target) in results:
            if cubes is None:
                cubes = np.empty((n,) + cube.shape[1:], np.float32)
                targets = np.empty((n,) + target.shape[1:], np.float32)
            cubes[start:start + len(cube)] = cube
            targets[start:start + len(cube)] = target
    finally:
        _CACHE_SOURCE.clear()
        if pool is not None:
            pool.close()
            pool.join()
    return cubes, targets


def _make_sequence(keras, data, *, batch_size, kinds, feature_options, seed,
                   shuffle, target_headroom, cached=None, augment=False,
                   workers=1):
    def build(idx):
        return scaled_batch(data['observed'][idx], data['psf'][idx],
                            data['pixel_scale'][idx], data['truth'][idx],
                            kinds=kinds, target_headroom=target_headroom,
                            **feature_options)

    class StampSequence(keras.utils.PyDataset):
        """Batches of (cube, target), built on the fly from stamps or
        taken from the cache."""

        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False,
                             max_queue_size=max(10, 2 * workers))
            self.n = len(data['pixel_scale'])
            self.epoch = 0
            self.order = self._order()

        def _order(self):
            if not shuffle:
                return np.arange(self.n)
            return np.random.default_rng([seed, self.epoch]).permutation(
                self.n)

        def __len__(self):
            return math.ceil(self.n / batch_size)

        def __getitem__(self, index):
            # Sorted within the batch: the same batch, faster to gather.
            idx = np.sort(self.order[index * batch_size:
                                     (index + 1) * batch_size])
            if cached is None:
                cube, target = build(idx)
            else:
                cube, target = cached[0][idx], cached[1][idx]
            if augment:
                # One symmetry per batch: a single copy, and over the
                # epochs every object meets all eight.
                transform = np.random.default_rng(
                    [seed, self.epoch, index, 8]).integers(0, 8)
                cube, target = augment_batch(cube, target, transform)
            return cube, target

        def on_epoch_end(self):
            self.epoch += 1
            self.order = self._order()

    return StampSequence()


def _write_json(path, content):
    from .io import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + '\n')


def train_model(simulation_path, out_dir, *, config=None, resume=False,
                verbose='auto'):
    """Train the network on a simulation file.

    Parameters
    ----------
    simulation_path : str or `~pathlib.Path`
        HDF5 file from `~psfdeconv.simulate.write_simulation`.
    out_dir : str or `~pathlib.Path`
        Directory for checkpoints, the state and the trained model.
    config : `TrainConfig`, optional
        Options; the defaults if `None`.
    resume : bool, optional
        Continue from ``out_dir/checkpoint.keras``. Without it an existing
        checkpoint is an error (nothing is overwritten by accident).
    verbose : {'auto', 0, 1, 2}, optional
        Keras verbosity: 1 is a progress bar, 2 one line per epoch; 'auto'
        picks 1 on a terminal and 2 otherwise.

    Returns
    -------
    model : `keras.Model`
        The network with the best validation weights.
    card : dict
        The training part of the model card: configs, seeds, split sizes,
        history, timings.
    """
    from .simulate import SimulationFile

    config = TrainConfig() if config is None else config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / 'checkpoint.keras'
    state_path = out_dir / 'state.json'
    if checkpoint.exists() and not resume:
        from .exceptions import OutputExistsError
        raise OutputExistsError(f'{checkpoint} exists: pass resume=True '
                                f'(--resume) to continue that run, or use '
                                f'another output directory.')
    if resume and not checkpoint.exists():
        raise InvalidInputError(f'cannot resume: no checkpoint in {out_dir};'
                                f' start without --resume.')

    state = {'epoch': 0, 'history': [], 'best_val_loss': None,
             'best_epoch': None, 'elapsed_seconds': 0.0}
    if resume:
        state = json.loads(state_path.read_text())
    # A run cut off after its last checkpoint but before its model was
    # written has nothing left to train: finish it without the arrays.
    nothing_left = resume and _run_finished(state, config)

    with SimulationFile(simulation_path) as sims:
        sim_config = sims.config.to_dict()
        sim_seed = sims.seed
        train_idx, val_idx = split_indices(
            len(sims), validation_fraction=config.validation_fraction,
            seed=config.seed)
        if config.max_train_objects is not None:
            train_idx = train_idx[:config.max_train_objects]
        _, n_bands, _, stamp_size = sims['observed'].shape
        n_train_stamps = len(train_idx) * (n_bands if config.split_bands
                                           else 1)
        n_bands = 1 if config.split_bands else n_bands
        train_data = val_data = None
        if not nothing_left:
            train_data = _load_split(sims, train_idx,
                                     single_band=config.split_bands)
            val_data = _load_split(sims, val_idx,
                                   single_band=config.split_bands)
    caches = {}
    if config.cache_cubes and not nothing_left:
        for name, data in (('train', train_data), ('validation', val_data)):
            caches[name] = build_cache(
                data, n_workers=usable_cpus(), kinds=config.kinds,
                target_headroom=config.target_headroom, **config.features)
            # Only the cubes are used from here on.
            for key in ('observed', 'truth', 'psf'):
                data.pop(key)

    if config.distill_symmetries is not None and not nothing_left:
        cubes, targets = caches['train']
        caches['train'] = cubes, distilled_targets(
            config.initial_weights, cubes, targets,
            symmetries=config.distill_symmetries, weight=config.distill_weight,
            batch_size=max(config.batch_size, 64))

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import keras

    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.dtype_policy)
    # Checkpoints of a run with the shape term name its registered class.
    moment_loss(keras)
    try:
        if not nothing_left:
            train_seq = _make_sequence(
                keras, train_data, batch_size=config.batch_size,
                kinds=config.kinds, feature_options=config.features,
                seed=config.seed, shuffle=True,
                target_headroom=config.target_headroom,
                cached=caches.get('train'), augment=config.augment,
                workers=config.data_workers)
            val_seq = _make_sequence(
                keras, val_data, batch_size=max(config.batch_size, 64),
                kinds=config.kinds, feature_options=config.features,
                seed=config.seed, shuffle=False,
                target_headroom=config.target_headroom,
                cached=caches.get('validation'), workers=config.data_workers)

        if resume:
            model = keras.saving.load_model(checkpoint, safe_mode=True)
            if not nothing_left:
                train_seq.epoch = state['epoch']
                train_seq.order = train_seq._order()
        else:
            from .model import build_network

            model = build_network(config.architecture,
                                  (stamp_size, stamp_size,
                                   n_bands * len(config.kinds)),
                                  n_outputs=n_bands, filters=config.filters,
                                  negative_slope=config.negative_slope)
            if config.initial_weights is not None:
                _load_initial_weights(keras, model, config.initial_weights)
            schedule = keras.optimizers.schedules.ExponentialDecay(
                config.learning_rate, decay_steps=config.decay_steps,
                decay_rate=config.decay_rate)
            loss = (keras.losses.BinaryCrossentropy()
                    if config.moment_loss_weight == 0 else
                    moment_loss(keras)(moment_weight=config.moment_loss_weight))
            model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss)

        callback = _Checkpointer(keras, out_dir, state, config)
        if not nothing_left and not callback.finished():
            if verbose == 'auto':
                verbose = 1 if os.isatty(1) else 2
            model.fit(train_seq, validation_data=val_seq,
                      epochs=config.epochs, initial_epoch=state['epoch'],
                      callbacks=[callback.keras_callback], verbose=verbose,
                      # StampSequence shuffles with (seed, epoch); Keras'
                      # own shuffle would break exact resumption.
                      shuffle=False)
        best = out_dir / 'best.keras'
        if best.exists():
            model = keras.saving.load_model(best, safe_mode=True)
    finally:
        keras.config.set_dtype_policy('float32')
    # Inference runs in float32 whatever the training policy was.
    model = _as_float32(keras, model)
    from .model import file_sha256, make_card

    card = make_card(
        architecture=config.architecture,
        architecture_config={'filters': list(config.filters), 'kernel_size': 3,
                             'negative_slope': config.negative_slope},
        input_kinds=config.kinds, n_bands=n_bands, stamp_size=stamp_size,
        features=config.features, output_floor=config.output_floor,
        symmetries=config.symmetries,
        training={
            'config': config.to_dict(),
            'simulation_file': Path(simulation_path).name,
            'simulation_config': sim_config,
            'simulation_seed': sim_seed,
            'n_train': len(train_idx),
            'n_validation': len(val_idx),
            # With split_bands every object gives n_bands 1-band stamps.
            'n_train_stamps': n_train_stamps,
            'epochs_run': callback.state['epoch'],
            'best_epoch': callback.state['best_epoch'],
            'best_val_loss': callback.state['best_val_loss'],
            'history': callback.state['history'],
            'elapsed_seconds': round(callback.state['elapsed_seconds'], 1),
            'train_stamps_per_second': callback.throughput(n_train_stamps),
            'keras_version': keras.__version__,
            # Where the epochs ran (recorded in the state by the run that
            # trained; a finished run may be finalised elsewhere).
            'keras_backend': callback.state.get('keras_backend',
                                                callback.where['keras_backend']),
            'compute_device': callback.state.get('compute_device',
                                                 callback.where['compute_device']),
            'initial_weights_sha256': (
                None if config.initial_weights is None else
                file_sha256(config.initial_weights)),
        })
    return model, card


def distilled_targets(teacher, cubes, targets, *, symmetries, weight=1.0,
                      batch_size=128, chunk=4096):
    """Training targets that distil a network's symmetry average.

    The teacher network runs in float32 on every view of ``cubes``; the
    average of its outputs, turned back (`~psfdeconv.deconvolve.symmetric_output`
    of the cubes), replaces ``targets`` in proportion ``weight``. Both are in
    the network's scaled units (`scaled_batch`), clipped to [0, 1] as binary
    cross-entropy requires.

    Parameters
    ----------
    teacher : str, `~pathlib.Path` or `~psfdeconv.model.DeconvolutionModel`
        The network whose average is learnt (a ``.keras`` file with its card).
    cubes : `~numpy.ndarray`
        (n, ny, nx, n_channels) input cubes (`scaled_batch`).
    targets : `~numpy.ndarray`
        (n, ny, nx, n_bands) truth targets; overwritten in place.
    symmetries : {1, 2, 4, 8}
        Views averaged (`~psfdeconv.deconvolve.symmetric_output`).
    weight : float, optional
        Weight of the teacher's average; the truth's is ``1 - weight``.

    Returns
    -------
    `~numpy.ndarray`
        ``targets``, float32.
    """
    from .deconvolve import symmetric_predict
    from .model import DeconvolutionModel, load_model

    model = teacher if isinstance(teacher, DeconvolutionModel) else load_model(teacher)
    if model.n_bands != targets.shape[-1] or cubes.shape[1:] != tuple(
            model.keras_model.input_shape[1:]):
        raise ConfigError(f'the teacher {model!r} takes cubes of shape '
                          f'{model.keras_model.input_shape[1:]} and gives '
                          f'{model.n_bands} band(s); the training cubes are '
                          f'{cubes.shape[1:]} with {targets.shape[-1]} band(s).')
    for start in range(0, len(cubes), chunk):
        sl = slice(start, start + chunk)
        average = symmetric_predict(model, cubes[sl], symmetries=symmetries,
                                    batch_size=batch_size, precision='float32')
        average = np.clip(average.transpose(0, 2, 3, 1), 0.0, 1.0)
        targets[sl] = weight * average + (1.0 - weight) * targets[sl]
    return targets


def _run_finished(state, config):
    """Whether a run's state leaves nothing to train: all epochs run, the
    patience spent, or the time budget used."""
    best = state.get('best_epoch')
    return (state['epoch'] >= config.epochs or
            (best is not None and state['epoch'] - best >= config.patience) or
            (config.max_minutes is not None and
             state['elapsed_seconds'] > 60 * config.max_minutes))


@functools.cache
def moment_loss(keras):
    """The loss class ``MomentLoss`` (built and registered with Keras once).

    ``MomentLoss(moment_weight=w)`` is, per object, the binary
    cross-entropy of the pixels (paper appendix A) plus ``w`` times the
    mean over bands of

    .. math::

        (e_1 - e_1^t)^2 + (e_2 - e_2^t)^2 + (\\ln T - \\ln T^t)^2,

    a smooth proxy of the shape errors the evaluation measures:
    ``e1 = (Qxx - Qyy) / T``,
    ``e2 = 2 Qxy / T``, ``T = Qxx + Qyy`` of the second moments weighted by
    a round Gaussian centred on the target's centroid with the target's
    size (``sigma**2 = T_target / 2`` of its unweighted moments, at least
    1 pixel), the same weight for prediction and target. Bands whose
    target is empty (blanks) have no shape term.

    Parameters
    ----------
    keras : module
        The imported ``keras`` (kept lazy: TensorFlow loads with it).

    Returns
    -------
    type
        A ``keras.losses.Loss`` subclass, serialisable as
        ``psfdeconv>MomentLoss``.

    Examples
    --------
    >>> import keras
    >>> import numpy as np
    >>> from psfdeconv.train import moment_loss
    >>> loss = moment_loss(keras)(moment_weight=0.05)
    >>> target = np.full((1, 8, 8, 3), 0.2, dtype='float32')
    >>> bce = keras.losses.BinaryCrossentropy()(target, target)
    >>> print(f'{float(loss(target, target) - bce):.6f}')  # same shapes: no shape term
    0.000000
    """
    ops = keras.ops

    @keras.saving.register_keras_serializable(package='psfdeconv')
    class MomentLoss(keras.losses.Loss):
        def __init__(self, moment_weight=0.1, name='bce_moments', **kwargs):
            super().__init__(name=name, **kwargs)
            self.moment_weight = float(moment_weight)

        def call(self, y_true, y_pred):
            y_true = ops.cast(y_true, 'float32')
            y_pred = ops.cast(y_pred, 'float32')
            bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred),
                           axis=(1, 2))
            return bce + self.moment_weight * _moment_term(ops, y_true, y_pred)

        def get_config(self):
            return {**super().get_config(), 'moment_weight': self.moment_weight}

    return MomentLoss


def _moment_term(ops, y_true, y_pred):
    """Per-object shape term of `moment_loss`, images (b, ny, nx, bands)."""
    ny, nx = y_true.shape[1], y_true.shape[2]
    y = ops.reshape(ops.arange(ny, dtype='float32'), (1, ny, 1, 1))
    x = ops.reshape(ops.arange(nx, dtype='float32'), (1, 1, nx, 1))
    tiny = 1e-12
    flux = ops.sum(y_true, axis=(1, 2), keepdims=True)
    safe = ops.maximum(flux, tiny)
    xc = ops.sum(y_true * x, axis=(1, 2), keepdims=True) / safe
    yc = ops.sum(y_true * y, axis=(1, 2), keepdims=True) / safe
    dx, dy = x - xc, y - yc
    size2 = ops.sum(y_true * (dx * dx + dy * dy), axis=(1, 2), keepdims=True) / safe
    weight = ops.exp(-(dx * dx + dy * dy) / ops.maximum(size2, 2.0))

    def shape(images):
        light = images * weight
        total = ops.maximum(ops.sum(light, axis=(1, 2)), tiny)
        qxx = ops.sum(light * dx * dx, axis=(1, 2)) / total
        qyy = ops.sum(light * dy * dy, axis=(1, 2)) / total
        qxy = ops.sum(light * dx * dy, axis=(1, 2)) / total
        trace = ops.maximum(qxx + qyy, tiny)
        return (qxx - qyy) / trace, 2.0 * qxy / trace, ops.log(trace)

    e1_t, e2_t, log_t = shape(y_true)
    e1_p, e2_p, log_p = shape(y_pred)
    errors = (e1_p - e1_t) ** 2 + (e2_p - e2_t) ** 2 + (log_p - log_t) ** 2
    has_source = ops.cast(ops.reshape(flux, ops.shape(errors)) > tiny, 'float32')
    return ops.sum(errors * has_source, axis=-1) / ops.cast(ops.shape(errors)[-1], 'float32')


def _load_initial_weights(keras, model, path):
    """Copy the weights of the network in ``path`` into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'initial_weights = {str(path)!r} does not exist; give '
                          f'the .keras file of a network with the same '
                          f'architecture, or None.')
    source = keras.saving.load_model(path, compile=False, safe_mode=True)
    shapes = [w.shape for w in source.get_weights()]
    if shapes != [w.shape for w in model.get_weights()]:
        raise ConfigError(f'initial_weights {path} holds a different network '
                          f'(input {source.input_shape}, output '
                          f'{source.output_shape}) than this run builds (input '
                          f'{model.input_shape}, output {model.output_shape}); '
                          f'match architecture, filters, kinds and bands.')
    model.set_weights(source.get_weights())


def _compute_device(keras):
    """The device Keras trained on, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'
    (None if the backend cannot say)."""
    backend = keras.backend.backend()
    try:
        if backend == 'jax':
            import jax
            return str(jax.devices()[0].device_kind)
        if backend == 'torch':
            import torch
            return (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else 'cpu')
        if backend == 'tensorflow':
            import tensorflow as tf
            gpus = tf.config.list_physical_devices('GPU')
            return gpus[0].name if gpus else 'cpu'
    except Exception:  # the record is informative; never fail a run on it
        return None
    return None


def _as_float32(keras, model):
    """A float32 copy of a (possibly mixed-precision) model."""
    if model.dtype_policy.name == 'float32':
        return model
    config = model.get_config()
    for layer in config['layers']:
        layer['config'].pop('dtype', None)
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


class _Checkpointer:
    """Per-epoch checkpoint, best-model tracking, patience and time budget."""

    def __init__(self, keras, out_dir, state, config):
        # Where this run's epochs execute, recorded in the state with each
        # epoch (queried once: the device does not change within a run).
        self.where = {'keras_backend': keras.backend.backend(),
                      'compute_device': _compute_device(keras)}
        self.out_dir = out_dir
        self.state = state
        self.config = config
        self.start = time.monotonic()
        self.elapsed_before = state['elapsed_seconds']
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.state['steps'] = outer.state.get('steps', 0) + 1
                if outer.out_of_time():
                    self.model.stop_training = True

            def on_epoch_end(self, epoch, logs=None):
                outer.epoch_end(self.model, epoch, logs or {})

        self.keras_callback = Callback()

    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.start

    def out_of_time(self):
        limit = self.config.max_minutes
        return limit is not None and self.elapsed() > 60 * limit

    def finished(self):
        # The run's stopping rule, with the time spent up to now.
        return _run_finished(dict(self.state, elapsed_seconds=self.elapsed()),
                             self.config)

    def throughput(self, n_train):
        """Training stamps per second over the steps run (an epoch cut
        short by ``max_minutes`` counts for its steps only)."""
        seconds = self.state['elapsed_seconds']
        steps = self.state.get('steps')
        if steps is None:  # a state written before steps were counted
            steps = self.state['epoch'] * math.ceil(n_train / self.config.batch_size)
        objects = min(steps * self.config.batch_size,
                      self.state['epoch'] * n_train)
        return round(objects / seconds, 1) if seconds > 0 else None

    def epoch_end(self, model, epoch, logs):
        state = self.state
        val_loss = logs.get('val_loss')
        state.update(self.where)
        state['epoch'] = epoch + 1
        state['elapsed_seconds'] = self.elapsed()
        state['history'].append({
            'epoch': epoch + 1,
            'loss': float(logs['loss']),
            'val_loss': None if val_loss is None else float(val_loss),
            'elapsed_seconds': round(state['elapsed_seconds'], 1)})
        if val_loss is not None and (state['best_val_loss'] is None or
                                     val_loss < state['best_val_loss']):
            state['best_val_loss'] = float(val_loss)
            state['best_epoch'] = epoch + 1
            model.save(self.out_dir / '.best.keras')
            os.replace(self.out_dir / '.best.keras', self.out_dir / 'best.keras')
        model.save(self.out_dir / '.checkpoint.keras')
        os.replace(self.out_dir / '.checkpoint.keras',
                   self.out_dir / 'checkpoint.keras')
        _write_json(self.out_dir / 'state.json', state)
        if self.finished():
            model.stop_training = True
