"""Batch normalization whose population variance is debiased (Algorithm 2)."""

import keras
from keras import ops

from keras_regkit._distribute import cross_replica_sum
from keras_regkit._utils import check_choice

__all__ = ["DebiasedBatchNormalization"]


@keras.saving.register_keras_serializable(package="keras_regkit")
class DebiasedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with an unbiased population variance.

    A drop-in for `keras.layers.BatchNormalization` (same arguments, same
    variables, same `axis` semantics) that fixes its inference statistics.

    **Training** normalizes exactly as Keras does, with the batch mean
    `mu_B` and the batch's biased variance `sigma_B^2` (the mean of squared
    deviations). Keras then averages `sigma_B^2` into `moving_variance`,
    which converges to `(m - 1) / m` of the population variance: half of it
    at batch size 2 for a `Dense` input. This layer averages the unbiased
    estimate instead, as Ioffe & Szegedy's Algorithm 2 prescribes:

    - `moving_mean <- momentum * moving_mean + (1 - momentum) * mu_B`
    - `moving_variance <- momentum * moving_variance
      + (1 - momentum) * m / (m - 1) * sigma_B^2`

    where `m` is the number of values behind each statistic: the batch size
    times every other reduced axis (the spatial positions of a
    convolutional feature map), or the number of unmasked positions when a
    mask is given.

    With `moving_statistics="cumulative"` the moving statistics are instead
    the paper's population averages, equal-weight means over every training
    batch since the layer was built (or since `reset_moving_statistics()`):
    `E[x] = mean_B(mu_B)` and `Var[x] = mean_B(m / (m - 1) * sigma_B^2)`,
    kept as running means with a batch counter `moving_count`. The paper
    computes them once, after training, with the weights frozen; a running
    mean over a whole training run would also average the statistics of
    early weights. So reset first, then run training batches through the
    network in training mode without an optimizer step, e.g.
    `layer.reset_moving_statistics()` then `model(x, training=True)` for
    each batch `x`.

    A batch with `m = 1` (one value per statistic, e.g. batch size 1 on a
    `Dense` input) carries no information about the variance: its training
    output is `beta` (zero deviation) and the layer leaves every moving
    statistic, and the counter, unchanged for that step, instead of
    dividing by zero (Keras would pull its moving variance towards 0).

    **Inference** is Keras's own code path, `gamma * (x - moving_mean) /
    sqrt(moving_variance + epsilon) + beta`, at the same cost. Under mixed
    precision the statistics are computed and stored in float32, as in
    Keras.

    **Distributed training.** With `synchronized=True` under a
    `tf.distribute` strategy, the batch statistics are those of the global
    batch, summed over the replicas (two cross-replica sums per layer and
    step: the mean, then the squared deviations from it), and `m` counts the
    values of every replica, so each replica normalizes and updates its
    moving statistics exactly as one device would with the global batch.
    With `synchronized=False` (default) each replica normalizes with its
    own slice's statistics and `m` is that slice's count, as in Keras. On
    one device both are the same. Keras accepts `synchronized=True` on the
    TensorFlow backend only; on JAX, `keras.distribution` computes on the
    global batch, so the statistics are global without it.

    With `renorm=True` (batch renormalization), the renorm statistics that
    set the corrections `r` and `d` are debiased in the same way, so that
    training matches the debiased inference normalization. Keras tracks a
    moving standard deviation in that mode: the moving variance is then
    `(EMA of sqrt(m / (m - 1) * sigma_B^2 + epsilon))^2 - epsilon`, which is
    unbiased up to the (small) gap between the mean of square roots and
    the square root of the mean.

    Args:
        moving_statistics: `"ema"` (exponential moving averages with
            `momentum`, as Keras) or `"cumulative"` (equal-weight running
            means, the paper's population averages). Defaults to `"ema"`.
        *args, **kwargs: Every argument of `keras.layers.BatchNormalization`
            (`axis`, `momentum`, `epsilon`, `center`, `scale`, initializers,
            regularizers, constraints, `renorm`, `renorm_clipping`,
            `renorm_momentum`, `synchronized`), plus base layer keyword
            arguments.

    Call arguments:
        inputs: Input tensor of any rank.
        training: bool. Whether to normalize with the batch statistics and
            update the moving ones.
        mask: Optional boolean tensor with one dimension less than `inputs`;
            masked positions are left out of the statistics and of `m`.

    Raises:
        ValueError: for an unknown `moving_statistics`.

    Example:

    >>> import numpy as np
    >>> import keras_regkit
    >>> layer = keras_regkit.layers.DebiasedBatchNormalization(momentum=0.0)
    >>> x = np.array([[1.0], [3.0]])
    >>> _ = layer(x, training=True)
    >>> float(layer.moving_variance[0])  # unbiased: 2.0, Keras stores 1.0
    2.0

    Reference:

    - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167),
      Algorithm 2.
    """

    def __init__(self, *args, moving_statistics="ema", **kwargs):
        super().__init__(*args, **kwargs)
        self.moving_statistics = check_choice(
            "moving_statistics", moving_statistics, ("ema", "cumulative")
        )
        self.moving_count = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.moving_statistics == "cumulative":
            self.moving_count = self.add_weight(
                shape=(),
                name="moving_count",
                initializer="zeros",
                dtype="float32",
                trainable=False,
                autocast=False,
            )

    def reset_moving_statistics(self):
        """Resets the moving statistics (and the batch counter) to their
        initial values, e.g. before accumulating population statistics."""
        shape = self.moving_mean.shape
        self.moving_mean.assign(
            self.moving_mean_initializer(shape, dtype="float32")
        )
        self.moving_variance.assign(
            self.moving_variance_initializer(shape, dtype="float32")
        )
        if self.renorm:
            self.moving_stddev.assign(ops.sqrt(self.moving_variance))
        if self.moving_count is not None:
            self.moving_count.assign(0.0)

    def _count(self, inputs, mask):
        """`m`: the number of values each statistic is computed from."""
        if mask is not None:
            return ops.sum(ops.cast(mask, "float32"))
        shape = ops.shape(inputs)
        count = 1
        for axis in self._reduction_axes:
            count = count * shape[axis]
        return ops.cast(count, "float32")

    def _synchronized_moments(self, inputs, mask):
        """Mean, biased variance and `m` over the replicas' global batch.

        Two passes (the mean, then the squared deviations from it), each
        with one cross-replica sum: the one-pass `E[x^2] - E[x]^2` loses the
        variance to cancellation when the mean is large.
        """
        axes = self._reduction_axes
        if mask is None:
            weights = None
            count = self._count(inputs, None)
        else:
            weights = ops.cast(ops.expand_dims(mask, -1), inputs.dtype)
            count = ops.sum(ops.cast(mask, "float32"))

        def weighted_sum(values):
            if weights is not None:
                values = values * weights
            return ops.sum(values, axis=axes, keepdims=True)

        total, count = cross_replica_sum([weighted_sum(inputs), count])
        divisor = ops.cast(ops.maximum(count, 1.0), inputs.dtype)
        mean = total / divisor
        (squares,) = cross_replica_sum([weighted_sum(ops.square(inputs - mean))])
        variance = squares / divisor
        return ops.reshape(mean, (-1,)), ops.reshape(variance, (-1,)), count

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=False, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less "
                "than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None

        if self.synchronized:
            mean, variance, count = self._synchronized_moments(inputs, mask)
        else:
            mean, variance = self._moments(inputs, mask)
            count = self._count(inputs, mask)
        update = ops.greater(count, 1.0)
        unbiased = variance * (count / ops.maximum(count - 1.0, 1.0))

        if self.renorm:
            r, d, mean, variance = self._renorm_correction_and_moments(
                mean, variance
            )
            gamma, beta = self._compose_transforms(
                r, d, gamma, beta, compute_dtype
            )
            self._update_debiased_renorm(mean, unbiased, update)
        else:
            self._update_debiased(mean, unbiased, update)

        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def _averaged(self, variable, value, update, momentum):
        """The new value of a moving statistic (EMA or running mean)."""
        old = ops.cast(variable, "float32")
        if self.moving_statistics == "cumulative":
            new = old + (value - old) / (self.moving_count + 1.0)
        else:
            new = old * momentum + value * (1.0 - momentum)
        return ops.where(update, new, old)

    def _advance_count(self, update):
        if self.moving_count is not None:
            self.moving_count.assign(
                self.moving_count + ops.cast(update, "float32")
            )

    def _update_debiased(self, mean, unbiased, update):
        self.moving_mean.assign(
            self._averaged(self.moving_mean, mean, update, self.momentum)
        )
        self.moving_variance.assign(
            self._averaged(
                self.moving_variance, unbiased, update, self.momentum
            )
        )
        self._advance_count(update)

    def _update_debiased_renorm(self, mean, unbiased, update):
        stddev = ops.sqrt(unbiased + self.epsilon)
        momentum = self.renorm_momentum
        for variable, value in (
            (self.renorm_mean, mean),
            (self.renorm_stddev, stddev),
        ):
            old = ops.cast(variable, "float32")
            variable.assign(
                ops.where(
                    update, old * momentum + value * (1.0 - momentum), old
                )
            )
        self.moving_mean.assign(
            self._averaged(self.moving_mean, mean, update, self.momentum)
        )
        if self.moving_statistics == "cumulative":
            variance = self._averaged(
                self.moving_variance, unbiased, update, self.momentum
            )
            self.moving_variance.assign(variance)
            self.moving_stddev.assign(ops.sqrt(variance + self.epsilon))
        else:
            new_stddev = self._averaged(
                self.moving_stddev, stddev, update, self.momentum
            )
            self.moving_stddev.assign(new_stddev)
            self.moving_variance.assign(
                ops.where(
                    update,
                    ops.relu(new_stddev * new_stddev - self.epsilon),
                    ops.cast(self.moving_variance, "float32"),
                )
            )
        self._advance_count(update)

    def get_config(self):
        config = super().get_config()
        config["moving_statistics"] = self.moving_statistics
        return config
