"""Private base for callbacks that set the learning rate per iteration.

`IterationLearningRateCallback` (SnapshotEnsemble, LRRangeTest): before each
training batch, read the optimizer's own step counter
(`optimizer.iterations`) and assign the learning rate the policy gives for
that iteration. Reading the optimizer's counter, not a Python counter, keeps the
policy right across several `fit` calls and across `BackupAndRestore`
resumption, because the counter is part of the optimizer state that Keras saves
and restores.

With `steps_per_execution=N`, Keras calls batch hooks once per execution, so
the learning rate is set for the first iteration of each group of N and held
for the N steps. For an exact per-iteration value inside the compiled step,
compile the optimizer with the schedule form instead (`keras_regkit.schedules`).

`InStepLearningRateCallback` (CyclicLR, OneCycle) goes further: for the
length of `fit` it puts the policy itself inside the compiled training step,
computed from `optimizer.iterations` at every iteration (exact with
`steps_per_execution > 1`, and nothing to assign between batches), and it can
cycle the momentum the same way. See its docstring for how it stays out of
the optimizer's saved state and config.
"""

import numbers

import keras

from keras_regkit._utils import argument_error
from keras_regkit._utils import check_float_in_range


def sync_model_state(model):
    """Makes the model's variables current during `fit` on the JAX backend.

    The JAX trainer keeps the training state outside the variables between
    steps; a callback that reads or assigns variables mid-epoch must first
    write that state back (Keras re-reads it before the next step).
    """
    if keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def read_iterations(optimizer):
    """Returns `optimizer.iterations` as a Python int."""
    # `int()` on the scalar is about 3x cheaper than a NumPy round trip, and
    # this runs at every batch. Under a `tf.distribute` strategy the variable
    # is mirrored and has no `__int__`; its NumPy value is the same on every
    # replica.
    try:
        return int(optimizer.iterations)
    except TypeError:
        return int(keras.ops.convert_to_numpy(optimizer.iterations))


class IterationLearningRateCallback(keras.callbacks.Callback):
    """Sets `optimizer.learning_rate` from `optimizer.iterations` each batch.

    Subclasses implement `learning_rate_at(iteration)` (a pure function of the
    0-based iteration, in Python floats) and may override
    `check_optimizer(optimizer)`.

    Args:
        verbose: int. 0 is silent, 1 prints the learning rate at each epoch
            end. Defaults to `0`.
    """

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self._last_learning_rate = None

    def learning_rate_at(self, iteration):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def check_optimizer(self, optimizer):
        """Raises `ValueError` if `optimizer`'s learning rate can't be set."""
        schedule = keras.optimizers.schedules.LearningRateSchedule
        learning_rate = getattr(optimizer, "_learning_rate", None)
        if isinstance(learning_rate, schedule):
            raise ValueError(
                f"{type(self).__name__} sets the learning rate itself, but the "
                "optimizer was compiled with a `LearningRateSchedule` "
                f"({type(optimizer._learning_rate).__name__}), whose learning "
                "rate cannot be set. Compile with a float learning rate "
                f"(e.g. `{type(optimizer).__name__}(learning_rate=1e-3)`), or "
                "use the schedule alone without this callback."
            )
        if callable(learning_rate) and not isinstance(
            learning_rate, keras.Variable
        ):
            raise ValueError(
                f"{type(self).__name__} sets the learning rate itself, but the "
                "optimizer was compiled with a callable learning rate "
                f"({learning_rate!r}), which cannot be set. Compile with a "
                f"float learning rate (e.g. `{type(optimizer).__name__}"
                "(learning_rate=1e-3)`)."
            )

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an "
                "optimizer. Call `model.compile(optimizer=...)` before `fit`."
            )
        self.check_optimizer(optimizer)

    def on_train_batch_begin(self, batch, logs=None):
        sync_model_state(self.model)
        optimizer = self.model.optimizer
        learning_rate = self.learning_rate_at(read_iterations(optimizer))
        optimizer.learning_rate = learning_rate
        self._last_learning_rate = learning_rate

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and self._last_learning_rate is not None:
            logs["learning_rate"] = self._last_learning_rate

    def on_epoch_end(self, epoch, logs=None):
        if self._last_learning_rate is None:
            return
        if logs is not None:
            logs["learning_rate"] = self._last_learning_rate
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} learning rate "
                f"{self._last_learning_rate:.6g}."
            )


MOMENTUM_ATTRIBUTES = ("momentum", "beta_1")


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


