import os

import keras
import numpy as np
import pytest
from keras import ops
from lr_policy_checks import BatchRecorder
from lr_policy_checks import assert_each_step_used_its_rate
from lr_policy_checks import check_bad_arguments
from lr_policy_checks import cyclic_reference
from lr_policy_checks import fit_probe
from lr_policy_checks import probe_model

from keras_regkit.schedules import CyclicalLearningRate


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
def third_per_cycle(x):
    return 1.0 / (3.0 ** (x - 1.0))


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
def slow_decay(x):
    return 1.0 / (1.0 + 0.05 * x)


def _values(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def test_matches_closed_form_over_four_cycles():
    for mode, gamma in (
        ("triangular", 1.0),
        ("triangular2", 1.0),
        ("exp_range", 0.97),
    ):
        for step_size in (4, 2.5):
            schedule = CyclicalLearningRate(0.01, 0.3, step_size, mode, gamma)
            steps = np.arange(int(8 * step_size) + 3)
            expected = cyclic_reference(
                steps, 0.01, 0.3, step_size, mode, gamma
            )
            values = ops.convert_to_numpy(schedule(steps))
            # float32 in the step: a few ulps of max_lr.
            np.testing.assert_allclose(values, expected, rtol=1e-6, atol=5e-7)
            python = [schedule.python_value(step) for step in steps]
            np.testing.assert_allclose(python, expected, rtol=1e-12)


def test_known_values():
    triangular = CyclicalLearningRate(0.1, 0.5, step_size=2)
    np.testing.assert_allclose(
        _values(triangular, range(9)),
        [0.1, 0.3, 0.5, 0.3, 0.1, 0.3, 0.5, 0.3, 0.1],
        rtol=1e-6,
    )
    halving = CyclicalLearningRate(0.0, 1.0, 2, mode="triangular2")
    np.testing.assert_allclose(
        _values(halving, [2, 6, 10, 14]), [1.0, 0.5, 0.25, 0.125], rtol=1e-6
    )
    decaying = CyclicalLearningRate(0.0, 1.0, 2, mode="exp_range", gamma=0.5)
    np.testing.assert_allclose(
        _values(decaying, [1, 2, 6]), [0.25, 0.25, 1 / 64], rtol=1e-6
    )


def test_vectorised_steps():
    schedule = CyclicalLearningRate(0.01, 0.3, 3, mode="triangular2")
    steps = np.arange(20)
    values = ops.convert_to_numpy(schedule(steps))
    np.testing.assert_allclose(
        values,
        cyclic_reference(steps, 0.01, 0.3, 3, "triangular2"),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "scale_fn,scale_mode",
    [(third_per_cycle, "cycle"), (slow_decay, "iterations")],
)
def test_scale_fn_of_cycle_or_iteration(scale_fn, scale_mode):
    schedule = CyclicalLearningRate(
        0.01, 0.3, 3, scale_fn=scale_fn, scale_mode=scale_mode
    )
    steps = np.arange(25)
    expected = cyclic_reference(
        steps, 0.01, 0.3, 3, scale_fn=scale_fn, scale_mode=scale_mode
    )
    np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-6)
    assert schedule.get_config()["scale_fn"] == (
        f"keras_regkit_tests>{scale_fn.__name__}"
    )


def test_scale_fn_given_by_registered_name():
    schedule = CyclicalLearningRate(
        0.01, 0.3, 3, scale_fn="keras_regkit_tests>third_per_cycle"
    )
    assert schedule.scale_fn is third_per_cycle
    np.testing.assert_allclose(
        _values(schedule, range(13)),
        cyclic_reference(range(13), 0.01, 0.3, 3, scale_fn=third_per_cycle),
        rtol=1e-6,
    )


def test_config_round_trip():
    schedule = CyclicalLearningRate(
        0.01,
        0.3,
        5,
        scale_fn=slow_decay,
        scale_mode="iterations",
        name="clr",
    )
    config = schedule.get_config()
    assert config == {
        "initial_learning_rate": 0.01,
        "maximal_learning_rate": 0.3,
        "step_size": 5,
        "mode": "triangular",
        "gamma": 1.0,
        "scale_fn": "keras_regkit_tests>slow_decay",
        "scale_mode": "iterations",
        "name": "clr",
    }
    restored = CyclicalLearningRate.from_config(config)
    assert restored.get_config() == config
    assert restored.scale_fn is slow_decay
    serialized = keras.optimizers.schedules.serialize(schedule)
    again = keras.optimizers.schedules.deserialize(serialized)
    assert isinstance(again, CyclicalLearningRate)
    assert again.get_config() == config


def test_unregistered_scale_fn_cannot_be_saved():
    schedule = CyclicalLearningRate(0.01, 0.3, 5, scale_fn=lambda c: 1.0)
    assert float(schedule(3)) == pytest.approx(0.01 + 0.29 * 0.6, rel=1e-6)
    with pytest.raises(
        ValueError,
        match=r"Cannot serialize `CyclicalLearningRate`: its `scale_fn` .* is "
        r"not registered with Keras",
    ):
        schedule.get_config()


