"""Weight averaging during `fit`: EMA, Polyak-Ruppert and SWA."""

import contextlib
import hashlib
import numbers
import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_regkit._distribute import is_chief
from keras_regkit._distribute import strategy_scope
from keras_regkit._training import IterationCounter
from keras_regkit._training import claim
from keras_regkit._training import read_iterations
from keras_regkit._training import release
from keras_regkit._training import sync_model_state
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_averaging
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_int
from keras_regkit._validation import check_verbose
from keras_regkit.callbacks import _averaging
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers
from keras_regkit.callbacks.batch_norm_statistics import (
    recompute_batchnorm_statistics,
)
from keras_regkit.callbacks.batch_norm_statistics import statistics_variables

__all__ = ["PolyakAveraging"]

_VALIDATION_PREFIX = "val_average_"


@keras.saving.register_keras_serializable(package="keras_regkit")
class PolyakAveraging(keras.callbacks.Callback):
    """Averages the weights along the training trajectory (EMA, Polyak, SWA).

    The optimizer trains the weights `w` as usual; the callback keeps float32
    averages of them beside. After each optimizer step `t` (the value of
    `optimizer.iterations`) with `t > start` and `(t - start) % every == 0`
    it folds the weights in; with `unit="epoch"`, at the end of each such
    epoch, counting the epochs trained with this callback. With
    `w_(1), w_(2), ...` the iterates folded in and `n` the number before the
    current one, `avg_1 = w_(1)` and

    ```
    decay=None:  avg_(n+1) = avg_n + (w_(n+1) - avg_n) / (n + 1)
    decay=d:     avg_(n+1) = avg_n - (1 - d_n) * (avg_n - w_(n+1))
                 d_n = d, or min(d, (1 + n) / (10 + n)) with warmup=True
    ```

    The iterate of step `t` is folded in before step `t + 1` (or at the
    epoch end) rather than at batch end, so that `fit` keeps dispatching its
    steps asynchronously; the averages read through this callback's methods
    are always caught up.

    `decay=None` is the running mean of Polyak-Ruppert averaging, and SWA
    with `unit="epoch"` or with `every` set to the cycle of a cyclic
    learning rate. A float `decay` is TensorFlow's `ExponentialMovingAverage`,
    started at the first iterate instead of the initial weights (so it needs
    no bias correction). An iterate with a non-finite weight is skipped with
    a warning, and so is a step that a `LossScaleOptimizer` skips. With
    `validation_data` the averages are evaluated at each epoch end and
    logged as `val_average_<metric>`: list the callbacks that read them
    (`CSVLogger`, `EarlyStopping`) after this one. When `fit` returns, the
    model holds the averages (`final_weights="average"`) or its training
    weights; a later `fit` with the same callback resumes from the training
    weights and continues the average. `swap_weights()` and
    `averaged_model()` give the averages at any time. To resume an
    interrupted run exactly, pass `backup_dir` the directory of a
    `keras.callbacks.BackupAndRestore` listed after this callback: the
    state is written there at each epoch end and restored by the next `fit`.

    Args:
        decay: float in (0, 1), or `None` for the uniform average. The EMA
            decay `d`. Defaults to `0.999`.
        start: int >= 0. Steps (epochs with `unit="epoch"`) of training
            before the first iterate is taken. Defaults to `0`.
        every: int >= 1. Take one iterate every `every` steps (epochs).
            With `steps_per_execution=k` the callback sees every `k`-th
            step, so `start`, `every` and the steps per epoch must be
            multiples of `k`. Defaults to `1`.
        unit: `"step"` or `"epoch"`. What `start` and `every` count.
            Defaults to `"step"`.
        warmup: bool. The EMA warm-up of `d_n` above. Defaults to `False`.
        batch_norm: `"average"` (average the batch-norm statistics with the
            weights) or `"recompute"` (recompute them over `batch_norm_data`
            whenever the averages enter the model). Defaults to `"average"`.
        batch_norm_data: With `"recompute"`: the inputs, as arrays or a
            re-iterable dataset, as `recompute_batchnorm_statistics` takes
            them. Defaults to `None`.
        batch_norm_steps: int or `None`. Batches of `batch_norm_data` to
            use (`None`: all). Defaults to `None`.
        validation_data: `(x, y)`, `(x, y, sample_weight)` or a re-iterable
            dataset, to evaluate the averages on. Defaults to `None`.
        validation_batch_size: int or `None`. Batch size for arrays in
            `validation_data`. Defaults to `None` (`evaluate`'s 32).
        final_weights: `"average"` or `"training"`: what the model holds
            when `fit` returns. Defaults to `"average"`.
        backup_dir: str or `None`. Directory where the state is written
            at each epoch end for resumption. Defaults to `None`.
        verbose: int. 0 is silent; 1 prints the number of iterates averaged
            at each epoch end. Defaults to `0`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks import PolyakAveraging
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x @ np.ones((4, 1), "float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(0.05), "mse")
    >>> ema = PolyakAveraging(decay=0.9, start=4, validation_data=(x, y))
    >>> history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
    ...                     callbacks=[ema])
    >>> ema.num_averaged  # 12 steps, the first 4 not averaged
    8
    >>> "val_average_loss" in history.history
    True
    >>> swa = ema.averaged_model()  # a keras.Model holding the averages

    Reference:
    - [Polyak & Juditsky, 1992](https://doi.org/10.1137/0330046)
    - [Izmailov et al., 2018](https://arxiv.org/abs/1803.05407)
    - [TensorFlow `ExponentialMovingAverage`](
      https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage)
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
        backup_dir=None,
        verbose=0,
    ):
        super().__init__()
        self.decay, self.start, self.every, self.warmup = check_averaging(
            decay, start, every, warmup
        )
        self.unit = str(check_choice("unit", unit, ("step", "epoch")))
        self.batch_norm = str(
            check_choice("batch_norm", batch_norm, ("average", "recompute"))
        )
        if self.batch_norm == "recompute":
            _check_data("batch_norm_data", batch_norm_data, tuples="inputs")
        elif batch_norm_data is not None:
            raise argument_error(
                "batch_norm",
                "'recompute' when batch_norm_data is given (with 'average' "
                "the statistics are averaged and the data would be unused)",
                batch_norm,
            )
        self.batch_norm_data = batch_norm_data
        self.batch_norm_steps = check_int(
            "batch_norm_steps", batch_norm_steps, minimum=1, allow_none=True
        )
        if validation_data is not None:
            _check_data("validation_data", validation_data, tuples="xy")
        self.validation_data = validation_data
        self.validation_batch_size = check_int(
            "validation_batch_size",
            validation_batch_size,
            minimum=1,
            allow_none=True,
        )
        self.final_weights = str(
            check_choice(
                "final_weights", final_weights, ("average", "training")
            )
        )
        if backup_dir is not None:
            if not isinstance(backup_dir, (str, os.PathLike)) or not str(
                os.fspath(backup_dir)
            ):
                raise argument_error(
                    "backup_dir", "a directory path (str), or None", backup_dir
                )
            backup_dir = os.fspath(backup_dir)
            if os.path.exists(backup_dir) and not os.path.isdir(backup_dir):
                raise argument_error(
                    "backup_dir", "a directory, not a file", backup_dir
                )
        self.backup_dir = backup_dir
        self.verbose = check_verbose(verbose)

        self._target = None  # The model of the running `fit`.
        self._state_model = None  # The model the state below averages.
        self._sources = []
        self._shapes = []
        self._slots = ()
        self._accumulators = []
        self._scale = self._count = self._skipped = None
        self._tf_fold = None
        self._epochs = 0  # Epochs trained with this callback on `_model`.
        self._last_iteration = 0
        self._starting = False
        self._in_fit = False  # From the first epoch to the end of a `fit`.
        self._counter = IterationCounter()
        self._saved_states = None
        self._skipped_reported = 0
        self._kept = None  # Training weights kept while the model holds avg.

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
            "backup_dir": self.backup_dir,
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
        self._catch_up(read=True)
        return 0 if self._count is None else _read_int(self._count)

    @property
    def num_skipped(self):
        """Number of iterates skipped because their weights were not finite."""
        return 0 if self._skipped is None else _read_int(self._skipped)

    def get_averages(self):
        """The averages as float32 NumPy arrays, in `averaged_variables` order.

        The trainable variables, then, with `batch_norm="average"`, the
        batch-norm statistics.
        """
        if self._count is None:
            return []
        self._catch_up(read=True)
        return [ops.convert_to_numpy(a) for a in self._average_values()]

    @contextlib.contextmanager
    def swap_weights(self):
        """Context manager in which the model holds the averaged weights.

        The training weights (and batch-norm statistics) are put back bit
        for bit on exit, even if the body raises.

        Raises:
            RuntimeError: if nothing has been averaged yet.
        """
        model = self._require_averages()
        sync_model_state(model)
        backup = self._put_averages(model)
        try:
            yield model
        finally:
            _restore(backup)

    def averaged_model(self):
        """A new `keras.Model` holding the averages.

        A clone of the architecture (`keras.models.clone_model`, so a
        Sequential or functional model) whose weights are the averages
        (batch-norm statistics per `batch_norm`), and whose other variables
        are copied from the model. The training model is left as it is. The
        clone is not compiled; it can be saved and exported.

        Raises:
            RuntimeError: if nothing has been averaged yet.
        """
        model = self._require_averages()
        sync_model_state(model)
        clone = keras.models.clone_model(model)
        targets = clone.weights
        if [tuple(v.shape) for v in targets] != [
            tuple(v.shape) for v in model.weights
        ]:
            raise ValueError(
                f"{type(self).__name__}.averaged_model() could not rebuild the "
                "model with `keras.models.clone_model` (the clone's variables "
                "do not match the model's). Use `swap_weights()` to evaluate "
                "or save the averages in the model itself."
            )
        clone.set_weights(model.get_weights())
        position = {id(v): i for i, v in enumerate(model.weights)}
        for variable, average in zip(self._sources, self._average_values()):
            target = targets[position[id(variable)]]
            target.assign(ops.cast(average, target.dtype))
        if self.batch_norm == "recompute":
            recompute_batchnorm_statistics(
                clone, self.batch_norm_data, steps=self.batch_norm_steps
            )
        return clone

    # Callback hooks --------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        # On JAX, `self.model` syncs the training state at each access; the
        # hooks use this reference and sync once, when they need to.
        self._target = model

    def on_train_begin(self, logs=None):
        model = self._target
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an "
                "optimizer. Call `model.compile(optimizer=...)` before `fit`."
            )
        self._check_steps_per_execution(model)
        self._check_batch_norm_data(model)
        claim(self, "averaging")
        self._in_fit = False
        self._put_back_training_weights(model)
        sources = self._select_sources(model)
        if (
            self._state_model is not model
            or len(sources) != len(self._sources)
            or any(a is not b for a, b in zip(sources, self._sources))
        ):
            if self._state_model is not None:
                warnings.warn(
                    f"{type(self).__name__}: the model or its variables "
                    "changed since the last `fit`; the averages start afresh.",
                    stacklevel=2,
                )
            self._build_state(model, sources)
        self._saved_states = None
        if self.backup_dir is not None and os.path.isdir(self.backup_dir):
            self._saved_states = _averaging.read_states(self.backup_dir)
        self._starting = True

    def on_epoch_begin(self, epoch, logs=None):
        self._counter.reset(self._target)
        if not self._starting:
            return
        # Here, rather than in `on_train_begin`, so that a BackupAndRestore
        # listed after this callback has restored the model already.
        self._starting = False
        sync_model_state(self._target)
        iteration = read_iterations(self._target.optimizer)
        if self._saved_states:
            self._restore_saved_state(iteration)
        self._saved_states = None
        self._last_iteration = iteration
        self._in_fit = True

    def on_train_batch_begin(self, batch, logs=None):
        # The iterate of the previous step is folded here, before the next
        # step, rather than at batch end: a batch-end hook would cost `fit`
        # its asynchronous dispatch of steps (see `IterationCounter`).
        if self.unit != "step":
            return
        self._catch_up()
        self._counter.advance()

    def _catch_up(self, read=False):
        """Folds the latest iterate in, if it is due and not yet folded.

        `read`: read the optimizer's counter rather than the Python count
        (for calls from outside the callback hooks).
        """
        if not self._in_fit or self.unit != "step":
            return
        if read:
            sync_model_state(self._target)
            iteration = read_iterations(self._target.optimizer)
        else:
            iteration = self._counter.now(self._target)
        last, self._last_iteration = self._last_iteration, iteration
        # A step the optimizer did not apply (a loss-scale skip) leaves
        # `iterations`, and the count, unchanged.
        if self._due_count(iteration) > self._due_count(last):
            sync_model_state(self._target)
            self._fold()

    def on_epoch_end(self, epoch, logs=None):
        model = self._target
        self._catch_up()
        sync_model_state(model)
        self._epochs += 1
        if self.unit == "epoch":
            offset = self._epochs - self.start
            if offset > 0 and offset % self.every == 0:
                self._fold()
        skipped = _read_int(self._skipped)
        if skipped > self._skipped_reported:
            warnings.warn(
                f"{type(self).__name__} skipped "
                f"{skipped - self._skipped_reported} iterate(s) whose weights "
                "were not finite (NaN or infinity); "
                "they were not folded into the average.",
                stacklevel=2,
            )
            self._skipped_reported = skipped
        count = _read_int(self._count)
        if self.validation_data is not None and count > 0 and logs is not None:
            self._evaluate_average(logs)
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} has averaged "
                f"{count} iterate(s)."
            )
        if self.backup_dir is not None and is_chief(model):
            self._write_state(read_iterations(model.optimizer))

    def on_train_end(self, logs=None):
        model = self._target
        self._catch_up()
        self._in_fit = False
        sync_model_state(model)
        release(self, "averaging")
        if self.backup_dir is not None and is_chief(model):
            _averaging.remove_states(self.backup_dir)
        if self.final_weights != "average":
            return
        if _read_int(self._count) == 0:
            warnings.warn(
                f"{type(self).__name__} averaged nothing during this fit "
                f"(start={self.start} {self.unit}s was not reached); the model "
                "keeps its training weights.",
                stacklevel=2,
            )
            return
        backup = self._put_averages(model)
        self._kept = (model, backup, _fingerprint(v for v, _ in backup))

    # Checks ----------------------------------------------------------------

    def _check_steps_per_execution(self, model):
        steps = int(getattr(model, "steps_per_execution", 1) or 1)
        if self.unit != "step" or steps == 1:
            return
        per_epoch = (self.params or {}).get("steps")
        for name, value in (
            ("every", self.every),
            ("start", self.start),
            ("steps per epoch", per_epoch),
        ):
            if value is not None and value % steps:
                raise ValueError(
                    f"PolyakAveraging(unit='step') with steps_per_execution="
                    f"{steps}: the callback sees the weights once every "
                    f"{steps} steps, so {name}={value} would fold in other "
                    f"iterates than asked for. Make `start`, `every` and the "
                    f"steps per epoch multiples of {steps} (every={steps} and "
                    f"decay=d**{steps} keep the horizon of an EMA of decay d "
                    "per step), or use unit='epoch'."
                )

    def _check_batch_norm_data(self, model):
        """Calls the model on one batch of `batch_norm_data`."""
        if self.batch_norm != "recompute" or not any(
            layer.trainable for layer in batch_norm_layers(model)
        ):
            return
        try:
            x = _first_inputs(self.batch_norm_data)
            model(x, training=False)
        except Exception as error:
            raise argument_error(
                "batch_norm_data",
                "inputs that the model accepts (calling the model on its "
                f"first batch raised {type(error).__name__}: {error})",
                _Shown(self.batch_norm_data),
            ) from error

    # State -----------------------------------------------------------------

    def _select_sources(self, model):
        sources = [
            v
            for v in model.trainable_variables
            if keras.backend.is_float_dtype(v.dtype)
        ]
        if self.batch_norm == "average":
            seen = {id(v) for v in sources}
            for layer in batch_norm_layers(model):
                for v in statistics_variables(layer):
                    if (
                        keras.backend.is_float_dtype(v.dtype)
                        and id(v) not in seen
                    ):
                        seen.add(id(v))
                        sources.append(v)
        return sources

    def _build_state(self, model, sources):
        self._state_model = model
        self._sources = sources
        self._shapes = [tuple(int(d) for d in v.shape) for v in sources]
        self._slots = _averaging.layout(self._shapes)
        # In the strategy's scope the state is placed and mirrored like the
        # model's variables.
        with strategy_scope(model):
            self._accumulators = [
                _variable(shape, "float32", "zeros", f"accumulator_{i}")
                for i, shape in enumerate(
                    _averaging.accumulator_shapes(self._slots, self._shapes)
                )
            ]
            self._scale = _variable((), "float32", "ones", "scale")
            self._count = _variable((), "int32", "zeros", "count")
            self._skipped = _variable((), "int32", "zeros", "skipped")
        self._epochs = 0
        self._skipped_reported = 0
        self._kept = None
        self._tf_fold = None

    def _due_count(self, iteration):
        """Number of due iterates up to step `iteration`."""
        if iteration <= self.start:
            return 0
        return (iteration - self.start) // self.every

    def _fold(self):
        state = [
            [t.value for t in self._accumulators],
            self._scale.value,
            self._count.value,
            self._skipped.value,
            [v.value for v in self._sources],
        ]
        if keras.backend.backend() != "tensorflow":
            fold = _averaging.fold_function(
                self.decay, self.warmup, self._slots
            )
            accumulators, scale, count, skipped = fold(*state)
            for variable, value in zip(self._accumulators, accumulators):
                variable.assign(value)
            self._scale.assign(scale)
            self._count.assign(count)
            self._skipped.assign(skipped)
            return
        if self._tf_fold is None:
            # XLA fuses the update into one pass over each accumulator; it
            # cannot update the per-device copies of a `tf.distribute`
            # strategy. The concrete function skips the argument matching
            # of a `tf.function` call, a large part of its cost here.
            strategy = self._state_model.distribute_strategy
            xla = strategy.num_replicas_in_sync == 1
            self._tf_fold = _averaging.fold_function(
                self.decay, self.warmup, self._slots, xla
            ).get_concrete_function(*state)
        self._tf_fold(*state)

    def _average_values(self):
        return _averaging.average_values(
            self._slots, self._accumulators, self._scale, self._shapes
        )

    def _require_averages(self):
        self._catch_up(read=True)
        if self._count is None or _read_int(self._count) == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no averages yet: nothing has been "
                f"averaged (start={self.start}, unit={self.unit!r})."
            )
        return self._state_model

    def _put_averages(self, model):
        """Puts the averages in `model`; returns what to restore."""
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

    def _put_back_training_weights(self, model):
        """Undoes `final_weights="average"` of the last `fit`, if still there.

        So that a second `fit` continues the training trajectory. Weights
        the user set since are kept.
        """
        kept, self._kept = self._kept, None
        if kept is None or kept[0] is not model:
            return
        _, backup, fingerprint = kept
        if _fingerprint(v for v, _ in backup) == fingerprint:
            _restore(backup)

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

    # Backup files ----------------------------------------------------------

    def _signature(self):
        return _averaging.signature(
            {
                "decay": self.decay,
                "warmup": self.warmup,
                "batch_norm": self.batch_norm,
            },
            [str(v.dtype) for v in self._sources],
            self._shapes,
        )

    def _write_state(self, iteration):
        arrays = {
            "signature": np.array(self._signature()),
            "iterations": np.array(iteration, np.int64),
            "epochs": np.array(self._epochs, np.int64),
            "scale": ops.convert_to_numpy(self._scale),
            "count": ops.convert_to_numpy(self._count),
            "skipped": ops.convert_to_numpy(self._skipped),
        }
        for i, t in enumerate(self._accumulators):
            arrays[f"accumulator_{i}"] = ops.convert_to_numpy(t)
        # Two files, written in turn: if the process dies between this write
        # and BackupAndRestore's, the state of the previous epoch, which
        # matches BackupAndRestore's checkpoint, is still on disk.
        name = _averaging.STATE_FILES[self._epochs % 2]
        _averaging.write_state(self.backup_dir, name, arrays)

    def _restore_saved_state(self, iteration):
        signature = self._signature()
        matching = [
            s
            for s in self._saved_states
            if int(s["iterations"]) == iteration
            and str(s["signature"]) == signature
        ]
        if not matching:
            saved = sorted(int(s["iterations"]) for s in self._saved_states)
            warnings.warn(
                f"{type(self).__name__}: the states in "
                f"backup_dir={self.backup_dir!r} were saved at step(s) {saved} "
                "(or for another model), but "
                f"training resumes at step {iteration}; they are not "
                "restored. Pair `backup_dir` with a "
                "`keras.callbacks.BackupAndRestore(save_freq='epoch')`.",
                stacklevel=2,
            )
            return
        state = max(matching, key=lambda s: int(s["epochs"]))
        for i, t in enumerate(self._accumulators):
            t.assign(state[f"accumulator_{i}"])
        self._scale.assign(state["scale"])
        self._count.assign(state["count"])
        self._skipped.assign(state["skipped"])
        self._skipped_reported = int(state["skipped"])
        self._epochs = int(state["epochs"])


class _Shown:
    """Shows a data argument in an error message without printing it all."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        shape = getattr(self.value, "shape", None)
        if shape is not None and hasattr(self.value, "dtype"):
            return f"<{type(self.value).__name__} of shape {tuple(shape)}>"
        text = repr(self.value)
        return text if len(text) <= 80 else text[:77] + "..."


