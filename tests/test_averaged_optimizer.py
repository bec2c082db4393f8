"""Tests for keras_regkit.optimizers.AveragedOptimizer."""

import functools
import os

import keras
import numpy as np
import pytest

from keras_regkit._training import sync_model_state
from keras_regkit.optimizers import AveragedOptimizer

X = np.random.default_rng(0).normal(size=(24, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(24, 2)).astype("float32")
BATCH = 4  # 6 steps per epoch.


class Recorder(keras.callbacks.Callback):
    """Records the trainable weights after every train batch."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        sync_model_state(self.model)
        self.weights.append(
            [np.array(v.numpy()) for v in self.model.trainable_variables]
        )


def _model(optimizer, steps_per_execution=1):
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def _fit(model, epochs=2, callbacks=()):
    recorder = Recorder()
    model.fit(
        X,
        Y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, *callbacks],
    )
    return recorder.weights


def _reference(trajectory, decay, start, every, warmup):
    """NumPy average of the iterates; trajectory[t - 1] is after step t."""
    averages, n = None, 0
    for t, weights in enumerate(trajectory, start=1):
        if t <= start or (t - start) % every:
            continue
        weights = [w.astype("float64") for w in weights]
        if n == 0:
            averages = weights
        else:
            if decay is None:
                rate = 1.0 / (n + 1)
            else:
                d = min(decay, (1 + n) / (10 + n)) if warmup else decay
                rate = 1.0 - d
            averages = [a + (w - a) * rate for a, w in zip(averages, weights)]
        n += 1
    return averages, n


@functools.cache
def _plain_trajectory():
    return _fit(_model(keras.optimizers.SGD(0.1)))


@pytest.mark.parametrize(
    "decay, start, every, warmup",
    [
        (0.9, 0, 1, False),
        (0.9, 0, 1, True),
        (None, 0, 1, False),
        (None, 3, 2, False),
        (0.8, 2, 3, False),
    ],
)
def test_averages_match_numpy_reference(decay, start, every, warmup):
    optimizer = AveragedOptimizer(
        keras.optimizers.SGD(0.1),
        decay=decay,
        start=start,
        every=every,
        warmup=warmup,
    )
    model = _model(optimizer)
    trajectory = _fit(model)
    expected, count = _reference(trajectory, decay, start, every, warmup)
    assert optimizer.num_averaged == count
    for got, want in zip(optimizer.averages(), expected):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The wrapper does not change training.
    for step_wrapped, step_plain in zip(trajectory, _plain_trajectory()):
        for a, b in zip(step_wrapped, step_plain):
            np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 12


def test_steps_per_execution_gives_same_averages():
    one = AveragedOptimizer(keras.optimizers.Adam(0.01), decay=0.7, every=2)
    four = AveragedOptimizer(keras.optimizers.Adam(0.01), decay=0.7, every=2)
    _fit(_model(one))
    model = _model(four, steps_per_execution=4)
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert four.num_averaged == one.num_averaged == 6
    for a, b in zip(four.averages(), one.averages()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_swap_average_weights_and_back():
    optimizer = AveragedOptimizer(keras.optimizers.SGD(0.1), decay=None)
    model = _model(optimizer)
    _fit(model)
    trained = [np.array(v.numpy()) for v in model.trainable_variables]
    averages = optimizer.averages()
    optimizer.swap_average_weights(model.trainable_variables)
    for v, a in zip(model.trainable_variables, averages):
        np.testing.assert_array_equal(v.numpy(), a)
    optimizer.swap_average_weights(model.trainable_variables)
    for v, w in zip(model.trainable_variables, trained):
        np.testing.assert_array_equal(v.numpy(), w)


def test_keras_file_round_trip(tmp_path):
    optimizer = AveragedOptimizer(
        keras.optimizers.Adam(0.01), decay=0.9, start=1, every=2, warmup=True
    )
    model = _model(optimizer)
    _fit(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, AveragedOptimizer)
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    # Steps 3, 5, 7, 9 and 11 of 12 are averaged.
    assert loaded.optimizer.num_averaged == optimizer.num_averaged == 5
    for a, b in zip(loaded.optimizer.averages(), optimizer.averages()):
        np.testing.assert_array_equal(a, b)
    # Both continue identically (the inner Adam state came back too).
    _fit(model, epochs=1)
    _fit(loaded, epochs=1)
    for a, b in zip(loaded.optimizer.averages(), optimizer.averages()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_save_weights_restores_averages(tmp_path):
    optimizer = AveragedOptimizer(keras.optimizers.SGD(0.1), decay=None)
    model = _model(optimizer)
    _fit(model)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh = AveragedOptimizer(keras.optimizers.SGD(0.1), decay=None)
    other = _model(fresh)
    fresh.build(other.trainable_variables)
    other.load_weights(path)
    assert fresh.num_averaged == 12
    for a, b in zip(fresh.averages(), optimizer.averages()):
        np.testing.assert_array_equal(a, b)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_backup_and_restore_keeps_averages(tmp_path):
    def make():
        return AveragedOptimizer(keras.optimizers.SGD(0.1), decay=0.8)

    reference = make()
    _fit(_model(reference), epochs=4)

    backup_dir = str(tmp_path / "backup")
    first = make()
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(
            _model(first),
            epochs=4,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir),
                _Interrupt(),
            ],
        )
    assert os.path.exists(backup_dir)
    resumed = make()  # A fresh process: new model, new optimizer.
    trajectory = _fit(
        _model(resumed),
        epochs=4,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir)],
    )
    assert len(trajectory) == 12  # Only epochs 2 and 3 ran.
    assert resumed.num_averaged == reference.num_averaged == 24
    for a, b in zip(resumed.averages(), reference.averages()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_forwards_learning_rate_and_iterations():
    inner = keras.optimizers.SGD(0.1)
    optimizer = AveragedOptimizer(inner)
    optimizer.learning_rate = 0.05
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(inner.learning_rate), 0.05
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(optimizer.learning_rate), 0.05
    )
    assert optimizer.iterations is inner.iterations
    assert optimizer.num_averaged == 0
    with pytest.raises(ValueError, match="no averages yet"):
        optimizer.averages()


def test_config_round_trip():
    optimizer = AveragedOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.5),
        decay=np.float32(0.5),
        start=np.int64(3),
        every=2,
        warmup=True,
        name="avg",
    )
    config = optimizer.get_config()
    assert config["decay"] == 0.5 and config["start"] == 3
    clone = AveragedOptimizer.from_config(config)
    assert clone.get_config() == config
    assert clone.inner_optimizer.get_config()["momentum"] == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, r"`decay`. Expected a float in \(0, 1\)"),
        ({"decay": True}, "Received: decay=True"),
        ({"decay": None, "warmup": True}, "Received: warmup=True"),
        ({"every": 0}, "`every`"),
        ({"start": -1}, "`start`"),
        ({"clipnorm": 1.0}, "Set `clipnorm` on the `inner_optimizer`"),
        ({"foo": 1}, "does not take the arguments: `foo`"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AveragedOptimizer(keras.optimizers.SGD(0.1), **kwargs)


def test_invalid_inner_optimizer():
    with pytest.raises(ValueError, match="Received: inner_optimizer='sgd'"):
        AveragedOptimizer("sgd")
