"""Fractional max pooling (Graham, 2014) with an exact, fast gradient."""

import math

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_seed

__all__ = ["FractionalMaxPooling2D"]

_RATIO_EXPECTED = "a float in (1, 2], or a pair of such floats (rows, cols)"


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


def _replaces(candidate, best):
    """Whether `candidate` takes the place of the running maximum `best`.

    A larger value, or a NaN: a NaN anywhere in a region makes its maximum
    NaN (as NumPy's `max` does), in training and inference alike. A plain
    `maximum` would not do: TensorFlow's XLA `max(1, nan)` is 1.
    """
    return ops.logical_or(ops.greater(candidate, best), ops.isnan(candidate))


def _region_max(x, rows, cols, h_axis, w_axis):
    """Values only: the max over each region, rows of columns maxima."""
    y = ops.take(x, cols[0], axis=w_axis)
    for positions in cols[1:]:
        candidate = ops.take(x, positions, axis=w_axis)
        y = ops.where(_replaces(candidate, y), candidate, y)
    out = ops.take(y, rows[0], axis=h_axis)
    for positions in rows[1:]:
        candidate = ops.take(y, positions, axis=h_axis)
        out = ops.where(_replaces(candidate, out), candidate, out)
    return out


def _broadcast_along(vector, axis, ndim=4):
    shape = [1] * ndim
    shape[axis] = -1
    return ops.reshape(vector, shape)


def _index_dtype(x):
    """int32 flat indices (much faster on CPU) when the size is known to fit,
    else int64 (an unknown batch size or spatial size included)."""
    static = x.shape
    if None in static:
        return "int64"
    return "int32" if int(np.prod(static)) < 2**31 else "int64"


def _region_max_with_argmax_gradient(x, rows, cols, h_axis, w_axis):
    """The region max as a gather of each region's first argmax.

    The argmax is found on `stop_gradient(x)`: first, for every row, the
    earliest column holding the maximum over each column range; then the
    earliest row holding the region's maximum. That pair is the region's
    first maximum in row-major order (its first NaN, if it holds one). The output gathers `x` at those flat
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
        greater = _replaces(candidate, best)
        best = ops.where(greater, candidate, best)
        where = ops.where(
            greater, row_offsets + offsets(positions, w_axis), where
        )
    out = ops.take(best, rows[0], axis=h_axis)
    chosen = ops.take(where, rows[0], axis=h_axis)
    for positions in rows[1:]:
        candidate = ops.take(best, positions, axis=h_axis)
        greater = _replaces(candidate, out)
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
    the input with row (and column) boundaries `0 = a_0 < a_1 < ... <
    a_out = size` whose increments are 1 or 2, so an `H x W` input pools to
    `floor(H / ratio_rows) x floor(W / ratio_cols)`, the size of
    `tf.nn.fractional_max_pool`. With `overlapping=True` region `i` spans
    `a_{i-1}..a_i` inclusive (clipped to the input), otherwise
    `a_{i-1}..a_i - 1`. A NaN anywhere in a region makes its output NaN, in
    training and inference, on every backend (TensorFlow's max pooling
    skips NaN; JAX's and NumPy's propagate it).

    **Training** draws fresh boundaries at every call, one sequence for the
    rows and one for the columns, shared by the batch: with
    `pseudo_random=True` the paper's `a_i = ceil(alpha * (i + u)) -
    ceil(alpha * u)`, `alpha = size / out_size`, `u = (v + 1/2) / size` for
    a uniform integer `v` in `[0, size)` (the formula starts at
    `ceil(alpha * u)`, which we subtract so that `a_out = size`); with
    `pseudo_random=False` a uniformly random arrangement of the increments.
    TensorFlow's kernel builds its sequences differently and also draws
    sequences outside this formula. The gradient goes to the first maximum
    of each region in row-major order, as TensorFlow's
    `FractionalMaxPoolGrad`, under XLA too.

    **Inference** uses the pseudo-random sequence at `v = 0`, so `predict`
    and exported models are deterministic; its last, clipped, region keeps
    the longer increment. For the paper's averaging over several poolings,
    wrap the model in `keras_regkit.layers.FractionalPoolingAverage`, which
    sets `num_passes` on its own copies of these layers: inference then
    pools the `g`-th of `num_passes` equal blocks of the batch at the
    lattice offset `g` documented there (`num_passes = 1`, the default, is
    the single pass above).

    Args:
        pooling_ratio: float or pair of floats `(rows, cols)`, each in
            (1, 2]. The downsampling factor. Defaults to `2 ** 0.5`.
        pseudo_random: bool. Pseudo-random (`True`) or random (`False`)
            boundary sequences in training. Defaults to `True`.
        overlapping: bool. Whether neighbouring regions share their
            boundary row/column. Defaults to `True`.
        seed: int or `None`. Seed of the boundary draws. Defaults to `None`.
        data_format: `"channels_last"`, `"channels_first"` or `None`
            (`keras.config.image_data_format()`). Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: 4D tensor, `(batch, rows, cols, channels)` for
            `channels_last`, `(batch, channels, rows, cols)` otherwise.
        training: bool. Whether to draw random regions.

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
        self.pseudo_random = check_bool("pseudo_random", pseudo_random)
        self.overlapping = check_bool("overlapping", overlapping)
        self.seed = check_seed("seed", seed)
        self.data_format = check_choice(
            "data_format",
            keras.config.image_data_format()
            if data_format is None
            else data_format,
            ("channels_last", "channels_first"),
        )
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        # Set by `FractionalPoolingAverage` on its own copies of the layer.
        self.num_passes = 1

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

        if self.num_passes == 1:
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
            inputs, self.num_passes, rows, out_rows, cols, out_cols
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
