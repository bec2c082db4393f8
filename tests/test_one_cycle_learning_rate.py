import os

import keras
import numpy as np
import pytest
from keras import ops
from lr_policy_checks import BatchRecorder
from lr_policy_checks import assert_each_step_used_its_rate
from lr_policy_checks import check_bad_arguments
from lr_policy_checks import fit_probe
from lr_policy_checks import one_cycle_reference
from lr_policy_checks import probe_model

from keras_regkit.schedules import OneCycleLearningRate


def test_matches_closed_form():
    cases = [
        (strategy, three_phase, pct_start, total_steps)
        for strategy in ("linear", "cos")
        for three_phase, pct_start in ((True, 0.45), (True, 0.25), (False, 0.3))
        for total_steps in (40, 37)
    ]
    for strategy, three_phase, pct_start, total_steps in cases:
        schedule = OneCycleLearningRate(
            0.5, total_steps, pct_start, 20.0, 100.0, strategy, three_phase
        )
        steps = np.arange(total_steps + 5)
        expected, _ = one_cycle_reference(
            steps,
            0.5,
            total_steps,
            pct_start,
            20.0,
            100.0,
            strategy,
            three_phase,
        )
        values = ops.convert_to_numpy(schedule(steps))
        # float32 inside the step: errors of a few ulps of max_lr at the end.
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
        python = [schedule.python_value(step) for step in steps]
        np.testing.assert_allclose(python, expected, rtol=1e-12, atol=1e-15)


def test_shape_of_the_paper_policy():
    schedule = OneCycleLearningRate(
        1.0, 100, div_factor=10.0, final_div_factor=1000.0
    )
    values = np.array([schedule.python_value(step) for step in range(100)])
    # Warm-up from max/div to max at step 44, back to the start at step 88,
    # then down to start/final_div at the last step.
    assert values[0] == pytest.approx(0.1)
    assert int(np.argmax(values)) == 44
    assert values[44] == pytest.approx(1.0)
    assert values[88] == pytest.approx(0.1)
    assert values[99] == pytest.approx(1e-4)
    assert np.all(np.diff(values[:45]) > 0)
    assert np.all(np.diff(values[44:]) < 0)
    assert schedule.python_value(500) == pytest.approx(1e-4)


def test_config_and_keras_file_round_trip(tmp_path):
    schedule = OneCycleLearningRate(0.2, 30, 0.3, 10.0, 50.0, "cos", False)
    config = schedule.get_config()
    assert config == {
        "maximal_learning_rate": 0.2,
        "total_steps": 30,
        "pct_start": 0.3,
        "div_factor": 10.0,
        "final_div_factor": 50.0,
        "anneal_strategy": "cos",
        "three_phase": False,
        "name": "OneCycleLearningRate",
    }
    assert OneCycleLearningRate.from_config(config).get_config() == config

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(schedule), loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["registered_name"] == "keras_regkit>OneCycleLearningRate"
    assert saved["config"] == config
    # 4 steps taken: the rate of iteration 4, from the NumPy reference.
    rates, _ = one_cycle_reference([4], 0.2, 30, 0.3, 10.0, 50.0, "cos", False)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(
        rates[0], rel=1e-6
    )


def test_per_iteration_inside_the_step_with_steps_per_execution():
    schedule = OneCycleLearningRate(0.1, 32, 0.25, 10.0, 10.0)
    model = probe_model(keras.optimizers.SGD(schedule), steps_per_execution=4)
    recorder = BatchRecorder()
    fit_probe(model, 16, 2, [recorder])
    expected, _ = one_cycle_reference(np.arange(32), 0.1, 32, 0.25, 10.0, 10.0)
    assert_each_step_used_its_rate(recorder, expected, group=4)


BAD_ARGUMENTS = [
    (
        {"maximal_learning_rate": 0.0},
        (
            r"argument `maximal_learning_rate`. Expected a float in "
            r"\(0.0, inf\). Received: maximal_learning_rate=0.0"
        ),
    ),
    (
        {"total_steps": 10.0},
        (
            r"argument `total_steps`. Expected an int > 1 / pct_start = "
            r"2.22222, so that the warm-up lasts at least one step. "
            r"Received: total_steps=10.0"
        ),
    ),
    (
        {"total_steps": 2},
        (
            r"Expected an int > 1 / pct_start = 2.22222.*"
            r"Received: total_steps=2"
        ),
    ),
    (
        {"pct_start": 1.0, "three_phase": False},
        (
            r"argument `pct_start`. Expected a float in \(0.0, 1.0\). "
            r"Received: pct_start=1.0"
        ),
    ),
    (
        {"pct_start": 0.6},
        (
            r"argument `pct_start`. Expected a float in \(0, 0.5\] when "
            r"three_phase=True.*Received: pct_start=0.6"
        ),
    ),
    (
        {"div_factor": 0.5},
        (
            r"argument `div_factor`. Expected a float in \[1.0, inf\). "
            r"Received: div_factor=0.5"
        ),
    ),
    (
        {"final_div_factor": 0.1},
        (
            r"argument `final_div_factor`. Expected a float in \[1.0, inf\). "
            r"Received: final_div_factor=0.1"
        ),
    ),
    (
        {"anneal_strategy": "cosine"},
        (
            r"argument `anneal_strategy`. Expected one of 'linear', 'cos'. "
            r"Received: anneal_strategy='cosine'"
        ),
    ),
    (
        {"three_phase": 1},
        r"argument `three_phase`. Expected a bool. Received: three_phase=1",
    ),
]


BAD_ARGUMENTS += [
    (
        {"maximal_learning_rate": np.nan},
        r"`maximal_learning_rate`. .*Received: maximal_learning_rate=nan",
    ),
    (
        {"total_steps": "100"},
        r"argument `total_steps`. .*Received: total_steps='100'",
    ),
    (
        {"div_factor": True},
        r"argument `div_factor`. .*Received: div_factor=True",
    ),
    (
        {"name": ""},
        r"argument `name`. Expected a non-empty str. Received: name=''",
    ),
]


def test_numpy_scalars_are_accepted():
    schedule = OneCycleLearningRate(
        np.float32(0.5),
        np.int64(40),
        np.float64(0.25),
        np.int32(10),
        np.float32(100.0),
        three_phase=np.bool_(False),
    )
    config = schedule.get_config()
    assert all(type(v) in (int, float, str, bool) for v in config.values())
    assert schedule.python_value(9) == pytest.approx(0.5)


def test_bad_arguments():
    check_bad_arguments(
        OneCycleLearningRate,
        {"maximal_learning_rate": 0.1, "total_steps": 100},
        BAD_ARGUMENTS,
    )
