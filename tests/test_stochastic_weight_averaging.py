import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers
from keras_regkit.callbacks.batch_norm_statistics import (
    recompute_batchnorm_statistics,
)
from keras_regkit.callbacks.cyclic_lr import CyclicLR
from keras_regkit.callbacks.polyak_averaging import PolyakAveraging
from keras_regkit.callbacks.stochastic_weight_averaging import (
    StochasticWeightAveraging,
)

BATCH = 16
LR0 = 0.1


def _data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 2))).astype("float32")
    return x, y


def _model(batch_norm=False, seed=0, optimizer=None):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization(momentum=0.5)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            w if "moving" in v.path else 0.5 * rng.normal(size=w.shape)
            for v, w in zip(model.weights, model.get_weights())
        ]
    )
    model.compile(
        optimizer or keras.optimizers.SGD(LR0, momentum=0.5),
        loss="mse",
        jit_compile=False,
    )
    return model


def _numpy(variables):
    return [ops.convert_to_numpy(v).astype(np.float64) for v in variables]


class _Recorder:
    """Plain Keras callback: the rate and the weights at each epoch end."""

    def __init__(self, model):
        self.rates = []
        self.iterates = []

        def record(epoch, logs):
            optimizer = model.optimizer
            self.rates.append(
                float(ops.convert_to_numpy(optimizer.learning_rate))
            )
            self.iterates.append(_numpy(model.trainable_variables))

        self.callback = keras.callbacks.LambdaCallback(on_epoch_end=record)


def _fit(model, callbacks, epochs, **kwargs):
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
        **kwargs,
    )


def _reference_rates(epochs, start, swa, lr0, anneal, annealing):
    """SWALR stepped once per epoch from `start`, in NumPy."""
    rates = []
    for epoch in range(epochs):
        k = epoch - start
        if k < 0:
            rates.append(lr0)
            continue
        t = 1.0 if anneal == 0 else min(k, anneal) / anneal
        if annealing == "cos":
            rates.append(swa + (lr0 - swa) * (1 + np.cos(np.pi * t)) / 2)
        else:
            rates.append(swa + (lr0 - swa) * (1 - t))
    return np.float32(rates).astype(np.float64)


def _mean(iterates):
    return [np.mean(ws, axis=0) for ws in zip(*iterates)]


def _assert_averages(actual, expected):
    scale = max(float(np.max(np.abs(e))) for e in expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=5e-7 * scale)


# Rate and average against NumPy and plain Keras -------------------------------


@pytest.mark.parametrize(
    "annealing, start, anneal, every",
    [("cos", 2, 3, 1), ("linear", 1, 2, 2), ("cos", 3, 0, 1)],
)
def test_rate_and_average_match_reference(annealing, start, anneal, every):
    epochs = 7
    model = _model()
    recorder = _Recorder(model)
    swa = StochasticWeightAveraging(
        0.02,
        start_epoch=start,
        annealing_epochs=anneal,
        annealing=annealing,
        every=every,
        final_weights="training",
    )
    history = _fit(model, [swa, recorder.callback], epochs)
    expected = _reference_rates(epochs, start, 0.02, LR0, anneal, annealing)
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    np.testing.assert_allclose(
        history.history["learning_rate"], expected, rtol=1e-6
    )
    due = [e for e in range(start, epochs) if (e - start + 1) % every == 0]
    assert swa.num_averaged == len(due)
    _assert_averages(
        swa.get_averages(), _mean([recorder.iterates[e] for e in due])
    )

    # The same training in plain Keras: the reference rate per epoch.
    plain = _model()
    plain_recorder = _Recorder(plain)
    scheduler = keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: float(expected[epoch])
    )
    _fit(plain, [scheduler, plain_recorder.callback], epochs)
    for a, e in zip(recorder.iterates[-1], plain_recorder.iterates[-1]):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    _assert_averages(
        swa.get_averages(), _mean([plain_recorder.iterates[e] for e in due])
    )


