"""Recomputing batch-normalization population statistics ("precise BN")."""

import numbers
import warnings

import keras
import numpy as np
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit.callbacks._learning_rate import sync_model_state

__all__ = [
    "BatchNormStatistics",
    "batch_norm_layers",
    "recompute_batchnorm_statistics",
    "statistics_variables",
]

_DEFAULT_BATCH_SIZE = 32


def batch_norm_layers(model):
    """Every `keras.layers.BatchNormalization` in `model`, nested included.

    Subclasses count (`keras_regkit.layers.DebiasedBatchNormalization`
    among them), and so do layers inside nested models and inside custom
    layers. Each layer appears once, in the order Keras tracks them.

    Args:
        model: A `keras.Model` or `keras.layers.Layer`.

    Returns:
        A list of layers.
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


_STATISTICS = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)


def statistics_variables(layer):
    """The population-statistics variables of a batch-normalization layer.

    `moving_mean` and `moving_variance`, and with batch renormalization
    `moving_stddev`, `renorm_mean` and `renorm_stddev`: the variables that
    describe the inputs' distribution (not counters such as
    `DebiasedBatchNormalization`'s `moving_count`).
    """
    return [
        variable
        for variable in (getattr(layer, name, None) for name in _STATISTICS)
        if isinstance(variable, keras.Variable)
    ]


def _recomputable(model):
    return [layer for layer in batch_norm_layers(model) if layer.trainable]


def _check_optional_count(name, value):
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 1
    ):
        raise argument_error(name, "None or an int >= 1", value)
    return int(value)


def _is_array(value):
    return isinstance(value, np.ndarray) or ops.is_tensor(value)


def _is_array_structure(value):
    if _is_array(value):
        return True
    if isinstance(value, dict) and value:
        return all(_is_array(v) for v in value.values())
    return False


def _as_backend_input(x):
    if keras.backend.backend() == "tensorflow":
        return x
    return keras.tree.map_structure(np.asarray, x)


def _collect_batches(data, steps, batch_size):
    """Returns the inputs `x` of at most `steps` batches of `data`, as a list.

    Arrays (or a dict of arrays, or an `(x, y[, sample_weight])` tuple of
    them) are cut into batches of `batch_size`; anything else is iterated,
    each element being a batch `x` or `(x, y[, sample_weight])` as
    `model.fit` takes them. The batches are kept so that several passes see
    the same values (a generator can be read once only).
    """
    source = data
    if isinstance(data, tuple) and data and _is_array_structure(data[0]):
        source = data[0]
    batches = []
    if _is_array_structure(source):
        leaves = keras.tree.flatten(source)
        size = int(leaves[0].shape[0])
        batch_size = batch_size or _DEFAULT_BATCH_SIZE
        for begin in range(0, size, batch_size):
            if steps is not None and len(batches) >= steps:
                break
            batches.append(
                keras.tree.map_structure(
                    lambda a, b=begin: a[b : b + batch_size], source
                )
            )
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise argument_error(
                "data",
                "an iterable of batches (a `tf.data.Dataset`, a "
                "`keras.utils.PyDataset`, a generator, a list) or arrays",
                data,
            ) from None
        for batch in iterator:
            if steps is not None and len(batches) >= steps:
                break
            x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
            batches.append(_as_backend_input(x))
    if not batches:
        raise argument_error(
            "data",
            "data yielding at least one batch of inputs (it yielded none)",
            data,
        )
    return batches


class _Moments:
    """Exact per-channel count, mean and sum of squared deviations.

    Each batch contributes its own count, mean and centred sum of squares
    (computed on the backend in float32, centred on the batch mean so no
    precision is lost to cancellation); batches are merged in float64 with
    the pairwise update of Chan, Golub and LeVeque (1979).
    """

    def __init__(self):
        self.count = None
        self.mean = None
        self.m2 = None

    def add(self, count, mean, m2):
        count = np.asarray(count, dtype=np.float64)
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(m2, dtype=np.float64)
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        safe_total = np.where(total > 0, total, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * count / safe_total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / safe_total
        self.count = total

    def unbiased_variance(self):
        return self.m2 / np.maximum(self.count - 1.0, 1.0)


def _batch_moments(layer, inputs, mask):
    """Count, mean and centred sum of squares of one call's inputs."""
    inputs = ops.cast(inputs, "float32")
    rank = len(inputs.shape)
    axis = layer.axis % rank
    axes = [i for i in range(rank) if i != axis]
    if mask is None:
        count = np.full(
            (inputs.shape[axis],),
            float(np.prod([ops.shape(inputs)[i] for i in axes])),
        )
        mean = ops.mean(inputs, axis=axes)
        centred = inputs - ops.reshape(mean, _channel_shape(rank, axis, -1))
        m2 = ops.sum(ops.square(centred), axis=axes)
    else:
        # Weighted as `BatchNormalization._moments` weighs a mask: it is
        # broadcast along the last axis.
        weights = ops.cast(
            ops.broadcast_to(ops.expand_dims(mask, -1), ops.shape(inputs)),
            "float32",
        )
        count = ops.sum(weights, axis=axes)
        mean = ops.sum(weights * inputs, axis=axes) / ops.maximum(count, 1.0)
        centred = inputs - ops.reshape(mean, _channel_shape(rank, axis, -1))
        m2 = ops.sum(weights * ops.square(centred), axis=axes)
        count = ops.convert_to_numpy(count)
    return count, ops.convert_to_numpy(mean), ops.convert_to_numpy(m2)


