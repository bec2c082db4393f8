import csv
import os
import warnings

import keras
import numpy as np
import pytest
from lr_policy_checks import BatchRecorder
from lr_policy_checks import InterruptAt
from lr_policy_checks import assert_momentum_policy_applied
from lr_policy_checks import check_bad_arguments
from lr_policy_checks import cyclic_reference
from lr_policy_checks import fit_probe
from lr_policy_checks import momentum_sgd_weights
from lr_policy_checks import probe_model
from lr_policy_checks import regression_data
from lr_policy_checks import resumable_run
from lr_policy_checks import small_mlp
from lr_policy_checks import tensorboard_scalars

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import LRRangeTest
from keras_regkit.callbacks import OneCycle
from keras_regkit.schedules import CyclicalLearningRate


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
def quarter_per_cycle(cycle):
    return 0.25 ** (cycle - 1.0)


def _regression_data(samples=96):
    return regression_data(samples, features=6, outputs=2)


def _mlp(optimizer):
    return small_mlp(optimizer, features=6, outputs=2)


def _momentum(rates, base_lr=0.01, max_lr=0.1, low=0.8, high=0.95):
    return high - (high - low) * (rates - base_lr) / (max_lr - base_lr)


@pytest.mark.parametrize(
    "mode,gamma",
    [
        pytest.param("triangular", 1.0, marks=pytest.mark.slow),
        pytest.param("triangular2", 1.0, marks=pytest.mark.slow),
        ("exp_range", 0.98),
    ],
)
def test_fit_trace_is_the_closed_form_over_three_cycles(mode, gamma):
    # 7 batches per epoch, 5 epochs: 35 iterations, 4 cycles of 8.
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    fit_probe(model, 7, 5, [CyclicLR(0.01, 0.2, 4, mode, gamma), recorder])
    expected = cyclic_reference(np.arange(35), 0.01, 0.2, 4, mode, gamma)
    np.testing.assert_allclose(
        recorder.logs["learning_rate"], expected, rtol=1e-7
    )
    # What the optimizer applied, read back from the weight: w -= lr * 1.
    np.testing.assert_allclose(recorder.applied_rates(), expected, rtol=1e-5)


