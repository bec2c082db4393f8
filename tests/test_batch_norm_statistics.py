import inspect
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_regkit.callbacks import BatchNormStatistics
from keras_regkit.callbacks import recompute_batchnorm_statistics
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers
from keras_regkit.layers import DebiasedBatchNormalization

KERAS_HAS_RENORM = (
    "renorm"
    in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def _assert_statistics(layer, inputs, axes=None, weights=None):
    """`layer`'s statistics are the mean / unbiased variance of `inputs`."""
    inputs = np.asarray(inputs, np.float64)
    channel = layer.axis % inputs.ndim
    axes = tuple(i for i in range(inputs.ndim) if i != channel)
    if weights is None:
        weights = np.ones_like(inputs)
    count = weights.sum(axis=axes)
    shape = [1] * inputs.ndim
    shape[channel] = -1
    mean = (weights * inputs).sum(axis=axes) / count
    centred = inputs - mean.reshape(shape)
    variance = (weights * centred**2).sum(axis=axes) / (count - 1)
    for name, actual, expected, atol in (
        ("mean", layer.moving_mean, mean, 1e-5),
        ("variance", layer.moving_variance, variance, 1e-6),
    ):
        np.testing.assert_allclose(
            _np(actual),
            expected,
            rtol=1e-5,
            atol=atol,
            err_msg=f"{layer.name}: {name}",
        )


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            w if "moving" in v.path else rng.normal(size=w.shape) + 0.3
            for v, w in zip(model.weights, model.get_weights())
        ]
    )


def _nested_model():
    d1 = keras.layers.Dense(6)
    bn1 = keras.layers.BatchNormalization()
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dropout(0.5),
        ]
    )
    d3 = keras.layers.Dense(3, activation="relu")
    bn3 = keras.layers.BatchNormalization(epsilon=0.1)
    inputs = keras.Input((4,))
    outputs = bn3(d3(inner(bn1(d1(inputs)))))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    return model, (d1, bn1, inner, d3, bn3)


def _assert_nested_statistics(layers, x):
    """Checks every batch norm of `_nested_model` against NumPy.

    Each holds the statistics of what it sees at inference: the output of
    the recomputed layers before it.
    """
    d1, bn1, inner, d3, bn3 = layers
    d2, bn2, dropout = inner.layers
    h = d1(x)
    _assert_statistics(bn1, _np(h))
    h = d2(bn1(h, training=False))
    _assert_statistics(bn2, _np(h))
    h = d3(dropout(bn2(h, training=False), training=False))
    _assert_statistics(bn3, _np(h))


def test_each_layer_matches_numpy_statistics_of_its_inputs():
    model, layers = _nested_model()
    _, bn1, inner, _, bn3 = layers
    bn2 = inner.layers[1]
    # Discovery finds every layer, nested ones included; the order in which
    # they are recomputed (the forward order) is checked below.
    found = [id(b) for b in batch_norm_layers(model)]
    assert sorted(found) == sorted([id(bn1), id(bn2), id(bn3)])
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(50, 4))
    x = x.astype("float32")
    done = recompute_batchnorm_statistics(model, x, batch_size=7)
    assert [layer.name for layer in done] == [bn1.name, bn2.name, bn3.name]
    _assert_nested_statistics(layers, x)


def test_channel_axis_one_and_odd_spatial_sizes():
    inputs = keras.Input((3, 5, 7))
    first = keras.layers.BatchNormalization(axis=1)
    conv = keras.layers.Conv2D(4, 3, data_format="channels_last")
    last = keras.layers.BatchNormalization(axis=-1)
    model = keras.Model(inputs, last(conv(first(inputs))))
    _randomize(model)
    x = np.random.default_rng(2).uniform(-1, 4, size=(9, 3, 5, 7))
    x = x.astype("float32")
    recompute_batchnorm_statistics(model, x, batch_size=4)
    _assert_statistics(first, x)
    _assert_statistics(last, _np(conv(first(x, training=False))))


