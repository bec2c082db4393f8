import doctest
import json
import math
import os
import re
import warnings

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow

from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.callbacks import snapshot_ensemble
from keras_regkit.callbacks import snapshot_ensemble_model
from keras_regkit.callbacks._learning_rate import read_iterations

# 32 samples in batches of 8: 4 steps per epoch; 6 epochs: T = 24.
STEPS = 4
EPOCHS = 6
TOTAL = STEPS * EPOCHS
MAX_LR = 0.1


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(5, 3)), axis=1).astype("int32")
    return x, y


def _model(softmax=True, seed=0):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(7, activation="tanh"),
            keras.layers.Dense(3, activation="softmax" if softmax else None),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights(
        [0.5 * rng.normal(size=w.shape) for w in model.get_weights()]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=not softmax
        ),
    )
    return model


def _fit(model, callbacks, steps_per_execution=None, **kwargs):
    if steps_per_execution:
        model.compile(
            optimizer=model.optimizer,
            loss=model.loss,
            steps_per_execution=steps_per_execution,
        )
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


def _manifest(directory):
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


class Recorder(keras.callbacks.Callback):
    """Records, at each batch end, what a user of the callback can see."""

    def __init__(self, directory=None):
        super().__init__()
        self.directory = directory
        self.begin, self.done, self.rates, self.logged = [], [], [], []
        self.counts, self.files, self.listed = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.begin.append(read_iterations(self.model.optimizer))

    def on_train_batch_end(self, batch, logs=None):
        self.done.append(read_iterations(self.model.optimizer))
        rate = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        self.rates.append(float(rate))
        self.logged.append(logs["learning_rate"])
        self.counts.append(logs["snapshots"])
        if self.directory is not None:
            self.files.append(sorted(os.listdir(self.directory)))
            listed = _manifest(self.directory)["snapshots"]
            self.listed.append([s["iteration"] for s in listed])


def paper_learning_rate(t, total, cycles, max_lr):
    """Huang et al. (2017), eq. (2), with the 1-based iteration `t`."""
    period = math.ceil(total / cycles)
    return max_lr / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)


def absorbed_learning_rates(total, cycles, max_lr, min_lr):
    """Cycles of floor(T / M) iterations, the last one taking the rest."""
    length = total // cycles
    ends = [length * k for k in range(1, cycles)] + [total]
    rates = []
    for start, end in zip([0] + ends[:-1], ends):
        position = np.arange(end - start)
        cosine = np.cos(np.pi * position / (end - start))
        rates.append(min_lr + (max_lr - min_lr) / 2 * (cosine + 1))
    return np.concatenate(rates)


@pytest.mark.parametrize("cycles", [1, 3, 4])
def test_learning_rate_trace_equals_paper_formula(tmp_path, cycles):
    model = _model()
    recorder = Recorder()
    callback = SnapshotEnsemble(cycles, MAX_LR, tmp_path)
    history = _fit(model, [callback, recorder])
    expected = [
        paper_learning_rate(t, TOTAL, cycles, MAX_LR)
        for t in range(1, TOTAL + 1)
    ]
    assert recorder.begin == list(range(TOTAL))
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    np.testing.assert_allclose(recorder.logged, expected, rtol=1e-12)
    np.testing.assert_allclose(
        history.history["learning_rate"], expected[STEPS - 1 :: STEPS]
    )
    assert history.history["snapshots"][-1] == cycles


def test_learning_rate_last_cycle_absorbs_leftover_with_floor(tmp_path):
    # T = 24, M = 5: cycles of 4 iterations, the last one of 8.
    model = _model()
    recorder = Recorder()
    _fit(model, [SnapshotEnsemble(5, MAX_LR, tmp_path, min_lr=0.01), recorder])
    expected = absorbed_learning_rates(TOTAL, 5, MAX_LR, 0.01)
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    assert [s["iteration"] for s in _manifest(tmp_path)["snapshots"]] == [
        4,
        8,
        12,
        16,
        24,
    ]


