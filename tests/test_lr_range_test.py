import os
import sys

import keras
import numpy as np
import pytest
from lr_policy_checks import InterruptAt
from lr_policy_checks import check_bad_arguments
from sklearn.datasets import load_digits

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import LRRangeTest
from keras_regkit.callbacks import lr_range_test
from keras_regkit.schedules import CyclicalLearningRate


def _data(samples=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def _model(optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.SGD(0.01, momentum=0.9), loss="mse"
    )
    return model


def _state(model):
    return (
        [np.array(v, copy=True) for v in model.variables],
        [np.array(v, copy=True) for v in model.optimizer.variables],
    )


def _assert_same_state(a, b):
    for left, right in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(left, right)
    assert len(a[0]) == len(b[0]) and len(a[1]) == len(b[1])


def test_restores_weights_and_optimizer_state_bit_for_bit():
    x, y = _data()
    model, twin = _model(), _model()
    for m in (model, twin):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    before = _state(model)
    assert any(np.any(v != 0) for v in before[1][2:])  # momentum slots
    np.random.seed(5)
    test = lr_range_test(
        model, x, y, batch_size=16, min_lr=1e-4, max_lr=100.0, steps=40
    )
    assert test.divergence_lr is not None  # the weights did blow up
    _assert_same_state(_state(model), before)
    # Training goes on exactly as if the test never ran (dropout seeds and
    # the shuffling, which draws from NumPy's global generator on JAX).
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=True)
    np.random.seed(5)
    twin.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=True)
    _assert_same_state(_state(model), _state(twin))


@pytest.mark.filterwarnings("ignore:LRRangeTest. the loss:UserWarning")
def test_a_fresh_model_trains_as_if_untested():
    x, y = _data()
    model, twin = _model(), _model()
    np.random.seed(5)
    numpy_state = np.random.get_state()[1].copy()
    lr_range_test(model, x, y, batch_size=16, min_lr=1e-4, max_lr=1.0, steps=12)
    # Shuffling (from NumPy's global generator on JAX) left no trace.
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    # The test built the optimizer; its new slots and counter are zero.
    assert int(model.optimizer.iterations) == 0
    assert all(not np.any(np.array(v)) for v in model.optimizer.variables[2:])
    for m in (model, twin):
        m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    _assert_same_state(_state(model), _state(twin))


def test_restores_even_when_fit_raises():
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = _state(model)
    with pytest.raises(RuntimeError, match="interrupted for the test"):
        lr_range_test(
            model,
            x,
            y,
            batch_size=16,
            steps=30,
            min_lr=1e-3,
            callbacks=[InterruptAt(epoch=1, batch=3)],
        )
    _assert_same_state(_state(model), before)


@pytest.mark.filterwarnings("ignore:LRRangeTest. the loss:UserWarning")
def test_used_as_a_callback_in_fit():
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = _state(model)
    test = LRRangeTest(min_lr=1e-4, max_lr=1e-2, steps=12)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[test])
    assert len(test.losses) == 12
    _assert_same_state(_state(model), before)


@pytest.mark.filterwarnings("ignore:LRRangeTest. the loss:UserWarning")
def test_records_each_batch_loss_not_the_running_mean():
    x, y = _data(96)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]
    # Tiny rates: the weights stay put, so each batch loss is computable.
    test = lr_range_test(
        model,
        x,
        y,
        batch_size=16,
        min_lr=1e-12,
        max_lr=2e-12,
        steps=6,
        mode="linear",
        shuffle=False,
    )
    per_batch = [
        float(
            keras.ops.convert_to_numpy(
                model.compute_loss(x=bx, y=by, y_pred=model(bx))
            )
        )
        for bx, by in batches
    ]
    np.testing.assert_allclose(test.losses, per_batch, rtol=1e-4)
    running = np.cumsum(per_batch) / np.arange(1, 7)
    assert not np.allclose(test.losses[1:], running[1:], rtol=1e-2)


