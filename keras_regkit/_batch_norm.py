"""Batch-normalization pieces shared by the layer, the recomputation of
population statistics and the weight averaging.

Everything here reads Keras's public surface: a batch-normalization layer's
`axis` and statistics variables, `Model.layers`, and the public attributes of
a layer that hold its sublayers.
"""

import keras
from keras import ops

from keras_regkit._distribute import cross_replica_sum

__all__ = [
    "STATISTICS",
    "batch_norm_layers",
    "channel_moments",
    "reduction_axes",
    "statistics_variables",
    "sublayers",
    "unbiased_variance",
    "walk_layers",
]

# The variables that describe the inputs' distribution, in the order Keras
# creates them (the last three exist with batch renormalization only).
STATISTICS = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)


def reduction_axes(ndim, axis):
    """Every axis of a rank-`ndim` input but the channel `axis`."""
    axis = axis % ndim
    return [i for i in range(ndim) if i != axis]


def _channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return shape


def channel_moments(inputs, axis, mask=None, synchronized=False):
    """Per-channel mean, biased variance and count `m` of `inputs`.

    The mask (one dimension less than `inputs`, as Keras's
    `BatchNormalization` takes it) is broadcast along the last axis of
    `inputs`, so each channel counts exactly the values it sees: a `(B, H,
    1)` mask on `(B, H, W, C)` inputs gives `W` values per unmasked `(b, h)`,
    and a `(B, C)` mask on channels-first `(B, C, T)` inputs gives each
    channel its own count. Masked values are left out (`inf` or NaN padding
    included).

    Two passes, the mean and then the squared deviations from it, so the
    variance loses nothing to cancellation when the mean is large. With
    `synchronized=True`, inside a multi-replica `tf.distribute` step, the
    sums and counts run over every replica (two cross-replica sums).

    Args:
        inputs: Float tensor.
        axis: int. The channel axis.
        mask: Optional boolean tensor of rank `inputs.ndim - 1`.
        synchronized: bool. Whether to sum over the replicas.

    Returns:
        `(mean, variance, count)`, each of shape `(channels,)` and of the
        dtype of `inputs`.
    """
    ndim = len(inputs.shape)
    axes = reduction_axes(ndim, axis)
    channels = inputs.shape[axis]
    if mask is None:
        keep = None
        shape = ops.shape(inputs)
        count = 1
        for i in axes:
            count = count * shape[i]
        count = ops.ones((channels,), inputs.dtype) * ops.cast(
            count, inputs.dtype
        )
    else:
        keep = ops.broadcast_to(
            ops.expand_dims(ops.cast(mask, "bool"), -1), ops.shape(inputs)
        )
        count = ops.sum(ops.cast(keep, inputs.dtype), axis=axes)

    def total(values):
        if keep is not None:
            values = ops.where(keep, values, ops.zeros_like(values))
        return ops.sum(values, axis=axes)

    sums = total(inputs)
    if synchronized:
        sums, count = cross_replica_sum([sums, count])
    mean = sums / ops.maximum(count, 1.0)
    centred = inputs - ops.reshape(mean, _channel_shape(ndim, axis))
    squares = total(ops.square(centred))
    if synchronized:
        (squares,) = cross_replica_sum([squares])
    return mean, squares / ops.maximum(count, 1.0), count


def unbiased_variance(variance, count):
    """`m / (m - 1)` times the biased `variance`; 0 where `m <= 1`."""
    factor = count / ops.maximum(count - 1.0, 1.0)
    return ops.where(count > 1.0, variance * factor, ops.zeros_like(variance))


def sublayers(layer):
    """The layers directly inside `layer`, found through public API.

    A model's `layers`; for any other layer, the layers held by its public
    attributes (directly, or in lists, tuples and dicts), as wrappers such
    as `TimeDistributed.layer` or `StochasticDepth.block` hold them. A
    custom layer that keeps a sublayer only in a private (`_`-prefixed)
    attribute hides it from this search.
    """
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    found = []
    pending = [
        value for name, value in vars(layer).items() if not name.startswith("_")
    ]
    while pending:
        value = pending.pop(0)
        if isinstance(value, keras.layers.Layer):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    return found


def walk_layers(root):
    """`root` and every layer inside it (see `sublayers`), each once."""
    seen = set()
    stack = [root]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(reversed(sublayers(layer)))


def batch_norm_layers(model):
    """Every `keras.layers.BatchNormalization` in `model`, nested included.

    Subclasses count (`keras_regkit.layers.DebiasedBatchNormalization`
    among them), and so do layers inside nested models and inside layers
    that hold them in public attributes (see `sublayers`). Each layer
    appears once, depth first in the order of `model.layers`.

    Args:
        model: A `keras.Model` or `keras.layers.Layer`.

    Returns:
        A list of layers.
    """
    return [
        layer
        for layer in walk_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def statistics_variables(layer):
    """The population-statistics variables of a batch-normalization layer.

    `moving_mean` and `moving_variance`, and with batch renormalization
    `moving_stddev`, `renorm_mean` and `renorm_stddev`: the variables that
    describe the inputs' distribution (not counters such as
    `DebiasedBatchNormalization`'s `moving_count`).
    """
    return [
        variable
        for variable in (getattr(layer, name, None) for name in STATISTICS)
        if isinstance(variable, keras.Variable)
    ]