def _channel_shape(rank, axis, size):
    shape = [1] * rank
    shape[axis] = size
    return shape


def _assign_statistics(layer, mean, variance, batches):
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):
        # Batch renormalization derives `moving_variance` from
        # `moving_stddev`, and corrects training batches towards
        # `renorm_mean` / `renorm_stddev`: all describe the same population.
        stddev = np.sqrt(variance + layer.epsilon)
        layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
        layer.renorm_mean.assign(mean.astype(layer.renorm_mean.dtype))
        layer.renorm_stddev.assign(stddev.astype(layer.renorm_stddev.dtype))
    count = getattr(layer, "moving_count", None)
    if isinstance(count, keras.Variable):
        # `DebiasedBatchNormalization(moving_statistics="cumulative")` keeps
        # its statistics as running means over `moving_count` batches.
        count.assign(float(batches))


def recompute_batchnorm_statistics(
    model, data, steps=None, batch_size=None, verbose=0
):
    """Sets every batch-norm layer's statistics to exact population values.

    Precise BN (Wu & Johnson, 2021): the moving averages a
    `keras.layers.BatchNormalization` layer keeps during training describe
    weights that no longer exist (they trail the weights by about
    `1 / (1 - momentum)` steps) and, in Keras, underestimate the variance by
    the factor `(m - 1) / m` of a batch of `m` values. Weight averaging
    (`PolyakAveraging`, SWA) makes it worse: averaged weights do not match
    averaged statistics. This function freezes the weights, resets the
    statistics and recomputes, for each batch-normalization layer, the mean
    and the unbiased variance of all the values its statistics see over the
    given batches:

    ```
    moving_mean     = sum(x) / M
    moving_variance = sum((x - moving_mean) ** 2) / (M - 1)
    ```

    per channel (the layer's `axis`), where the sums run over the batch and
    every other axis of every batch, and `M` is the number of values (the
    mask-weighted count when the layer receives a mask, as
    `BatchNormalization` weighs it). With `M = 1` the variance is 0 (there
    is no spread to estimate) rather than a division by zero.

    The model runs in inference mode throughout (dropout off, nothing
    trains). The layers are processed one at a time, in the order the
    forward pass calls them: when a layer's statistics are gathered, every
    batch-norm layer before it already holds its recomputed statistics and
    normalizes with them, as it will at inference. Each layer's statistics
    are therefore exactly the mean and variance of the inputs it sees when
    the model predicts, which one pass with all layers in training mode
    (PyTorch's `update_bn`, the SWA reference code) only approximates: there,
    upstream layers normalize with each batch's own statistics. The cost is
    one forward pass over the batches per batch-norm layer.

    Every subclass of `keras.layers.BatchNormalization` is handled
    (`keras_regkit.layers.DebiasedBatchNormalization` included, whose
    moving variance is also the unbiased estimate), in nested models and
    custom layers too. For batch renormalization (`renorm=True`),
    `moving_stddev`, `renorm_mean` and `renorm_stddev` are set to the same
    population values. Layers with `trainable=False` are frozen on purpose
    (Keras runs them in inference mode and never updates their statistics)
    and are left as they are. A layer the forward pass never calls is left
    as it is, with a warning. A model without batch-normalization layers (or
    with frozen ones only) is left as it is, and `data` is not read.

    Args:
        model: A built `keras.Model` (it is built on the first batch
            otherwise).
        data: The batches: a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            generator, a list of batches (each `x` or `(x, y[, sample_weight])`
            as `fit` takes them; only `x` is used), or a NumPy array or tensor
            `x` (or a dict of them, or an `(x, y)` tuple), which is cut into
            batches of `batch_size`. The first `steps` batches are kept in
            memory for the passes.
        steps: int or `None`. Number of batches to use; `None` uses all of
            `data`. Defaults to `None`.
        batch_size: int or `None`. Batch size when `data` is arrays; it
            changes the memory used, not the statistics. Defaults to `32`.
        verbose: int. 1 prints one line per layer. Defaults to `0`.

    Returns:
        A list of the layers whose statistics were recomputed, in the order
        they were processed.

    Raises:
        ValueError: if `data` yields no batch, or `steps` or `batch_size` is
            not a positive int.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks import recompute_batchnorm_statistics
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.BatchNormalization()]
    ... )
    >>> x = np.arange(12, dtype="float32").reshape(4, 3)
    >>> _ = recompute_batchnorm_statistics(model, x, batch_size=3)
    >>> keras.ops.convert_to_numpy(model.layers[0].moving_mean)
    array([4.5, 5.5, 6.5], dtype=float32)
    >>> keras.ops.convert_to_numpy(model.layers[0].moving_variance)
    array([15., 15., 15.], dtype=float32)

    Reference:
    - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576)
    - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167)
    """
    steps = _check_optional_count("steps", steps)
    batch_size = _check_optional_count("batch_size", batch_size)
    if model.built and not _recomputable(model):
        return []
    batches = _collect_batches(data, steps, batch_size)
    if not model.built:
        model(batches[0], training=False)
    pending = _recomputable(model)
    if not pending:
        return []

    state = {"target": None, "moments": None, "pending": pending}
    originals = {}

    def make_hook(layer, original):
        def call(inputs, *args, **kwargs):
            if state["target"] is None and any(
                layer is p for p in state["pending"]
            ):
                state["target"] = layer
            if state["target"] is layer:
                state["moments"].add(
                    *_batch_moments(layer, inputs, kwargs.get("mask"))
                )
                state["calls"] += 1
            kwargs["training"] = False
            return original(inputs, *args, **kwargs)

        return call

    done = []
    try:
        for layer in pending:
            originals[id(layer)] = (layer, layer.__dict__.get("call"))
            layer.call = make_hook(layer, layer.call)
        while state["pending"]:
            state["target"] = None
            state["moments"] = _Moments()
            state["calls"] = 0
            for x in batches:
                model(x, training=False)
            layer = state["target"]
            if layer is None:
                break
            moments = state["moments"]
            _assign_statistics(
                layer, moments.mean, moments.unbiased_variance(), state["calls"]
            )
            state["pending"] = [p for p in state["pending"] if p is not layer]
            done.append(layer)
            if verbose:
                print(
                    f"recompute_batchnorm_statistics: {layer.name}: "
                    f"{int(np.max(moments.count))} values per channel."
                )
    finally:
        for layer, own_call in originals.values():
            if own_call is None:
                del layer.call
            else:
                layer.call = own_call
    if state["pending"]:
        names = ", ".join(layer.name for layer in state["pending"])
        warnings.warn(
            "recompute_batchnorm_statistics: the forward pass never called "
            f"these batch-normalization layers, left unchanged: {names}.",
            stacklevel=2,
        )
    return done


