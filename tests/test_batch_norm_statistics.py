import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_regkit.callbacks import BatchNormStatistics
from keras_regkit.callbacks import recompute_batchnorm_statistics
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers


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
    for layer in (bn1, bn2, bn3):
        assert "call" not in layer.__dict__


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


def test_batch_renormalization_statistics_follow():
    bn = keras.layers.BatchNormalization(renorm=True, epsilon=0.01)
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


def _debiased_class():
    try:
        from keras_regkit.layers import DebiasedBatchNormalization
    except ImportError:
        return None
    return DebiasedBatchNormalization


_needs_debiased = pytest.mark.skipif(
    _debiased_class() is None,
    reason="DebiasedBatchNormalization has not landed",
)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_CustomBatchNormalization, id="subclass"),
        pytest.param(
            lambda: _debiased_class()(),
            marks=_needs_debiased,
            id="DebiasedBatchNormalization",
        ),
        pytest.param(
            lambda: _debiased_class()(moving_statistics="cumulative"),
            marks=_needs_debiased,
            id="DebiasedBatchNormalization-cumulative",
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
        import tensorflow as tf

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


def test_layer_never_called_is_reported():
    unused = keras.layers.BatchNormalization()

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.BatchNormalization()
            self.unused = unused

        def call(self, x, training=False):
            return self.used(x, training=training)

    model = Model()
    unused.build((None, 2))
    model(np.zeros((1, 2)))
    with pytest.warns(UserWarning, match=re.escape(unused.name)):
        done = recompute_batchnorm_statistics(model, np.ones((4, 2)))
    assert done == [model.used]


def test_hooks_are_removed_when_the_forward_pass_fails():
    model, _ = _nested_model()
    with pytest.raises(ValueError, match="shape"):
        recompute_batchnorm_statistics(model, np.zeros((4, 7), "float32"))
    for layer in batch_norm_layers(model):
        assert "call" not in layer.__dict__


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


@pytest.mark.parametrize(
    "data, received",
    [
        (np.zeros((0, 3), "float32"), "Received: data=array([], shape=(0, 3)"),
        ([], "Received: data=[]"),
        (_empty_generator(), "Received: data=<generator object"),
        ("dataset", "Received: data=<"),
    ],
)
def test_data_yielding_nothing_is_refused(data, received):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    if isinstance(data, str):
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices(np.zeros((0, 3))).batch(2)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid value received for argument `data`. Expected data "
            "yielding at least one batch of inputs (it yielded none). "
        )
        + re.escape(received),
    ):
        recompute_batchnorm_statistics(model, data)
    # The callback fails the same way at the end of training.
    model.compile("sgd", "mse")
    callback = BatchNormStatistics([])
    with pytest.raises(ValueError, match="it yielded none"):
        model.fit(
            np.zeros((4, 3)),
            np.zeros((4, 3)),
            verbose=0,
            callbacks=[callback],
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"steps": 0},
            "`steps`. Expected None or an int >= 1. Received: steps=0",
        ),
        ({"steps": 2.5}, "Received: steps=2.5"),
        ({"steps": True}, "Received: steps=True"),
        (
            {"batch_size": 0},
            (
                "`batch_size`. Expected None or an int >= 1. "
                "Received: batch_size=0"
            ),
        ),
    ],
)
def test_bad_counts(kwargs, message):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        recompute_batchnorm_statistics(model, np.ones((4, 3)), **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchNormStatistics(np.ones((4, 3)), **kwargs)


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