@pytest.mark.filterwarnings("ignore:LRRangeTest. the loss:UserWarning")
@pytest.mark.parametrize(
    "mode", ["exponential", pytest.param("linear", marks=pytest.mark.slow)]
)
def test_ramp(mode, capsys):
    x, y = _data()
    model = _model()
    test = lr_range_test(
        model,
        x,
        y,
        batch_size=16,
        min_lr=1e-6,
        max_lr=1e-3,
        steps=20,
        mode=mode,
        verbose=1,
    )
    assert len(test.learning_rates) == 20
    fraction = np.arange(20) / 19
    if mode == "exponential":
        expected = 1e-6 * (1e3) ** fraction
    else:
        expected = 1e-6 + (1e-3 - 1e-6) * fraction
    # As the float32 variable holds them.
    np.testing.assert_allclose(test.learning_rates, expected, rtol=1e-7)
    assert test.divergence_lr is None
    smoothed, average = [], 0.0
    for i, loss in enumerate(test.losses, start=1):
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average / (1 - 0.9**i))
    np.testing.assert_allclose(test.smoothed_losses, smoothed, rtol=1e-12)
    printed = capsys.readouterr().out
    assert "LRRangeTest: batch 2/20, lr=" in printed
    assert "LRRangeTest: batch 20/20, lr=0.001, loss=" in printed
    assert "LRRangeTest: 20 batches from lr=1e-06, did not diverge" in printed


def test_stops_on_divergence():
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.01))
    test = lr_range_test(
        model, x, y, batch_size=16, min_lr=1e-3, max_lr=1e4, steps=100
    )
    assert len(test.losses) < 100
    assert test.divergence_lr == test.learning_rates[-1]
    last = test.losses[-1]
    assert (not np.isfinite(last)) or (
        test.smoothed_losses[-1] > 4.0 * min(test.smoothed_losses[:-1])
    )


@pytest.mark.slow
def test_suggestion_lies_below_the_divergence_point_on_digits():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target

    def classifier():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    model = classifier()
    test = lr_range_test(
        model, x, y, batch_size=32, min_lr=1e-5, max_lr=100.0, steps=200
    )
    assert test.divergence_lr is not None
    suggestion = test.suggestion
    assert suggestion["base_lr"] == pytest.approx(suggestion["max_lr"] / 4)
    assert suggestion["max_lr"] == test.min_loss_lr
    assert 1e-5 < test.min_loss_lr < test.divergence_lr
    rates, centered = test.centered_losses()
    # The minimum is where the loss had come down the most.
    assert min(centered) == centered[rates.index(test.min_loss_lr)]
    assert min(centered) < 0.8 * centered[0]
    # And training with it works: CyclicLR between the suggested bounds.
    steps = -(-len(x) // 32)
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[CyclicLR(**suggestion, step_size=steps)],
    )
    assert history.history["loss"][-1] < 0.3 < history.history["loss"][0]


def _finished_test(**kwargs):
    x, y = _data()
    arguments = {"min_lr": 1e-4, "max_lr": 100.0, "steps": 16, **kwargs}
    return lr_range_test(_model(), x, y, batch_size=16, **arguments)