def _is_array(value):
    return isinstance(value, np.ndarray) or ops.is_tensor(value)


def _is_arrays(value):
    """Whether `value` is an array or a non-empty dict of arrays."""
    if isinstance(value, dict):
        return bool(value) and all(_is_array(v) for v in value.values())
    return _is_array(value)


def _check_examples(name, data, arrays):
    leaves = arrays.values() if isinstance(arrays, dict) else [arrays]
    if any(len(a.shape) == 0 or int(a.shape[0]) == 0 for a in leaves):
        raise argument_error(
            name, "arrays with at least one example", _Shown(data)
        )


def _check_data(name, data, tuples):
    """Validates a data argument at construction.

    `tuples="inputs"` (`batch_norm_data`): arrays `x`, an `(x, y)` tuple of
    them, a list of batches, or a dataset. `tuples="xy"`
    (`validation_data`): an `(x, y[, sample_weight])` tuple, or a dataset.
    """
    if tuples == "inputs":
        expected = (
            "arrays `x` (or a dict of them, or an `(x, y)` tuple), a list "
            "of batches, or a re-iterable dataset (a `tf.data.Dataset`, a "
            "`keras.utils.PyDataset`)"
        )
        if _is_arrays(data):
            return _check_examples(name, data, data)
        if isinstance(data, tuple) and data and _is_arrays(data[0]):
            return _check_examples(name, data, data[0])
        if isinstance(data, list) and not data:
            raise argument_error(name, expected + ", not empty", data)
    else:
        expected = (
            "an `(x, y)` or `(x, y, sample_weight)` tuple of arrays, or a "
            "re-iterable dataset (a `tf.data.Dataset`, a "
            "`keras.utils.PyDataset`)"
        )
        if isinstance(data, (tuple, list)):
            if len(data) not in (2, 3) or not _is_arrays(data[0]):
                raise argument_error(name, expected, _Shown(data))
            return _check_examples(name, data, data[0])
        if _is_arrays(data):
            raise argument_error(name, expected, _Shown(data))
    if data is None or isinstance(data, (str, bytes, numbers.Number)):
        raise argument_error(name, expected, data)
    try:
        iterator = iter(data)
    except TypeError:
        raise argument_error(name, expected, _Shown(data)) from None
    if iterator is data:
        raise argument_error(
            name,
            expected + "; a generator or iterator is read once, and this "
            "callback reads the data again at every use",
            _Shown(data),
        )


def _first_inputs(data):
    """The inputs of the first batch of `batch_norm_data`."""
    if _is_arrays(data):
        source = data
    elif isinstance(data, tuple) and data and _is_arrays(data[0]):
        source = data[0]
    else:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(next(iter(data)))
        if keras.backend.backend() != "tensorflow":
            x = keras.tree.map_structure(np.asarray, x)
        return x
    return keras.tree.map_structure(lambda a: a[:2], source)


def _variable(shape, dtype, initializer, name):
    return keras.Variable(
        keras.initializers.get(initializer),
        shape=shape,
        dtype=dtype,
        trainable=False,
        name=f"polyak_averaging_{name}",
    )


def _read_int(variable):
    return int(ops.convert_to_numpy(variable))


def _restore(backup):
    for variable, value in backup:
        variable.assign(value)


def _fingerprint(variables):
    digest = hashlib.blake2b(digest_size=16)
    for variable in variables:
        value = np.ascontiguousarray(ops.convert_to_numpy(variable))
        digest.update(str((value.dtype, value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