def test_snapshots_appear_at_cycle_ends_and_nowhere_else(tmp_path):
    # T = 24, M = 4: cycles end at 6 (mid-epoch), 12, 18 (mid-epoch), 24.
    x, y = _data(1)
    model = _model()
    recorder = Recorder(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SnapshotEnsemble")
        _fit(
            model,
            [SnapshotEnsemble(4, MAX_LR, tmp_path), recorder],
            validation_data=(x, y),
        )
    ends = [6, 12, 18, 24]
    for done, files, count, listed in zip(
        recorder.done, recorder.files, recorder.counts, recorder.listed
    ):
        taken = [end for end in ends if end <= done]
        expected_files = {"manifest.json"} | {
            f"snapshot-{k:03d}.weights.npz" for k in range(1, len(taken) + 1)
        }
        if taken:
            expected_files.add("model.json")
        assert set(files) == expected_files, f"after iteration {done}"
        assert count == len(taken), f"after iteration {done}"
        assert listed == taken, f"after iteration {done}"
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [1, 2, 3, 4]
    assert [s["cycle_end"] for s in snapshots] == ends
    assert [s["epoch"] for s in snapshots] == [2, 3, 5, 6]
    # Validation metrics only where the cycle ended with an epoch.
    assert [sorted(s["metrics"]) for s in snapshots] == [
        [],
        ["val_loss"],
        [],
        ["val_loss"],
    ]
    np.testing.assert_allclose(
        [s["learning_rate"] for s in snapshots],
        [paper_learning_rate(t, TOTAL, 4, MAX_LR) for t in ends],
    )
    # The last snapshot is the trained model.
    last = snapshot_ensemble._read_weights(
        tmp_path / "snapshot-004.weights.npz"
    )
    for saved, weight in zip(last, model.get_weights()):
        np.testing.assert_array_equal(saved, weight)


def test_steps_per_execution_aligned_snapshots_are_exact(tmp_path):
    # Groups of 2 steps end at every even iteration, cycle ends included.
    model = _model()
    recorder = Recorder(tmp_path)
    _fit(
        model,
        [SnapshotEnsemble(4, MAX_LR, tmp_path), recorder],
        steps_per_execution=2,
    )
    assert recorder.begin == list(range(0, TOTAL, 2))
    expected = [
        paper_learning_rate(i + 1, TOTAL, 4, MAX_LR) for i in recorder.begin
    ]
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["iteration"] for s in snapshots] == [6, 12, 18, 24]
    assert recorder.counts == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]


def test_steps_per_execution_misaligned_snapshot_once_at_group_end(tmp_path):
    # Groups of 4 steps end at 4, 8, ...: cycle ends 6 and 18 fall inside.
    model = _model()
    callback = SnapshotEnsemble(4, MAX_LR, tmp_path)
    with pytest.warns(UserWarning, match=r"iterations \[6, 18\]"):
        _fit(model, [callback], steps_per_execution=4)
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [1, 2, 3, 4]
    assert [s["iteration"] for s in snapshots] == [8, 12, 20, 24]
    assert [s["cycle_end"] for s in snapshots] == [6, 12, 18, 24]


def test_several_cycles_in_one_execution_snapshot_the_last(tmp_path):
    model = _model()
    callback = SnapshotEnsemble(12, MAX_LR, tmp_path)
    with pytest.warns(UserWarning) as record:
        _fit(model, [callback], steps_per_execution=4)
    messages = [str(w.message) for w in record]
    assert any("iterations [2, 6, 10, 14, 18, 22]" in m for m in messages)
    assert sum("all ended within one execution" in m for m in messages) == 1
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [2, 4, 6, 8, 10, 12]
    assert [s["iteration"] for s in snapshots] == [4, 8, 12, 16, 20, 24]


