"""Recomputing batch-normalization population statistics ("precise BN")."""

import itertools
import weakref

import keras
import numpy as np
from keras import ops

from keras_regkit._batch_norm import batch_norm_layers
from keras_regkit._batch_norm import channel_moments
from keras_regkit._batch_norm import statistics_variables
from keras_regkit._training import sync_model_state
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_int
from keras_regkit._validation import check_verbose

__all__ = [
    "BatchNormStatistics",
    "batch_norm_layers",
    "recompute_batchnorm_statistics",
    "statistics_variables",
]

_DEFAULT_BATCH_SIZE = 32
_DATA_EXPECTED = (
    "an iterable of batches (a `tf.data.Dataset`, a `keras.utils.PyDataset`, "
    "a generator, a list) or arrays"
)
_EMPTY_EXPECTED = "data yielding at least one batch of inputs (it yielded none)"


# ------------------------------------------------------------ arguments


def _check_optional_count(name, value):
    return check_int(name, value, minimum=1, allow_none=True)


def _is_array(value):
    return isinstance(value, np.ndarray) or ops.is_tensor(value)


def _is_array_structure(value):
    if _is_array(value):
        return True
    if isinstance(value, dict) and value:
        return all(_is_array(v) for v in value.values())
    return False


def _array_inputs(data):
    """`x` when `data` is arrays (or `(x, y[, w])` of them), else None."""
    if isinstance(data, tuple) and data and _is_array_structure(data[0]):
        return data[0]
    if _is_array_structure(data):
        return data
    return None


def _check_finite(x, data):
    """Raises if a float input of the batch `x` holds inf or NaN."""
    for leaf in keras.tree.flatten(x):
        values = np.asarray(ops.convert_to_numpy(leaf))
        if np.issubdtype(values.dtype, np.floating) and not np.all(
            np.isfinite(values)
        ):
            raise ValueError(
                "Invalid value received for argument `data`. Expected finite "
                "inputs (one inf or NaN would make every statistic NaN). "
                f"Received: data={_summary(data)} with "
                f"{int(np.sum(~np.isfinite(values)))} non-finite values in "
                f"a batch of shape {values.shape}"
            )


def _summary(data):
    """A short description of `data` for error messages."""
    x = _array_inputs(data)
    if x is not None:
        shapes = keras.tree.map_structure(lambda a: tuple(a.shape), x)
        return f"<arrays of shape {shapes}>"
    if isinstance(data, (list, tuple)):
        return f"<{type(data).__name__} of {len(data)} batches>"
    return repr(data)


def _check_data(data):
    """What can be checked without reading a one-shot iterator."""
    if data is None:
        raise argument_error("data", _DATA_EXPECTED, data)
    x = _array_inputs(data)
    if x is not None:
        if int(keras.tree.flatten(x)[0].shape[0]) == 0:
            raise argument_error("data", _EMPTY_EXPECTED, data)
        _check_finite(x, data)
        return
    if isinstance(data, (str, bytes)):
        raise argument_error("data", _DATA_EXPECTED, data)
    try:
        iter(data)
    except TypeError:
        raise argument_error("data", _DATA_EXPECTED, data) from None
    if isinstance(data, (list, tuple)):
        if not data:
            raise argument_error("data", _EMPTY_EXPECTED, data)
        for batch in data:
            _check_finite(keras.utils.unpack_x_y_sample_weight(batch)[0], data)


