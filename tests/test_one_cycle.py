import os
import warnings

import keras
import numpy as np
import pytest
from lr_policy_checks import BatchRecorder
from lr_policy_checks import assert_momentum_policy_applied
from lr_policy_checks import check_bad_arguments
from lr_policy_checks import fit_probe
from lr_policy_checks import one_cycle_reference
from lr_policy_checks import probe_model
from lr_policy_checks import regression_data
from lr_policy_checks import resumable_run
from lr_policy_checks import small_mlp

from keras_regkit.callbacks import OneCycle


def _regression_data(samples=80):
    return regression_data(samples, features=5, outputs=1)


def _mlp(optimizer):
    return small_mlp(optimizer, features=5, outputs=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        pytest.param(
            {"pct_start": 0.3, "anneal_strategy": "cos", "three_phase": False},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_fit_trace_is_the_closed_form(kwargs):
    # total_steps from fit: 4 epochs of 9 batches.
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    policy = OneCycle(0.2, **kwargs)
    recorder = BatchRecorder(keys=("learning_rate", "momentum"), policy=policy)
    fit_probe(model, 9, 4, [policy, recorder])
    rates, momenta = one_cycle_reference(np.arange(36), 0.2, 36, **kwargs)
    assert_momentum_policy_applied(recorder, rates, momenta, rtol=1e-4)


def test_learning_rate_only():
    model = probe_model(keras.optimizers.SGD(0.5))
    recorder = BatchRecorder()
    callback = OneCycle(0.1, base_momentum=None, max_momentum=None)
    fit_probe(model, 10, 2, [callback, recorder])
    rates, _ = one_cycle_reference(np.arange(20), 0.1, 20)
    # Weight differences of float32 weights near 1: ~1e-7 absolute.
    np.testing.assert_allclose(
        recorder.applied_rates(), rates, rtol=1e-4, atol=5e-7
    )
    assert model.optimizer.momentum == 0.0


@pytest.mark.parametrize(
    "optimizer,momentum",
    [
        (lambda: keras.optimizers.SGD(), False),
        (lambda: keras.optimizers.SGD(momentum=0.9), True),
        (lambda: keras.optimizers.Adam(), False),
    ],
    ids=["sgd", "sgd_momentum", "adam"],
)
def test_defaults_work_with_keras_optimizers(optimizer, momentum):
    model = _mlp(optimizer())
    policy = OneCycle(0.05)
    recorder = BatchRecorder(keys=("learning_rate", "momentum"), policy=policy)
    x, y = _regression_data(40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=2,
            verbose=0,
            callbacks=[policy, recorder],
        )
    rates, momenta = one_cycle_reference(np.arange(20), 0.05, 20)
    np.testing.assert_allclose(
        recorder.logs["learning_rate"], rates, rtol=1e-7, atol=1e-12
    )
    said = [
        str(w.message)
        for w in caught
        if "cycles the learning rate only" in str(w.message)
    ]
    if momentum:
        np.testing.assert_allclose(recorder.logs["momentum"], momenta)
        assert said == []
    else:
        assert recorder.logs["momentum"] == [None] * 20
        assert len(said) == 1
        assert said[0].startswith(
            "OneCycle cycles the learning rate only: the optimizer "
            f"{type(model.optimizer).__name__}"
        )


def test_steps_per_execution_sets_the_rate_once_per_execution():
    model = probe_model(keras.optimizers.SGD(0.5), steps_per_execution=4)
    recorder = BatchRecorder()
    callback = OneCycle(0.1, base_momentum=None, max_momentum=None)
    with pytest.warns(
        UserWarning,
        match=r"OneCycle: the model was compiled with steps_per_execution=4, "
        r".* held for 4 steps. For a learning rate exact at every iteration, "
        r"compile the optimizer with "
        r"`keras_regkit.schedules.OneCycleLearningRate` instead.",
    ):
        fit_probe(model, 8, 2, [callback, recorder])
    rates, _ = one_cycle_reference(np.arange(16), 0.1, 16)
    held = np.repeat(rates[0::4], 4)
    np.testing.assert_allclose(
        -recorder.probe_weights(), np.cumsum(held)[3::4], rtol=1e-5
    )


def _resumable_run(tmp_path, interrupt):
    backup = os.path.join(tmp_path, "backup")

    def callbacks():
        # BackupAndRestore first: it restores before OneCycle starts.
        policy = OneCycle(0.05)
        return [
            keras.callbacks.BackupAndRestore(backup),
            policy,
            BatchRecorder(keys=("learning_rate", "momentum"), policy=policy),
        ]

    x, y = _regression_data()  # 10 batches per epoch
    trace, model = resumable_run(
        lambda: _mlp(keras.optimizers.SGD(0.01, momentum=0.9)),
        callbacks,
        x,
        y,
        epochs=5,
        interrupt=interrupt,
    )
    return trace, model.get_weights()


@pytest.mark.slow
def test_backup_and_restore_resumes_the_cycle(tmp_path):
    straight, weights = _resumable_run(tmp_path / "a", interrupt=None)
    resumed, resumed_weights = _resumable_run(tmp_path / "b", interrupt=(3, 4))
    assert resumed == straight
    rates, momenta = one_cycle_reference(np.arange(50), 0.05, 50)
    np.testing.assert_allclose(straight["learning_rate"], rates, rtol=1e-7)
    np.testing.assert_allclose(straight["momentum"], momenta, rtol=1e-12)
    for a, b in zip(weights, resumed_weights):
        np.testing.assert_array_equal(a, b)


def test_consecutive_fits_with_total_steps_continue():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    callback = OneCycle(0.1, total_steps=30)
    recorders = [BatchRecorder(), BatchRecorder()]
    fit_probe(model, 6, 2, [callback, recorders[0]])
    fit_probe(model, 6, 3, [callback, recorders[1]])
    rates, _ = one_cycle_reference(np.arange(30), 0.1, 30)
    np.testing.assert_allclose(
        recorders[0].logs["learning_rate"] + recorders[1].logs["learning_rate"],
        rates,
        rtol=1e-7,
    )


def test_initial_epoch_resumes_a_cycle_sized_by_epochs():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    first, second = BatchRecorder(), BatchRecorder()
    fit_probe(model, 5, 2, [OneCycle(0.1, total_steps=20), first])
    fit_probe(model, 5, 4, [OneCycle(0.1), second], initial_epoch=2)
    rates, _ = one_cycle_reference(np.arange(20), 0.1, 20)
    np.testing.assert_allclose(
        first.logs["learning_rate"] + second.logs["learning_rate"],
        rates,
        rtol=1e-7,
    )


def test_a_finished_cycle_is_not_trained_on():
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    fit_probe(model, 4, 2, [OneCycle(0.1)])
    with pytest.raises(
        ValueError,
        match=r"OneCycle: the optimizer has already taken 8 iterations, and "
        r"the cycle ends at total_steps=8. To run a new cycle, compile the "
        r"model with a new optimizer; to make this one longer, pass a larger "
        r"`total_steps`.",
    ):
        fit_probe(model, 4, 2, [OneCycle(0.1)])
    assert int(model.optimizer.iterations) == 8
    # Past total_steps within a fit: stops there, as PyTorch does.
    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    with pytest.raises(
        ValueError,
        match=r"OneCycle reached iteration 6, past the end of its cycle "
        r"\(total_steps=6 covers iterations 0 to 5\). Pass a larger "
        r"`total_steps`, or train for fewer steps.",
    ):
        fit_probe(model, 4, 2, [OneCycle(0.1, total_steps=6)])
    assert int(model.optimizer.iterations) == 6


def test_unknown_steps_per_epoch_needs_total_steps():
    def batches():
        while True:
            yield np.ones((2, 1), "float32"), np.zeros((2, 1), "float32")

    model = probe_model(keras.optimizers.SGD(0.5, momentum=0.9))
    with pytest.raises(
        ValueError,
        match=r"Invalid value received for argument `total_steps`. Expected "
        r"an int when `fit` cannot tell its steps per epoch \(pass "
        r"`steps_per_epoch` to `fit`, or `total_steps` here\). "
        r"Received: total_steps=None",
    ):
        model.fit(
            batches(),
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=[OneCycle(0.1)],
        )
    recorder = BatchRecorder()
    model.fit(
        batches(),
        epochs=1,
        steps_per_epoch=12,
        verbose=0,
        shuffle=False,
        callbacks=[OneCycle(0.1, total_steps=12), recorder],
    )
    rates, _ = one_cycle_reference(np.arange(12), 0.1, 12)
    np.testing.assert_allclose(recorder.logs["learning_rate"], rates, rtol=1e-7)


def test_config_round_trip():
    callback = OneCycle(
        0.3, 100, 0.25, 10.0, 100.0, "cos", False, 0.8, 0.9, verbose=1
    )
    config = callback.get_config()
    assert config == {
        "max_lr": 0.3,
        "total_steps": 100,
        "pct_start": 0.25,
        "div_factor": 10.0,
        "final_div_factor": 100.0,
        "anneal_strategy": "cos",
        "three_phase": False,
        "base_momentum": 0.8,
        "max_momentum": 0.9,
        "verbose": 1,
    }
    assert OneCycle.from_config(config).get_config() == config


BAD_ARGUMENTS = [
    (
        {"max_lr": -0.1},
        (
            r"Invalid value received for argument `max_lr`. Expected a float "
            r"in \(0.0, inf\). Received: max_lr=-0.1"
        ),
    ),
    (
        {"total_steps": 2},
        (
            r"argument `total_steps`. Expected an int > 1 / pct_start = "
            r"2.22222, so that the warm-up lasts at least one step. "
            r"Received: total_steps=2"
        ),
    ),
    (
        {"pct_start": 0.0},
        (
            r"argument `pct_start`. Expected a float in \(0.0, 1.0\). "
            r"Received: pct_start=0.0"
        ),
    ),
    (
        {"pct_start": 0.7},
        (
            r"argument `pct_start`. Expected a float in \(0, 0.5\] when "
            r"three_phase=True \(the warm-up and the way back down each take "
            r"pct_start of the steps\). Received: pct_start=0.7"
        ),
    ),
    (
        {"div_factor": 0.9},
        (
            r"argument `div_factor`. Expected a float in \[1.0, inf\). "
            r"Received: div_factor=0.9"
        ),
    ),
    (
        {"final_div_factor": 0},
        (
            r"argument `final_div_factor`. Expected a float in \[1.0, inf\). "
            r"Received: final_div_factor=0"
        ),
    ),
    (
        {"anneal_strategy": "exp"},
        (
            r"argument `anneal_strategy`. Expected one of 'linear', 'cos'. "
            r"Received: anneal_strategy='exp'"
        ),
    ),
    (
        {"three_phase": "yes"},
        (
            r"argument `three_phase`. Expected a bool. "
            r"Received: three_phase='yes'"
        ),
    ),
    (
        {"base_momentum": 0.97},
        (
            r"argument `max_momentum`. Expected a float >= "
            r"base_momentum=0.97. Received: max_momentum=0.95"
        ),
    ),
    (
        {"base_momentum": None},
        (
            r"argument `base_momentum`. Expected a float in \[0, 1\] when "
            r"`max_momentum` is given.*Received: base_momentum=None"
        ),
    ),
]


BAD_ARGUMENTS += [
    (
        {"total_steps": np.float32(20)},
        r"argument `total_steps`. Expected an int > 1 / pct_start",
    ),
    (
        {"max_lr": float("nan")},
        (
            r"argument `max_lr`. Expected a float in \(0.0, inf\). "
            r"Received: max_lr=nan"
        ),
    ),
    (
        {"max_lr": "0.1"},
        r"argument `max_lr`. .*Received: max_lr='0.1'",
    ),
    (
        {"max_lr": True},
        r"argument `max_lr`. .*Received: max_lr=True",
    ),
    (
        {"verbose": -1},
        r"argument `verbose`. Expected an int.*Received: verbose=-1",
    ),
    (
        {"verbose": 0.5},
        r"argument `verbose`. .*Received: verbose=0.5",
    ),
]


def test_bad_arguments():
    check_bad_arguments(OneCycle, {"max_lr": 0.1}, BAD_ARGUMENTS)


def test_optimizer_without_momentum_cycles_the_rate_and_warns():
    model = _mlp(keras.optimizers.Adagrad(0.01))
    x, y = _regression_data(16)
    with pytest.warns(
        UserWarning,
        match=r"OneCycle cycles the learning rate only: the optimizer Adagrad "
        r"has no momentum.",
    ):
        history = model.fit(
            x, y, batch_size=2, epochs=1, verbose=0, callbacks=[OneCycle(0.1)]
        )
    rates, _ = one_cycle_reference(np.arange(8), 0.1, 8)
    assert history.history["learning_rate"] == [pytest.approx(rates[-1])]
    assert "momentum" not in history.history


def test_numpy_scalars_are_accepted():
    callback = OneCycle(
        np.float32(0.5),
        np.int64(40),
        pct_start=np.float64(0.25),
        div_factor=np.int32(10),
        final_div_factor=np.float32(100.0),
        three_phase=np.bool_(False),
        base_momentum=np.float32(0.5),
        max_momentum=np.float32(0.75),
        verbose=np.int8(1),
    )
    config = callback.get_config()
    assert all(type(v) in (int, float, str, bool) for v in config.values())
    assert config["total_steps"] == 40 and config["three_phase"] is False
    assert callback.learning_rate_at(9) == pytest.approx(0.5)
