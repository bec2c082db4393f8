import csv
import os

import keras
import numpy as np
import pytest
from lr_policy_checks import BatchRecorder
from lr_policy_checks import InterruptAt
from lr_policy_checks import assert_each_step_used_its_rate
from lr_policy_checks import assert_momentum_policy_applied
from lr_policy_checks import check_bad_arguments
from lr_policy_checks import cyclic_reference
from lr_policy_checks import fit_probe
from lr_policy_checks import in_step_only
from lr_policy_checks import jax_only
from lr_policy_checks import probe_model
from lr_policy_checks import regression_data
from lr_policy_checks import resumable_run
from lr_policy_checks import small_mlp

from keras_regkit.callbacks import CyclicLR
from keras_regkit.schedules import CyclicalLearningRate


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
def quarter_per_cycle(cycle):
    return 0.25 ** (cycle - 1.0)


def _regression_data(samples=96):
    return regression_data(samples, features=6, outputs=2)


def _mlp(optimizer):
    return small_mlp(optimizer, features=6, outputs=2)


@pytest.mark.parametrize(
    "mode,gamma",
    [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.98)],
)
def test_fit_trace_is_the_closed_form_over_three_cycles(mode, gamma):
    # 7 batches per epoch, 5 epochs: 35 iterations, 4 cycles of 8.
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    fit_probe(model, 7, 5, [CyclicLR(0.01, 0.2, 4, mode, gamma), recorder])
    expected = cyclic_reference(np.arange(35), 0.01, 0.2, 4, mode, gamma)
    np.testing.assert_allclose(
        recorder.logs["learning_rate"], expected, rtol=1e-12
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


@in_step_only
def test_momentum_cycles_inversely_and_is_applied():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    recorder = BatchRecorder(keys=("learning_rate", "momentum"))
    callback = CyclicLR(0.01, 0.1, 4, base_momentum=0.8, max_momentum=0.95)
    fit_probe(model, 6, 3, [callback, recorder])
    rates = cyclic_reference(np.arange(18), 0.01, 0.1, 4)
    momenta = 0.95 - 0.15 * (rates - 0.01) / 0.09
    assert_momentum_policy_applied(recorder, rates, momenta, rtol=1e-5)
    # Afterwards the optimizer holds plain floats at their last values.
    assert model.optimizer.momentum == pytest.approx(momenta[-1])
    assert isinstance(model.optimizer.momentum, float)
    assert float(model.optimizer.learning_rate) == pytest.approx(rates[-1])
    assert len(model.optimizer.variables) == 3


@in_step_only
@pytest.mark.parametrize(
    "optimizer",
    [keras.optimizers.Adam, keras.optimizers.Nadam, keras.optimizers.Lion],
)
def test_beta_1_cycles_for_the_adam_family(optimizer):
    model = _mlp(optimizer(0.01))
    recorder = BatchRecorder(keys=("learning_rate", "beta_1"))
    x, y = _regression_data(32)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            CyclicLR(0.001, 0.01, 3, base_momentum=0.85, max_momentum=0.95),
            recorder,
        ],
    )
    rates = cyclic_reference(np.arange(8), 0.001, 0.01, 3)
    np.testing.assert_allclose(
        recorder.logs["beta_1"],
        0.95 - 0.1 * (rates - 0.001) / 0.009,
        rtol=1e-12,
    )
    assert isinstance(model.optimizer.beta_1, float)
    assert model.optimizer.get_config()["beta_1"] == pytest.approx(
        recorder.logs["beta_1"][-1]
    )


