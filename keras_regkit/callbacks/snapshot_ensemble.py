"""Snapshot Ensembles: one snapshot per cosine cycle (Huang et al., 2017)."""

import json
import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
import zipfile

import keras
import numpy as np
from keras import ops

from keras_regkit._distribute import is_chief
from keras_regkit._utils import argument_error
from keras_regkit._utils import atomic_path
from keras_regkit._utils import atomic_write_text
from keras_regkit._utils import check_choice
from keras_regkit._utils import check_float_in_range
from keras_regkit.callbacks._learning_rate import IterationLearningRateCallback
from keras_regkit.callbacks._learning_rate import read_iterations
from keras_regkit.callbacks._learning_rate import sync_model_state

__all__ = [
    "ARCHITECTURE_FILENAME",
    "MANIFEST_FILENAME",
    "SnapshotEnsemble",
    "snapshot_ensemble_model",
]

MANIFEST_FILENAME = "manifest.json"
"""Name of the manifest `SnapshotEnsemble` keeps in its `directory`."""

ARCHITECTURE_FILENAME = "model.json"
"""Name of the model's architecture (`model.to_json()`) in `directory`."""

_FORMAT = "keras_regkit.SnapshotEnsemble"
_FORMAT_VERSION = 1
_AVERAGES = ("probabilities", "logits")
_WRITE_CHECK = ".write-check"
_SNAPSHOT_FILE = re.compile(r"snapshot-\d+\.weights\.npz")
_OWN_TEMPORARY = re.compile(
    r"\.tmp-(snapshot-\d+\.weights\.npz|manifest\.json|model\.json"
    r"|\.write-check)-"
)


def _snapshot_filename(cycle):
    return f"snapshot-{cycle:03d}.weights.npz"


def _cycle_boundaries(total_iterations, cycles):
    """Iteration counts at which each cycle ends (the last absorbs the rest)."""
    length = total_iterations // cycles
    return [length * k for k in range(1, cycles)] + [total_iterations]


