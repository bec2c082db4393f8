"""Fractional max pooling (Graham, 2014) with an exact, fast gradient."""

import math
import threading

import keras
import numpy as np
from keras import ops

from keras_regkit._utils import argument_error
from keras_regkit._utils import check_choice

__all__ = ["FractionalMaxPooling2D", "FractionalPoolingAverage"]

_RATIO_EXPECTED = "a float in (1, 2], or a pair of such floats (rows, cols)"

# The number of test-time passes requested by an enclosing
# `FractionalPoolingAverage` call; read by the layers while it traces.
_AVERAGING = threading.local()


def _averaging_passes():
    return getattr(_AVERAGING, "passes", None)


def _check_pooling_ratio(pooling_ratio):
    if isinstance(pooling_ratio, (list, tuple)):
        if len(pooling_ratio) != 2:
            raise argument_error(
                "pooling_ratio", _RATIO_EXPECTED, pooling_ratio
            )
        values = pooling_ratio
    else:
        values = (pooling_ratio, pooling_ratio)
    ratios = []
    for value in values:
        if isinstance(value, bool) or not isinstance(
            value, (int, float, np.floating, np.integer)
        ):
            raise argument_error(
                "pooling_ratio", _RATIO_EXPECTED, pooling_ratio
            )
        if not 1.0 < float(value) <= 2.0:
            raise argument_error(
                "pooling_ratio", _RATIO_EXPECTED, pooling_ratio
            )
        ratios.append(float(value))
    return tuple(ratios)


def pooled_size(size, ratio):
    """Output length `floor(size / ratio)`, computed as TensorFlow does.

    TensorFlow divides in float32 (`pooling_ratio` is a float attribute), so
    `pooled_size(11, 1.1)` is 9, not 10; we match it bit for bit.
    """
    if size is None:
        return None
    return math.floor(np.float32(size) / np.float32(ratio))


def _ceil_div(a, b):
    return ops.floor_divide(a + b - 1, b)


def pseudo_random_boundaries(size, out_size, offset):
    """Region boundaries `b_0 = 0 < b_1 < ... < b_out = size` (int32).

    `b_i = ceil(alpha * (i + u)) - ceil(alpha * u)` with `alpha = size /
    out_size` and `u = (offset + 1/2) / size`, in exact integer arithmetic.
    """
    i = ops.arange(out_size + 1, dtype="int32")
    denominator = 2 * out_size
    shift = 2 * ops.cast(offset, "int32") + 1
    return _ceil_div(2 * size * i + shift, denominator) - _ceil_div(
        shift, denominator
    )


def random_boundaries(size, out_size, seed):
    """Boundaries from a uniformly random arrangement of the increments.

    The increments are `size // out_size` plus one for `size % out_size` of
    them (1 and 2 when `size / out_size` is in (1, 2]).
    """
    base = size // out_size
    extra = size - base * out_size
    order = keras.random.shuffle(ops.arange(out_size, dtype="int32"), seed=seed)
    increments = base + ops.cast(order < extra, "int32")
    return ops.concatenate(
        [ops.zeros((1,), dtype="int32"), ops.cumsum(increments)]
    )


def _slot_positions(boundaries, size, overlapping, num_slots):
    """Per slot `t`, the index `min(start_j + t, end_j)` of each region `j`."""
    starts = boundaries[:-1]
    if overlapping:
        ends = ops.minimum(boundaries[1:], size - 1)
    else:
        ends = boundaries[1:] - 1
    return [ops.minimum(starts + t, ends) for t in range(num_slots)]


