"""Snapshot Ensembles: one snapshot per cosine cycle (Huang et al., 2017)."""

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings

import keras
from keras import ops

from keras_regkit._distribute import is_chief
from keras_regkit._training import inner_optimizer
from keras_regkit._training import read_iterations
from keras_regkit._training import sync_model_state
from keras_regkit._utils import DirectoryLock
from keras_regkit._utils import DirectoryLocked
from keras_regkit._utils import argument_error
from keras_regkit._utils import atomic_path
from keras_regkit._utils import atomic_write_text
from keras_regkit._utils import check_float_in_range
from keras_regkit._utils import check_int_in_range
from keras_regkit._utils import check_path
from keras_regkit._utils import naming_write_errors
from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback
from keras_regkit.callbacks._learning_rate import steps_per_execution
from keras_regkit.ensembles import ARCHITECTURE_FILENAME
from keras_regkit.ensembles import FORMAT
from keras_regkit.ensembles import FORMAT_VERSION
from keras_regkit.ensembles import LOCK_FILENAME
from keras_regkit.ensembles import MANIFEST_FILENAME
from keras_regkit.ensembles import read_manifest
from keras_regkit.ensembles import snapshot_ensemble_model
from keras_regkit.ensembles import snapshot_filename
from keras_regkit.schedules.snapshot_cosine_annealing import (
    SnapshotCosineAnnealing,
)

__all__ = [
    "ARCHITECTURE_FILENAME",
    "MANIFEST_FILENAME",
    "SnapshotEnsemble",
    "snapshot_ensemble_model",
]

_WRITER = "SnapshotEnsemble"
# Temporaries of the files it writes (see `keras_regkit._utils`), left by
# a crash; removed only in a directory that its manifest shows it owns.
_OWN_TEMPORARY = re.compile(
    r"\.tmp-(manifest\.json|model\.json|snapshot-\d{3,}\.weights\.(h5|npz))-"
)


def _architecture(model):
    """`model.to_json()` without the compile config: members are uncompiled."""
    config = json.loads(model.to_json())
    config.pop("compile_config", None)
    return json.dumps(config, sort_keys=True)


def _first_non_finite(variables):
    for variable in variables:
        if "float" in str(variable.dtype) and not bool(
            ops.convert_to_numpy(ops.all(ops.isfinite(variable)))
        ):
            return variable.path
    return None


