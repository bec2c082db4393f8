"""Test-time averaging over several fractional max poolings (Graham, 2014)."""

import keras
from keras import ops

from keras_regkit._batch_norm import walk_layers
from keras_regkit._validation import argument_error
from keras_regkit.layers.fractional_max_pooling import FractionalMaxPooling2D
from keras_regkit.models.monte_carlo_average import MonteCarloAverage

__all__ = ["FractionalPoolingAverage"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class FractionalPoolingAverage(MonteCarloAverage):
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

    This is the case of `keras_regkit.models.MonteCarloAverage` whose
    passes are this lattice instead of random draws, and whose only
    sampled layers are the poolings (dropout and other layers stay in
    inference mode); it shares that wrapper's averaging, spread, saving and
    export. Outputs are averaged as the model returns them (end it with a
    softmax to average probabilities, as the paper does), or their
    softmaxes with `from_logits=True`. A prediction costs `num_passes`
    predictions.

    Args:
        model: A Functional or Sequential `keras.Model` (nested ones
            included); its batch axis must be the first axis of every input
            and output.
        num_passes: int >= 1. Number of poolings averaged. Defaults to 12.
        average: str. `"probabilities"` or `"logits"`, as for ensembles.
            Defaults to `"probabilities"`.
        from_logits: bool. Softmax each pass's output before averaging.
            Defaults to `False`.
        return_spread: bool. Return `(mean, spread)` in inference, the
            spread `sqrt((1/N) sum_g (f_g - mean)^2)` across the poolings.
            Defaults to `False`.
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

    def __init__(
        self,
        model,
        num_passes=12,
        average="probabilities",
        from_logits=False,
        return_spread=False,
        **kwargs,
    ):
        super().__init__(
            model,
            num_passes,
            seed=0,
            average=average,
            from_logits=from_logits,
            return_spread=return_spread,
            **kwargs,
        )

    # The lattice draws no random numbers: XLA serves what an export does.
    jit_compile = keras.Model.jit_compile

    def _inference_copy(self, model):
        """`model` with its `FractionalMaxPooling2D` layers replaced by
        copies whose `num_passes` is set; every other layer is shared."""
        passes = self.num_passes

        def copy(layer):
            if isinstance(layer, FractionalMaxPooling2D):
                pooling = layer.__class__.from_config(layer.get_config())
                pooling.num_passes = passes
                return pooling
            return layer

        averaging = self._clone(model, copy, "FractionalMaxPooling2D layers")
        if not any(
            isinstance(layer, FractionalMaxPooling2D)
            for layer in walk_layers(model)
        ):
            raise argument_error(
                "model",
                "a model with a FractionalMaxPooling2D layer; it has none, "
                "so every pass would be the same",
                model,
            )
        hidden = [
            layer.name
            for layer in walk_layers(averaging)
            if isinstance(layer, FractionalMaxPooling2D)
            and layer.num_passes == 1
        ]
        if hidden and passes > 1:
            raise argument_error(
                "model",
                "FractionalMaxPooling2D layers in the graph of a Functional "
                "or Sequential model, not inside a custom layer (found: "
                f"{hidden})",
                model,
            )
        return averaging, []

    def _passes(self, inputs):
        """One call on the batch tiled `num_passes` times, split back."""
        passes = self.num_passes

        def tile(x):
            # Not `ops.tile`: on Keras 3.8 it loses the static shape.
            return ops.concatenate([x] * passes, axis=0)

        outputs = self._averaging.model(
            keras.tree.map_structure(tile, inputs), training=False
        )
        blocks = [
            ops.reshape(y, (passes, -1) + tuple(ops.shape(y)[1:]))
            for y in keras.tree.flatten(outputs)
        ]
        return [
            keras.tree.pack_sequence_as(outputs, [y[g] for y in blocks])
            for g in range(passes)
        ]

    def get_config(self):
        config = super().get_config()
        del config["seed"], config["stochastic_layers"]
        return config