def _num_slots(size, out_size, overlapping):
    """Largest region length; a static bound when `size` is dynamic."""
    if isinstance(size, int) and isinstance(out_size, int):
        longest = -(-size // out_size)
    else:
        # For ratios in (1, 2] and size >= 2, size / out_size <= 3.
        longest = 3
    return longest + int(overlapping)


def _region_max(x, rows, cols, h_axis, w_axis):
    """Values only: the max over each region, rows of columns maxima."""
    y = ops.take(x, cols[0], axis=w_axis)
    for positions in cols[1:]:
        y = ops.maximum(y, ops.take(x, positions, axis=w_axis))
    out = ops.take(y, rows[0], axis=h_axis)
    for positions in rows[1:]:
        out = ops.maximum(out, ops.take(y, positions, axis=h_axis))
    return out


def _broadcast_along(vector, axis, ndim=4):
    shape = [1] * ndim
    shape[axis] = -1
    return ops.reshape(vector, shape)


def _index_dtype(x):
    """int32 flat indices (much faster on CPU) unless they could overflow.

    An unknown batch size is assumed to be at most 2048.
    """
    static = x.shape
    if None in static[1:]:
        return "int64"
    size = int(np.prod(static[1:])) * (static[0] or 2048)
    return "int32" if size < 2**31 else "int64"


def _region_max_with_argmax_gradient(x, rows, cols, h_axis, w_axis):
    """The region max as a gather of each region's first argmax.

    The argmax is found on `stop_gradient(x)`: first, for every row, the
    earliest column holding the maximum over each column range; then the
    earliest row holding the region's maximum. That pair is the region's
    first maximum in row-major order. The output gathers `x` at those flat
    positions, so the gradient is a scatter-add onto exactly those positions.
    The position tracked through both stages is the flat offset `row *
    row_stride + col * col_stride` within a sample.
    """
    shape = ops.shape(x)
    dtype = _index_dtype(x)
    strides = [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ]

    def offsets(positions, axis):
        return _broadcast_along(
            ops.cast(positions, dtype) * ops.cast(strides[axis], dtype), axis
        )

    row_offsets = offsets(ops.arange(shape[h_axis], dtype=dtype), h_axis)
    values = ops.stop_gradient(x)
    best = ops.take(values, cols[0], axis=w_axis)
    where = row_offsets + offsets(cols[0], w_axis)
    for positions in cols[1:]:
        candidate = ops.take(values, positions, axis=w_axis)
        greater = ops.greater(candidate, best)
        best = ops.where(greater, candidate, best)
        where = ops.where(
            greater, row_offsets + offsets(positions, w_axis), where
        )
    out = ops.take(best, rows[0], axis=h_axis)
    chosen = ops.take(where, rows[0], axis=h_axis)
    for positions in rows[1:]:
        candidate = ops.take(best, positions, axis=h_axis)
        greater = ops.greater(candidate, out)
        out = ops.where(greater, candidate, out)
        chosen = ops.where(
            greater, ops.take(where, positions, axis=h_axis), chosen
        )

    channel_axis = 1 if h_axis == 2 else 3
    base = offsets(ops.arange(shape[0], dtype=dtype), 0) + offsets(
        ops.arange(shape[channel_axis], dtype=dtype), channel_axis
    )
    return ops.take(ops.reshape(x, (-1,)), base + chosen)


def _lattice_multiplier(passes):
    """An integer coprime with `passes`, nearest to `passes / phi`."""
    target = passes / ((1 + 5**0.5) / 2)
    candidates = [a for a in range(1, passes + 1) if math.gcd(a, passes) == 1]
    return min(candidates, key=lambda a: (abs(a - target), a))


@keras.saving.register_keras_serializable(package="keras_regkit")
class FractionalMaxPooling2D(keras.layers.Layer):
    """Fractional max pooling: downsampling by a non-integer ratio.

    Each output is the maximum over a rectangular region; the regions tile
    the input with row and column boundaries `0 = a_0 < a_1 < ... < a_out =
    size` whose increments `a_i - a_{i-1}` are 1 or 2, so an input of size
    `H x W` pools to `floor(H / ratio_rows) x floor(W / ratio_cols)` (the
    same size as `tf.nn.fractional_max_pool`). With `overlapping=True` region
    `i` spans rows `a_{i-1}..a_i` inclusive (2 or 3 rows; the last one is
    clipped to the input), otherwise `a_{i-1}..a_i - 1` (1 or 2 rows).

    **Training** (`training=True`): fresh boundaries are drawn at every call,
    one sequence for the rows and one for the columns, shared by the batch.
    - `pseudo_random=True` (the paper's pseudo-random overlapping FMP):
      `a_i = ceil(alpha * (i + u)) - ceil(alpha * u)` with
      `alpha = size / out_size` and `u` uniform in (0, 1).
    - `pseudo_random=False`: a uniformly random arrangement of the
      increments (`size % out_size` of them equal to 2, the rest 1).

    **Inference**: deterministic boundaries, whatever `pseudo_random` says:
    the pseudo-random sequence at the smallest offset, `v = 0` below (`u =
    1 / (2 * size)`), so `predict` and an exported SavedModel are
    reproducible. That sequence always ends with the longer increment, so
    the last region, which is clipped at the input's edge, keeps 2 rows
    (at `u = 1/2`, for instance, 8 rows pooled to 5 would end with a 1-row
    region, which only a quarter of the training draws have). For the
    paper's test-time
    averaging over several poolings, wrap the model in
    `keras_regkit.layers.FractionalPoolingAverage`.

    **Gradient.** The gradient of each output goes to the first maximum of
    its region in row-major order (the smallest row holding the maximum,
    then the smallest column in that row), the same rule as TensorFlow's
    `FractionalMaxPoolGrad` kernel, in eager, graph and XLA-compiled code
    alike. Overlapping regions that share an argmax add their gradients.
    The argmax is found with `keras.ops` comparisons (2 to 4 gathered
    columns, then 2 to 4 gathered rows) and the output gathers the input at
    those positions, so the gradient is one scatter-add; it runs under XLA
    and in float16. Inference skips the argmax and takes elementwise
    maxima of the gathered columns, then rows.

    **Where this follows TensorFlow's kernel, and where the paper.**
    - Output size, region bounds (inclusive, clipped to the input) and the
      tie rule of the gradient follow TensorFlow.
    - Pseudo-random sequences follow the paper's `ceil(alpha * (i + u))`.
      That formula starts at `ceil(alpha * u)` (1 or 2), not 0; we subtract
      that start, which keeps every `u` in (0, 1) and gives an exact final
      boundary `size`. (TensorFlow instead pins the ends and narrows the
      range of `u`, which makes some sequences impossible.) Since the
      sequence only changes when `u` crosses a multiple of `1 / size`, `u`
      is drawn as `(v + 1/2) / size` with `v` a uniform integer in
      `[0, size)`: the same distribution of sequences, in integer
      arithmetic.
    - When `size / out_size` exceeds 2 (small odd sizes, e.g. 5 pooled by
      1.9 to 2), increments are 2 or 3, as in TensorFlow's kernel.

    Ratios above 2 are refused: with `alpha >= 2` regions would be 3 or more
    rows long and FMP degenerates into ordinary strided pooling with jitter;
    the paper stacks layers with `alpha` in (1, 2) instead (e.g. `alpha =
    2 ** 0.5` twice halves the size).

    Args:
        pooling_ratio: float or pair of floats `(rows, cols)`, each in
            (1, 2]. The downsampling factor. Defaults to `2 ** 0.5`.
        pseudo_random: bool. Pseudo-random (`True`) or random (`False`)
            boundary sequences in training. Defaults to `True`.
        overlapping: bool. Whether neighbouring regions share their
            boundary row/column. Defaults to `True`.
        seed: int or `None`. Seed of the boundary draws. Defaults to `None`.
        data_format: str or `None`. `"channels_last"` or
            `"channels_first"`; `None` means
            `keras.config.image_data_format()`. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: 4D tensor, `(batch, rows, cols, channels)` for
            `channels_last`, `(batch, channels, rows, cols)` otherwise.
        training: bool. Whether to draw random regions.

    Returns:
        The pooled tensor, of the input's dtype.

    Raises:
        ValueError: for a `pooling_ratio` outside (1, 2] or of the wrong
            length, a non-boolean `pseudo_random` or `overlapping`, a
            non-integer `seed`, an unknown `data_format`, or (when built)
            an input whose rows or columns would pool to nothing.

    Example:

    >>> import numpy as np
    >>> import keras_regkit
    >>> layer = keras_regkit.layers.FractionalMaxPooling2D(1.5, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(2, 9, 10, 3))
    >>> tuple(layer(x).shape)
    (2, 6, 6, 3)
    >>> tuple(layer(x, training=True).shape)
    (2, 6, 6, 3)

    Reference:

    - [Graham, 2014](https://arxiv.org/abs/1412.6071)
    """

    def __init__(
        self,
        pooling_ratio=2**0.5,
        pseudo_random=True,
        overlapping=True,
        seed=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._ratios = _check_pooling_ratio(pooling_ratio)
        self.pooling_ratio = (
            tuple(float(r) for r in pooling_ratio)
            if isinstance(pooling_ratio, (list, tuple))
            else float(pooling_ratio)
        )
        for name, value in (
            ("pseudo_random", pseudo_random),
            ("overlapping", overlapping),
        ):
            if not isinstance(value, (bool, np.bool_)):
                raise argument_error(name, "a bool", value)
        self.pseudo_random = bool(pseudo_random)
        self.overlapping = bool(overlapping)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
        ):
            raise argument_error("seed", "an int or None", seed)
        self.seed = None if seed is None else int(seed)
        self.data_format = check_choice(
            "data_format",
            keras.config.image_data_format()
            if data_format is None
            else data_format,
            ("channels_last", "channels_first"),
        )
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @property
    def _spatial_axes(self):
        return (1, 2) if self.data_format == "channels_last" else (2, 3)

    def build(self, input_shape):
        h_axis, w_axis = self._spatial_axes
        for axis, ratio in zip((h_axis, w_axis), self._ratios, strict=True):
            size = input_shape[axis]
            if size is not None and pooled_size(size, ratio) < 1:
                raise ValueError(
                    "Invalid value received for argument `inputs`. Expected "
                    f"rows and columns of at least {math.ceil(ratio)} each "
                    f"(output sides are floor(size / pooling_ratio) with "
                    f"pooling_ratio={self.pooling_ratio}, data_format="
                    f"{self.data_format!r}). Received: inputs.shape="
                    f"{tuple(input_shape)}"
                )

    def compute_output_shape(self, input_shape):
        output_shape = list(input_shape)
        for axis, ratio in zip(self._spatial_axes, self._ratios, strict=True):
            output_shape[axis] = pooled_size(input_shape[axis], ratio)
        return tuple(output_shape)

    def _sizes(self, inputs):
        """(size, pooled size) per spatial axis, static where possible."""
        shape = ops.shape(inputs)
        sizes = []
        for axis, ratio in zip(self._spatial_axes, self._ratios, strict=True):
            size = inputs.shape[axis]
            if size is not None:
                sizes.append((size, pooled_size(size, ratio)))
            else:
                size = ops.cast(shape[axis], "int32")
                pooled = ops.cast(
                    ops.floor(ops.cast(size, "float32") / np.float32(ratio)),
                    "int32",
                )
                sizes.append((size, pooled))
        return sizes

    def _positions(self, boundaries, size, pooled):
        return _slot_positions(
            boundaries,
            size,
            self.overlapping,
            _num_slots(size, pooled, self.overlapping),
        )

    def call(self, inputs, training=None):
        h_axis, w_axis = self._spatial_axes
        (rows, out_rows), (cols, out_cols) = self._sizes(inputs)
        if training:
            if self.pseudo_random:
                offsets = [
                    keras.random.randint(
                        (), 0, size, dtype="int32", seed=self.seed_generator
                    )
                    for size in (rows, cols)
                ]
                row_bounds = pseudo_random_boundaries(
                    rows, out_rows, offsets[0]
                )
                col_bounds = pseudo_random_boundaries(
                    cols, out_cols, offsets[1]
                )
            else:
                row_bounds = random_boundaries(
                    rows, out_rows, self.seed_generator
                )
                col_bounds = random_boundaries(
                    cols, out_cols, self.seed_generator
                )
            return _region_max_with_argmax_gradient(
                inputs,
                self._positions(row_bounds, rows, out_rows),
                self._positions(col_bounds, cols, out_cols),
                h_axis,
                w_axis,
            )

        passes = _averaging_passes()
        if not passes:
            return _region_max(
                inputs,
                self._positions(
                    pseudo_random_boundaries(rows, out_rows, 0),
                    rows,
                    out_rows,
                ),
                self._positions(
                    pseudo_random_boundaries(cols, out_cols, 0),
                    cols,
                    out_cols,
                ),
                h_axis,
                w_axis,
            )
        return self._averaging_call(
            inputs, passes, rows, out_rows, cols, out_cols
        )

    def _averaging_call(self, inputs, passes, rows, out_rows, cols, out_cols):
        """Pass `g` of `passes` pools the `g`-th block of the tiled batch.

        Offsets form a rank-1 lattice, `v_rows = floor(g * rows / passes)`
        and `v_cols = floor(((a * g) % passes) * cols / passes)`; pass 0 is
        the single deterministic pass.
        """
        h_axis, w_axis = self._spatial_axes
        shape = ops.shape(inputs)
        grouped = ops.reshape(inputs, (passes, -1) + tuple(shape[1:]))
        multiplier = _lattice_multiplier(passes)
        outputs = []
        for g in range(passes):
            col_g = (multiplier * g) % passes
            row_offset = (g * rows) // passes
            col_offset = (col_g * cols) // passes
            outputs.append(
                _region_max(
                    grouped[g],
                    self._positions(
                        pseudo_random_boundaries(rows, out_rows, row_offset),
                        rows,
                        out_rows,
                    ),
                    self._positions(
                        pseudo_random_boundaries(cols, out_cols, col_offset),
                        cols,
                        out_cols,
                    ),
                    h_axis,
                    w_axis,
                )
            )
        return ops.concatenate(outputs, axis=0)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pooling_ratio": self.pooling_ratio,
                "pseudo_random": self.pseudo_random,
                "overlapping": self.overlapping,
                "seed": self.seed,
                "data_format": self.data_format,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_regkit")
class FractionalPoolingAverage(keras.Model):
    """Test-time averaging over several fractional poolings, in one graph.

    The paper's "model averaging" at test time: run the network several
    times with different pooling regions and average the outputs (Graham's
    MNIST error went from 0.44% with one pass to 0.34% averaging 12). This
    wrapper tiles the batch `num_passes` times, runs `model` once on the
    tiled batch in inference mode, and averages the `num_passes` blocks of
    each output. Every `FractionalMaxPooling2D` inside pools block `g` with
    its own regions: pseudo-random sequences at offsets `u_rows ~ g / N`
    and `u_cols ~ ((a * g) mod N) / N` (exactly, `v_rows = floor(g * rows /
    N)` and `v_cols = floor(((a * g) mod N) * cols / N)` in the notation of
    `FractionalMaxPooling2D`; `a` is coprime with `N` and close to
    `N / phi`). These rank-1 lattice points spread the passes evenly over
    the square of offsets instead of drawing them at random, so predictions
    are reproducible and the exported SavedModel serves the same numbers as
    `predict`; pass 0 is the layer's single deterministic pass, so
    `num_passes=1` equals `model.predict`. Random (`pseudo_random=False`)
    layers use the same pseudo-random passes. Dropout and batch
    normalization run in inference mode.

    In training (`training=True`, e.g. inside `fit`) the wrapper simply
    calls `model` once: fitting the wrapper or the model trains the same
    weights. Wrapping a built Functional or Sequential model gives a built
    wrapper, which `export` and `save` take at once.

    The outputs are averaged as the model returns them: end the model with
    a softmax to average probabilities, as the paper does. The cost of a
    prediction is that of `num_passes` predictions, in one graph.

    Args:
        model: `keras.Model`. The network; its batch axis must be the first
            axis of every input and output.
        num_passes: int >= 1. Number of poolings averaged. Defaults to 12.
        **kwargs: Base model keyword arguments (`name`, ...).

    Call arguments:
        inputs: The model's inputs (any structure).
        training: bool. `True` calls `model` once, in training mode.

    Returns:
        The model's outputs averaged over the passes.

    Raises:
        ValueError: for `num_passes` not a positive int, or `model` not a
            `keras.Model`.

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
        if (
            isinstance(num_passes, bool)
            or not isinstance(num_passes, (int, np.integer))
            or num_passes < 1
        ):
            raise argument_error("num_passes", "an int >= 1", num_passes)
        self.model = model
        self.num_passes = int(num_passes)
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
            return ops.tile(x, [passes] + [1] * (len(x.shape) - 1))

        previous = _averaging_passes()
        _AVERAGING.passes = passes
        try:
            outputs = self.model(
                keras.tree.map_structure(tile, inputs), training=False
            )
        finally:
            _AVERAGING.passes = previous

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
