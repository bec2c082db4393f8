import os
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.callbacks._learning_rate import sync_model_state
from keras_regkit.callbacks.batch_norm_statistics import batch_norm_layers

# 48 samples in batches of 16: 3 steps per epoch.
BATCH = 16
STEPS = 3


def _data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 2))).astype("float32")
    return x, y


def _model(batch_norm=False, seed=0, optimizer=None, **compile_kwargs):
    layers = [keras.Input((5,)), keras.layers.Dense(6, activation="tanh")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5))
    layers.append(keras.layers.Dense(2))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            w if "moving" in v.path else 0.5 * rng.normal(size=w.shape)
            for v, w in zip(model.weights, model.get_weights())
        ]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.1, momentum=0.5),
        loss="mse",
        **compile_kwargs,
    )
    return model


def _numpy(variables):
    return [ops.convert_to_numpy(v).copy() for v in variables]


class _Trajectory(keras.callbacks.Callback):
    """Records the given variables after every training step."""

    def __init__(self, select=lambda model: model.trainable_variables):
        super().__init__()
        self.select = select
        self.steps = []
        self.iterations = []
        self.epoch_ends = []

    def on_train_batch_end(self, batch, logs=None):
        sync_model_state(self.model)
        self.steps.append(_numpy(self.select(self.model)))
        self.iterations.append(
            int(ops.convert_to_numpy(self.model.optimizer.iterations))
        )

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(self.steps[-1])


def _reference(iterates, decay, warmup=False):
    """NumPy EMA / uniform average (float64) of a list of weight lists."""
    average = None
    for n, weights in enumerate(iterates):
        weights = [np.asarray(w, np.float64) for w in weights]
        if n == 0:
            average = weights
            continue
        if decay is None:
            rate = 1.0 / (n + 1)
        else:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            rate = 1.0 - d
        average = [a - rate * (a - w) for a, w in zip(average, weights)]
    return average


def _assert_close(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=atol)


def _fit(model, callbacks, epochs=4, **kwargs):
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


@pytest.mark.parametrize(
    "decay, warmup, start, every",
    [
        (0.9, False, 0, 1),
        (0.01, False, 0, 1),  # the scale passes 2 ** 64 and is folded back
        (0.7, True, 0, 1),
        (0.8, True, 4, 2),
        (None, False, 0, 1),
        (None, False, 5, 3),
    ],
)
def test_averages_match_numpy_reference_per_step(decay, warmup, start, every):
    model = _model()
    trajectory = _Trajectory()
    averaging = PolyakAveraging(
        decay=decay,
        warmup=warmup,
        start=start,
        every=every,
        final_weights="training",
    )
    _fit(model, [averaging, trajectory])
    folded = [
        w
        for t, w in enumerate(trajectory.steps, start=1)
        if t > start and (t - start) % every == 0
    ]
    assert averaging.num_averaged == len(folded) > 0
    _assert_close(averaging.get_averages(), _reference(folded, decay, warmup))
    # "training": the model keeps its last training weights, bit for bit.
    for actual, expected in zip(
        _numpy(model.trainable_variables), trajectory.steps[-1]
    ):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("decay", [0.7, None])
