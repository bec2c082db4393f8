"""Tests for MonteCarloAverage, against passes replayed in plain Keras."""

import os
import tempfile

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow
from keras import ops

from keras_regkit.layers import DropConnectConv2D
from keras_regkit.layers import DropConnectDense
from keras_regkit.layers import DropPath
from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage
from keras_regkit.layers import StochasticDepth
from keras_regkit.models.monte_carlo_average import MonteCarloAverage


def documented_seed(seed, index):
    """The documented start seed of the `index`-th generator."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0]) >> 1


def numpy(x):
    return ops.convert_to_numpy(x)


def replayed_passes(net, x, seed, passes, sampled):
    """The passes of a Sequential `net`, rebuilt layer by layer: each layer
    of a class in `sampled` is a fresh copy seeded with the documented seed
    (its weights copied, `mask="batch"` for DropConnect) and called in
    training mode, every other layer is `net`'s own, called in inference
    mode. A pass draws its noise once for the whole batch: each example is
    run alone (a batch of one) from the generator states at the start of
    the pass."""
    layers, generators, index, h = [], [], 0, x
    for layer in net.layers:
        if isinstance(layer, sampled):
            config = dict(layer.get_config(), seed=documented_seed(seed, index))
            if isinstance(layer, (DropConnectDense, DropConnectConv2D)):
                config["mask"] = "batch"
            index += 1
            fresh = layer.__class__.from_config(config)
            fresh.build(h.shape)
            fresh.set_weights(layer.get_weights())
            layers.append((fresh, True))
            generators.append(fresh.seed_generator)
        else:
            layers.append((layer, False))
        h = layer(h)
    outputs = []
    for _ in range(passes):
        start = [numpy(g.state) for g in generators]
        rows = []
        for row in range(len(x)):
            for generator, state in zip(generators, start):
                generator.state.assign(state)
            h = x[row : row + 1]
            for layer, training in layers:
                h = layer(h, training=training)
            rows.append(numpy(h)[0])
        outputs.append(np.stack(rows))
    return np.stack(outputs)


def shared_dropout_mask(rate, seed, shape):
    """The Dropout mask (0 or 1 / (1 - rate)) a fresh layer draws for one
    example of `shape`, shared by the batch in a pass."""
    dropout = keras.layers.Dropout(rate, seed=seed)
    ones = np.ones((1,) + tuple(shape), "float32")
    return lambda h: h * numpy(dropout(ones, training=True))


def dropout_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5, seed=11),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.3, seed=12),
            keras.layers.Dense(3),
        ]
    )


def with_moved_statistics(net, x):
    """Moving statistics far from their initial values, so that a pass
    that used batch statistics, or updated them, would show."""
    bn = net.layers[1]
    h = net.layers[0](x)
    bn.moving_mean.assign(numpy(ops.mean(h, axis=0)) + 0.5)
    bn.moving_variance.assign(numpy(ops.var(h, axis=0)) * 3.0 + 0.1)
    return [numpy(v) for v in (bn.moving_mean, bn.moving_variance)]


def test_predict_is_the_mean_of_passes_replayed_from_the_documented_seeds():
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    net = dropout_net()
    statistics = with_moved_statistics(net, x)
    passes = replayed_passes(net, x, 7, 4, keras.layers.Dropout)
    assert len({p.tobytes() for p in passes}) == 4, "passes not distinct"
    # The same passes from explicit masks, one per Dropout and pass.
    first = shared_dropout_mask(0.5, documented_seed(7, 0), (16,))
    second = shared_dropout_mask(0.3, documented_seed(7, 1), (8,))
    dense, bn, _, hidden, _, head = net.layers
    explicit = [
        numpy(head(second(hidden(first(bn(dense(x), training=False))))))
        for _ in range(4)
    ]
    np.testing.assert_allclose(passes, explicit, atol=1e-5)
    averaged = MonteCarloAverage(
        net, num_passes=4, seed=7, average="logits", return_spread=True
    )
    mean, spread = averaged.predict(x, verbose=0)
    np.testing.assert_allclose(mean, passes.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(spread, passes.std(axis=0), atol=1e-5)
    assert spread.min() > 0
    eager_mean, _ = averaged(x)
    np.testing.assert_allclose(numpy(eager_mean), mean, atol=1e-6)
    # The moving statistics were used (passes above) and left unchanged.
    bn = net.layers[1]
    for variable, before in zip(
        (bn.moving_mean, bn.moving_variance), statistics
    ):
        np.testing.assert_array_equal(numpy(variable), before)
    # One pass is one explicit stochastic pass.
    single = MonteCarloAverage(net, num_passes=1, seed=7, average="logits")
    np.testing.assert_allclose(
        single.predict(x, verbose=0), passes[0], atol=1e-5
    )


def test_softmax_of_each_pass_is_averaged_with_from_logits():
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    net = dropout_net(1)
    passes = replayed_passes(net, x, 3, 3, keras.layers.Dropout)
    averaged = MonteCarloAverage(net, 3, seed=3, from_logits=True)
    softmax = np.exp(passes) / np.exp(passes).sum(axis=-1, keepdims=True)
    got = numpy(averaged(x))
    np.testing.assert_allclose(got, softmax.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-6)


def test_predictions_are_fixed_and_leave_the_training_draws_alone():
    x = np.random.default_rng(2).normal(size=(8, 5)).astype("float32")
    net = dropout_net(2)
    averaged = MonteCarloAverage(net, num_passes=3, seed=5)
    generator = net.layers[2].seed_generator
    before = numpy(generator.state)
    first = averaged.predict(x, verbose=0)
    np.testing.assert_array_equal(averaged.predict(x, verbose=0), first)
    np.testing.assert_array_equal(numpy(generator.state), before)
    # Stochastic: not the deterministic prediction, and another seed
    # gives other passes.
    assert np.abs(first - numpy(net(x))).max() > 1e-3
    other = numpy(MonteCarloAverage(net, num_passes=3, seed=6)(x))
    assert np.abs(first - other).max() > 1e-3
    # Training calls the model once: one draw per Dropout per step.
    averaged.compile("sgd", "mse")
    averaged.fit(x, np.zeros((8, 3)), batch_size=4, epochs=1, verbose=0)
    np.testing.assert_array_equal(numpy(generator.state), before + [0, 2])
    after_fit = averaged.predict(x, verbose=0)
    np.testing.assert_array_equal(averaged.predict(x, verbose=0), after_fit)


def test_a_none_seed_is_drawn_once_and_kept_in_the_config():
    averaged = MonteCarloAverage(dropout_net(), num_passes=2)
    assert isinstance(averaged.seed, int)
    assert averaged.get_config()["seed"] == averaged.seed


def test_stochastic_depth_gates_a_branch_whose_batch_norm_infers():
    x = np.random.default_rng(3).normal(size=(6, 4)).astype("float32")
    keras.utils.set_random_seed(3)
    branch = [
        keras.layers.Dense(4),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.4, seed=1),
    ]
    depth = StochasticDepth(branch, survival_probability=0.5, seed=2)
    net = keras.Sequential([keras.Input((4,)), depth, keras.layers.Dense(2)])
    bn = branch[1]
    bn.moving_mean.assign(np.full(4, 0.3, "float32"))
    bn.moving_variance.assign(np.full(4, 2.0, "float32"))
    averaged = MonteCarloAverage(net, num_passes=8, seed=4, average="logits")
    got = numpy(averaged(x))
    # Generator 0 is the gate's, 1 the Dropout's inside the branch.
    gate_seed = keras.random.SeedGenerator(documented_seed(4, 0))
    dropout = shared_dropout_mask(0.4, documented_seed(4, 1), (4,))
    head = net.layers[-1]
    outputs, gates = [], []
    for _ in range(8):
        gate = float(keras.random.uniform((), seed=gate_seed) < 0.5)
        h = bn(branch[0](x), training=False)
        outputs.append(numpy(head(x + gate * dropout(h))))
        gates.append(gate)
    assert 0 < sum(gates) < 8, f"gates {gates} do not vary"
    np.testing.assert_allclose(got, np.mean(outputs, axis=0), atol=1e-5)
    np.testing.assert_allclose(numpy(bn.moving_mean), 0.3)
    np.testing.assert_allclose(numpy(bn.moving_variance), 2.0)


def test_fractional_pooling_draws_random_regions():
    x = np.random.default_rng(5).normal(size=(2, 9, 7, 2)).astype("float32")
    net = keras.Sequential(
        [keras.Input((9, 7, 2)), FractionalMaxPooling2D(1.5, seed=0)]
    )
    passes = replayed_passes(net, x, 1, 6, FractionalMaxPooling2D)
    assert len({p.tobytes() for p in passes}) > 1
    averaged = MonteCarloAverage(net, num_passes=6, seed=1)
    np.testing.assert_allclose(
        numpy(averaged(x)), passes.mean(axis=0), atol=1e-6
    )


def test_every_default_layer_is_sampled_as_in_training():
    x = np.random.default_rng(4).normal(size=(3, 6, 4)).astype("float32")
    keras.utils.set_random_seed(4)
    sampled = (
        keras.layers.GaussianNoise,
        keras.layers.GaussianDropout,
        keras.layers.AlphaDropout,
        keras.layers.SpatialDropout1D,
        DropPath,
        DropConnectDense,
    )
    net = keras.Sequential(
        [
            keras.Input((6, 4)),
            keras.layers.GaussianNoise(0.3, seed=1),
            keras.layers.GaussianDropout(0.3, seed=1),
            keras.layers.AlphaDropout(0.2, seed=1),
            keras.layers.SpatialDropout1D(0.3, seed=1),
            DropPath(0.4, seed=1),
            DropConnectDense(5, rate=0.3, mask="sample", seed=1),
        ]
    )
    passes = replayed_passes(net, x, 9, 3, sampled)
    # A pass whose DropPath gate drops the batch is all zeros.
    assert len({p.tobytes() for p in passes}) > 1
    averaged = MonteCarloAverage(net, num_passes=3, seed=9)
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), passes.mean(axis=0), atol=1e-5
    )


def test_drop_connect_conv_is_sampled_as_in_training():
    x = np.random.default_rng(15).normal(size=(3, 7, 6, 2)).astype("float32")
    keras.utils.set_random_seed(15)
    net = keras.Sequential(
        [
            keras.Input((7, 6, 2)),
            DropConnectConv2D(3, (3, 2), rate=0.4, mask="sample", seed=1),
        ]
    )
    passes = replayed_passes(net, x, 2, 3, DropConnectConv2D)
    assert len({p.tobytes() for p in passes}) == 3
    averaged = MonteCarloAverage(net, num_passes=3, seed=2, average="logits")
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), passes.mean(axis=0), atol=1e-5
    )


def test_drop_connect_averages_approach_the_expected_outputs():
    # Each pass draws one kernel mask for the batch (also with
    # mask="sample"), so N passes are N independent samples of every
    # example's output. A linear layer's mean pass is `W v + b` exactly;
    # with a ReLU, the Gaussian inference is the moment-matched
    # `E[relu(u)]`, a close approximation for 64 inputs. Bound: 5 standard
    # errors plus, for the ReLU, the approximation's own error and a floor
    # for an output whose pre-activation is rarely positive (0 in every
    # pass, no sample spread, while `E[relu(u)]` is a few thousandths).
    passes = 64
    x = np.random.default_rng(6).normal(size=(4, 64)).astype("float32")
    keras.utils.set_random_seed(6)
    for activation, inference, slack, floor in (
        (None, "mean", 0.0, 1e-4),
        ("relu", "gaussian", 0.02, 1e-2),
    ):
        layer = DropConnectDense(
            6,
            rate=0.5,
            mask="sample",
            activation=activation,
            inference=inference,
            seed=0,
        )
        net = keras.Sequential([keras.Input((64,)), layer])
        averaged = MonteCarloAverage(
            net, passes, seed=2, average="logits", return_spread=True
        )
        mean, spread = (numpy(t) for t in averaged(x))
        std = spread * np.sqrt(passes / (passes - 1))
        expected = numpy(net(x))
        error = np.abs(mean - expected)
        bound = 5 * std / np.sqrt(passes) + slack * np.abs(expected) + floor
        assert np.all(error <= bound), (activation, error.max(), bound.min())
        assert std.mean() > 0.1


def test_dropout_passes_of_a_linear_net_converge_to_the_scaled_net():
    # `f(x; m) = W2 (m * (W1 x + b1)) / (1 - rate) + b2` is linear in the
    # mask, so `E_m[f(x; m)]` is the inference-mode net (inverted dropout's
    # weight scaling). The N passes are independent draws for each example:
    # the mean's error stays below 5 standard errors `s / sqrt(N)` (`s` the
    # passes' sample standard deviation; a false failure has probability
    # under 1e-6 per entry), and shrinks from N = 8 to N = 96.
    x = np.random.default_rng(14).normal(size=(8, 16)).astype("float32")
    keras.utils.set_random_seed(14)
    net = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32),
            keras.layers.Dropout(0.5, seed=3),
            keras.layers.Dense(3),
        ]
    )
    expected = numpy(net(x))
    errors = []
    for passes in (8, 96):
        averaged = MonteCarloAverage(
            net, passes, seed=5, average="logits", return_spread=True
        )
        mean, spread = (numpy(t) for t in averaged(x))
        std = spread * np.sqrt(passes / (passes - 1))
        error = np.abs(mean - expected)
        bound = 5 * std / np.sqrt(passes) + 1e-5
        assert np.all(error <= bound), (passes, error.max(), bound.min())
        assert std.min() > 0.05, std.min()
        errors.append(np.sqrt(np.mean(error**2)))
    assert errors[1] < errors[0], errors


def _sequential(shape, *layers):
    return keras.Sequential(
        [
            keras.Input(shape),
            *layers,
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


INVARIANCE_NETS = {
    "dropout": lambda: _sequential(
        (6,), keras.layers.Dense(8), keras.layers.Dropout(0.5, seed=1)
    ),
    "dropout_noise_shape": lambda: _sequential(
        (5, 4), keras.layers.Dropout(0.5, noise_shape=(None, 1, 4), seed=1)
    ),
    "spatial_dropout_1d": lambda: _sequential(
        (5, 4), keras.layers.SpatialDropout1D(0.5, seed=1)
    ),
    "spatial_dropout_2d": lambda: _sequential(
        (5, 4, 3), keras.layers.SpatialDropout2D(0.5, seed=1)
    ),
    "spatial_dropout_2d_channels_first": lambda: _sequential(
        (3, 5, 4),
        keras.layers.SpatialDropout2D(
            0.5, data_format="channels_first", seed=1
        ),
    ),
    "spatial_dropout_3d": lambda: _sequential(
        (3, 4, 2, 3), keras.layers.SpatialDropout3D(0.5, seed=1)
    ),
    "gaussian_dropout": lambda: _sequential(
        (6,), keras.layers.GaussianDropout(0.4, seed=1)
    ),
    "gaussian_noise": lambda: _sequential(
        (6,), keras.layers.GaussianNoise(0.5, seed=1)
    ),
    "alpha_dropout": lambda: _sequential(
        (5, 4),
        keras.layers.AlphaDropout(0.3, noise_shape=(None, 5, 1), seed=1),
    ),
    "drop_connect_dense": lambda: _sequential(
        (6,), DropConnectDense(8, rate=0.5, seed=1)
    ),
    "drop_connect_dense_per_example": lambda: _sequential(
        (6,),
        DropConnectDense(8, rate=0.5, mask="sample", activation="relu", seed=1),
    ),
    "drop_connect_conv": lambda: _sequential(
        (6, 5, 2), DropConnectConv2D(3, 3, rate=0.5, seed=1)
    ),
    "drop_path": lambda: _sequential((6,), DropPath(0.3, seed=1)),
    "stochastic_depth": lambda: _sequential(
        (6,),
        StochasticDepth(
            [keras.layers.Dense(6), keras.layers.Dropout(0.3, seed=2)],
            survival_probability=0.5,
            seed=1,
        ),
    ),
    "fractional_max_pooling": lambda: _sequential(
        (9, 7, 2), FractionalMaxPooling2D(1.5, seed=1)
    ),
}


@pytest.mark.parametrize("name", sorted(INVARIANCE_NETS))
def test_each_example_gets_the_same_passes_in_any_batch(name):
    keras.utils.set_random_seed(12)
    net = INVARIANCE_NETS[name]()
    rng = np.random.default_rng(12)
    x = rng.normal(size=(48,) + net.input_shape[1:]).astype("float32")
    averaged = MonteCarloAverage(net, 4, seed=4, average="logits")
    whole = averaged.predict(x, batch_size=64, verbose=0)
    alone = averaged.predict(x, batch_size=1, verbose=0)
    order = rng.permutation(len(x))
    # Batches of 32 and 16, in another order.
    shuffled = averaged.predict(x[order], verbose=0)[np.argsort(order)]
    np.testing.assert_allclose(alone, whole, atol=1e-6)
    np.testing.assert_allclose(shuffled, whole, atol=1e-6)
    assert np.abs(whole - numpy(net(x))).max() > 1e-3, "passes not sampled"


@pytest.mark.slow
@requires_tensorflow
def test_export_serves_predict_whatever_the_batch_size():
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(13).normal(size=(64, 5)).astype("float32")
    averaged = MonteCarloAverage(dropout_net(13), 4, seed=3)
    expected = averaged.predict(x, batch_size=32, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        averaged.export(os.path.join(tmp, "export"), verbose=False)
        reloaded = tf.saved_model.load(os.path.join(tmp, "export"))
        np.testing.assert_allclose(
            reloaded.serve(x).numpy(), expected, atol=1e-6
        )
        np.testing.assert_allclose(
            reloaded.serve(x[5:12]).numpy(), expected[5:12], atol=1e-6
        )


def test_nested_models_are_sampled_at_every_depth():
    x = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")
    dense = keras.layers.Dense(6)
    drop = keras.layers.Dropout(0.5, seed=0)
    head = keras.layers.Dense(2)
    inner = keras.Sequential([keras.Input((6,)), drop])
    inputs = keras.Input((6,))
    middle = keras.Model(inputs, inner(keras.layers.Identity()(inputs)))
    inputs = keras.Input((4,))
    nested = keras.Model(inputs, head(middle(dense(inputs))))
    flat = keras.Sequential([keras.Input((4,)), dense, drop, head])
    got = MonteCarloAverage(nested, 4, seed=3, average="logits")(x)
    expected = MonteCarloAverage(flat, 4, seed=3, average="logits")(x)
    np.testing.assert_allclose(numpy(got), numpy(expected), atol=1e-6)
    assert np.abs(numpy(got) - numpy(flat(x))).max() > 1e-3


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
class NoisyBlock(keras.layers.Layer):
    """A custom layer holding a Dropout in a public attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.dropout = keras.layers.Dropout(0.5, seed=1)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x, training=None):
        return self.dropout(self.dense(x), training=training)


