"""Private base for callbacks that set the learning rate per iteration.

`IterationLearningRateCallback` (CyclicLR, OneCycle, SnapshotEnsemble,
LRRangeTest) acts between steps through public state only: before each
training batch it reads the optimizer's own step counter
(`optimizer.iterations`, saved and restored with the optimizer, so policies
continue across `fit` calls and `BackupAndRestore` resumption) and assigns
the public `optimizer.learning_rate`. With `keras.optimizers.SGD` and a
positive momentum it can also cycle the momentum exactly, by rescaling SGD's
public momentum slots before each step (`_SGDMomentum`).

Nothing happens at batch end. Keras dispatches steps asynchronously only
while no callback has an `on_train_batch_end`; with one, it converts each
step's logs to Python numbers and waits for the step, which costs a small
model more than the step. The counter is read once per epoch and counted
after (`IterationCounter`), and the rates are copied to the device 64 at a
time: one copy per step also costs about a small step.
"""

import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_regkit._training import IterationCounter
from keras_regkit._training import claim
from keras_regkit._training import compiled
from keras_regkit._training import inner_optimizer
from keras_regkit._training import read_iterations
from keras_regkit._training import release
from keras_regkit._training import sync_model_state
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_verbose

__all__ = [
    "IterationLearningRateCallback",
    "check_momentum_bounds",
    "check_settable_learning_rate",
    "steps_per_execution",
]


def check_momentum_bounds(base_momentum, max_momentum):
    """Checks `0 <= base_momentum <= max_momentum <= 1`, or both `None`.

    Returns both as floats, or `(None, None)`.
    """
    if base_momentum is None and max_momentum is None:
        return None, None
    if base_momentum is None or max_momentum is None:
        name, other = (
            ("base_momentum", "max_momentum")
            if base_momentum is None
            else ("max_momentum", "base_momentum")
        )
        raise argument_error(
            name,
            f"a float in [0, 1] when `{other}` is given (set both, or "
            "neither to leave the momentum alone)",
            None,
        )
    base = check_float_in_range(
        "base_momentum", base_momentum, 0.0, 1.0, True, True
    )
    top = check_float_in_range(
        "max_momentum", max_momentum, 0.0, 1.0, True, True
    )
    if top < base:
        raise argument_error(
            "max_momentum", f"a float >= base_momentum={base!r}", max_momentum
        )
    return base, top


def check_settable_learning_rate(callback, optimizer):
    """Raises `ValueError` if `callback` cannot set `optimizer`'s rate."""
    rate = inner_optimizer(optimizer).learning_rate
    settable = isinstance(rate, keras.Variable)
    if not settable:
        raise ValueError(
            f"{type(callback).__name__} sets the learning rate itself, but "
            "the optimizer's learning rate is a `LearningRateSchedule` or a "
            "callable, which cannot be set (`optimizer.learning_rate` is "
            "not a variable). Compile with a float learning rate (e.g. "
            f"`{type(optimizer).__name__}(learning_rate=1e-3)`), or use "
            "the schedule alone without this callback."
        )


def steps_per_execution(model):
    """The model's `steps_per_execution` (set by `compile`), as an int."""
    return int(getattr(model, "steps_per_execution", 1) or 1)


