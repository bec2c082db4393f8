"""Test-time averaging over several fractional max poolings (Graham, 2014)."""

import keras
from keras import ops

from keras_regkit._batch_norm import walk_layers
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_int
from keras_regkit.layers.fractional_max_pooling import FractionalMaxPooling2D

__all__ = ["FractionalPoolingAverage"]


class _Unsaved:
    """Holds the averaging copy of the model out of Keras's tracking: its
    weights are the wrapped model's, which are saved with it."""

    def __init__(self, model):
        self.model = model


def _averaging_copy(model, num_passes):
    """`model` with its `FractionalMaxPooling2D` layers replaced by copies
    whose `num_passes` is set; every other layer is shared."""

    def copy(layer):
        if isinstance(layer, FractionalMaxPooling2D):
            pooling = layer.__class__.from_config(layer.get_config())
            pooling.num_passes = num_passes
            return pooling
        return layer

    try:
        averaging = keras.models.clone_model(
            model, clone_function=copy, recursive=True
        )
    except ValueError:
        raise argument_error(
            "model",
            "a Functional or Sequential keras.Model (nested ones included), "
            "whose FractionalMaxPooling2D layers the wrapper can replace",
            model,
        ) from None
    hidden = [
        layer.name
        for layer in walk_layers(averaging)
        if isinstance(layer, FractionalMaxPooling2D) and layer.num_passes == 1
    ]
    if hidden and num_passes > 1:
        raise argument_error(
            "model",
            "FractionalMaxPooling2D layers in the graph of a Functional or "
            f"Sequential model, not inside a custom layer (found: {hidden})",
            model,
        )
    return averaging


@keras.saving.register_keras_serializable(package="keras_regkit")
class FractionalPoolingAverage(keras.Model):
    """Test-time averaging over several fractional poolings, in one graph.

    The paper's test-time "model averaging": run the network with several
    pooling regions and average the outputs (Graham's MNIST error went from
    0.44% with one pass to 0.34% averaging 12). In inference this wrapper
    tiles the batch `N = num_passes` times, runs a copy of `model` whose
    `FractionalMaxPooling2D` layers have `num_passes = N` (every other
    layer, and every weight, is shared), and averages the `N` blocks of
    each output. Block `g` is pooled with the pseudo-random sequences at
    offsets `v_rows = floor(g * rows / N)` and `v_cols = floor(((a * g) mod
    N) * cols / N)`, `a` coprime with `N` and close to `N / phi`: a rank-1
    lattice that spreads the passes evenly over the offsets, so predictions
    are reproducible and an exported model serves what `predict` returns.
    Pass 0 is the layer's deterministic pass: `num_passes=1` equals
    `model.predict`. In training (`fit`) the wrapper calls `model` once.

    Outputs are averaged as the model returns them: end it with a softmax
    to average probabilities, as the paper does. A prediction costs
    `num_passes` predictions.

    Args:
        model: A Functional or Sequential `keras.Model` (nested ones
            included); its batch axis must be the first axis of every input
            and output.
        num_passes: int >= 1. Number of poolings averaged. Defaults to 12.
        **kwargs: Base model keyword arguments (`name`, ...).

    Call arguments:
        inputs: The model's inputs (any structure).
        training: bool. `True` calls `model` once, in training mode.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_regkit
    >>> net = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras_regkit.layers.FractionalMaxPooling2D(seed=1),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> averaged = keras_regkit.layers.FractionalPoolingAverage(net, 12)
    >>> x = np.random.default_rng(0).normal(size=(4, 8, 8, 1))
    >>> probabilities = averaged.predict(x, verbose=0)
    >>> probabilities.shape
    (4, 3)
    >>> bool(np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5))
    True

    Reference:

    - [Graham, 2014](https://arxiv.org/abs/1412.6071), section 4.
    """

    def __init__(self, model, num_passes=12, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise argument_error("model", "a keras.Model", model)
        self.num_passes = check_int("num_passes", num_passes, minimum=1)
        self.model = model
        self._averaging = _Unsaved(_averaging_copy(model, self.num_passes))
        inputs = getattr(model, "inputs", None) if model.built else None
        if inputs and len(inputs) == 1:
            # A symbolic call builds the wrapper and records its input
            # signature, so `export` works before any call on data.
            self(keras.KerasTensor(inputs[0].shape, inputs[0].dtype))

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)

    def call(self, inputs, training=None):
        if training:
            return self.model(inputs, training=True)
        passes = self.num_passes

        def tile(x):
            # Not `ops.tile`: on Keras 3.8 it loses the static shape.
            return ops.concatenate([x] * passes, axis=0)

        outputs = self._averaging.model(
            keras.tree.map_structure(tile, inputs), training=False
        )

        def average(y):
            dtype = y.dtype
            grouped = ops.reshape(y, (passes, -1) + tuple(ops.shape(y)[1:]))
            if keras.backend.standardize_dtype(dtype) in (
                "float16",
                "bfloat16",
            ):
                grouped = ops.cast(grouped, "float32")
            return ops.cast(ops.mean(grouped, axis=0), dtype)

        return keras.tree.map_structure(average, outputs)

    def compute_output_spec(self, inputs, training=None):
        return self.model.compute_output_spec(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "num_passes": self.num_passes,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)
