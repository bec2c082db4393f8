import contextlib
import errno
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import warnings

import keras
import numpy as np
import pytest

from keras_regkit import _utils
from keras_regkit._training import read_iterations
from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.callbacks import snapshot_ensemble_model
from keras_regkit.schedules.snapshot_cosine_annealing import (
    SnapshotCosineAnnealing,
)

# 32 samples in batches of 8: 4 steps per epoch; 6 epochs: T = 24.
STEPS = 4
EPOCHS = 6
TOTAL = STEPS * EPOCHS
MAX_LR = 0.1
LOCK = ".snapshot_ensemble.lock"


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


def _fit(model, callbacks, steps_per_execution=None, epochs=EPOCHS, **kwargs):
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
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


def _manifest(directory):
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def _iterations(directory):
    return [s["iteration"] for s in _manifest(directory)["snapshots"]]


def _snapshot_weights(model, path):
    """The weights in a snapshot file, loaded as Keras loads them."""
    member = keras.models.clone_model(model)
    member.load_weights(os.fspath(path))
    return member.get_weights()


def _temporaries(directory):
    return [n for n in os.listdir(directory) if n.startswith(".tmp-")]


class Recorder(keras.callbacks.Callback):
    """Records what a user of the callback can see around each step.

    The counter and the rate after each step; with `directory`, the files
    and the snapshots listed as the next step (or the epoch end) finds
    them, which is where the callback takes a snapshot of a cycle that
    ended (a batch-end hook would cost `fit` its asynchronous dispatch).
    """

    def __init__(self, directory=None):
        super().__init__()
        self.directory = directory
        self.begin, self.done, self.rates = [], [], []
        self.counts, self.files, self.listed = [], [], []
        self._stepped = False

    def _record_files(self):
        if self._stepped and self.directory is not None:
            self.files.append(sorted(os.listdir(self.directory)))
            self.listed.append(_iterations(self.directory))
            self.counts.append(len(self.listed[-1]))
        self._stepped = False

    def on_train_batch_begin(self, batch, logs=None):
        self._record_files()
        self.begin.append(read_iterations(self.model.optimizer))

    def on_train_batch_end(self, batch, logs=None):
        self.done.append(read_iterations(self.model.optimizer))
        rate = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        self.rates.append(float(rate))
        self._stepped = True

    def on_epoch_end(self, epoch, logs=None):
        self._record_files()


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


def paper_learning_rate(t, total, cycles, max_lr):
    """Huang et al. (2017), eq. (2), with the 1-based iteration `t`."""
    period = math.ceil(total / cycles)
    return max_lr / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)


def absorbed_learning_rates(total, cycles, max_lr, min_lr):
    """NumPy: cycles of floor(T / M) iterations, the last one takes the rest."""
    length = total // cycles
    ends = [length * k for k in range(1, cycles)] + [total]
    rates = []
    for start, end in zip([0] + ends[:-1], ends):
        position = np.arange(end - start)
        cosine = np.cos(np.pi * position / (end - start))
        rates.append(min_lr + (max_lr - min_lr) / 2 * (cosine + 1))
    return np.concatenate(rates)


# The schedule.


def test_schedule_equals_numpy_reference():
    cases = [(24, 4, 0.0), (24, 5, 0.01), (7, 7, 0.0), (1000, 3, 1e-3)]
    for total, cycles, minimal in cases + [(10, 1, 0)]:
        schedule = SnapshotCosineAnnealing(0.1, total, cycles, minimal)
        expected = absorbed_learning_rates(total, cycles, 0.1, minimal)
        steps = np.arange(total)
        python = [schedule.python_value(step) for step in steps]
        np.testing.assert_allclose(python, expected, rtol=1e-12, atol=0)
        # One batched call of the compiled form, float32 to a few ulps,
        # also near zero at the cycles' ends.
        tensor = keras.ops.convert_to_numpy(schedule(steps))
        assert tensor.dtype == np.float32
        np.testing.assert_allclose(tensor, expected, rtol=2e-6, atol=0)
        # Outside [0, T) it holds the first and the last value.
        assert schedule.python_value(-3) == python[0]
        assert schedule.python_value(total + 5) == python[-1]
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(schedule(np.array([-3, total + 5]))),
            [python[0], python[-1]],
            rtol=2e-6,
        )


