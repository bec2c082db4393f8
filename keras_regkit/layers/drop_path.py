"""Drop path: the per-example form of stochastic depth."""

import keras
from keras import ops

from keras_regkit._distribute import batch_uniform
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_seed

__all__ = ["DropPath"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class DropPath(keras.layers.Layer):
    """Drops a residual branch per example, with inverted scaling.

    Apply it to the output of a residual branch before the addition,
    `x + DropPath(rate)(f(x))`. In training each example's branch output is
    kept with probability `1 - rate` and scaled by `1 / (1 - rate)`, else
    zeroed: the mask has shape `(batch, 1, ..., 1)`, all or nothing per
    example, so a dropped example skips the whole block (stochastic depth,
    Huang et al., 2016, with one gate per example as in FractalNet and
    modern vision transformers). In inference the layer is the identity.

    Unlike `StochasticDepth`, the branch is still computed for the batch
    (other examples need it); the saving is in regularization, not time.
    This is not DropConnect, which drops individual weights.

    Under a `tf.distribute` strategy each replica keeps its slice of the
    mask drawn for the global batch, so the examples of different replicas
    get independent gates, exactly those one device would draw.

    Args:
        rate: float in [0, 1). Probability of dropping an example's branch.
            Defaults to `0.1`.
        seed: int or `None`. Seed of the layer's `SeedGenerator`. Defaults to
            `None`.
        **kwargs: Base layer arguments (`name`, `dtype`...).

    Call arguments:
        inputs: The branch output, of any rank >= 1.
        training: bool. Whether to drop.

    Example:

    >>> import numpy as np
    >>> layer = DropPath(0.5, seed=3)
    >>> y = np.asarray(layer(np.ones((4, 2), "float32"), training=True))
    >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
    True

    Reference:
    - [Huang et al., 2016](https://arxiv.org/abs/1603.09382)
    - [Larsson et al., 2017](https://arxiv.org/abs/1605.07648)
    """

    def __init__(self, rate=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_float_in_range("rate", rate, 0, 1, True, False)
        self.seed = check_seed("seed", seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.supports_masking = True

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = batch_uniform(shape, self.seed_generator) < keep
        return (
            inputs * ops.cast(mask, inputs.dtype) / ops.cast(keep, inputs.dtype)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config
