"""Tests for FractionalMaxPooling2D and FractionalPoolingAverage."""

import os
import tempfile

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage
from keras_regkit.layers import fractional_max_pooling as fmp


def region_bounds(boundaries, size, overlapping):
    """Inclusive (start, end) of each region, as documented."""
    b = np.asarray(boundaries)
    ends = np.minimum(b[1:], size - 1) if overlapping else b[1:] - 1
    return list(zip(b[:-1], ends))


def numpy_pool(x, row_b, col_b, overlapping):
    """NHWC max over each region and the argmax gradient of `sum(y * g)`.

    The gradient goes to each region's first maximum in row-major order.
    """
    n, h, w, c = x.shape
    rows = region_bounds(row_b, h, overlapping)
    cols = region_bounds(col_b, w, overlapping)
    y = np.zeros((n, len(rows), len(cols), c), x.dtype)
    argmax = np.zeros(y.shape + (2,), int)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            region = x[:, r0 : r1 + 1, c0 : c1 + 1, :]
            y[:, i, j] = region.max(axis=(1, 2))
            flat = region.reshape(n, -1, c).argmax(axis=1)  # first maximum
            argmax[:, i, j, :, 0] = r0 + flat // region.shape[2]
            argmax[:, i, j, :, 1] = c0 + flat % region.shape[2]
    return y, argmax


def numpy_gradient(x, argmax, upstream):
    dx = np.zeros_like(x)
    n, kh, kw, c = upstream.shape
    for b in range(n):
        for i in range(kh):
            for j in range(kw):
                for ch in range(c):
                    r, col = argmax[b, i, j, ch]
                    dx[b, r, col, ch] += upstream[b, i, j, ch]
    return dx


def tied_input(shape, seed):
    """Few distinct values, so that most regions hold ties."""
    return (
        np.random.default_rng(seed).integers(0, 3, size=shape).astype("float32")
    )


def to_nhwc(x, data_format):
    return (
        x if data_format == "channels_last" else np.transpose(x, (0, 2, 3, 1))
    )


def from_nhwc(x, data_format):
    return (
        x if data_format == "channels_last" else np.transpose(x, (0, 3, 1, 2))
    )


def with_probe(x, data_format):
    """`x` after a first sample `p[r, c] = r * cols + c` (every channel).

    A training call draws one row and one column sequence for the whole
    batch; the probe's pooled values reveal them (see `drawn_boundaries`).
    """
    nhwc = to_nhwc(x, data_format)
    _, rows, cols, channels = nhwc.shape
    grid = np.arange(rows * cols, dtype="float32").reshape(1, rows, cols, 1)
    probe = np.broadcast_to(grid, (1, rows, cols, channels))
    return from_nhwc(np.concatenate([probe, nhwc]), data_format)


def drawn_boundaries(y_nhwc, rows, cols, overlapping):
    """The boundaries behind the pooled probe (sample 0 of `y_nhwc`).

    The probe increases along rows and columns, so each region's maximum
    sits at its last row and column: `e_i * cols + f_j`.
    """
    probe = np.asarray(y_nhwc[0, :, :, 0]).astype(int)
    bounds = []
    for ends, size in ((probe[:, 0] // cols, rows), (probe[0, :] % cols, cols)):
        inner = ends[:-1] if overlapping else ends[:-1] + 1
        bounds.append(np.concatenate([[0], inner, [size]]))
    return bounds


def _compiled_boundaries():
    # Eager JAX compiles every op for every new size: jit compiles once.
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fmp.pseudo_random_boundaries, static_argnums=(0, 1))
    return fmp.pseudo_random_boundaries


_BOUNDARIES = []


def all_pseudo_random_sequences(size, out):
    """Every sequence `pseudo_random_boundaries` gives, one per offset."""
    if not _BOUNDARIES:
        _BOUNDARIES.append(_compiled_boundaries())
    offsets = np.arange(size, dtype="int32")[:, None]
    return ops.convert_to_numpy(_BOUNDARIES[0](size, out, offsets))


def ratios_of(layer):
    ratio = layer.pooling_ratio
    return tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio, ratio)