class IterationLearningRateCallback(keras.callbacks.Callback):
    """Sets `optimizer.learning_rate` from `optimizer.iterations` each batch.

    Subclasses implement `learning_rate_at(iteration)` (a pure function of the
    0-based iteration, in Python floats) and may override
    `check_optimizer(optimizer)`. To cycle the momentum as well, they set
    `self.cycles_momentum = True` and implement `momentum_at(iteration)`.

    Epoch `logs` get the `learning_rate` (and `momentum`) of the last step
    taken, as the optimizer holds it, so `History` and `TensorBoard` (which
    reads `optimizer.learning_rate`) agree, and so does `CSVLogger` listed
    after this callback (Keras hands the epoch logs to the callbacks in
    order). Batch logs carry none: the rate of the running step is
    `optimizer.learning_rate`. Work after a step (Nesterov's momentum
    correction) is done before the next one and at the epoch end
    (`finish_step`).

    Args:
        verbose: int. 0 is silent, 1 prints the learning rate at each epoch
            end. Defaults to `0`.
    """

    # The schedule that gives exact per-iteration rates inside the step,
    # named in the `steps_per_execution` warning.
    schedule_form = None

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = check_verbose(verbose)
        self.cycles_momentum = False
        self._last_learning_rate = None
        self._last_momentum = None
        self._momentum = None
        self._rate_dtype = "float32"
        self._warned = set()
        self._counter = IterationCounter()
        self._table = None

    def set_model(self, model):
        super().set_model(model)
        # `self.model` syncs the JAX training state at each access.
        self._target = model

    def learning_rate_at(self, iteration):
        raise NotImplementedError

    def momentum_at(self, iteration):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def check_optimizer(self, optimizer):
        """Raises `ValueError` if `optimizer`'s learning rate can't be set."""
        check_settable_learning_rate(self, optimizer)

    def steps_per_execution_note(self, group):
        """The warning given when `steps_per_execution > 1` (`None`: none)."""
        held = f"the learning rate is set once per execution, held for {group}"
        if self.cycles_momentum:
            held += " steps, and the momentum is not cycled"
        else:
            held += " steps"
        note = (
            f"{type(self).__name__}: the model was compiled with "
            f"steps_per_execution={group}, so Keras calls batch callbacks "
            f"once per {group} steps: {held}."
        )
        if self.schedule_form:
            note += (
                " For a learning rate exact at every iteration, compile the "
                f"optimizer with `{self.schedule_form}` instead."
            )
        return note

    def warn_once(self, message):
        """Warns with `message` once per callback."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an "
                "optimizer. Call `model.compile(optimizer=...)` before `fit`."
            )
        self.check_optimizer(optimizer)
        claim(self, "learning_rate")
        self._rate_dtype = inner_optimizer(optimizer).learning_rate.dtype
        self._last_learning_rate = None
        self._last_momentum = None
        self._momentum = None
        self._table = None
        self._counter.reset(self.model)
        group = steps_per_execution(self.model)
        if group > 1:
            note = self.steps_per_execution_note(group)
            if note:
                self.warn_once(note)
        if self.cycles_momentum and group == 1:
            self._momentum = self._momentum_cycle(optimizer)

    def _momentum_cycle(self, optimizer):
        """An `_SGDMomentum` for `optimizer`, or `None` after a warning."""
        inner = inner_optimizer(optimizer)
        name = type(inner).__name__
        if isinstance(inner, keras.optimizers.SGD):
            if not inner.momentum:
                reason = (
                    f"the optimizer {name} was created with momentum=0, so "
                    "it keeps no momentum to cycle"
                )
            elif getattr(inner, "gradient_accumulation_steps", None):
                reason = (
                    f"the optimizer {name} accumulates gradients, so it "
                    "updates its momentum only every few iterations"
                )
            else:
                return _SGDMomentum(inner)
        elif hasattr(inner, "beta_1") or hasattr(inner, "momentum"):
            attribute = "beta_1" if hasattr(inner, "beta_1") else "momentum"
            reason = (
                f"the optimizer {name} reads its `{attribute}` as a constant "
                "of the compiled training step, which a callback cannot "
                "change between steps"
            )
        else:
            reason = f"the optimizer {name} has no momentum"
        self.warn_once(
            f"{type(self).__name__} cycles the learning rate only: {reason}. "
            "The momentum is cycled with `keras.optimizers.SGD(momentum=...)` "
            "(momentum > 0); pass `base_momentum=None, max_momentum=None` to "
            "cycle the learning rate alone without this warning."
        )
        return None

    def on_epoch_begin(self, epoch, logs=None):
        self._counter.reset(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        model = self._target
        self.finish_step()
        iteration = self._counter.now(model)
        self._counter.advance()
        self.before_step(iteration)
        # On JAX the assignment must reach the state of the next step.
        sync_model_state(model)
        rate, self._last_learning_rate = self._rate(iteration)
        if self._momentum is None:
            inner_optimizer(model.optimizer).learning_rate = rate
        else:
            momentum = self.momentum_at(iteration)
            self._momentum.before_step(iteration, momentum, rate)
            self._last_momentum = momentum

    def before_step(self, iteration):
        """Called before each step's rate is set; `iteration`: steps taken.

        The weights are those the previous step left (Nesterov correction
        included). Subclasses override it to act on them.
        """

    def _rate(self, iteration):
        """`(tensor, float)`: the rate of `iteration` as the optimizer holds it.

        Rates are converted to tensors `_TABLE` iterations at a time: one
        host-to-device copy per step costs about as much as a small step.
        """
        table = self._table
        if (
            table is None
            or not 0 <= iteration - table[0] < len(table[1])
            # Used once: JAX donates the buffers of the training state, so a
            # tensor assigned to the rate variable is gone after the step
            # (an iteration comes again after a loss-scale skip).
            or table[2][iteration - table[0]] is None
        ):
            values = []
            for ahead in range(iteration, iteration + _TABLE):
                try:
                    values.append(self.learning_rate_at(ahead))
                except ValueError:
                    # Past the end of a finite policy: raised when reached.
                    break
            if not values:
                values.append(self.learning_rate_at(iteration))
            padded = values + values[-1:] * (_TABLE - len(values))
            # The variable's dtype (float32 by default), as TensorBoard
            # reads it back.
            array = np.asarray(padded, dtype=self._rate_dtype)
            table = self._table = (
                iteration,
                [float(v) for v in array[: len(values)]],
                list(_unstacked(array)),
            )
        offset = iteration - table[0]
        tensor, table[2][offset] = table[2][offset], None
        return tensor, table[1][offset]

    def finish_step(self):
        """Completes the previous step's Nesterov momentum, if one is due.

        Called before the next step and at the epoch and training ends.
        """
        if self._momentum is not None:
            self._momentum.after_step(
                self._target, checked=not self._counter.counting
            )

    def current_logs(self):
        """`{"learning_rate": ..., "momentum": ...}` of the last step taken."""
        if self._last_learning_rate is None:
            return {}
        logs = {"learning_rate": self._last_learning_rate}
        if self._momentum is not None and self._last_momentum is not None:
            logs["momentum"] = self._last_momentum
        return logs

    def on_epoch_end(self, epoch, logs=None):
        self.finish_step()
        current = self.current_logs()
        if not current:
            return
        if logs is not None:
            logs.update(current)
        if self.verbose:
            parts = ", ".join(f"{k} {v:.6g}" for k, v in current.items())
            print(f"\nEpoch {epoch + 1}: {type(self).__name__} {parts}.")

    def on_train_end(self, logs=None):
        self.finish_step()
        release(self, "learning_rate")
        self._momentum = None


# Learning rates converted to tensors at once (see `_rate`).
_TABLE = 64
_UNSTACK = {}


def _unstacked(array):
    """`array`'s entries as separate tensors, from one compiled call."""
    backend = keras.backend.backend()
    function = _UNSTACK.get(backend)
    if function is None:
        function = _UNSTACK[backend] = compiled(ops.unstack)
    return function(array)


