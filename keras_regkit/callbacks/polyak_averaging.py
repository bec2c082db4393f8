"""Weight averaging inside `fit`: EMA, Polyak-Ruppert and SWA."""

import contextlib
import numbers
import warnings

import keras
from keras import ops

from keras_regkit._distribute import strategy_scope
from keras_regkit._utils import argument_error
from keras_regkit._utils import check_choice
from keras_regkit.callbacks._learning_rate import sync_model_state
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers
from keras_regkit.callbacks.batch_norm_statistics import (
    recompute_batchnorm_statistics,
)
from keras_regkit.callbacks.batch_norm_statistics import statistics_variables

__all__ = ["PolyakAveraging"]

# Attribute of the optimizer under which the averaging state is saved by
# `model.save_weights` (hence `BackupAndRestore`) on backends other than JAX.
_STATE_ATTRIBUTE = "_keras_regkit_polyak_averaging"
# Attribute marking a `train_step` wrapped by a `PolyakAveraging` callback.
_OWNER_ATTRIBUTE = "_keras_regkit_polyak_averaging_owner"
_VALIDATION_PREFIX = "val_average_"
_SCALE_LIMIT = 2.0**64
# Variables with fewer elements share one flat accumulator (see
# `_AveragingState`); measured on a 2-core CPU, grouping beyond this saves
# less than the concatenation costs.
_GROUP_BELOW = 2**14


def _is_float(variable):
    return keras.backend.is_float_dtype(variable.dtype)


