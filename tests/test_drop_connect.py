import keras
import numpy as np
import pytest
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import DropConnectConv2D
from keras_regkit.layers import DropConnectDense
from keras_regkit.layers import drop_connect


def _np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("mask", ["batch", "sample"])
@pytest.mark.parametrize("inference", ["mean", "gaussian"])
def test_dense_harness(mask, inference):
    run_layer_checks(
        DropConnectDense,
        {
            "units": 5,
            "rate": 0.4,
            "mask": mask,
            "inference": inference,
            "activation": "relu",
            "seed": 7,
            "gaussian_samples": 16,
        },
        (4, 6),
        expected_output_shape=(4, 5),
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("mask", ["batch", "sample"])
def test_conv_harness(data_format, mask):
    shape = (3, 7, 9, 2) if data_format == "channels_last" else (3, 2, 7, 9)
    out = (3, 5, 7, 4) if data_format == "channels_last" else (3, 4, 5, 7)
    run_layer_checks(
        DropConnectConv2D,
        {
            "filters": 4,
            "kernel_size": 3,
            "rate": 0.3,
            "mask": mask,
            "seed": 3,
            "data_format": data_format,
            "inference": "gaussian",
            "activation": "relu",
            "gaussian_samples": 8,
        },
        shape,
        expected_output_shape=out,
    )


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropped_fraction_within_binomial_bound(rate):
    # With an identity input, the output's rows are the masked kernel rows.
    units, inputs = 64, 64
    layer = DropConnectDense(
        units, rate=rate, use_bias=False, seed=1, kernel_initializer="ones"
    )
    eye = np.eye(inputs, dtype="float32")
    y = _np(layer(eye, training=True))
    dropped = np.mean(y == 0)
    n = units * inputs
    bound = 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(dropped - rate) < bound, (dropped, rate, bound)
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1 / (1 - rate), rtol=1e-6)


def test_batch_mask_shared_and_sample_mask_per_example():
    x = np.ones((6, 8), "float32")
    batch = DropConnectDense(8, rate=0.5, seed=2, use_bias=False)
    y = _np(batch(x, training=True))
    assert np.all(y == y[0]), "mask='batch' must share one mask per step"
    sample = DropConnectDense(
        8, rate=0.5, seed=2, use_bias=False, mask="sample"
    )
    y = _np(sample(x, training=True))
    assert len({row.tobytes() for row in y}) > 1, "masks are not per example"


@pytest.mark.parametrize("mask", ["batch", "sample"])
def test_mean_of_training_outputs_matches_mean_inference(mask):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 10)).astype("float32")
    layer = DropConnectDense(3, rate=0.5, mask=mask, seed=5)
    layer.build(x.shape)
    draws = 2000
    samples = np.stack([_np(layer(x, training=True)) for _ in range(draws)])
    inference = _np(layer(x))
    # Var of one output: (1 - p) / p * (sum_j w_j^2 x_j^2 + b^2), p = 1/2.
    w, b = _np(layer.kernel), _np(layer.bias)
    std = np.sqrt((x**2) @ (w**2) + b**2)
    bound = 5 * std / np.sqrt(draws) + 1e-6
    err = np.abs(samples.mean(axis=0) - inference)
    assert np.all(err < bound), (err.max(), bound.min())


def _gaussian_moments(layer, x):
    """Mean and standard deviation of the pre-activation, in float64."""
    w = _np(layer.kernel).astype("float64")
    b = _np(layer.bias).astype("float64")
    keep = 1.0 - layer.rate
    mean = x @ w + b
    std = np.sqrt((1 - keep) / keep * ((x**2) @ (w**2) + b**2))
    return mean, std