def test_plot_writes_a_png_and_draws_on_given_axes(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    path = os.path.join(tmp_path, "range.png")
    test = _finished_test(plot_path=path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["range.png"]
    axes = Figure().add_subplot()
    assert test.plot(ax=axes) is axes
    assert [line.get_label() for line in axes.lines][:2] == [
        "batch loss",
        "smoothed loss",
    ]
    assert axes.get_xscale() == "log"
    assert isinstance(test.plot(), Axes)


def test_plot_failures_keep_the_finished_test(tmp_path, monkeypatch):
    blocker = os.path.join(tmp_path, "a_file")
    with open(blocker, "w") as f:
        f.write("")
    with pytest.warns(
        UserWarning,
        match=r"lr_range_test: the test finished, but its plot could not be "
        r"written to .*a_file/range.png.*The results are returned",
    ):
        test = _finished_test(plot_path=os.path.join(blocker, "range.png"))
    assert len(test.losses) > 3 and test.suggestion["max_lr"] > 0

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.axes", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.warns(UserWarning, match=r"ImportError: LRRangeTest.plot "):
        test = _finished_test(plot_path=os.path.join(tmp_path, "range.png"))
    assert len(test.losses) > 3
    with pytest.raises(
        ImportError,
        match=r"LRRangeTest.plot needs matplotlib. Install it with "
        r"`pip install 'keras_regkit\[plot\]'`",
    ):
        test.plot(os.path.join(tmp_path, "range.png"))
    assert os.listdir(tmp_path) == ["a_file"]


def test_default_ramp_gives_twenty_steps_per_decade():
    assert LRRangeTest().steps == 161  # 8 decades, both ends included
    assert LRRangeTest(min_lr=1e-4, max_lr=1.0).steps == 81
    assert LRRangeTest(mode="linear").steps == 100
    rates = np.array([LRRangeTest().learning_rate_at(i) for i in range(161)])
    assert np.all(np.diff(np.log10(rates)) <= 1 / 20 + 1e-12)


def test_warns_when_the_loss_minimum_is_at_an_end_of_the_range():
    x, y = _data()

    def full_batch_test(**kwargs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(), loss="mse")
        return lr_range_test(model, x, y, batch_size=len(x), steps=20, **kwargs)

    with pytest.warns(
        UserWarning,
        match=r"LRRangeTest: the loss was still falling at the end of the "
        r"range \(lowest at the last learning rate, 0.01\), so the "
        r"suggestion only bounds the usable rate from below. Raise `max_lr`.",
    ):
        full_batch_test(min_lr=1e-4, max_lr=1e-2)
    with pytest.warns(
        UserWarning,
        match=r"LRRangeTest: the loss was lowest at the first learning rate, "
        r"1, so the range starts too high to show where the loss begins to "
        r"fall. Lower `min_lr`.",
    ):
        full_batch_test(min_lr=1.0, max_lr=10.0)


def test_config_round_trip():
    test = LRRangeTest(1e-6, 1.0, 50, "linear", 0.8, 3.0, verbose=1)
    config = test.get_config()
    assert config == {
        "min_lr": 1e-6,
        "max_lr": 1.0,
        "steps": 50,
        "mode": "linear",
        "smoothing": 0.8,
        "divergence_factor": 3.0,
        "verbose": 1,
    }
    assert LRRangeTest.from_config(config).get_config() == config


BAD_ARGUMENTS = [
    (
        {"min_lr": 0.0},
        (
            r"Invalid value received for argument `min_lr`. Expected a float "
            r"in \(0.0, inf\). Received: min_lr=0.0"
        ),
    ),
    (
        {"min_lr": 1.0, "max_lr": 0.5},
        (
            r"argument `max_lr`. Expected a finite float > min_lr=1.0. "
            r"Received: max_lr=0.5"
        ),
    ),
    (
        {"steps": 1},
        r"argument `steps`. Expected an int >= 2. Received: steps=1",
    ),
    (
        {"steps": 10.0},
        r"argument `steps`. Expected an int >= 2. Received: steps=10.0",
    ),
    (
        {"mode": "log"},
        (
            r"argument `mode`. Expected one of 'exponential', 'linear'. "
            r"Received: mode='log'"
        ),
    ),
    (
        {"smoothing": 1.0},
        (
            r"argument `smoothing`. Expected a float in \[0.0, 1.0\). "
            r"Received: smoothing=1.0"
        ),
    ),
    (
        {"divergence_factor": 1.0},
        (
            r"argument `divergence_factor`. Expected a float in \(1.0, inf\). "
            r"Received: divergence_factor=1.0"
        ),
    ),
]


BAD_ARGUMENTS += [
    (
        {"min_lr": "1e-7"},
        r"argument `min_lr`. .*Received: min_lr='1e-7'",
    ),
    (
        {"max_lr": np.inf},
        (
            r"argument `max_lr`. Expected a finite float > min_lr=1e-07. "
            r"Received: max_lr=inf"
        ),
    ),
    (
        {"steps": True},
        r"argument `steps`. Expected an int >= 2. Received: steps=True",
    ),
    (
        {"smoothing": np.nan},
        r"argument `smoothing`. .*Received: smoothing=nan",
    ),
    (
        {"verbose": 3},
        r"argument `verbose`. Expected an int.*Received: verbose=3",
    ),
]


def test_bad_arguments():
    check_bad_arguments(LRRangeTest, {}, BAD_ARGUMENTS)
    test = LRRangeTest(
        np.float32(1e-5), np.float64(1.0), np.int64(30), verbose=np.int64(1)
    )
    assert test.get_config()["steps"] == 30
    assert type(test.get_config()["min_lr"]) is float


def test_bad_arguments_of_the_function():
    x, y = _data()
    cases = [
        (
            {"model": keras.Sequential([keras.layers.Dense(1)])},
            (
                r"argument `model`. Expected a keras.Model compiled with an "
                r"optimizer \(call `model.compile\(optimizer=..., loss=...\)` "
                r"first\)"
            ),
        ),
        ({"model": "model"}, r"Received: model='model'"),
        (
            {"batch_size": 0},
            (
                r"argument `batch_size`. Expected an int >= 1. Received: "
                r"batch_size=0"
            ),
        ),
        ({"batch_size": 16.0}, r"Received: batch_size=16.0"),
        (
            {"plot_path": 3},
            (
                r"argument `plot_path`. Expected a non-empty path \(str or "
                r"os.PathLike\). Received: plot_path=3"
            ),
        ),
        ({"steps": 1}, r"argument `steps`. Expected an int >= 2"),
        ({"verbose": "loud"}, r"Received: verbose='loud'"),
    ]
    for kwargs, message in cases:
        arguments = {"model": _model(), "x": x, "y": y, **kwargs}
        with pytest.raises(ValueError, match=message):
            lr_range_test(**arguments)


def test_epochs_argument_is_refused():
    x, y = _data()
    with pytest.raises(
        ValueError,
        match=r"argument `epochs`. Expected nothing: the test runs `steps` "
        r"batches, however many epochs that takes. Received: epochs=3",
    ):
        lr_range_test(_model(), x, y, epochs=3)


def test_steps_per_execution_is_refused():
    x, y = _data()
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=4)
    with pytest.raises(
        ValueError,
        match=r"LRRangeTest needs the loss of every batch, but the model was "
        r"compiled with steps_per_execution=4, so Keras reports one batch in "
        r"every 4. Compile with steps_per_execution=1 for the test.",
    ):
        lr_range_test(model, x, y, batch_size=16, steps=8)


def test_optimizer_with_a_schedule_is_refused():
    x, y = _data()
    model = _model(keras.optimizers.SGD(CyclicalLearningRate(1e-3, 1e-2, 4)))
    with pytest.raises(
        ValueError,
        match=r"LRRangeTest sets the learning rate itself, but the "
        r"optimizer's learning rate is a `LearningRateSchedule` or a callable",
    ):
        lr_range_test(model, x, y, batch_size=16, steps=8)


def test_suggestion_needs_a_curve():
    x, y = _data()
    test = lr_range_test(
        _model(keras.optimizers.SGD(0.01)),
        x,
        y,
        batch_size=16,
        min_lr=1e3,
        max_lr=1e6,
        steps=20,
    )
    with pytest.raises(
        ValueError,
        match=r"LRRangeTest ran [0-2] usable batches before the loss "
        r"diverged, too few to read a curve. Lower `min_lr` or raise "
        r"`steps`.",
    ):
        _ = test.suggestion