def test_schedule_is_the_paper_formula_when_cycles_divide_steps():
    schedule = SnapshotCosineAnnealing(0.2, 30, 3)
    expected = [paper_learning_rate(t, 30, 3, 0.2) for t in range(1, 31)]
    np.testing.assert_allclose(
        [schedule.python_value(t - 1) for t in range(1, 31)],
        expected,
        rtol=1e-12,
    )
    assert schedule.cycle_ends == [10, 20, 30]


def test_schedule_trains_in_the_step_and_round_trips():
    schedule = SnapshotCosineAnnealing(
        np.float32(0.1), np.int64(24), np.int64(4)
    )
    config = schedule.get_config()
    assert SnapshotCosineAnnealing.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(type(schedule)) == (
        "keras_regkit>SnapshotCosineAnnealing"
    )
    model = _model()
    model.compile(
        keras.optimizers.SGD(schedule), "sparse_categorical_crossentropy"
    )
    _fit(model, [], steps_per_execution=4, epochs=1)
    rate = keras.ops.convert_to_numpy(model.optimizer.learning_rate)
    np.testing.assert_allclose(rate, schedule.python_value(4), rtol=2e-6)
    serialized = keras.optimizers.serialize(model.optimizer)
    assert serialized["config"]["learning_rate"]["config"] == config
    restored = keras.optimizers.deserialize(serialized)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored.learning_rate), 0.1, rtol=1e-6
    )


def test_schedule_bad_arguments():
    for kwargs, name, expected in [
        ({"initial_learning_rate": 0}, "initial_learning_rate", "(0, inf)"),
        ({"total_steps": 0}, "total_steps", "an int >= 1"),
        ({"total_steps": 2.0}, "total_steps", "an int >= 1"),
        ({"cycles": 11}, "cycles", "an int in [1, 10]"),
        ({"cycles": True}, "cycles", "an int in [1, 10]"),
        ({"minimal_learning_rate": 0.1}, "minimal_learning_rate", "[0, 0.1)"),
        ({"name": 3}, "name", "a str"),
    ]:
        arguments = {"initial_learning_rate": 0.1, "total_steps": 10}
        arguments.update({"cycles": 2, **kwargs})
        with pytest.raises(
            ValueError, match=re.escape(f"argument `{name}`. Expected ")
        ) as info:
            SnapshotCosineAnnealing(**arguments)
        assert expected in str(info.value)


# The callback's learning rate and snapshots.


@pytest.mark.parametrize("cycles", [1, 4])
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
    np.testing.assert_allclose(
        history.history["learning_rate"], expected[STEPS - 1 :: STEPS]
    )
    assert history.history["snapshots"][-1] == cycles


def test_callback_and_schedule_agree_per_iteration(tmp_path):
    # T = 24, M = 5: cycles of 4 iterations, the last one of 8.
    model = _model()
    recorder = Recorder()
    _fit(model, [SnapshotEnsemble(5, MAX_LR, tmp_path, min_lr=0.01), recorder])
    schedule = SnapshotCosineAnnealing(MAX_LR, TOTAL, 5, 0.01)
    assert recorder.rates == [
        float(np.float32(schedule.python_value(i))) for i in range(TOTAL)
    ]
    np.testing.assert_allclose(
        recorder.rates,
        keras.ops.convert_to_numpy(schedule(np.arange(TOTAL))),
        rtol=2e-6,
    )
    np.testing.assert_allclose(
        recorder.rates, absorbed_learning_rates(TOTAL, 5, MAX_LR, 0.01)
    )
    assert _iterations(tmp_path) == [4, 8, 12, 16, 24]


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
        expected_files = {LOCK, "manifest.json"} | {
            f"snapshot-{k:03d}.weights.h5" for k in range(1, len(taken) + 1)
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
    # The last snapshot is the trained model, in Keras's own weight file.
    last = _snapshot_weights(model, tmp_path / "snapshot-004.weights.h5")
    for saved, weight in zip(last, model.get_weights(), strict=True):
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
    assert _iterations(tmp_path) == [6, 12, 18, 24]
    assert recorder.counts == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]