def _resumable_run(tmp_path, interrupt):
    backup = os.path.join(tmp_path, "backup")

    def callbacks():
        # Counts that do not line up with epochs (12 batches per epoch).
        return [
            CyclicLR(
                0.001,
                0.05,
                5,
                mode="triangular2",
                base_momentum=0.8,
                max_momentum=0.9,
            ),
            keras.callbacks.BackupAndRestore(backup),
            BatchRecorder(keys=("learning_rate", "momentum")),
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


@in_step_only
def test_backup_and_restore_resumes_the_cycle(tmp_path):
    straight, weights, _ = _resumable_run(tmp_path / "a", interrupt=None)
    resumed, resumed_weights, model = _resumable_run(
        tmp_path / "b", interrupt=(2, 6)
    )
    assert resumed == straight
    np.testing.assert_allclose(
        straight["learning_rate"],
        cyclic_reference(np.arange(48), 0.001, 0.05, 5, "triangular2"),
        rtol=1e-12,
    )
    for a, b in zip(weights, resumed_weights):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 48


@in_step_only
def test_consecutive_fits_continue_the_cycle():
    model = probe_model(keras.optimizers.SGD(0.5))
    callback = CyclicLR(0.01, 0.2, 3, mode="triangular2")
    first, second, third = BatchRecorder(), BatchRecorder(), BatchRecorder()
    fit_probe(model, 5, 2, [callback, first])
    traced = model.train_function.function
    fit_probe(model, 5, 1, [callback, second])
    # The same policy reuses the step traced for it.
    assert model.train_function.function is traced
    fit_probe(model, 5, 2, [CyclicLR(0.01, 0.2, 3, mode="triangular2"), third])
    trace = (
        first.logs["learning_rate"]
        + second.logs["learning_rate"]
        + third.logs["learning_rate"]
    )
    np.testing.assert_allclose(
        trace,
        cyclic_reference(np.arange(25), 0.01, 0.2, 3, "triangular2"),
        rtol=1e-12,
    )
    weights = np.concatenate(
        [first.probe_weights(), second.probe_weights(), third.probe_weights()]
    )
    np.testing.assert_allclose(
        -np.diff(np.concatenate([[0.0], weights])), trace, rtol=1e-5
    )


@in_step_only
def test_steps_per_execution_applies_each_iteration_its_own_rate():
    model = probe_model(keras.optimizers.SGD(0.5), steps_per_execution=4)
    recorder = BatchRecorder()
    fit_probe(model, 16, 2, [CyclicLR(0.01, 0.2, 3), recorder])
    rates = cyclic_reference(np.arange(32), 0.01, 0.2, 3)
    # Inside each group of 4 the rate changes every step (not held).
    assert_each_step_used_its_rate(recorder, rates, group=4)
    # The logs hold the rate of the last step of each group.
    np.testing.assert_allclose(
        recorder.logs["learning_rate"], rates[3::4], rtol=1e-12
    )


@in_step_only
def test_jit_compiled_step():
    model = probe_model(
        keras.optimizers.SGD(0.5, momentum=0.5), jit_compile=True
    )
    recorder = BatchRecorder()
    callback = CyclicLR(0.1, 0.1, 3, base_momentum=0.0, max_momentum=0.0)
    fit_probe(model, 8, 1, [callback, recorder])
    # Momentum cycled to 0 inside the XLA step: plain steps of 0.1.
    np.testing.assert_allclose(
        -recorder.probe_weights(), 0.1 * np.arange(1, 9), rtol=1e-5
    )


@in_step_only
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
    np.testing.assert_allclose(
        history.history["learning_rate"], rates[4::5], rtol=1e-12
    )
    assert len(history.history["momentum"]) == 3
    with open(path) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose(
        [float(r["learning_rate"]) for r in rows], rates[4::5], rtol=1e-6
    )
    printed = capsys.readouterr().out
    momentum = 0.95 - 0.1 * (rates[14] - 0.001) / 0.009
    assert (
        f"Epoch 3: CyclicLR learning rate {rates[14]:.6g}, momentum "
        f"{momentum:.6g}." in printed
    )


@in_step_only
def test_fit_without_the_callback_afterwards_is_constant():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.5))
    callback = CyclicLR(0.01, 0.2, 4, base_momentum=0.0, max_momentum=0.0)
    fit_probe(model, 6, 1, [callback])
    last = cyclic_reference([5], 0.01, 0.2, 4)[0]
    assert float(model.optimizer.learning_rate) == pytest.approx(last)
    assert model.optimizer.momentum == 0.0
    recorder = BatchRecorder()
    start = model.get_weights()[0].item()
    fit_probe(model, 6, 1, [recorder])
    # Momentum 0 and the last rate, held: equal plain SGD steps.
    np.testing.assert_allclose(
        recorder.applied_rates(start), np.full(6, last), rtol=1e-5
    )


@in_step_only
def test_fit_after_an_interrupted_fit_is_constant():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.5))
    callback = CyclicLR(0.01, 0.2, 4, base_momentum=0.0, max_momentum=0.0)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_probe(model, 6, 2, [callback, InterruptAt(epoch=0, batch=2)])
    recorder = BatchRecorder()
    fit_probe(model, 6, 1, [recorder])
    last = cyclic_reference([2], 0.01, 0.2, 4)[0]
    assert model.optimizer.momentum == 0.0
    assert float(model.optimizer.learning_rate) == pytest.approx(last)
    steps = -np.diff(recorder.probe_weights())
    np.testing.assert_allclose(steps, np.full(5, last), rtol=1e-5)


