"""The learning-rate range test of Smith (2017): LRRangeTest, lr_range_test."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit._utils import atomic_path
from keras_regkit._utils import check_choice
from keras_regkit._utils import check_float_in_range
from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback
from keras_regkit.callbacks._learning_rate import read_iterations
from keras_regkit.callbacks._learning_rate import sync_model_state

__all__ = ["LRRangeTest", "lr_range_test"]

MODES = ("exponential", "linear")


def _smooth(losses, smoothing):
    """Bias-corrected exponential moving average, oldest first."""
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, start=1):
        average = smoothing * average + (1.0 - smoothing) * loss
        smoothed.append(average / (1.0 - smoothing**count))
    return smoothed


def _snapshot(variables):
    return [np.array(ops.convert_to_numpy(v), copy=True) for v in variables]


@keras.saving.register_keras_serializable(package="keras_regkit")
class LRRangeTest(IterationLearningRateCallback):
    """The learning-rate range test: ramp the rate, watch the loss (Smith, 2017).

    During a short `fit` the learning rate grows from `min_lr` to `max_lr`
    over `steps` batches (geometrically or linearly), one value per batch,
    while the callback records each batch's own loss. Keras reports a running
    mean of the epoch in the batch logs, which lags and flattens the curve
    (an earlier Keras LR finder was misled by it), so the callback resets the
    model's metrics before every batch and reads the batch loss alone. It
    stops at `steps` batches or when the loss diverges (the smoothed loss
    above `divergence_factor` times the best so far, or a non-finite loss),
    and at the end restores the model's variables (weights, non-trainable
    state and random-seed state) and the optimizer's variables (slots, step
    counter, learning rate) bit for bit, so training afterwards proceeds as if
    the test never ran. Evaluation and inference are untouched.

    With `i` counting batches from 0 and `n = steps`:

    ```
    exponential: lr_i = min_lr * (max_lr / min_lr) ** (i / (n - 1))
    linear:      lr_i = min_lr + (max_lr - min_lr) * i / (n - 1)
    smoothed_i = ema_i / (1 - smoothing ** (i + 1)),
        ema_i = smoothing * ema_{i-1} + (1 - smoothing) * loss_i
    ```

    Reading the curve as the paper does (bounds where the curve starts to
    improve and where it "slows, becomes ragged, or starts to fall"), on the
    loss instead of accuracy because every model has one: the loss stops
    decreasing at `min_loss_lr`, the minimum of the loss smoothed forwards
    and backwards (which removes the moving average's lag). The suggestion is
    `max_lr = min_loss_lr` and `base_lr = max_lr / 4` (the paper's rule of
    thumb of 1/3 to 1/4); `max_lr` also serves as the peak of `OneCycle`. A
    fast ramp overstates the usable rate (the loss, and momentum, lag the
    rising rate): give the test about 20 or more steps per decade of the
    range. The fastai learning-rate finder's more cautious reading is
    `min_loss_lr / 10`.

    Use `lr_range_test(model, x, y, ...)` to run the test in one call. With
    `steps_per_execution > 1` Keras reports only every N-th batch, so the
    test refuses it.

    Args:
        min_lr: float. The first learning rate, `> 0`. Defaults to `1e-7`.
        max_lr: float. The last learning rate, `> min_lr`. Defaults to `10.0`.
        steps: int. Batches in the ramp, `>= 2`. Defaults to `100`.
        mode: str. `"exponential"` (even steps on a log axis, the usual
            choice) or `"linear"`. Defaults to `"exponential"`.
        smoothing: float. The moving average's weight of the past, in
            `[0, 1)`. Defaults to `0.9`.
        divergence_factor: float. Stop when the smoothed loss exceeds this
            multiple of the best smoothed loss, `> 1`. Defaults to `4.0`.
        verbose: int. 1 prints the outcome when the test ends. Defaults to
            `0`.

    Attributes:
        learning_rates: list of float. The learning rate of each batch run.
        losses: list of float. Each batch's own loss.
        smoothed_losses: list of float. The moving average above.
        divergence_lr: float or `None`. The learning rate at which the loss
            diverged, or `None` if it never did.
        min_loss_lr: float. The learning rate at the minimum of the smoothed
            loss.
        suggestion: dict `{"base_lr", "max_lr"}` for `CyclicLR(**suggestion,
            step_size=...)`; `max_lr` also suits `OneCycle`.

    Raises:
        ValueError: in `__init__` for a bad argument; in `on_train_begin` for
            an optimizer whose learning rate is a schedule or
            `steps_per_execution > 1`; from `suggestion` if fewer than 3
            batches ran before the loss diverged.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    >>> y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(), loss="mse")
    >>> before = [w.copy() for w in model.get_weights()]
    >>> test = lr_range_test(model, x, y, batch_size=16, min_lr=1e-4,
    ...                      max_lr=10.0, steps=60)
    >>> test.divergence_lr is not None
    True
    >>> test.suggestion["max_lr"] < test.divergence_lr
    True
    >>> all((a == b).all() for a, b in zip(before, model.get_weights()))
    True

    Reference:
    - [Smith, 2017](https://arxiv.org/abs/1506.01186), Section 3.3
    """

    def __init__(
        self,
        min_lr=1e-7,
        max_lr=10.0,
        steps=100,
        mode="exponential",
        smoothing=0.9,
        divergence_factor=4.0,
        verbose=0,
    ):
        super().__init__(verbose=verbose)
        self.min_lr = check_float_in_range(
            "min_lr", min_lr, 0.0, math.inf, False, False
        )
        if (
            isinstance(max_lr, bool)
            or not isinstance(max_lr, numbers.Real)
            or not math.isfinite(max_lr)
            or max_lr <= self.min_lr
        ):
            raise argument_error(
                "max_lr", f"a float > min_lr={self.min_lr!r}", max_lr
            )
        self.max_lr = float(max_lr)
        if (
            isinstance(steps, bool)
            or not isinstance(steps, numbers.Integral)
            or steps < 2
        ):
            raise argument_error("steps", "an int >= 2", steps)
        self.steps = int(steps)
        self.mode = check_choice("mode", mode, MODES)
        self.smoothing = check_float_in_range(
            "smoothing", smoothing, 0.0, 1.0, True, False
        )
        self.divergence_factor = check_float_in_range(
            "divergence_factor", divergence_factor, 1.0, math.inf, False, False
        )
        self._reset_results()
        self._saved = None
        self._first_iteration = 0

    def _reset_results(self):
        self.learning_rates = []
        self.losses = []
        self.smoothed_losses = []
        self.divergence_lr = None
        self._average = 0.0
        self._best = math.inf

    def learning_rate_at(self, iteration):
        i = min(max(iteration - self._first_iteration, 0), self.steps - 1)
        fraction = i / (self.steps - 1)
        if self.mode == "linear":
            return self.min_lr + (self.max_lr - self.min_lr) * fraction
        return self.min_lr * (self.max_lr / self.min_lr) ** fraction

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        spe = getattr(self.model, "steps_per_execution", 1) or 1
        if spe > 1:
            raise ValueError(
                "LRRangeTest needs the loss of every batch, but the model "
                f"was compiled with steps_per_execution={spe}, so Keras "
                "reports one batch in every "
                f"{spe}. Compile with steps_per_execution=1 for the test."
            )
        sync_model_state(self.model)
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._reset_results()
        self._saved = (
            _snapshot(self.model.variables),
            _snapshot(optimizer.variables),
        )
        self._first_iteration = read_iterations(optimizer)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        # Keras logs the epoch's running mean; reset it so the logs carry
        # this batch's loss alone.
        self.model.reset_metrics()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        loss = float((logs or {}).get("loss", math.nan))
        self.learning_rates.append(self._last_learning_rate)
        self.losses.append(loss)
        count = len(self.losses)
        if math.isfinite(loss):
            self._average = (
                self.smoothing * self._average + (1.0 - self.smoothing) * loss
            )
        smoothed = self._average / (1.0 - self.smoothing**count)
        self.smoothed_losses.append(smoothed)
        if (
            not math.isfinite(loss)
            or smoothed > self.divergence_factor * self._best
        ):
            self.divergence_lr = self._last_learning_rate
            self.model.stop_training = True
            return
        self._best = min(self._best, smoothed)
        if count >= self.steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._last_learning_rate is not None:
            logs["learning_rate"] = self._last_learning_rate

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.restore()
        if self.verbose:
            outcome = (
                f"diverged at lr={self.divergence_lr:.3g}"
                if self.divergence_lr is not None
                else "did not diverge"
            )
            try:
                suggestion = (
                    f"; suggested base_lr={self.suggestion['base_lr']:.3g}, "
                    f"max_lr={self.suggestion['max_lr']:.3g}"
                )
            except ValueError:
                suggestion = ""
            print(
                f"LRRangeTest: {len(self.losses)} batches from "
                f"lr={self.min_lr:.3g}, {outcome}{suggestion}. Model and "
                "optimizer restored."
            )

    def restore(self):
        """Puts back the variables saved when training began (once)."""
        if self._saved is None:
            return
        model_values, optimizer_values = self._saved
        sync_model_state(self.model)
        for variable, value in zip(self.model.variables, model_values):
            variable.assign(value)
        for variable, value in zip(
            self.model.optimizer.variables, optimizer_values
        ):
            variable.assign(value)
        self._saved = None

    def _usable(self):
        """Learning rates and losses before divergence (finite losses)."""
        end = len(self.losses) - (self.divergence_lr is not None)
        pairs = [
            (lr, loss)
            for lr, loss in zip(self.learning_rates[:end], self.losses[:end])
            if math.isfinite(loss)
        ]
        if len(pairs) < 3:
            raise ValueError(
                f"LRRangeTest ran {len(pairs)} usable batches before the "
                "loss diverged, too few to read a curve. Lower `min_lr` or "
                "raise `steps`."
            )
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def centered_losses(self):
        """The losses smoothed forwards then backwards (no lag).

        Returns `(learning_rates, losses)` for the batches before divergence.
        """
        rates, losses = self._usable()
        forward = _smooth(losses, self.smoothing)
        backward = _smooth(forward[::-1], self.smoothing)[::-1]
        return rates, backward

    @property
    def min_loss_lr(self):
        rates, losses = self.centered_losses()
        return rates[int(np.argmin(losses))]

    @property
    def suggestion(self):
        max_lr = self.min_loss_lr
        return {"base_lr": max_lr / 4.0, "max_lr": max_lr}

    def plot(self, path):
        """Writes the loss against the learning rate (log axis) to a PNG.

        Args:
            path: str or path-like. Where to write the image; written
                atomically.

        Returns:
            `path`.

        Raises:
            ImportError: if matplotlib (the `plot` extra) is missing.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "LRRangeTest.plot needs matplotlib. Install it with "
                "`pip install 'keras_regkit[plot]'` (or `pip install "
                "matplotlib`)."
            ) from error
        figure = Figure(figsize=(6.4, 4.2), dpi=100)
        axes = figure.add_subplot()
        axes.plot(
            self.learning_rates,
            self.losses,
            color="0.7",
            lw=0.8,
            label="batch loss",
        )
        try:
            rates, centered = self.centered_losses()
            suggestion = self.suggestion
        except ValueError:
            rates, centered, suggestion = [], [], None
        if rates:
            axes.plot(
                rates, centered, color="C0", lw=1.8, label="smoothed loss"
            )
        if suggestion is not None:
            lowest = self.min_loss_lr
            axes.plot(
                [lowest],
                [min(centered)],
                "o",
                color="C1",
                label=f"loss minimum at {lowest:.3g}",
            )
            for key, style in (("base_lr", ":"), ("max_lr", "--")):
                axes.axvline(
                    suggestion[key],
                    color="C2",
                    ls=style,
                    label=f"{key} = {suggestion[key]:.3g}",
                )
        if self.divergence_lr is not None:
            axes.axvline(
                self.divergence_lr,
                color="C3",
                lw=1.0,
                label=f"diverged at {self.divergence_lr:.3g}",
            )
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            low = min(finite)
            start = centered[0] if rates else finite[0]
            axes.set_ylim(low - 0.05 * abs(low), max(start, low) * 1.5 + 1e-12)
        if self.mode == "exponential":
            axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss")
        axes.set_title("Learning-rate range test")
        axes.legend(loc="best", fontsize="small")
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
        return path

    def get_config(self):
        return {
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "steps": self.steps,
            "mode": self.mode,
            "smoothing": self.smoothing,
            "divergence_factor": self.divergence_factor,
            "verbose": self.verbose,
        }


