import gc
import os
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_regkit._training import read_iterations
from keras_regkit._training import sync_model_state
from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import PolyakAveraging
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
        self.iterations.append(read_iterations(self.model.optimizer))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(self.steps[-1])


def _reference(iterates, decay, warmup=False):
    """NumPy EMA / uniform average (float64), started at the first iterate."""
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


def _assert_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def _fit(model, callbacks, epochs=4, batch_size=BATCH, **kwargs):
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
        **kwargs,
    )


# Averages against NumPy ------------------------------------------------------


@pytest.mark.parametrize(
    "decay, warmup, start, every",
    [
        (0.9, False, 0, 1),
        (0.01, False, 0, 1),  # the scale passes 2 ** 64 and is folded back
        pytest.param(0.7, True, 0, 1, marks=pytest.mark.slow),
        (0.8, True, 4, 2),
        pytest.param(None, False, 0, 1, marks=pytest.mark.slow),
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
    _assert_equal(_numpy(model.trainable_variables), trajectory.steps[-1])


@pytest.mark.slow
def test_large_and_small_variables_match_numpy_reference():
    # A 128 x 128 kernel has an accumulator of its own; the bias and the
    # small second layer share one.
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
    averaging = PolyakAveraging(decay=0.7, final_weights="training")
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[averaging, trajectory],
    )
    _assert_close(averaging.get_averages(), _reference(trajectory.steps, 0.7))


def test_final_model_holds_the_averages_and_nothing_is_attached():
    model = _model()
    averaging = PolyakAveraging(decay=0.8)
    _fit(model, [averaging])
    _assert_equal(_numpy(model.trainable_variables), averaging.get_averages())
    assert "train_step" not in vars(model)
    assert len(model.weights) == 4
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


@pytest.mark.slow
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


def test_steps_per_execution_folds_every_execution_exactly():
    # Batches of 4: 12 steps per epoch, 4 executions of 3. The batch hooks
    # see the weights after steps 3, 6, ..., which are the iterates due.
    model = _model(steps_per_execution=3, jit_compile=True)
    trajectory = _Trajectory()
    averaging = PolyakAveraging(
        decay=0.8, start=3, every=3, final_weights="training"
    )
    _fit(model, [averaging, trajectory], epochs=2, batch_size=4)
    assert trajectory.iterations == list(range(3, 25, 3))
    folded = trajectory.steps[1:]  # steps 6, 9, ..., 24
    assert averaging.num_averaged == len(folded) == 7
    _assert_close(averaging.get_averages(), _reference(folded, 0.8))


@pytest.mark.parametrize(
    "steps_per_execution, kwargs, batch_size, message",
    [
        (3, {}, 16, "so every=1 would fold in other iterates"),
        (3, {"every": 3, "start": 1}, 16, "so start=1 would fold in"),
        (4, {"every": 4}, 8, "so steps per epoch=6 would fold in"),
    ],
)
def test_steps_per_execution_refuses_what_it_cannot_see(
    steps_per_execution, kwargs, batch_size, message
):
    model = _model(steps_per_execution=steps_per_execution)
    with pytest.raises(ValueError, match=re.escape(message)):
        _fit(model, [PolyakAveraging(**kwargs)], batch_size=batch_size)


@pytest.mark.slow
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


def test_non_finite_steps_are_skipped_with_a_warning():
    model = _model(optimizer=keras.optimizers.SGD(0.1))
    poisoned_step = 5  # 1-based step whose weights are made NaN.

    class Poison(keras.callbacks.Callback):
        """NaN weights for one step, then the weights from before it."""

        def on_train_batch_begin(self, batch, logs=None):
            sync_model_state(self.model)
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


# Evaluation and swapping -----------------------------------------------------


def test_validation_on_averages_restores_training_weights_exactly(tmp_path):
    x, y = _data(seed=1)
    model = _model(metrics=["mae"])

    class Check(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logged = []

        def on_train_batch_end(self, batch, logs=None):
            sync_model_state(self.model)
            self.last = _numpy(self.model.weights)

        def on_epoch_end(self, epoch, logs=None):
            _assert_equal(_numpy(self.model.weights), self.last)
            self.logged.append(logs["val_average_loss"])
            saved = self.model.get_weights()
            self.model.set_weights(averaging.get_averages())
            loss = self.model.evaluate(x, y, verbose=0, return_dict=True)
            self.model.set_weights(saved)
            np.testing.assert_allclose(logs["val_average_loss"], loss["loss"])
            np.testing.assert_allclose(logs["val_average_mae"], loss["mae"])

    averaging = PolyakAveraging(
        decay=0.6,
        start=1,
        validation_data=(x, y, np.ones(len(x))),
        final_weights="training",
    )
    check = Check()
    csv_after = os.fspath(tmp_path / "after.csv")
    csv_before = os.fspath(tmp_path / "before.csv")
    history = _fit(
        model,
        [
            keras.callbacks.CSVLogger(csv_before),
            averaging,
            check,
            keras.callbacks.CSVLogger(csv_after),
        ],
        epochs=3,
        validation_data=(x, y),
    )
    assert history.history["val_average_loss"] == check.logged
    assert len(check.logged) == 3
    # `fit`'s own validation is on the training weights, so it differs.
    assert history.history["val_loss"] != check.logged
    # Callbacks listed after this one see the averages' metrics; those
    # listed before have written their row already (documented).
    with open(csv_after) as f:
        assert "val_average_loss" in f.readline()
    with open(csv_before) as f:
        assert "val_average_loss" not in f.readline()


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
    _assert_equal(_numpy(model.weights), before)


def test_swap_weights_before_anything_is_averaged_raises():
    averaging = PolyakAveraging(start=100, validation_data=_data(1))
    with pytest.warns(UserWarning, match="averaged nothing"):
        history = _fit(_model(), [averaging], epochs=1)
    # Nothing to evaluate: nothing logged.
    assert "val_average_loss" not in history.history
    with (
        pytest.raises(
            RuntimeError,
            match=re.escape("has no averages yet: nothing has been"),
        ),
        averaging.swap_weights(),
    ):
        pass
    with pytest.raises(RuntimeError, match="has no averages yet"):
        averaging.averaged_model()


def test_averaged_model_holds_the_averages_saves_and_exports(tmp_path):
    x, _ = _data()
    model = _model(batch_norm=True)
    averaging = PolyakAveraging(
        decay=None,
        batch_norm="recompute",
        batch_norm_data=x,
        final_weights="training",
    )
    _fit(model, [averaging], epochs=2)
    training = _numpy(model.weights)
    averaged = averaging.averaged_model()
    assert averaged is not model
    _assert_equal(_numpy(model.weights), training)
    _assert_equal(
        _numpy(averaged.trainable_variables), averaging.get_averages()
    )
    with averaging.swap_weights():
        expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), expected, atol=1e-6
    )
    path = os.fspath(tmp_path / "averaged.keras")
    averaged.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), expected, atol=1e-6)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        averaged.export(os.fspath(tmp_path / "exported"), verbose=0)
        exported = tf.saved_model.load(os.fspath(tmp_path / "exported"))
        np.testing.assert_allclose(exported.serve(x), expected, atol=1e-6)