def test_large_and_small_variables_match_numpy_reference(decay):
    # A 128 x 128 kernel has an accumulator of its own; the bias and the
    # small second layer share a flat one.
    model = keras.Sequential(
        [
            keras.Input((128,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = np.random.default_rng(2).normal(size=(48, 128)).astype("float32")
    y = np.random.default_rng(3).normal(size=(48, 2)).astype("float32")
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=decay, final_weights="training")
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[averaging, trajectory],
    )
    assert len(averaging._state.accumulators) == 2
    _assert_close(averaging.get_averages(), _reference(trajectory.steps, decay))


def test_warmup_changes_the_average():
    averages = []
    for warmup in (False, True):
        model = _model()
        averaging = PolyakAveraging(decay=0.95, warmup=warmup)
        _fit(model, [averaging], epochs=2)
        averages.append(averaging.get_averages())
    assert not np.allclose(averages[0][0], averages[1][0])


def test_final_model_holds_the_averages():
    model = _model()
    averaging = PolyakAveraging(decay=0.8)
    _fit(model, [averaging])
    for actual, average in zip(
        _numpy(model.trainable_variables), averaging.get_averages()
    ):
        np.testing.assert_array_equal(actual, average)
    # The callback is gone from the model once `fit` returns.
    assert "train_step" not in model.__dict__
    assert not any("polyak" in v.path for v in model.optimizer.variables)


def test_epoch_unit_is_swa_over_epoch_ends():
    model = _model()
    trajectory = _Trajectory()
    swa = PolyakAveraging(decay=None, start=1, unit="epoch")
    _fit(model, [swa, trajectory], epochs=5)
    assert swa.num_averaged == 4
    _assert_close(
        swa.get_averages(), _reference(trajectory.epoch_ends[1:], None)
    )
    _assert_close(_numpy(model.trainable_variables), swa.get_averages())


def test_once_per_cycle_with_cyclic_lr():
    cycle = 4  # CyclicLR(step_size=2): the learning rate is lowest every 4.
    model = _model()
    trajectory = _Trajectory()
    swa = PolyakAveraging(decay=None, every=cycle, final_weights="training")
    clr = CyclicLR(base_lr=0.01, max_lr=0.2, step_size=cycle // 2)
    _fit(model, [clr, swa, trajectory], epochs=4)
    ends = trajectory.steps[cycle - 1 :: cycle]
    assert swa.num_averaged == len(ends) == 3
    _assert_close(swa.get_averages(), _reference(ends, None))


def test_steps_per_execution_and_jit_compile_match_reference():
    model = _model(steps_per_execution=3, jit_compile=True)
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=0.8, final_weights="training")
    _fit(model, [averaging, trajectory])
    # Batch hooks run once per execution of 3 steps, so the per-step weights
    # are not observable: compare with a run of one step per execution.
    reference_model = _model()
    reference = PolyakAveraging(decay=0.8, final_weights="training")
    _fit(reference_model, [reference])
    assert averaging.num_averaged == reference.num_averaged == 12
    _assert_close(averaging.get_averages(), reference.get_averages(), 1e-5)


def test_gradient_accumulation_folds_applied_updates_only():
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=3)
    model = _model(optimizer=optimizer)
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=0.5, final_weights="training")
    _fit(model, [averaging, trajectory])
    # 12 batches, one applied update every 3.
    assert averaging.num_averaged == 4
    _assert_close(
        averaging.get_averages(), _reference(trajectory.steps[2::3], 0.5)
    )


def test_validation_on_averages_restores_training_weights_exactly():
    x, y = _data(seed=1)
    model = _model()

    class Check(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logged = []

        def on_train_batch_end(self, batch, logs=None):
            self.last = _numpy(self.model.weights)

        def on_epoch_end(self, epoch, logs=None):
            for actual, expected in zip(_numpy(self.model.weights), self.last):
                np.testing.assert_array_equal(actual, expected)
            self.logged.append(logs["val_average_loss"])
            # The logged value is the averaged weights' loss.
            saved = self.model.get_weights()
            averages = averaging.get_averages()
            self.model.set_weights(averages)
            loss = self.model.evaluate(x, y, verbose=0)
            self.model.set_weights(saved)
            np.testing.assert_allclose(logs["val_average_loss"], loss, 1e-5)

    averaging = PolyakAveraging(
        decay=0.6, validation_data=(x, y), final_weights="training"
    )
    check = Check()
    history = _fit(model, [averaging, check], validation_data=(x, y))
    assert history.history["val_average_loss"] == check.logged
    assert len(check.logged) == 4
    # `fit`'s own validation is on the training weights, so it differs.
    assert history.history["val_loss"] != history.history["val_average_loss"]


def test_validation_metrics_appear_under_val_average_names():
    x, y = _data(seed=1)
    model = _model(metrics=["mae"])
    averaging = PolyakAveraging(
        decay=0.6, start=STEPS, validation_data=(x, y, np.ones(len(x)))
    )
    history = _fit(model, [averaging], epochs=3)
    # Nothing is averaged in the first epoch: no value logged for it.
    assert len(history.history["val_average_loss"]) == 2
    assert len(history.history["val_average_mae"]) == 2


def test_swap_weights_context_restores_bit_for_bit():
    model = _model(batch_norm=True)
    averaging = PolyakAveraging(
        decay=0.5,
        batch_norm="recompute",
        batch_norm_data=_data()[0],
        final_weights="training",
    )
    _fit(model, [averaging], epochs=1)
    before = _numpy(model.weights)
    with pytest.raises(KeyError), averaging.swap_weights():
        swapped = _numpy(model.trainable_variables)
        raise KeyError("body fails")
    _assert_close(swapped, averaging.get_averages(), 0)
    for actual, expected in zip(_numpy(model.weights), before):
        np.testing.assert_array_equal(actual, expected)


def test_swap_weights_before_anything_is_averaged_raises():
    averaging = PolyakAveraging(start=100)
    with pytest.warns(UserWarning, match="averaged nothing"):
        _fit(_model(), [averaging], epochs=1)
    with (
        pytest.raises(
            RuntimeError,
            match=re.escape("has no averages yet: nothing has been"),
        ),
        averaging.swap_weights(),
    ):
        pass


def test_batch_norm_average_policy_averages_statistics():
    model = _model(batch_norm=True)
    bn = batch_norm_layers(model)[0]
    trajectory = _Trajectory(lambda m: [bn.moving_mean, bn.moving_variance])
    averaging = PolyakAveraging(decay=0.7)
    _fit(model, [averaging, trajectory])
    expected = _reference(trajectory.steps, 0.7)
    _assert_close(_numpy([bn.moving_mean, bn.moving_variance]), expected)
    assert [id(v) for v in averaging.averaged_variables[-2:]] == [
        id(bn.moving_mean),
        id(bn.moving_variance),
    ]


def test_batch_norm_average_policy_skips_counters():
    layers = pytest.importorskip("keras_regkit.layers")
    bn = layers.DebiasedBatchNormalization(moving_statistics="cumulative")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), bn, keras.layers.Dense(2)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    averaging = PolyakAveraging(decay=0.5)
    _fit(model, [averaging], epochs=1)
    averaged = {id(v) for v in averaging.averaged_variables}
    assert id(bn.moving_mean) in averaged
    assert id(bn.moving_variance) in averaged
    assert id(bn.moving_count) not in averaged
    assert float(ops.convert_to_numpy(bn.moving_count)) == STEPS