def lr_range_test(
    model,
    x,
    y=None,
    batch_size=None,
    min_lr=1e-7,
    max_lr=10.0,
    steps=100,
    mode="exponential",
    smoothing=0.9,
    divergence_factor=4.0,
    plot_path=None,
    verbose=0,
    **fit_kwargs,
):
    """Runs the learning-rate range test on a compiled model and restores it.

    Calls `model.fit` with an `LRRangeTest` callback for up to `steps`
    batches (cycling through the data as often as needed), then puts the
    model's and the optimizer's variables back exactly as they were, even if
    `fit` raises. See `LRRangeTest` for the ramp, the smoothing and the
    suggestion.

    Args:
        model: A compiled `keras.Model` whose optimizer has a float learning
            rate and `steps_per_execution=1`.
        x: Input data, as for `fit` (arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`).
        y: Targets, as for `fit`. Defaults to `None`.
        batch_size: int. As for `fit`. Defaults to `None` (32 for arrays).
        min_lr: float. See `LRRangeTest`. Defaults to `1e-7`.
        max_lr: float. Defaults to `10.0`.
        steps: int. Defaults to `100`.
        mode: str. Defaults to `"exponential"`.
        smoothing: float. Defaults to `0.9`.
        divergence_factor: float. Defaults to `4.0`.
        plot_path: str, path-like or `None`. If given, the plot is written
            there (needs matplotlib). Defaults to `None`.
        verbose: int. 1 prints the outcome. Defaults to `0`.
        **fit_kwargs: More arguments for `fit` (`shuffle`, `class_weight`,
            `callbacks`, ...); not `epochs`.

    Returns:
        The `LRRangeTest` callback, holding the curve and the `suggestion`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(), loss="mse")
    >>> test = lr_range_test(model, x, y, batch_size=16, steps=40)
    >>> len(test.losses) <= 40
    True
    """
    callback = LRRangeTest(
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        mode=mode,
        smoothing=smoothing,
        divergence_factor=divergence_factor,
        verbose=verbose,
    )
    if "epochs" in fit_kwargs:
        raise argument_error(
            "epochs",
            "nothing: the test runs `steps` batches, however many epochs "
            "that takes",
            fit_kwargs["epochs"],
        )
    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    try:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=callback.steps,
            callbacks=[callback, *callbacks],
            verbose=0,
            **fit_kwargs,
        )
    finally:
        callback.restore()
    if plot_path is not None:
        callback.plot(plot_path)
    return callback