def test_a_custom_class_is_sampled_whole_and_saved_by_name():
    x = np.random.default_rng(8).normal(size=(4, 3)).astype("float32")
    net = keras.Sequential([keras.Input((3,)), NoisyBlock()])
    with pytest.raises(
        ValueError,
        match=r"not inside a custom layer \(found: \['dropout.*'\]\); list "
        r"a custom layer's class in `stochastic_layers`",
    ):
        MonteCarloAverage(net, 2)
    averaged = MonteCarloAverage(
        net, 3, seed=2, average="logits", stochastic_layers=[NoisyBlock]
    )
    block = net.layers[0]
    dropout = keras.layers.Dropout(0.5, seed=documented_seed(2, 0))
    expected = np.mean(
        [numpy(dropout(block.dense(x), training=True)) for _ in range(3)],
        axis=0,
    )
    np.testing.assert_allclose(numpy(averaged(x)), expected, atol=1e-6)
    config = averaged.get_config()
    assert config["stochastic_layers"] == ["keras_regkit_tests>NoisyBlock"]
    restored = MonteCarloAverage.from_config(config)
    assert restored.stochastic_layers == (NoisyBlock,)


@pytest.mark.slow
@requires_tensorflow
def test_saves_loads_exports_and_serves_predict():
    import tensorflow as tf

    x = np.random.default_rng(9).normal(size=(6, 5)).astype("float32")
    net = dropout_net(9)
    averaged = MonteCarloAverage(net, 3, seed=1, return_spread=True)
    expected = averaged.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "averaged.keras")
        averaged.save(path)
        loaded = keras.models.load_model(path)
        assert (loaded.num_passes, loaded.seed) == (3, 1)
        for got, want in zip(loaded.predict(x, verbose=0), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
        averaged.export(os.path.join(tmp, "export"), verbose=False)
        reloaded = tf.saved_model.load(os.path.join(tmp, "export"))
        served = reloaded.serve(x)
        for got, want in zip(served, expected):
            np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@requires_tensorflow
def test_predict_skips_xla_on_tensorflow_whose_xla_draws_differ():
    x = np.random.default_rng(10).normal(size=(4, 5)).astype("float32")
    averaged = MonteCarloAverage(dropout_net(10), 2, seed=0)
    averaged.compile("sgd", "mse", jit_compile=True)
    assert averaged.jit_compile is False
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), numpy(averaged(x)), atol=1e-6
    )


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dropout = keras.layers.Dropout(0.5)

    def call(self, x):
        return self.dropout(x)