def test_masked_inputs_are_weighted_by_the_mask():
    inputs = keras.Input((6, 3))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inputs, bn(masked))
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(8, 6, 3)).astype("float32")
    keep = rng.uniform(size=(8, 6)) > 0.4
    x[~keep] = 0.0
    recompute_batchnorm_statistics(model, x, batch_size=3)
    weights = np.broadcast_to(keep[..., None], x.shape).astype(np.float64)
    _assert_statistics(bn, x, weights=weights)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: keras.layers.BatchNormalization(renorm=True, epsilon=0.01),
            marks=pytest.mark.skipif(
                not KERAS_HAS_RENORM, reason="Keras < 3.14: no renorm"
            ),
            id="keras",
        ),
        pytest.param(
            lambda: DebiasedBatchNormalization(renorm=True, epsilon=0.01),
            id="debiased",
        ),
    ],
)
def test_batch_renormalization_statistics_follow(make):
    bn = make()
    model = keras.Sequential([keras.Input((3,)), bn])
    x = np.random.default_rng(4).normal(5.0, 2.0, size=(20, 3))
    x = x.astype("float32")
    recompute_batchnorm_statistics(model, x)
    _assert_statistics(bn, x)
    stddev = np.sqrt(x.var(0, ddof=1) + 0.01)
    np.testing.assert_allclose(_np(bn.moving_stddev), stddev, rtol=1e-5)
    np.testing.assert_allclose(_np(bn.renorm_stddev), stddev, rtol=1e-5)
    np.testing.assert_allclose(_np(bn.renorm_mean), x.mean(0), rtol=1e-5)


class _CustomBatchNormalization(keras.layers.BatchNormalization):
    pass


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_CustomBatchNormalization, id="subclass"),
        pytest.param(DebiasedBatchNormalization, id="debiased"),
        pytest.param(
            lambda: DebiasedBatchNormalization(moving_statistics="cumulative"),
            id="debiased-cumulative",
        ),
    ],
)
def test_subclasses_are_recomputed(make):
    bn = make()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), bn])
    _randomize(model)
    x = np.random.default_rng(5).normal(size=(30, 4)).astype("float32")
    assert recompute_batchnorm_statistics(model, x, batch_size=8) == [bn]
    _assert_statistics(bn, _np(model.layers[0](x)))
    if getattr(bn, "moving_count", None) is not None:
        # The running means now stand for the 4 batches seen.
        assert float(_np(bn.moving_count)) == 4.0


def test_frozen_layers_are_left_alone():
    frozen = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((3,)), frozen])
    frozen.trainable = False
    before = [_np(frozen.moving_mean), _np(frozen.moving_variance)]
    assert recompute_batchnorm_statistics(model, np.ones((4, 3))) == []
    np.testing.assert_array_equal(_np(frozen.moving_mean), before[0])
    np.testing.assert_array_equal(_np(frozen.moving_variance), before[1])


class _Batches(keras.utils.PyDataset):
    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return 3

    def __getitem__(self, index):
        part = self.x[index * 10 : (index + 1) * 10]
        return {"features": part}, np.zeros(len(part))


def _generator(x, size=10):
    for begin in range(0, len(x), size):
        yield {"features": x[begin : begin + size]}, np.zeros(size)


@pytest.mark.parametrize(
    "make, steps, used",
    [
        (lambda x: {"features": x}, None, 30),
        (lambda x: ({"features": x}, np.zeros(len(x))), None, 30),
        (lambda x: {"features": x}, 2, 20),
        (lambda x: _generator(x), None, 30),
        (lambda x: _generator(x), 1, 10),
        (lambda x: [{"features": x[:10]}, {"features": x[10:]}], None, 30),
        (lambda x: _Batches(x), 2, 20),
        ("dataset", 2, 20),
    ],
)
def test_data_forms(make, steps, used):
    inputs = keras.Input((3,), name="features")
    bn = keras.layers.BatchNormalization()
    model = keras.Model({"features": inputs}, bn(inputs))
    x = np.random.default_rng(6).normal(size=(30, 3)).astype("float32")
    if make == "dataset":
        tf = pytest.importorskip("tensorflow")
        data = tf.data.Dataset.from_tensor_slices(({"features": x}, x))
        data = data.batch(10)
    else:
        data = make(x)
    recompute_batchnorm_statistics(model, data, steps=steps, batch_size=10)
    _assert_statistics(bn, x[:used])