# Batch normalization -----------------------------------------------------------


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


@pytest.mark.slow
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
        decay=None, batch_norm="recompute", batch_norm_data=x
    )
    _fit(model, [averaging])
    assert len(averaging.averaged_variables) == len(model.trainable_variables)
    _assert_close(_numpy(model.trainable_variables), averaging.get_averages())
    h = ops.convert_to_numpy(model.layers[0](x)).astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance, h.var(0, ddof=1), rtol=1e-5, atol=1e-6
    )


def test_batch_norm_data_the_model_cannot_take_fails_before_training():
    model = _model(batch_norm=True)
    averaging = PolyakAveraging(
        batch_norm="recompute", batch_norm_data=np.zeros((8, 3), "float32")
    )
    epochs = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    with pytest.raises(
        ValueError,
        match=r"(?s)argument `batch_norm_data`\. Expected inputs that the "
        r"model accepts .*Received: batch_norm_data=<ndarray of shape \(8, 3\)>",
    ):
        _fit(model, [averaging, Count()])
    assert epochs == []


# Resumption ----------------------------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch=None):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")

    def on_epoch_end(self, epoch, logs=None):
        if self.at == (epoch, None):
            raise RuntimeError("interrupted")


def _resumption(tmp_path, make, order, same_model, interrupt):
    """Uninterrupted run vs. interrupted + resumed with BackupAndRestore."""
    directory = os.fspath(tmp_path / "backup")

    def callbacks(averaging):
        backup = keras.callbacks.BackupAndRestore(directory)
        named = {"averaging": averaging, "backup": backup}
        return [named[name] for name in order]

    reference_model = _model()
    reference = make(None)
    _fit(reference_model, [reference], epochs=5)

    model = _model()
    first = make(directory)
    interrupted = callbacks(first)
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(model, interrupted[:1] + [interrupt] + interrupted[1:], epochs=5)
    if not same_model:
        model = _model(seed=7)  # a new process: restored from the backup
    resumed = make(directory)
    _fit(model, callbacks(resumed), epochs=5)
    return reference, reference_model, resumed, model