@pytest.mark.slow  # importing torch
def test_reference_rate_equals_torch_swalr():
    # The NumPy reference that the callback is held to above is PyTorch's
    # SWALR stepped once per epoch (as PyTorch Lightning steps it).
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import SWALR

    for annealing, anneal in (("cos", 3), ("linear", 4), ("cos", 0)):
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=LR0)
        scheduler = SWALR(
            optimizer,
            swa_lr=0.02,
            anneal_epochs=anneal,
            anneal_strategy=annealing,
        )
        torch_rates = []
        for _ in range(7):
            torch_rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        expected = _reference_rates(9, 2, 0.02, LR0, anneal, annealing)
        np.testing.assert_allclose(expected[2:], torch_rates, rtol=1e-6)


def test_fractional_start_is_a_fraction_of_epochs():
    model = _model()
    recorder = _Recorder(model)
    swa = StochasticWeightAveraging(0.05, start_epoch=0.5, annealing_epochs=1)
    _fit(model, [swa, recorder.callback], 6)
    np.testing.assert_allclose(
        recorder.rates, [LR0] * 3 + [LR0, 0.05, 0.05], rtol=1e-6
    )
    assert swa.start == 3
    assert swa.num_averaged == 3
    # The model holds the averages when `fit` returns.
    _assert_averages(
        _numpy(model.trainable_variables), _mean(recorder.iterates[3:])
    )


def test_default_start_is_the_last_quarter():
    swa = StochasticWeightAveraging(0.05)
    assert swa.start_epoch == 0.75
    assert swa.annealing_epochs == 10 and swa.annealing == "cos"
    model = _model()
    _fit(model, [swa], 8)
    assert swa.start == 6 and swa.num_averaged == 2


# Resumption -------------------------------------------------------------------


def test_fit_twice_with_initial_epoch_equals_one_fit():
    kwargs = {"start_epoch": 2, "annealing_epochs": 3}
    whole = _model()
    swa_whole = StochasticWeightAveraging(0.02, **kwargs)
    _fit(whole, [swa_whole], 6)

    split = _model()
    swa_split = StochasticWeightAveraging(0.02, **kwargs)
    _fit(split, [swa_split], 4)
    _fit(split, [swa_split], 6, initial_epoch=4)
    assert swa_split.num_averaged == swa_whole.num_averaged == 4
    _assert_averages(swa_split.get_averages(), swa_whole.get_averages())
    _assert_averages(_numpy(split.weights), _numpy(whole.weights))


def test_a_new_callback_resumes_the_rate_from_the_optimizer():
    # As SWALR, a resumed run recovers lr_0 from the rate the optimizer
    # holds (the averages of a new callback start afresh).
    model = _model()
    recorder = _Recorder(model)
    kwargs = {
        "start_epoch": 1,
        "annealing_epochs": 4,
        "final_weights": "training",
    }
    _fit(model, [StochasticWeightAveraging(0.02, **kwargs)], 3)
    swa = StochasticWeightAveraging(0.02, **kwargs)
    _fit(model, [swa, recorder.callback], 6, initial_epoch=3)
    expected = _reference_rates(6, 1, 0.02, LR0, 4, "cos")[3:]
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    assert swa.num_averaged == 3


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.mark.slow
def test_backup_and_restore_resumes_rate_and_average(tmp_path):
    def make(backup_dir=None):
        return StochasticWeightAveraging(
            0.02, start_epoch=1, annealing_epochs=4, backup_dir=backup_dir
        )

    reference_model = _model()
    reference_recorder = _Recorder(reference_model)
    reference = make()
    _fit(reference_model, [reference, reference_recorder.callback], 6)

    state = os.fspath(tmp_path / "state")
    backup = os.fspath(tmp_path / "backup")
    model = _model()
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(
            model,
            [
                make(state),
                _Interrupt(2),
                keras.callbacks.BackupAndRestore(backup),
            ],
            6,
        )
    # Interrupted after epoch 2, before BackupAndRestore saved it: the
    # resumed run starts at epoch 2, the SWA epoch k = 1.
    model = _model(seed=7)  # a new process: everything from the backups
    recorder = _Recorder(model)
    resumed = make(state)
    _fit(
        model,
        [resumed, keras.callbacks.BackupAndRestore(backup), recorder.callback],
        6,
    )
    np.testing.assert_allclose(
        recorder.rates, reference_recorder.rates[2:], rtol=1e-6
    )
    assert resumed.num_averaged == reference.num_averaged == 5
    _assert_averages(resumed.get_averages(), reference.get_averages())
    _assert_averages(_numpy(model.weights), _numpy(reference_model.weights))


