"""The average that every test-time averaging model shares.

Ensembles, Monte Carlo passes and test-time augmentation all end the same
way: `m` outputs of one structure `f_1..f_m` (one per member, pass or view)
become their weighted mean `sum_i w_i f_i` with `sum_i w_i = 1`, computed in
float32 whatever the dtype policy, optionally with the weighted standard
deviation across them as a measure of disagreement.
"""

import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice

__all__ = ["AVERAGES", "OutputAverage", "check_weights", "combine_outputs"]

AVERAGES = ("probabilities", "logits")


def check_weights(weights, count, name="weights"):
    """Returns `weights` normalized to sum to 1 (a tuple of floats), or
    `None` for equal weights; refuses a wrong length, negative or
    non-finite entries and an all-zero list."""
    if weights is None:
        return None
    expected = (
        f"None or a list of {count} non-negative finite floats, not all zero "
        "(one per averaged output)"
    )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise argument_error(name, expected, weights) from None
    if (
        len(values) != count
        or any(isinstance(w, bool) for w in weights)
        or not all(
            isinstance(w, numbers.Real) or np.ndim(w) == 0 for w in weights
        )
        or not all(np.isfinite(values))
        or min(values) < 0
        or sum(values) <= 0
    ):
        raise argument_error(name, expected, weights)
    total = sum(values)
    return tuple(w / total for w in values)


def check_average(average, from_logits):
    """Checks the `average`/`from_logits` pair every averaging model takes."""
    average = str(check_choice("average", average, AVERAGES))
    from_logits = check_bool("from_logits", from_logits)
    if average == "logits" and from_logits:
        raise argument_error(
            "from_logits",
            "False with average='logits' (logits are averaged as they are; "
            "from_logits=True asks for a softmax before averaging, which is "
            "average='probabilities')",
            from_logits,
        )
    return average, from_logits


def combine_outputs(
    outputs,
    average="probabilities",
    from_logits=False,
    weights=None,
    return_spread=False,
):
    """Averages a list of output structures, tensor by tensor.

    With `average="probabilities"` and `from_logits=True`, each output is
    first turned into probabilities with a softmax over its last axis
    (`mean_i softmax(f_i)`, the average the ensemble papers use); otherwise
    the outputs are averaged as they are (`mean_i f_i`: probabilities of
    models that end in a softmax, regression values, or logits with
    `average="logits"`). The mean is `sum_i w_i f_i`, and the spread is
    `sqrt(sum_i w_i (f_i - mean)^2)`, both in float32 and cast back to the
    outputs' dtype.

    Args:
        outputs: list of `m >= 1` structures of tensors, all alike.
        average: str. `"probabilities"` or `"logits"`.
        from_logits: bool. Softmax each output before averaging.
        weights: `None` (equal) or `m` weights summing to 1
            (see `check_weights`).
        return_spread: bool. Also return the spread structure.

    Returns:
        The mean structure, or `(mean, spread)` with `return_spread=True`.
    """
    flat = [keras.tree.flatten(output) for output in outputs]
    count = len(flat)
    if weights is None:
        weights = (1.0 / count,) * count
    means, spreads = [], []
    for group in zip(*flat):
        dtype = group[0].dtype
        values = [ops.cast(t, "float32") for t in group]
        if average == "probabilities" and from_logits:
            values = [ops.softmax(t, axis=-1) for t in values]
        mean = values[0] * weights[0]
        for w, t in zip(weights[1:], values[1:]):
            mean = mean + t * w
        means.append(ops.cast(mean, dtype))
        if return_spread:
            variance = ops.square(values[0] - mean) * weights[0]
            for w, t in zip(weights[1:], values[1:]):
                variance = variance + ops.square(t - mean) * w
            spreads.append(ops.cast(ops.sqrt(variance), dtype))
    mean = keras.tree.pack_sequence_as(outputs[0], means)
    if not return_spread:
        return mean
    return mean, keras.tree.pack_sequence_as(outputs[0], spreads)


@keras.saving.register_keras_serializable(package="keras_regkit")
class OutputAverage(keras.layers.Layer):
    """Averages a list of same-shaped outputs (see `combine_outputs`).

    The merge layer of `keras_regkit.ensembles.ensemble_model`: called on the
    list `[f_1, ..., f_m]` of the members' outputs (tensors), it returns
    their weighted mean, or `[mean, spread]` with `return_spread=True`.

    Args:
        average: str. `"probabilities"` or `"logits"`. Defaults to
            `"probabilities"`.
        from_logits: bool. Softmax each input before averaging. Defaults to
            `False`.
        weights: list of floats or `None`. One weight per input, normalized
            to sum to 1. Defaults to `None` (equal weights).
        return_spread: bool. Also return the spread. Defaults to `False`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`).
    """

    def __init__(
        self,
        average="probabilities",
        from_logits=False,
        weights=None,
        return_spread=False,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.average, self.from_logits = check_average(average, from_logits)
        self.averaging_weights = (
            None if weights is None else [float(w) for w in weights]
        )
        self.return_spread = check_bool("return_spread", return_spread)

    def call(self, inputs):
        inputs = list(inputs)
        weights = check_weights(self.averaging_weights, len(inputs))
        return combine_outputs(
            inputs,
            self.average,
            self.from_logits,
            weights,
            self.return_spread,
        )

    def compute_output_spec(self, inputs):
        def spec():
            return keras.KerasTensor(inputs[0].shape, dtype=inputs[0].dtype)

        # Two distinct tensors: a functional model tells its outputs apart
        # by identity.
        return [spec(), spec()] if self.return_spread else spec()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "average": self.average,
                "from_logits": self.from_logits,
                "weights": self.averaging_weights,
                "return_spread": self.return_spread,
            }
        )
        return config