def _annealed_learning_rate(
    iteration, total_iterations, cycles, max_lr, min_lr
):
    """The learning rate for the 0-based `iteration` (`t - 1` in the paper)."""
    length = total_iterations // cycles
    iteration = min(max(iteration, 0), total_iterations - 1)
    cycle = min(iteration // length, cycles - 1)
    position = iteration - cycle * length
    if cycle == cycles - 1:
        length = total_iterations - (cycles - 1) * length
    cosine = math.cos(math.pi * position / length)
    return min_lr + 0.5 * (max_lr - min_lr) * (cosine + 1.0)


class _NonFiniteWeights(Exception):
    def __init__(self, path):
        super().__init__(path)
        self.path = path


def _write_weights(path, variables):
    """Writes `variables` as an `.npz` archive, one variable in RAM at a time.

    Raises `_NonFiniteWeights` (before the archive is complete) when a
    floating-point variable holds NaN or infinity.
    """
    with open(path, "wb") as file:
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            for index, variable in enumerate(variables):
                value = ops.convert_to_numpy(variable)
                if np.issubdtype(value.dtype, np.inexact) and not np.all(
                    np.isfinite(value)
                ):
                    raise _NonFiniteWeights(variable.path)
                with archive.open(
                    f"arr_{index}.npy", "w", force_zip64=True
                ) as f:
                    np.lib.format.write_array(f, value, allow_pickle=False)
        file.flush()
        os.fsync(file.fileno())


def _read_weights(path):
    with np.load(path, allow_pickle=False) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def _weights_signature(model):
    return [[list(v.shape), str(v.dtype)] for v in model.weights]


def _read_manifest(directory):
    """Returns the manifest in `directory` as a dict, or `None` if absent."""
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        manifest = e
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise argument_error(
            "directory",
            f"a directory whose {MANIFEST_FILENAME}, if any, was written by "
            f"SnapshotEnsemble (the one found is not: {manifest!r:.200}); "
            "give the callback a directory of its own",
            directory,
        )
    return manifest


@keras.saving.register_keras_serializable(package="keras_regkit")
class SnapshotEnsemble(IterationLearningRateCallback):
    """Cyclic cosine annealing that saves a snapshot at the end of each cycle.

    Over the `T` training iterations of a `fit` run (`epochs` x steps per
    epoch, read from `fit`'s own parameters), the learning rate restarts
    `cycles` times at `max_lr` and decays along a cosine to near `min_lr`.
    When a cycle ends, the model, now in a local minimum, is saved as a
    snapshot in `directory`. After training, `ensemble_model()` (or
    `snapshot_ensemble_model(directory)`) rebuilds the last snapshots as one
    `keras.Model` that averages their outputs, which predicts, saves as
    `.keras` and exports as one SavedModel. Inference is not affected by the
    callback: each snapshot is an ordinary copy of the model's weights.

    With `M = cycles` and `t` the 1-based iteration (`t - 1` is
    `optimizer.iterations` before the step, counted from the start of the
    run), the paper sets

    ```
    lr(t) = max_lr / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)
    ```

    This callback uses `C = floor(T / M)` and lets the last cycle absorb the
    `T - M * C` leftover iterations, so that every cycle, the last included,
    ends at its minimum, the last one exactly when training ends:

    ```
    k(t)   = min(floor((t - 1) / C), M - 1)          # 0-based cycle of t
    L(k)   = C if k < M - 1 else T - (M - 1) * C     # cycle length
    lr(t)  = min_lr + (max_lr - min_lr) / 2
             * (cos(pi * (t - 1 - k(t) * C) / L(k(t))) + 1)
    ```

    When `M` divides `T` this is the paper's formula exactly (with
    `min_lr=0`); otherwise the paper's `ceil` would cut the last cycle short
    at a high learning rate. The authors' reference code (`train.lua`) also
    floors and lets the last cycle absorb the rest, but counts cycles in
    whole epochs and evaluates the cosine at `t` rather than `t - 1` (its
    rate is exactly 0 at a cycle's last step); this callback keeps the
    paper's per-iteration formula. Cycle `k` (1-based) ends after iteration
    `k * C` (`T` for the last one) and its snapshot is taken then.

    The learning rate is driven by `optimizer.iterations`, so a run resumed
    by `keras.callbacks.BackupAndRestore` continues the cycle where it
    stopped. `fit` with `steps_per_execution=N` calls the callback every `N`
    steps: the learning rate is set for the first step of each group and
    held for the group, and a cycle that ends inside a group is snapshotted
    at the group's end (a warning says so at the start of training).

    Files. `directory` belongs to the callback. It holds `model.json` (the
    architecture, `model.to_json()`), one `snapshot-KKK.weights.npz` per
    cycle (the model's weights, in `model.weights` order, without optimizer
    state) and `manifest.json`, which lists the snapshots in order with
    their `cycle`, `iteration` (steps of the run completed when it was
    taken), `cycle_end` (the iteration at which the cycle ended), `epoch`
    (1-based), `learning_rate` and `metrics` (the `val_*` logs when the
    snapshot was taken at an epoch end with validation data). Every file is
    written under a temporary name and renamed, the snapshot before the
    manifest that lists it, so a crash never leaves a corrupt snapshot
    listed. A snapshot whose weights are not all finite is not saved, with
    a warning. Snapshots live on disk: nothing beyond the model's weights
    is held in memory. In a multi-worker run (`MultiWorkerMirroredStrategy`,
    or several JAX processes) only the chief writes to `directory`; the
    other workers, which hold the same weights, write to a private
    temporary directory removed at the end of training.

    Runs. A `fit` run that starts at epoch 0 is a new run: it discards the
    snapshots found in `directory` (with a warning). A run resumed at epoch
    `e` (by `BackupAndRestore`, or `initial_epoch=e`) keeps the snapshots
    taken up to iteration `e * steps` and discards later ones, which belong
    to the interrupted trajectory and are taken again; the result is the
    same set of snapshots as an uninterrupted run. Snapshots of a run with
    other `cycles`, iteration count or weight shapes are discarded too.

    `logs` receive `learning_rate` and `snapshots` (the number of snapshots
    in `directory`) at each batch and epoch end.

    Args:
        cycles: int. Number of cycles `M`, and of snapshots; at least 1 and
            at most the number of training iterations of the `fit` run.
        max_lr: float. Learning rate at the start of each cycle (`alpha_0`
            in the paper). Must be positive.
        directory: str or `os.PathLike`. Where the snapshots and the
            manifest are written; created if needed. Checked to be writable
            at the start of training.
        min_lr: float. Floor the learning rate anneals towards, in
            `[0, max_lr)`. Defaults to `0.0` (the paper).
        verbose: int. 0 is silent; 1 prints the learning rate at each epoch
            end and a line for each snapshot. Defaults to `0`.

    Raises:
        ValueError: at construction for a bad argument; at the start of
            training if `fit` does not know its number of steps, `cycles`
            exceeds the run's iterations, `directory` cannot be written or
            holds a foreign `manifest.json`, the model cannot be serialized
            with `model.to_json()`, or the optimizer's learning rate is a
            schedule.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> import keras
    >>> import keras_regkit
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
    >>> snapshots = keras_regkit.callbacks.SnapshotEnsemble(
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

    def __init__(self, cycles, max_lr, directory, min_lr=0.0, verbose=0):
        super().__init__(verbose=verbose)
        if (
            isinstance(cycles, bool)
            or not isinstance(cycles, numbers.Integral)
            or cycles < 1
        ):
            raise argument_error("cycles", "an int >= 1", cycles)
        self.cycles = int(cycles)
        self.max_lr = check_float_in_range(
            "max_lr", max_lr, 0, math.inf, False, False
        )
        self.min_lr = check_float_in_range(
            "min_lr", min_lr, 0, self.max_lr, True, False
        )
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(
            directory
        ):
            raise argument_error(
                "directory", "a non-empty path (str or os.PathLike)", directory
            )
        self.directory = os.fspath(directory)
        self._files = self.directory  # Where this process writes.
        self._offset = None
        self._entries = []

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
        manifest = _read_manifest(self.directory)
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

        See `keras_regkit.callbacks.snapshot_ensemble_model`, called with
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
        return _annealed_learning_rate(
            iteration - (self._offset or 0),
            self._total_iterations,
            self.cycles,
            self.max_lr,
            self.min_lr,
        )

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
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
        self._check_directory()
        # Under MultiWorkerMirroredStrategy every worker runs this callback
        # with the same weights; only the chief writes to `directory`, the
        # others to a private directory removed at the end of training.
        self._files = (
            self.directory
            if is_chief(self.model)
            else tempfile.mkdtemp(prefix="snapshot_ensemble_worker_")
        )
        try:
            self._architecture = self.model.to_json(sort_keys=True)
        except Exception as e:
            raise ValueError(
                "SnapshotEnsemble saves the model's architecture "
                "(`model.to_json()`) beside the snapshots so the ensemble can "
                f"be rebuilt, but serializing the model failed: {e!r}. Use a "
                "Functional or Sequential model, or give the subclassed model "
                "a `get_config()` and register it with "
                "`@keras.saving.register_keras_serializable()`."
            ) from e
        _read_manifest(self._files)
        self._steps_per_epoch = steps
        self._total_iterations = total
        self._boundaries = _cycle_boundaries(total, self.cycles)
        self._offset = None
        self._entries = []
        self._architecture_written = False
        self._warned_skip = False
        self._warn_if_misaligned(steps)

    def _check_directory(self):
        probe = os.path.join(self.directory, _WRITE_CHECK)
        try:
            os.makedirs(self.directory, exist_ok=True)
            atomic_write_text(probe, "")
            os.remove(probe)
        except OSError as e:
            raise argument_error(
                "directory",
                "a directory this process can create and write files in "
                f"({type(e).__name__}: {e.strerror or e})",
                self.directory,
            ) from e

    def _warn_if_misaligned(self, steps):
        group = int(getattr(self.model, "steps_per_execution", 1) or 1)
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
        self._epoch = epoch
        if self._offset is not None:
            return
        # The run's first epoch is only known here: `BackupAndRestore` sets
        # it in its own `on_train_begin`, which may come after this one's.
        sync_model_state(self.model)
        resumed = epoch * self._steps_per_epoch
        self._offset = read_iterations(self.model.optimizer) - resumed
        self._resume(resumed)

    def _resume(self, resumed):
        manifest = _read_manifest(self._files)
        found = [] if manifest is None else manifest["snapshots"]
        same_run = manifest is not None and (
            manifest.get("cycles"),
            manifest.get("total_iterations"),
            manifest.get("weights"),
        ) == (self.cycles, self._total_iterations, self._signature())
        kept = [e for e in found if same_run and e["iteration"] <= resumed]
        dropped = found[len(kept) :]
        if dropped:
            reason = (
                f"taken after iteration {resumed}, where this run resumes"
                if same_run and resumed
                else "left by an earlier run"
            )
            warnings.warn(
                f"SnapshotEnsemble: discarding {len(dropped)} snapshot(s) in "
                f"{self._files!r} (cycles "
                f"{[e['cycle'] for e in dropped]}) {reason}.",
                stacklevel=2,
            )
        self._entries = kept
        # The manifest stops listing the dropped files before they go.
        self._write_manifest()
        self._remove_unlisted_files()
        self._next_cycle = 1 + sum(b <= resumed for b in self._boundaries)

    def _signature(self):
        return _weights_signature(self.model)

    def _remove_unlisted_files(self):
        listed = {e["file"] for e in self._entries}
        for name in os.listdir(self._files):
            unlisted = _SNAPSHOT_FILE.fullmatch(name) and name not in listed
            if unlisted or _OWN_TEMPORARY.match(name):
                try:
                    os.remove(os.path.join(self._files, name))
                except OSError:
                    pass

    def _write_manifest(self):
        manifest = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "cycles": self.cycles,
            "total_iterations": self._total_iterations,
            "steps_per_epoch": self._steps_per_epoch,
            "cycle_ends": self._boundaries,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "architecture": ARCHITECTURE_FILENAME,
            "weights": self._signature(),
            "snapshots": self._entries,
        }
        atomic_write_text(
            os.path.join(self._files, MANIFEST_FILENAME),
            json.dumps(manifest, indent=1),
        )

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        self._group_begin = (
            batch,
            read_iterations(self.model.optimizer) - self._offset,
        )

    def on_train_batch_end(self, batch, logs=None):
        first_batch, first_iteration = self._group_begin
        # An upper bound on the steps done (a last, short group runs fewer),
        # so the state is read (and synced on JAX) only near a cycle end.
        bound = first_iteration + batch - first_batch + 1
        if (
            self._next_cycle <= self.cycles
            and self._boundaries[self._next_cycle - 1] <= bound
        ):
            sync_model_state(self.model)
            done = read_iterations(self.model.optimizer) - self._offset
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
        super().on_train_batch_end(batch, logs)
        if logs is not None:
            logs["snapshots"] = len(self._entries)

    def _take_snapshot(self, cycle, done):
        if not self._architecture_written:
            atomic_write_text(
                os.path.join(self._files, ARCHITECTURE_FILENAME),
                self._architecture,
            )
            self._architecture_written = True
        filename = _snapshot_filename(cycle)
        try:
            with atomic_path(os.path.join(self._files, filename)) as tmp:
                _write_weights(tmp, self.model.weights)
        except _NonFiniteWeights as e:
            warnings.warn(
                f"SnapshotEnsemble: cycle {cycle} ended at iteration {done} "
                f"with non-finite weights (first in `{e.path}`); no snapshot "
                "is saved for it.",
                stacklevel=2,
            )
            return
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
        self._write_manifest()
        if self.verbose:
            print(
                f"\nSnapshotEnsemble: saved snapshot {len(self._entries)} "
                f"(cycle {cycle}, iteration {done}) to "
                f"{os.path.join(self._files, filename)}."
            )

    def on_epoch_end(self, epoch, logs=None):
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

    def on_train_end(self, logs=None):
        if self._files != self.directory:
            shutil.rmtree(self._files, ignore_errors=True)
            self._files = self.directory
        if self._offset is not None and self._next_cycle <= self.cycles:
            warnings.warn(
                f"SnapshotEnsemble: training stopped before cycle "
                f"{self._next_cycle} of {self.cycles} ended; "
                f"{self.directory!r} holds {len(self._entries)} snapshot(s).",
                stacklevel=2,
            )
        self._offset = None


def _member_inputs(member):
    if isinstance(member, keras.Sequential):
        spec = member.inputs[0]
    else:
        try:
            spec = member.input
        except (AttributeError, ValueError) as e:
            raise ValueError(
                "snapshot_ensemble_model needs a model with defined inputs "
                f"(Functional or Sequential); the snapshots' model "
                f"{type(member).__name__} has none: {e}"
            ) from e
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name),
        spec,
    )


def snapshot_ensemble_model(
    directory,
    last=None,
    average="probabilities",
    from_logits=False,
    name="snapshot_ensemble",
    custom_objects=None,
):
    """Returns one `keras.Model` averaging the last snapshots in `directory`.

    Each of the last `last` snapshots listed in `directory`'s manifest is
    rebuilt from `model.json` and its weights, named `snapshot_K` (`K` its
    cycle), and called on shared inputs; a Keras `Average` layer combines
    their outputs. The result is a plain functional `keras.Model`: it
    predicts in one call, saves as `.keras` and loads without
    `custom_objects`, and `model.export()` writes it as a single SavedModel
    that serves all members in one call. It is returned uncompiled; the
    members are available as `ensemble.get_layer("snapshot_K")`.

    With outputs `f_1..f_m` of the members:

    - `average="probabilities"` (the paper): the ensemble returns
      `mean_i f_i` if the members end in a softmax, or
      `mean_i softmax(f_i)` with `from_logits=True`, for members whose
      last layer has no softmax. The output is probabilities. For a
      regression model this is the plain mean of the outputs.
    - `average="logits"`: for members whose last layer has no softmax, the
      ensemble returns `mean_i f_i`, still logits, so the loss and metrics
      the members were compiled with (`from_logits=True`) fit it unchanged.
      Do not use it with softmax outputs.

    Args:
        directory: str or `os.PathLike`. A `SnapshotEnsemble` directory.
        last: int or `None`. How many of the latest snapshots to average,
            in `[1, number of snapshots]`; `None` takes all. Defaults to
            `None`.
        average: str. `"probabilities"` or `"logits"`, as above. Defaults
            to `"probabilities"`.
        from_logits: bool. Whether the members output logits, with
            `average="probabilities"`: a softmax (last axis) is applied to
            each member before averaging. Defaults to `False`.
        name: str. The ensemble model's name. Defaults to
            `"snapshot_ensemble"`.
        custom_objects: dict or `None`. Passed to
            `keras.models.model_from_json` for unregistered custom layers.
            Defaults to `None`.

    Returns:
        An uncompiled `keras.Model`.

    Raises:
        ValueError: if `directory` holds no snapshot or a foreign manifest,
            `last` is out of range, or `average` is not one of the above.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> import keras
    >>> from keras_regkit.callbacks import SnapshotEnsemble
    >>> from keras_regkit.callbacks import snapshot_ensemble_model
    >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile(keras.optimizers.SGD(), "mse")
    >>> directory = tempfile.mkdtemp()
    >>> _ = model.fit(x, x[:, :3], batch_size=8, epochs=4, verbose=0,
    ...               callbacks=[SnapshotEnsemble(2, 0.05, directory)])
    >>> ensemble = snapshot_ensemble_model(directory, average="logits")
    >>> [layer.name for layer in ensemble.layers[1:3]]
    ['snapshot_1', 'snapshot_2']

    Reference:
    - [Huang et al., 2017](https://arxiv.org/abs/1704.00109)
    """
    directory = os.fspath(directory)
    check_choice("average", average, _AVERAGES)
    manifest = _read_manifest(directory)
    entries = [] if manifest is None else manifest["snapshots"]
    if not entries:
        raise argument_error(
            "directory",
            f"a directory whose {MANIFEST_FILENAME} lists at least one "
            "snapshot (written by `fit` with the SnapshotEnsemble callback)",
            directory,
        )
    count = len(entries)
    if last is None:
        last = count
    elif (
        isinstance(last, bool)
        or not isinstance(last, numbers.Integral)
        or not 1 <= last <= count
    ):
        raise argument_error(
            "last",
            f"None or an int in [1, {count}] ({directory!r} holds {count} "
            "snapshot(s))",
            last,
        )
    architecture_path = os.path.join(directory, manifest["architecture"])
    with open(architecture_path, encoding="utf-8") as f:
        architecture = f.read()
    members = []
    for entry in entries[-int(last) :]:
        member = keras.models.model_from_json(
            architecture, custom_objects=custom_objects
        )
        member.name = f"snapshot_{entry['cycle']}"
        member.set_weights(
            _read_weights(os.path.join(directory, entry["file"]))
        )
        members.append(member)
    inputs = _member_inputs(members[0])
    outputs = []
    for member in members:
        output = member(inputs)
        if average == "probabilities" and from_logits:
            # In float32 whatever the global policy: a float16 softmax and
            # average would round the members' float32 outputs.
            output = keras.tree.map_structure(
                lambda t: keras.layers.Softmax(axis=-1, dtype="float32")(t),
                output,
            )
        outputs.append(output)
    flat = [keras.tree.flatten(output) for output in outputs]
    averaged = [
        keras.layers.Average(dtype="float32")(list(group))
        for group in zip(*flat)
    ]
    outputs = keras.tree.pack_sequence_as(outputs[0], averaged)
    return keras.Model(inputs, outputs, name=name)
