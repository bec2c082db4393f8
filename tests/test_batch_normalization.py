"""Tests for DebiasedBatchNormalization."""

import inspect

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import DebiasedBatchNormalization


def numpy(x):
    return ops.convert_to_numpy(x)


KERAS_HAS_RENORM = (
    "renorm"
    in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
)


def masked_statistics(x, keep, axis):
    """Per-channel mean, biased and unbiased variance of the kept values."""
    x = np.asarray(x, np.float64)
    channel = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != channel)
    weights = np.broadcast_to(keep, x.shape).astype(np.float64)
    count = weights.sum(axis=axes)
    shape = [1] * x.ndim
    shape[channel] = -1
    mean = (weights * x).sum(axis=axes) / count
    squares = (weights * (x - mean.reshape(shape)) ** 2).sum(axis=axes)
    return mean, squares / count, squares / (count - 1), shape


# ---------------------------------------------------------------- harness
# Training normalizes deterministically with the batch statistics, so two
# training calls on the same batch agree: `training_differs=False`.


def test_harness_sequence_features_last():
    run_layer_checks(
        DebiasedBatchNormalization,
        {"momentum": 0.9},
        (4, 5, 3),
        expected_output_shape=(4, 5, 3),
        training_differs=False,
    )


def test_harness_channels_first_cumulative_renorm():
    run_layer_checks(
        DebiasedBatchNormalization,
        {
            "axis": 1,
            "moving_statistics": "cumulative",
            "epsilon": 1e-5,
            "renorm": True,
        },
        (3, 4, 5, 7),
        expected_output_shape=(3, 4, 5, 7),
        training_differs=False,
    )


# ----------------------------------------------- Keras parity and debiasing


@pytest.mark.parametrize(
    "shape, axis",
    [((6, 5), -1), ((3, 4, 5, 2), -1), ((2, 3, 4, 5), 1), ((1, 3, 3, 2), -1)],
)
def test_training_matches_keras_and_variance_is_debiased(shape, axis):
    rng = np.random.default_rng(1)
    ours = DebiasedBatchNormalization(axis=axis, momentum=0.8)
    keras_bn = keras.layers.BatchNormalization(axis=axis, momentum=0.8)
    reduce = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    m = int(np.prod([shape[a] for a in reduce]))
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=shape).astype("float32")
        np.testing.assert_array_equal(
            numpy(ours(x, training=True)), numpy(keras_bn(x, training=True))
        )
    np.testing.assert_array_equal(
        numpy(ours.moving_mean), numpy(keras_bn.moving_mean)
    )
    # Both start at 1 and follow the same recursion on scaled inputs.
    ours_var = numpy(ours.moving_variance)
    keras_var = numpy(keras_bn.moving_variance)
    expected = 0.8**3 + (keras_var - 0.8**3) * m / (m - 1)
    np.testing.assert_allclose(ours_var, expected, rtol=1e-5)
    # Inference is Keras's, given the same weights.
    keras_bn.set_weights(ours.get_weights())
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_array_equal(numpy(ours(x)), numpy(keras_bn(x)))


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_stored_variance_is_unbiased_where_keras_is_not(batch_size):
    # One step with momentum 0 stores one variance estimate per feature; over
    # 4096 independent features of variance 9 the mean estimate has relative
    # standard error sqrt(2 / ((m - 1) F)): the bound is 5 of them.
    features = 4096
    x = np.random.default_rng(batch_size).normal(
        0.0, 3.0, size=(batch_size, features)
    )
    x = x.astype("float32")
    ours = DebiasedBatchNormalization(momentum=0.0)
    keras_bn = keras.layers.BatchNormalization(momentum=0.0)
    ours(x, training=True)
    keras_bn(x, training=True)
    bound = 5 * np.sqrt(2 / (batch_size - 1) / features)
    ratio = numpy(ours.moving_variance).mean() / 9.0
    keras_ratio = numpy(keras_bn.moving_variance).mean() / 9.0
    assert abs(ratio - 1.0) < bound, (
        f"moving variance / true variance = {ratio:.4f}, expected 1 within "
        f"{bound:.4f} (batch {batch_size})"
    )
    keras_expected = (batch_size - 1) / batch_size
    assert abs(keras_ratio - keras_expected) < bound, (
        f"Keras ratio {keras_ratio:.4f}, expected {keras_expected:.4f}"
    )


@pytest.mark.parametrize("shape", [(2, 3), (1, 3, 3, 4), (5, 2, 6)])
def test_one_step_stores_the_unbiased_variance(shape):
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    layer = DebiasedBatchNormalization(momentum=0.0)
    layer(x, training=True)
    flat = x.reshape(-1, shape[-1])
    np.testing.assert_allclose(
        numpy(layer.moving_variance), flat.var(axis=0, ddof=1), rtol=1e-5
    )
    np.testing.assert_allclose(
        numpy(layer.moving_mean), flat.mean(axis=0), rtol=1e-5, atol=1e-6
    )