def test_gaussian_inference_is_the_expected_relu():
    # E[max(u, 0)], u ~ N(m, s^2), in closed form; the layer must equal it.
    from math import erf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 20)).astype("float64")
    layer = DropConnectDense(
        4, rate=0.5, activation="relu", inference="gaussian", seed=3
    )
    out = _np(layer(x.astype("float32")))
    mean, std = _gaussian_moments(layer, x)
    z = mean / std
    cdf = 0.5 * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    expected = mean * cdf + std * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_gaussian_inference_of_a_sigmoid_is_the_gaussian_integral():
    # A fine Riemann sum of E[sigmoid(u)] is the reference; the default
    # rule must be far closer to it than the Monte Carlo error of issue 12
    # (0.0093 at 100 draws).
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 30))
    layer = DropConnectDense(
        5, rate=0.5, activation="sigmoid", inference="gaussian", seed=1
    )
    out = _np(layer(x.astype("float32")))
    mean, std = _gaussian_moments(layer, x)
    grid = np.linspace(-8, 8, 4001)
    density = np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi)
    values = 1 / (1 + np.exp(-(mean[..., None] + std[..., None] * grid)))
    expected = (values * density).sum(-1) * (grid[1] - grid[0])
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.slow
def test_gaussian_inference_is_closer_to_training_passes_than_mean():
    # The average of many training passes (one batched call on a tiled
    # batch, mask="sample") against both inference rules.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 200)).astype("float32")
    layer = DropConnectDense(
        4,
        rate=0.5,
        activation="sigmoid",
        inference="gaussian",
        mask="sample",
        seed=3,
    )
    layer.build(x.shape)
    draws = 4000
    passes = _np(layer(np.tile(x, (draws, 1)), training=True))
    mc = passes.reshape(draws, *x.shape[:1], 4).mean(axis=0)
    gaussian = _np(layer(x))
    plain = 1 / (1 + np.exp(-(x @ _np(layer.kernel) + _np(layer.bias))))
    assert np.abs(gaussian - mc).mean() < np.abs(plain - mc).mean()


def test_gaussian_inference_needs_a_nonlinear_activation():
    with pytest.raises(ValueError, match=r"argument `inference`.*nonlinear"):
        DropConnectDense(4, inference="gaussian")
    with pytest.raises(ValueError, match=r"argument `inference`.*nonlinear"):
        DropConnectConv2D(2, 3, inference="gaussian", activation="linear")


def test_inference_is_fixed_at_construction():
    layer = DropConnectDense(4, activation="relu")
    with pytest.raises(AttributeError, match="fixed when the layer is created"):
        layer.inference = "gaussian"
    assert layer.inference == "mean"


def test_numpy_scalars_are_accepted():
    layer = DropConnectDense(
        np.int64(4),
        rate=np.float64(0.25),
        gaussian_samples=np.int32(8),
        drop_bias=np.bool_(False),
        seed=np.int64(3),
        activation="relu",
        inference="gaussian",
    )
    assert layer.gaussian_samples == 8 and layer.seed == 3
    assert layer.drop_bias is False


@pytest.mark.parametrize(
    "layer_cls, shape",
    [
        (DropConnectDense, (6, 5)),
        (DropConnectConv2D, (6, 5, 4, 2)),
    ],
)
def test_gaussian_inference_does_not_depend_on_the_batch(layer_cls, shape):
    x = np.random.default_rng(3).normal(size=shape).astype("float32")
    args = (3,) if layer_cls is DropConnectDense else (3, 2)
    layer = layer_cls(*args, activation="relu", inference="gaussian", seed=2)
    whole = _np(layer(x))
    np.testing.assert_allclose(
        _np(layer(x[2:3])), whole[2:3], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(layer(x[::-1])), whole[::-1], rtol=1e-5, atol=1e-6
    )


def test_gaussian_inference_is_deterministic():
    x = np.random.default_rng(2).normal(size=(3, 5)).astype("float32")
    layer = DropConnectDense(
        4, activation="tanh", inference="gaussian", seed=11
    )
    np.testing.assert_array_equal(_np(layer(x)), _np(layer(x)))


