"""The learning-rate range test of Smith (2017): LRRangeTest, lr_range_test."""

import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from keras_regkit._training import read_iterations
from keras_regkit._training import sync_model_state
from keras_regkit._utils import atomic_path
from keras_regkit._utils import check_path
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_int
from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback

__all__ = ["LRRangeTest", "lr_range_test"]

MODES = ("exponential", "linear")
STEPS_PER_DECADE = 20


def _smooth(losses, smoothing):
    """Bias-corrected exponential moving average, oldest first."""
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, start=1):
        average = smoothing * average + (1.0 - smoothing) * loss
        smoothed.append(average / (1.0 - smoothing**count))
    return smoothed


def _snapshot(variables):
    return [np.array(ops.convert_to_numpy(v), copy=True) for v in variables]


def default_steps(min_lr, max_lr, mode):
    """The ramp's length when `steps=None`: 20 per decade (100 if linear)."""
    if mode == "linear":
        return 100
    decades = math.log10(max_lr / min_lr)
    return max(2, math.ceil(STEPS_PER_DECADE * decades) + 1)


@keras.saving.register_keras_serializable(package="keras_regkit")
class LRRangeTest(IterationLearningRateCallback):
    """The learning-rate range test: ramp the rate, watch the loss.

    During a short `fit` the learning rate grows from `min_lr` to `max_lr`
    over `steps` batches while the callback records each batch's own loss
    (it resets the model's metrics before every batch, since Keras logs a
    running mean that lags the curve). It stops after `steps` batches or when
    the loss diverges, then restores the model's and the optimizer's
    variables bit for bit, so training afterwards proceeds as if the test
    never ran. With `i` counting batches from 0 and `n = steps`:

    ```
    exponential: lr_i = min_lr * (max_lr / min_lr) ** (i / (n - 1))
    linear:      lr_i = min_lr + (max_lr - min_lr) * i / (n - 1)
    ```

    The loss, smoothed forwards and backwards (no lag), is lowest at
    `min_loss_lr`; the `suggestion` is `max_lr = min_loss_lr` and
    `base_lr = max_lr / 4` (the paper's 1/3 to 1/4; fastai reads the more
    cautious `min_loss_lr / 10`). A fast ramp overstates the usable rate, so
    the default gives the ramp 20 steps per decade. It warns when the lowest
    loss sits at either end of the range. `lr_range_test` runs it in one
    call; `steps_per_execution > 1` is refused (Keras then reports one batch
    in N).

    Args:
        min_lr: float. The first learning rate, `> 0`. Defaults to `1e-7`.
        max_lr: float. The last learning rate, `> min_lr`. Defaults to `10.0`.
        steps: int or `None`. Batches in the ramp, `>= 2`. `None` gives 20
            per decade of `[min_lr, max_lr]` (100 for `"linear"`). Defaults to
            `None`.
        mode: str. `"exponential"` or `"linear"`. Defaults to
            `"exponential"`.
        smoothing: float. The moving average's weight of the past, in
            `[0, 1)`. Defaults to `0.9`.
        divergence_factor: float. Stop when the smoothed loss exceeds this
            multiple of the best one so far, `> 1`. Defaults to `4.0`.
        verbose: int. 1 prints progress and the outcome. Defaults to `0`.

    Attributes:
        learning_rates: list of float. The learning rate of each batch run.
        losses: list of float. Each batch's own loss.
        smoothed_losses: list of float. Their bias-corrected moving average.
        divergence_lr: float or `None`. Where the loss diverged, if it did.
        min_loss_lr: float. Where the centred smoothed loss is lowest.
        suggestion: dict `{"base_lr", "max_lr"}` for `CyclicLR`; `max_lr`
            also suits `OneCycle`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    >>> y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(), loss="mse")
    >>> before = [w.copy() for w in model.get_weights()]
    >>> test = lr_range_test(model, x, y, batch_size=16, min_lr=1e-4,
    ...                      max_lr=10.0, steps=60)
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
        steps=None,
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
            isinstance(max_lr, (bool, np.bool_))
            or not isinstance(max_lr, numbers.Real)
            or not math.isfinite(max_lr)
            or max_lr <= self.min_lr
        ):
            raise argument_error(
                "max_lr", f"a finite float > min_lr={self.min_lr!r}", max_lr
            )
        self.max_lr = float(max_lr)
        self.mode = check_choice("mode", mode, MODES)
        if steps is None:
            steps = default_steps(self.min_lr, self.max_lr, self.mode)
        self.steps = check_int("steps", steps, minimum=2)
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

    def steps_per_execution_note(self, group):
        return None  # refused in `on_train_begin`

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        group = getattr(self.model, "steps_per_execution", 1) or 1
        if group > 1:
            raise ValueError(
                "LRRangeTest needs the loss of every batch, but the model "
                f"was compiled with steps_per_execution={group}, so Keras "
                f"reports one batch in every {group}. Compile with "
                "steps_per_execution=1 for the test."
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
        rate = self._last_learning_rate
        self.learning_rates.append(rate)
        self.losses.append(loss)
        count = len(self.losses)
        if math.isfinite(loss):
            self._average = (
                self.smoothing * self._average + (1.0 - self.smoothing) * loss
            )
        smoothed = self._average / (1.0 - self.smoothing**count)
        self.smoothed_losses.append(smoothed)
        if self.verbose and count % max(1, self.steps // 10) == 0:
            print(
                f"LRRangeTest: batch {count}/{self.steps}, lr={rate:.3g}, "
                f"loss={loss:.4g}"
            )
        if (
            not math.isfinite(loss)
            or smoothed > self.divergence_factor * self._best
        ):
            self.divergence_lr = rate
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
        try:
            rates, centered = self.centered_losses()
        except ValueError:
            rates = None
        if rates is not None:
            lowest = int(np.argmin(centered))
            if lowest == 0:
                self.warn_once(
                    "LRRangeTest: the loss was lowest at the first learning "
                    f"rate, {rates[0]:.3g}, so the range starts too high to "
                    "show where the loss begins to fall. Lower `min_lr`."
                )
            elif lowest == len(rates) - 1 and self.divergence_lr is None:
                self.warn_once(
                    "LRRangeTest: the loss was still falling at the end of "
                    f"the range (lowest at the last learning rate, "
                    f"{rates[-1]:.3g}), so the suggestion only bounds the "
                    "usable rate from below. Raise `max_lr`."
                )
        if self.verbose:
            outcome = (
                f"diverged at lr={self.divergence_lr:.3g}"
                if self.divergence_lr is not None
                else "did not diverge"
            )
            suggestion = ""
            if rates is not None:
                suggestion = (
                    f"; suggested base_lr={self.suggestion['base_lr']:.3g}, "
                    f"max_lr={self.suggestion['max_lr']:.3g}"
                )
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

    def plot(self, path=None, ax=None):
        """Draws the loss against the learning rate.

        Args:
            path: str, path-like or `None`. If given, the figure is written
                there as a PNG (atomically). Defaults to `None`.
            ax: a matplotlib `Axes` to draw on, or `None` for a new figure.
                Defaults to `None`.

        Returns:
            The matplotlib `Axes` drawn on.

        Raises:
            ImportError: if matplotlib (the `plot` extra) is missing.
        """
        if path is not None:
            path = check_path("path", path)
        try:
            from matplotlib.axes import Axes
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "LRRangeTest.plot needs matplotlib. Install it with "
                "`pip install 'keras_regkit[plot]'` (or `pip install "
                "matplotlib`)."
            ) from error
        if ax is None:
            figure = Figure(figsize=(6.4, 4.2), dpi=100)
            ax = figure.add_subplot()
        elif not isinstance(ax, Axes):
            raise argument_error("ax", "None or a matplotlib Axes", ax)
        self._draw(ax)
        if path is not None:
            with atomic_path(path) as temporary:
                ax.figure.savefig(temporary, format="png")
        return ax

    def _draw(self, axes):
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
    steps=None,
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
    model's and the optimizer's variables, and NumPy's global random state
    (which shuffling draws from on some backends), back as they were, even
    if `fit` raises. A failure to write the plot is a warning: the finished
    test is still returned.

    Args:
        model: A compiled `keras.Model` whose optimizer has a float learning
            rate and `steps_per_execution=1`.
        x: Input data, as for `fit`.
        y: Targets, as for `fit`. Defaults to `None`.
        batch_size: int or `None`. As for `fit`. Defaults to `None`.
        min_lr, max_lr, steps, mode, smoothing, divergence_factor: As for
            `LRRangeTest`.
        plot_path: str, path-like or `None`. Where to write the plot as a
            PNG (needs matplotlib). Defaults to `None`.
        verbose: int. 1 prints progress and the outcome. Defaults to `0`.
        **fit_kwargs: More arguments for `fit` (`shuffle`, `callbacks`, ...);
            not `epochs`.

    Returns:
        The `LRRangeTest` callback, holding the curve and the `suggestion`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
    >>> y = x.sum(axis=1, keepdims=True)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(), loss="mse")
    >>> test = lr_range_test(model, x, y, batch_size=16, min_lr=1e-4,
    ...                      max_lr=10.0, steps=40)
    >>> len(test.losses) <= 40
    True
    >>> bounds = test.suggestion  # {"base_lr": ..., "max_lr": ...}
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
    if getattr(model, "optimizer", None) is None or not isinstance(
        model, keras.Model
    ):
        raise argument_error(
            "model",
            "a keras.Model compiled with an optimizer (call "
            "`model.compile(optimizer=..., loss=...)` first)",
            model,
        )
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=1)
    if plot_path is not None:
        plot_path = check_path("plot_path", plot_path)
    if "epochs" in fit_kwargs:
        raise argument_error(
            "epochs",
            "nothing: the test runs `steps` batches, however many epochs "
            "that takes",
            fit_kwargs["epochs"],
        )
    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    random_state = np.random.get_state()
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
        np.random.set_state(random_state)
    if plot_path is not None:
        try:
            callback.plot(plot_path)
        except (ImportError, OSError, RuntimeError, ValueError) as error:
            warnings.warn(
                "lr_range_test: the test finished, but its plot could not "
                f"be written to {plot_path!r} ({type(error).__name__}: "
                f"{error}). "
                "The results are returned; call `test.plot(...)` to try "
                "again.",
                stacklevel=2,
            )
    return callback