def test_keras_file_round_trip_without_custom_objects(tmp_path):
    schedule = CyclicalLearningRate(0.01, 0.3, 3, scale_fn=third_per_cycle)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype("float32")
    y = rng.normal(size=(40, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    loaded = keras.models.load_model(path)
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["registered_name"] == "keras_regkit>CyclicalLearningRate"
    assert saved["config"] == schedule.get_config()
    restored = keras.optimizers.schedules.deserialize(saved)
    assert restored.scale_fn is third_per_cycle
    assert int(loaded.optimizer.iterations) == 5
    # The loaded optimizer evaluates the schedule at its restored counter.
    assert float(loaded.optimizer.learning_rate) == float(schedule(5))
    # Both go on from iteration 5 with the same state: same weights.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_per_iteration_inside_the_step_with_steps_per_execution(jit_compile):
    schedule = CyclicalLearningRate(0.01, 0.1, 3, mode="triangular2")
    model = probe_model(
        keras.optimizers.SGD(schedule),
        steps_per_execution=4,
        jit_compile=jit_compile,
    )
    recorder = BatchRecorder()
    fit_probe(model, 24, 2, [recorder])
    # Hooks run once per 4 steps, yet every step used its own rate.
    rates = cyclic_reference(np.arange(48), 0.01, 0.1, 3, "triangular2")
    assert_each_step_used_its_rate(recorder, rates, group=4)


BAD_ARGUMENTS = [
    (
        {"initial_learning_rate": -0.1},
        (
            r"Invalid value received for argument `initial_learning_rate`. "
            r"Expected a float in \[0.0, inf\). "
            r"Received: initial_learning_rate=-0.1"
        ),
    ),
    (
        {"maximal_learning_rate": 0.001},
        (
            r"Invalid value received for argument `maximal_learning_rate`. "
            r"Expected a finite float >= initial_learning_rate=0.01. "
            r"Received: maximal_learning_rate=0.001"
        ),
    ),
    (
        {"maximal_learning_rate": "big"},
        (
            r"argument `maximal_learning_rate`. Expected a finite float >= "
            r"initial_learning_rate=0.01. Received: maximal_learning_rate='big'"
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
        {"step_size": -3},
        r"Expected a positive number. Received: step_size=-3",
    ),
    (
        {"step_size": True},
        r"Expected a positive number. Received: step_size=True",
    ),
    (
        {"mode": "triangle"},
        (
            r"argument `mode`. Expected one of 'triangular', 'triangular2', "
            r"'exp_range'. Received: mode='triangle'"
        ),
    ),
    (
        {"gamma": 0.0},
        (
            r"argument `gamma`. Expected a float in \(0.0, 1.0\]. "
            r"Received: gamma=0.0"
        ),
    ),
    (
        {"gamma": 1.5},
        r"Expected a float in \(0.0, 1.0\]. Received: gamma=1.5",
    ),
    (
        {"scale_mode": "iteration"},
        (
            r"argument `scale_mode`. Expected one of 'cycle', 'iterations'. "
            r"Received: scale_mode='iteration'"
        ),
    ),
    (
        {"scale_fn": "keras_regkit_tests>no_such_function"},
        (
            r"argument `scale_fn`. Expected None, a callable, or the name of "
            r"a function registered with "
            r"`@keras.saving.register_keras_serializable\(\)`. "
            r"Received: scale_fn='keras_regkit_tests>no_such_function'"
        ),
    ),
    (
        {"scale_fn": 2.0},
        (
            r"argument `scale_fn`. Expected None, a callable.*"
            r"Received: scale_fn=2.0"
        ),
    ),
    (
        {"maximal_learning_rate": np.inf},
        r"Expected a finite float >= .*Received: maximal_learning_rate=inf",
    ),
    (
        {"mode": "exp_range", "scale_mode": "cycle"},
        (
            r"argument `scale_mode`. Expected None or 'iterations' with "
            r"mode='exp_range'.*Received: scale_mode='cycle'"
        ),
    ),
    (
        {"name": 3},
        r"argument `name`. Expected a non-empty str. Received: name=3",
    ),
    (
        {"gamma": "0.5"},
        r"argument `gamma`. .*Received: gamma='0.5'",
    ),
    (
        {"scale_fn": third_per_cycle, "mode": "exp_range"},
        (
            r"argument `mode`. Expected 'triangular' \(the default\) when "
            r"`scale_fn` is given.*Received: mode='exp_range'"
        ),
    ),
]


def test_numpy_scalars_and_old_configs():
    schedule = CyclicalLearningRate(
        np.float32(0.25),
        np.float64(1.0),
        np.int64(2),
        "exp_range",
        np.float32(0.5),
    )
    config = schedule.get_config()
    assert config["step_size"] == 2 and type(config["step_size"]) is int
    assert all(
        type(v) in (int, float, str, type(None)) for v in config.values()
    )
    np.testing.assert_allclose(
        _values(schedule, [0, 1, 2]), [0.25, 0.25 + 0.75 * 0.5 * 0.5, 0.4375]
    )
    # The configs written when `scale_mode` defaulted to "cycle" load, with
    # the exp_range scale per iteration as before.
    old = CyclicalLearningRate.from_config({**config, "scale_mode": "cycle"})
    assert old.scale_mode is None
    np.testing.assert_allclose(
        _values(old, range(8)), _values(schedule, range(8))
    )


def test_bad_arguments():
    check_bad_arguments(
        CyclicalLearningRate,
        {
            "initial_learning_rate": 0.01,
            "maximal_learning_rate": 0.1,
            "step_size": 4,
        },
        BAD_ARGUMENTS,
    )