def _peek(data, batch_size):
    """`(first batch x, data)`, reading one batch; `data` is replaced by an
    equivalent iterator when it is a one-shot iterator (a generator)."""
    x = _array_inputs(data)
    if x is not None:
        size = batch_size or _DEFAULT_BATCH_SIZE
        return keras.tree.map_structure(lambda a: a[:size], x), data
    if isinstance(data, keras.utils.PyDataset):
        if len(data) == 0:
            raise argument_error("data", _EMPTY_EXPECTED, data)
        batch = data[0]
    else:
        iterator = iter(data)
        try:
            batch = next(iterator)
        except StopIteration:
            raise argument_error("data", _EMPTY_EXPECTED, data) from None
        if iterator is data:
            data = itertools.chain([batch], iterator)
    return keras.utils.unpack_x_y_sample_weight(batch)[0], data


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
    source = _array_inputs(data)
    batches = []
    if source is not None:
        size = int(keras.tree.flatten(source)[0].shape[0])
        batch_size = batch_size or _DEFAULT_BATCH_SIZE
        for begin in range(0, size, batch_size):
            if steps is not None and len(batches) >= steps:
                break
            batches.append(
                keras.tree.map_structure(
                    lambda a, b=begin: a[b : b + batch_size], source
                )
            )
        return batches
    for batch in data:
        if steps is not None and len(batches) >= steps:
            break
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        _check_finite(x, data)
        batches.append(_as_backend_input(x))
    if not batches:
        raise argument_error("data", _EMPTY_EXPECTED, data)
    return batches


def _check_matches_model(model, x, data):
    """Raises if the batch `x` cannot feed `model` (rank or a fixed size)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    leaves = keras.tree.flatten(x)
    if isinstance(x, dict):
        by_name = {tensor.name: tensor for tensor in inputs}
        pairs = [(by_name.get(name), x[name]) for name in sorted(x)]
    else:
        pairs = list(zip(inputs, leaves))
    expected = [tuple(tensor.shape) for tensor in inputs]
    received = keras.tree.map_structure(lambda a: tuple(a.shape), x)
    mismatch = len(leaves) != len(inputs) or any(
        tensor is None
        or len(tensor.shape) != len(leaf.shape)
        or any(
            want is not None and want != got
            for want, got in zip(tensor.shape[1:], leaf.shape[1:])
        )
        for tensor, leaf in pairs
    )
    if mismatch:
        raise ValueError(
            "Invalid value received for argument `data`. Expected batches "
            f"of inputs of shape {expected} (the model's inputs, batch axis "
            f"first). Received: data={_summary(data)} with a batch of shape "
            f"{received}"
        )


# ------------------------------------------------------ reading the inputs


class _ChannelMoments(keras.layers.Layer):
    """Per-channel count, mean and centred sum of squares of its inputs.

    Placed on a batch-normalization layer's input (with its mask), in
    float32: the statistics that layer would see.
    """

    def __init__(self, axis, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.axis = axis
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask):
        return None

    def call(self, inputs, mask=None):
        mean, variance, count = channel_moments(
            ops.cast(inputs, "float32"), self.axis, mask
        )
        return ops.stack([count, mean, variance * count])

    def compute_output_shape(self, input_shape):
        return (3, input_shape[self.axis])


def _is_graph(layer):
    """A Functional or Sequential model, whose layers form a graph."""
    return isinstance(layer, keras.Model) and bool(
        getattr(layer, "inputs", None)
    )


def _own_inputs(graph):
    """The input tensors of `graph`'s own graph, in its structure."""
    if isinstance(graph, keras.Sequential):
        return graph.inputs[0]
    return graph.input


def _first_call_inputs(layer):
    """The tensors that fed `layer` the first time a graph called it.

    `keras.Operation.input`, which a Functional model overrides with its own
    inputs: a nested model's inputs in the graph that contains it. A mask
    passed to the call comes last.
    """
    return keras.tree.flatten(keras.Operation.input.fget(layer))


def _branch(layer):
    """The layers a `StochasticDepth` applies in sequence, else `None`."""
    from keras_regkit.layers.stochastic_depth import StochasticDepth

    if isinstance(layer, StochasticDepth):
        return list(layer.block)
    return None


