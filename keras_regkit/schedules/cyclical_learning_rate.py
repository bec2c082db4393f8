"""The cyclical learning rate of Smith (2017) as a Keras schedule."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range

__all__ = ["CyclicalLearningRate"]

MODES = ("triangular", "triangular2", "exp_range")
SCALE_MODES = ("cycle", "iterations")
# What each mode's own scale is a function of.
MODE_SCALE_MODES = {"triangular2": "cycle", "exp_range": "iterations"}


class PythonMath:
    """The operations the closed forms use, on Python floats."""

    floor = staticmethod(math.floor)
    abs = staticmethod(abs)
    maximum = staticmethod(max)
    minimum = staticmethod(min)
    power = staticmethod(pow)
    cos = staticmethod(math.cos)

    @staticmethod
    def where(condition, x, y):
        return x if condition else y


class KerasMath:
    """The operations the closed forms use, on tensors (`keras.ops`)."""

    floor = staticmethod(ops.floor)
    abs = staticmethod(ops.abs)
    maximum = staticmethod(ops.maximum)
    minimum = staticmethod(ops.minimum)
    power = staticmethod(ops.power)
    cos = staticmethod(ops.cos)
    where = staticmethod(ops.where)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def check_name(value, default):
    """A schedule's `name`: a non-empty str (`None` gives `default`)."""
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise argument_error("name", "a non-empty str", value)
    return value