def _scaled(slots, _, factor):
    return [ops.multiply(m, ops.cast(factor, m.dtype)) for m in slots]


def _nesterov_corrected(weights, slots, coefficient):
    return [
        ops.add(w, ops.multiply(ops.cast(coefficient, w.dtype), m))
        for w, m in zip(weights, slots)
    ]


# optimizer -> {kind: update function}, so that consecutive `fit` calls (and
# new callbacks on the same optimizer) reuse the traced functions.
_UPDATES = weakref.WeakKeyDictionary()
_COMPILED = {}


def _variable_update(targets, sources, function, rate_variable=None):
    """`update(scalar[, rate])`: sets each of `targets` to `function(...)`.

    `function(target_values, source_values, scalar)` is a pure `keras.ops`
    function. With `rate_variable` (the optimizer's learning rate), `update`
    also assigns `rate` to it. On TensorFlow one `tf.function` reads and
    assigns every variable (one dispatch per call, where eager code would
    dispatch two operations per variable, and one more for the rate);
    elsewhere the function is compiled by `keras_regkit._training.compiled`
    and its outputs are assigned.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function(autograph=False)
        def assign_all(scalar, *rate):
            values = function(
                [t.value for t in targets], [s.value for s in sources], scalar
            )
            for target, value in zip(targets, values):
                target.assign(value)
            if rate_variable is not None:
                rate_variable.assign(rate[0])

        # Calling the concrete function skips the argument matching of a
        # `tf.function` call, about half of its cost here.
        specs = [tf.TensorSpec((), "float32")]
        if rate_variable is not None:
            specs.append(tf.TensorSpec((), rate_variable.dtype))
        concrete = assign_all.get_concrete_function(*specs)
        return lambda scalar, *rate: concrete(
            tf.constant(scalar, "float32"), *rate
        )
    pure = _COMPILED.get(function)
    if pure is None:
        pure = _COMPILED[function] = compiled(function)

    def assign_all(scalar, *rate):
        values = pure(
            [t.value for t in targets],
            [s.value for s in sources],
            np.float32(scalar),
        )
        for target, value in zip(targets, values):
            target.assign(value)
        if rate_variable is not None:
            rate_variable.assign(rate[0])

    return assign_all


class _SGDMomentum:
    """Per-iteration momentum for `keras.optimizers.SGD` (momentum > 0).

    Keras SGD updates `m = beta0 * m - lr * g; w += m` (Nesterov:
    `w += beta0 * m - lr * g`), with `beta0` the float it was built with,
    compiled into the step. Scaling the momentum slots by `beta / beta0` just
    before a step makes that step `m = beta * m - lr * g`; for Nesterov,
    adding `(beta - beta0) * m` to the weights after the step completes
    `w += beta * m - lr * g`. Both are exact for that iteration.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.beta = float(optimizer.momentum)
        self.nesterov = bool(optimizer.nesterov)
        # (iteration, ratio) of the last rescale; the step may not have
        # happened yet (or been skipped by a LossScaleOptimizer).
        self.pending = None

    def _slots(self):
        return [m for m in self.optimizer.momentums if m is not None]

    def _update(self, kind, make):
        updates = _UPDATES.setdefault(self.optimizer, {})
        if kind not in updates:
            updates[kind] = make()
        return updates[kind]

    def before_step(self, iteration, momentum, rate):
        """Sets the step's learning rate `rate` and momentum `momentum`."""
        # Not scaled twice for one iteration (it comes again after a
        # loss-scale skip).
        if self.pending is None or self.pending[0] != iteration:
            ratio = momentum / self.beta
            self.pending = (iteration, ratio)
            # An unbuilt optimizer creates its slots at zero: nothing to
            # scale.
            if ratio != 1.0 and self.optimizer.built:
                # The rate is assigned in the same call: on TensorFlow an
                # eager assignment costs about as much as the call.
                scale = self._update(
                    "scale",
                    lambda: _variable_update(
                        self._slots(), [], _scaled, self.optimizer.learning_rate
                    ),
                )
                scale(ratio, rate)
                return
        self.optimizer.learning_rate = rate

    def after_step(self, model, checked=True):
        """Completes the Nesterov update; `checked`: verify the step ran."""
        if not self.nesterov or self.pending is None:
            return
        iteration, ratio = self.pending
        sync_model_state(model)
        if checked and read_iterations(model.optimizer) != iteration + 1:
            return  # the step was skipped
        coefficient = self.beta * ratio - self.beta
        if coefficient:
            self._update("nesterov", lambda: self._nesterov_update(model))(
                coefficient
            )
        self.pending = None

    def _nesterov_update(self, model):
        weights = list(model.trainable_variables)
        slots = list(self.optimizer.momentums)
        if len(weights) != len(slots) or any(
            m is not None and tuple(m.shape) != tuple(w.shape)
            for w, m in zip(weights, slots)
        ):
            raise ValueError(
                "Cycling the momentum of Nesterov SGD corrects each weight "
                "with its momentum slot, but the model's trainable variables "
                "no longer match the variables the optimizer was built with "
                "(a layer was frozen or added after the first `fit`). "
                "Compile the model again with a new optimizer."
            )
        pairs = [(w, m) for w, m in zip(weights, slots) if m is not None]
        return _variable_update(
            [w for w, _ in pairs], [m for _, m in pairs], _nesterov_corrected
        )