def training_runner(layer, input_shape, upstream, jit):
    """`run(x)`: `layer(x, training=True)` and the gradient of
    `sum(y * upstream)`, as NumPy; compiled once, fresh draws per call."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return y, tape.gradient(y, x, output_gradients=upstream)

        if jit:
            step = tf.function(step, jit_compile=True)

        def run(x):
            y, dx = step(tf.constant(x))
            return y.numpy(), dx.numpy()

        return run
    if backend == "jax":
        import jax

        layer.build(input_shape)
        trainable = [v.value for v in layer.trainable_variables]
        state = [[v.value for v in layer.non_trainable_variables]]

        def step(x, non_trainable):
            def call(x):
                return layer.stateless_call(
                    trainable, non_trainable, x, training=True
                )

            (y, updated), pullback = jax.vjp(call, x)
            zeros = jax.tree_util.tree_map(jax.numpy.zeros_like, updated)
            return y, pullback((upstream, zeros))[0], updated

        if jit:
            step = jax.jit(step)

        def run(x):
            y, dx, state[0] = step(x, state[0])
            return np.asarray(y), np.asarray(dx)

        return run
    pytest.skip(f"no gradient helper for the {backend} backend")


# ---------------------------------------------------------------- harness


def test_harness_channels_last_asymmetric_odd():
    run_layer_checks(
        FractionalMaxPooling2D,
        {"pooling_ratio": (1.5, 1.3), "seed": 3},
        (2, 11, 14, 3),
        expected_output_shape=(2, 7, 10, 3),
    )


def test_harness_channels_first_disjoint_random():
    run_layer_checks(
        FractionalMaxPooling2D,
        {
            "pooling_ratio": 1.9,
            "pseudo_random": False,
            "overlapping": False,
            "seed": 5,
            "data_format": "channels_first",
        },
        (2, 3, 9, 7),
        expected_output_shape=(2, 3, 4, 3),
    )


# ------------------------------------------------------- sizes and sequences


@requires_tensorflow
def test_output_size_matches_tensorflow():
    import tensorflow as tf

    for ratio in [1.01, 1.1, 1.25, 2**0.5, 1.5, 1.9, 2.0]:
        for rows, cols in [(2, 3), (5, 7), (11, 10), (17, 32), (33, 9)]:
            x = np.zeros((1, rows, cols, 1), "float32")
            expected = tf.nn.fractional_max_pool(
                x, [1.0, ratio, ratio, 1.0], pseudo_random=True
            )[0].shape
            layer = FractionalMaxPooling2D(ratio)
            assert layer.compute_output_shape(x.shape) == tuple(expected)
            assert tuple(layer(x).shape) == tuple(expected)
            assert tuple(layer(x, training=True).shape) == tuple(expected)


def check_sequences(sequences, size, out):
    for b in sequences:
        steps = np.diff(b)
        assert b[0] == 0 and b[-1] == size and len(b) == out + 1, b
        assert set(steps.tolist()) <= {size // out, -(-size // out)}, b
        if size <= 2 * out:
            assert set(steps.tolist()) <= {1, 2}, (size, b)
        # size % out increments are the longer ones.
        assert np.sum(steps == size // out + 1) == size % out, b


def test_sequences_have_increments_one_or_two_and_cover_the_input():
    generator = keras.random.SeedGenerator(0)
    for size in [2, 3, 5, 8, 13, 32, 37]:
        for ratio in [1.05, 1.3, 2**0.5, 1.7, 2.0]:
            out = fmp.pooled_size(size, ratio)
            pseudo_random = all_pseudo_random_sequences(size, out)
            check_sequences(pseudo_random, size, out)
            # Inference's sequence (v = 0) ends with the longer increment,
            # so the last region, clipped at the edge, keeps it.
            assert np.diff(pseudo_random[0])[-1] == -(-size // out)
    for size, out in [(2, 1), (5, 2), (13, 9), (37, 26)]:
        random = fmp.random_boundaries(size, out, generator)
        check_sequences([ops.convert_to_numpy(random)], size, out)


def test_pseudo_random_sequence_is_the_papers_formula():
    # a_i = ceil(alpha (i + u)) - ceil(alpha u), u = (v + 1/2) / size.
    for size, out in [(32, 22), (13, 9), (9, 5), (5, 2)]:
        alpha = size / out
        expected = [
            [
                int(np.ceil(alpha * (i + (v + 0.5) / size) - 1e-9))
                - int(np.ceil(alpha * (v + 0.5) / size - 1e-9))
                for i in range(out + 1)
            ]
            for v in range(size)
        ]
        np.testing.assert_array_equal(
            all_pseudo_random_sequences(size, out), expected
        )


def test_random_arrangements_are_spread_uniformly():
    # Each position is a 2-step with probability extra / out: 4 sigma bound.
    size, out, draws = 32, 22, 300
    generator = keras.random.SeedGenerator(1)
    steps = np.stack(
        [
            np.diff(
                ops.convert_to_numpy(
                    fmp.random_boundaries(size, out, generator)
                )
            )
            for _ in range(draws)
        ]
    )
    p = (size - out) / out
    frequency = (steps == 2).mean(axis=0)
    bound = 4 * np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(frequency - p) < bound), (frequency, p, bound)


# --------------------------------------------------- values and gradients


@requires_tensorflow
@pytest.mark.parametrize("overlapping", [True, False])
def test_numpy_reference_is_tensorflows_kernel_values_and_tied_gradients(
    overlapping,
):
    # The reference the layer is tested against below: TensorFlow's kernel
    # gives the same values and sends each gradient to the first maximum of
    # its region in row-major order, on TensorFlow's own sequences.
    import tensorflow as tf

    rng = np.random.default_rng(7)
    for trial, (rows, cols) in enumerate([(13, 10), (9, 17), (7, 5)]):
        ratios = rng.uniform(1.05, 2.0, size=2)
        x = tied_input((2, rows, cols, 3), trial)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y_tf, row_seq, col_seq = tf.nn.fractional_max_pool(
                xt,
                [1.0, ratios[0], ratios[1], 1.0],
                pseudo_random=bool(trial % 2),
                overlapping=overlapping,
                seed=trial + 1,
            )
        upstream = rng.normal(size=y_tf.shape).astype("float32")
        dx_tf = tape.gradient(y_tf, xt, output_gradients=upstream)
        y_np, argmax = numpy_pool(
            x, row_seq.numpy(), col_seq.numpy(), overlapping
        )
        np.testing.assert_array_equal(y_tf.numpy(), y_np)
        np.testing.assert_allclose(
            dx_tf.numpy(),
            numpy_gradient(x, argmax, upstream),
            rtol=1e-6,
            atol=1e-6,
        )


TRAINING_CASES = [
    ({"pooling_ratio": 2**0.5}, False),
    ({"pooling_ratio": (1.3, 1.8), "pseudo_random": False}, False),
    ({"pooling_ratio": 1.6, "overlapping": False}, False),
    ({"pooling_ratio": (1.9, 1.2), "data_format": "channels_first"}, False),
    ({"pooling_ratio": (2.0, 1.5), "pseudo_random": False}, False),
    ({"pooling_ratio": (1.4, 1.7)}, True),
    (
        {
            "pooling_ratio": 1.5,
            "pseudo_random": False,
            "overlapping": False,
            "data_format": "channels_first",
        },
        True,
    ),
]


@pytest.mark.parametrize("kwargs, jit", TRAINING_CASES)
def test_training_call_is_the_region_max_with_first_argmax_gradient(
    kwargs, jit
):
    # Values and tied gradients equal the NumPy reference on the sequences
    # the call drew (read from a probe sample in the same batch), eager and
    # compiled, and the pseudo-random sequences are the paper's formula.
    data_format = kwargs.get("data_format", "channels_last")
    rows, cols = 11, 8
    x = from_nhwc(tied_input((3, rows, cols, 4), 11), data_format)
    x = with_probe(x, data_format)
    layer = FractionalMaxPooling2D(seed=100, **kwargs)
    out_rows, out_cols = (
        fmp.pooled_size(rows, ratios_of(layer)[0]),
        fmp.pooled_size(cols, ratios_of(layer)[1]),
    )
    out_shape = layer.compute_output_shape(x.shape)
    upstream = np.random.default_rng(0).normal(size=out_shape)
    upstream = upstream.astype("float32")
    run = training_runner(layer, x.shape, upstream, jit)
    drawn = set()
    for _ in range(3):
        y, dx = run(x)
        y, dx = to_nhwc(y, data_format), to_nhwc(dx, data_format)
        row_b, col_b = drawn_boundaries(y, rows, cols, layer.overlapping)
        drawn.add((tuple(row_b), tuple(col_b)))
        check_sequences([row_b], rows, out_rows)
        check_sequences([col_b], cols, out_cols)
        if layer.pseudo_random:
            assert (
                row_b.tolist()
                in all_pseudo_random_sequences(rows, out_rows).tolist()
            )
            assert (
                col_b.tolist()
                in all_pseudo_random_sequences(cols, out_cols).tolist()
            )
        y_np, argmax = numpy_pool(
            to_nhwc(x, data_format), row_b, col_b, layer.overlapping
        )
        np.testing.assert_array_equal(y, y_np)
        dx_np = numpy_gradient(
            to_nhwc(x, data_format), argmax, to_nhwc(upstream, data_format)
        )
        np.testing.assert_allclose(dx, dx_np, rtol=1e-6, atol=1e-6)
    assert len(drawn) > 1, "the compiled call does not draw fresh regions"


@pytest.mark.parametrize("jit", [False, True])
def test_nan_in_a_region_gives_nan_in_training_and_inference(jit):
    # NaN anywhere in a region, first or not: the region's output is NaN,
    # as NumPy's max (TensorFlow's XLA max(1, nan) is 1; its max pooling
    # skips NaN).
    rows, cols = 9, 8
    x = np.random.default_rng(3).normal(size=(2, rows, cols, 2))
    x = x.astype("float32")
    x[0, 4, 5, 0] = np.nan
    x[1, 0, 0, 1] = np.nan
    x[1, 8, 7, 0] = np.nan
    x = with_probe(x, "channels_last")
    layer = FractionalMaxPooling2D(1.5, seed=4)
    upstream = np.ones(layer.compute_output_shape(x.shape), "float32")
    run = training_runner(layer, x.shape, upstream, jit)
    for _ in range(2):
        y, _ = run(x)
        row_b, col_b = drawn_boundaries(y, rows, cols, True)
        expected, _ = numpy_pool(x, row_b, col_b, True)
        assert np.isnan(expected).sum() >= 3
        np.testing.assert_array_equal(y, expected)
    if jit and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        infer = tf.function(lambda x: layer(x), jit_compile=True)
        inferred = infer(tf.constant(x)).numpy()
    else:
        inferred = ops.convert_to_numpy(layer(x))
    row_b = ops.convert_to_numpy(fmp.pseudo_random_boundaries(rows, 6, 0))
    col_b = ops.convert_to_numpy(fmp.pseudo_random_boundaries(cols, 5, 0))
    np.testing.assert_array_equal(
        inferred, numpy_pool(x, row_b, col_b, True)[0]
    )


@requires_tensorflow
def test_flat_gather_indices_are_int64_when_the_batch_size_is_unknown():
    import tensorflow as tf

    layer = FractionalMaxPooling2D(seed=0)

    def flat_gather_dtypes(shape):
        function = tf.function(
            lambda x: layer(x, training=True),
            input_signature=[tf.TensorSpec(shape)],
        )
        graph = function.get_concrete_function().graph
        return {
            op.inputs[1].dtype.name
            for op in graph.get_operations()
            if op.type == "GatherV2" and op.inputs[0].shape.rank == 1
        }

    assert flat_gather_dtypes((None, 16, 16, 2)) == {"int64"}
    assert flat_gather_dtypes((4, 16, 16, 2)) == {"int32"}


def test_inference_uses_the_pseudo_random_sequence_at_offset_zero():
    x = np.random.default_rng(2).normal(size=(2, 13, 9, 2)).astype("float32")
    for pseudo_random in (True, False):
        layer = FractionalMaxPooling2D(2**0.5, pseudo_random=pseudo_random)
        row_b = fmp.pseudo_random_boundaries(13, 9, 0)
        col_b = fmp.pseudo_random_boundaries(9, 6, 0)
        y_np, _ = numpy_pool(
            x, ops.convert_to_numpy(row_b), ops.convert_to_numpy(col_b), True
        )
        np.testing.assert_array_equal(ops.convert_to_numpy(layer(x)), y_np)


def test_training_draws_fresh_regions_and_seeds_reproduce():
    x = np.random.default_rng(3).normal(size=(2, 15, 12, 2)).astype("float32")

    def draws(seed):
        layer = FractionalMaxPooling2D(seed=seed)
        return [ops.convert_to_numpy(layer(x, training=True)) for _ in range(6)]

    first, again, other = draws(4), draws(4), draws(5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in first}) > 1, "no fresh draws"
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.slow
def test_mixed_precision_float16_training_and_gradient():
    x = np.random.default_rng(5).normal(size=(2, 12, 11, 3))
    layer = FractionalMaxPooling2D(seed=1, dtype="mixed_float16")
    reference = FractionalMaxPooling2D(seed=1)
    x16 = x.astype("float16")
    y16 = layer(x16, training=True)
    assert keras.backend.standardize_dtype(y16.dtype) == "float16"
    y32 = reference(x16.astype("float32"), training=True)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(y16).astype("float32"), ops.convert_to_numpy(y32)
    )
    model = keras.Sequential(
        [
            keras.Input((12, 11, 3)),
            keras.layers.Conv2D(4, 3, dtype="mixed_float16"),
            FractionalMaxPooling2D(seed=2, dtype="mixed_float16"),
            keras.layers.Flatten(),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )
    model.compile("sgd", "mse", jit_compile=True)
    history = model.fit(x, np.ones((2, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.slow
def test_fit_trains_the_layers_below_through_the_pooling_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 11, 9, 1)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((11, 9, 1)),
            keras.layers.Conv2D(3, 3, padding="same"),
            FractionalMaxPooling2D((1.5, 1.3), seed=0),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    before = ops.convert_to_numpy(model.layers[0].kernel)
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = ops.convert_to_numpy(model.layers[0].kernel)
    assert not np.allclose(before, after), "no gradient reached the conv"


@requires_tensorflow
def test_unknown_spatial_sizes():
    import tensorflow as tf

    layer = FractionalMaxPooling2D(seed=0)
    signature = [tf.TensorSpec((None, None, None, 2))]
    infer = tf.function(lambda x: layer(x), input_signature=signature)
    train = tf.function(
        lambda x: layer(x, training=True), input_signature=signature
    )
    inputs = keras.Input((None, None, 2))
    assert tuple(layer(inputs).shape) == (None, None, None, 2)
    for rows, cols in [(9, 12), (16, 7)]:
        x = np.random.default_rng(rows).normal(size=(2, rows, cols, 2))
        x = x.astype("float32")
        expected = ops.convert_to_numpy(FractionalMaxPooling2D()(x))
        np.testing.assert_array_equal(infer(x).numpy(), expected)
        assert train(x).shape == expected.shape


# -------------------------------------------------------- test-time averaging


def averaging_reference(x, passes, ratio):
    """NumPy mean over the documented lattice of pseudo-random passes."""
    _, rows, cols, _ = x.shape
    out_rows, out_cols = (
        fmp.pooled_size(rows, ratio),
        fmp.pooled_size(cols, ratio),
    )
    multiplier = lattice_multiplier(passes)
    outputs = []
    for g in range(passes):
        v_rows = (g * rows) // passes
        v_cols = (((multiplier * g) % passes) * cols) // passes
        row_b = fmp.pseudo_random_boundaries(rows, out_rows, v_rows)
        col_b = fmp.pseudo_random_boundaries(cols, out_cols, v_cols)
        outputs.append(
            numpy_pool(
                x,
                ops.convert_to_numpy(row_b),
                ops.convert_to_numpy(col_b),
                True,
            )[0]
        )
    return np.mean(outputs, axis=0), outputs


def lattice_multiplier(passes):
    """The documented `a`: coprime with `N`, nearest `N / phi` (the
    smaller on a tie)."""
    target = passes * 2 / (1 + 5**0.5)
    coprime = [a for a in range(1, passes + 1) if np.gcd(a, passes) == 1]
    return min(coprime, key=lambda a: (abs(a - target), a))


@pytest.mark.slow
def test_averaging_equals_the_numpy_mean_over_the_lattice_of_poolings():
    passes = 12
    x = np.random.default_rng(8).normal(size=(3, 13, 10, 2)).astype("float32")
    net = keras.Sequential(
        [keras.Input((13, 10, 2)), FractionalMaxPooling2D(1.5, seed=0)]
    )
    averaged = FractionalPoolingAverage(net, num_passes=passes)
    expected, outputs = averaging_reference(x, passes, 1.5)
    assert len({p.tobytes() for p in outputs}) > passes // 2, "not diverse"
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(averaged(x)), expected, rtol=1e-6, atol=1e-6
    )
    # The wrapped model alone is unchanged: one deterministic pass.
    single = FractionalMaxPooling2D(1.5)(x)
    np.testing.assert_array_equal(net.predict(x, verbose=0), single)
    assert net.layers[0].num_passes == 1
    # Pass 0 of the lattice is the deterministic inference pass.
    np.testing.assert_array_equal(
        FractionalPoolingAverage(net, 1).predict(x, verbose=0), single
    )


def test_two_averagings_of_one_nested_model_in_one_graph():
    # Each wrapper configures its own copies of the pooling layers: two of
    # them (3 and 5 passes) in one functional graph, around a nested model.
    x = np.random.default_rng(9).normal(size=(2, 13, 10, 2)).astype("float32")
    inner = keras.Sequential(
        [keras.Input((13, 10, 2)), FractionalMaxPooling2D(1.5, seed=0)]
    )
    inputs = keras.Input((13, 10, 2))
    net = keras.Model(inputs, inner(keras.layers.Identity()(inputs)))
    three = FractionalPoolingAverage(net, 3)
    five = FractionalPoolingAverage(net, 5)
    inputs = keras.Input((13, 10, 2))
    both = keras.Model(inputs, [three(inputs), five(inputs)])
    got = both.predict(x, verbose=0)
    for output, passes in zip(got, (3, 5), strict=True):
        expected, _ = averaging_reference(x, passes, 1.5)
        np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)
    # The wrapper's state is the model's: nothing more is saved.
    assert [v.path for v in three.weights] == [v.path for v in net.weights]


class _Pooled(keras.Model):
    def __init__(self):
        super().__init__()
        self.pool = FractionalMaxPooling2D(1.5)

    def call(self, x):
        return self.pool(x)


class _PoolingBlock(keras.layers.Layer):
    """A custom layer holding the pooling in a public attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pool = FractionalMaxPooling2D(1.5)

    def call(self, x):
        return self.pool(x)

    def compute_output_shape(self, input_shape):
        return self.pool.compute_output_shape(input_shape)