# Batch normalization ----------------------------------------------------------


def test_batch_norm_statistics_are_recomputed_for_the_averages():
    x, _ = _data(seed=3)
    model = _model(batch_norm=True)
    swa = StochasticWeightAveraging(
        0.02, start_epoch=1, annealing_epochs=1, batch_norm_data=x
    )
    _fit(model, [swa], 4)
    reference = _model(batch_norm=True)
    assert len(swa.averaged_variables) == len(model.trainable_variables)
    for variable, average in zip(
        reference.trainable_variables, swa.get_averages()
    ):
        variable.assign(average)
    recompute_batchnorm_statistics(reference, x)
    expected = _numpy(reference.weights)
    for a, e in zip(_numpy(model.weights), expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    for a, e in zip(_numpy(swa.averaged_model().weights), expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    bn = batch_norm_layers(model)[0]
    h = ops.convert_to_numpy(model.layers[1](x)).astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean, h.mean(0), atol=1e-5)


def test_batch_norm_without_data_warns():
    model = _model(batch_norm=True)
    swa = StochasticWeightAveraging(0.02, start_epoch=1)
    with pytest.warns(UserWarning, match="no `batch_norm_data` was given"):
        _fit(model, [swa], 2)
    assert swa.batch_norm == "average"


# The averaged network as its own model ----------------------------------------


@pytest.mark.parametrize(
    "kind", ["swa", pytest.param("polyak", marks=pytest.mark.slow)]
)
def test_averaged_model_saves_exports_and_leaves_the_model(tmp_path, kind):
    x, _ = _data(seed=1)
    model = _model(batch_norm=True)
    if kind == "swa":
        averaging = StochasticWeightAveraging(
            0.02, start_epoch=1, batch_norm_data=x, final_weights="training"
        )
    else:
        averaging = PolyakAveraging(decay=0.8, final_weights="training")
    _fit(model, [averaging], 3)
    training = _numpy(model.weights)
    averaged = averaging.averaged_model()
    assert isinstance(averaged, keras.Model) and averaged is not model
    for a, e in zip(_numpy(model.weights), training):
        np.testing.assert_array_equal(a, e)
    with averaging.swap_weights():
        expected = model.predict(x, verbose=0)
    for a, e in zip(_numpy(model.weights), training):
        np.testing.assert_array_equal(a, e)
    predicted = averaged.predict(x, verbose=0)
    np.testing.assert_allclose(predicted, expected, atol=1e-6)

    path = os.fspath(tmp_path / "averaged.keras")
    averaged.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), predicted)
    if keras.backend.backend() == "tensorflow":
        tf = pytest.importorskip("tensorflow")
        exported = os.fspath(tmp_path / "exported")
        averaged.export(exported, verbose=0)
        # Keep the loaded object: its variables die with it.
        loaded_export = tf.saved_model.load(exported)
        served = loaded_export.serve(x)
        np.testing.assert_allclose(served, predicted, atol=1e-6)


# One learning-rate policy and one averaging per fit ---------------------------


def test_another_learning_rate_callback_is_refused():
    model = _model()
    swa = StochasticWeightAveraging(0.02, start_epoch=1)
    clr = CyclicLR(0.01, 0.1, step_size=2)
    with pytest.raises(
        ValueError,
        match="both set the learning rate: CyclicLR and "
        "StochasticWeightAveraging",
    ):
        _fit(model, [clr, swa], 2)


def test_another_averaging_is_refused():
    model = _model()
    with pytest.raises(
        ValueError,
        match="both average the weights: StochasticWeightAveraging and "
        "PolyakAveraging",
    ):
        _fit(
            model,
            [StochasticWeightAveraging(0.02), PolyakAveraging(decay=0.9)],
            2,
        )