def _member_outputs(directory, model):
    outputs = []
    for entry in _manifest(directory)["snapshots"]:
        member = keras.models.clone_model(model)
        weights = snapshot_ensemble._read_weights(
            os.path.join(directory, entry["file"])
        )
        member.set_weights(weights)
        outputs.append(keras.ops.convert_to_numpy(member(_data(2)[0])))
    return np.stack(outputs)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "softmax, average, from_logits, combine",
    [
        (True, "probabilities", False, lambda f: f.mean(0)),
        (False, "logits", False, lambda f: f.mean(0)),
        (False, "probabilities", True, lambda f: _softmax(f).mean(0)),
    ],
)
def test_ensemble_equals_numpy_mean_of_members(
    tmp_path, softmax, average, from_logits, combine
):
    model = _model(softmax=softmax)
    callback = SnapshotEnsemble(3, MAX_LR, tmp_path)
    _fit(model, [callback])
    members = _member_outputs(tmp_path, model)
    assert not np.allclose(members[0], members[-1], atol=1e-3)
    x = _data(2)[0]
    for last in (1, 2, None):
        ensemble = callback.ensemble_model(
            last=last, average=average, from_logits=from_logits
        )
        count = last or 3
        assert [layer.name for layer in ensemble.layers[1 : 1 + count]] == [
            f"snapshot_{k}" for k in range(4 - count, 4)
        ]
        np.testing.assert_allclose(
            ensemble.predict(x, verbose=0),
            combine(members[-count:]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_ensemble_saves_as_keras_and_loads_without_custom_objects(tmp_path):
    model = _model()
    _fit(model, [SnapshotEnsemble(3, MAX_LR, tmp_path / "snapshots")])
    ensemble = snapshot_ensemble_model(tmp_path / "snapshots", last=3)
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    reloaded = keras.saving.load_model(path)
    x = _data(2)[0]
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0),
        _member_outputs(tmp_path / "snapshots", model).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


@requires_tensorflow
def test_exported_ensemble_serves_the_mean_of_members(tmp_path):
    import tensorflow as tf

    model = _model()
    _fit(model, [SnapshotEnsemble(3, MAX_LR, tmp_path / "snapshots")])
    ensemble = snapshot_ensemble_model(tmp_path / "snapshots")
    export_path = str(tmp_path / "saved_model")
    ensemble.export(export_path, verbose=False)
    x = _data(2)[0]
    reloaded = tf.saved_model.load(export_path)
    served = reloaded.serve(tf.constant(x)).numpy()
    expected = _member_outputs(tmp_path / "snapshots", model).mean(0)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(
        served, ensemble.predict(x, verbose=0), atol=1e-5
    )


class AtIteration(keras.callbacks.Callback):
    """Calls `action(model)` before the step at optimizer iteration `at`."""

    def __init__(self, at, action):
        super().__init__()
        self.at = at
        self.action = action

    def on_train_batch_begin(self, batch, logs=None):
        if read_iterations(self.model.optimizer) == self.at:
            self.action(self.model)


def _interrupt(model):
    raise RuntimeError("interrupted")


def test_interrupted_and_resumed_run_gives_the_same_snapshots(tmp_path):
    # Cycles end at 6, 12, 18, 24; the interruption comes at iteration 19,
    # after the snapshot at 18 but with the last backup at 16 (epoch 4).
    reference_dir = tmp_path / "reference"
    _fit(_model(), [SnapshotEnsemble(4, MAX_LR, reference_dir)])

    directory = tmp_path / "resumed"
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(
            _model(),
            [
                SnapshotEnsemble(4, MAX_LR, directory),
                keras.callbacks.BackupAndRestore(backup_dir),
                AtIteration(19, _interrupt),
            ],
        )
    assert [s["iteration"] for s in _manifest(directory)["snapshots"]] == [
        6,
        12,
        18,
    ]

    # A restarted process: new model, optimizer and callbacks.
    recorder = Recorder()
    with pytest.warns(UserWarning, match=r"discarding 1 .*cycles \[3\]"):
        _fit(
            _model(),
            [
                SnapshotEnsemble(4, MAX_LR, directory),
                keras.callbacks.BackupAndRestore(backup_dir),
                recorder,
            ],
        )
    assert recorder.begin == list(range(16, TOTAL))
    np.testing.assert_allclose(
        recorder.rates,
        [paper_learning_rate(i + 1, TOTAL, 4, MAX_LR) for i in range(16, 24)],
        rtol=1e-6,
    )
    reference = _manifest(reference_dir)["snapshots"]
    resumed = _manifest(directory)["snapshots"]
    assert [
        {k: s[k] for k in ("cycle", "iteration", "epoch", "file")}
        for s in resumed
    ] == [
        {k: s[k] for k in ("cycle", "iteration", "epoch", "file")}
        for s in reference
    ]
    for entry in reference:
        expected = snapshot_ensemble._read_weights(
            reference_dir / entry["file"]
        )
        actual = snapshot_ensemble._read_weights(directory / entry["file"])
        for a, b in zip(actual, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(directory)) == sorted(os.listdir(reference_dir))


def test_resume_from_a_mid_epoch_backup_replays_the_epoch(tmp_path):
    # Backups every 2 batches: the last one before the interruption at 19 is
    # at iteration 18, mid-epoch 4. Keras restarts epoch 4 from its first
    # batch with the optimizer at 18, so the run's iterations are counted
    # from the epoch (16), not from the optimizer.
    directory = tmp_path / "snapshots"
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(
            _model(),
            [
                SnapshotEnsemble(4, MAX_LR, directory),
                keras.callbacks.BackupAndRestore(backup_dir, save_freq=2),
                AtIteration(19, _interrupt),
            ],
        )
    recorder = Recorder()
    with pytest.warns(UserWarning, match=r"cycles \[3\]\) taken after"):
        _fit(
            _model(),
            [
                SnapshotEnsemble(4, MAX_LR, directory),
                keras.callbacks.BackupAndRestore(backup_dir, save_freq=2),
                recorder,
            ],
        )
    assert recorder.begin == list(range(18, 26))
    np.testing.assert_allclose(
        recorder.rates,
        [paper_learning_rate(i + 1, TOTAL, 4, MAX_LR) for i in range(16, 24)],
        rtol=1e-6,
    )
    snapshots = _manifest(directory)["snapshots"]
    assert [s["iteration"] for s in snapshots] == [6, 12, 18, 24]


def test_second_fit_is_a_new_run_with_its_own_cycles(tmp_path):
    model = _model()
    _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path / "first")])
    recorder = Recorder()
    _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path / "second"), recorder])
    assert recorder.begin == list(range(TOTAL, 2 * TOTAL))
    np.testing.assert_allclose(
        recorder.rates,
        [paper_learning_rate(t, TOTAL, 2, MAX_LR) for t in range(1, 25)],
        rtol=1e-6,
    )
    snapshots = _manifest(tmp_path / "second")["snapshots"]
    assert [s["iteration"] for s in snapshots] == [12, 24]


