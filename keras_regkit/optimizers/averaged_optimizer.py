"""An optimizer wrapper that averages the weights inside the train step."""

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_averaging

# Base `Optimizer` arguments the wrapper does not take (they belong on the
# inner optimizer), with the defaults a deserialized config may carry.
_BASE_DEFAULTS = {
    "learning_rate": 0.0,
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def _fold(decay, warmup, start, every, step, count, averages, weights):
    """Pure fold of `weights` into `averages`: `(new_count, new_averages)`.

    `step` is the inner optimizer's iteration count after the update.
    """
    step = ops.cast(step, "int32")
    due = ops.logical_and(
        ops.greater(step, start),
        ops.equal(ops.mod(step - start, every), 0),
    )
    n = ops.cast(count, "float32")
    if decay is None:
        rate = 1.0 / (n + 1.0)
    else:
        rate = 1.0 - decay
        if warmup:
            # 1 - min(d, (1 + n) / (10 + n)).
            rate = ops.maximum(rate, 9.0 / (10.0 + n))
        rate = ops.where(ops.equal(n, 0.0), 1.0, rate)
    new_averages = []
    for average, weight in zip(averages, weights):
        average = ops.convert_to_tensor(average)
        weight = ops.cast(weight, "float32")
        new_averages.append(
            ops.where(due, average + (weight - average) * rate, average)
        )
    new_count = count + ops.cast(due, ops.dtype(count))
    return new_count, new_averages


@keras.saving.register_keras_serializable(package="keras_regkit")
class AveragedOptimizer(keras.optimizers.Optimizer):
    """Optimizer wrapper that keeps a running average of the weights.

    After each step of `inner_optimizer`, inside the compiled train step,
    the new weights `w` are folded into a float32 average, one per trainable
    variable. With `t` the inner optimizer's `iterations` after the step, the
    iterate is averaged when `t > start` and `(t - start) % every == 0`; the
    first averaged iterate is taken as is (`avg_1 = w_1`), then

    ```
    decay=None:  avg_(n+1) = avg_n + (w_(n+1) - avg_n) / (n + 1)
    decay=d:     avg_(n+1) = avg_n - (1 - d_n) * (avg_n - w_(n+1))
                 d_n = d, or min(d, (1 + n) / (10 + n)) with warmup=True
    ```

    `decay=None` is the uniform Polyak-Ruppert (SWA) mean of the averaged
    iterates, `decay=d` an exponential moving average. The wrapper does not
    change training: the model's weights follow `inner_optimizer` exactly.
    The averages are optimizer variables, so `save_weights`, `.keras` files
    and `keras.callbacks.BackupAndRestore` keep them. This is the in-step
    form of `keras_regkit.callbacks.PolyakAveraging(unit="step")`, exact with
    `steps_per_execution > 1`. Use the averages with `averages()` or
    `swap_average_weights(model.trainable_variables)` after `fit` (calling it
    again swaps the training weights back).

    Args:
        inner_optimizer: `keras.optimizers.Optimizer`. The optimizer that
            updates the weights.
        decay: float in (0, 1), or `None`. EMA decay `d`; `None` for the
            uniform average. Defaults to `0.999`.
        start: int. Iterates up to step `start` are not averaged. Defaults
            to `0`.
        every: int. Average every `every`-th iterate after `start`. Defaults
            to `1`.
        warmup: bool. The EMA warm-up of `d_n` above (needs a `decay`).
            Defaults to `False`.
        name: String. The optimizer's name. Defaults to `None`.

    Example:

    >>> import numpy as np
    >>> optimizer = AveragedOptimizer(keras.optimizers.SGD(0.1), decay=None)
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> x, y = np.ones((8, 3)), np.ones((8, 1))
    >>> _ = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    >>> optimizer.num_averaged
    4
    >>> optimizer.swap_average_weights(model.trainable_variables)

    Reference:

    - [Polyak & Juditsky, 1992](https://doi.org/10.1137/0330046)
    - [Izmailov et al., 2018](https://arxiv.org/abs/1803.05407)
    """

    def __init__(
        self,
        inner_optimizer,
        decay=0.999,
        start=0,
        every=1,
        warmup=False,
        name=None,
        **kwargs,
    ):
        for arg_name, default in _BASE_DEFAULTS.items():
            if arg_name in kwargs and kwargs.pop(arg_name) != default:
                raise ValueError(
                    f"AveragedOptimizer does not take `{arg_name}`. Set "
                    f"`{arg_name}` on the `inner_optimizer` instead."
                )
        if kwargs:
            raise ValueError(
                "AveragedOptimizer does not take the arguments: "
                f"`{'`, `'.join(kwargs)}`."
            )
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise argument_error(
                "inner_optimizer",
                "a `keras.optimizers.Optimizer` instance",
                inner_optimizer,
            )
        decay, start, every, warmup = check_averaging(
            decay, start, every, warmup
        )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.decay = decay
        self.start = start
        self.every = every
        self.warmup = warmup

    def build(self, var_list):
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self._count = self.add_variable(
            shape=(), dtype="int", initializer="zeros", name="num_averaged"
        )
        self._averages = [
            self.add_variable(
                shape=variable.shape,
                dtype="float32",
                initializer="zeros",
                name=variable.path.replace("/", "_") + "_average",
            )
            for variable in var_list
        ]
        super().build(var_list)

    @property
    def variables(self):
        return self.inner_optimizer.variables + super().variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def _check_variables(self, trainable_variables):
        if trainable_variables is None or len(trainable_variables) != len(
            self._averages
        ):
            raise ValueError(
                "AveragedOptimizer needs the same trainable variables it was "
                f"built with ({len(self._averages)} variables). Received: "
                f"trainable_variables={trainable_variables}"
            )

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "AveragedOptimizer.apply needs `trainable_variables` to "
                    "build. Received: trainable_variables=None"
                )
            self.build(trainable_variables)
        self._check_variables(trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables)
        count, averages = _fold(
            self.decay,
            self.warmup,
            self.start,
            self.every,
            self.inner_optimizer.iterations,
            self._count,
            self._averages,
            trainable_variables,
        )
        for variable, value in zip(self._averages, averages):
            variable.assign(value)
        self._count.assign(count)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, AveragedOptimizer must be built. "
                "Build it with `optimizer.build(trainable_variables)`."
            )
        self._check_variables(trainable_variables)
        num_inner = len(self.inner_optimizer.variables)
        new_trainable, new_inner = self.inner_optimizer.stateless_apply(
            list(optimizer_variables[:num_inner]), grads, trainable_variables
        )
        mapping = list(
            zip(
                self.variables,
                list(new_inner) + list(optimizer_variables[num_inner:]),
            )
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            count, averages = _fold(
                self.decay,
                self.warmup,
                self.start,
                self.every,
                ops.convert_to_tensor(self.inner_optimizer.iterations),
                ops.convert_to_tensor(self._count),
                self._averages,
                new_trainable,
            )
            for variable, value in zip(self._averages, averages):
                variable.assign(value)
            self._count.assign(count)
        own = [scope.get_current_value(v) for v in super().variables]
        return new_trainable, list(new_inner) + own

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def num_averaged(self):
        """Number of iterates averaged so far (int)."""
        if not self.built:
            return 0
        return int(ops.convert_to_numpy(self._count))

    def averages(self):
        """The averages as float32 NumPy arrays, in trainable-variable order.

        On JAX, a callback inside `fit` sees the values of the last state
        sync of the model; after `fit` they are current.
        """
        self._require_averages()
        return [np.array(ops.convert_to_numpy(a)) for a in self._averages]

    def swap_average_weights(self, variables):
        """Swaps the averages with the values of `variables`.

        Puts the averages into `variables` (the model's trainable variables,
        in the order the optimizer was built with) and keeps their values in
        the optimizer; a second call swaps them back.

        Args:
            variables: list of `keras.Variable`, e.g.
                `model.trainable_variables`.
        """
        self._require_averages()
        self._check_variables(variables)
        for variable, average in zip(variables, self._averages):
            if tuple(variable.shape) != tuple(average.shape):
                raise ValueError(
                    "swap_average_weights needs the variables the optimizer "
                    f"was built with. Variable {variable.path} has shape "
                    f"{tuple(variable.shape)}, its average "
                    f"{tuple(average.shape)}."
                )
        for variable, average in zip(variables, self._averages):
            weight = ops.convert_to_numpy(variable)
            variable.assign(ops.cast(average, variable.dtype))
            average.assign(ops.cast(weight, "float32"))

    def _require_averages(self):
        if self.num_averaged == 0:
            raise ValueError(
                "AveragedOptimizer has no averages yet: train with it first "
                f"(averaging starts after step start={self.start})."
            )

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "decay": self.decay,
            "start": self.start,
            "every": self.every,
            "warmup": self.warmup,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner_optimizer, **config)