def test_batch_norm_recompute_policy_recomputes_for_averaged_weights():
    x, _ = _data(seed=3)
    model = _model(batch_norm=True)
    bn = batch_norm_layers(model)[0]
    averaging = PolyakAveraging(
        decay=None,
        batch_norm="recompute",
        batch_norm_data=x,
    )
    _fit(model, [averaging])
    assert len(averaging.averaged_variables) == len(model.trainable_variables)
    _assert_close(_numpy(model.trainable_variables), averaging.get_averages())
    h = ops.convert_to_numpy(model.layers[0](x)).astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance, h.var(0, ddof=1), rtol=1e-5, atol=1e-6
    )


def test_non_finite_steps_are_skipped_with_a_warning():
    model = _model(optimizer=keras.optimizers.SGD(0.1))
    poisoned_step = 5  # 1-based step whose weights are made NaN.

    class Poison(keras.callbacks.Callback):
        """NaN weights for one step, then the weights from before it."""

        def on_train_batch_begin(self, batch, logs=None):
            step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
            variables = self.model.trainable_variables
            if step == poisoned_step - 1:
                self.saved = _numpy(variables)
                kernel = variables[0]
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))
            elif step == poisoned_step:
                for variable, value in zip(variables, self.saved):
                    variable.assign(value)

    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=0.8, final_weights="training")
    with pytest.warns(UserWarning, match=r"skipped 1 iterate\(s\)"):
        _fit(model, [Poison(), averaging, trajectory])
    assert not np.all(np.isfinite(trajectory.steps[poisoned_step - 1][0]))
    finite = [
        w for t, w in enumerate(trajectory.steps, 1) if t != poisoned_step
    ]
    assert averaging.num_skipped == 1
    assert averaging.num_averaged == len(finite) == 11
    _assert_close(averaging.get_averages(), _reference(finite, 0.8))


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize(
    "unit, averaging_first, same_model",
    [
        ("step", True, False),
        ("step", False, True),
        ("epoch", True, True),
        ("epoch", False, False),
    ],
)
def test_backup_and_restore_resumes_to_the_same_averages(
    tmp_path, unit, averaging_first, same_model
):
    def callbacks(averaging, backup):
        pair = [averaging, backup]
        return pair if averaging_first else pair[::-1]

    def make():
        return PolyakAveraging(decay=0.7, unit=unit, final_weights="training")

    uninterrupted_model = _model()
    uninterrupted = make()
    _fit(uninterrupted_model, [uninterrupted], epochs=5)

    backup_dir = os.fspath(tmp_path / "backup")
    model = _model()
    first = make()
    backup = keras.callbacks.BackupAndRestore(backup_dir)
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(model, callbacks(first, backup) + [_Interrupt(2, 1)], epochs=5)
    if not same_model:
        model = _model(seed=7)  # a new process: restored from the backup
    resumed = make()
    backup = keras.callbacks.BackupAndRestore(backup_dir)
    _fit(model, callbacks(resumed, backup), epochs=5)

    assert resumed.num_averaged == uninterrupted.num_averaged
    _assert_close(resumed.get_averages(), uninterrupted.get_averages(), 1e-6)
    _assert_close(
        _numpy(model.trainable_variables),
        _numpy(uninterrupted_model.trainable_variables),
    )