def _inner_optimizer(optimizer):
    """The optimizer that applies the updates (inside a LossScaleOptimizer)."""
    return getattr(optimizer, "inner_optimizer", None) or optimizer


class CycledHyperparameter(keras.Variable):
    """Stands in for an optimizer's float `momentum` or `beta_1` during `fit`.

    Keras optimizers keep these as Python floats, which the compiled step
    reads once, when it is traced, so assigning a new float later changes
    nothing. In their place this variable is read by the step at every
    iteration; the in-step learning-rate schedule assigns it the policy's
    value once per step, before the updates read it (once per model
    variable). The optimizers also test the float in Python while tracing
    (`if self.momentum != 0:` in SGD, `> 0` in RMSprop) to decide whether
    they keep momentum slots; comparisons here answer for the value the
    optimizer was built with, so those branches stay as built.
    """

    def __init__(self, value, name):
        self.built_value = float(value)
        super().__init__(
            float(value), dtype="float32", trainable=False, name=name
        )

    __hash__ = keras.Variable.__hash__

    def __eq__(self, other):
        return self.built_value == other

    def __ne__(self, other):
        return self.built_value != other

    def __lt__(self, other):
        return self.built_value < other

    def __le__(self, other):
        return self.built_value <= other

    def __gt__(self, other):
        return self.built_value > other

    def __ge__(self, other):
        return self.built_value >= other


class _InStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The optimizer's learning rate while an in-step policy is installed.

    The optimizer evaluates it at every step before its updates; it also
    assigns the cycled momentum there, so that the updates, which read the
    momentum once per model variable, find it computed once.
    """

    def __init__(self):
        self.in_step = None
        self.momentum = None
        self.momentum_in_step = None

    def __call__(self, step):
        if self.momentum_in_step is not None:
            self.momentum.assign(self.momentum_in_step())
        return self.in_step()

    def get_config(self):
        return {}


class _GuardedTrainFunction:
    """The model's train function while (and after) a policy owns it.

    It runs the step traced with the policy only inside a `fit` that
    installed the policy (same `History` object, policy still active). Any
    other caller (a `fit` without the callback, `train_on_batch`, or a `fit`
    after one that stopped with an exception) gets the policy taken off the
    optimizer and a freshly traced step, so the cycle never leaks into
    training that did not ask for it. Attribute access goes to the traced
    function (TensorBoard reads its graph).
    """

    def __init__(self, model, optimizer, state, function):
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.function = function

    def __call__(self, *args, **kwargs):
        state = self.state
        history = getattr(self.model, "history", None)
        if state["active"] and history is state["history"]:
            return self.function(*args, **kwargs)
        if state["active"]:
            _remove_policy(self.optimizer, state)
        state["function"] = None
        self.model.train_function = None
        self.model.make_train_function()
        return self.model.train_function(*args, **kwargs)

    def __getattr__(self, name):
        if name == "function":  # not set yet (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.function, name)


def _remove_policy(optimizer, state):
    """Puts the optimizer's float learning rate and momentum back."""
    state["variable"].assign(state["learning_rate"])
    object.__setattr__(optimizer, "_learning_rate", state["variable"])
    state["schedule"].in_step = None
    state["schedule"].momentum_in_step = None
    momentum = state["momentum"]
    if momentum is not None and state["momentum_value"] is not None:
        object.__setattr__(
            optimizer, momentum.name_in_optimizer, state["momentum_value"]
        )
    if "get_config" in optimizer.__dict__:
        object.__delattr__(optimizer, "get_config")
    state["active"] = False