def _probes(graph, targets):
    """`[(layer, probe tensor)]` of the targets in `graph`, forward order."""
    found = []
    for layer in graph.layers:
        if any(layer is target for target in targets):
            tensors = _first_call_inputs(layer)
            mask = tensors[1] if len(tensors) > 1 else None
            probe = _ChannelMoments(layer.axis % len(tensors[0].shape))
            found.append((layer, probe(tensors[0], mask=mask)))
        elif _branch(layer) is not None:
            # A layer that calls a public list of layers in sequence on its
            # input (`StochasticDepth.block`): the branch is replayed
            # symbolically from the layer's own input.
            x = _first_call_inputs(layer)[0]
            for sublayer in _branch(layer):
                if any(sublayer is target for target in targets):
                    probe = _ChannelMoments(sublayer.axis % len(x.shape))
                    found.append((sublayer, probe(x)))
                x = sublayer(x)
        elif _is_graph(layer):
            inner = _probes(layer, targets)
            if not inner:
                continue
            own = _own_inputs(layer)
            inner_model = keras.Model(own, [tensor for _, tensor in inner])
            count = len(keras.tree.flatten(own))
            tensors = _first_call_inputs(layer)[:count]
            outputs = keras.tree.flatten(
                inner_model(keras.tree.pack_sequence_as(own, tensors))
            )
            found.extend(
                (target, output)
                for (target, _), output in zip(inner, outputs, strict=True)
            )
    return found


# model -> (ids of the target layers, the targets in forward order, reader).
# Built once per model and set of layers: building a sub-model records a
# node on the layers it reads from, so rebuilding at every call would grow
# those layers' graph records without bound.
_READERS = weakref.WeakKeyDictionary()


def _reader(model, targets):
    """The targets in forward order, and a functional model whose outputs
    are each target's per-channel `(count, mean, M2)` of a batch."""
    if not _is_graph(model):
        raise _unreachable_error(targets)
    key = tuple(sorted(id(layer) for layer in targets))
    cached = _READERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    probes = _probes(model, targets)
    missing = [t for t in targets if not any(t is p for p, _ in probes)]
    if missing:
        raise _unreachable_error(missing)
    ordered = [layer for layer, _ in probes]
    reader = keras.Model(_own_inputs(model), [tensor for _, tensor in probes])
    _READERS[model] = (key, ordered, reader)
    return ordered, reader


def _unreachable_error(layers):
    names = ", ".join(repr(layer.name) for layer in layers)
    return ValueError(
        "recompute_batchnorm_statistics reads what each batch-normalization "
        "layer receives through a functional sub-model, so the layers must "
        "be in the graph of a Functional or Sequential model (nested ones "
        f"included). These are not: {names} (inside a subclassed model or a "
        "custom layer). Build that part functionally, or set "
        "`trainable=False` on those layers to leave their statistics as they "
        "are."
    )


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


def _state(layers):
    variables = []
    for layer in layers:
        variables.extend(statistics_variables(layer))
        count = getattr(layer, "moving_count", None)
        if isinstance(count, keras.Variable):
            variables.append(count)
    return [(v, ops.convert_to_numpy(v)) for v in variables]


def _recomputable(model):
    return [layer for layer in batch_norm_layers(model) if layer.trainable]