def test_custom_scale_fn_in_fit():
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    callback = CyclicLR(0.01, 0.2, 3, scale_fn=quarter_per_cycle)
    fit_probe(model, 10, 3, [callback, recorder])
    expected = cyclic_reference(
        np.arange(30), 0.01, 0.2, 3, scale_fn=quarter_per_cycle
    )
    np.testing.assert_allclose(recorder.applied_rates(), expected, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_cycles_inversely_and_is_applied(nesterov):
    model = probe_model(
        keras.optimizers.SGD(0.5, momentum=0.9, nesterov=nesterov)
    )
    callback = CyclicLR(0.01, 0.1, 4, base_momentum=0.8, max_momentum=0.95)
    recorder = BatchRecorder(
        keys=("learning_rate", "momentum"), policy=callback
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit_probe(model, 6, 3, [callback, recorder])
    rates = cyclic_reference(np.arange(18), 0.01, 0.1, 4)
    assert_momentum_policy_applied(
        recorder, rates, _momentum(rates), rtol=1e-5, nesterov=nesterov
    )
    # Nothing is installed: the optimizer keeps its own momentum, and its
    # learning rate reads the rate last used.
    assert model.optimizer.momentum == 0.9
    assert float(model.optimizer.learning_rate) == pytest.approx(rates[-1])
    assert model.optimizer.get_config()["momentum"] == 0.9


def test_momentum_stays_exact_when_the_loss_scale_skips_a_step():
    # Under mixed precision a LossScaleOptimizer skips the step of a batch
    # whose gradients overflow float16 (x = 1e4 below): the counter does not
    # move, and the momentum must not be rescaled twice for that iteration.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x = np.ones((12, 1), "float32")
        x[5] = 1e4
        callback = CyclicLR(0.01, 0.1, 4, base_momentum=0.8, max_momentum=0.95)
        recorder = BatchRecorder(
            keys=("learning_rate", "momentum"), policy=callback
        )
        model.fit(
            x,
            np.zeros_like(x),
            batch_size=1,
            verbose=0,
            shuffle=False,
            callbacks=[callback, recorder],
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert recorder.iterations == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11]
    taken = [i for i in range(12) if i != 5]
    rates = cyclic_reference(np.arange(11), 0.01, 0.1, 4)
    np.testing.assert_allclose(
        recorder.probe_weights()[taken],
        momentum_sgd_weights(rates, _momentum(rates)),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "optimizer,attribute",
    [
        (keras.optimizers.Adam, "beta_1"),
        pytest.param(
            keras.optimizers.RMSprop, "momentum", marks=pytest.mark.slow
        ),
    ],
)
def test_constant_momentum_optimizers_cycle_the_rate_and_warn_once(
    optimizer, attribute
):
    model = probe_model(optimizer(0.01))
    callback = CyclicLR(0.001, 0.01, 3, base_momentum=0.85, max_momentum=0.95)
    recorder = BatchRecorder(
        keys=("learning_rate", "momentum"), policy=callback
    )
    name = optimizer.__name__
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            fit_probe(model, 4, 1, [callback, recorder])
    messages = [str(w.message) for w in record]
    expected = (
        f"CyclicLR cycles the learning rate only: the optimizer {name} reads "
        f"its `{attribute}` as a constant of the compiled training step"
    )
    assert sum(m.startswith(expected) for m in messages) == 1, messages
    np.testing.assert_allclose(
        recorder.logs["learning_rate"],
        cyclic_reference(np.arange(8), 0.001, 0.01, 3),
        rtol=1e-7,
    )
    assert recorder.logs["momentum"] == [None] * 8
    assert float(model.optimizer.learning_rate) == pytest.approx(
        recorder.logs["learning_rate"][-1]
    )


def test_sgd_without_momentum_cycles_the_rate_and_warns():
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    with pytest.warns(
        UserWarning,
        match=r"CyclicLR cycles the learning rate only: the optimizer SGD "
        r"was created with momentum=0, so it keeps no momentum to cycle. "
        r".*pass `base_momentum=None, max_momentum=None`",
    ):
        fit_probe(
            model,
            6,
            1,
            [CyclicLR(0.01, 0.1, 2, base_momentum=0.8, max_momentum=0.9)]
            + [recorder],
        )
    np.testing.assert_allclose(
        recorder.applied_rates(),
        cyclic_reference(np.arange(6), 0.01, 0.1, 2),
        rtol=1e-5,
    )


def _resumable_run(tmp_path, interrupt):
    backup = os.path.join(tmp_path, "backup")

    def callbacks():
        # Counts that do not line up with epochs (12 batches per epoch).
        policy = CyclicLR(
            0.001,
            0.05,
            5,
            mode="triangular2",
            base_momentum=0.8,
            max_momentum=0.9,
        )
        return [
            policy,
            keras.callbacks.BackupAndRestore(backup),
            BatchRecorder(keys=("learning_rate", "momentum"), policy=policy),
        ]

    x, y = _regression_data()
    trace, model = resumable_run(
        lambda: _mlp(keras.optimizers.SGD(0.01, momentum=0.9)),
        callbacks,
        x,
        y,
        epochs=4,
        interrupt=interrupt,
    )
    return trace, model.get_weights(), model


def test_backup_and_restore_resumes_the_cycle(tmp_path):
    straight, weights, _ = _resumable_run(tmp_path / "a", interrupt=None)
    resumed, resumed_weights, model = _resumable_run(
        tmp_path / "b", interrupt=(2, 6)
    )
    assert resumed == straight
    np.testing.assert_allclose(
        straight["learning_rate"],
        cyclic_reference(np.arange(48), 0.001, 0.05, 5, "triangular2"),
        rtol=1e-7,
    )
    for a, b in zip(weights, resumed_weights):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 48


def test_consecutive_fits_continue_the_cycle():
    model = probe_model(keras.optimizers.SGD(0.5))
    callback = CyclicLR(0.01, 0.2, 3, mode="triangular2")
    first, second, third = BatchRecorder(), BatchRecorder(), BatchRecorder()
    fit_probe(model, 5, 2, [callback, first])
    fit_probe(model, 5, 1, [callback, second])
    fit_probe(model, 5, 2, [CyclicLR(0.01, 0.2, 3, mode="triangular2"), third])
    trace = (
        first.logs["learning_rate"]
        + second.logs["learning_rate"]
        + third.logs["learning_rate"]
    )
    expected = cyclic_reference(np.arange(25), 0.01, 0.2, 3, "triangular2")
    np.testing.assert_allclose(trace, expected, rtol=1e-7)
    weights = np.concatenate(
        [first.probe_weights(), second.probe_weights(), third.probe_weights()]
    )
    np.testing.assert_allclose(
        -np.diff(np.concatenate([[0.0], weights])), expected, rtol=1e-5
    )


def test_steps_per_execution_sets_the_rate_once_per_execution():
    model = probe_model(
        keras.optimizers.SGD(0.5, momentum=0.5), steps_per_execution=4
    )
    callback = CyclicLR(0.01, 0.2, 3, base_momentum=0.0, max_momentum=0.0)
    recorder = BatchRecorder(
        keys=("learning_rate", "momentum"), policy=callback
    )
    with pytest.warns(
        UserWarning,
        match=r"CyclicLR: the model was compiled with steps_per_execution=4, "
        r"so Keras calls batch callbacks once per 4 steps: the learning rate "
        r"is set once per execution, held for 4 steps, and the momentum is "
        r"not cycled. For a learning rate exact at every iteration, compile "
        r"the optimizer with `keras_regkit.schedules.CyclicalLearningRate` "
        r"instead.",
    ):
        fit_probe(model, 16, 1, [callback, recorder])
    rates = cyclic_reference(np.arange(16), 0.01, 0.2, 3)
    held = np.repeat(rates[0::4], 4)
    assert recorder.iterations == [4, 8, 12, 16]
    np.testing.assert_allclose(recorder.logs["learning_rate"], held[3::4])
    assert recorder.logs["momentum"] == [None] * 4
    # The optimizer's own momentum (0.5) throughout.
    velocity, weights = 0.0, []
    for rate in held:
        velocity = 0.5 * velocity - rate
        weights.append((weights[-1] if weights else 0.0) + velocity)
    np.testing.assert_allclose(
        recorder.probe_weights(), weights[3::4], rtol=1e-5
    )


def test_jit_compiled_step():
    model = probe_model(
        keras.optimizers.SGD(0.5, momentum=0.5), jit_compile=True
    )
    recorder = BatchRecorder()
    callback = CyclicLR(0.1, 0.1, 3, base_momentum=0.0, max_momentum=0.0)
    fit_probe(model, 8, 1, [callback, recorder])
    # Momentum cycled to 0 around the XLA step: plain steps of 0.1.
    np.testing.assert_allclose(
        -recorder.probe_weights(), 0.1 * np.arange(1, 9), rtol=1e-5
    )


def test_logs_history_csv_and_verbose(tmp_path, capsys):
    model = _mlp(keras.optimizers.SGD(0.01, momentum=0.9))
    x, y = _regression_data(40)
    path = os.path.join(tmp_path, "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[
            CyclicLR(
                0.001, 0.01, 4, base_momentum=0.85, max_momentum=0.95, verbose=1
            ),
            keras.callbacks.CSVLogger(path),
        ],
    )
    rates = cyclic_reference(np.arange(15), 0.001, 0.01, 4)
    logged = history.history["learning_rate"]
    np.testing.assert_allclose(logged, rates[4::5], rtol=1e-7)
    momenta = _momentum(rates, 0.001, 0.01, 0.85, 0.95)
    np.testing.assert_allclose(history.history["momentum"], momenta[4::5])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["learning_rate"]) for r in rows] == logged
    printed = capsys.readouterr().out
    assert (
        f"Epoch 3: CyclicLR learning_rate {logged[-1]:.6g}, momentum "
        f"{momenta[14]:.6g}." in printed
    )