def test_steps_per_execution_misaligned_snapshot_once_at_group_end(tmp_path):
    # Groups of 4 steps end at 4, 8, ...: cycle ends 6 and 18 fall inside.
    callback = SnapshotEnsemble(4, MAX_LR, tmp_path)
    with pytest.warns(UserWarning, match=r"iterations \[6, 18\]"):
        _fit(_model(), [callback], steps_per_execution=4)
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [1, 2, 3, 4]
    assert [s["iteration"] for s in snapshots] == [8, 12, 20, 24]
    assert [s["cycle_end"] for s in snapshots] == [6, 12, 18, 24]


@pytest.mark.slow
def test_several_cycles_in_one_execution_snapshot_the_last(tmp_path):
    callback = SnapshotEnsemble(12, MAX_LR, tmp_path)
    with pytest.warns(UserWarning) as record:
        _fit(_model(), [callback], steps_per_execution=4)
    messages = [str(w.message) for w in record]
    assert any("iterations [2, 6, 10, 14, 18, 22]" in m for m in messages)
    assert sum("all ended within one execution" in m for m in messages) == 1
    snapshots = _manifest(tmp_path)["snapshots"]
    assert [s["cycle"] for s in snapshots] == [2, 4, 6, 8, 10, 12]
    assert [s["iteration"] for s in snapshots] == [4, 8, 12, 16, 20, 24]


@pytest.mark.slow
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
    assert _iterations(tmp_path / "second") == [12, 24]


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
    assert not (tmp_path / "snapshot-002.weights.h5").exists()
    assert not _temporaries(tmp_path)


def test_loss_scale_optimizer_counts_the_inner_steps(tmp_path):
    # Keras 3.8's LossScaleOptimizer has an `iterations` of its own that
    # never advances; the cycles follow the steps the inner one takes.
    model = _model()
    model.compile(
        keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.5, momentum=0.9)
        ),
        "sparse_categorical_crossentropy",
    )
    _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert _iterations(tmp_path) == [12, 24]


# Resumption.


@pytest.mark.slow
def test_interrupted_and_resumed_run_gives_the_same_snapshots(tmp_path):
    # Cycles end at 6, 12, 18, 24; the interruption comes at iteration 19,
    # after the snapshot at 18 but with the last backup at 16 (epoch 4).
    reference_dir = tmp_path / "reference"
    reference_model = _model()
    _fit(reference_model, [SnapshotEnsemble(4, MAX_LR, reference_dir)])

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
    assert _iterations(directory) == [6, 12, 18]

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
    keys = ("cycle", "iteration", "epoch", "file")
    reference = _manifest(reference_dir)["snapshots"]
    resumed = _manifest(directory)["snapshots"]
    assert [{k: s[k] for k in keys} for s in resumed] == [
        {k: s[k] for k in keys} for s in reference
    ]
    for entry in reference:
        expected = _snapshot_weights(
            reference_model, reference_dir / entry["file"]
        )
        actual = _snapshot_weights(reference_model, directory / entry["file"])
        for a, b in zip(actual, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(directory)) == sorted(os.listdir(reference_dir))


def test_resume_from_a_backup_taken_within_epochs_is_refused(tmp_path):
    # Backups every 2 batches: the last one before the interruption at 19
    # is at iteration 18, mid-epoch 4. Keras would restart epoch 4 from its
    # first batch with the optimizer at 18, replaying two steps, so the
    # snapshots could not match an uninterrupted run: refused, before any
    # step, with the snapshots taken so far kept.
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
    model = _model()
    with pytest.raises(
        ValueError,
        match=r"(?s)resumes at epoch 5 \(after 16 iterations\), but the "
        r"optimizer has already taken 18 .*save_freq=\"epoch\"",
    ):
        _fit(
            model,
            [
                SnapshotEnsemble(4, MAX_LR, directory),
                keras.callbacks.BackupAndRestore(backup_dir, save_freq=2),
            ],
        )
    assert read_iterations(model.optimizer) == 18
    assert _iterations(directory) == [6, 12, 18]
    # The directory is free again for a new run.
    with pytest.warns(UserWarning, match="left by an earlier run"):
        _fit(_model(), [SnapshotEnsemble(4, MAX_LR, directory)])
    assert _iterations(directory) == [6, 12, 18, 24]


