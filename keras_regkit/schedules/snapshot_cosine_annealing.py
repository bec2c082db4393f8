"""The cosine annealing with restarts of Snapshot Ensembles as a schedule."""

import math

import keras
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit._utils import check_float_in_range
from keras_regkit._utils import check_int_in_range

__all__ = ["SnapshotCosineAnnealing", "cycle_ends"]


def cycle_ends(total_steps, cycles):
    """Step counts at which each cycle ends (the last absorbs the rest)."""
    length = total_steps // cycles
    return [length * k for k in range(1, cycles)] + [total_steps]


def annealed_learning_rate(step, total_steps, cycles, initial, minimal):
    """The learning rate at the 0-based `step`, in Python floats."""
    length = total_steps // cycles
    step = min(max(step, 0), total_steps - 1)
    cycle = min(step // length, cycles - 1)
    position = step - cycle * length
    if cycle == cycles - 1:
        length = total_steps - (cycles - 1) * length
    cosine = math.cos(math.pi * position / length)
    return minimal + 0.5 * (initial - minimal) * (cosine + 1.0)


@keras.saving.register_keras_serializable(package="keras_regkit")
class SnapshotCosineAnnealing(keras.optimizers.schedules.LearningRateSchedule):
    """Cyclic cosine annealing with `cycles` restarts (Huang et al., 2017).

    Splits `total_steps` into `cycles` cycles; each restarts at
    `initial_learning_rate` and anneals along a cosine to near
    `minimal_learning_rate`, where the model settles in a local minimum
    worth a snapshot. Evaluated inside the compiled step from the
    optimizer's step counter, it is exact with `steps_per_execution > 1`,
    continues across `fit` calls and is saved with the optimizer. The
    `keras_regkit.callbacks.SnapshotEnsemble` callback sets the same rates
    and also saves the snapshots.

    With `T = total_steps`, `M = cycles` and the 1-based iteration `t`
    (`step = t - 1`), the paper sets

    ```
    lr(t) = initial / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)
    ```

    Here the cycles last `C = floor(T / M)` steps and the last one absorbs
    the `T - M * C` leftover steps, so that every cycle ends at its minimum:

    ```
    k  = min(floor(step / C), M - 1)        # 0-based cycle
    L  = C if k < M - 1 else T - (M - 1) * C
    lr = minimal + (initial - minimal) / 2 * (cos(pi * (step - k * C) / L) + 1)
    ```

    When `M` divides `T` and `minimal = 0` this is the paper's formula; the
    paper's `ceil` would instead cut the last cycle short at a high rate.
    Steps before 0 or after `T - 1` get the rate of step 0 or `T - 1`.

    Args:
        initial_learning_rate: float. The rate at the start of every cycle
            (`alpha_0` in the paper), `> 0`.
        total_steps: int. Iterations of the run, `T >= 1`.
        cycles: int. Number of cycles `M`, in `[1, total_steps]`.
        minimal_learning_rate: float. The floor the cosine anneals towards,
            in `[0, initial_learning_rate)`. Defaults to `0.0` (the paper).
        name: str. Name scope of the operations. Defaults to
            `"SnapshotCosineAnnealing"`.

    Call arguments:
        step: int or integer tensor. The 0-based iteration.

    Returns:
        A float32 scalar tensor, the learning rate at `step`.

    Example:

    >>> schedule = SnapshotCosineAnnealing(0.1, total_steps=8, cycles=2)
    >>> [round(float(schedule(step)), 4) for step in range(8)]
    [0.1, 0.0854, 0.05, 0.0146, 0.1, 0.0854, 0.05, 0.0146]
    >>> optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)

    Reference:
    - [Huang et al., 2017](https://arxiv.org/abs/1704.00109)
    """

    def __init__(
        self,
        initial_learning_rate,
        total_steps,
        cycles,
        minimal_learning_rate=0.0,
        name="SnapshotCosineAnnealing",
    ):
        super().__init__()
        self.initial_learning_rate = check_float_in_range(
            "initial_learning_rate",
            initial_learning_rate,
            0,
            math.inf,
            False,
            False,
        )
        self.total_steps = check_int_in_range("total_steps", total_steps, 1)
        self.cycles = check_int_in_range("cycles", cycles, 1, self.total_steps)
        self.minimal_learning_rate = check_float_in_range(
            "minimal_learning_rate",
            minimal_learning_rate,
            0,
            self.initial_learning_rate,
            True,
            False,
        )
        if not isinstance(name, str):
            raise argument_error("name", "a str", name)
        self.name = name

    @property
    def cycle_ends(self):
        """The step counts at which the cycles end (a list of ints)."""
        return cycle_ends(self.total_steps, self.cycles)

    def python_value(self, step):
        """The learning rate at `step` as a Python float (no tensors)."""
        return annealed_learning_rate(
            int(step),
            self.total_steps,
            self.cycles,
            self.initial_learning_rate,
            self.minimal_learning_rate,
        )

    def __call__(self, step):
        with keras.name_scope(self.name):
            total, cycles = self.total_steps, self.cycles
            length = total // cycles
            step = ops.clip(ops.cast(step, "int32"), 0, total - 1)
            cycle = ops.minimum(ops.floor_divide(step, length), cycles - 1)
            position = ops.cast(step - cycle * length, "float32")
            last = float(total - (cycles - 1) * length)
            period = ops.where(cycle == cycles - 1, last, float(length))
            # (cos(pi p / L) + 1) / 2 == sin(pi (L - p) / (2 L))^2, without
            # the float32 cancellation of cos near -1 at the cycle's end.
            half = ops.sin(math.pi * (period - position) / (2.0 * period))
            span = self.initial_learning_rate - self.minimal_learning_rate
            value = self.minimal_learning_rate + span * ops.square(half)
            return ops.cast(value, "float32")

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "cycles": self.cycles,
            "minimal_learning_rate": self.minimal_learning_rate,
            "name": self.name,
        }