def test_a_learning_rate_schedule_is_refused():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model = _model(optimizer=keras.optimizers.SGD(schedule))
    with pytest.raises(
        ValueError,
        match="StochasticWeightAveraging sets the learning rate itself",
    ):
        _fit(model, [StochasticWeightAveraging(0.02)], 1)


def test_model_without_optimizer_is_refused():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    swa = StochasticWeightAveraging(0.02)
    swa.set_model(model)
    with pytest.raises(ValueError, match="StochasticWeightAveraging needs a"):
        swa.on_train_begin()


def test_steps_per_execution_is_exact_per_epoch():
    model = _model()
    model.compile(
        keras.optimizers.SGD(LR0, momentum=0.5),
        loss="mse",
        steps_per_execution=3,
    )
    recorder = _Recorder(model)
    swa = StochasticWeightAveraging(0.02, start_epoch=1, annealing_epochs=2)
    _fit(model, [swa, recorder.callback], 4)
    np.testing.assert_allclose(
        recorder.rates,
        _reference_rates(4, 1, 0.02, LR0, 2, "cos"),
        rtol=1e-6,
    )
    _assert_averages(swa.get_averages(), _mean(recorder.iterates[1:]))


# Arguments and config ---------------------------------------------------------


def test_config_round_trip():
    swa = StochasticWeightAveraging(
        np.float32(0.05),
        start_epoch=np.int64(3),
        annealing_epochs=2,
        annealing="linear",
        every=2,
        final_weights="training",
    )
    config = swa.get_config()
    assert config["start_epoch"] == 3 and type(config["start_epoch"]) is int
    clone = StochasticWeightAveraging.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(swa)
    )
    assert isinstance(restored, StochasticWeightAveraging)
    assert restored.get_config() == config
    assert isinstance(swa, PolyakAveraging) and swa.decay is None


START = (
    r"Expected an int >= 0 \(the first SWA epoch\) or a float in \[0, 1\) "
    r"\(the fraction of `epochs` before it\)"
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"swa_learning_rate": 0.0},
            (
                r"argument `swa_learning_rate`\. Expected a float in \(0\.0, inf\)"
                r"\. Received: swa_learning_rate=0\.0"
            ),
        ),
        (
            {"swa_learning_rate": "0.1"},
            r"argument `swa_learning_rate`.*Received: swa_learning_rate='0\.1'",
        ),
        (
            {"swa_learning_rate": 0.1, "start_epoch": 1.0},
            START + r"\. Received: start_epoch=1\.0",
        ),
        (
            {"swa_learning_rate": 0.1, "start_epoch": -1},
            START + r"\. Received: start_epoch=-1",
        ),
        (
            {"swa_learning_rate": 0.1, "start_epoch": True},
            START + r"\. Received: start_epoch=True",
        ),
        (
            {"swa_learning_rate": 0.1, "annealing_epochs": -1},
            (
                r"argument `annealing_epochs`\. Expected an int >= 0\. "
                r"Received: annealing_epochs=-1"
            ),
        ),
        (
            {"swa_learning_rate": 0.1, "annealing": "cosine"},
            (
                r"argument `annealing`\. Expected one of 'cos', 'linear'\. "
                r"Received: annealing='cosine'"
            ),
        ),
        (
            {"swa_learning_rate": 0.1, "every": 0},
            r"argument `every`\. Expected an int >= 1\. Received: every=0",
        ),
        (
            {"swa_learning_rate": 0.1, "final_weights": "last"},
            (
                r"argument `final_weights`\. Expected one of 'average', "
                r"'training'\. Received: final_weights='last'"
            ),
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StochasticWeightAveraging(**kwargs)


def test_annealed_fraction_closed_form():
    swa = StochasticWeightAveraging(0.1, annealing_epochs=4)
    for k in range(7):
        t = min(k, 4) / 4
        assert swa.annealed_fraction(k) == pytest.approx(
            (1 - math.cos(math.pi * t)) / 2, abs=1e-15
        )