@pytest.mark.parametrize(
    "unit, order, same_model",
    [
        ("step", ("averaging", "backup"), False),
        pytest.param(
            "epoch", ("backup", "averaging"), True, marks=pytest.mark.slow
        ),
        pytest.param(
            "step", ("backup", "averaging"), True, marks=pytest.mark.slow
        ),
        pytest.param(
            "epoch", ("averaging", "backup"), False, marks=pytest.mark.slow
        ),
    ],
)
def test_backup_and_restore_resumes_to_bit_identical_averages(
    tmp_path, unit, order, same_model
):
    def make(directory):
        return PolyakAveraging(
            decay=0.7,
            unit=unit,
            start=1,
            final_weights="training",
            backup_dir=directory,
        )

    # Interrupted in the middle of the third epoch.
    reference, reference_model, resumed, model = _resumption(
        tmp_path, make, order, same_model, _Interrupt(2, 1)
    )
    assert resumed.num_averaged == reference.num_averaged
    _assert_equal(resumed.get_averages(), reference.get_averages())
    _assert_equal(
        _numpy(model.trainable_variables),
        _numpy(reference_model.trainable_variables),
    )
    # The state files are gone with BackupAndRestore's directory.
    assert not os.path.exists(tmp_path / "backup")


@pytest.mark.slow
def test_resumes_from_the_previous_state_if_killed_between_the_two_writes(
    tmp_path,
):
    # PolyakAveraging wrote the state of epoch 3, BackupAndRestore did not
    # (the process died in between): the state of epoch 2 is restored.

    def make(directory):
        return PolyakAveraging(
            decay=None, final_weights="training", backup_dir=directory
        )

    reference, _, resumed, _ = _resumption(
        tmp_path, make, ("averaging", "backup"), True, _Interrupt(2)
    )
    assert resumed.num_averaged == reference.num_averaged == 15
    _assert_equal(resumed.get_averages(), reference.get_averages())


def test_backup_dir_never_overwrites_a_file_it_did_not_write(tmp_path):
    foreign = tmp_path / "polyak_averaging-1.npz"
    foreign.write_text("not ours")
    averaging = PolyakAveraging(decay=0.5, backup_dir=os.fspath(tmp_path))
    with pytest.raises(ValueError, match="is not a state file written by"):
        _fit(_model(), [averaging], epochs=1)
    assert foreign.read_text() == "not ours"
    assert sorted(os.listdir(tmp_path)) == ["polyak_averaging-1.npz"]