def test_new_run_replaces_snapshots_of_an_earlier_run(tmp_path):
    _fit(_model(), [SnapshotEnsemble(3, MAX_LR, tmp_path)])
    (tmp_path / ".tmp-snapshot-002.weights.npz-abc.weights.npz").write_bytes(
        b"partial"
    )
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.warns(UserWarning, match="left by an earlier run"):
        _fit(_model(seed=1), [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert sorted(os.listdir(tmp_path)) == [
        "manifest.json",
        "model.json",
        "notes.txt",
        "snapshot-001.weights.npz",
        "snapshot-002.weights.npz",
    ]
    assert [s["iteration"] for s in _manifest(tmp_path)["snapshots"]] == [
        12,
        24,
    ]


def _fail_writing_snapshot(monkeypatch):
    write = snapshot_ensemble._write_weights
    calls = []

    def failing(path, variables):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a snapshot")
            raise OSError("No space left on device")
        write(path, variables)

    monkeypatch.setattr(snapshot_ensemble, "_write_weights", failing)


def _fail_writing_manifest(monkeypatch):
    write = snapshot_ensemble.atomic_write_text
    calls = []

    def failing(path, text):
        if os.fspath(path).endswith("manifest.json"):
            calls.append(path)
            # Writes: at the run's start, after snapshot 1, after snapshot 2.
            if len(calls) == 3:
                with snapshot_ensemble.atomic_path(path) as tmp:
                    with open(tmp, "w") as f:
                        f.write(text[: len(text) // 2])
                    raise OSError("No space left on device")
        write(path, text)

    monkeypatch.setattr(snapshot_ensemble, "atomic_write_text", failing)


@pytest.mark.parametrize(
    "fail", [_fail_writing_snapshot, _fail_writing_manifest]
)
def test_failed_write_leaves_directory_consistent(tmp_path, monkeypatch, fail):
    fail(monkeypatch)
    model = _model()
    with pytest.raises(OSError, match="No space left"):
        _fit(model, [SnapshotEnsemble(3, MAX_LR, tmp_path)])
    files = os.listdir(tmp_path)
    assert not [name for name in files if name.startswith(".tmp-")]
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [1]
    ensemble = snapshot_ensemble_model(tmp_path)
    assert len(ensemble.predict(_data()[0], verbose=0)) == 32
    with pytest.raises(
        ValueError, match=r"Expected None or an int in \[1, 1\]"
    ):
        snapshot_ensemble_model(tmp_path, last=2)


def _poison_weights(model):
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_non_finite_weights_are_not_snapshotted(tmp_path):
    recorder = Recorder()
    with pytest.warns(UserWarning, match="cycle 2 ended at iteration 24 with"):
        _fit(
            _model(),
            [
                SnapshotEnsemble(2, MAX_LR, tmp_path),
                AtIteration(20, _poison_weights),
                recorder,
            ],
        )
    assert [s["cycle"] for s in _manifest(tmp_path)["snapshots"]] == [1]
    assert not (tmp_path / "snapshot-002.weights.npz").exists()
    assert recorder.counts[-1] == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def _message(name, expected, value):
    return re.escape(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r}"
    )


@pytest.mark.parametrize(
    "kwargs, name, expected, value",
    [
        ({"cycles": 0}, "cycles", "an int >= 1", 0),
        ({"cycles": 2.0}, "cycles", "an int >= 1", 2.0),
        ({"cycles": True}, "cycles", "an int >= 1", True),
        ({"max_lr": 0}, "max_lr", "a float in (0, inf)", 0),
        ({"max_lr": -0.1}, "max_lr", "a float in (0, inf)", -0.1),
        ({"min_lr": 0.1}, "min_lr", "a float in [0, 0.1)", 0.1),
        ({"min_lr": -1.0}, "min_lr", "a float in [0, 0.1)", -1.0),
        (
            {"directory": ""},
            "directory",
            "a non-empty path (str or os.PathLike)",
            "",
        ),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, name, expected, value):
    arguments = {"cycles": 2, "max_lr": 0.1, "directory": "snapshots"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=_message(name, expected, value)):
        SnapshotEnsemble(**arguments)


def test_more_cycles_than_iterations_raises_before_training(tmp_path):
    model = _model()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "argument `cycles`. Expected an int in [1, 24]: this `fit` runs "
            "24 iterations (6 epochs x 4 steps) and each cycle needs at least "
            "one. Received: cycles=25"
        ),
    ):
        _fit(model, [SnapshotEnsemble(25, MAX_LR, tmp_path)])
    assert read_iterations(model.optimizer) == 0


def test_unwritable_directory_raises_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    directory = str(blocker / "snapshots")
    model = _model()
    with pytest.raises(
        ValueError,
        match=re.escape("argument `directory`. Expected a directory this ")
        + r".*"
        + re.escape(f"Received: directory={directory!r}"),
    ):
        _fit(model, [SnapshotEnsemble(2, MAX_LR, directory)])
    assert read_iterations(model.optimizer) == 0


def test_foreign_manifest_raises_before_training(tmp_path):
    (tmp_path / "manifest.json").write_text('{"files": []}')
    model = _model()
    with pytest.raises(
        ValueError,
        match=re.escape("whose manifest.json, if any, was written by Snapshot"),
    ):
        _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert read_iterations(model.optimizer) == 0


def test_unknown_steps_per_epoch_raises(tmp_path):
    x, y = _data()

    def batches():
        while True:
            yield x[:8], y[:8]

    model = _model()
    with pytest.raises(ValueError, match=r"Pass `steps_per_epoch=` to `fit`"):
        model.fit(
            batches(),
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotEnsemble(2, MAX_LR, tmp_path)],
        )


def test_learning_rate_schedule_optimizer_raises(tmp_path):
    model = _model()
    schedule = keras.optimizers.schedules.CosineDecay(0.1, 10)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss="sparse_categorical_crossentropy",
    )
    with pytest.raises(ValueError, match="compiled with a `Learning"):
        _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])