def test_second_fit_continues_the_average():
    model = _model()
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=None, final_weights="training")
    _fit(model, [averaging, trajectory], epochs=2)
    _fit(model, [averaging, trajectory], epochs=2)
    assert averaging.num_averaged == 12
    _assert_close(averaging.get_averages(), _reference(trajectory.steps, None))
    # A plain fit afterwards does not average.
    _fit(model, [], epochs=1)
    assert averaging.num_averaged == 12


def test_mixed_precision_keeps_float32_averages():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        trajectory = _Trajectory()
        averaging = PolyakAveraging(decay=0.8, final_weights="training")
        _fit(model, [averaging, trajectory], epochs=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(a.dtype == np.float32 for a in averaging.get_averages())
    # Steps the loss scaling skipped (non-finite float16 gradients) leave
    # `iterations` and the weights unchanged and are not folded in.
    taken = [
        w
        for w, t, previous in zip(
            trajectory.steps,
            trajectory.iterations,
            [0] + trajectory.iterations[:-1],
        )
        if t != previous
    ]
    assert 0 < averaging.num_averaged == len(taken) <= 6
    _assert_close(averaging.get_averages(), _reference(taken, 0.8))


def test_float16_variables_average_in_float32():
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(2, dtype="float16")]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=None)
    _fit(model, [averaging, trajectory], epochs=2)
    expected = _reference(trajectory.steps, None)
    assert all(a.dtype == np.float32 for a in averaging.get_averages())
    _assert_close(averaging.get_averages(), expected, 1e-3)
    assert model.trainable_variables[0].dtype == "float16"


def test_config_round_trip():
    averaging = PolyakAveraging(
        decay=None, start=3, every=2, unit="epoch", final_weights="training"
    )
    config = averaging.get_config()
    clone = PolyakAveraging.from_config(config)
    assert clone.get_config() == config
    assert (
        keras.saving.get_registered_object("keras_regkit>PolyakAveraging")
        is PolyakAveraging
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 0.0}, "`decay`. Expected a float in (0, 1), or None"),
        ({"decay": 1.0}, "Received: decay=1.0"),
        ({"decay": 1.5}, "Received: decay=1.5"),
        ({"decay": -0.1}, "Received: decay=-0.1"),
        ({"decay": "0.9"}, "Received: decay='0.9'"),
        ({"start": -1}, "`start`. Expected an int >= 0. Received: start=-1"),
        ({"start": 1.5}, "Received: start=1.5"),
        ({"every": 0}, "`every`. Expected an int >= 1. Received: every=0"),
        ({"every": True}, "Received: every=True"),
        ({"unit": "batch"}, "`unit`. Expected one of 'step', 'epoch'"),
        ({"warmup": 1}, "`warmup`. Expected a bool. Received: warmup=1"),
        (
            {"decay": None, "warmup": True},
            "`warmup`. Expected False when decay=None",
        ),
        ({"batch_norm": "keep"}, "Expected one of 'average', 'recompute'"),
        (
            {"batch_norm": "recompute"},
            "`batch_norm_data`. Expected the batches to recompute",
        ),
        (
            {"batch_norm_data": np.zeros((2, 5))},
            "`batch_norm`. Expected 'recompute' when batch_norm_data",
        ),
        (
            {
                "batch_norm": "recompute",
                "batch_norm_data": np.zeros((2, 5)),
                "batch_norm_steps": 0,
            },
            "Received: batch_norm_steps=0",
        ),
        ({"validation_batch_size": 0}, "Received: validation_batch_size=0"),
        ({"final_weights": "last"}, "Expected one of 'average', 'training'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PolyakAveraging(**kwargs)


def test_model_without_optimizer_is_refused_at_train_begin():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    averaging = PolyakAveraging()
    averaging.set_model(model)
    with pytest.raises(
        ValueError, match=re.escape("needs a compiled model with an optimizer")
    ):
        averaging.on_train_begin()


def test_plain_use_emits_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = _model()
        _fit(model, [PolyakAveraging(decay=0.9)], epochs=1)