def test_averaging_refuses_pooling_it_cannot_reach():
    with pytest.raises(
        ValueError,
        match=r"`model`\. Expected a Functional or Sequential keras\.Model",
    ):
        FractionalPoolingAverage(_Pooled(), 4)
    net = keras.Sequential([keras.Input((8, 8, 1)), _PoolingBlock()])
    with pytest.raises(
        ValueError, match=r"not inside a custom layer \(found: \['"
    ):
        FractionalPoolingAverage(net, 4)


@pytest.mark.slow
@requires_tensorflow
def test_averaging_model_saves_exports_and_serves_predict():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 12, 12, 1)).astype("float32")
    net = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            FractionalMaxPooling2D(seed=1),
            keras.layers.Dropout(0.5, seed=1),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    averaged = FractionalPoolingAverage(net, num_passes=4)
    averaged.compile(
        "sgd", "sparse_categorical_crossentropy", jit_compile=False
    )
    averaged.fit(x, rng.integers(0, 3, 5), epochs=1, verbose=0)
    expected = averaged.predict(x, verbose=0)
    np.testing.assert_array_equal(expected, averaged.predict(x, verbose=0))
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "averaged.keras")
        averaged.save(path)
        loaded = keras.models.load_model(path)
        assert loaded.num_passes == 4
        np.testing.assert_allclose(
            loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
        )
        averaged.export(os.path.join(tmp, "export"), verbose=False)
        reloaded = tf.saved_model.load(os.path.join(tmp, "export"))
        served = reloaded.serve(x)
        np.testing.assert_allclose(served.numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_pooling_ratio():
    for ratio in [
        1.0,
        2.5,
        0.5,
        (1.5,),
        (1.5, 1.5, 1.5),
        "1.5",
        True,
        (1.5, 3),
    ]:
        with pytest.raises(
            ValueError,
            match=r"argument `pooling_ratio`\. Expected a float in \(1, 2\], or "
            r"a pair of such floats \(rows, cols\)\. Received: pooling_ratio=",
        ):
            FractionalMaxPooling2D(ratio)
    assert FractionalMaxPooling2D(np.float32(1.5)).pooling_ratio == 1.5


def test_bad_data_format():
    with pytest.raises(
        ValueError,
        match=r"argument `data_format`\. Expected one of 'channels_last', "
        r"'channels_first'\. Received: data_format='NHWC'",
    ):
        FractionalMaxPooling2D(data_format="NHWC")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"pseudo_random": "yes"},
            (
                r"`pseudo_random`\. Expected a bool\. "
                r"Received: pseudo_random='yes'"
            ),
        ),
        (
            {"overlapping": 1},
            r"`overlapping`\. Expected a bool\. Received: overlapping=1",
        ),
        (
            {"seed": 1.5},
            r"`seed`\. Expected an int >= 0 or None\. Received: seed=1\.5",
        ),
    ],
)
def test_bad_flags_and_seed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FractionalMaxPooling2D(**kwargs)


@pytest.mark.parametrize(
    "shape, data_format",
    [((None, 1, 8, 3), "channels_last"), ((None, 3, 8, 1), "channels_first")],
)
def test_input_too_small(shape, data_format):
    layer = FractionalMaxPooling2D(1.5, data_format=data_format)
    with pytest.raises(
        ValueError,
        match=r"argument `inputs`\. Expected rows and columns of at least 2 "
        r"each .* Received: inputs\.shape=",
    ):
        layer.build(shape)


def test_bad_averaging_arguments():
    net = keras.Sequential([keras.Input((4, 4, 1)), FractionalMaxPooling2D()])
    with pytest.raises(
        ValueError,
        match=r"`num_passes`\. Expected an int >= 1\. Received: num_passes=0",
    ):
        FractionalPoolingAverage(net, 0)
    assert FractionalPoolingAverage(net, np.int64(3)).num_passes == 3
    with pytest.raises(
        ValueError,
        match=r"`model`\. Expected a keras\.Model\. Received: model=",
    ):
        FractionalPoolingAverage(FractionalMaxPooling2D(), 2)
