import keras
import numpy as np
import pytest
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import StochasticDepth
from keras_regkit.layers import linear_survival_probabilities


def _np(x):
    return ops.convert_to_numpy(x)


class CountingDense(keras.layers.Dense):
    """A Dense layer that counts its eager executions."""

    calls = 0

    def call(self, inputs, training=None):
        CountingDense.calls += 1
        return super().call(inputs)


def test_harness_dense_block():
    run_layer_checks(
        StochasticDepth,
        lambda: dict(block=keras.layers.Dense(6, activation="relu"),
                     survival_probability=0.5, seed=1),
        (4, 6),
        expected_output_shape=(4, 6),
    )


def test_harness_conv_block_list():
    def kwargs():
        block = [
            keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Conv2D(3, (1, 3), padding="same"),
        ]
        return dict(block=block, survival_probability=0.6, seed=2)

    run_layer_checks(
        StochasticDepth,
        kwargs,
        (2, 5, 7, 3),
        expected_output_shape=(2, 5, 7, 3),
    )


def test_inference_is_expected_value():
    block = keras.layers.Dense(4)
    layer = StochasticDepth(block, survival_probability=0.3)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(_np(layer(x)), x + 0.3 * _np(block(x)),
                               rtol=1e-6)


def test_survival_frequency_and_skipped_execution():
    CountingDense.calls = 0
    p, steps = 0.3, 400
    layer = StochasticDepth(CountingDense(2), survival_probability=p, seed=4)
    x = np.ones((2, 2), "float32")
    layer.build(x.shape)
    # Eager TensorFlow runs only the taken branch of `cond`, so the count
    # of block executions shows the skip (JAX traces both branches).
    counts = keras.backend.backend() == "tensorflow"
    survived = 0
    for _ in range(steps):
        before = CountingDense.calls
        y = _np(layer(x, training=True))
        ran = CountingDense.calls - before
        if np.array_equal(y, x):
            assert ran == 0 or not counts, "a closed gate computed the block"
        else:
            assert ran == 1 or not counts
            survived += 1
    if counts:
        assert CountingDense.calls == survived
    bound = 4 * np.sqrt(p * (1 - p) / steps)
    assert abs(survived / steps - p) < bound, (survived / steps, bound)


def test_dropped_block_gets_zero_gradient():
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape")
    block = keras.layers.Dense(3)
    layer = StochasticDepth(block, survival_probability=0.5, seed=0)
    x = np.ones((2, 3), "float32")
    layer.build(x.shape)
    seen = set()
    for _ in range(40):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        grad = tape.gradient(loss, block.kernel.value)
        dropped = np.array_equal(y.numpy(), x)
        norm = 0.0 if grad is None else float(tf.norm(grad))
        if dropped:
            assert norm == 0.0
        else:
            assert norm > 0.0
        seen.add(dropped)
    assert seen == {True, False}


def test_linear_decay_rule():
    np.testing.assert_allclose(
        linear_survival_probabilities(5, 0.5), [0.9, 0.8, 0.7, 0.6, 0.5]
    )
    assert linear_survival_probabilities(3, 1.0) == [1.0, 1.0, 1.0]


def test_sequential_with_decay_rule_trains():
    probs = linear_survival_probabilities(4)
    model = keras.Sequential(
        [keras.Input((8,))]
        + [
            StochasticDepth(keras.layers.Dense(8, activation="relu"), p,
                            seed=i)
            for i, p in enumerate(probs)
        ]
        + [keras.layers.Dense(1)]
    )
    model.compile("adam", "mse", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    model.fit(x, x[:, :1], epochs=2, batch_size=8, verbose=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(survival_probability=0.0),
         r"argument `survival_probability`.*\(0, 1\].*"
         r"survival_probability=0\.0"),
        (dict(survival_probability=1.5),
         r"argument `survival_probability`.*survival_probability=1\.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StochasticDepth(keras.layers.Dense(2), **kwargs)


def test_bad_block_and_shape_change():
    with pytest.raises(ValueError, match=r"argument `block`.*Layer.*block=3"):
        StochasticDepth(3)
    with pytest.raises(ValueError, match=r"argument `block`.*block=\[\]"):
        StochasticDepth([])
    layer = StochasticDepth(keras.layers.Dense(5, name="wide"))
    with pytest.raises(
        ValueError,
        match=r"output shape equals its input shape.*\['wide'\].*"
        r"input shape \(None, 3\) and output shape \(None, 5\)",
    ):
        layer.build((None, 3))


def test_decay_rule_bad_arguments():
    with pytest.raises(ValueError, match=r"`num_blocks`.*num_blocks=0"):
        linear_survival_probabilities(0)
    with pytest.raises(
        ValueError,
        match=r"`final_survival_probability`.*\(0, 1\].*"
        r"final_survival_probability=0",
    ):
        linear_survival_probabilities(3, 0)