class RateAtEpochEnd(keras.callbacks.Callback):
    """Reads `optimizer.learning_rate` at each epoch end, as TensorBoard."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_end(self, epoch, logs=None):
        rate = self.model.optimizer.learning_rate
        self.rates.append(float(keras.ops.convert_to_numpy(rate)))


@pytest.mark.parametrize("first", [True, False])
def test_the_optimizer_holds_what_history_records(first):
    model = probe_model(keras.optimizers.SGD(0.5))
    reader = RateAtEpochEnd()
    clr = CyclicLR(0.001, 0.01, 4)
    history = fit_probe(model, 5, 3, [clr, reader] if first else [reader, clr])
    assert reader.rates == history.history["learning_rate"]


def test_tensorboard_writes_what_history_records(tmp_path):
    pytest.importorskip("tensorboard")
    model = probe_model(keras.optimizers.SGD(0.5))
    board = keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)
    history = fit_probe(model, 5, 3, [board, CyclicLR(0.001, 0.01, 4)])
    written = tensorboard_scalars(tmp_path, "epoch_learning_rate")
    assert written == history.history["learning_rate"]


def test_fit_without_the_callback_afterwards_is_constant():
    model = probe_model(keras.optimizers.SGD(0.5))
    fit_probe(model, 6, 1, [CyclicLR(0.01, 0.2, 4)])
    last = cyclic_reference([5], 0.01, 0.2, 4)[0]
    assert float(model.optimizer.learning_rate) == pytest.approx(last)
    recorder = BatchRecorder()
    start = model.get_weights()[0].item()
    fit_probe(model, 6, 1, [recorder])
    np.testing.assert_allclose(
        recorder.applied_rates(start), np.full(6, last), rtol=1e-5
    )


def test_fit_after_an_interrupted_fit_is_constant():
    model = probe_model(keras.optimizers.SGD(0.5))
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_probe(
            model, 6, 2, [CyclicLR(0.01, 0.2, 4), InterruptAt(epoch=0, batch=2)]
        )
    # As a plain `fit` leaves it: the rate last used (iteration 2).
    last = cyclic_reference([2], 0.01, 0.2, 4)[0]
    assert float(model.optimizer.learning_rate) == pytest.approx(last)
    recorder = BatchRecorder()
    fit_probe(model, 6, 1, [recorder])
    steps = -np.diff(recorder.probe_weights())
    np.testing.assert_allclose(steps, np.full(5, last), rtol=1e-5)
    # A new fit with the callback takes over where the counter stands.
    recorder = BatchRecorder()
    fit_probe(model, 6, 1, [CyclicLR(0.01, 0.2, 4), recorder])
    np.testing.assert_allclose(
        recorder.logs["learning_rate"],
        cyclic_reference(np.arange(9, 15), 0.01, 0.2, 4),
        rtol=1e-7,
    )


@pytest.mark.parametrize(
    "other",
    [lambda: OneCycle(0.1), lambda: LRRangeTest(steps=4)],
    ids=["one_cycle", "lr_range_test"],
)
def test_two_learning_rate_callbacks_in_one_fit_are_refused(other):
    model = probe_model(keras.optimizers.SGD(0.5))
    other = other()
    with pytest.raises(
        ValueError,
        match=r"Two callbacks of one `fit` both set the learning rate: "
        rf"CyclicLR and {type(other).__name__}",
    ):
        fit_probe(model, 4, 1, [CyclicLR(0.01, 0.1, 2), other])
    assert int(model.optimizer.iterations) == 0
    # Each alone is fine afterwards.
    fit_probe(model, 4, 1, [CyclicLR(0.01, 0.1, 2)])


def test_checkpoint_saved_mid_fit_loads_without_custom_objects(tmp_path):
    model = _mlp(keras.optimizers.SGD(0.01, momentum=0.9))
    x, y = _regression_data(40)
    path = os.path.join(tmp_path, "checkpoint.keras")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            CyclicLR(0.001, 0.01, 3, base_momentum=0.85, max_momentum=0.95),
            keras.callbacks.ModelCheckpoint(path),
        ],
    )
    loaded = keras.models.load_model(path)
    config = loaded.optimizer.get_config()
    rate = cyclic_reference([9], 0.001, 0.01, 3)[0]
    assert config["learning_rate"] == pytest.approx(rate, rel=1e-6)
    assert config["momentum"] == 0.9
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_a_recompiled_model_starts_a_new_count():
    model = probe_model(keras.optimizers.SGD(0.5))
    callback = CyclicLR(0.01, 0.2, 3)
    fit_probe(model, 4, 1, [callback])
    model.compile(keras.optimizers.SGD(0.5), loss="mse")
    recorder = BatchRecorder()
    fit_probe(model, 4, 1, [callback, recorder])
    np.testing.assert_allclose(
        recorder.logs["learning_rate"],
        cyclic_reference(np.arange(4), 0.01, 0.2, 3),
        rtol=1e-7,
    )


def test_config_round_trip():
    callback = CyclicLR(
        0.001,
        0.01,
        8,
        mode="triangular",
        scale_fn=quarter_per_cycle,
        scale_mode="cycle",
        base_momentum=0.8,
        max_momentum=0.9,
        verbose=1,
    )
    config = callback.get_config()
    assert config == {
        "base_lr": 0.001,
        "max_lr": 0.01,
        "step_size": 8,
        "mode": "triangular",
        "gamma": 1.0,
        "scale_fn": "keras_regkit_tests>quarter_per_cycle",
        "scale_mode": "cycle",
        "base_momentum": 0.8,
        "max_momentum": 0.9,
        "verbose": 1,
    }
    assert CyclicLR.from_config(config).get_config() == config
    # Configs written when `scale_mode` defaulted to "cycle" still load.
    old = {**CyclicLR(0.001, 0.01, 8, mode="exp_range").get_config()}
    old["scale_mode"] = "cycle"
    assert CyclicLR.from_config(old).scale_mode is None


def test_numpy_scalars_are_accepted():
    callback = CyclicLR(
        np.float32(0.001),
        np.float64(0.01),
        np.int64(8),
        mode="exp_range",
        gamma=np.float32(0.5),
        base_momentum=np.float32(0.5),
        max_momentum=np.float64(0.75),
        verbose=np.int64(0),
    )
    assert callback.step_size == 8 and isinstance(callback.step_size, int)
    config = callback.get_config()
    assert all(
        type(v) in (int, float, str, type(None)) for v in config.values()
    )
    assert callback.learning_rate_at(8) == pytest.approx(0.001 + 0.009 / 256)


BAD_ARGUMENTS = [
    (
        {"base_lr": 0.2},
        (
            r"Invalid value received for argument `max_lr`. Expected a finite "
            r"float >= base_lr=0.2. Received: max_lr=0.1"
        ),
    ),
    (
        {"max_lr": float("inf")},
        r"argument `max_lr`. Expected a finite float.*Received: max_lr=inf",
    ),
    (
        {"base_lr": -1.0},
        (
            r"argument `base_lr`. Expected a float in \[0.0, inf\). "
            r"Received: base_lr=-1.0"
        ),
    ),
    (
        {"base_lr": float("nan")},
        r"argument `base_lr`. .*Received: base_lr=nan",
    ),
    (
        {"step_size": 0},
        (
            r"argument `step_size`. Expected a positive number. "
            r"Received: step_size=0"
        ),
    ),
    (
        {"step_size": -2.5},
        r"Expected a positive number. Received: step_size=-2.5",
    ),
    (
        {"step_size": "4"},
        r"Expected a positive number. Received: step_size='4'",
    ),
    (
        {"mode": "cosine"},
        (
            r"argument `mode`. Expected one of 'triangular', 'triangular2', "
            r"'exp_range'. Received: mode='cosine'"
        ),
    ),
    (
        {"mode": "exp_range", "gamma": 0.0},
        (
            r"argument `gamma`. Expected a float in \(0.0, 1.0\]. "
            r"Received: gamma=0.0"
        ),
    ),
    (
        {"mode": "exp_range", "gamma": 1.01},
        r"Expected a float in \(0.0, 1.0\]. Received: gamma=1.01",
    ),
    (
        {"gamma": 0.9},
        (
            r"argument `gamma`. Expected 1.0 with mode='triangular' \(only "
            r"mode='exp_range' uses it\). Received: gamma=0.9"
        ),
    ),
    (
        {"scale_mode": "epoch"},
        (
            r"argument `scale_mode`. Expected one of 'cycle', 'iterations'. "
            r"Received: scale_mode='epoch'"
        ),
    ),
    (
        {"mode": "exp_range", "scale_mode": "cycle"},
        (
            r"argument `scale_mode`. Expected None or 'iterations' with "
            r"mode='exp_range' \(the mode's scale is a function of the "
            r"iteration; `scale_mode` chooses what a custom `scale_fn` "
            r"receives\). Received: scale_mode='cycle'"
        ),
    ),
    (
        {"mode": "triangular2", "scale_mode": "iterations"},
        r"Expected None or 'cycle' with mode='triangular2'",
    ),
    (
        {"scale_fn": "no_such_function"},
        r"argument `scale_fn`. Expected None, a callable, or the name",
    ),
    (
        {"base_momentum": 0.8},
        (
            r"argument `max_momentum`. Expected a float in \[0, 1\] when "
            r"`base_momentum` is given \(set both, or neither to leave the "
            r"momentum alone\). Received: max_momentum=None"
        ),
    ),
    (
        {"max_momentum": 0.9},
        (
            r"argument `base_momentum`. Expected a float in \[0, 1\] when "
            r"`max_momentum` is given.*Received: base_momentum=None"
        ),
    ),
    (
        {"base_momentum": 0.9, "max_momentum": 0.8},
        (
            r"argument `max_momentum`. Expected a float >= "
            r"base_momentum=0.9. Received: max_momentum=0.8"
        ),
    ),
    (
        {"base_momentum": 0.8, "max_momentum": 1.2},
        (
            r"argument `max_momentum`. Expected a float in \[0.0, 1.0\]. "
            r"Received: max_momentum=1.2"
        ),
    ),
    (
        {"base_momentum": "0.8", "max_momentum": 0.9},
        r"argument `base_momentum`. .*Received: base_momentum='0.8'",
    ),
    (
        {"verbose": 3},
        r"argument `verbose`. Expected an int.*Received: verbose=3",
    ),
    (
        {"verbose": "yes"},
        r"`verbose`. Expected an int.*Received: verbose='yes'",
    ),
]


def test_bad_arguments():
    check_bad_arguments(
        CyclicLR,
        {"base_lr": 0.01, "max_lr": 0.1, "step_size": 4},
        BAD_ARGUMENTS,
    )


def _fit_with(optimizer, callback):
    model = _mlp(optimizer)
    x, y = _regression_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])


@pytest.mark.parametrize(
    "learning_rate",
    [CyclicalLearningRate(0.001, 0.01, 4), lambda: 0.01],
    ids=["schedule", "callable"],
)
def test_optimizer_whose_rate_cannot_be_set_is_refused(learning_rate):
    with pytest.raises(
        ValueError,
        match=r"CyclicLR sets the learning rate itself, but the optimizer's "
        r"learning rate is a `LearningRateSchedule` or a callable, which "
        r"cannot be set \(`optimizer.learning_rate` is not a variable\). "
        r"Compile with a float learning rate \(e.g. "
        r"`SGD\(learning_rate=1e-3\)`\), or use the schedule alone without "
        r"this callback.",
    ):
        _fit_with(keras.optimizers.SGD(learning_rate), CyclicLR(0.001, 0.01, 4))
