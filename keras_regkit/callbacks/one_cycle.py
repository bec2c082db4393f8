"""The OneCycle callback: the one-cycle policy of Smith & Topin for `fit`."""

import warnings

import keras
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit.callbacks._learning_rate import InStepLearningRateCallback
from keras_regkit.callbacks._learning_rate import check_momentum_bounds
from keras_regkit.callbacks._learning_rate import read_iterations
from keras_regkit.callbacks._learning_rate import sync_model_state
from keras_regkit.schedules.cyclical_learning_rate import KerasMath
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
class OneCycle(InStepLearningRateCallback):
    """The one-cycle learning-rate and momentum policy (Smith & Topin, 2017).

    Over one training run the learning rate warms up from
    `max_lr / div_factor` to `max_lr`, comes back down, and is annealed to
    `max_lr / div_factor / final_div_factor`, while the momentum moves the
    other way (from `max_momentum` down to `base_momentum` during the warm-up
    and back). Like `CyclicLR`, the callback puts the policy inside the
    compiled training step as a function of the optimizer's own step counter
    (`optimizer.iterations`), so each iteration gets its exact values (also
    with `steps_per_execution > 1`) and the policy continues across `fit`
    calls and `keras.callbacks.BackupAndRestore` resumption; after `fit` the
    optimizer holds plain floats again. It writes `learning_rate` and the
    momentum of the last step into the batch and epoch `logs` (list it before
    `CSVLogger`), and does nothing at evaluation or inference.

    The closed form is that of
    `keras_regkit.schedules.OneCycleLearningRate` (phases ending at
    iterations `b1 = pct_start * total_steps - 1`,
    `b2 = 2 * pct_start * total_steps - 2` and `total_steps - 1`, linear or
    cosine within each); the momentum follows the same phases through
    `max_momentum -> base_momentum -> max_momentum` and then stays at
    `max_momentum` (three phases), or `max_momentum -> base_momentum ->
    max_momentum` (two phases). It counts from the optimizer's iteration 0:
    to run a new cycle on a trained model, compile it with a new optimizer.

    On the JAX backend, which reuses compiled steps across `fit` calls, the
    learning rate is set between batches instead (held over each group of
    `steps_per_execution`) and the momentum cannot be cycled (pass
    `base_momentum=None, max_momentum=None`). The schedule form,
    `OneCycleLearningRate`, keeps the learning-rate policy in a saved model.

    The defaults follow the paper (linear, three phases, the cycle taking 90%
    of the run, momentum 0.95 to 0.85); `pct_start=0.3,
    anneal_strategy="cos", three_phase=False` gives PyTorch's `OneCycleLR`.

    Args:
        max_lr: float. The peak learning rate, `> 0`; the LR range test
            (`keras_regkit.callbacks.lr_range_test`) suggests it.
        total_steps: int or `None`. Iterations in the run. `None` takes
            `epochs * steps_per_epoch` from `fit` at the start of training
            (`epochs` is the index of the final epoch, so
            `fit(epochs=E, initial_epoch=k)` ends the cycle at epoch `E`).
            Defaults to `None`.
        pct_start: float. Fraction of `total_steps` spent warming up, in
            `(0, 1)` (`(0, 0.5]` with three phases). Defaults to `0.45`.
        div_factor: float. The start is `max_lr / div_factor`, `>= 1`.
            Defaults to `25.0`.
        final_div_factor: float. The end is `max_lr / div_factor /
            final_div_factor`, `>= 1`. Defaults to `1e4`.
        anneal_strategy: str. `"linear"` or `"cos"`. Defaults to `"linear"`.
        three_phase: bool. Come back down to the start before the final
            annealing (the paper's form). Defaults to `True`.
        base_momentum: float or `None`. The momentum at `max_lr` (`momentum`
            of SGD and RMSprop, `beta_1` of the Adam family), in `[0, 1]`.
            `None` with `max_momentum=None` leaves the momentum alone.
            Defaults to `0.85`.
        max_momentum: float or `None`. The momentum at the start and end, in
            `[base_momentum, 1]`. Defaults to `0.95`.
        verbose: int. 0 is silent, 1 prints the learning rate and momentum at
            each epoch end. Defaults to `0`.

    Raises:
        ValueError: in `__init__` for a bad argument; in `on_train_begin` for
            an optimizer whose learning rate is a schedule, an optimizer
            without `momentum`/`beta_1` (with momentum bounds), the JAX
            backend (with momentum bounds), or when `total_steps=None` and
            `fit` does not know its steps per epoch.

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
        max_lr, pct_start, div_factor, final_div_factor = (
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
            warnings.warn(
                f"OneCycle: the optimizer has already taken {done} iterations, "
                f"at least total_steps={self.schedule.total_steps}, so the "
                "learning rate stays at its final value. To run a new cycle, "
                "compile the model with a new optimizer.",
                stacklevel=2,
            )

    def learning_rate_at(self, iteration):
        return self.schedule.python_value(iteration)

    def learning_rate_tensor(self, iteration):
        return self.schedule(iteration)

    def _momentum(self, iteration, math_ops):
        top, base = self.max_momentum, self.base_momentum
        return one_cycle_value(
            iteration,
            self.schedule.boundaries,
            one_cycle_anchors(top, base, top, self.three_phase),
            self.anneal_strategy,
            math_ops,
        )

    def momentum_at(self, iteration):
        return float(self._momentum(float(iteration), PythonMath))

    def momentum_tensor(self, iteration):
        return self._momentum(ops.cast(iteration, "float32"), KerasMath)

    def policy_key(self):
        return (
            self.max_lr,
            self.schedule.total_steps,
            self.pct_start,
            self.div_factor,
            self.final_div_factor,
            self.anneal_strategy,
            self.three_phase,
            self.base_momentum,
            self.max_momentum,
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
