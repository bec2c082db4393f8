"""Every layer and callback under the global `mixed_float16` policy.

Keras then computes in float16, keeps variables in float32 and wraps the
optimizer in a `LossScaleOptimizer`. Each part must train (finite loss),
export (serving equal to `predict`), and keep what it accumulates, batch
statistics, averages, snapshots, schedules, in float32.
"""

import json

import h5py
import keras
import numpy as np
import pytest
from conftest import backend_is_tensorflow
from lr_policy_checks import BatchRecorder
from lr_policy_checks import cyclic_reference
from lr_policy_checks import fit_probe
from lr_policy_checks import one_cycle_reference
from lr_policy_checks import probe_model

from keras_regkit.callbacks import BatchNormStatistics
from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.callbacks import lr_range_test
from keras_regkit.callbacks import snapshot_ensemble_model
from keras_regkit.layers import DebiasedBatchNormalization
from keras_regkit.layers import DropConnectConv2D
from keras_regkit.layers import DropConnectDense
from keras_regkit.layers import DropPath
from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage
from keras_regkit.layers import StochasticDepth
from keras_regkit.schedules import CyclicalLearningRate


@pytest.fixture(autouse=True)
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _images(samples=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 8, 8, 2)).astype("float32")
    return x, rng.integers(0, 3, size=(samples,))