def _may_skip_steps(optimizer):
    """Whether some train steps leave `optimizer.iterations` unchanged."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or bool(
        getattr(optimizer, "gradient_accumulation_steps", None)
    )


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def _read_int(variable):
    return int(ops.convert_to_numpy(variable))


class _AveragingState(keras.layers.Layer):
    """The averages and counters, as non-trainable float32 / int variables.

    A layer so that Keras's weight files save and load it: it is attached
    to the optimizer (TensorFlow, torch) or its variables are tracked by the
    optimizer (JAX, whose trainer threads optimizer variables through the
    compiled step), so `model.save_weights`, `BackupAndRestore` and
    `ModelCheckpoint` carry it with the optimizer state.
    """

    def __init__(self, sources, iteration, **kwargs):
        super().__init__(name="polyak_averaging", dtype="float32", **kwargs)
        # One accumulator per large variable; the small ones (biases, batch-
        # norm statistics) share one flat accumulator, so that the update
        # runs a few operations for all of them instead of a few each: on
        # a backend that launches one kernel per operation, their cost is
        # the launch, not the arithmetic.
        sizes = [_size(v) for v in sources]
        small = [i for i, size in enumerate(sizes) if size < _GROUP_BELOW]
        if len(small) < 2:
            small = []
        slots = [(i,) for i in range(len(sources)) if i not in small]
        if small:
            slots.append(tuple(small))
        self.members = tuple(slots)
        self.accumulators = [
            self.add_weight(
                shape=(
                    tuple(sources[slot[0]].shape)
                    if len(slot) == 1
                    else (sum(sizes[i] for i in slot),)
                ),
                initializer="zeros",
                dtype="float32",
                trainable=False,
                name=(
                    "accumulator_" + sources[slot[0]].path.replace("/", "_")
                    if len(slot) == 1
                    else "accumulator_small_variables"
                ),
            )
            for slot in slots
        ]
        self.scale = self.add_weight(
            shape=(),
            initializer="ones",
            dtype="float32",
            trainable=False,
            name="scale",
        )
        self.count = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="count",
        )
        self.skipped = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="skipped",
        )
        self.epochs_seen = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="epochs_seen",
        )
        iteration = ops.convert_to_tensor(iteration)
        self.last_iteration = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(
                int(ops.convert_to_numpy(iteration))
            ),
            dtype=keras.backend.standardize_dtype(iteration.dtype),
            trainable=False,
            name="last_iteration",
        )
        self.built = True

    def load_own_variables(self, store):
        if len(store.keys()) == 0:
            warnings.warn(
                "PolyakAveraging: the weights file holds no averaging state "
                "(it was saved without the callback); the averages start "
                "afresh.",
                stacklevel=2,
            )
            return
        super().load_own_variables(store)


@keras.saving.register_keras_serializable(package="keras_regkit")
class PolyakAveraging(keras.callbacks.Callback):
    """Averages the weights along the training trajectory, inside `fit`.

    Polyak-Ruppert averaging (Polyak & Juditsky, 1992), the exponential
    moving average of the weights as TensorFlow's `ExponentialMovingAverage`
    defines it, and stochastic weight averaging (SWA, Izmailov et al.,
    2018), for any optimizer and model. Training is unchanged: the optimizer
    steps the ordinary weights `w`, and the callback keeps float32 averages
    `avg` beside them. With `unit="step"` the update runs inside the
    compiled train step (`model.train_step` is wrapped for the duration of
    `fit` and traced with the optimizer's update: no Python per step or per
    variable), as one multiply and one in-place add per weight tensor (the
    small tensors share one): the average is kept as a scaled running sum
    `T` with `avg = T / scale`, so folding in `w` is `T += c * w` (see the
    comments in the code). Under XLA (`jit_compile=True`, or JAX) the whole
    update fuses into one pass. With `unit="epoch"` it runs once per epoch
    from the callback.

    Which iterates are averaged. Let `t` be the number of optimizer steps
    taken (`optimizer.iterations` after a step; with gradient accumulation,
    the accumulated updates) and `w_t` the weights after step `t`. With
    `unit="step"`, the weights `w_t` with `t > start` and
    `(t - start) % every == 0` are folded in, right after the step. With
    `unit="epoch"`, the weights at the end of epoch `e` (1-based) are folded
    in when `e > start` and `(e - start) % every == 0`. Let
    `w_(1), w_(2), ...` be the iterates folded in and `n` the number folded
    in before the current one. Then `avg_1 = w_(1)` and

    ```
    decay=None (uniform):  avg_(n+1) = avg_n + (w_(n+1) - avg_n) / (n + 1)
    decay=d    (EMA):      avg_(n+1) = avg_n - (1 - d_n) * (avg_n - w_(n+1))
                           d_n = d, or with warmup=True
                           d_n = min(d, (1 + n) / (10 + n))
    ```

    The uniform form is the running mean of the iterates (Polyak-Ruppert;
    SWA when the iterates are taken once per epoch or per learning-rate
    cycle). The EMA is TensorFlow's formula with `num_updates = n`; unlike
    TensorFlow, whose shadow variables start from the initial weights, the
    average starts at the first iterate, so it carries no trace of the
    initialization and needs no bias correction. SWA setups: uniform
    average once per epoch from epoch `s`,
    `PolyakAveraging(decay=None, start=s, unit="epoch")`; once per cycle of
    a cyclic learning rate of `c` steps (`keras_regkit.callbacks.CyclicLR`,
    whose cycle is `2 * step_size` steps, or `SnapshotEnsemble`),
    `PolyakAveraging(decay=None, every=c)`, which folds in the weights at
    the end of each cycle, where the learning rate is lowest.

    A step whose weights are not all finite (NaN or infinity: the sum of
    the differences `w - avg` is checked, which is not finite exactly when
    one of them is not) is never folded in; it is counted and a warning
    gives the count at the end of the epoch. Under a
    `keras.optimizers.LossScaleOptimizer` (mixed precision), the steps the
    loss scaling skips do not change `optimizer.iterations` and are not
    folded in either. The averages are float32 whatever the variables'
    dtype.

    Which variables. The trainable variables always. Batch-normalization
    statistics (`moving_mean`, `moving_variance`, the batch
    renormalization statistics) follow `batch_norm`:

    - `"average"` (default): averaged along with the weights, by the same
      formula. It needs no extra data and works with any input pipeline, and
      for an EMA with `decay` near 1 the averaged statistics describe
      weights close to the averaged ones (timm's `ModelEmaV3` does the
      same).
    - `"recompute"`: not averaged; whenever the averaged weights are put in
      the model (validation, end of training, `swap_weights()`), the
      statistics are recomputed for them over `batch_norm_data` with
      `recompute_batchnorm_statistics`. Averaged weights do not match
      averaged statistics, which matters for a uniform average over a wide
      stretch of the trajectory (SWA): its authors recompute, and this is
      the choice for SWA.

    Evaluation. With `validation_data`, at the end of each epoch (once
    something has been averaged) the averaged weights are swapped in,
    evaluated, and the training weights (and batch-norm statistics) are put
    back bit for bit; the averaged model's metrics go into `logs` as
    `val_average_<metric>` (`val_average_loss`, `val_average_accuracy`,
    ...), beside `fit`'s own `val_<metric>` of the training weights. Put
    callbacks that monitor them (`EarlyStopping`, `ModelCheckpoint`) after
    this one in the list. `swap_weights()` swaps the averages in for any
    code of your own.

    End of training. With `final_weights="average"` (default), the model
    holds the averaged weights when `fit` returns (statistics per
    `batch_norm`), so `model.save` and `model.export` carry them; with
    `"training"`, the model keeps its training weights and the averages are
    available from `get_averages()` and `swap_weights()`.

    State. The averages and counters are saved with the optimizer state by
    `model.save_weights`, so `keras.callbacks.BackupAndRestore` restores
    them and an interrupted run resumes to the same averages as an
    uninterrupted one (in either callback order). The state lives in the
    callback across `fit` calls: a second `fit` with the same callback
    continues the average; use a new callback to start afresh. `start` and
    `every` in steps count `optimizer.iterations`, which also runs on
    across `fit` calls; in epochs, they count the epochs of each `fit` call
    (as `initial_epoch` and `BackupAndRestore` number them). The train step
    is unwrapped when `fit` returns; a `fit` that raises leaves it wrapped
    until the next `fit` with a `PolyakAveraging` callback on that model.
    Under a `tf.distribute` strategy the state is created in the strategy's
    scope: each replica folds its copy of the (identical) weights into its
    copy of the averages once per step, so the averages equal one device's.

    Args:
        decay: float in (0, 1), or `None`. The EMA decay `d`; `None` takes
            the uniform (Polyak-Ruppert, SWA) average. Defaults to `0.999`.
        start: int >= 0. Steps (or epochs, see `unit`) of ordinary training
            before averaging begins. Defaults to `0`.
        every: int >= 1. Fold in one iterate every `every` steps (or
            epochs). Defaults to `1`.
        unit: `"step"` or `"epoch"`. What `start` and `every` count.
            Defaults to `"step"`.
        warmup: bool. Use the EMA warm-up `d_n = min(d, (1 + n) / (10 + n))`
            (only with a float `decay`). Defaults to `False`.
        batch_norm: `"average"` or `"recompute"`. What the averaged model's
            batch-normalization statistics are, see above. Defaults to
            `"average"`.
        batch_norm_data: The batches to recompute batch-norm statistics
            on, required with `batch_norm="recompute"` (typically the
            training data), in any form `recompute_batchnorm_statistics`
            takes. Defaults to `None`.
        batch_norm_steps: int or `None`. Number of batches of
            `batch_norm_data` to use; `None` uses all. Defaults to `None`.
        validation_data: Data to evaluate the averaged weights on at each
            epoch end: `(x, y)`, `(x, y, sample_weight)`, or a dataset as
            `model.evaluate` takes it. Defaults to `None` (no evaluation).
        validation_batch_size: int or `None`. Batch size for
            `validation_data` arrays. Defaults to `None` (`evaluate`'s 32).
        final_weights: `"average"` or `"training"`. What the model holds
            when `fit` returns. Defaults to `"average"`.
        verbose: int. 0 is silent; 1 prints the number of iterates averaged
            at each epoch end. Defaults to `0`.

    Raises:
        ValueError: at construction for a bad argument: `decay` outside
            (0, 1), `start` < 0, `every` < 1, an unknown `unit`,
            `batch_norm` or `final_weights`, `warmup` with `decay=None`,
            `batch_norm="recompute"` without `batch_norm_data` (or data
            without it); at the start of training for a model without an
            optimizer.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks import PolyakAveraging
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 4)).astype("float32")
    >>> y = x @ rng.normal(size=(4, 1)).astype("float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(0.05), "mse")
    >>> ema = PolyakAveraging(decay=0.9, start=4, validation_data=(x, y))
    >>> history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
    ...                     callbacks=[ema])
    >>> ema.num_averaged  # 12 steps, the first 4 not averaged
    8
    >>> "val_average_loss" in history.history
    True
    >>> averaged = ema.get_averages()  # the model holds them too
    >>> bool(np.array_equal(averaged[0], model.get_weights()[0]))
    True

    Reference:
    - [Polyak & Juditsky, 1992](https://doi.org/10.1137/0330046)
    - [TensorFlow `ExponentialMovingAverage`](
      https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage)
    - [Izmailov et al., 2018](https://arxiv.org/abs/1803.05407)
    """

    def __init__(
        self,
        decay=0.999,
        start=0,
        every=1,
        unit="step",
        warmup=False,
        batch_norm="average",
        batch_norm_data=None,
        batch_norm_steps=None,
        validation_data=None,
        validation_batch_size=None,
        final_weights="average",
        verbose=0,
    ):
        super().__init__()
        if decay is not None:
            if (
                isinstance(decay, bool)
                or not isinstance(decay, numbers.Real)
                or not 0 < decay < 1
            ):
                raise argument_error(
                    "decay",
                    "a float in (0, 1), or None for the uniform average",
                    decay,
                )
            decay = float(decay)
        self.decay = decay
        self.start = _check_int("start", start, 0)
        self.every = _check_int("every", every, 1)
        self.unit = check_choice("unit", unit, ("step", "epoch"))
        if not isinstance(warmup, bool):
            raise argument_error("warmup", "a bool", warmup)
        if warmup and decay is None:
            raise argument_error(
                "warmup",
                "False when decay=None (the warm-up applies to the EMA only)",
                warmup,
            )
        self.warmup = warmup
        self.batch_norm = check_choice(
            "batch_norm", batch_norm, ("average", "recompute")
        )
        if batch_norm == "recompute" and batch_norm_data is None:
            raise argument_error(
                "batch_norm_data",
                "the batches to recompute batch-norm statistics on when "
                "batch_norm='recompute'",
                batch_norm_data,
            )
        if batch_norm == "average" and batch_norm_data is not None:
            raise argument_error(
                "batch_norm",
                "'recompute' when batch_norm_data is given (with 'average' "
                "the statistics are averaged and the data would be unused)",
                batch_norm,
            )
        self.batch_norm_data = batch_norm_data
        self.batch_norm_steps = (
            None
            if batch_norm_steps is None
            else _check_int("batch_norm_steps", batch_norm_steps, 1)
        )
        self.validation_data = validation_data
        self.validation_batch_size = (
            None
            if validation_batch_size is None
            else _check_int("validation_batch_size", validation_batch_size, 1)
        )
        self.final_weights = check_choice(
            "final_weights", final_weights, ("average", "training")
        )
        self.verbose = verbose

        self._state = None
        self._state_model = None
        self._sources = []
        self._attached = None
        self._cached_train_function = None
        self._skipped_reported = 0

    def get_config(self):
        return {
            "decay": self.decay,
            "start": self.start,
            "every": self.every,
            "unit": self.unit,
            "warmup": self.warmup,
            "batch_norm": self.batch_norm,
            "batch_norm_data": self.batch_norm_data,
            "batch_norm_steps": self.batch_norm_steps,
            "validation_data": self.validation_data,
            "validation_batch_size": self.validation_batch_size,
            "final_weights": self.final_weights,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # Public state ----------------------------------------------------------

    @property
    def averaged_variables(self):
        """The model variables being averaged, in `get_averages()` order."""
        return list(self._sources)

    @property
    def num_averaged(self):
        """Number of iterates folded into the average so far."""
        if self._state is None:
            return 0
        self._sync()
        return _read_int(self._state.count)

    @property
    def num_skipped(self):
        """Number of iterates skipped because their weights were not finite."""
        if self._state is None:
            return 0
        self._sync()
        return _read_int(self._state.skipped)

    def get_averages(self):
        """Returns the averages as float32 NumPy arrays.

        In the order of `averaged_variables`: the trainable variables, then,
        with `batch_norm="average"`, the batch-norm statistics.
        """
        if self._state is None:
            return []
        self._sync()
        return [ops.convert_to_numpy(a) for a in self._average_values()]

    @contextlib.contextmanager
    def swap_weights(self):
        """Context manager: the model holds the averaged weights inside it.

        The training weights (and batch-norm statistics) are restored bit
        for bit on exit, even if the body raises.

        Raises:
            RuntimeError: if nothing has been averaged yet.
        """
        backup = self._swap_in()
        try:
            yield self.model
        finally:
            self._restore(backup)

    # Installation ----------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        self._install(model)

    def _select_sources(self, model):
        sources = [v for v in model.trainable_variables if _is_float(v)]
        if self.batch_norm == "average":
            seen = {id(v) for v in sources}
            for layer in batch_norm_layers(model):
                for v in statistics_variables(layer):
                    if _is_float(v) and id(v) not in seen:
                        seen.add(id(v))
                        sources.append(v)
        return sources

    def _install(self, model):
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None or not model.built:
            return
        sources = self._select_sources(model)
        same = (
            self._state is not None
            and self._state_model is model
            and len(sources) == len(self._sources)
            and all(a is b for a, b in zip(sources, self._sources))
        )
        if self._attached is not None and (
            not same or self._attached["optimizer"] is not optimizer
        ):
            self._detach()
        if not same:
            if self._state is not None:
                warnings.warn(
                    "PolyakAveraging: the model or its trainable variables "
                    "changed; the averages start afresh.",
                    stacklevel=2,
                )
            # In the strategy's scope, each replica keeps a copy of the
            # averages and folds its (identical) weights in once per step;
            # outside it, every replica would fold into one shared copy.
            with strategy_scope(model):
                self._state = _AveragingState(sources, optimizer.iterations)
            self._state_model = model
            self._sources = sources
            self._skipped_reported = 0
            self._cached_train_function = None
        if self._attached is None:
            self._attach(model, optimizer)

    def _attach(self, model, optimizer):
        _detach_foreign(model, optimizer, self)
        state = self._state
        if keras.backend.backend() == "jax":
            for variable in state.weights:
                optimizer._track_variable(variable)
        else:
            setattr(optimizer, _STATE_ATTRIBUTE, state)
        setattr(optimizer, _OWNER_ATTRIBUTE, self)
        own_step = model.__dict__.get("train_step")
        if self.unit == "step":
            original = model.train_step
            if keras.backend.backend() == "jax":
                step = self._jax_train_step(model, optimizer, original)
            else:

                def step(data):
                    logs = original(data)
                    self._update_in_step(optimizer)
                    return logs

            setattr(step, _OWNER_ATTRIBUTE, self)
            model.train_step = step
            # Keras builds the train function after `set_model`: without a
            # cached one, it traces the wrapped step. A function traced for
            # an earlier `fit` with this callback is reused if the model was
            # not compiled again since (compile makes a new loss tracker).
            cached = self._cached_train_function
            model.train_function = (
                cached[0]
                if cached is not None
                and cached[1] is getattr(model, "_loss_tracker", None)
                and cached[2] is optimizer
                else None
            )
        self._attached = {
            "model": model,
            "optimizer": optimizer,
            "own_step": own_step,
            "wrapped": self.unit == "step",
        }

    def _jax_train_step(self, model, optimizer, original):
        def step(state, data):
            logs, state = original(state, data)
            trainable, non_trainable, optimizer_values, metrics = state
            mapping = (
                list(zip(model.trainable_variables, trainable))
                + list(zip(model.non_trainable_variables, non_trainable))
                + list(zip(optimizer.variables, optimizer_values))
            )
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self._update_in_step(optimizer)
            optimizer_values = [
                scope.get_current_value(v) for v in optimizer.variables
            ]
            return logs, (trainable, non_trainable, optimizer_values, metrics)

        return step

    def _detach(self):
        attached, self._attached = self._attached, None
        if attached is None:
            return
        model, optimizer = attached["model"], attached["optimizer"]
        if attached["wrapped"]:
            current = model.__dict__.get("train_step")
            if getattr(current, _OWNER_ATTRIBUTE, None) is self:
                if attached["own_step"] is None:
                    del model.train_step
                else:
                    model.train_step = attached["own_step"]
            self._cached_train_function = (
                model.train_function,
                getattr(model, "_loss_tracker", None),
                optimizer,
            )
            model.train_function = None
        if keras.backend.backend() == "jax":
            for variable in self._state.weights:
                optimizer._untrack_variable(variable)
        elif getattr(optimizer, _STATE_ATTRIBUTE, None) is self._state:
            delattr(optimizer, _STATE_ATTRIBUTE)
        if getattr(optimizer, _OWNER_ATTRIBUTE, None) is self:
            delattr(optimizer, _OWNER_ATTRIBUTE)

    # The update ------------------------------------------------------------
    #
    # The state holds, for each averaged variable, a float32 accumulator `T`
    # and one shared float32 `scale` with `average = T / scale`. Folding in
    # an iterate `w` with weight `r` (`avg' = (1 - r) avg + r w`) is then
    # `scale' = scale / (1 - r)`, `T' = T + r * scale' * w`: one multiply
    # and one in-place add per variable, where the textbook update needs a
    # subtraction, a multiply and an add (this is the step's main cost on
    # backends that do not fuse element-wise operations). For the uniform
    # average, `scale = n` and `T` is the plain running sum. An EMA's scale
    # grows as `d ** -n`; it is folded back into `T` (`T /= scale`,
    # `scale = 1`) whenever it passes 2 ** 64, once every
    # `44 / (1 - d)` iterates. The first iterate sets `T = w` and
    # `scale = 1` (`T` is zero before it).

    def _coefficients(self, count, scale):
        """`(c, scale')`: the multiplier of `w` (`None` for 1), new scale."""
        n = ops.cast(count, "float32")
        if self.decay is None:
            return None, n + 1.0
        rate = 1.0 - self.decay
        if self.warmup:
            # 1 - min(d, (1 + n) / (10 + n)), written to keep float32 exact.
            rate = ops.maximum(rate, 9.0 / (10.0 + n))
            new_scale = scale / (1.0 - rate)
        else:
            new_scale = scale * (1.0 / self.decay)
        first = ops.equal(n, 0.0)
        new_scale = ops.where(first, 1.0, new_scale)
        return ops.where(first, 1.0, rate * new_scale), new_scale

    def _update_in_step(self, optimizer):
        """Runs inside the traced train step, after the optimizer's update."""
        if (
            self.start == 0
            and self.every == 1
            and not _may_skip_steps(optimizer)
        ):
            # Every step updates the weights and is folded in.
            self._fold(True)
            return
        state = self._state
        iteration = ops.convert_to_tensor(optimizer.iterations)
        # A step the optimizer did not take (a loss-scale skip, a gradient
        # accumulation step) leaves its counter unchanged.
        due = ops.not_equal(iteration, state.last_iteration)
        offset = iteration - self.start
        if self.start > 0:
            due = ops.logical_and(due, ops.greater(offset, 0))
        if self.every > 1:
            due = ops.logical_and(
                due, ops.equal(ops.mod(offset, self.every), 0)
            )
        state.last_iteration.assign(iteration)
        self._fold(due)

    def _fold(self, due, eager=False):
        """Folds the current weights into the average where `due` holds.

        `due` is a scalar boolean tensor, or `True`. `eager`: called from
        Python (at an epoch end), not while the train step is traced.
        """
        if not eager and not self._select() and self.every > 1:
            # Most steps are not due: skip the finiteness check on them.
            ops.cond(due, lambda: self._check_and_fold(True), lambda: None)
        else:
            self._check_and_fold(due, eager)

    def _select(self):
        """Whether the traced step selects (`where`) rather than branches.

        JAX traces without side effects, so it must select; XLA (JAX, or
        TensorFlow with `jit_compile`) fuses the selection into the update
        itself, where a branch would copy the accumulators in and out.
        Without XLA, a branch skips the work on steps that fold nothing.
        """
        return keras.backend.backend() == "jax" or bool(
            getattr(self.model, "jit_compile", False)
        )

    def _slot_values(self):
        """The current weights, one float32 tensor per accumulator."""
        values = []
        for slot in self._state.members:
            if len(slot) == 1:
                values.append(ops.cast(self._sources[slot[0]], "float32"))
            else:
                values.append(
                    ops.concatenate(
                        [
                            ops.reshape(
                                ops.cast(self._sources[i], "float32"), (-1,)
                            )
                            for i in slot
                        ]
                    )
                )
        return values

    def _check_and_fold(self, due, eager=False):
        state = self._state
        accumulators = state.accumulators
        weights = self._slot_values()
        # Not finite exactly when some weight is NaN or infinite (barring a
        # float32 overflow of the sum, i.e. weights near 1e38).
        finite = ops.isfinite(ops.sum(ops.stack([ops.sum(w) for w in weights])))

        if self._select() and (not eager or keras.backend.backend() == "jax"):
            fold = ops.logical_and(due, finite)
            state.skipped.assign_add(
                ops.cast(ops.logical_and(due, ops.logical_not(finite)), "int32")
            )
            scale = ops.convert_to_tensor(state.scale)
            coefficient, new_scale = self._coefficients(state.count, scale)
            overflow = ops.logical_and(fold, new_scale > _SCALE_LIMIT)
            for t, w in zip(accumulators, weights):
                value = ops.convert_to_tensor(t)
                added = value + (w if coefficient is None else coefficient * w)
                value = ops.where(fold, added, value)
                t.assign(ops.where(overflow, value / new_scale, value))
            state.scale.assign(
                ops.where(overflow, 1.0, ops.where(fold, new_scale, scale))
            )
            state.count.assign_add(ops.cast(fold, "int32"))
            return

        def fold_in():
            coefficient, new_scale = self._coefficients(
                state.count, state.scale
            )
            for t, w in zip(accumulators, weights):
                t.assign_add(w if coefficient is None else w * coefficient)
            state.count.assign_add(1)
            if coefficient is None:
                state.scale.assign(new_scale)
                return

            def rescale():
                for t in accumulators:
                    t.assign(t / new_scale)
                state.scale.assign(1.0)

            def keep():
                state.scale.assign(new_scale)

            ops.cond(new_scale > _SCALE_LIMIT, rescale, keep)

        def skip():
            # Not folded in: either not due, or due with non-finite weights.
            state.skipped.assign_add(ops.cast(due, "int32"))

        if eager:
            if bool(ops.convert_to_numpy(ops.logical_and(due, finite))):
                fold_in()
            else:
                skip()
        elif due is True:
            ops.cond(finite, fold_in, skip)
        else:
            ops.cond(ops.logical_and(due, finite), fold_in, skip)

    def _average_values(self):
        """The averages, as float32 tensors, in the order of the sources."""
        state = self._state
        scale = ops.convert_to_tensor(state.scale)
        values = [None] * len(self._sources)
        for slot, t in zip(state.members, state.accumulators):
            average = ops.convert_to_tensor(t) / scale
            if len(slot) == 1:
                values[slot[0]] = average
                continue
            begin = 0
            for i in slot:
                variable = self._sources[i]
                end = begin + _size(variable)
                values[i] = ops.reshape(
                    average[begin:end], tuple(variable.shape)
                )
                begin = end
        return values

    def _epoch_due(self, completed):
        offset = completed - self.start
        return offset > 0 and offset % self.every == 0

    def _epoch_check(self, completed):
        """Folds in the weights at the end of epoch `completed` if due."""
        if self._epoch_due(completed):
            self._fold(True, eager=True)
        self._state.epochs_seen.assign(completed)

    # Swapping --------------------------------------------------------------

    def _sync(self):
        if self.model is not None:
            sync_model_state(self.model)

    def _swap_in(self):
        """Puts the averages in the model; returns what to restore."""
        self._sync()
        if self._state is None or _read_int(self._state.count) == 0:
            raise RuntimeError(
                "PolyakAveraging has no averages yet: nothing has been "
                f"averaged (start={self.start}, unit={self.unit!r})."
            )
        model = self.model
        touched = list(self._sources)
        if self.batch_norm == "recompute":
            seen = {id(v) for v in touched}
            for layer in batch_norm_layers(model):
                for v in layer.non_trainable_variables:
                    # Statistics, and counters the recomputation sets.
                    if id(v) not in seen:
                        seen.add(id(v))
                        touched.append(v)
        backup = [(v, ops.convert_to_numpy(v)) for v in touched]
        for variable, average in zip(self._sources, self._average_values()):
            variable.assign(ops.cast(average, variable.dtype))
        if self.batch_norm == "recompute":
            recompute_batchnorm_statistics(
                model, self.batch_norm_data, steps=self.batch_norm_steps
            )
        return backup

    @staticmethod
    def _restore(backup):
        for variable, value in backup:
            variable.assign(value)

    def _evaluate_average(self, logs):
        data = self.validation_data
        if isinstance(data, (tuple, list)):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                tuple(data)
            )
        else:
            x, y, sample_weight = data, None, None
        with self.swap_weights() as model:
            results = model.evaluate(
                x,
                y,
                sample_weight=sample_weight,
                batch_size=self.validation_batch_size,
                verbose=0,
                return_dict=True,
            )
        for name, value in results.items():
            logs[_VALIDATION_PREFIX + name] = value

    # Callback hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        if getattr(self.model, "optimizer", None) is None:
            raise ValueError(
                "PolyakAveraging needs a compiled model with an optimizer. "
                "Call `model.compile(optimizer=...)` before `fit`."
            )
        if self._attached is None:
            # The model was not built when `fit` set it; its state could not
            # be restored by a `BackupAndRestore` that ran before this.
            self._install(self.model)
            self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch, logs=None):
        if self.unit != "epoch" or epoch == 0:
            return
        self._sync()
        if _read_int(self._state.epochs_seen) == epoch - 1:
            # Resumed from a checkpoint saved (by a callback placed before
            # this one) before the end-of-epoch check of epoch `epoch`: the
            # restored weights are those of that epoch's end.
            self._epoch_check(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._sync()
        if self.unit == "epoch":
            self._epoch_check(epoch + 1)
        skipped = _read_int(self._state.skipped)
        if skipped > self._skipped_reported:
            warnings.warn(
                f"PolyakAveraging skipped {skipped - self._skipped_reported} "
                "iterate(s) whose weights were not finite (NaN or infinity); "
                "they were not folded into the average.",
                stacklevel=2,
            )
            self._skipped_reported = skipped
        count = _read_int(self._state.count)
        if self.validation_data is not None and count > 0 and logs is not None:
            self._evaluate_average(logs)
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: PolyakAveraging has averaged {count} "
                "iterate(s)."
            )

    def on_train_end(self, logs=None):
        self._sync()
        self._detach()
        if self._state is None or self.final_weights != "average":
            return
        if _read_int(self._state.count) == 0:
            warnings.warn(
                "PolyakAveraging averaged nothing during this fit (start="
                f"{self.start} {self.unit}s was not reached); the model keeps "
                "its training weights.",
                stacklevel=2,
            )
            return
        self._swap_in()


def _detach_foreign(model, optimizer, owner):
    """Detaches another callback's averaging left on `model` or `optimizer`.

    A `fit` that raised never reached `on_train_end`, so its callback is
    still attached; a new callback (a resumed run) replaces it.
    """
    step = model.__dict__.get("train_step")
    for other in (
        getattr(step, _OWNER_ATTRIBUTE, None),
        getattr(optimizer, _OWNER_ATTRIBUTE, None),
    ):
        if other is not None and other is not owner:
            other._detach()


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise argument_error(name, f"an int >= {minimum}", value)
    return int(value)
