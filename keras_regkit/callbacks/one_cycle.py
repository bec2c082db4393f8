"""The OneCycle callback: the one-cycle policy of Smith & Topin for `fit`."""

import keras

from keras_regkit._training import read_iterations
from keras_regkit._training import sync_model_state
from keras_regkit._validation import argument_error
from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback
from keras_regkit.callbacks._learning_rate import check_momentum_bounds
from keras_regkit.schedules.cyclical_learning_rate import PythonMath
from keras_regkit.schedules.one_cycle_learning_rate import OneCycleLearningRate
from keras_regkit.schedules.one_cycle_learning_rate import (
    check_one_cycle_arguments,
)
from keras_regkit.schedules.one_cycle_learning_rate import check_total_steps
from keras_regkit.schedules.one_cycle_learning_rate import one_cycle_anchors
from keras_regkit.schedules.one_cycle_learning_rate import one_cycle_value

__all__ = ["OneCycle"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class OneCycle(IterationLearningRateCallback):
    """The one-cycle learning-rate and momentum policy (Smith & Topin, 2017).

    Over one run the learning rate warms up from `max_lr / div_factor` to
    `max_lr`, comes back down and is annealed to
    `max_lr / div_factor / final_div_factor`, while the momentum moves the
    other way (`max_momentum -> base_momentum -> max_momentum`). Before each
    batch the callback sets `optimizer.learning_rate` from the optimizer's
    step counter (`optimizer.iterations`), so the cycle continues across
    `fit` calls and `BackupAndRestore` resumption; it raises `ValueError`
    past `total_steps`, as PyTorch does. It writes the `learning_rate` (and
    `momentum`) of the last step into the `logs`; list it before
    `CSVLogger`. The phases and their closed form are those of
    `keras_regkit.schedules.OneCycleLearningRate` (iterations
    `pct_start * total_steps - 1`, `2 * pct_start * total_steps - 2` and
    `total_steps - 1`; linear or cosine within each).

    The momentum is cycled exactly for `keras.optimizers.SGD` with
    momentum > 0; with other optimizers (Adam's `beta_1` is a constant of the
    compiled step), or SGD without momentum, the callback cycles the learning
    rate only and says so once. With `steps_per_execution > 1` the rate is
    set once per execution. The defaults follow the paper (linear, three
    phases); `pct_start=0.3, anneal_strategy="cos", three_phase=False` gives
    PyTorch's `OneCycleLR`.

    Args:
        max_lr: float. The peak learning rate, `> 0`.
        total_steps: int or `None`. Iterations in the run, counted from the
            optimizer's iteration 0. `None` takes `epochs * steps_per_epoch`
            from `fit`. Defaults to `None`.
        pct_start: float. Fraction of `total_steps` spent warming up, in
            `(0, 1)` (`(0, 0.5]` with three phases). Defaults to `0.45`.
        div_factor: float. The start is `max_lr / div_factor`, `>= 1`.
            Defaults to `25.0`.
        final_div_factor: float. The end is `max_lr / div_factor /
            final_div_factor`, `>= 1`. Defaults to `1e4`.
        anneal_strategy: str. `"linear"` or `"cos"`. Defaults to `"linear"`.
        three_phase: bool. Come back down to the start before the final
            annealing (the paper's form). Defaults to `True`.
        base_momentum: float or `None`. The momentum at `max_lr`, in
            `[0, 1]`; `None` with `max_momentum=None` leaves the momentum
            alone. Defaults to `0.85`.
        max_momentum: float or `None`. The momentum at the start and end, in
            `[base_momentum, 1]`. Defaults to `0.95`.
        verbose: int. 0 is silent, 1 prints the learning rate and momentum at
            each epoch end. Defaults to `0`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(momentum=0.9), loss="mse")
    >>> one_cycle = OneCycle(max_lr=0.05)
    >>> history = model.fit(x, y, batch_size=16, epochs=5,
    ...                     callbacks=[one_cycle], verbose=0)
    >>> [round(lr, 5) for lr in history.history["learning_rate"]]
    [0.02, 0.044, 0.032, 0.008, 0.0]

    Reference:
    - [Smith & Topin, 2017](https://arxiv.org/abs/1708.07120)
    - [Smith, 2018](https://arxiv.org/abs/1803.09820)
    """

    schedule_form = "keras_regkit.schedules.OneCycleLearningRate"

    def __init__(
        self,
        max_lr,
        total_steps=None,
        pct_start=0.45,
        div_factor=25.0,
        final_div_factor=1e4,
        anneal_strategy="linear",
        three_phase=True,
        base_momentum=0.85,
        max_momentum=0.95,
        verbose=0,
    ):
        super().__init__(verbose=verbose)
        max_lr, pct_start, div_factor, final_div_factor, three_phase = (
            check_one_cycle_arguments(
                "max_lr",
                max_lr,
                pct_start,
                div_factor,
                final_div_factor,
                anneal_strategy,
                three_phase,
            )
        )
        if total_steps is not None:
            total_steps = check_total_steps(total_steps, pct_start)
        self.base_momentum, self.max_momentum = check_momentum_bounds(
            base_momentum, max_momentum
        )
        self.cycles_momentum = self.base_momentum is not None
        self.max_lr = max_lr
        self.total_steps = total_steps
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.anneal_strategy = anneal_strategy
        self.three_phase = three_phase
        self.schedule = None
        if total_steps is not None:
            self.schedule = self._make_schedule(total_steps)

    def _make_schedule(self, total_steps):
        return OneCycleLearningRate(
            self.max_lr,
            total_steps,
            self.pct_start,
            self.div_factor,
            self.final_div_factor,
            self.anneal_strategy,
            self.three_phase,
        )

    def on_train_begin(self, logs=None):
        if self.total_steps is None:
            epochs = self.params.get("epochs")
            steps = self.params.get("steps")
            if not epochs or not steps:
                raise argument_error(
                    "total_steps",
                    "an int when `fit` cannot tell its steps per epoch (pass "
                    "`steps_per_epoch` to `fit`, or `total_steps` here)",
                    None,
                )
            total_steps = check_total_steps(epochs * steps, self.pct_start)
            if (
                self.schedule is None
                or self.schedule.total_steps != total_steps
            ):
                self.schedule = self._make_schedule(total_steps)
        super().on_train_begin(logs)
        sync_model_state(self.model)
        done = read_iterations(self.model.optimizer)
        if done >= self.schedule.total_steps:
            raise ValueError(
                f"OneCycle: the optimizer has already taken {done} "
                f"iterations, and the cycle ends at total_steps="
                f"{self.schedule.total_steps}. To run a new cycle, compile "
                "the model with a new optimizer; to make this one longer, "
                "pass a larger `total_steps`."
            )

    def learning_rate_at(self, iteration):
        total = self.schedule.total_steps
        if iteration >= total:
            raise ValueError(
                f"OneCycle reached iteration {iteration}, past the end of "
                f"its cycle (total_steps={total} covers iterations 0 to "
                f"{total - 1}). Pass a larger `total_steps`, or train for "
                "fewer steps."
            )
        return self.schedule.python_value(iteration)

    def momentum_at(self, iteration):
        top, base = self.max_momentum, self.base_momentum
        return float(
            one_cycle_value(
                float(iteration),
                self.schedule.boundaries,
                one_cycle_anchors(top, base, top, self.three_phase),
                self.anneal_strategy,
                PythonMath,
            )
        )

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "anneal_strategy": self.anneal_strategy,
            "three_phase": self.three_phase,
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
            "verbose": self.verbose,
        }