@pytest.mark.parametrize("as_tuple", [False, True])
def test_plain_arrays_in_batches(as_tuple):
    bn = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((3,)), bn])
    x = np.random.default_rng(9).normal(size=(25, 3)).astype("float32")
    data = (x, np.zeros(len(x))) if as_tuple else x
    recompute_batchnorm_statistics(model, data, batch_size=4)
    _assert_statistics(bn, x)


def test_a_single_value_has_zero_variance():
    bn = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((2,)), bn])
    recompute_batchnorm_statistics(model, np.array([[3.0, -1.0]], "float32"))
    np.testing.assert_array_equal(_np(bn.moving_mean), [3.0, -1.0])
    np.testing.assert_array_equal(_np(bn.moving_variance), [0.0, 0.0])


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=False):
        return self.norm(self.dense(x), training=training)


class _Wrapper(keras.layers.Layer):
    """A custom layer that calls its batch norm from its own `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.norm(self.dense(x), training=training)


def _custom_layer_model():
    """A functional model whose batch norm sits inside a custom layer."""
    wrapper = _Wrapper()
    inputs = keras.Input((2,))
    outputs = keras.layers.BatchNormalization()(wrapper(inputs))
    return keras.Model(inputs, outputs), wrapper.norm


def test_batch_norm_inside_a_stochastic_depth_branch_is_recomputed():
    # StochasticDepth applies its public `block` in sequence: the branch is
    # replayed from the layer's input, as at inference.
    from keras_regkit.layers import StochasticDepth

    block = [
        keras.layers.Dense(3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(3),
        keras.layers.BatchNormalization(),
    ]
    inputs = keras.Input((3,))
    first = keras.layers.Dense(3)
    model = keras.Model(
        inputs, StochasticDepth(block, 0.5, seed=1)(first(inputs))
    )
    _randomize(model)
    x = np.random.default_rng(4).normal(size=(40, 3)).astype("float32")
    done = recompute_batchnorm_statistics(model, x, batch_size=7)
    assert done == [block[1], block[4]]
    hidden = block[0](first(x))
    _assert_statistics(block[1], _np(hidden))
    after = block[3](block[2](block[1](hidden, training=False)))
    _assert_statistics(block[4], _np(after))


@pytest.mark.parametrize("form", ["subclassed", "custom layer"])
def test_layers_outside_a_functional_graph_are_refused(form):
    if form == "subclassed":
        model = SubclassedModel()
        model(np.zeros((1, 2)))
        hidden = model.norm
    else:
        model, hidden = _custom_layer_model()
    before = [_np(v) for v in model.non_trainable_weights]
    with pytest.raises(
        ValueError,
        match=r"must be in the graph of a Functional or Sequential model.*"
        + re.escape(repr(hidden.name))
        + r".*trainable=False",
    ):
        recompute_batchnorm_statistics(model, np.ones((4, 2)))
    for variable, value in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(_np(variable), value)
    # Frozen, it is left alone and the rest is recomputed.
    hidden.trainable = False
    done = recompute_batchnorm_statistics(model, np.ones((4, 2)))
    assert all(layer is not hidden for layer in done)


def test_nested_functional_model_is_read_through_its_outer_call():
    inner_inputs = keras.Input((5,))
    inner_norm = keras.layers.BatchNormalization()
    inner = keras.Model(
        inner_inputs, inner_norm(keras.layers.Dense(4)(inner_inputs))
    )
    inputs = keras.Input((3,))
    first = keras.layers.Dense(5)
    model = keras.Model(inputs, inner(first(inputs)))
    _randomize(model)
    x = np.random.default_rng(10).normal(size=(12, 3)).astype("float32")
    assert recompute_batchnorm_statistics(model, x, batch_size=5) == [
        inner_norm
    ]
    _assert_statistics(inner_norm, _np(inner.layers[1](first(x))))


def test_wrong_input_shape_is_refused_and_statistics_unchanged():
    model, _ = _nested_model()
    before = [_np(v) for v in model.non_trainable_weights]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid value received for argument `data`. Expected batches of "
            "inputs of shape [(None, 4)]"
        )
        + r".*Received: data=<arrays of shape \(4, 7\)>",
    ):
        recompute_batchnorm_statistics(model, np.zeros((4, 7), "float32"))
    for variable, value in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(_np(variable), value)


def _with_non_finite(x, value):
    x = x.copy()
    x[3, 1] = value
    return x


@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("form", ["array", "list", "generator"])
def test_non_finite_data_is_refused_and_statistics_unchanged(value, form):
    model, _ = _nested_model()
    x = np.random.default_rng(11).normal(size=(20, 4)).astype("float32")
    recompute_batchnorm_statistics(model, x, batch_size=5)
    before = [_np(v) for v in model.non_trainable_weights]
    bad = _with_non_finite(x, value)
    data = {
        "array": bad,
        "list": [bad[:10], bad[10:]],
        "generator": (bad[i : i + 5] for i in range(0, 20, 5)),
    }[form]
    with pytest.raises(
        ValueError,
        match=r"argument `data`\. Expected finite inputs .* 1 non-finite",
    ):
        recompute_batchnorm_statistics(model, data, batch_size=5)
    for variable, old in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(_np(variable), old)


def test_overflow_inside_the_model_restores_every_statistic():
    # The first layer's statistics are recomputed, then the second layer's
    # inputs overflow: both are left as they were.
    inputs = keras.Input((2,))
    first = keras.layers.BatchNormalization()
    huge = keras.layers.Dense(
        2, kernel_initializer=keras.initializers.Constant(1e30)
    )
    second = keras.layers.BatchNormalization()
    model = keras.Model(inputs, second(huge(first(inputs))))
    before = [_np(v) for v in model.non_trainable_weights]
    x = np.random.default_rng(12).normal(1e9, 1e9, size=(8, 2))
    with pytest.raises(ValueError, match=r"inputs of '.*' are not finite"):
        recompute_batchnorm_statistics(model, x.astype("float32"))
    for variable, old in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(_np(variable), old)


def test_callback_recomputes_for_the_final_weights():
    x = np.random.default_rng(7).normal(size=(64, 4)).astype("float32")
    y = x[:, :1] * 2.0
    model, layers = _nested_model()
    model = keras.Sequential([model, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[BatchNormStatistics(x, batch_size=16)],
    )
    assert len(history.history["loss"]) == 2
    _assert_nested_statistics(layers, x)


def test_mixed_precision_statistics_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        dense = keras.layers.Dense(3)
        bn = keras.layers.BatchNormalization()
        model = keras.Sequential([keras.Input((4,)), dense, bn])
        x = np.random.default_rng(8).normal(size=(20, 4)).astype("float32")
        recompute_batchnorm_statistics(model, x)
        h = dense(x)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert bn.moving_mean.dtype == "float32"
    assert keras.backend.standardize_dtype(h.dtype) == "float16"
    _assert_statistics(bn, _np(h))


def test_config_round_trip():
    callback = BatchNormStatistics([np.zeros((2, 3))], steps=5, batch_size=2)
    config = callback.get_config()
    clone = BatchNormStatistics.from_config(config)
    assert clone.get_config() == config
    assert (
        keras.saving.get_registered_object("keras_regkit>BatchNormStatistics")
        is BatchNormStatistics
    )


def _empty_generator():
    yield from ()


def _empty_dataset():
    tf = pytest.importorskip("tensorflow")
    return tf.data.Dataset.from_tensor_slices(np.zeros((0, 3))).batch(2)


_EMPTY = re.escape(
    "Invalid value received for argument `data`. Expected data yielding at "
    "least one batch of inputs (it yielded none). "
)


def _bn_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    model.compile("sgd", "mse")
    return model


class _EpochCounter(keras.callbacks.Callback):
    epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def _fit_fails_before_any_epoch(model, callback, match):
    counter = _EpochCounter()
    with pytest.raises(ValueError, match=match):
        model.fit(
            np.zeros((4, 3)),
            np.zeros((4, 3)),
            epochs=3,
            verbose=0,
            callbacks=[counter, callback],
        )
    assert counter.epochs == 0


@pytest.mark.parametrize(
    "make, received",
    [
        (lambda: np.zeros((0, 3), "float32"), "data=array([], shape=(0, 3)"),
        (list, "data=[]"),
        (_empty_generator, "data=<generator object"),
        (_empty_dataset, "data=<"),
    ],
)
def test_data_yielding_nothing_is_refused(make, received):
    pattern = _EMPTY + re.escape("Received: " + received)
    with pytest.raises(ValueError, match=pattern):
        recompute_batchnorm_statistics(_bn_model(), make())
    # The callback refuses it at construction when it can tell (arrays,
    # lists), else at the start of training, before any epoch runs.
    data = make()
    if isinstance(data, (list, np.ndarray)):
        with pytest.raises(ValueError, match=pattern):
            BatchNormStatistics(data)
    else:
        _fit_fails_before_any_epoch(
            _bn_model(), BatchNormStatistics(data), pattern
        )


def test_callback_refuses_none_and_non_finite_data_at_construction():
    with pytest.raises(
        ValueError, match=r"`data`\. Expected an iterable .* data=None"
    ):
        BatchNormStatistics(None)
    x = np.ones((8, 3), "float32")
    x[5, 2] = np.nan
    with pytest.raises(
        ValueError,
        match=r"Expected finite inputs .* Received: data=<arrays of shape "
        r"\(8, 3\)> with 1 non-finite",
    ):
        BatchNormStatistics(x)
    with pytest.raises(ValueError, match=r"data=<list of 2 batches>"):
        BatchNormStatistics([x[:4], x[4:]])


@pytest.mark.parametrize("form", ["array", "generator"])
def test_callback_refuses_the_wrong_shape_before_training(form):
    x = np.zeros((8, 5), "float32")
    data = x if form == "array" else (x[i : i + 4] for i in (0, 4))
    _fit_fails_before_any_epoch(
        _bn_model(),
        BatchNormStatistics(data),
        re.escape("Expected batches of inputs of shape [(None, 3)]"),
    )


def test_callback_refuses_a_subclassed_model_before_training():
    model = SubclassedModel()
    model.compile("sgd", "mse")
    counter = _EpochCounter()
    with pytest.raises(ValueError, match="Functional or Sequential"):
        model.fit(
            np.zeros((4, 2)),
            np.zeros((4, 2)),
            epochs=2,
            verbose=0,
            callbacks=[counter, BatchNormStatistics(np.zeros((4, 2)))],
        )
    assert counter.epochs == 0


def test_callback_reads_a_generator_once_and_fully():
    x = np.random.default_rng(13).normal(size=(12, 3)).astype("float32")
    model = _bn_model()
    callback = BatchNormStatistics(x[i : i + 4] for i in range(0, 12, 4))
    model.fit(x, x, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    _assert_statistics(model.layers[0], x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"steps": 0},
            "`steps`. Expected an int >= 1 or None. Received: steps=0",
        ),
        ({"steps": 2.5}, "Received: steps=2.5"),
        ({"steps": True}, "Received: steps=True"),
        (
            {"batch_size": 0},
            (
                "`batch_size`. Expected an int >= 1 or None. "
                "Received: batch_size=0"
            ),
        ),
        ({"verbose": -1}, "`verbose`. Expected an int >= 0"),
        ({"verbose": "yes"}, "Received: verbose='yes'"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        recompute_batchnorm_statistics(model, np.ones((4, 3)), **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchNormStatistics(np.ones((4, 3)), **kwargs)


def test_numpy_scalars_are_accepted():
    bn = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((3,)), bn])
    x = np.random.default_rng(14).normal(size=(12, 3)).astype("float32")
    recompute_batchnorm_statistics(
        model, x, steps=np.int64(2), batch_size=np.int32(4), verbose=np.int8(0)
    )
    _assert_statistics(bn, x[:8])
    callback = BatchNormStatistics(x, steps=np.int64(2), batch_size=np.int16(4))
    assert (callback.steps, callback.batch_size) == (2, 4)


def test_non_iterable_data_is_refused():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`data`. Expected an iterable of batches (a `tf.data.Dataset`, a "
            "`keras.utils.PyDataset`, a generator, a list) or arrays. "
            "Received: data=5"
        ),
    ):
        recompute_batchnorm_statistics(model, 5)


def test_small_example_emits_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.BatchNormalization()]
        )
        x = np.arange(12, dtype="float32").reshape(4, 3)
        recompute_batchnorm_statistics(model, x, batch_size=3)
        np.testing.assert_array_equal(
            _np(model.layers[0].moving_variance), [15.0, 15.0, 15.0]
        )