def check_positive_number(name, value):
    """Returns a positive finite number as a Python int or float."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise argument_error(name, "a positive number", value)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_learning_rate_bounds(low_name, low, high_name, high):
    """Checks `0 <= low <= high < inf`; returns both as floats."""
    low = check_float_in_range(low_name, low, 0.0, math.inf, True, False)
    expected = f"a finite float >= {low_name}={low!r}"
    if not _is_real(high) or not math.isfinite(high) or high < low:
        raise argument_error(high_name, expected, high)
    return low, float(high)


def scale_fn_name(scale_fn):
    """The name under which `scale_fn` is registered with Keras, or `None`."""
    name = keras.saving.get_registered_name(scale_fn)
    if keras.saving.get_registered_object(name) is scale_fn:
        return name
    return None


def resolve_scale_fn(name, value):
    """Returns `(function, registered_name_or_None)` for a `scale_fn` value.

    A string is looked up in Keras's registry (functions decorated with
    `keras.saving.register_keras_serializable`, or passed in
    `custom_objects`); a callable is kept as is.
    """
    expected = (
        "None, a callable, or the name of a function registered with "
        "`@keras.saving.register_keras_serializable()`"
    )
    if value is None:
        return None, None
    if isinstance(value, str):
        function = keras.saving.get_registered_object(value)
        if function is None or not callable(function):
            raise argument_error(name, expected, value)
        return function, value
    if not callable(value):
        raise argument_error(name, expected, value)
    return value, scale_fn_name(value)


def check_cyclical_arguments(
    low_name,
    low,
    high_name,
    high,
    step_size,
    mode,
    gamma,
    scale_fn,
    scale_mode,
):
    """Validates the arguments shared by `CyclicalLearningRate` and `CyclicLR`.

    Returns `(low, high, step_size, gamma, scale_function, scale_fn_name)`.
    """
    low, high = check_learning_rate_bounds(low_name, low, high_name, high)
    step_size = check_positive_number("step_size", step_size)
    check_choice("mode", mode, MODES)
    gamma = check_float_in_range("gamma", gamma, 0.0, 1.0, False, True)
    if gamma != 1.0 and mode != "exp_range":
        raise argument_error(
            "gamma",
            f"1.0 with mode={mode!r} (only mode='exp_range' uses it)",
            gamma,
        )
    if scale_mode is not None:
        check_choice("scale_mode", scale_mode, SCALE_MODES)
    function, name = resolve_scale_fn("scale_fn", scale_fn)
    if function is not None and mode != "triangular":
        raise argument_error(
            "mode",
            "'triangular' (the default) when `scale_fn` is given, because "
            "`scale_fn` replaces the scaling that the mode would apply",
            mode,
        )
    own = MODE_SCALE_MODES.get(mode)
    if function is None and scale_mode not in (None, own) and own:
        raise argument_error(
            "scale_mode",
            f"None or {own!r} with mode={mode!r} (the mode's scale is a "
            f"function of the {'cycle' if own == 'cycle' else 'iteration'}; "
            "`scale_mode` chooses what a custom `scale_fn` receives)",
            scale_mode,
        )
    return low, high, step_size, gamma, function, name


def compatible_config(config):
    """Reads configs written before `scale_mode` defaulted to `None`.

    Those stored the old default `"cycle"` with `mode="exp_range"`, whose
    scale was then, as now, a function of the iteration.
    """
    config = dict(config)
    if (
        config.get("mode") == "exp_range"
        and config.get("scale_fn") is None
        and config.get("scale_mode") == "cycle"
    ):
        config["scale_mode"] = None
    return config


def cyclical_height_and_scale(
    step, step_size, mode, gamma, scale_fn, scale_mode, math_ops
):
    """The triangle's height in `[0, 1]` and the amplitude scale at `step`.

    `math_ops` is `PythonMath` (Python floats, used by the callbacks) or
    `KerasMath` (tensors, used inside the compiled training step): one
    formula for both, so the callback and the schedule cannot drift apart.
    """
    cycle = math_ops.floor(1.0 + step / (2.0 * step_size))
    x = math_ops.abs(step / step_size - 2.0 * cycle + 1.0)
    height = math_ops.maximum(0.0, 1.0 - x)
    if scale_fn is not None:
        scale = scale_fn(step if scale_mode == "iterations" else cycle)
    elif mode == "triangular2":
        scale = math_ops.power(0.5, cycle - 1.0)
    elif mode == "exp_range":
        scale = math_ops.power(gamma, step)
    else:
        scale = 1.0
    return height, scale


@keras.saving.register_keras_serializable(package="keras_regkit")
class CyclicalLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate that cycles between two bounds (Smith, 2017).

    The rate rises linearly from `initial_learning_rate` to
    `maximal_learning_rate` over `step_size` iterations, falls back over the
    next `step_size`, and repeats. The optimizer evaluates the schedule inside
    its compiled step from its own counter, so every iteration gets its exact
    value (also with `steps_per_execution > 1`), the cycle continues across
    `fit` calls and `BackupAndRestore` resumption, and it is saved with the
    optimizer. For iteration `step` (0-based):

    ```
    cycle = floor(1 + step / (2 * step_size))
    x = |step / step_size - 2 * cycle + 1|
    lr = initial + (maximal - initial) * max(0, 1 - x) * scale
    ```

    with `scale = 1` (`"triangular"`), `0.5 ** (cycle - 1)`
    (`"triangular2"`), `gamma ** step` (`"exp_range"`), or `scale_fn(cycle)`
    / `scale_fn(step)` (by `scale_mode`). A custom `scale_fn` receives a
    float32 tensor (and Python floats from the callbacks), so write it with
    operators or `keras.ops`; it is saved by its registered name.

    Args:
        initial_learning_rate: float. The lower bound, `>= 0`.
        maximal_learning_rate: float. The upper bound,
            `>= initial_learning_rate`.
        step_size: int or float. Iterations in half a cycle, `> 0`.
        mode: str. `"triangular"`, `"triangular2"` or `"exp_range"`.
            Defaults to `"triangular"`.
        gamma: float. The per-iteration decay of `"exp_range"`, in `(0, 1]`.
            Defaults to `1.0`.
        scale_fn: `None`, a function of one argument giving the amplitude
            scale, or the registered name of one; needs
            `mode="triangular"`. Defaults to `None`.
        scale_mode: `None`, `"cycle"` or `"iterations"`: what `scale_fn`
            receives. `None` means `"cycle"` for a `scale_fn` and the mode's
            own otherwise. Defaults to `None`.
        name: str. Name scope of the operations. Defaults to
            `"CyclicalLearningRate"`.

    Example:

    >>> schedule = CyclicalLearningRate(0.1, 0.5, step_size=2)
    >>> [round(float(schedule(step)), 4) for step in range(6)]
    [0.1, 0.3, 0.5, 0.3, 0.1, 0.3]
    >>> optimizer = keras.optimizers.SGD(learning_rate=schedule)

    Reference:
    - [Smith, 2017](https://arxiv.org/abs/1506.01186)
    """

    def __init__(
        self,
        initial_learning_rate,
        maximal_learning_rate,
        step_size,
        mode="triangular",
        gamma=1.0,
        scale_fn=None,
        scale_mode=None,
        name="CyclicalLearningRate",
    ):
        super().__init__()
        low, high, step_size, gamma, function, registered = (
            check_cyclical_arguments(
                "initial_learning_rate",
                initial_learning_rate,
                "maximal_learning_rate",
                maximal_learning_rate,
                step_size,
                mode,
                gamma,
                scale_fn,
                scale_mode,
            )
        )
        self.initial_learning_rate = low
        self.maximal_learning_rate = high
        self.step_size = step_size
        self.mode = mode
        self.gamma = gamma
        self.scale_fn = function
        self.scale_mode = scale_mode
        self.name = check_name(name, "CyclicalLearningRate")
        self._scale_fn_name = registered

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = ops.cast(step, "float32")
            return ops.cast(self._value(step, KerasMath), "float32")

    def height_and_scale(self, step, math_ops=PythonMath):
        """The triangle's height and the amplitude scale at `step`."""
        return cyclical_height_and_scale(
            step,
            self.step_size,
            self.mode,
            self.gamma,
            self.scale_fn,
            self.scale_mode,
            math_ops,
        )

    def _value(self, step, math_ops):
        low, high = self.initial_learning_rate, self.maximal_learning_rate
        height, scale = self.height_and_scale(step, math_ops)
        return low + (high - low) * height * scale

    def python_value(self, step):
        """The learning rate at `step` as a Python float (no tensors)."""
        return float(self._value(float(step), PythonMath))

    def get_config(self):
        if self.scale_fn is not None and self._scale_fn_name is None:
            raise ValueError(
                "Cannot serialize `CyclicalLearningRate`: its `scale_fn` "
                f"{self.scale_fn!r} is not registered with Keras, and it is "
                "saved by name, never as code. Define it as a named function "
                "decorated with `@keras.saving.register_keras_serializable()` "
                "and import its module before loading."
            )
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "maximal_learning_rate": self.maximal_learning_rate,
            "step_size": self.step_size,
            "mode": self.mode,
            "gamma": self.gamma,
            "scale_fn": self._scale_fn_name,
            "scale_mode": self.scale_mode,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**compatible_config(config))