@in_step_only
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
    assert isinstance(loaded.optimizer.momentum, float)
    config = loaded.optimizer.get_config()
    rate = cyclic_reference([9], 0.001, 0.01, 3)[0]
    assert config["learning_rate"] == pytest.approx(rate, rel=1e-6)
    assert config["momentum"] == pytest.approx(
        0.95 - 0.1 * (rate - 0.001) / 0.009
    )
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_a_recompiled_model_gets_a_fresh_step():
    model = probe_model(keras.optimizers.SGD(0.5))
    callback = CyclicLR(0.01, 0.2, 3)
    fit_probe(model, 4, 1, [callback])
    model.compile(keras.optimizers.SGD(0.5), loss="mse")
    recorder = BatchRecorder()
    fit_probe(model, 4, 1, [callback, recorder])
    # The new optimizer starts its own count; the new loss is used.
    np.testing.assert_allclose(
        recorder.logs["learning_rate"],
        cyclic_reference(np.arange(4), 0.01, 0.2, 3),
        rtol=1e-12,
    )
    assert model.loss == "mse"


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


BAD_ARGUMENTS = [
    (
        {"base_lr": 0.2},
        (
            r"Invalid value received for argument `max_lr`. Expected a float "
            r">= base_lr=0.2. Received: max_lr=0.1"
        ),
    ),
    (
        {"base_lr": -1.0},
        (
            r"argument `base_lr`. Expected a float in \[0.0, inf\). "
            r"Received: base_lr=-1.0"
        ),
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
        {"scale_mode": "epoch"},
        (
            r"argument `scale_mode`. Expected one of 'cycle', 'iterations'. "
            r"Received: scale_mode='epoch'"
        ),
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


def test_optimizer_with_a_schedule_is_refused():
    schedule = CyclicalLearningRate(0.001, 0.01, 4)
    with pytest.raises(
        ValueError,
        match=r"CyclicLR sets the learning rate itself, but the optimizer was "
        r"compiled with a `LearningRateSchedule` \(CyclicalLearningRate\), "
        r"whose learning rate cannot be set. Compile with a float learning "
        r"rate \(e.g. `SGD\(learning_rate=1e-3\)`\), or use the schedule "
        r"alone without this callback.",
    ):
        _fit_with(keras.optimizers.SGD(schedule), CyclicLR(0.001, 0.01, 4))


def test_optimizer_with_a_callable_learning_rate_is_refused():
    with pytest.raises(
        ValueError,
        match=r"CyclicLR sets the learning rate itself, but the optimizer was "
        r"compiled with a callable learning rate .* which cannot be set",
    ):
        _fit_with(keras.optimizers.SGD(lambda: 0.01), CyclicLR(0.001, 0.01, 4))


@in_step_only
def test_optimizer_without_momentum_is_refused():
    with pytest.raises(
        ValueError,
        match=r"CyclicLR cycles the momentum, but the optimizer Adagrad has "
        r"neither `momentum` nor `beta_1`. .* or pass `base_momentum=None, "
        r"max_momentum=None`.",
    ):
        _fit_with(
            keras.optimizers.Adagrad(0.01),
            CyclicLR(0.001, 0.01, 4, base_momentum=0.8, max_momentum=0.9),
        )


@in_step_only
def test_sgd_without_momentum_slots_is_refused():
    with pytest.raises(
        ValueError,
        match=r"the optimizer SGD was created with momentum=0.0, so it keeps "
        r"no momentum slots. Create it with a positive momentum, e.g. "
        r"`keras.optimizers.SGD\(learning_rate=0.01, momentum=0.9\)`",
    ):
        _fit_with(
            keras.optimizers.SGD(0.01),
            CyclicLR(0.001, 0.01, 4, base_momentum=0.8, max_momentum=0.9),
        )


@jax_only
def test_jax_sets_the_rate_between_batches():
    model = probe_model(keras.optimizers.SGD(0.5), steps_per_execution=4)
    recorder = BatchRecorder()
    fit_probe(model, 16, 1, [CyclicLR(0.01, 0.2, 3), recorder])
    rates = cyclic_reference(np.arange(16), 0.01, 0.2, 3)
    held = np.repeat(rates[0::4], 4)
    np.testing.assert_allclose(
        -recorder.probe_weights(), np.cumsum(held)[3::4], rtol=1e-5
    )
    np.testing.assert_allclose(
        recorder.logs["learning_rate"], rates[0::4], rtol=1e-12
    )


@jax_only
def test_jax_refuses_momentum_cycling():
    with pytest.raises(
        ValueError,
        match=r"CyclicLR cannot cycle the momentum on the JAX backend",
    ):
        _fit_with(
            keras.optimizers.SGD(0.01, momentum=0.9),
            CyclicLR(0.001, 0.01, 4, base_momentum=0.8, max_momentum=0.9),
        )
