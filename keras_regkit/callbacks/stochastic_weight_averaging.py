"""The StochasticWeightAveraging callback: SWA's rate policy and average."""

import math
import numbers
import warnings

import keras
import numpy as np

from keras_regkit._training import claim
from keras_regkit._training import inner_optimizer
from keras_regkit._training import release
from keras_regkit._training import sync_model_state
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_int
from keras_regkit.callbacks._learning_rate import check_settable_learning_rate
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers
from keras_regkit.callbacks.polyak_averaging import PolyakAveraging

__all__ = ["StochasticWeightAveraging"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class StochasticWeightAveraging(PolyakAveraging):
    """Stochastic weight averaging (SWA): the SWA rate and the average.

    Before the start epoch `s` the optimizer's learning rate is left alone.
    From epoch `s` on, the callback sets the rate at each epoch begin,
    annealing it from `lr_0`, the rate the optimizer holds when epoch `s`
    begins, to `swa_learning_rate` over `annealing_epochs` epochs `T`, then
    holding it; at the end of each `every` epochs from `s` it folds the
    weights into a uniform average. For SWA epoch `k = epoch - s >= 0`:

    ```
    t = min(k, T) / T          (t = 1 when T = 0)
    cos:     lr_k = swa_lr + (lr_0 - swa_lr) * (1 + cos(pi * t)) / 2
    linear:  lr_k = swa_lr + (lr_0 - swa_lr) * (1 - t)
    avg = mean of the weights after epochs s + every - 1, s + 2 * every - 1,..
    ```

    The rate is `torch.optim.swa_utils.SWALR` stepped once per epoch, as
    PyTorch Lightning's `StochasticWeightAveraging` does: the first SWA
    epoch runs at `lr_0`. Epochs are the ones `fit` numbers
    (`initial_epoch` continues a run), and a resumed run recovers `lr_0`
    from the optimizer's rate as `SWALR` does. The model's batch-norm
    statistics are recomputed for the averaged weights over
    `batch_norm_data` (`recompute_batchnorm_statistics`) whenever the
    averages enter a model; without data they are averaged with the weights,
    with a warning. When `fit` returns the model holds the averages
    (`final_weights="average"`); `averaged_model()` gives a new model
    holding them. Everything else is `PolyakAveraging(decay=None,
    unit="epoch")`'s, whose methods this class has.

    Args:
        swa_learning_rate: float > 0. The constant SWA rate: SWA wants a
            relatively high rate, not the end of a usual decay.
        start_epoch: int >= 0, the first SWA epoch, or a float in [0, 1),
            the fraction of `fit`'s `epochs` trained before it
            (`floor(start_epoch * epochs)`). Defaults to `0.75`: the last
            quarter of training (PyTorch Lightning uses 0.8).
        annealing_epochs: int >= 0. Epochs `T` from `lr_0` to
            `swa_learning_rate`. Defaults to `10` (as `SWALR`).
        annealing: `"cos"` or `"linear"`. Defaults to `"cos"`.
        every: int >= 1. Epochs per iterate averaged (a cycle's length).
            Defaults to `1`.
        batch_norm_data: The inputs to recompute batch-norm statistics on,
            as `recompute_batchnorm_statistics` takes them, or `None`.
            Defaults to `None`.
        batch_norm_steps: int or `None`. Batches of `batch_norm_data` to
            use (`None`: all). Defaults to `None`.
        validation_data: `(x, y)` or a dataset, to evaluate the averages on
            at each epoch end (logged as `val_average_<metric>`). Defaults
            to `None`.
        validation_batch_size: int or `None`. Defaults to `None`.
        final_weights: `"average"` or `"training"`: what the model holds
            when `fit` returns. Defaults to `"average"`.
        backup_dir: str or `None`. As in `PolyakAveraging`. Defaults to
            `None`.
        verbose: int. 0 is silent; 1 prints the rate and the number of
            iterates at each epoch end. Defaults to `0`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks.stochastic_weight_averaging import (
    ...     StochasticWeightAveraging)
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> y = x @ np.ones((4, 1), "float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(0.1), "mse")
    >>> swa = StochasticWeightAveraging(0.02, start_epoch=4,
    ...                                 annealing_epochs=2)
    >>> history = model.fit(x, y, batch_size=16, epochs=8, verbose=0,
    ...                     callbacks=[swa])
    >>> [round(r, 4) for r in history.history["learning_rate"]]
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.06, 0.02, 0.02]
    >>> swa.num_averaged  # the weights after epochs 4, 5, 6, 7 (0-based)
    4
    >>> averaged = swa.averaged_model()  # a new keras.Model, savable

    Reference:
    - [Izmailov et al., 2018](https://arxiv.org/abs/1803.05407)
    - [PyTorch `SWALR`](
      https://pytorch.org/docs/stable/generated/torch.optim.swa_utils.SWALR.html)
    """

    def __init__(
        self,
        swa_learning_rate,
        start_epoch=0.75,
        annealing_epochs=10,
        annealing="cos",
        every=1,
        batch_norm_data=None,
        batch_norm_steps=None,
        validation_data=None,
        validation_batch_size=None,
        final_weights="average",
        backup_dir=None,
        verbose=0,
    ):
        self.swa_learning_rate = check_float_in_range(
            "swa_learning_rate",
            swa_learning_rate,
            0.0,
            float("inf"),
            False,
            False,
        )
        self.start_epoch = _check_start_epoch(start_epoch)
        self.annealing_epochs = check_int(
            "annealing_epochs", annealing_epochs, minimum=0
        )
        self.annealing = str(
            check_choice("annealing", annealing, ("cos", "linear"))
        )
        super().__init__(
            decay=None,
            start=self.start_epoch if isinstance(self.start_epoch, int) else 0,
            every=every,
            unit="epoch",
            batch_norm="average" if batch_norm_data is None else "recompute",
            batch_norm_data=batch_norm_data,
            batch_norm_steps=batch_norm_steps,
            validation_data=validation_data,
            validation_batch_size=validation_batch_size,
            final_weights=final_weights,
            backup_dir=backup_dir,
            verbose=verbose,
        )
        self._initial_rate = None  # lr_0 of the running `fit`.
        self._rate = None  # The rate of the current epoch.

    def get_config(self):
        return {
            "swa_learning_rate": self.swa_learning_rate,
            "start_epoch": self.start_epoch,
            "annealing_epochs": self.annealing_epochs,
            "annealing": self.annealing,
            "every": self.every,
            "batch_norm_data": self.batch_norm_data,
            "batch_norm_steps": self.batch_norm_steps,
            "validation_data": self.validation_data,
            "validation_batch_size": self.validation_batch_size,
            "final_weights": self.final_weights,
            "backup_dir": self.backup_dir,
            "verbose": self.verbose,
        }

    def annealed_fraction(self, swa_epoch):
        """`alpha` of SWA epoch `k`: `lr_k = (1 - alpha) lr_0 + alpha swa`."""
        if self.annealing_epochs == 0:
            return 1.0
        t = min(max(swa_epoch, 0), self.annealing_epochs)
        t /= self.annealing_epochs
        if self.annealing == "cos":
            return (1.0 - math.cos(math.pi * t)) / 2.0
        return t

    # Callback hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self._target
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            check_settable_learning_rate(self, optimizer)
        if not isinstance(self.start_epoch, int):
            epochs = int((self.params or {}).get("epochs") or 0)
            # The small slack keeps e.g. 0.29 * 100 at 29, not 28.
            self.start = math.floor(self.start_epoch * epochs + 1e-9)
        super().on_train_begin(logs)
        claim(self, "learning_rate")
        self._initial_rate = None
        self._rate = None
        if self.batch_norm == "average" and any(
            layer.trainable for layer in batch_norm_layers(model)
        ):
            warnings.warn(
                "StochasticWeightAveraging: the model has batch "
                "normalization and no `batch_norm_data` was given, so its "
                "statistics are averaged with the weights instead of "
                "recomputed for the averaged weights, as SWA does. Pass "
                "`batch_norm_data=` (the training inputs) to recompute them.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        # SWA counts the epochs as `fit` numbers them (`initial_epoch` and
        # `BackupAndRestore` included), not those trained with the callback.
        self._epochs = epoch
        model = self._target
        sync_model_state(model)
        optimizer = inner_optimizer(model.optimizer)
        swa_epoch = epoch - self.start
        if swa_epoch < 0:
            self._rate = _read_rate(optimizer)
            return
        if self._initial_rate is None:
            self._initial_rate = self._recover_initial_rate(
                _read_rate(optimizer), swa_epoch
            )
        alpha = self.annealed_fraction(swa_epoch)
        rate = (1.0 - alpha) * self._initial_rate + alpha * (
            self.swa_learning_rate
        )
        optimizer.learning_rate = rate
        self._rate = float(
            np.asarray(rate, dtype=optimizer.learning_rate.dtype)
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._rate is not None:
            logs["learning_rate"] = self._rate
        if self.verbose and self._rate is not None:
            print(
                f"\nEpoch {epoch + 1}: StochasticWeightAveraging learning "
                f"rate {self._rate:.6g}."
            )
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        try:
            super().on_train_end(logs)
        finally:
            release(self, "learning_rate")

    # Helpers ---------------------------------------------------------------

    def _recover_initial_rate(self, rate, swa_epoch):
        """`lr_0` from the rate the optimizer holds at SWA epoch `k`.

        At `k = 0` that rate is `lr_0`. A run resumed at `k > 0` holds the
        rate of epoch `k - 1`, which is inverted as `SWALR` does.
        """
        if swa_epoch == 0:
            return rate
        alpha = self.annealed_fraction(swa_epoch - 1)
        if alpha >= 1.0:
            return self.swa_learning_rate
        return (rate - alpha * self.swa_learning_rate) / (1.0 - alpha)


def _read_rate(optimizer):
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _check_start_epoch(value):
    expected = (
        "an int >= 0 (the first SWA epoch) or a float in [0, 1) (the "
        "fraction of `epochs` before it)"
    )
    if isinstance(value, (bool, np.bool_)):
        raise argument_error("start_epoch", expected, value)
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise argument_error("start_epoch", expected, value)
        return int(value)
    if isinstance(value, numbers.Real) and 0.0 <= float(value) < 1.0:
        return float(value)
    raise argument_error("start_epoch", expected, value)
