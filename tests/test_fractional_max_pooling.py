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


def reference_draws(layer, rows, cols, seed_generator):
    """The boundaries a fresh layer draws at its first training call."""
    out_rows = fmp.pooled_size(rows, layer._ratios[0])
    out_cols = fmp.pooled_size(cols, layer._ratios[1])
    if layer.pseudo_random:
        v_rows = keras.random.randint(
            (), 0, rows, dtype="int32", seed=seed_generator
        )
        v_cols = keras.random.randint(
            (), 0, cols, dtype="int32", seed=seed_generator
        )
        return (
            fmp.pseudo_random_boundaries(rows, out_rows, v_rows),
            fmp.pseudo_random_boundaries(cols, out_cols, v_cols),
        )
    return (
        fmp.random_boundaries(rows, out_rows, seed_generator),
        fmp.random_boundaries(cols, out_cols, seed_generator),
    )


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
@pytest.mark.parametrize("ratio", [1.01, 1.1, 1.25, 2**0.5, 1.5, 1.9, 2.0])
def test_output_size_matches_tensorflow(ratio):
    import tensorflow as tf

    for rows, cols in [(2, 3), (5, 7), (11, 10), (17, 32), (33, 9)]:
        x = np.zeros((1, rows, cols, 1), "float32")
        expected = tf.nn.fractional_max_pool(
            x, [1.0, ratio, ratio, 1.0], pseudo_random=True, overlapping=True
        )[0].shape
        layer = FractionalMaxPooling2D(ratio)
        assert layer.compute_output_shape(x.shape) == tuple(expected)
        assert tuple(layer(x).shape) == tuple(expected)
        assert tuple(layer(x, training=True).shape) == tuple(expected)