def recompute_batchnorm_statistics(
    model, data, steps=None, batch_size=None, verbose=0
):
    """Sets every batch-norm layer's statistics to exact population values.

    Precise BN (Wu & Johnson, 2021): the moving averages of a
    `keras.layers.BatchNormalization` trail the weights by about
    `1 / (1 - momentum)` steps and, in Keras, underestimate the variance by
    `(m - 1) / m`; averaged weights (SWA, `PolyakAveraging`) do not match
    averaged statistics either. This function sets, for each trainable
    batch-normalization layer, per channel (the layer's `axis`):

    ```
    moving_mean     = sum(x) / M
    moving_variance = sum((x - moving_mean) ** 2) / (M - 1)
    ```

    over every value `x` the layer receives from the given batches in
    inference mode (masked values left out), `M` being their count (a
    variance of 0 when `M = 1`). The layers are processed in the order the
    forward pass calls them, so each one's statistics are those of the
    inputs it sees at inference, with the layers before it already
    recomputed; the cost is one pass over the batches per layer. Renorm
    statistics (`renorm=True`) are set to the same population values.

    The inputs of each layer are read through a functional sub-model, so
    the layers must sit in the graph of a Functional or Sequential model
    (nested ones included); a trainable layer inside a subclassed model or a
    custom layer is refused (freeze it with `trainable=False` to leave it as
    it is). On any error, every statistic is left as it was.

    Args:
        model: A Functional or Sequential `keras.Model` (built on the first
            batch if it is not built).
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
        The layers whose statistics were recomputed, in the order processed.

    Raises:
        ValueError: for `data` that yields no batch, holds inf or NaN, or
            does not match the model's inputs; for a bad `steps`,
            `batch_size` or `verbose`; for trainable batch-normalization
            layers outside a functional graph.

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
    """
    steps = _check_optional_count("steps", steps)
    batch_size = _check_optional_count("batch_size", batch_size)
    verbose = check_verbose(verbose)
    _check_data(data)
    if model.built and not _recomputable(model):
        return []
    batches = _collect_batches(data, steps, batch_size)
    if not model.built:
        model(batches[0], training=False)
    targets = _recomputable(model)
    if not targets:
        return []
    ordered, reader = _reader(model, targets)
    _check_matches_model(model, batches[0], data)
    saved = _state(targets)
    done = []
    try:
        for index, layer in enumerate(ordered):
            moments = _Moments()
            for x in batches:
                outputs = reader.predict_on_batch(x)
                if not isinstance(outputs, (list, tuple)):
                    outputs = [outputs]
                moments.add(*outputs[index])
            variance = moments.unbiased_variance()
            if not (
                np.all(np.isfinite(moments.mean))
                and np.all(np.isfinite(variance))
            ):
                raise ValueError(
                    "recompute_batchnorm_statistics: the inputs of "
                    f"{layer.name!r} are not finite (an overflow in the "
                    "layers before it?); every statistic is left as it was."
                )
            _assign_statistics(layer, moments.mean, variance, len(batches))
            done.append(layer)
            if verbose:
                print(
                    f"recompute_batchnorm_statistics: {layer.name}: "
                    f"{int(np.max(moments.count))} values per channel."
                )
    except BaseException:
        for variable, value in saved:
            variable.assign(value)
        raise
    return done


@keras.saving.register_keras_serializable(package="keras_regkit")
class BatchNormStatistics(keras.callbacks.Callback):
    """Recomputes batch-norm population statistics at the end of training.

    At the end of `fit`, calls `recompute_batchnorm_statistics(model, data,
    steps, batch_size)`: the moving mean and variance of every
    batch-normalization layer become the exact mean and unbiased variance of
    the inputs the layer sees at inference over `data`, for the final
    weights. Training itself is unchanged; inference afterwards, `save` and
    `export` use the recomputed values.

    The arguments are checked at construction, and at the start of training
    the model (its batch-normalization layers must be in a functional graph)
    and the first batch of `data` (its shape must fit the model's inputs),
    so that a mistake does not wait for the last epoch. Place it after
    callbacks that change the weights at the end of training; with
    `PolyakAveraging`, use its `batch_norm="recompute"` instead.

    Args:
        data: The batches, in any form `recompute_batchnorm_statistics`
            takes (typically the training data, or part of it).
        steps: int or `None`. Number of batches to use; `None` uses all of
            `data`. Defaults to `None`.
        batch_size: int or `None`. Batch size when `data` is arrays.
            Defaults to `32`.
        verbose: int. 1 prints one line per layer. Defaults to `0`.

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
        _check_data(data)
        self.data = data
        self.steps = _check_optional_count("steps", steps)
        self.batch_size = _check_optional_count("batch_size", batch_size)
        self.verbose = check_verbose(verbose)

    def on_train_begin(self, logs=None):
        targets = _recomputable(self.model)
        if not targets:
            return
        if not _is_graph(self.model) and isinstance(
            self.model, keras.Sequential
        ):
            return  # Built on the first batch: checked at the end.
        _reader(self.model, targets)
        first, self.data = _peek(self.data, self.batch_size)
        _check_finite(first, self.data)
        _check_matches_model(self.model, first, self.data)

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