def test_batch_of_one_value_leaves_the_statistics_unchanged():
    for moving_statistics in ("ema", "cumulative"):
        layer = DebiasedBatchNormalization(
            moving_statistics=moving_statistics,
            beta_initializer=keras.initializers.Constant(0.5),
        )
        x = np.array([[1.0, -2.0, 3.0]], "float32")
        y = numpy(layer(x, training=True))
        np.testing.assert_array_equal(y, np.full((1, 3), 0.5, "float32"))
        np.testing.assert_array_equal(numpy(layer.moving_mean), np.zeros(3))
        np.testing.assert_array_equal(numpy(layer.moving_variance), np.ones(3))
        if moving_statistics == "cumulative":
            assert float(numpy(layer.moving_count)) == 0.0


def test_cumulative_statistics_are_the_papers_population_averages():
    rng = np.random.default_rng(4)
    layer = DebiasedBatchNormalization(moving_statistics="cumulative")
    means, variances = [], []
    for _ in range(7):
        x = rng.normal(1.0, 2.0, size=(5, 3, 4)).astype("float32")
        layer(x, training=True)
        flat = x.reshape(-1, 4)
        means.append(flat.mean(axis=0))
        variances.append(flat.var(axis=0, ddof=1))
    assert float(numpy(layer.moving_count)) == 7.0
    np.testing.assert_allclose(
        numpy(layer.moving_mean), np.mean(means, axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        numpy(layer.moving_variance), np.mean(variances, axis=0), rtol=1e-5
    )
    layer.reset_moving_statistics()
    assert float(numpy(layer.moving_count)) == 0.0
    np.testing.assert_array_equal(numpy(layer.moving_variance), np.ones(4))
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    layer(x, training=True)
    np.testing.assert_allclose(
        numpy(layer.moving_variance),
        x.reshape(-1, 4).var(axis=0, ddof=1),
        rtol=1e-5,
    )


# ------------------------------------------------------------------ masks


def _check_masked_step(layer, x, mask, keep, axis, gamma=1.0, beta=0.0):
    """One training step with `mask`: outputs and statistics vs NumPy."""
    y = numpy(layer(x, training=True, mask=mask))
    mean, biased, unbiased, shape = masked_statistics(x, keep, axis)
    np.testing.assert_allclose(
        numpy(layer.moving_variance), unbiased, rtol=1e-5
    )
    np.testing.assert_allclose(
        numpy(layer.moving_mean), mean, rtol=1e-5, atol=1e-6
    )
    expected = (x - mean.reshape(shape)) / np.sqrt(
        biased.reshape(shape) + layer.epsilon
    )
    kept = np.broadcast_to(keep, x.shape)
    np.testing.assert_allclose(
        y[kept], (gamma * expected + beta)[kept], rtol=1e-4, atol=1e-5
    )
    # Inference normalizes with the stored (unbiased) statistics.
    inferred = (x - mean.reshape(shape)) / np.sqrt(
        unbiased.reshape(shape) + layer.epsilon
    )
    np.testing.assert_allclose(
        numpy(layer(x, training=False)), inferred, rtol=1e-4, atol=1e-5
    )


def test_mask_counts_only_unmasked_positions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    mask = rng.random((3, 6)) < 0.6
    layer = DebiasedBatchNormalization(momentum=0.0)
    _check_masked_step(layer, x, mask, mask[..., None], -1)


@pytest.mark.parametrize(
    "synchronized",
    [False, pytest.param(True, marks=requires_tensorflow)],
)
def test_mask_broadcast_over_more_axes_is_counted_per_value(synchronized):
    # A (B, H, 1) mask on (B, H, W, C) inputs keeps W values per (b, h):
    # counting the mask once gave a variance 4/3 too large here (W = 4).
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, size=(3, 5, 4, 2)).astype("float32")
    mask = rng.random((3, 5, 1)) < 0.6
    layer = DebiasedBatchNormalization(momentum=0.0, synchronized=synchronized)
    _check_masked_step(layer, x, mask, mask[..., None], -1)


