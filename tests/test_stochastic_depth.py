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
        lambda: {
            "block": keras.layers.Dense(6, activation="relu"),
            "survival_probability": 0.5,
            "seed": 1,
        },
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
        return {"block": block, "survival_probability": 0.6, "seed": 2}

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
    np.testing.assert_allclose(
        _np(layer(x)), x + 0.3 * _np(block(x)), rtol=1e-6
    )


def compiled_training_call(layer, input_shape):
    """`layer(x, training=True)` compiled once; each call draws afresh."""
    layer.build(input_shape)
    if keras.backend.backend() == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        state = [[v.value for v in layer.non_trainable_variables]]

        @jax.jit
        def step(x, non_trainable):
            return layer.stateless_call(
                trainable, non_trainable, x, training=True
            )

        def run(x):
            y, state[0] = step(x, state[0])
            return np.asarray(y)

        return run
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda x: layer(x, training=True))
        return lambda x: step(tf.constant(x)).numpy()
    return lambda x: _np(layer(x, training=True))


def test_survival_frequency():
    p, steps = 0.3, 400
    layer = StochasticDepth(keras.layers.Dense(2), p, seed=4)
    x = np.ones((2, 2), "float32")
    run = compiled_training_call(layer, x.shape)
    survived = sum(not np.array_equal(run(x), x) for _ in range(steps))
    bound = 4 * np.sqrt(p * (1 - p) / steps)
    assert abs(survived / steps - p) < bound, (survived / steps, bound)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="eager TensorFlow runs only the taken branch (JAX traces both)",
)
def test_a_closed_gate_does_not_compute_the_block():
    CountingDense.calls = 0
    layer = StochasticDepth(CountingDense(2), survival_probability=0.5, seed=4)
    x = np.ones((2, 2), "float32")
    layer.build(x.shape)
    outcomes = set()
    for _ in range(30):
        before = CountingDense.calls
        skipped = np.array_equal(_np(layer(x, training=True)), x)
        assert CountingDense.calls - before == (0 if skipped else 1)
        outcomes.add(skipped)
    assert outcomes == {True, False}


def test_dropped_block_gets_zero_gradient():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape")
    import tensorflow as tf

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


def test_sequential_with_decay_rule_trains_and_infers_the_expectation():
    probs = linear_survival_probabilities(4)
    blocks = [
        StochasticDepth(keras.layers.Dense(8, activation="relu"), p, seed=i)
        for i, p in enumerate(probs)
    ]
    model = keras.Sequential(
        [keras.Input((8,))] + blocks + [keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    before = model.evaluate(x, x[:, :1], verbose=0)
    model.fit(x, x[:, :1], epochs=3, batch_size=8, verbose=0)
    after = model.evaluate(x, x[:, :1], verbose=0)
    assert after < before, (before, after)
    # Inference composes the blocks' expected values x + p_l * f_l(x).
    h = x
    for block, p in zip(blocks, probs, strict=True):
        h = h + p * _np(block.block[0](h))
    expected = _np(model.layers[-1](h))
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
    )


class Scale(keras.layers.Layer):
    """A custom layer with a weight and no `compute_output_shape`."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs):
        return inputs * self.scale


def test_custom_branch_without_compute_output_shape():
    # keras.Sequential takes the layer; so must the wrapper.
    keras.Sequential([keras.Input((4,)), Scale()])
    layer = StochasticDepth([Scale(), keras.layers.Dense(4)], 0.5, seed=3)
    model = keras.Sequential([keras.Input((4,)), layer])
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    branch = _np(layer.block[1](_np(layer.block[0](x))))
    np.testing.assert_allclose(
        model.predict(x, verbose=0), x + 0.5 * branch, rtol=1e-6
    )
    outputs = {_np(layer(x, training=True)).tobytes() for _ in range(20)}
    assert outputs == {x.tobytes(), (x + branch).tobytes()}


def test_numpy_scalars_are_accepted():
    layer = StochasticDepth(
        keras.layers.Dense(2), np.float32(0.5), seed=np.int64(7)
    )
    assert layer.survival_probability == 0.5 and layer.seed == 7
    assert layer.get_config()["seed"] == 7
    np.testing.assert_allclose(
        linear_survival_probabilities(np.int64(2), np.float32(0.5)),
        [0.75, 0.5],
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"survival_probability": 0.0},
            (
                r"argument `survival_probability`.*\(0, 1\].*"
                r"survival_probability=0\.0"
            ),
        ),
        (
            {"survival_probability": 1.5},
            r"argument `survival_probability`.*survival_probability=1\.5",
        ),
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