def _classifier(*middle):
    """Conv2D -> middle -> Flatten -> Dense(3) -> float32 logits."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    for layer in middle:
        if layer == "flatten":
            x = keras.layers.Dense(8)(keras.layers.Flatten()(x))
        else:
            x = layer(x)
    if len(x.shape) > 2:
        x = keras.layers.Flatten()(x)
    # Keras's advice for mixed precision: float32 outputs for the loss.
    x = keras.layers.Dense(3)(x)
    outputs = keras.layers.Activation("linear", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _assert_serves_what_it_predicts(model, x, tmp_path):
    if not backend_is_tensorflow():
        return  # SavedModel serving needs TensorFlow.
    import tensorflow as tf

    model.export(str(tmp_path / "served"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "served"))
    served = np.asarray(loaded.serve(x))
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-5)


LAYERS = {
    "drop_connect_dense": lambda: DropConnectDense(
        8, mask="sample", inference="gaussian", activation="relu", seed=1
    ),
    "drop_connect_conv2d": lambda: DropConnectConv2D(4, 3, seed=1),
    "stochastic_depth": lambda: StochasticDepth(
        [keras.layers.Dense(8), DebiasedBatchNormalization()], 0.5, seed=1
    ),
    "drop_path": lambda: DropPath(0.3, seed=1),
    "fractional_max_pooling": lambda: FractionalMaxPooling2D(1.5, seed=1),
    "debiased_batch_norm": lambda: DebiasedBatchNormalization(renorm=True),
    "debiased_batch_norm_cumulative": lambda: DebiasedBatchNormalization(
        moving_statistics="cumulative"
    ),
}
_DENSE_INPUT = {"drop_connect_dense", "stochastic_depth", "drop_path"}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_layer_trains_and_exports_in_mixed_precision(case, tmp_path):
    layer = LAYERS[case]()
    middle = ("flatten", layer) if case in _DENSE_INPUT else (layer,)
    model = _classifier(*middle)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert layer.compute_dtype == "float16"
    x, y = _images()
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Weights and statistics are float32 variables, and still finite.
    for variable in layer.weights:
        assert variable.dtype in ("float32", "uint32", "int32"), variable.path
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(variable)))
    features = keras.Model(model.inputs, layer.output)
    out = features(x[:16], training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    _assert_serves_what_it_predicts(model, x, tmp_path)
    restored_path = tmp_path / "model.keras"
    model.save(restored_path)
    restored = keras.saving.load_model(restored_path)
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_fractional_pooling_average_exports_in_mixed_precision(tmp_path):
    model = _classifier(FractionalMaxPooling2D(1.5, seed=1))
    x, y = _images()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    averaged = FractionalPoolingAverage(model, num_passes=4)
    # Exported before any call on data: the wrapper of a built functional
    # model is built (and traced symbolically) at construction.
    _assert_serves_what_it_predicts(averaged, x, tmp_path)
    assert averaged.predict(x, verbose=0).dtype == np.float32


def test_cyclic_schedules_drive_the_wrapped_optimizer():
    # The probe's gradient is 1, so its weight moves by the applied rate:
    # the loss scaling must neither hide the schedule nor distort it.
    model = probe_model(keras.optimizers.SGD(0.5))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    recorder = BatchRecorder()
    fit_probe(model, 7, 2, [CyclicLR(0.01, 0.2, 4), recorder])
    np.testing.assert_allclose(
        recorder.applied_rates(),
        cyclic_reference(range(14), 0.01, 0.2, 4),
        rtol=1e-5,
        atol=1e-6,  # differences of float32 weights near 1
    )

    model = probe_model(
        keras.optimizers.SGD(CyclicalLearningRate(0.01, 0.2, 4))
    )
    recorder = BatchRecorder()
    fit_probe(model, 7, 2, [recorder])
    np.testing.assert_allclose(
        recorder.applied_rates(),
        cyclic_reference(range(14), 0.01, 0.2, 4),
        rtol=1e-5,
        atol=1e-6,
    )

    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    one_cycle = OneCycle(
        0.3, total_steps=12, base_momentum=None, max_momentum=None
    )
    fit_probe(model, 6, 2, [one_cycle, recorder])
    rates, _ = one_cycle_reference(range(12), 0.3, 12)
    np.testing.assert_allclose(
        recorder.applied_rates(), rates, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: CyclicLR(
            0.01, 0.1, step_size=3, base_momentum=0.8, max_momentum=0.9
        ),
        lambda: OneCycle(0.1, total_steps=8),
        lambda: OneCycle(
            0.1, total_steps=8, base_momentum=None, max_momentum=None
        ),
        lambda: PolyakAveraging(decay=0.9),
        lambda: PolyakAveraging(
            decay=None,
            batch_norm="recompute",
            batch_norm_data=_images()[0],
        ),
        lambda: BatchNormStatistics(_images()[0], batch_size=16),
    ],
    ids=[
        "cyclic_lr",
        "one_cycle",
        "one_cycle_rate_only",
        "polyak_ema",
        "swa_recompute",
        "batch_norm_statistics",
    ],
)
def test_callback_trains_and_exports_in_mixed_precision(make, tmp_path):
    model = _classifier(DebiasedBatchNormalization(), "flatten")
    callback = make()
    x, y = _images()
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback]
    )
    assert np.all(np.isfinite(history.history["loss"]))
    bn = model.layers[2]
    for variable in (bn.moving_mean, bn.moving_variance):
        assert variable.dtype == "float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(variable)))
    if isinstance(callback, PolyakAveraging):
        assert callback.num_averaged > 0
        assert all(a.dtype == np.float32 for a in callback.get_averages())
    _assert_serves_what_it_predicts(model, x, tmp_path)


def test_snapshots_are_float32_and_the_ensemble_exports(tmp_path):
    model = _classifier(DebiasedBatchNormalization(), "flatten")
    x, y = _images()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        verbose=0,
        callbacks=[SnapshotEnsemble(2, 0.1, tmp_path / "snapshots")],
    )
    manifest = json.loads(
        (tmp_path / "snapshots" / "manifest.json").read_text()
    )
    assert len(manifest["snapshots"]) == 2
    paths = sorted((tmp_path / "snapshots").glob("*.weights.h5"))
    assert len(paths) == 2
    for path in paths:
        floats = []

        def collect(_, item, found=floats):
            if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
                found.append(item.dtype)

        with h5py.File(path, "r") as f:
            f["layers"].visititems(collect)
        assert floats and all(dtype == np.float32 for dtype in floats)
    ensemble = snapshot_ensemble_model(tmp_path / "snapshots", from_logits=True)
    probabilities = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    _assert_serves_what_it_predicts(ensemble, x, tmp_path)


def test_lr_range_test_restores_the_loss_scale_too():
    model = _classifier("flatten")
    x, y = _images()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    before = [keras.ops.convert_to_numpy(v) for v in model.variables]
    optimizer_before = [
        keras.ops.convert_to_numpy(v) for v in model.optimizer.variables
    ]
    test = lr_range_test(
        model, x, y, batch_size=16, min_lr=1e-4, max_lr=1e3, steps=20
    )
    assert len(test.losses) > 0
    for a, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), a)
    for a, v in zip(optimizer_before, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), a)