@pytest.mark.parametrize("pseudo_random", [True, False])
def test_sequences_have_increments_one_or_two_and_cover_the_input(
    pseudo_random,
):
    generator = keras.random.SeedGenerator(0)
    for size in [2, 3, 5, 8, 13, 32, 37]:
        for ratio in [1.05, 1.3, 2**0.5, 1.7, 2.0]:
            out = fmp.pooled_size(size, ratio)
            for offset in range(size) if pseudo_random else range(8):
                if pseudo_random:
                    b = fmp.pseudo_random_boundaries(size, out, offset)
                else:
                    b = fmp.random_boundaries(size, out, generator)
                b = ops.convert_to_numpy(b)
                steps = np.diff(b)
                assert b[0] == 0 and b[-1] == size and len(b) == out + 1, b
                allowed = {size // out, -(-size // out)}
                assert set(steps.tolist()) <= allowed, (size, ratio, b)
                if size <= 2 * out:
                    assert set(steps.tolist()) <= {1, 2}, (size, ratio, b)
                # size % out increments are the longer ones.
                assert np.sum(steps == size // out + 1) == size % out


def test_pseudo_random_sequence_is_the_papers_formula():
    # a_i = ceil(alpha (i + u)) - ceil(alpha u), u = (v + 1/2) / size.
    for size, out in [(32, 22), (13, 9), (9, 5), (5, 2)]:
        alpha = size / out
        for v in range(size):
            u = (v + 0.5) / size
            expected = [
                int(np.ceil(alpha * (i + u) - 1e-9))
                - int(np.ceil(alpha * u - 1e-9))
                for i in range(out + 1)
            ]
            got = ops.convert_to_numpy(
                fmp.pseudo_random_boundaries(size, out, v)
            )
            np.testing.assert_array_equal(got, expected)


def test_inference_sequence_ends_with_the_longer_increment():
    for size in range(2, 60):
        for ratio in (1.05, 1.3, 2**0.5, 1.6, 1.9, 2.0):
            out = fmp.pooled_size(size, ratio)
            b = ops.convert_to_numpy(fmp.pseudo_random_boundaries(size, out, 0))
            assert b[-1] - b[-2] == -(-size // out), (size, ratio, b)


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
@pytest.mark.parametrize("jit", [False, True])
def test_pooling_matches_tensorflow_kernel_values_and_tied_gradients(
    overlapping, jit
):
    import tensorflow as tf

    rng = np.random.default_rng(7)
    for trial, (rows, cols) in enumerate([(13, 10), (9, 17), (7, 5)]):
        ratios = rng.uniform(1.05, 2.0, size=2)
        x = tied_input((2, rows, cols, 3), trial)
        pool = [1.0, ratios[0], ratios[1], 1.0]
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y_tf, row_seq, col_seq = tf.nn.fractional_max_pool(
                xt,
                pool,
                pseudo_random=bool(trial % 2),
                overlapping=overlapping,
                seed=trial + 1,
            )
        upstream = rng.normal(size=y_tf.shape).astype("float32")
        dx_tf = tape.gradient(y_tf, xt, output_gradients=upstream)
        row_seq = row_seq.numpy().astype("int32")
        col_seq = col_seq.numpy().astype("int32")
        positions = [
            fmp._slot_positions(
                tf.constant(seq),
                size,
                overlapping,
                fmp._num_slots(size, len(seq) - 1, overlapping),
            )
            for seq, size in ((row_seq, rows), (col_seq, cols))
        ]

        @tf.function(jit_compile=jit)
        def run(xt, positions=positions, upstream=upstream):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = fmp._region_max_with_argmax_gradient(
                    xt, positions[0], positions[1], 1, 2
                )
            values = fmp._region_max(xt, positions[0], positions[1], 1, 2)
            return y, values, tape.gradient(y, xt, output_gradients=upstream)

        y, values, dx = run(xt)
        y_np, argmax = numpy_pool(x, row_seq, col_seq, overlapping)
        np.testing.assert_array_equal(y.numpy(), y_tf.numpy())
        np.testing.assert_array_equal(values.numpy(), y_np)
        np.testing.assert_array_equal(y.numpy(), y_np)
        dx_np = numpy_gradient(x, argmax, upstream)
        np.testing.assert_allclose(dx.numpy(), dx_np, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx_tf.numpy(), dx_np, rtol=1e-6, atol=1e-6)


def outputs_and_input_gradient(fn, x, upstream, jit):
    """`fn(x)` and the gradient of `sum(fn(x) * upstream)`, on TF or JAX."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x, output_gradients=upstream)

        if jit:
            run = tf.function(run, jit_compile=True)
        y, dx = run(tf.constant(x))
        return y.numpy(), dx.numpy()
    if backend == "jax":
        import jax

        def run(x):
            y, pullback = jax.vjp(fn, x)
            return y, pullback(upstream)[0]

        if jit:
            run = jax.jit(run)
        y, dx = run(x)
        return np.asarray(y), np.asarray(dx)
    pytest.skip(f"no gradient helper for the {backend} backend")


@pytest.mark.parametrize("overlapping", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_tied_gradients_match_numpy_eager_and_jit(overlapping, jit):
    rng = np.random.default_rng(21)
    for trial, (rows, cols, ratios) in enumerate(
        [(12, 9, (1.5, 1.3)), (7, 16, (1.9, 1.414)), (5, 5, (2.0, 1.2))]
    ):
        x = tied_input((2, rows, cols, 3), trial)
        bounds = []
        for size, ratio in ((rows, ratios[0]), (cols, ratios[1])):
            out = fmp.pooled_size(size, ratio)
            offset = int(rng.integers(0, size))
            bounds.append(
                ops.convert_to_numpy(
                    fmp.pseudo_random_boundaries(size, out, offset)
                )
            )
        positions = [
            fmp._slot_positions(
                ops.convert_to_tensor(b),
                size,
                overlapping,
                fmp._num_slots(size, len(b) - 1, overlapping),
            )
            for b, size in zip(bounds, (rows, cols), strict=True)
        ]
        y_np, argmax = numpy_pool(x, bounds[0], bounds[1], overlapping)
        upstream = rng.normal(size=y_np.shape).astype("float32")
        y, dx = outputs_and_input_gradient(
            lambda x, p=positions: fmp._region_max_with_argmax_gradient(
                x, p[0], p[1], 1, 2
            ),
            x,
            upstream,
            jit,
        )
        np.testing.assert_array_equal(y, y_np)
        np.testing.assert_allclose(
            dx, numpy_gradient(x, argmax, upstream), rtol=1e-6, atol=1e-6
        )


@requires_tensorflow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"pooling_ratio": 2**0.5},
        {"pooling_ratio": (1.3, 1.8), "pseudo_random": False},
        {"pooling_ratio": 1.6, "overlapping": False},
        {"pooling_ratio": (1.9, 1.2), "data_format": "channels_first"},
    ],
)
def test_training_call_equals_numpy_reference_with_the_same_sequences(kwargs):
    import tensorflow as tf

    data_format = kwargs.get("data_format", "channels_last")
    shape = (3, 11, 8, 4) if data_format == "channels_last" else (3, 4, 11, 8)
    x = tied_input(shape, 11)
    for step in range(3):
        layer = FractionalMaxPooling2D(seed=100 + step, **kwargs)
        generator = keras.random.SeedGenerator(100 + step)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
        upstream = np.random.default_rng(step).normal(size=y.shape)
        upstream = upstream.astype("float32")
        dx = tape.gradient(y, xt, output_gradients=upstream).numpy()
        row_b, col_b = reference_draws(layer, 11, 8, generator)
        y_np, argmax = numpy_pool(
            to_nhwc(x, data_format),
            ops.convert_to_numpy(row_b),
            ops.convert_to_numpy(col_b),
            layer.overlapping,
        )
        np.testing.assert_array_equal(to_nhwc(y.numpy(), data_format), y_np)
        dx_np = numpy_gradient(
            to_nhwc(x, data_format), argmax, to_nhwc(upstream, data_format)
        )
        np.testing.assert_allclose(
            dx, from_nhwc(dx_np, data_format), rtol=1e-6, atol=1e-6
        )


@requires_tensorflow
def test_jit_compiled_training_call_equals_numpy_reference():
    import tensorflow as tf

    x = tied_input((2, 10, 13, 3), 4)
    layer = FractionalMaxPooling2D((1.4, 1.7), seed=9)
    generator = keras.random.SeedGenerator(9)
    upstream = np.random.default_rng(0).normal(size=(2, 7, 7, 3))
    upstream = upstream.astype("float32")

    @tf.function(jit_compile=True)
    def run(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
        row_b, col_b = reference_draws(layer, 10, 13, generator)
        return y, tape.gradient(y, xt, output_gradients=upstream), row_b, col_b

    y, dx, row_b, col_b = run(tf.constant(x))
    y_np, argmax = numpy_pool(x, row_b.numpy(), col_b.numpy(), True)
    np.testing.assert_array_equal(y.numpy(), y_np)
    np.testing.assert_allclose(
        dx.numpy(), numpy_gradient(x, argmax, upstream), rtol=1e-6, atol=1e-6
    )


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
    multiplier = fmp._lattice_multiplier(passes)
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


def test_lattice_multiplier_is_coprime():
    assert fmp._lattice_multiplier(1) == 1
    assert fmp._lattice_multiplier(12) == 7
    for n in range(1, 40):
        assert np.gcd(fmp._lattice_multiplier(n), n) == 1


def test_averaging_equals_the_numpy_mean_over_the_lattice_of_poolings():
    x = np.random.default_rng(8).normal(size=(3, 13, 10, 2)).astype("float32")
    net = keras.Sequential(
        [keras.Input((13, 10, 2)), FractionalMaxPooling2D(1.5, seed=0)]
    )
    averaged = FractionalPoolingAverage(net, num_passes=12)
    expected, passes = averaging_reference(x, 12, 1.5)
    assert len({p.tobytes() for p in passes}) > 6, "passes are not diverse"
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(averaged(x)), expected, rtol=1e-6, atol=1e-6
    )
    # The wrapped model alone is unchanged: one deterministic pass.
    single = FractionalMaxPooling2D(1.5)(x)
    np.testing.assert_array_equal(net.predict(x, verbose=0), single)
    # Pass 0 of the lattice is the deterministic inference pass.
    np.testing.assert_array_equal(
        FractionalPoolingAverage(net, 1).predict(x, verbose=0), single
    )


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


@pytest.mark.parametrize(
    "ratio", [1.0, 2.5, 0.5, (1.5,), (1.5, 1.5, 1.5), "1.5", True, (1.5, 3.0)]
)
def test_bad_pooling_ratio(ratio):
    with pytest.raises(
        ValueError,
        match=r"argument `pooling_ratio`\. Expected a float in \(1, 2\], or a "
        r"pair of such floats \(rows, cols\)\. Received: pooling_ratio=",
    ):
        FractionalMaxPooling2D(ratio)


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
            r"`pseudo_random`\. Expected a bool\. "
            r"Received: pseudo_random='yes'",
        ),
        (
            {"overlapping": 1},
            r"`overlapping`\. Expected a bool\. Received: overlapping=1",
        ),
        (
            {"seed": 1.5},
            r"`seed`\. Expected an int or None\. Received: seed=1\.5",
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
    with pytest.raises(
        ValueError,
        match=r"`model`\. Expected a keras\.Model\. Received: model=",
    ):
        FractionalPoolingAverage(FractionalMaxPooling2D(), 2)