@keras.saving.register_keras_serializable(package="keras_regkit")
class SnapshotEnsemble(IterationLearningRateCallback):
    """Cyclic cosine annealing that saves a snapshot at the end of each cycle.

    Over the `T` iterations of a `fit` run (`epochs` x steps per epoch), the
    learning rate restarts `cycles` times at `max_lr` and anneals along a
    cosine towards `min_lr`; when a cycle ends, the model, then in a local
    minimum, is saved with `model.save_weights` to
    `directory/snapshot-KKK.weights.h5`. After training, `ensemble_model()`
    (or `keras_regkit.ensembles.snapshot_ensemble_model(directory)`) averages
    the last snapshots in one `keras.Model`. Inference is not affected.

    With `M = cycles`, `C = floor(T / M)` and `t - 1` the 0-based iteration
    of the run (from `optimizer.iterations`), cycle `k` (0-based) ends after
    `(k + 1) * C` iterations, the last one at `T`, and

    ```
    lr(t) = min_lr + (max_lr - min_lr) / 2
            * (cos(pi * (t - 1 - k * C) / L_k) + 1)
    ```

    with `L_k = C`, or `T - (M - 1) * C` for the last cycle. When `M`
    divides `T` this is the paper's `max_lr / 2 * (cos(pi * mod(t - 1,
    ceil(T / M)) / ceil(T / M)) + 1)` (with `min_lr=0`); otherwise the last
    cycle absorbs the leftover iterations instead of ending at a high rate.
    The same rates are `keras_regkit.schedules.SnapshotCosineAnnealing`.

    The directory holds `manifest.json` (the snapshots in order, with their
    `cycle`, `iteration`, `epoch`, `learning_rate` and `val_*` metrics),
    `model.json` and the snapshots, each written to a new temporary file and
    renamed into place. The callback writes only to a new or empty
    directory, or one holding its own manifest, and refuses a directory that
    another live run holds; a snapshot whose weights are not all finite is
    skipped with a warning. A run resumed by `keras.callbacks.BackupAndRestore`
    (saving at epoch ends) gives the same snapshots as an uninterrupted one.
    `logs` receive `learning_rate` and `snapshots` (the number taken).

    Args:
        cycles: int. Number of cycles and snapshots `M`, in `[1, T]`.
        max_lr: float. Learning rate at the start of each cycle
            (`alpha_0` in the paper), `> 0`.
        directory: str or `os.PathLike`. Where the snapshots are written;
            created if needed.
        min_lr: float. The floor of the annealing, in `[0, max_lr)`.
            Defaults to `0.0` (the paper).
        verbose: int. 0 is silent; 1 prints the learning rate at each epoch
            end and a line for each snapshot. Defaults to `0`.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"),
    ...     keras.layers.Dense(2, activation="softmax"),
    ... ])
    >>> model.compile(
    ...     keras.optimizers.SGD(momentum=0.9),
    ...     "sparse_categorical_crossentropy",
    ... )
    >>> snapshots = SnapshotEnsemble(
    ...     cycles=3, max_lr=0.1, directory=tempfile.mkdtemp()
    ... )
    >>> _ = model.fit(x, y, batch_size=16, epochs=6, callbacks=[snapshots],
    ...               verbose=0)
    >>> [s["iteration"] for s in snapshots.snapshots]
    [8, 16, 24]
    >>> ensemble = snapshots.ensemble_model(last=2)
    >>> ensemble.predict(x, verbose=0).shape
    (64, 2)

    Reference:
    - [Huang et al., 2017](https://arxiv.org/abs/1704.00109)
    """

    schedule_form = "keras_regkit.schedules.SnapshotCosineAnnealing"

    def __init__(self, cycles, max_lr, directory, min_lr=0.0, verbose=0):
        super().__init__(verbose=verbose)
        self.cycles = check_int_in_range("cycles", cycles, 1)
        self.max_lr = check_float_in_range(
            "max_lr", max_lr, 0, float("inf"), False, False
        )
        self.min_lr = check_float_in_range(
            "min_lr", min_lr, 0, self.max_lr, True, False
        )
        self.directory = check_path("directory", directory)
        self._files = self.directory  # Where this process writes.
        self._lock = None
        self._offset = None
        self._entries = []
        self._pending = []

    def get_config(self):
        return {
            "cycles": self.cycles,
            "max_lr": self.max_lr,
            "directory": self.directory,
            "min_lr": self.min_lr,
            "verbose": self.verbose,
        }

    @property
    def snapshots(self):
        """The manifest entries of the snapshots in `directory`, in order."""
        manifest = read_manifest(self.directory)
        return [] if manifest is None else list(manifest["snapshots"])

    def ensemble_model(
        self,
        last=None,
        average="probabilities",
        from_logits=False,
        name="snapshot_ensemble",
        custom_objects=None,
    ):
        """Returns the last `last` snapshots averaged in one `keras.Model`.

        See `keras_regkit.ensembles.snapshot_ensemble_model`, called with
        this callback's `directory`.
        """
        return snapshot_ensemble_model(
            self.directory,
            last=last,
            average=average,
            from_logits=from_logits,
            name=name,
            custom_objects=custom_objects,
        )

    def learning_rate_at(self, iteration):
        return self._schedule.python_value(iteration - (self._offset or 0))

    def on_train_begin(self, logs=None):
        epochs = self.params.get("epochs")
        steps = self.params.get("steps")
        if not steps:
            raise ValueError(
                "SnapshotEnsemble places its cycles over the iterations of "
                "the `fit` run (epochs x steps per epoch), but `fit` does not "
                "know the number of steps per epoch (the data has no length, "
                "e.g. a generator or a `tf.data.Dataset` of unknown "
                "cardinality). Pass `steps_per_epoch=` to `fit`."
            )
        total = epochs * steps
        if self.cycles > total:
            raise argument_error(
                "cycles",
                f"an int in [1, {total}]: this `fit` runs {total} iterations "
                f"({epochs} epochs x {steps} steps) and each cycle needs at "
                "least one",
                self.cycles,
            )
        self._schedule = SnapshotCosineAnnealing(
            self.max_lr, total, self.cycles, self.min_lr
        )
        self._steps_per_epoch = steps
        self._total_iterations = total
        self._boundaries = self._schedule.cycle_ends
        self._offset = None
        self._entries = []
        self._pending = []
        self._architecture_written = False
        self._warned_skip = False
        super().on_train_begin(logs)
        try:
            self._architecture = _architecture(self.model)
        except Exception as e:
            raise ValueError(
                "SnapshotEnsemble saves the model's architecture "
                "(`model.to_json()`) beside the snapshots so the ensemble can "
                f"be rebuilt, but serializing the model failed: {e!r}. Use a "
                "Functional or Sequential model, or give the subclassed model "
                "a `get_config()` and register it with "
                "`@keras.saving.register_keras_serializable()`."
            ) from e
        # Under a multi-worker strategy every worker runs this callback (the
        # same reads of the variables on each), but only the chief writes to
        # `directory`; the others write to a private temporary directory.
        if is_chief(self.model):
            self._files = self.directory
            self._open_directory()
        else:
            self._files = tempfile.mkdtemp(prefix="snapshot_ensemble_worker_")
        self._warn_if_misaligned(steps)

    def _unwritable(self, error):
        return argument_error(
            "directory",
            "a directory this process can create and write files in "
            f"({type(error).__name__}: {error.strerror or error})",
            self.directory,
        )

    def _open_directory(self):
        """Takes `directory`: new, empty, or its own; refuses anything else."""
        directory = self.directory
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock = DirectoryLock.acquire(
                os.path.join(directory, LOCK_FILENAME), self
            )
        except DirectoryLocked as e:
            holder = e.holder
            raise argument_error(
                "directory",
                "a directory no other live run is writing (another process, "
                f"pid {holder.get('pid', '?')} on "
                f"{holder.get('host', 'an unknown host')}, holds its lock "
                f"file {LOCK_FILENAME}; give each run its own directory, or "
                "wait until that run ends)",
                directory,
            ) from None
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            manifest = read_manifest(directory)
            if manifest is None:
                found = sorted(set(os.listdir(directory)) - {LOCK_FILENAME})
                if found:
                    shown = ", ".join(repr(n) for n in found[:5])
                    more = (
                        f" and {len(found) - 5} more" if len(found) > 5 else ""
                    )
                    raise argument_error(
                        "directory",
                        "a new or empty directory, or one that "
                        "SnapshotEnsemble wrote (with its "
                        f"{MANIFEST_FILENAME}); this one has no "
                        f"{MANIFEST_FILENAME} but holds {shown}{more}, "
                        "which SnapshotEnsemble will not overwrite or delete",
                        directory,
                    )
                manifest = self._manifest()
            # Rewriting the manifest shows the directory is writable now,
            # before any training step.
            atomic_write_text(
                os.path.join(directory, MANIFEST_FILENAME),
                json.dumps(manifest, indent=1),
            )
        except BaseException as e:
            lock, self._lock = self._lock, None
            if lock.created and _read_manifest_or_none(directory) is None:
                with contextlib.suppress(OSError):
                    os.remove(lock.path)
            lock.release()
            if isinstance(e, OSError):
                raise self._unwritable(e) from e
            raise

    def _warn_if_misaligned(self, steps):
        group = steps_per_execution(self.model)
        if group <= 1:
            return
        late = [b for b in self._boundaries if b % steps and b % steps % group]
        if late:
            warnings.warn(
                f"SnapshotEnsemble: with steps_per_execution={group}, Keras "
                f"calls callbacks every {group} steps, so the cycles ending "
                f"at iterations {late} are snapshotted at the end of the "
                f"execution containing them (up to {group - 1} steps later). "
                "For exact snapshots, make the cycle length "
                f"({self._total_iterations // self.cycles}) and the steps per "
                f"epoch ({steps}) multiples of steps_per_execution.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        if self._offset is not None:
            return
        # The run's first epoch is only known here: `BackupAndRestore` sets
        # it in its own `on_train_begin`, which may come after this one's.
        sync_model_state(self.model)
        resumed = epoch * self._steps_per_epoch
        now = self._iterations()
        try:
            self._resume(resumed, now)
        except BaseException:
            self._release()
            raise

    def _same_run(self, manifest):
        return manifest is not None and (
            manifest.get("version"),
            manifest.get("cycles"),
            manifest.get("total_iterations"),
            manifest.get("weights"),
        ) == (
            FORMAT_VERSION,
            self.cycles,
            self._total_iterations,
            self._signature(),
        )

    def _resume(self, resumed, now):
        manifest = read_manifest(self._files)
        same_run = self._same_run(manifest) and resumed > 0
        first = manifest.get("first_iteration") if same_run else None
        if isinstance(first, int) and resumed < now - first:
            raise ValueError(
                "SnapshotEnsemble: this run resumes at epoch "
                f"{resumed // self._steps_per_epoch + 1} (after {resumed} "
                "iterations), but the optimizer has already taken "
                f"{now - first} iterations of it. Keras replays an "
                "interrupted epoch from its first batch when "
                "`BackupAndRestore(save_freq=<int>)` restored a checkpoint "
                "taken within an epoch, so the snapshots would differ from "
                "an uninterrupted run. Use `BackupAndRestore(save_freq="
                '"epoch")` (the default) with SnapshotEnsemble, or start a '
                "new run (the snapshots in "
                f"{self._files!r} are kept until then)."
            )
        self._offset = now - resumed
        found = [] if manifest is None else manifest["snapshots"]
        kept = [e for e in found if same_run and e["iteration"] <= resumed]
        dropped = found[len(kept) :]
        if dropped:
            reason = (
                f"taken after iteration {resumed}, where this run resumes"
                if same_run
                else "left by an earlier run"
            )
            warnings.warn(
                f"SnapshotEnsemble: discarding {len(dropped)} snapshot(s) in "
                f"{self._files!r} (cycles "
                f"{[e.get('cycle') for e in dropped]}) {reason}.",
                stacklevel=2,
            )
        listed = {e["file"] for e in kept}
        leftover = [e["file"] for e in dropped] + list(
            [] if manifest is None else manifest.get("pending", [])
        )
        self._entries = kept
        self._pending = []
        # The manifest stops listing the dropped files before they go.
        self._write_manifest()
        for name in leftover:
            if name not in listed:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self._files, name))
        for name in os.listdir(self._files):
            if _OWN_TEMPORARY.match(name):
                _remove_temporary(os.path.join(self._files, name))
        self._next_cycle = 1 + sum(b <= resumed for b in self._boundaries)

    def _iterations(self):
        # The inner optimizer's counter: a LossScaleOptimizer of Keras < 3.9
        # has its own, which never advances.
        return read_iterations(inner_optimizer(self.model.optimizer))

    def _signature(self):
        return [[list(v.shape), str(v.dtype)] for v in self.model.weights]

    def _manifest(self):
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "cycles": self.cycles,
            "total_iterations": self._total_iterations,
            "steps_per_epoch": self._steps_per_epoch,
            "cycle_ends": self._boundaries,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "first_iteration": self._offset,
            "architecture": ARCHITECTURE_FILENAME,
            "weights": self._signature(),
            "snapshots": self._entries,
            "pending": self._pending,
        }

    def _check_lock(self):
        if self._lock is not None and self._lock.lost:
            raise RuntimeError(
                f"SnapshotEnsemble stopped writing to {self.directory!r}: "
                "another SnapshotEnsemble of this process took the directory "
                "over (a `fit` started on it while this one was running). "
                "Give each run its own directory."
            )

    def _write_manifest(self):
        self._check_lock()
        path = os.path.join(self._files, MANIFEST_FILENAME)
        with naming_write_errors(path, _WRITER):
            atomic_write_text(path, json.dumps(self._manifest(), indent=1))

    def before_step(self, iteration):
        # The weights after the previous step, before the next one and its
        # learning rate: a snapshot here, rather than at batch end, keeps
        # the steps of `fit` dispatched asynchronously (see
        # `IterationLearningRateCallback`).
        self._snapshot_ended_cycles(iteration - self._offset)

    def _snapshot_ended_cycles(self, done):
        """Snapshots the last cycle ended within `done` iterations, if new."""
        ended = []
        while (
            self._next_cycle <= self.cycles
            and self._boundaries[self._next_cycle - 1] <= done
        ):
            ended.append(self._next_cycle)
            self._next_cycle += 1
        if len(ended) > 1 and not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"SnapshotEnsemble: cycles {ended} all ended within one "
                "execution of steps_per_execution steps; only the last "
                "cycle of such an execution is snapshotted (warned once "
                "per run). Use fewer cycles or a smaller "
                "steps_per_execution.",
                stacklevel=2,
            )
        if ended:
            self._take_snapshot(ended[-1], done)

    def _take_snapshot(self, cycle, done):
        self._check_lock()
        bad = _first_non_finite(self.model.weights)
        if bad is not None:
            warnings.warn(
                f"SnapshotEnsemble: cycle {cycle} ended at iteration {done} "
                f"with non-finite weights (first in `{bad}`); no snapshot "
                "is saved for it.",
                stacklevel=2,
            )
            return
        if not self._architecture_written:
            path = os.path.join(self._files, ARCHITECTURE_FILENAME)
            with naming_write_errors(path, _WRITER):
                atomic_write_text(path, self._architecture)
            self._architecture_written = True
        filename = snapshot_filename(cycle)
        path = os.path.join(self._files, filename)
        # Listed as pending first, so that a crash before the manifest lists
        # it leaves a file the next run knows to be its own.
        self._pending = [filename]
        self._write_manifest()
        with (
            naming_write_errors(path, _WRITER),
            atomic_path(path) as temporary,
        ):
            self.model.save_weights(temporary)
        self._entries.append(
            {
                "cycle": cycle,
                "iteration": done,
                "cycle_end": self._boundaries[cycle - 1],
                "epoch": self._epoch + 1,
                "file": filename,
                "learning_rate": self._last_learning_rate,
                "metrics": {},
            }
        )
        self._pending = []
        self._write_manifest()
        if self.verbose:
            print(
                f"\nSnapshotEnsemble: saved snapshot {len(self._entries)} "
                f"(cycle {cycle}, iteration {done}) to {path}."
            )

    def on_epoch_end(self, epoch, logs=None):
        self.finish_step()
        self._snapshot_ended_cycles(
            self._counter.now(self._target) - self._offset
        )
        entry = self._entries[-1] if self._entries else None
        at_epoch_end = (epoch + 1) * self._steps_per_epoch
        if entry and entry["iteration"] == at_epoch_end and logs:
            metrics = {}
            for key, value in logs.items():
                if key.startswith("val_"):
                    try:
                        metrics[key] = float(value)
                    except (TypeError, ValueError):
                        pass
            if metrics:
                entry["metrics"] = metrics
                self._write_manifest()
        super().on_epoch_end(epoch, logs)
        if logs is not None:
            logs["snapshots"] = len(self._entries)

    def _release(self):
        if self._files != self.directory:
            shutil.rmtree(self._files, ignore_errors=True)
            self._files = self.directory
        lock, self._lock = self._lock, None
        if lock is not None and not lock.lost:
            lock.release()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self._release()
        if self._offset is not None and self._next_cycle <= self.cycles:
            warnings.warn(
                f"SnapshotEnsemble: training stopped before cycle "
                f"{self._next_cycle} of {self.cycles} ended; "
                f"{self.directory!r} holds {len(self._entries)} snapshot(s).",
                stacklevel=2,
            )
        self._offset = None


def _read_manifest_or_none(directory):
    try:
        return read_manifest(directory)
    except (OSError, ValueError):
        return None


def _remove_temporary(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)