def test_new_run_replaces_only_its_own_files(tmp_path):
    _fit(_model(), [SnapshotEnsemble(3, MAX_LR, tmp_path)])
    # What a crash in the middle of a write leaves behind.
    (tmp_path / ".tmp-snapshot-002.weights.h5-abc123").mkdir()
    (tmp_path / ".tmp-manifest.json-0123456789abcdef").write_text("{")
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / ".tmp-notes.txt-1").write_text("kept")
    with pytest.warns(UserWarning, match="left by an earlier run"):
        _fit(_model(seed=1), [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert sorted(os.listdir(tmp_path)) == [
        ".snapshot_ensemble.lock",
        ".tmp-notes.txt-1",
        "manifest.json",
        "model.json",
        "notes.txt",
        "snapshot-001.weights.h5",
        "snapshot-002.weights.h5",
    ]
    assert _iterations(tmp_path) == [12, 24]


# Safety of the directory.


def _listing(directory):
    return {
        name: (directory / name).read_bytes()
        for name in sorted(os.listdir(directory))
    }


def test_foreign_non_empty_directory_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "model.json").write_text('{"mine": true}')
    (tmp_path / "snapshot-001.weights.h5").write_bytes(b"someone's weights")
    (tmp_path / ".write-check").write_text("")
    before = _listing(tmp_path)
    model = _model()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "no manifest.json but holds '.write-check', 'model.json', "
            "'snapshot-001.weights.h5', which SnapshotEnsemble will not "
            "overwrite or delete"
        ),
    ):
        _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert _listing(tmp_path) == before
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
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_manifest_naming_paths_outside_is_refused(tmp_path):
    directory = tmp_path / "snapshots"
    _fit(_model(), [SnapshotEnsemble(2, MAX_LR, directory)])
    outside = tmp_path / "outside.weights.h5"
    outside.write_bytes(b"not to be read or deleted")
    original = _manifest(directory)
    for name in ["../outside.weights.h5", str(outside), "/etc/passwd"]:
        manifest = json.loads(json.dumps(original))
        manifest["snapshots"][0]["file"] = name
        (directory / "manifest.json").write_text(json.dumps(manifest))
        message = re.escape(f"lists {name!r}, which is not a file name")
        with pytest.raises(ValueError, match=message):
            snapshot_ensemble_model(directory)
    # A new run reading it (to resume or replace it) refuses it too.
    with pytest.raises(ValueError, match="edited or crafted"):
        _fit(_model(), [SnapshotEnsemble(2, MAX_LR, directory)])
    assert outside.read_bytes() == b"not to be read or deleted"
    assert os.path.exists("/etc/passwd")
    # A listed snapshot that is a link to a file outside is not read.
    (directory / "manifest.json").write_text(json.dumps(original))
    os.replace(directory / "snapshot-001.weights.h5", outside)
    os.symlink(outside, directory / "snapshot-001.weights.h5")
    with pytest.raises(ValueError, match="which is a link to"):
        snapshot_ensemble_model(directory)


HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "here"}).encode())
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock")
def test_directory_of_another_live_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = _model()
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"another process, pid {holder.pid} on here, holds its lock"
            ),
        ):
            _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])
        assert read_iterations(model.optimizer) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its lock file stays behind, with the pid of a dead process: the OS
    # released the lock itself, so the directory is free.
    assert (tmp_path / LOCK).exists()
    _fit(_model(), [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert _iterations(tmp_path) == [12, 24]


def test_two_callbacks_on_one_directory_never_interleave(tmp_path):
    # A second `fit` in this process takes the directory over (the first
    # may be a `fit` that raised and never released it); the first then
    # stops at its next write instead of mixing its snapshots in.
    inner = []

    def second_run(model):
        other = _model(seed=1)
        _fit(other, [SnapshotEnsemble(2, MAX_LR, tmp_path)], epochs=2)
        inner.append(other)

    with pytest.raises(RuntimeError, match="took the directory over"):
        _fit(
            _model(),
            [SnapshotEnsemble(2, MAX_LR, tmp_path), AtIteration(3, second_run)],
        )
    assert _manifest(tmp_path)["total_iterations"] == 8
    assert _iterations(tmp_path) == [4, 8]
    last = _snapshot_weights(inner[0], tmp_path / "snapshot-002.weights.h5")
    for saved, weight in zip(last, inner[0].get_weights(), strict=True):
        np.testing.assert_array_equal(saved, weight)


@pytest.mark.slow
def test_fit_after_an_interrupted_fit_takes_the_directory_back(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(
            _model(),
            [SnapshotEnsemble(2, MAX_LR, tmp_path), AtIteration(3, _interrupt)],
        )
    _fit(_model(), [SnapshotEnsemble(2, MAX_LR, tmp_path)])
    assert _iterations(tmp_path) == [12, 24]


@contextlib.contextmanager
def _file_size_limit(size):
    """Writes past `size` bytes fail with EFBIG, as on a full disk."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def _fail_saving_weights(monkeypatch):
    """Keras's `save_weights` writes half a file, then the disk is full."""

    def failing(model, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF half a snapshot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras.Model, "save_weights", failing)
    return contextlib.nullcontext()


def _fail_writing_manifest(monkeypatch):
    """Writes past 300 bytes fail with EFBIG (the manifest is larger)."""
    return _file_size_limit(300)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimit")
@pytest.mark.parametrize(
    "fail, failing, code",
    [
        (_fail_saving_weights, "snapshot-002.weights.h5", errno.ENOSPC),
        (_fail_writing_manifest, "manifest.json", errno.EFBIG),
    ],
)
def test_disk_error_names_the_path_and_leaves_directory_consistent(
    tmp_path, monkeypatch, fail, failing, code
):
    stack = contextlib.ExitStack()

    def fill_disk(model):
        stack.enter_context(fail(monkeypatch))

    with stack, pytest.raises(OSError) as info:
        _fit(
            _model(),
            [SnapshotEnsemble(3, MAX_LR, tmp_path), AtIteration(9, fill_disk)],
        )
    monkeypatch.undo()
    assert info.value.errno == code
    assert str(info.value) == (
        f"[Errno {code}] SnapshotEnsemble could not write "
        f"{str(tmp_path / failing)!r}: {os.strerror(code)}"
    )
    assert not _temporaries(tmp_path)
    assert not (tmp_path / "snapshot-002.weights.h5").exists()
    assert _iterations(tmp_path) == [8]
    assert len(snapshot_ensemble_model(tmp_path).predict(_data()[0])) == 32
    # The next run cleans what the failed one left and takes all snapshots.
    with pytest.warns(UserWarning, match="left by an earlier run"):
        _fit(_model(), [SnapshotEnsemble(3, MAX_LR, tmp_path)])
    assert _iterations(tmp_path) == [8, 16, 24]


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0,
    reason="permissions do not bind root",
)
def test_permission_error_names_the_path(tmp_path):
    def read_only(model):
        os.chmod(tmp_path, 0o555)

    try:
        with pytest.raises(PermissionError) as info:
            _fit(
                _model(),
                [
                    SnapshotEnsemble(3, MAX_LR, tmp_path),
                    AtIteration(9, read_only),
                ],
            )
    finally:
        os.chmod(tmp_path, 0o755)
    assert "SnapshotEnsemble could not write" in str(info.value)
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert _iterations(tmp_path) == [8]


def test_atomic_file_never_follows_a_planted_name(tmp_path, monkeypatch):
    # Temporary names are random; even a guessed one is refused by O_EXCL,
    # so a symlink planted there never redirects the write.
    target = tmp_path / "target"
    target.write_text("untouched")
    monkeypatch.setattr(_utils.secrets, "token_hex", lambda n: "guessed")
    os.symlink(target, tmp_path / ".tmp-a.txt-guessed")
    with pytest.raises(FileExistsError):
        _utils.atomic_write_text(tmp_path / "a.txt", "new")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "a.txt").exists()


def test_atomic_path_replaces_a_directory_without_a_gap(tmp_path):
    path = tmp_path / "exported"
    path.mkdir()
    (path / "version").write_text("0")
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not os.path.isdir(path):
                missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for version in range(1, 31):
            with _utils.atomic_path(path) as temporary:
                os.mkdir(temporary)
                with open(os.path.join(temporary, "version"), "w") as f:
                    f.write(str(version))
    finally:
        stop.set()
        watcher.join()
    assert (path / "version").read_text() == "30"
    assert os.listdir(tmp_path) == ["exported"]
    assert not missing


# Arguments and errors.


def _message(name, expected, value):
    return re.escape(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r}"
    )


