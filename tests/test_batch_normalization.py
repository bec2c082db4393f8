"""Tests for DebiasedBatchNormalization."""


import keras
import numpy as np
import pytest
from conftest import requires_tensorflow
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import DebiasedBatchNormalization


def numpy(x):
    return ops.convert_to_numpy(x)


# ---------------------------------------------------------------- harness
# Training normalizes deterministically with the batch statistics, so two
# training calls on the same batch agree: `training_differs=False` (the
# harness would read that as "no fresh random draws"). The difference
# between training and inference is tested below.


def test_harness_sequence_features_last():
    run_layer_checks(
        DebiasedBatchNormalization,
        {"momentum": 0.9},
        (4, 5, 3),
        expected_output_shape=(4, 5, 3),
        training_differs=False,
    )


def test_harness_channels_first_cumulative():
    run_layer_checks(
        DebiasedBatchNormalization,
        {"axis": 1, "moving_statistics": "cumulative", "epsilon": 1e-5},
        (3, 4, 5, 7),
        expected_output_shape=(3, 4, 5, 7),
        training_differs=False,
    )


def test_training_differs_from_inference():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 4)).astype("float32")
    layer = DebiasedBatchNormalization()
    trained = numpy(layer(x, training=True))
    assert not np.allclose(trained, numpy(layer(x, training=False)))
    np.testing.assert_allclose(trained.mean(axis=0), 0.0, atol=1e-5)


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


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_moving_variance_converges_to_the_population_variance(batch_size):
    # Keras's EMA of the biased variance converges to (m - 1) / m of the
    # true variance (here 9); ours to the variance itself. Per feature the
    # EMA of iid unbiased estimates (variance 2 sigma^4 / (m - 1)) has
    # relative variance (1 - rho) / (1 + rho) * 2 / (m - 1); averaged over
    # `features` independent features, the bound is 5 standard errors.
    features, momentum, steps = 512, 0.9, 200
    rng = np.random.default_rng(batch_size)
    ours = DebiasedBatchNormalization(momentum=momentum)
    keras_bn = keras.layers.BatchNormalization(momentum=momentum)
    for _ in range(steps):
        x = rng.normal(0.0, 3.0, size=(batch_size, features)).astype("float32")
        ours(x, training=True)
        keras_bn(x, training=True)
    relative_sd = np.sqrt(
        (1 - momentum) / (1 + momentum) * 2 / (batch_size - 1) / features
    )
    bound = 5 * relative_sd + momentum**steps
    ours_ratio = numpy(ours.moving_variance).mean() / 9.0
    keras_ratio = numpy(keras_bn.moving_variance).mean() / 9.0
    keras_expected = (batch_size - 1) / batch_size
    assert abs(ours_ratio - 1.0) < bound, (
        f"debiased moving variance / true variance = {ours_ratio:.4f}, "
        f"expected 1 within {bound:.4f} (batch {batch_size})"
    )
    assert abs(keras_ratio - keras_expected) < bound * keras_expected, (
        f"Keras ratio {keras_ratio:.4f}, expected {keras_expected:.4f}"
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


def test_mask_counts_only_unmasked_positions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    mask = rng.random((3, 6)) < 0.6
    layer = DebiasedBatchNormalization(momentum=0.0)
    layer(x, training=True, mask=mask)
    selected = x[mask]
    np.testing.assert_allclose(
        numpy(layer.moving_variance), selected.var(axis=0, ddof=1), rtol=1e-4
    )


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


def test_renorm_moving_variance_is_debiased():
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


def test_fit_in_a_convnet_and_population_statistics():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 2, 16)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(3, 3),
            DebiasedBatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(numpy(model.layers[1].moving_variance), 1.0)


# ---------------------------------------------------- drop-in and bad input


def test_is_a_keras_batch_normalization_with_its_config():
    layer = DebiasedBatchNormalization(axis=1, momentum=0.5, renorm=True)
    assert isinstance(layer, keras.layers.BatchNormalization)
    keras_config = keras.layers.BatchNormalization(
        axis=1, momentum=0.5, renorm=True
    ).get_config()
    config = layer.get_config()
    assert set(config) == set(keras_config) | {"moving_statistics"}
    keras_config.pop("name")
    clone = DebiasedBatchNormalization.from_config(keras_config)
    assert clone.moving_statistics == "ema" and clone.axis == 1
    clone.build((2, 3, 4))
    assert [w.path.split("/")[-1] for w in clone.weights][:4] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
    ]


def test_bad_moving_statistics():
    with pytest.raises(
        ValueError,
        match=r"argument `moving_statistics`\. Expected one of 'ema', "
        r"'cumulative'\. Received: moving_statistics='mean'",
    ):
        DebiasedBatchNormalization(moving_statistics="mean")


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
        outputs.append((numpy(y), numpy(layer.moving_mean),
                        numpy(layer.moving_variance)))
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    values = x[mask] if masked else x.reshape(-1, 3)
    np.testing.assert_allclose(
        outputs[1][2], values.var(axis=0, ddof=1), rtol=1e-5
    )
    config = DebiasedBatchNormalization(synchronized=True).get_config()
    assert config["synchronized"] is True

