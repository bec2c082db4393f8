"""The CyclicLR callback: Smith's cyclical learning rate for `model.fit`."""

import keras

from keras_regkit.callbacks._learning_rate import InStepLearningRateCallback
from keras_regkit.callbacks._learning_rate import check_momentum_bounds
from keras_regkit.schedules.cyclical_learning_rate import CyclicalLearningRate
from keras_regkit.schedules.cyclical_learning_rate import (
    check_cyclical_arguments,
)

__all__ = ["CyclicLR"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class CyclicLR(InStepLearningRateCallback):
    """Cycles the learning rate between two bounds (Smith, 2017).

    For the length of `fit`, the callback puts the cyclical policy inside the
    compiled training step as a function of the optimizer's own step counter
    (`optimizer.iterations`), so every iteration gets its exact value (also
    with `steps_per_execution > 1`, where Keras calls batch hooks only once
    per N steps), and the cycle continues across several `fit` calls and
    across `keras.callbacks.BackupAndRestore` resumption (the counter is saved
    and restored with the optimizer). After each batch it writes the
    `learning_rate` (and the cycled momentum) of the last step into the batch
    and epoch `logs`, so `History`, `CSVLogger` and `TensorBoard` record it:
    list this callback before those that read the epoch logs. When `fit` ends
    the optimizer gets back a plain float learning rate (and momentum), at
    their last values. It does nothing at evaluation or inference.

    For iteration `it` (0-based):

    ```
    cycle = floor(1 + it / (2 * step_size))
    x = |it / step_size - 2 * cycle + 1|
    lr = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale
    ```

    with `scale = 1` (`"triangular"`), `1 / 2 ** (cycle - 1)`
    (`"triangular2"`), `gamma ** it` (`"exp_range"`) or `scale_fn(cycle)` /
    `scale_fn(it)` (by `scale_mode`). With `base_momentum` and `max_momentum`
    the momentum (`momentum` of SGD and RMSprop, `beta_1` of the Adam
    family) moves inversely, as in Smith (2018):
    `momentum = max_momentum - (max_momentum - base_momentum) * (lr - base_lr)
    / (max_lr - base_lr)`.

    The optimizer's saved state is untouched (a checkpoint written mid-`fit`
    holds the same variables, and its config plain floats), and a `fit`
    without this callback, even after one that raised, trains with the
    constant rate. To keep the cycle in a saved model (for training it
    further elsewhere), compile with the schedule form,
    `keras_regkit.schedules.CyclicalLearningRate`, instead. On the JAX
    backend, which reuses compiled steps across `fit` calls, the callback
    sets the rate between batches instead (held over each group of
    `steps_per_execution`) and cannot cycle the momentum.

    Departures from the paper and the classic Keras callback: the count comes
    from the optimizer, not from a Python counter the callback keeps (which
    loses its place when training restarts); `scale_fn` with a mode other
    than `"triangular"` is an error instead of silently ignoring the mode.

    Args:
        base_lr: float. The lower bound of the learning rate, `>= 0`.
        max_lr: float. The upper bound, `>= base_lr`. The LR range test
            (`keras_regkit.callbacks.lr_range_test`) suggests both.
        step_size: int or float. Iterations (batches) in half a cycle, `> 0`;
            the paper advises 2 to 10 epochs' worth.
        mode: str. `"triangular"`, `"triangular2"` or `"exp_range"`.
            Defaults to `"triangular"`.
        gamma: float. The per-iteration decay of `"exp_range"`, in `(0, 1]`.
            Defaults to `1.0`.
        scale_fn: `None`, a function of one argument returning the amplitude
            scale, or the registered name of one; replaces the mode's scale
            (then `mode` must be `"triangular"`). It is called with tensors
            inside the step and with Python floats for the logs, so write it
            with operators or `keras.ops`. Defaults to `None`.
        scale_mode: str. What `scale_fn` receives: `"cycle"` (counted from 1)
            or `"iterations"`. Defaults to `"cycle"`.
        base_momentum: float or `None`. The momentum at `max_lr`, in
            `[0, 1]`. Defaults to `None` (the momentum is left alone).
        max_momentum: float or `None`. The momentum at `base_lr`, in
            `[base_momentum, 1]`. Defaults to `None`.
        verbose: int. 0 is silent, 1 prints the learning rate at each epoch
            end. Defaults to `0`.

    Raises:
        ValueError: in `__init__` for a negative `base_lr`, `max_lr` below
            `base_lr`, a non-positive `step_size`, an unknown `mode` or
            `scale_mode`, `gamma` outside `(0, 1]`, bad momentum bounds; in
            `on_train_begin` for an optimizer whose learning rate is a
            schedule or a callable, or (with momentum bounds) one without
            `momentum` or `beta_1`, SGD or RMSprop created with momentum 0,
            or the JAX backend.

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

    def __init__(
        self,
        base_lr,
        max_lr,
        step_size,
        mode="triangular",
        gamma=1.0,
        scale_fn=None,
        scale_mode="cycle",
        base_momentum=None,
        max_momentum=None,
        verbose=0,
    ):
        super().__init__(verbose=verbose)
        base_lr, max_lr, step_size, _, _ = check_cyclical_arguments(
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
        self.gamma = float(gamma)
        self.scale_fn = self.schedule.scale_fn
        self.scale_mode = scale_mode

    def learning_rate_at(self, iteration):
        return self.schedule.python_value(iteration)

    def learning_rate_tensor(self, iteration):
        return self.schedule(iteration)

    def _inverse(self, learning_rate):
        span = self.max_lr - self.base_lr
        if span == 0:
            return self.max_momentum
        fraction = (learning_rate - self.base_lr) / span
        return (
            self.max_momentum
            - (self.max_momentum - self.base_momentum) * fraction
        )

    def momentum_at(self, iteration):
        return float(self._inverse(self.learning_rate_at(iteration)))

    def momentum_tensor(self, iteration):
        return self._inverse(self.learning_rate_tensor(iteration))

    def policy_key(self):
        return (
            self.base_lr,
            self.max_lr,
            self.step_size,
            self.mode,
            self.gamma,
            self.scale_fn,
            self.scale_mode,
            self.base_momentum,
            self.max_momentum,
        )

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