class Seedless(keras.layers.Layer):
    def call(self, x, training=None):
        return x


def test_bad_arguments():
    net = dropout_net()
    cases = [
        (
            {"model": keras.layers.Dense(2)},
            r"`model`\. Expected a keras\.Model\. Received: model=",
        ),
        (
            {"model": _Subclassed()},
            (
                r"`model`\. Expected a Functional or Sequential keras\.Model "
                r"\(nested ones included\), whose stochastic layers"
            ),
        ),
        (
            {
                "model": keras.Sequential(
                    [keras.Input((2,)), keras.layers.Dense(2)]
                )
            },
            (
                r"`model`\. Expected a model with a stochastic layer \(one of "
                r"\['AlphaDropout', 'DropConnectConv2D'.*it has none"
            ),
        ),
        (
            {"num_passes": 0},
            r"`num_passes`\. Expected an int >= 1\. Received: num_passes=0",
        ),
        (
            {"seed": -1},
            r"`seed`\. Expected an int >= 0 or None\. Received: seed=-1",
        ),
        ({"average": "mean"}, r"`average`\. Expected one of 'probabilities'"),
        (
            {"average": "logits", "from_logits": True},
            r"`from_logits`\. Expected False with average='logits'",
        ),
        (
            {"return_spread": 1},
            r"`return_spread`\. Expected a bool\. Received: return_spread=1",
        ),
        (
            {"stochastic_layers": [keras.layers.Dense(2)]},
            (
                r"`stochastic_layers`\. Expected None or a list of "
                r"keras\.layers\.Layer subclasses\. Received:"
            ),
        ),
    ]
    for kwargs, match in cases:
        kwargs = {"model": net, **kwargs}
        with pytest.raises(ValueError, match=match):
            MonteCarloAverage(**kwargs)
    seedless = keras.Sequential([keras.Input((2,)), Seedless()])
    with pytest.raises(
        ValueError,
        match=r"`stochastic_layers`\. Expected classes whose layers draw from "
        r"a keras\.random\.SeedGenerator held in a public attribute \(layer "
        r"'seedless' holds none\)",
    ):
        MonteCarloAverage(seedless, stochastic_layers=[Seedless])
    with pytest.raises(TypeError, match=r"Could not find the layer class"):
        MonteCarloAverage.from_config(
            dict(
                MonteCarloAverage(net, 2).get_config(),
                stochastic_layers=["NoSuchLayer"],
            )
        )


