"""Stochastic depth: residual blocks skipped at random (Huang et al., 2016)."""

import keras
from keras import ops

from keras_regkit._batch_norm import batch_norm_layers
from keras_regkit._distribute import replica_position
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_int
from keras_regkit._validation import check_seed

__all__ = ["StochasticDepth", "linear_survival_probabilities"]


def _check_probability(name, value):
    return check_float_in_range(name, value, 0, 1, False, True)


def linear_survival_probabilities(num_blocks, final_survival_probability=0.5):
    """The paper's linear decay rule for the survival probability of blocks.

    `p_l = 1 - (l / L) * (1 - p_L)` for blocks `l = 1, ..., L`: the first
    block almost always survives and the last survives with probability
    `p_L`. The paper uses `p_L = 0.5`.

    Args:
        num_blocks: int >= 1. The number of residual blocks `L`.
        final_survival_probability: float in (0, 1]. `p_L`. Defaults to
            `0.5`.

    Returns:
        A list of `num_blocks` floats, `[p_1, ..., p_L]`.

    Example:

    >>> linear_survival_probabilities(4)
    [0.875, 0.75, 0.625, 0.5]

    Reference:

    - [Huang et al., 2016](https://arxiv.org/abs/1603.09382), Eq. 4.
    """
    num_blocks = check_int("num_blocks", num_blocks, minimum=1)
    p_last = _check_probability(
        "final_survival_probability", final_survival_probability
    )
    return [
        1.0 - (block / num_blocks) * (1.0 - p_last)
        for block in range(1, num_blocks + 1)
    ]


@keras.saving.register_keras_serializable(package="keras_regkit")
class StochasticDepth(keras.layers.Layer):
    """Residual block that is skipped, not computed, when its gate is closed.

    Wraps the residual branch `f` of a block whose output shape equals its
    input shape. In training the layer computes `x + b * f(x)` with one gate
    `b ~ Bernoulli(survival_probability)` per batch, as the paper's code
    does, and when `b = 0` the branch is not computed at all (a conditional,
    `keras.ops.cond`), so a step costs less, forward and backward, and the
    branch's weights get a zero gradient. In inference the layer computes
    the paper's `x + survival_probability * f(x)`, the expected value of the
    training output.

    Two cases compute the branch and multiply it by the gate instead (same
    output, no saving): on JAX a branch with state updated in training
    (batch normalization, a seed), whose updates JAX's `cond` cannot carry
    out (its batch-norm statistics then also move on skipped steps); and
    under a `tf.distribute` strategy a branch with `synchronized=True`
    batch normalization, which cannot synchronize inside a conditional. The
    gate is drawn once per global batch, as on one device.

    Put the blocks in a `keras.Sequential`, a `StochasticDepth` each. For a
    per-example gate with inverted scaling (modern architectures), use
    `keras_regkit.layers.DropPath` on the branch instead.

    Args:
        block: A layer, or a list of layers applied in order, computing the
            residual branch `f`. Its output shape must equal its input shape.
        survival_probability: float in (0, 1]. Probability `p` that the
            branch is computed in a training step. `1` never skips. See
            `linear_survival_probabilities` for the paper's rule across a
            network. Defaults to `0.8`.
        seed: int or `None`. Seed of the gate's `SeedGenerator`. Defaults to
            `None`.
        **kwargs: Base layer arguments (`name`, `dtype`...).

    Call arguments:
        inputs: The block's input `x`.
        training: bool. Whether to draw the gate.

    Example:

    >>> import keras, numpy as np
    >>> block = keras.layers.Dense(3)
    >>> layer = StochasticDepth(block, survival_probability=0.5, seed=0)
    >>> x = np.ones((2, 3), "float32")
    >>> y = layer(x)  # inference: x + 0.5 * block(x)
    >>> bool(np.allclose(y, x + 0.5 * block(x)))
    True

    Reference:

    - [Huang et al., 2016](https://arxiv.org/abs/1603.09382)
    """

    def __init__(self, block, survival_probability=0.8, seed=None, **kwargs):
        super().__init__(**kwargs)
        layers = list(block) if isinstance(block, (list, tuple)) else [block]
        if not layers or not all(
            isinstance(layer, keras.layers.Layer) for layer in layers
        ):
            raise argument_error(
                "block", "a keras Layer or a non-empty list of Layers", block
            )
        self.block = layers
        self.survival_probability = _check_probability(
            "survival_probability", survival_probability
        )
        self.seed = check_seed("seed", seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, input_shape):
        # A symbolic call builds each layer and gives its output shape, as
        # `keras.Sequential` does, so layers without `compute_output_shape`
        # work too.
        outputs = keras.KerasTensor(tuple(input_shape), self.compute_dtype)
        for layer in self.block:
            outputs = layer(outputs)
        shape = tuple(outputs.shape)
        if shape[1:] != tuple(input_shape)[1:]:
            raise ValueError(
                "Invalid value received for argument `block`. Expected a "
                "residual branch whose output shape equals its input shape. "
                f"Received: block={self._block_names()} with input shape "
                f"{tuple(input_shape)} and output shape {shape}"
            )

    def _block_names(self):
        return [layer.name for layer in self.block]

    def _branch(self, inputs, training):
        outputs = inputs
        for layer in self.block:
            outputs = layer(outputs, training=training)
        return outputs

    def _synchronizes(self):
        """Whether a layer of the branch sums over replicas in training."""
        return any(
            layer.synchronized
            for block in self.block
            for layer in batch_norm_layers(block)
        )

    def call(self, inputs, training=None):
        if not training:
            return inputs + self.survival_probability * self._branch(
                inputs, training
            )
        if self.survival_probability == 1.0:
            return inputs + self._branch(inputs, training)
        gate = (
            keras.random.uniform((), seed=self.seed_generator)
            < self.survival_probability
        )
        if (
            keras.backend.backend() == "jax"
            and any(layer.non_trainable_variables for layer in self.block)
        ) or (replica_position() is not None and self._synchronizes()):
            # JAX's cond can't carry Keras state updates (batch-norm
            # statistics, seed generators) out of a branch, and TensorFlow
            # can't synchronize replicas inside one: compute the branch and
            # gate it instead.
            branch = self._branch(inputs, training)
            return inputs + ops.cast(gate, branch.dtype) * branch
        return ops.cond(
            gate,
            lambda: inputs + self._branch(inputs, training),
            lambda: inputs,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block": [
                    keras.saving.serialize_keras_object(layer)
                    for layer in self.block
                ],
                "survival_probability": self.survival_probability,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = [
            keras.saving.deserialize_keras_object(layer)
            for layer in config["block"]
        ]
        return cls(**config)
