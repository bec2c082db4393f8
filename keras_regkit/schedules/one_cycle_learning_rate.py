"""The one-cycle learning rate of Smith & Topin (2017) as a Keras schedule."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range
from keras_regkit.schedules.cyclical_learning_rate import KerasMath
from keras_regkit.schedules.cyclical_learning_rate import PythonMath
from keras_regkit.schedules.cyclical_learning_rate import check_name

__all__ = ["OneCycleLearningRate"]

ANNEAL_STRATEGIES = ("linear", "cos")


def check_one_cycle_arguments(
    max_name,
    max_lr,
    pct_start,
    div_factor,
    final_div_factor,
    anneal_strategy,
    three_phase,
):
    """Validates the arguments shared by `OneCycleLearningRate` and `OneCycle`.

    Returns `(max_lr, pct_start, div_factor, final_div_factor, three_phase)`
    as Python floats and a bool.
    """
    max_lr = check_float_in_range(max_name, max_lr, 0.0, math.inf, False, False)
    pct_start = check_float_in_range(
        "pct_start", pct_start, 0.0, 1.0, False, False
    )
    div_factor = check_float_in_range(
        "div_factor", div_factor, 1.0, math.inf, True, False
    )
    final_div_factor = check_float_in_range(
        "final_div_factor", final_div_factor, 1.0, math.inf, True, False
    )
    check_choice("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
    three_phase = check_bool("three_phase", three_phase)
    if three_phase and pct_start > 0.5:
        raise argument_error(
            "pct_start",
            "a float in (0, 0.5] when three_phase=True (the warm-up and the "
            "way back down each take pct_start of the steps)",
            pct_start,
        )
    return max_lr, pct_start, div_factor, final_div_factor, three_phase


def check_total_steps(total_steps, pct_start):
    """Checks that `total_steps` is an int long enough for a warm-up step."""
    expected = (
        f"an int > 1 / pct_start = {1 / pct_start:.6g}, so that the warm-up "
        "lasts at least one step"
    )
    if isinstance(total_steps, (bool, np.bool_)) or not isinstance(
        total_steps, numbers.Integral
    ):
        raise argument_error("total_steps", expected, total_steps)
    if pct_start * total_steps <= 1:
        raise argument_error("total_steps", expected, total_steps)
    return int(total_steps)


def one_cycle_boundaries(total_steps, pct_start, three_phase):
    """The iterations at which each phase ends (the last is the final step)."""
    warm_up_end = pct_start * total_steps - 1.0
    if three_phase:
        return (
            warm_up_end,
            2.0 * pct_start * total_steps - 2.0,
            total_steps - 1.0,
        )
    return (warm_up_end, total_steps - 1.0)


def one_cycle_anchors(start, peak, end, three_phase):
    """The values at the phase boundaries: `start -> peak -> start -> end`.

    Two phases go `start -> peak -> end`. The learning rate uses
    `(initial, maximal, final)`, the momentum `(max, base, max)`.
    """
    if three_phase:
        return (start, peak, start, end)
    return (start, peak, end)


def one_cycle_value(step, boundaries, anchors, anneal_strategy, math_ops):
    """The piecewise closed form of the one-cycle policy at `step`.

    Phase `i` runs from `boundaries[i - 1]` (0 for the first) to
    `boundaries[i]`, moving from `anchors[i]` to `anchors[i + 1]`; after the
    last boundary the value stays at `anchors[-1]`. `math_ops` is
    `PythonMath` (callbacks) or `KerasMath` (inside the compiled step).
    """
    value = None
    for i in reversed(range(len(boundaries))):
        start = boundaries[i - 1] if i else 0.0
        fraction = (step - start) / (boundaries[i] - start)
        fraction = math_ops.minimum(math_ops.maximum(fraction, 0.0), 1.0)
        # Exactly 1 from the phase's end on (compilers may divide by a
        # rounded reciprocal): the linear form then gives `end` exactly.
        fraction = math_ops.where(step >= boundaries[i], 1.0, fraction)
        begin, end = anchors[i], anchors[i + 1]
        if anneal_strategy == "cos":
            phase = end + (begin - end) / 2.0 * (
                1.0 + math_ops.cos(math.pi * fraction)
            )
        else:
            # Exact at both ends, also in float32 (no cancellation).
            phase = begin * (1.0 - fraction) + end * fraction
        if value is None:
            value = phase
        else:
            value = math_ops.where(step <= boundaries[i], phase, value)
    return value


@keras.saving.register_keras_serializable(package="keras_regkit")
class OneCycleLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The one-cycle learning rate policy (Smith & Topin, 2017).

    One cycle over the whole run: the rate warms up from
    `initial = maximal_learning_rate / div_factor` to `maximal_learning_rate`,
    comes back down, and is annealed to `final = initial / final_div_factor`.
    The optimizer evaluates the schedule inside its compiled step from its own
    counter, so it is exact with `steps_per_execution > 1`, continues across
    `fit` calls and `BackupAndRestore` resumption, and is saved with the
    optimizer. To cycle the momentum too, use the
    `keras_regkit.callbacks.OneCycle` callback.

    With `T = total_steps` and `p = pct_start`, the phases end at iterations
    `p * T - 1`, `2 * p * T - 2` and `T - 1` (three phases:
    `initial -> maximal -> initial -> final`), or `p * T - 1` and `T - 1`
    (two phases: `initial -> maximal -> final`). Within a phase from `a` to
    `b` going from `u` to `v`, with `f = (step - a) / (b - a)`:

    ```
    linear: lr = u + (v - u) * f
    cos:    lr = v + (u - v) / 2 * (1 + cos(pi * f))
    ```

    After `T - 1` the rate stays at `final`. `pct_start=0.3,
    anneal_strategy="cos", three_phase=False` gives PyTorch's `OneCycleLR`.

    Args:
        maximal_learning_rate: float. The peak learning rate, `> 0`.
        total_steps: int. Iterations in the run, `> 1 / pct_start`.
        pct_start: float. Fraction of `total_steps` spent warming up, in
            `(0, 1)` (`(0, 0.5]` with three phases). Defaults to `0.45`.
        div_factor: float. `initial = maximal_learning_rate / div_factor`,
            `>= 1`. Defaults to `25.0`.
        final_div_factor: float. `final = initial / final_div_factor`,
            `>= 1`. Defaults to `1e4`.
        anneal_strategy: str. `"linear"` or `"cos"`. Defaults to `"linear"`.
        three_phase: bool. Come back down to `initial` before the final
            annealing (the paper's form). Defaults to `True`.
        name: str. Name scope of the operations. Defaults to
            `"OneCycleLearningRate"`.

    Example:

    >>> schedule = OneCycleLearningRate(1.0, total_steps=10, pct_start=0.3,
    ...                                 div_factor=10.0, final_div_factor=100.0)
    >>> [round(float(schedule(step)), 4) for step in range(10)]
    [0.1, 0.55, 1.0, 0.55, 0.1, 0.0802, 0.0604, 0.0406, 0.0208, 0.001]
    >>> optimizer = keras.optimizers.SGD(learning_rate=schedule)

    Reference:
    - [Smith & Topin, 2017](https://arxiv.org/abs/1708.07120)
    """

    def __init__(
        self,
        maximal_learning_rate,
        total_steps,
        pct_start=0.45,
        div_factor=25.0,
        final_div_factor=1e4,
        anneal_strategy="linear",
        three_phase=True,
        name="OneCycleLearningRate",
    ):
        super().__init__()
        maximal, pct_start, div_factor, final_div_factor, three_phase = (
            check_one_cycle_arguments(
                "maximal_learning_rate",
                maximal_learning_rate,
                pct_start,
                div_factor,
                final_div_factor,
                anneal_strategy,
                three_phase,
            )
        )
        self.total_steps = check_total_steps(total_steps, pct_start)
        self.maximal_learning_rate = maximal
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.anneal_strategy = anneal_strategy
        self.three_phase = three_phase
        self.name = check_name(name, "OneCycleLearningRate")
        initial = maximal / div_factor
        final = initial / final_div_factor
        self.boundaries = one_cycle_boundaries(
            self.total_steps, pct_start, three_phase
        )
        self._anchors = one_cycle_anchors(initial, maximal, final, three_phase)

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = ops.cast(step, "float32")
            value = one_cycle_value(
                step,
                self.boundaries,
                self._anchors,
                self.anneal_strategy,
                KerasMath,
            )
            return ops.cast(value, "float32")

    def python_value(self, step):
        """The learning rate at `step` as a Python float (no tensors)."""
        return float(
            one_cycle_value(
                float(step),
                self.boundaries,
                self._anchors,
                self.anneal_strategy,
                PythonMath,
            )
        )

    def get_config(self):
        return {
            "maximal_learning_rate": self.maximal_learning_rate,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "anneal_strategy": self.anneal_strategy,
            "three_phase": self.three_phase,
            "name": self.name,
        }