def test_a_spread_wrapper_refuses_training():
    averaged = MonteCarloAverage(dropout_net(), 2, return_spread=True)
    with pytest.raises(ValueError, match=r"returns \(mean, spread\) in "):
        averaged(np.ones((2, 5), "float32"), training=True)


def test_fractional_pooling_average_is_the_lattice_case():
    x = np.random.default_rng(11).normal(size=(2, 9, 7, 1)).astype("float32")
    net = keras.Sequential(
        [keras.Input((9, 7, 1)), FractionalMaxPooling2D(1.5, seed=0)]
    )
    plain = FractionalPoolingAverage(net, 4)
    spread = FractionalPoolingAverage(net, 4, return_spread=True)
    assert isinstance(plain, MonteCarloAverage)
    assert set(plain.get_config()) >= {"model", "num_passes", "average"}
    assert "seed" not in plain.get_config()
    mean, std = (numpy(t) for t in spread(x))
    np.testing.assert_array_equal(mean, numpy(plain(x)))
    # Pass 0 is the deterministic pass; the lattice's others differ.
    deterministic = numpy(net(x))
    assert std.max() > 0 and np.abs(mean - deterministic).max() > 0
    _, single = FractionalPoolingAverage(net, 1, return_spread=True)(x)
    np.testing.assert_array_equal(numpy(single), 0.0)
    with pytest.raises(
        ValueError,
        match=r"`model`\. Expected a model with a FractionalMaxPooling2D "
        r"layer; it has none",
    ):
        FractionalPoolingAverage(dropout_net(), 2)