@keras.saving.register_keras_serializable(package="keras_regkit")
class BatchNormStatistics(keras.callbacks.Callback):
    """Recomputes batch-norm population statistics at the end of training.

    At the end of `fit`, calls `recompute_batchnorm_statistics(model, data,
    steps, batch_size)`: the moving mean and variance of every
    batch-normalization layer become the exact mean and unbiased variance of
    the inputs the layer sees at inference over `data`, for the final
    weights. Training itself is unchanged (the layers keep their moving
    averages during `fit`); inference afterwards uses the recomputed values,
    and so do `model.save` and `model.export`. See
    `recompute_batchnorm_statistics` for the exact procedure.

    Place it after callbacks that change the weights at the end of training.
    With `PolyakAveraging`, use its own `batch_norm="recompute"` instead,
    which also recomputes for the averaged weights it validates during
    training.

    Args:
        data: The batches to compute the statistics over (typically the
            training data, or part of it), in any form
            `recompute_batchnorm_statistics` takes.
        steps: int or `None`. Number of batches to use; `None` uses all of
            `data`. Defaults to `None`.
        batch_size: int or `None`. Batch size when `data` is arrays.
            Defaults to `32`.
        verbose: int. 1 prints one line per layer. Defaults to `0`.

    Raises:
        ValueError: at construction if `steps` or `batch_size` is not a
            positive int; at the end of training if `data` yields no batch.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks import BatchNormStatistics
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8),
    ...     keras.layers.BatchNormalization(),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(x, x[:, :1], batch_size=16, epochs=2, verbose=0,
    ...               callbacks=[BatchNormStatistics(x, batch_size=16)])
    >>> h = keras.ops.convert_to_numpy(model.layers[0](x))
    >>> bn = model.layers[1]
    >>> bool(np.allclose(bn.moving_mean, h.mean(0), atol=1e-5))
    True
    >>> bool(np.allclose(bn.moving_variance, h.var(0, ddof=1), rtol=1e-4))
    True

    Reference:
    - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576)
    """

    def __init__(self, data, steps=None, batch_size=None, verbose=0):
        super().__init__()
        self.data = data
        self.steps = _check_optional_count("steps", steps)
        self.batch_size = _check_optional_count("batch_size", batch_size)
        self.verbose = verbose

    def on_train_end(self, logs=None):
        sync_model_state(self.model)
        recompute_batchnorm_statistics(
            self.model,
            self.data,
            steps=self.steps,
            batch_size=self.batch_size,
            verbose=self.verbose,
        )

    def get_config(self):
        return {
            "data": self.data,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
