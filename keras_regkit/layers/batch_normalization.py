"""Batch normalization whose population variance is debiased (Algorithm 2)."""

import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._batch_norm import channel_moments
from keras_regkit._batch_norm import reduction_axes
from keras_regkit._batch_norm import unbiased_variance
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_int

__all__ = ["DebiasedBatchNormalization"]

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _check_clipping(renorm_clipping):
    expected = (
        "None or a dict with keys among 'rmax', 'rmin', 'dmax' (numbers, "
        "rmax >= rmin, dmax >= 0)"
    )
    if renorm_clipping is None:
        return None
    if not isinstance(renorm_clipping, dict) or set(renorm_clipping) - set(
        _CLIPPING_KEYS
    ):
        raise argument_error("renorm_clipping", expected, renorm_clipping)
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Real
        ):
            raise argument_error("renorm_clipping", expected, renorm_clipping)
        clipping[key] = float(value)
    rmax, rmin = clipping.get("rmax"), clipping.get("rmin")
    if (rmax is not None and rmin is not None and rmax < rmin) or (
        clipping.get("dmax", 0.0) < 0
    ):
        raise argument_error("renorm_clipping", expected, renorm_clipping)
    return clipping


@keras.saving.register_keras_serializable(package="keras_regkit")
class DebiasedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with an unbiased population variance.

    A drop-in for `keras.layers.BatchNormalization` (same arguments, same
    variables) that fixes its inference statistics. Training normalizes as
    Keras does, with the batch mean `mu_B` and the biased batch variance
    `sigma_B^2`, but the moving variance averages the unbiased estimate, as
    Ioffe & Szegedy's Algorithm 2 prescribes (Keras's converges to
    `(m - 1) / m` of the population variance):

    - `moving_mean <- momentum * moving_mean + (1 - momentum) * mu_B`
    - `moving_variance <- momentum * moving_variance
      + (1 - momentum) * m / (m - 1) * sigma_B^2`

    `m` is the number of values behind each channel's statistics: the batch
    size times every other reduced axis, or, with a mask, the unmasked
    values that channel sees (counted per channel). A channel with `m <= 1`
    keeps its moving statistics for that step. With
    `moving_statistics="cumulative"` the moving statistics are instead the
    paper's population averages, equal-weight running means over the
    training batches since `build` or `reset_moving_statistics()` (a batch
    in which some channel has `m <= 1` is skipped), counted by the
    `moving_count` variable. Inference is Keras's:
    `gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta`.

    With `synchronized=True` (TensorFlow) the batch statistics and `m` are
    those of the global batch, summed over the replicas. With `renorm=True`
    (batch renormalization, on every supported Keras version) the renorm
    statistics that set the corrections `r` and `d` are debiased likewise,
    and `moving_variance = EMA(sqrt(m / (m - 1) * sigma_B^2 + epsilon))^2 -
    epsilon`.

    Args:
        axis: int. The channel axis. Defaults to `-1`.
        momentum: float in [0, 1]. Momentum of the moving averages.
            Defaults to `0.99`.
        epsilon: float > 0. Added to the variance. Defaults to `1e-3`.
        center: bool. Whether to add `beta`. Defaults to `True`.
        scale: bool. Whether to multiply by `gamma`. Defaults to `True`.
        moving_statistics: `"ema"` (exponential moving averages, as Keras)
            or `"cumulative"` (the paper's running means). Defaults to
            `"ema"`.
        renorm: bool. Batch renormalization. Defaults to `False`.
        renorm_clipping: `None` or a dict with optional keys `"rmax"`,
            `"rmin"`, `"dmax"` clipping `r` and `d`. Defaults to `None`.
        renorm_momentum: float in [0, 1]. Momentum of the renorm
            statistics. Defaults to `0.99`.
        synchronized: bool. Global-batch statistics under a
            `tf.distribute` strategy. Defaults to `False`.
        **kwargs: The initializers, regularizers and constraints of
            `keras.layers.BatchNormalization`, and base layer arguments.

    Call arguments:
        inputs: Input tensor of any rank.
        training: bool. Whether to normalize with the batch statistics and
            update the moving ones.
        mask: Optional boolean tensor with one dimension less than `inputs`;
            masked values are left out of the statistics and of `m`.

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
    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (renormalization).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        *,
        moving_statistics="ema",
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        **kwargs,
    ):
        axis = check_int("axis", axis)
        momentum = check_float_in_range("momentum", momentum, 0, 1, True, True)
        epsilon = check_float_in_range(
            "epsilon", epsilon, 0, float("inf"), False, False
        )
        moving_statistics = check_choice(
            "moving_statistics", moving_statistics, ("ema", "cumulative")
        )
        renorm = check_bool("renorm", renorm)
        clipping = _check_clipping(renorm_clipping)
        renorm_momentum = check_float_in_range(
            "renorm_momentum", renorm_momentum, 0, 1, True, True
        )
        # The renorm arguments are handled here, not by the base class, so
        # that they work the same on Keras releases without them (< 3.14).
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=check_bool("center", center),
            scale=check_bool("scale", scale),
            synchronized=check_bool("synchronized", synchronized),
            **kwargs,
        )
        self.moving_statistics = moving_statistics
        self.renorm = renorm
        self.renorm_clipping = (clipping or {}) if renorm else clipping
        self.renorm_momentum = renorm_momentum
        self.moving_count = None

    def build(self, input_shape):
        super().build(input_shape)
        shape = (input_shape[self.axis],)
        if self.renorm and not isinstance(
            getattr(self, "moving_stddev", None), keras.Variable
        ):
            # Keras < 3.14 has no renormalization: the same variables, in
            # the same order, as Keras >= 3.14 creates.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(
                    self.moving_variance_initializer(shape, dtype=dtype)
                )

            for name, initializer in (
                ("moving_stddev", stddev_initializer),
                ("renorm_mean", self.moving_mean_initializer),
                ("renorm_stddev", stddev_initializer),
            ):
                variable = self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=initializer,
                    trainable=False,
                    autocast=False,
                )
                setattr(self, name, variable)
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
        if mask is None and not self.synchronized:
            # Keras's own moments, so that training outputs match it.
            axes = reduction_axes(len(inputs.shape), self.axis)
            mean, variance = ops.moments(inputs, axes=axes)
            shape = ops.shape(inputs)
            count = 1
            for axis in axes:
                count = count * shape[axis]
            count = ops.cast(count, compute_dtype)
        else:
            mean, variance, count = channel_moments(
                inputs, self.axis, mask, self.synchronized
            )
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None
        unbiased = unbiased_variance(variance, count)
        update = ops.greater(count, 1.0)
        if self.moving_statistics == "cumulative":
            update = ops.all(update)
        if self.renorm:
            gamma, beta = self._renormalized_transform(
                mean, variance, gamma, beta, compute_dtype
            )
            self._update_renorm_statistics(mean, unbiased, update)
        else:
            self._update_statistics(mean, unbiased, update)
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

    def _renormalized_transform(self, mean, variance, gamma, beta, dtype):
        """Folds the corrections `r`, `d` (no gradient) into gamma, beta."""
        renorm_stddev = ops.maximum(
            ops.cast(self.renorm_stddev, dtype), self.epsilon**0.5
        )
        r = ops.sqrt(variance + self.epsilon) / renorm_stddev
        d = (mean - ops.cast(self.renorm_mean, dtype)) / renorm_stddev
        clipping = self.renorm_clipping
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        r = ops.stop_gradient(r)
        d = ops.stop_gradient(d)
        scale = r if gamma is None else r * gamma
        offset = d if gamma is None else d * gamma
        if beta is not None:
            offset = offset + beta
        return scale, offset

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

    def _update_statistics(self, mean, unbiased, update):
        self.moving_mean.assign(
            self._averaged(self.moving_mean, mean, update, self.momentum)
        )
        self.moving_variance.assign(
            self._averaged(
                self.moving_variance, unbiased, update, self.momentum
            )
        )
        self._advance_count(update)

    def _update_renorm_statistics(self, mean, unbiased, update):
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
        config.update(
            {
                "moving_statistics": self.moving_statistics,
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
            }
        )
        return config