def test_rate_zero_equals_plain_dense_and_conv():
    x = np.random.default_rng(3).normal(size=(2, 6)).astype("float32")
    ours = DropConnectDense(3, rate=0.0, activation="relu", seed=0)
    plain = keras.layers.Dense(3, activation="relu")
    ours.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(ours.get_weights()[:2])
    np.testing.assert_array_equal(_np(ours(x, training=True)), _np(plain(x)))

    img = np.random.default_rng(4).normal(size=(2, 7, 5, 3)).astype("float32")
    ours = DropConnectConv2D(4, (3, 2), rate=0.0, seed=0)
    plain = keras.layers.Conv2D(4, (3, 2))
    ours.build(img.shape)
    plain.build(img.shape)
    plain.set_weights(ours.get_weights()[:2])
    np.testing.assert_allclose(
        _np(ours(img, training=True)), _np(plain(img)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_per_sample_conv_matches_a_loop_of_convolutions(data_format):
    rng = np.random.default_rng(5)
    layer = DropConnectConv2D(
        3,
        (3, 2),
        strides=(2, 1),
        padding="same",
        data_format=data_format,
        mask="sample",
    )
    shape = (3, 7, 6, 2) if data_format == "channels_last" else (3, 2, 7, 6)
    x = rng.normal(size=shape).astype("float32")
    layer.build(shape)
    kernels = rng.normal(size=(3,) + tuple(layer.kernel.shape))
    kernels = kernels.astype("float32")
    ours = _np(layer._per_sample_linear(x, kernels))
    for b in range(3):
        ref = _np(
            ops.conv(
                x[b : b + 1],
                kernels[b],
                strides=(2, 1),
                padding="same",
                data_format=data_format,
            )
        )
        np.testing.assert_allclose(ours[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_seed_reproduces_masks():
    x = np.ones((2, 5), "float32")
    a = DropConnectDense(4, seed=9, kernel_initializer="ones")
    b = DropConnectDense(4, seed=9, kernel_initializer="ones")
    np.testing.assert_array_equal(
        _np(a(x, training=True)), _np(b(x, training=True))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rate": 1.0}, r"argument `rate`.*\[0, 1\).*rate=1\.0"),
        ({"rate": -0.1}, r"argument `rate`.*rate=-0\.1"),
        ({"rate": "x"}, r"argument `rate`.*rate='x'"),
        ({"mask": "row"}, r"argument `mask`.*'batch', 'sample'.*mask='row'"),
        (
            {"inference": "mc"},
            r"argument `inference`.*'mean', 'gaussian'.*inference='mc'",
        ),
        (
            {"gaussian_samples": 0},
            r"argument `gaussian_samples`.*int >= 1.*gaussian_samples=0",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropConnectDense(3, **kwargs)
    with pytest.raises(ValueError, match=match):
        DropConnectConv2D(3, 2, **kwargs)


def test_kernel_larger_than_input_is_refused():
    layer = DropConnectConv2D(2, (5, 3))
    with pytest.raises(
        ValueError,
        match=r"argument `kernel_size`.*spatial size \(4, 9\).*"
        r"kernel_size=\(5, 3\)",
    ):
        layer.build((1, 4, 9, 2))


def test_sample_mask_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(drop_connect, "MAX_SAMPLE_MASK_ELEMENTS", 1000)
    layer = DropConnectDense(10, mask="sample")
    with pytest.raises(ValueError, match=r"argument `mask`.*32 x 60 = 1920"):
        layer.build((32, 6))
    with pytest.raises(ValueError, match=r"argument `groups`.*groups=2"):
        DropConnectConv2D(4, 3, groups=2, mask="sample")


def _lowbias32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_keep_mask_is_the_documented_hash_of_the_counter(monkeypatch, rate):
    # A fixed key in place of the random draw: the mask must be the NumPy
    # lowbias32 of (counter * 0x9E3779B9) XOR key, kept when >= rate * 2**32.
    key = np.int32(-123456789)
    monkeypatch.setattr(
        keras.random,
        "randint",
        lambda *args, **kwargs: ops.convert_to_tensor(key),
    )
    shape, start = (7, 33), 1000
    mask = _np(
        drop_connect.keep_mask(
            shape, rate, keras.random.SeedGenerator(0), start
        )
    )
    counters = np.arange(start, start + 7 * 33, dtype=np.uint64)
    scrambled = (counters * 0x9E3779B9 % 2**32).astype(np.uint32)
    bits = _lowbias32(scrambled ^ key.astype(np.uint32))
    expected = bits.astype(np.uint64) >= round(rate * 2**32)
    np.testing.assert_array_equal(mask, expected.reshape(shape))


def test_keep_masks_are_uniform_and_independent():
    # Fraction kept, and correlations between neighbouring entries (also a
    # power-of-two lag) and between consecutive masks, within 5 standard
    # errors of their values for independent draws.
    seed = keras.random.SeedGenerator(4)
    rate, n = 0.3, 256 * 256
    first = _np(drop_connect.keep_mask((256, 256), rate, seed)).ravel()
    second = _np(drop_connect.keep_mask((256, 256), rate, seed)).ravel()
    bound = 5 * np.sqrt(rate * (1 - rate) / n)
    for mask in (first, second):
        assert abs(1 - mask.mean() - rate) < bound
    error = 5 / np.sqrt(n)
    pairs = [
        (first, second),
        (first[:-1], first[1:]),
        (first[:-256], first[256:]),
        (second[:-1024], second[1024:]),
    ]
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < error