@pytest.mark.parametrize(
    "synchronized",
    [False, pytest.param(True, marks=requires_tensorflow)],
)
def test_channels_first_masking_counts_each_channel(synchronized):
    # Masking on (B, C, T) masks whole (b, c) rows: each channel has its own
    # count, T times its unmasked rows.
    rng = np.random.default_rng(12)
    x = rng.normal(2.0, 1.5, size=(6, 3, 5)).astype("float32")
    keep = rng.random((6, 3)) < 0.7
    keep[:2] = True  # at least two rows per channel
    x[~keep] = 0.0
    inputs = keras.Input((3, 5))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    layer = DebiasedBatchNormalization(
        axis=1, momentum=0.0, synchronized=synchronized
    )
    model = keras.Model(inputs, layer(masked))
    y = numpy(model(x, training=True))
    mean, biased, unbiased, shape = masked_statistics(x, keep[..., None], 1)
    np.testing.assert_allclose(
        numpy(layer.moving_variance), unbiased, rtol=1e-5
    )
    np.testing.assert_allclose(
        numpy(layer.moving_mean), mean, rtol=1e-5, atol=1e-6
    )
    expected = (x - mean.reshape(shape)) / np.sqrt(
        biased.reshape(shape) + layer.epsilon
    )
    rows = np.broadcast_to(keep[..., None], x.shape)
    np.testing.assert_allclose(y[rows], expected[rows], rtol=1e-4, atol=1e-5)


def test_a_channel_with_one_value_keeps_its_statistics():
    x = np.array([[[1.0], [3.0]], [[7.0], [4.0]]], "float32")  # (B, C, 1)
    mask = np.array([[True, True], [True, False]])  # channel 1: one value
    ema = DebiasedBatchNormalization(axis=1, momentum=0.0)
    ema(x, training=True, mask=mask)
    np.testing.assert_allclose(numpy(ema.moving_mean), [4.0, 0.0])
    np.testing.assert_allclose(numpy(ema.moving_variance), [18.0, 1.0])
    # The running means keep one counter: the whole batch is skipped.
    cumulative = DebiasedBatchNormalization(
        axis=1, moving_statistics="cumulative"
    )
    cumulative(x, training=True, mask=mask)
    assert float(numpy(cumulative.moving_count)) == 0.0
    np.testing.assert_array_equal(numpy(cumulative.moving_variance), [1, 1])


# ------------------------------------------------- renormalization


def numpy_renorm_steps(batches, momentum, renorm_momentum, epsilon, clip):
    """Outputs and statistics of the documented debiased renormalization."""
    channels = batches[0].shape[-1]
    renorm_mean, renorm_stddev = np.zeros(channels), np.ones(channels)
    moving_mean, moving_stddev = np.zeros(channels), np.ones(channels)
    outputs = []
    for x in batches:
        x = x.astype(np.float64)
        m = x.shape[0]
        mean, var = x.mean(0), x.var(0)
        stddev = np.sqrt(var + epsilon)
        scale = np.maximum(renorm_stddev, np.sqrt(epsilon))
        r = np.clip(stddev / scale, clip["rmin"], clip["rmax"])
        d = np.clip((mean - renorm_mean) / scale, -clip["dmax"], clip["dmax"])
        outputs.append((x - mean) / stddev * r + d)
        unbiased_stddev = np.sqrt(var * m / (m - 1) + epsilon)
        renorm_mean = (
            renorm_momentum * renorm_mean + (1 - renorm_momentum) * mean
        )
        renorm_stddev = (
            renorm_momentum * renorm_stddev
            + (1 - renorm_momentum) * unbiased_stddev
        )
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_stddev = momentum * moving_stddev + (1 - momentum) * (
            unbiased_stddev
        )
    return outputs, moving_mean, np.maximum(moving_stddev**2 - epsilon, 0)


def test_renorm_follows_the_documented_debiased_algorithm():
    # Batch renormalization on every Keras release (Keras < 3.14 has none).
    rng = np.random.default_rng(5)
    batches = [
        rng.normal(3.0, 2.0, size=(4, 3)).astype("float32") for _ in range(3)
    ]
    clip = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
    layer = DebiasedBatchNormalization(
        momentum=0.5,
        renorm=True,
        renorm_clipping=clip,
        renorm_momentum=0.6,
        epsilon=1e-2,
    )
    outputs = [numpy(layer(x, training=True)) for x in batches]
    expected, mean, variance = numpy_renorm_steps(batches, 0.5, 0.6, 1e-2, clip)
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        numpy(layer.moving_variance), variance, rtol=1e-4
    )


@pytest.mark.skipif(not KERAS_HAS_RENORM, reason="Keras < 3.14: no renorm")
def test_renorm_first_step_matches_keras():
    x = np.random.default_rng(5).normal(size=(4, 3)).astype("float32")
    layer = DebiasedBatchNormalization(momentum=0.0, renorm=True)
    keras_bn = keras.layers.BatchNormalization(momentum=0.0, renorm=True)
    np.testing.assert_allclose(
        numpy(layer(x, training=True)),
        numpy(keras_bn(x, training=True)),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        numpy(layer.moving_variance), x.var(axis=0, ddof=1), rtol=1e-4
    )
    assert [v.path.split("/")[-1] for v in layer.weights] == [
        v.path.split("/")[-1] for v in keras_bn.weights
    ]


# --------------------------------------------------------- precision, fit


