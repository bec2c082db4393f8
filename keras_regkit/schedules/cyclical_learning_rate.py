"""The cyclical learning rate of Smith (2017) as a Keras schedule."""

import math
import numbers

import keras
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit._utils import check_choice
from keras_regkit._utils import check_float_in_range

__all__ = ["CyclicalLearningRate"]

MODES = ("triangular", "triangular2", "exp_range")
SCALE_MODES = ("cycle", "iterations")


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


def check_positive_number(name, value):
    """Returns `value` if it is a positive int or float, else raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise argument_error(name, "a positive number", value)
    return value


def check_learning_rate_bounds(low_name, low, high_name, high):
    """Checks `0 <= low <= high`; returns both as floats."""
    low = check_float_in_range(low_name, low, 0.0, math.inf, True, False)
    if isinstance(high, bool) or not isinstance(high, numbers.Real):
        raise argument_error(high_name, f"a float >= {low_name}={low!r}", high)
    if not math.isfinite(high) or high < low:
        raise argument_error(high_name, f"a float >= {low_name}={low!r}", high)
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
    if value is None:
        return None, None
    if isinstance(value, str):
        function = keras.saving.get_registered_object(value)
        if function is None or not callable(function):
            raise argument_error(
                name,
                "None, a callable, or the name of a function registered with "
                "`@keras.saving.register_keras_serializable()`",
                value,
            )
        return function, value
    if not callable(value):
        raise argument_error(
            name,
            "None, a callable, or the name of a function registered with "
            "`@keras.saving.register_keras_serializable()`",
            value,
        )
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

    Returns `(low, high, step_size, scale_function, scale_fn_name)`.
    """
    low, high = check_learning_rate_bounds(low_name, low, high_name, high)
    step_size = check_positive_number("step_size", step_size)
    check_choice("mode", mode, MODES)
    check_float_in_range("gamma", gamma, 0.0, 1.0, False, True)
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    function, name = resolve_scale_fn("scale_fn", scale_fn)
    if function is not None and mode != "triangular":
        raise argument_error(
            "mode",
            "'triangular' (the default) when `scale_fn` is given, because "
            "`scale_fn` replaces the scaling that the mode would apply",
            mode,
        )
    return low, high, step_size, function, name


def cyclical_value(
    step, low, high, step_size, mode, gamma, scale_fn, scale_mode, math_ops
):
    """The closed form of the cyclical learning rate at `step`.

    `math_ops` is `PythonMath` (Python floats, used by the callbacks) or
    `KerasMath` (tensors, used inside the compiled training step): one
    formula for both, so the callback and the schedule cannot drift apart.
    """
    cycle = math_ops.floor(1.0 + step / (2.0 * step_size))
    x = math_ops.abs(step / step_size - 2.0 * cycle + 1.0)
    height = math_ops.maximum(0.0, 1.0 - x)
    if scale_fn is not None:
        scale = scale_fn(cycle if scale_mode == "cycle" else step)
    elif mode == "triangular2":
        scale = math_ops.power(0.5, cycle - 1.0)
    elif mode == "exp_range":
        scale = math_ops.power(gamma, step)
    else:
        scale = 1.0
    return low + (high - low) * height * scale


@keras.saving.register_keras_serializable(package="keras_regkit")
class CyclicalLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate that cycles between two bounds (Smith, 2017).

    The learning rate rises linearly from `initial_learning_rate` to
    `maximal_learning_rate` over `step_size` iterations, falls back over the
    next `step_size`, and repeats; a cycle lasts `2 * step_size` iterations.
    As a `LearningRateSchedule` it is evaluated inside the compiled training
    step at every iteration from the optimizer's own step counter, so it is
    exact with `steps_per_execution > 1`, continues across `fit` calls and
    `keras.callbacks.BackupAndRestore` resumption (the counter is saved with
    the optimizer), and is saved with the optimizer in `.keras` files. It
    does nothing at inference.

    For iteration `step` (0-based):

    ```
    cycle = floor(1 + step / (2 * step_size))
    x = |step / step_size - 2 * cycle + 1|
    lr = initial_learning_rate
         + (maximal_learning_rate - initial_learning_rate)
           * max(0, 1 - x) * scale
    ```

    with `scale = 1` (`"triangular"`), `1 / 2 ** (cycle - 1)`
    (`"triangular2"`, the amplitude halves each cycle), `gamma ** step`
    (`"exp_range"`), or `scale_fn(cycle)` / `scale_fn(step)` for a custom
    `scale_fn` (by `scale_mode`). The paper advises `step_size` of 2 to 10
    epochs of iterations.

    A custom `scale_fn` is saved by its registered name, never as code:
    decorate it with `@keras.saving.register_keras_serializable()`, and
    import its module before loading. It receives a float32 tensor (the
    cycle, counted from 1, or the iteration) and must use `keras.ops` or
    arithmetic operators; `python_value` (and the `CyclicLR` callback's logs)
    call it with Python floats.

    Args:
        initial_learning_rate: float. The lower bound (`base_lr` in the paper),
            `>= 0`.
        maximal_learning_rate: float. The upper bound (`max_lr`),
            `>= initial_learning_rate`.
        step_size: int or float. Iterations in half a cycle, `> 0`.
        mode: str. `"triangular"`, `"triangular2"` or `"exp_range"`. Defaults
            to `"triangular"`.
        gamma: float. The per-iteration decay of `"exp_range"`, in `(0, 1]`.
            Defaults to `1.0`.
        scale_fn: `None`, a function of one argument returning the amplitude
            scale, or the registered name of one. Replaces the mode's scale
            (then `mode` must be `"triangular"`). Defaults to `None`.
        scale_mode: str. What `scale_fn` receives: `"cycle"` or
            `"iterations"`. Defaults to `"cycle"`.
        name: str. Name scope of the operations. Defaults to
            `"CyclicalLearningRate"`.

    Call arguments:
        step: int or integer tensor. The 0-based iteration (the optimizer
            passes `optimizer.iterations`).

    Returns:
        A float32 scalar tensor, the learning rate at `step`.

    Raises:
        ValueError: for a negative `initial_learning_rate`, a
            `maximal_learning_rate` below it, a non-positive `step_size`, an
            unknown `mode` or `scale_mode`, a `gamma` outside `(0, 1]`, an
            unknown `scale_fn` name, or a `scale_fn` with a mode other than
            `"triangular"`; from `get_config` for an unregistered `scale_fn`.

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
        scale_mode="cycle",
        name="CyclicalLearningRate",
    ):
        super().__init__()
        low, high, step_size, function, registered = check_cyclical_arguments(
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
        self.initial_learning_rate = low
        self.maximal_learning_rate = high
        self.step_size = step_size
        self.mode = mode
        self.gamma = float(gamma)
        self.scale_fn = function
        self.scale_mode = scale_mode
        self.name = name
        self._scale_fn_name = registered

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = ops.cast(step, "float32")
            value = self._value(step, KerasMath)
            return ops.cast(value, "float32")

    def _value(self, step, math_ops):
        return cyclical_value(
            step,
            self.initial_learning_rate,
            self.maximal_learning_rate,
            self.step_size,
            self.mode,
            self.gamma,
            self.scale_fn,
            self.scale_mode,
            math_ops,
        )

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