def test_backup_dir_holds_only_complete_state_files(tmp_path):
    directory = tmp_path / "state"
    seen = []

    class List(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(sorted(os.listdir(directory)))

    averaging = PolyakAveraging(decay=0.5, backup_dir=os.fspath(directory))
    _fit(_model(), [averaging, List()], epochs=3)
    assert seen == [
        ["polyak_averaging-1.npz"],
        ["polyak_averaging-0.npz", "polyak_averaging-1.npz"],
        ["polyak_averaging-0.npz", "polyak_averaging-1.npz"],
    ]
    # A completed fit removes its own files, and nothing else.
    assert os.listdir(directory) == []


# Traps of the previous design ----------------------------------------------------


@pytest.mark.parametrize(
    "unit", ["step", pytest.param("epoch", marks=pytest.mark.slow)]
)
def test_fit_twice_equals_one_longer_fit(unit):
    def make():
        return PolyakAveraging(decay=0.6, unit=unit, start=1)

    once_model, once = _model(), make()
    _fit(once_model, [once], epochs=4)
    twice_model, twice = _model(), make()
    _fit(twice_model, [twice], epochs=2)
    # The model holds the averages between the two fits ...
    _assert_equal(_numpy(twice_model.trainable_variables), twice.get_averages())
    _fit(twice_model, [twice], epochs=2)
    # ... and the second fit trained on from the training weights.
    assert twice.num_averaged == once.num_averaged
    _assert_equal(twice.get_averages(), once.get_averages())
    _assert_equal(_numpy(twice_model.weights), _numpy(once_model.weights))
    _assert_equal(
        _numpy(twice_model.optimizer.variables),
        _numpy(once_model.optimizer.variables),
    )


class _AtTrainBegin(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = _numpy(self.model.weights)


def test_second_fit_starts_from_training_weights_unless_the_user_set_some():
    model = _model()
    trajectory = _Trajectory()
    averaging = PolyakAveraging(decay=0.6)
    _fit(model, [averaging, trajectory], epochs=1)
    begin = _AtTrainBegin()
    _fit(model, [averaging, begin], epochs=1)
    _assert_equal(begin.weights, trajectory.steps[-1])
    # Weights set by the user after `fit` are theirs to keep.
    chosen = [np.full(w.shape, 0.25, w.dtype) for w in model.get_weights()]
    model.set_weights(chosen)
    _fit(model, [averaging, begin], epochs=1)
    _assert_equal(begin.weights, chosen)
    assert averaging.num_averaged == 3 * STEPS


def test_two_averagings_of_one_model_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="both average the weights"):
        _fit(model, [PolyakAveraging(), PolyakAveraging(decay=None)])
    _fit(model, [PolyakAveraging()], epochs=1)  # one is fine afterwards


def test_a_fit_that_raises_leaves_model_and_optimizer_as_plain_keras():
    def run(callbacks):
        model = _model()
        with pytest.raises(RuntimeError, match="interrupted"):
            _fit(
                model, callbacks + [_Interrupt(1, 1)], validation_data=_data(1)
            )
        sync_model_state(model)
        return model

    plain = run([])
    averaged = run([PolyakAveraging(decay=0.5, validation_data=_data(1))])
    _assert_equal(_numpy(averaged.weights), _numpy(plain.weights))
    _assert_equal(
        _numpy(averaged.optimizer.variables), _numpy(plain.optimizer.variables)
    )
    assert [(v.shape, v.dtype) for v in averaged.optimizer.variables] == [
        (v.shape, v.dtype) for v in plain.optimizer.variables
    ]
    assert sorted(vars(averaged)) == sorted(vars(plain))
    assert sorted(vars(averaged.optimizer)) == sorted(vars(plain.optimizer))
    assert type(averaged).train_step is type(plain).train_step
    assert "train_step" not in vars(averaged)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc"
)
def test_a_new_callback_per_fit_does_not_grow_memory():
    model = _model()
    x, y = _data()

    def fit(callbacks):
        model.fit(
            x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks
        )

    def growth(make, fits=50):
        for _ in range(10):
            fit(make())
        gc.collect()
        before = _rss_bytes()
        for _ in range(fits):
            fit(make())
        gc.collect()
        return (_rss_bytes() - before) / fits

    plain = growth(list)
    averaged = growth(
        lambda: [PolyakAveraging(decay=0.9, validation_data=(x, y))]
    )
    print(
        f"RSS growth per fit: plain {plain / 1e3:.1f} kB, "
        f"with a new PolyakAveraging {averaged / 1e3:.1f} kB"
    )
    # The previous design grew by about 1.85 MB per fit. The plain run's
    # RSS can shrink as the allocator returns memory, so the bound is on the
    # averaged run's own growth, plus the plain run's where it grew too.
    assert averaged < 250e3 + max(plain, 0.0)


# Arguments ---------------------------------------------------------------------


def test_config_round_trip():
    averaging = PolyakAveraging(
        decay=None,
        start=3,
        every=2,
        unit="epoch",
        final_weights="training",
        backup_dir="/tmp/somewhere",
    )
    config = averaging.get_config()
    clone = PolyakAveraging.from_config(config)
    assert clone.get_config() == config
    assert (
        keras.saving.get_registered_object("keras_regkit>PolyakAveraging")
        is PolyakAveraging
    )


def test_numpy_scalars_are_accepted():
    averaging = PolyakAveraging(
        decay=np.float32(0.5),
        start=np.int64(3),
        every=np.int32(2),
        warmup=np.bool_(True),
        unit=np.str_("step"),
        batch_norm_steps=None,
        validation_batch_size=np.int64(8),
        verbose=np.int64(1),
    )
    assert averaging.get_config()["start"] == 3
    assert type(averaging.decay) is float and averaging.decay == 0.5