def test_mixed_precision_keeps_statistics_in_float32():
    x = np.random.default_rng(6).normal(5.0, 2.0, size=(2, 4, 4, 3))
    x16 = x.astype("float16")
    layer = DebiasedBatchNormalization(momentum=0.0, dtype="mixed_float16")
    y = layer(x16, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.moving_variance.dtype) == (
        "float32"
    )
    flat = x16.astype("float32").reshape(-1, 3)
    np.testing.assert_allclose(
        numpy(layer.moving_variance), flat.var(axis=0, ddof=1), rtol=1e-5
    )


def test_fit_updates_the_statistics_of_the_last_batches():
    # One epoch of four batches, momentum 0: the moving statistics are the
    # last batch's (the one `fit` saw last), debiased.
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, size=(16, 3)).astype("float32")
    layer = DebiasedBatchNormalization(momentum=0.0)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(x, x, batch_size=4, epochs=1, shuffle=False, verbose=0)
    last = x[-4:]
    np.testing.assert_allclose(
        numpy(layer.moving_variance), last.var(0, ddof=1), rtol=1e-5
    )
    np.testing.assert_allclose(
        numpy(layer.moving_mean), last.mean(0), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------- drop-in and bad input


def test_config_is_keras_config_plus_ours_on_every_release():
    layer = DebiasedBatchNormalization(axis=1, momentum=0.5, renorm=True)
    assert isinstance(layer, keras.layers.BatchNormalization)
    keras_config = keras.layers.BatchNormalization(
        axis=1, momentum=0.5
    ).get_config()
    config = layer.get_config()
    ours = {"moving_statistics", "renorm", "renorm_clipping", "renorm_momentum"}
    assert set(config) == set(keras_config) | ours
    assert config["renorm"] is True and config["renorm_clipping"] == {}
    # A config written by Keras (with or without its renorm keys) loads.
    keras_config.pop("name")
    keras_config.update(renorm=False, renorm_clipping=None, renorm_momentum=0.9)
    clone = DebiasedBatchNormalization.from_config(keras_config)
    assert clone.moving_statistics == "ema" and clone.axis == 1
    assert clone.get_config()["renorm_momentum"] == 0.9


def test_numpy_scalars_are_accepted():
    layer = DebiasedBatchNormalization(
        axis=np.int64(-1),
        momentum=np.float32(0.5),
        epsilon=np.float64(1e-3),
        renorm=np.bool_(True),
        renorm_momentum=np.float32(0.9),
        renorm_clipping={"rmax": np.float32(3.0)},
    )
    assert layer.momentum == 0.5 and layer.axis == -1 and layer.renorm
    layer(np.ones((2, 3), "float32"), training=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"moving_statistics": "mean"},
            (
                r"`moving_statistics`\. Expected one of 'ema', 'cumulative'\. "
                r"Received: moving_statistics='mean'"
            ),
        ),
        ({"momentum": 1.5}, r"`momentum`\. Expected a float in \[0, 1\]\. "),
        ({"momentum": "0.9"}, r"Received: momentum='0\.9'"),
        ({"epsilon": 0.0}, r"`epsilon`\. Expected a float in \(0, inf\)\. "),
        ({"axis": 1.0}, r"`axis`\. Expected an int\. Received: axis=1\.0"),
        ({"center": "no"}, r"`center`\. Expected a bool\. Received: center="),
        ({"renorm": 1}, r"`renorm`\. Expected a bool\. Received: renorm=1"),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
            r"`renorm_clipping`\. Expected None or a dict .*rmax >= rmin",
        ),
        (
            {"renorm": True, "renorm_clipping": {"r": 1.0}},
            r"Received: renorm_clipping=\{'r': 1\.0\}",
        ),
        ({"renorm_momentum": -0.1}, r"`renorm_momentum`\. Expected a float"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DebiasedBatchNormalization(**kwargs)


@requires_tensorflow  # Keras refuses synchronized=True elsewhere.
@pytest.mark.parametrize("masked", [False, True])
def test_synchronized_on_one_device_equals_unsynchronized(masked):
    # Its own two-pass moments (tests/test_distributed.py runs it on two
    # replicas): on one device, the same statistics as the default path.
    rng = np.random.default_rng(9)
    x = rng.normal(3.0, 2.0, size=(4, 5, 3)).astype("float32")
    mask = rng.random((4, 5)) > 0.3 if masked else None
    outputs = []
    for synchronized in (False, True):
        layer = DebiasedBatchNormalization(
            synchronized=synchronized, momentum=0.0
        )
        y = layer(x, training=True, mask=mask)
        outputs.append(
            (numpy(y), numpy(layer.moving_mean), numpy(layer.moving_variance))
        )
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    values = x[mask] if masked else x.reshape(-1, 3)
    np.testing.assert_allclose(
        outputs[1][2], values.var(axis=0, ddof=1), rtol=1e-5
    )