BAD_ARGUMENTS = [
    ({"cycles": 0}, "cycles", "an int >= 1", 0),
    ({"cycles": 2.0}, "cycles", "an int >= 1", 2.0),
    ({"cycles": True}, "cycles", "an int >= 1", True),
    ({"cycles": "3"}, "cycles", "an int >= 1", "3"),
    ({"max_lr": 0}, "max_lr", "a float in (0, inf)", 0),
    ({"max_lr": -0.1}, "max_lr", "a float in (0, inf)", -0.1),
    ({"max_lr": float("nan")}, "max_lr", "a float in (0, inf)", math.nan),
    ({"max_lr": "0.1"}, "max_lr", "a float in (0, inf)", "0.1"),
    ({"min_lr": 0.1}, "min_lr", "a float in [0, 0.1)", 0.1),
    ({"min_lr": -1.0}, "min_lr", "a float in [0, 0.1)", -1.0),
    ({"min_lr": None}, "min_lr", "a float in [0, 0.1)", None),
    (
        {"directory": ""},
        "directory",
        "a non-empty path (str or os.PathLike)",
        "",
    ),
    (
        {"directory": None},
        "directory",
        "a non-empty path (str or os.PathLike)",
        None,
    ),
    ({"verbose": 3}, "verbose", "an int >= 0 <= 2", 3),
    ({"verbose": "yes"}, "verbose", "an int >= 0 <= 2", "yes"),
    ({"verbose": 0.5}, "verbose", "an int >= 0 <= 2", 0.5),
]


def test_bad_arguments_raise_at_construction():
    for kwargs, name, expected, value in BAD_ARGUMENTS:
        arguments = {"cycles": 2, "max_lr": 0.1, "directory": "snapshots"}
        arguments.update(kwargs)
        with pytest.raises(ValueError, match=_message(name, expected, value)):
            SnapshotEnsemble(**arguments)


def test_numpy_scalars_are_accepted(tmp_path):
    callback = SnapshotEnsemble(
        np.int64(2),
        np.float32(0.5),
        tmp_path,
        min_lr=np.float64(0.01),
        verbose=np.int32(0),
    )
    assert callback.get_config() == {
        "cycles": 2,
        "max_lr": 0.5,
        "directory": str(tmp_path),
        "min_lr": 0.01,
        "verbose": 0,
    }
    assert all(
        type(v) in (int, float, str) for v in callback.get_config().values()
    )


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


def test_unknown_steps_per_epoch_raises(tmp_path):
    x, y = _data()

    def batches():
        while True:
            yield x[:8], y[:8]

    with pytest.raises(ValueError, match=r"Pass `steps_per_epoch=` to `fit`"):
        _model().fit(
            batches(),
            epochs=2,
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
    with pytest.raises(ValueError, match="`LearningRateSchedule`"):
        _fit(model, [SnapshotEnsemble(2, MAX_LR, tmp_path)])


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


@pytest.mark.slow
def test_only_the_chief_worker_writes(tmp_path, monkeypatch):
    # Under MultiWorkerMirroredStrategy every worker runs the callback with
    # the same weights; the non-chief ones train the same schedule but
    # write to a private directory, removed when training ends, and never
    # touch `directory`.
    from keras_regkit.callbacks import snapshot_ensemble

    monkeypatch.setattr(snapshot_ensemble, "is_chief", lambda model: False)
    worker_model, chief_model = _model(), _model()
    private = []

    class Spy(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            private.append(worker._files)
            assert _iterations(worker._files) == [12, 24]

    worker = SnapshotEnsemble(2, 0.5, tmp_path / "shared")
    _fit(worker_model, [Spy(), worker])  # Spy ends first.
    assert not (tmp_path / "shared").exists()
    assert not os.path.exists(private[0])
    monkeypatch.undo()
    _fit(chief_model, [SnapshotEnsemble(2, 0.5, tmp_path / "chief")])
    assert _iterations(tmp_path / "chief") == [12, 24]
    for a, b in zip(
        worker_model.get_weights(), chief_model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