def _generator():
    yield np.zeros((2, 5), "float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 0.0}, "`decay`. Expected a float in (0, 1), or None"),
        ({"decay": 1.0}, "Received: decay=1.0"),
        ({"decay": -0.1}, "Received: decay=-0.1"),
        ({"decay": "0.9"}, "Received: decay='0.9'"),
        ({"decay": True}, "Received: decay=True"),
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
            "`batch_norm_data`. Expected arrays `x`",
        ),
        (
            {"batch_norm": "recompute", "batch_norm_data": []},
            "Received: batch_norm_data=[]",
        ),
        (
            {"batch_norm": "recompute", "batch_norm_data": "data.npy"},
            "Received: batch_norm_data='data.npy'",
        ),
        (
            {"batch_norm": "recompute", "batch_norm_data": np.zeros((0, 5))},
            (
                "Expected arrays with at least one example. Received: "
                "batch_norm_data=<ndarray of shape (0, 5)>"
            ),
        ),
        (
            {"batch_norm": "recompute", "batch_norm_data": _generator()},
            "a generator or iterator is read once",
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
        (
            {"validation_data": np.zeros((2, 5))},
            (
                "`validation_data`. Expected an `(x, y)` or `(x, y, "
                "sample_weight)` tuple"
            ),
        ),
        ({"validation_data": (np.zeros((2, 5)),)}, "Expected an `(x, y)`"),
        ({"validation_data": 3}, "Received: validation_data=3"),
        ({"validation_batch_size": 0}, "Received: validation_batch_size=0"),
        ({"final_weights": "last"}, "Expected one of 'average', 'training'"),
        ({"backup_dir": ""}, "`backup_dir`. Expected a directory path"),
        ({"backup_dir": 3}, "Received: backup_dir=3"),
        ({"verbose": 3}, "`verbose`. Expected an int >= 0 <= 2"),
        ({"verbose": True}, "Received: verbose=True"),
        ({"verbose": "yes"}, "Received: verbose='yes'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PolyakAveraging(**kwargs)


def test_backup_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="Expected a directory, not a file"):
        PolyakAveraging(backup_dir=os.fspath(path))


def test_model_without_optimizer_is_refused_at_train_begin():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    averaging = PolyakAveraging()
    averaging.set_model(model)
    with pytest.raises(
        ValueError, match=re.escape("needs a compiled model with an optimizer")
    ):
        averaging.on_train_begin()


@pytest.mark.slow
def test_plain_use_emits_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = _model()
        _fit(model, [PolyakAveraging(decay=0.9)], epochs=1)


# Precision -----------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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


class _AverageReader(keras.callbacks.Callback):
    """Reads the averages through the callback's methods at every batch."""

    def __init__(self, averaging, at="end"):
        super().__init__()
        self.averaging = averaging
        self.at = at
        self.counts, self.averages = [], []

    def _read(self):
        self.counts.append(self.averaging.num_averaged)
        self.averages.append(self.averaging.get_averages())

    def on_train_batch_begin(self, batch, logs=None):
        if self.at == "begin":
            self._read()

    def on_train_batch_end(self, batch, logs=None):
        if self.at == "end":
            self._read()


@pytest.mark.parametrize("at", ["end", "begin"])
def test_averages_read_mid_epoch_are_caught_up(at):
    # The callback folds step t in before step t + 1; read through its
    # methods in between (from a batch end, or from a batch begin after its
    # own), the averages already hold step t, and reading folds nothing
    # twice.
    x, y = _data()
    model = _model()
    ema = PolyakAveraging(decay=None, final_weights="training")
    trajectory = _Trajectory()
    reader = _AverageReader(ema, at)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[ema, trajectory, reader],
    )
    total = 2 * STEPS
    if at == "end":
        assert reader.counts == list(range(1, total + 1))
        seen = range(total)
    else:  # Before each step: the steps taken so far.
        assert reader.counts == list(range(total))
        seen = range(1, total)
    for n in seen:
        expected = _reference(
            trajectory.steps[: n + 1 if at == "end" else n], None
        )
        for got, want in zip(reader.averages[n], expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert ema.num_averaged == total
    for got, want in zip(
        ema.get_averages(), _reference(trajectory.steps, None)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