class InStepLearningRateCallback(IterationLearningRateCallback):
    """Runs a learning-rate (and momentum) policy inside the compiled step.

    For the length of `fit` the optimizer's learning rate is replaced by a
    schedule that evaluates `learning_rate_tensor(optimizer.iterations)` in
    the compiled training step, so every iteration gets its exact value (also
    with `steps_per_execution > 1`) and nothing is assigned between batches.
    With `cycles_momentum`, the optimizer's float `momentum` or `beta_1` is
    replaced by a `CycledHyperparameter` that the schedule assigns
    `momentum_tensor(optimizer.iterations)` at every step. After each batch the callback
    reads the counter and writes the values of the last step into `logs`.

    What stays as it was: the optimizer's tracked variables (the
    learning-rate variable keeps its place, so `BackupAndRestore` checkpoints
    and `.keras` files hold the same variables); its `get_config`, which
    reports the current learning rate and momentum as floats (so a model
    saved mid-`fit` by `ModelCheckpoint` loads without this package's
    classes); and training outside this callback (`on_train_end` puts the
    floats back, at their last values, and a `_GuardedTrainFunction` makes
    any other `fit` trace a plain step, even after a `fit` that raised). The
    traced step is kept for the next `fit` with an equal policy, so repeated
    `fit` calls trace once.

    On the JAX backend the policy is not put in the step: JAX caches compiled
    steps by function, so a later `fit` would reuse a step with (or without)
    the policy regardless of the optimizer's state. There the callback falls
    back to `IterationLearningRateCallback`'s per-batch assignment (the rate
    held over groups of `steps_per_execution`) and refuses momentum cycling.

    Subclasses implement `learning_rate_at` / `learning_rate_tensor`
    (Python float / tensor of the 0-based iteration), `policy_key()` (equal
    for policies that trace the same step) and, to cycle the momentum, set
    `self.cycles_momentum = True` and implement `momentum_at` /
    `momentum_tensor`.

    Args:
        verbose: int. 0 is silent, 1 prints the learning rate (and momentum)
            at each epoch end. Defaults to `0`.
    """

    _STATE = "_keras_regkit_in_step_policy"

    def __init__(self, verbose=0):
        super().__init__(verbose=verbose)
        self.cycles_momentum = False
        self._last_momentum = None
        self._momentum_attribute = None
        self._installed = None
        self._in_step = True

    def learning_rate_tensor(self, iteration):
        raise NotImplementedError

    def momentum_at(self, iteration):
        raise NotImplementedError

    def momentum_tensor(self, iteration):
        raise NotImplementedError

    def policy_key(self):
        raise NotImplementedError

    def check_optimizer(self, optimizer):
        inner = _inner_optimizer(optimizer)
        state = inner.__dict__.get(self._STATE)
        if state is not None and inner._learning_rate is state["schedule"]:
            # Left in place by a `fit` that raised; `_install` takes over.
            return
        super().check_optimizer(optimizer)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._in_step = keras.backend.backend() != "jax"
        if self._in_step:
            self._install()
        elif self.cycles_momentum:
            raise ValueError(
                f"{type(self).__name__} cannot cycle the momentum on the JAX "
                "backend: the JAX trainer reuses its compiled step across "
                "`fit` calls, so the momentum cannot be computed inside it, "
                "and the optimizer's float momentum is a constant of that "
                "step. Pass `base_momentum=None, max_momentum=None` to cycle "
                "only the learning rate, or use the TensorFlow backend."
            )

    def on_train_batch_begin(self, batch, logs=None):
        if not self._in_step:
            super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if not self._in_step:
            super().on_train_batch_end(batch, logs)
            return
        self._read_current()
        if logs is not None:
            logs.update(self._current_logs())

    def on_epoch_end(self, epoch, logs=None):
        if not self._in_step:
            super().on_epoch_end(epoch, logs)
            return
        if self._installed is None:
            return
        self._read_current()
        _, state = self._installed
        # Checkpoints written at the epoch end hold the current rate.
        state["variable"].assign(self._last_learning_rate)
        if logs is not None:
            logs.update(self._current_logs())
        if self.verbose:
            parts = [f"learning rate {self._last_learning_rate:.6g}"]
            if self._momentum_attribute is not None:
                parts.append(
                    f"{self._momentum_attribute} {self._last_momentum:.6g}"
                )
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} "
                f"{', '.join(parts)}."
            )

    def on_train_end(self, logs=None):
        if self._installed is None:
            return
        self._read_current()
        optimizer, state = self._installed
        _remove_policy(optimizer, state)
        self._installed = None

    def _current_logs(self):
        logs = {"learning_rate": self._last_learning_rate}
        if self._momentum_attribute is not None:
            logs[self._momentum_attribute] = self._last_momentum
        return logs

    def _read_current(self):
        """The values of the last step taken (of iteration 0 before any)."""
        sync_model_state(self.model)
        optimizer, state = self._installed
        iteration = max(read_iterations(optimizer) - 1, 0)
        self._last_learning_rate = self.learning_rate_at(iteration)
        state["learning_rate"] = self._last_learning_rate
        if self._momentum_attribute is not None:
            self._last_momentum = self.momentum_at(iteration)
            state["momentum_value"] = self._last_momentum

    def _momentum_variable(self, optimizer, state):
        owner = type(self).__name__
        attribute = next(
            (a for a in MOMENTUM_ATTRIBUTES if hasattr(optimizer, a)), None
        )
        if attribute is None:
            raise ValueError(
                f"{owner} cycles the momentum, but the optimizer "
                f"{type(optimizer).__name__} has neither `momentum` nor "
                "`beta_1`. Use an optimizer that has one (SGD or RMSprop "
                "with momentum > 0, Adam, AdamW, Nadam, Adamax, Lion), or "
                "pass `base_momentum=None, max_momentum=None`."
            )
        value = getattr(optimizer, attribute)
        if isinstance(value, CycledHyperparameter):
            value = value.built_value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"{owner} cycles the momentum, but the optimizer's "
                f"`{attribute}` is not a float (received: {attribute}="
                f"{value!r}). Create the optimizer with a float "
                f"`{attribute}`, or pass `base_momentum=None, "
                "max_momentum=None`."
            )
        if attribute == "momentum" and value == 0:
            name = type(optimizer).__name__
            raise ValueError(
                f"{owner} cycles the momentum, but the optimizer {name} was "
                "created with momentum=0.0, so it keeps no momentum slots. "
                f"Create it with a positive momentum, e.g. `keras.optimizers."
                f"{name}(learning_rate=0.01, momentum=0.9)`, or pass "
                "`base_momentum=None, max_momentum=None`."
            )
        variable = state["momentum"]
        if (
            variable is None
            or variable.name_in_optimizer != attribute
            or variable.built_value != value
        ):
            variable = CycledHyperparameter(value, name=f"cycled_{attribute}")
            variable.name_in_optimizer = attribute
            state["momentum"] = variable
        return variable

    def _install(self):
        model = self.model
        optimizer = _inner_optimizer(model.optimizer)
        state = optimizer.__dict__.get(self._STATE)
        if state is None:
            state = {
                "variable": optimizer._learning_rate,
                "schedule": _InStepSchedule(),
                "momentum": None,
                "momentum_value": None,
                "function": None,
                "key": None,
                "history": None,
                "active": False,
                "learning_rate": None,
            }
            object.__setattr__(optimizer, self._STATE, state)
        elif optimizer._learning_rate is not state["schedule"]:
            state["variable"] = optimizer._learning_rate
        momentum = None
        if self.cycles_momentum:
            momentum = self._momentum_variable(optimizer, state)
        elif state["active"] and state["momentum_value"] is not None:
            # A `fit` that raised left its momentum variable in place.
            object.__setattr__(
                optimizer,
                state["momentum"].name_in_optimizer,
                state["momentum_value"],
            )
        state["momentum_value"] = None

        def learning_rate():
            return self.learning_rate_tensor(optimizer.iterations)

        schedule = state["schedule"]
        schedule.in_step = learning_rate
        schedule.momentum, schedule.momentum_in_step = None, None
        object.__setattr__(optimizer, "_learning_rate", schedule)
        self._momentum_attribute = None
        if momentum is not None:

            def momentum_value():
                return self.momentum_tensor(optimizer.iterations)

            schedule.momentum = momentum
            schedule.momentum_in_step = momentum_value
            self._momentum_attribute = momentum.name_in_optimizer
            object.__setattr__(optimizer, self._momentum_attribute, momentum)
        object.__setattr__(
            optimizer, "get_config", self._float_config(optimizer, state)
        )
        self._installed = (optimizer, state)
        state["active"] = True
        state["history"] = model.history
        self._read_current()

        key = (type(self), self.policy_key())
        guarded = model.train_function
        if not (
            isinstance(guarded, _GuardedTrainFunction)
            and guarded.state is state
            and state["function"] is guarded.function
            and state["key"] == key
        ):
            # Trace a step with the policy in it (the first call traces).
            model.make_train_function(force=True)
            state["function"] = model.train_function
            state["key"] = key
            model.train_function = _GuardedTrainFunction(
                model, optimizer, state, state["function"]
            )

    def _float_config(self, optimizer, state):
        get_config = type(optimizer).get_config.__get__(optimizer)

        def float_config():
            installed = optimizer._learning_rate
            object.__setattr__(optimizer, "_learning_rate", state["variable"])
            try:
                config = get_config()
            finally:
                object.__setattr__(optimizer, "_learning_rate", installed)
            config["learning_rate"] = state["learning_rate"]
            momentum = state["momentum"]
            if momentum is not None and state["momentum_value"] is not None:
                config[momentum.name_in_optimizer] = state["momentum_value"]
            return config

        return float_config
