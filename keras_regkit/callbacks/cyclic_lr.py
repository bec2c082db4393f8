"""The CyclicLR callback: Smith's cyclical learning rate for `model.fit`."""

import keras

from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback
from keras_regkit.callbacks._learning_rate import check_momentum_bounds
from keras_regkit.schedules.cyclical_learning_rate import CyclicalLearningRate
from keras_regkit.schedules.cyclical_learning_rate import (
    check_cyclical_arguments,
)
from keras_regkit.schedules.cyclical_learning_rate import compatible_config

__all__ = ["CyclicLR"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class CyclicLR(IterationLearningRateCallback):
    """Cycles the learning rate between two bounds (Smith, 2017).

    Before each training batch the callback sets `optimizer.learning_rate`
    to the policy's value for the optimizer's own step counter
    (`optimizer.iterations`), so the cycle continues across `fit` calls and
    `keras.callbacks.BackupAndRestore` resumption, and a later `fit` without
    the callback keeps the last rate. It writes the `learning_rate` (and
    `momentum`) of the last step into the batch and epoch `logs`; list it
    before `CSVLogger`. For iteration `it` (0-based):

    ```
    cycle = floor(1 + it / (2 * step_size))
    x = |it / step_size - 2 * cycle + 1|
    lr = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale
    momentum = max_momentum - (max_momentum - base_momentum)
               * max(0, 1 - x) * scale
    ```

    with `scale` as in `keras_regkit.schedules.CyclicalLearningRate`. The
    momentum is cycled exactly for `keras.optimizers.SGD` with momentum > 0;
    other optimizers (Adam's `beta_1` is a constant of the compiled step)
    get the learning rate cycle only, with a warning. With
    `steps_per_execution > 1` the rate is set once per execution; compile
    with the `CyclicalLearningRate` schedule for exact per-iteration rates.

    Args:
        base_lr: float. The lower bound of the learning rate, `>= 0`.
        max_lr: float. The upper bound, `>= base_lr`.
        step_size: int or float. Iterations in half a cycle, `> 0`; the paper
            advises 2 to 10 epochs' worth.
        mode: str. `"triangular"`, `"triangular2"` or `"exp_range"`.
            Defaults to `"triangular"`.
        gamma: float. The per-iteration decay of `"exp_range"`, in `(0, 1]`.
            Defaults to `1.0`.
        scale_fn: `None`, a function of one argument giving the amplitude
            scale, or the registered name of one; needs
            `mode="triangular"`. Defaults to `None`.
        scale_mode: `None`, `"cycle"` or `"iterations"`: what `scale_fn`
            receives. Defaults to `None` (`"cycle"` for a `scale_fn`).
        base_momentum: float or `None`. The momentum at `max_lr`, in
            `[0, 1]`. Defaults to `None` (the momentum is left alone).
        max_momentum: float or `None`. The momentum at `base_lr`, in
            `[base_momentum, 1]`. Defaults to `None`.
        verbose: int. 0 is silent, 1 prints the learning rate at each epoch
            end. Defaults to `0`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(momentum=0.9), loss="mse")
    >>> clr = CyclicLR(base_lr=0.001, max_lr=0.01, step_size=4)
    >>> history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[clr],
    ...                     verbose=0)
    >>> [round(lr, 5) for lr in history.history["learning_rate"]]
    [0.00775, 0.00325]

    Reference:
    - [Smith, 2017](https://arxiv.org/abs/1506.01186)
    - [Smith, 2018](https://arxiv.org/abs/1803.09820) (cyclical momentum)
    """

    schedule_form = "keras_regkit.schedules.CyclicalLearningRate"

    def __init__(
        self,
        base_lr,
        max_lr,
        step_size,
        mode="triangular",
        gamma=1.0,
        scale_fn=None,
        scale_mode=None,
        base_momentum=None,
        max_momentum=None,
        verbose=0,
    ):
        super().__init__(verbose=verbose)
        base_lr, max_lr, step_size, gamma, _, _ = check_cyclical_arguments(
            "base_lr",
            base_lr,
            "max_lr",
            max_lr,
            step_size,
            mode,
            gamma,
            scale_fn,
            scale_mode,
        )
        self.base_momentum, self.max_momentum = check_momentum_bounds(
            base_momentum, max_momentum
        )
        self.cycles_momentum = self.base_momentum is not None
        self.schedule = CyclicalLearningRate(
            base_lr, max_lr, step_size, mode, gamma, scale_fn, scale_mode
        )
        self.base_lr = base_lr
        self.max_lr = max_lr
        self.step_size = step_size
        self.mode = mode
        self.gamma = gamma
        self.scale_fn = self.schedule.scale_fn
        self.scale_mode = scale_mode

    def learning_rate_at(self, iteration):
        return self.schedule.python_value(iteration)

    def momentum_at(self, iteration):
        height, scale = self.schedule.height_and_scale(float(iteration))
        span = self.max_momentum - self.base_momentum
        return float(self.max_momentum - span * height * scale)

    def get_config(self):
        config = self.schedule.get_config()
        return {
            "base_lr": self.base_lr,
            "max_lr": self.max_lr,
            "step_size": self.step_size,
            "mode": self.mode,
            "gamma": self.gamma,
            "scale_fn": config["scale_fn"],
            "scale_mode": self.scale_mode,
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**compatible_config(config))