def test_ensemble_bad_arguments(tmp_path):
    with pytest.raises(
        ValueError,
        match=_message(
            "directory",
            "a directory whose manifest.json lists at least one snapshot "
            "(written by `fit` with the SnapshotEnsemble callback)",
            str(tmp_path),
        ),
    ):
        snapshot_ensemble_model(tmp_path)
    _fit(_model(), [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    expected = (
        f"None or an int in [1, 2] ({str(tmp_path)!r} holds 2 snapshot(s))"
    )
    for last in (3, 0, 1.0):
        with pytest.raises(ValueError, match=_message("last", expected, last)):
            snapshot_ensemble_model(tmp_path, last=last)
    with pytest.raises(
        ValueError,
        match=_message(
            "average", "one of 'probabilities', 'logits'", "geometric"
        ),
    ):
        snapshot_ensemble_model(tmp_path, average="geometric")


def test_get_config_round_trip(tmp_path):
    callback = SnapshotEnsemble(3, 0.2, tmp_path, min_lr=0.01, verbose=1)
    config = callback.get_config()
    clone = SnapshotEnsemble.from_config(config)
    assert (
        clone.get_config()
        == config
        == {
            "cycles": 3,
            "max_lr": 0.2,
            "directory": str(tmp_path),
            "min_lr": 0.01,
            "verbose": 1,
        }
    )


def test_docstring_examples_run():
    results = doctest.testmod(snapshot_ensemble, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0


def test_only_the_chief_worker_writes(tmp_path, monkeypatch):
    # Under MultiWorkerMirroredStrategy every worker runs the callback with
    # the same weights; the non-chief ones train the same schedule but
    # write to a private directory, removed when training ends.
    monkeypatch.setattr(snapshot_ensemble, "is_chief", lambda model: False)
    worker_model, chief_model = _model(), _model()
    temporary = []
    worker = SnapshotEnsemble(2, 0.5, tmp_path / "shared")

    class Spy(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            temporary.append(worker._files)
            assert len(os.listdir(worker._files)) > 0

    _fit(worker_model, [Spy(), worker])  # Spy ends first.
    assert os.listdir(tmp_path / "shared") == []
    assert temporary[0] != str(tmp_path / "shared")
    assert not os.path.exists(temporary[0])
    monkeypatch.undo()
    _fit(chief_model, [SnapshotEnsemble(2, 0.5, tmp_path / "chief")])
    assert len(_manifest(tmp_path / "chief")["snapshots"]) == 2
    for a, b in zip(
        worker_model.get_weights(), chief_model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
