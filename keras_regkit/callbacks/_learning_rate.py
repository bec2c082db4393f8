"""Private base for callbacks that set the learning rate per iteration.

CyclicLR, OneCycle and SnapshotEnsemble share one mechanism: before each
training batch, read the optimizer's own step counter
(`optimizer.iterations`) and assign the learning rate the policy gives for
that iteration. Reading the optimizer's counter, not a Python counter, keeps the
policy right across several `fit` calls and across `BackupAndRestore`
resumption, because the counter is part of the optimizer state that Keras saves
and restores.

With `steps_per_execution=N`, Keras calls batch hooks once per execution, so
the learning rate is set for the first iteration of each group of N and held
for the N steps. For an exact per-iteration value inside the compiled step,
compile the optimizer with the schedule form instead (`keras_regkit.schedules`).
"""

import keras
from keras import ops


def sync_model_state(model):
    """Makes the model's variables current during `fit` on the JAX backend.

    The JAX trainer keeps the training state outside the variables between
    steps; a callback that reads or assigns variables mid-epoch must first
    write that state back (Keras re-reads it before the next step).
    """
    if keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def read_iterations(optimizer):
    """Returns `optimizer.iterations` as a Python int."""
    return int(ops.convert_to_numpy(optimizer.iterations))


class IterationLearningRateCallback(keras.callbacks.Callback):
    """Sets `optimizer.learning_rate` from `optimizer.iterations` each batch.

    Subclasses implement `learning_rate_at(iteration)` (a pure function of the
    0-based iteration, in Python floats) and may override
    `check_optimizer(optimizer)`.

    Args:
        verbose: int. 0 is silent, 1 prints the learning rate at each epoch
            end. Defaults to `0`.
    """

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self._last_learning_rate = None

    def learning_rate_at(self, iteration):
        raise NotImplementedError

    def check_optimizer(self, optimizer):
        """Raises `ValueError` if `optimizer`'s learning rate can't be set."""
        schedule = keras.optimizers.schedules.LearningRateSchedule
        if isinstance(getattr(optimizer, "_learning_rate", None), schedule):
            raise ValueError(
                f"{type(self).__name__} sets the learning rate itself, but the "
                "optimizer was compiled with a `LearningRateSchedule` "
                f"({type(optimizer._learning_rate).__name__}), whose learning "
                "rate cannot be set. Compile with a float learning rate "
                f"(e.g. `{type(optimizer).__name__}(learning_rate=1e-3)`), or "
                "use the schedule alone without this callback."
            )

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an "
                "optimizer. Call `model.compile(optimizer=...)` before `fit`."
            )
        self.check_optimizer(optimizer)

    def on_train_batch_begin(self, batch, logs=None):
        sync_model_state(self.model)
        optimizer = self.model.optimizer
        learning_rate = self.learning_rate_at(read_iterations(optimizer))
        optimizer.learning_rate = learning_rate
        self._last_learning_rate = learning_rate

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and self._last_learning_rate is not None:
            logs["learning_rate"] = self._last_learning_rate

    def on_epoch_end(self, epoch, logs=None):
        if self._last_learning_rate is None:
            return
        if logs is not None:
            logs["learning_rate"] = self._last_learning_rate
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} learning rate "
                f"{self._last_learning_rate:.6g}."
            )
