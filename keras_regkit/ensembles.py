"""Ensembles of saved snapshots as one `keras.Model`."""

import json
import numbers
import os
import re

import keras

from keras_regkit._utils import argument_error
from keras_regkit._utils import check_choice
from keras_regkit._utils import check_path

__all__ = ["snapshot_ensemble_model"]

MANIFEST_FILENAME = "manifest.json"
ARCHITECTURE_FILENAME = "model.json"
LOCK_FILENAME = ".snapshot_ensemble.lock"
FORMAT = "keras_regkit.SnapshotEnsemble"
FORMAT_VERSION = 2
# Version 1 (keras_regkit 0.1) stored `.weights.npz` archives; such a
# directory is still recognized as the callback's own, to be replaced.
SNAPSHOT_FILE = re.compile(r"snapshot-\d{3,}\.weights\.h5")
VERSION_1_SNAPSHOT_FILE = re.compile(r"snapshot-\d{3,}\.weights\.npz")
_AVERAGES = ("probabilities", "logits")


def snapshot_filename(cycle):
    return f"snapshot-{cycle:03d}.weights.h5"


def _crafted(directory, what):
    return ValueError(
        f"The {MANIFEST_FILENAME} in {directory!r} {what}. SnapshotEnsemble "
        "only ever lists files of its own directory, by their plain names, "
        "so this manifest was edited or crafted; it is not followed. Remove "
        "the directory or give the callback a new one."
    )


def _check_name(directory, name, pattern):
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise _crafted(
            directory,
            f"lists {name!r}, which is not a file name SnapshotEnsemble "
            "writes (a path outside the directory, or another file)",
        )
    return name


def read_manifest(directory):
    """Returns the SnapshotEnsemble manifest in `directory`, or `None`.

    Raises a `ValueError` if `directory` holds a `manifest.json` that
    SnapshotEnsemble did not write, or one that names a path outside
    `directory` (`../`, an absolute path) or a file it does not write.
    """
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        manifest = e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise argument_error(
            "directory",
            f"a directory whose {MANIFEST_FILENAME}, if any, was written by "
            f"SnapshotEnsemble (the one found is not: {manifest!r:.200}); "
            "give the callback a directory of its own",
            directory,
        )
    version = manifest.get("version")
    pattern = SNAPSHOT_FILE if version != 1 else VERSION_1_SNAPSHOT_FILE
    if manifest.get("architecture") != ARCHITECTURE_FILENAME:
        raise _crafted(
            directory,
            f"names the architecture {manifest.get('architecture')!r} "
            f"instead of {ARCHITECTURE_FILENAME!r}",
        )
    entries = manifest.get("snapshots")
    pending = manifest.get("pending", [])
    if not isinstance(entries, list) or not isinstance(pending, list):
        raise _crafted(directory, "has no list of snapshots")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(
            entry.get("iteration"), int
        ):
            raise _crafted(directory, f"has a malformed entry {entry!r:.200}")
        _check_name(directory, entry.get("file"), pattern)
    for name in pending:
        _check_name(directory, name, pattern)
    return manifest


def inside(directory, name):
    """`directory/name`, refused if a symlink leads it outside `directory`."""
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(directory):
        raise _crafted(
            directory,
            f"lists {name!r}, which is a link to {real!r} outside the "
            "directory",
        )
    return path


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


def _rebuild(architecture, path, custom_objects):
    try:
        return keras.models.model_from_json(
            architecture, custom_objects=custom_objects
        )
    except Exception as e:
        # Keras puts the cause at the end of a long message.
        message = str(e)
        cause = message.rpartition("Exception encountered: ")[2]
        cause = cause.partition(" Full object config")[0].strip()
        raise ValueError(
            f"snapshot_ensemble_model could not rebuild the model saved in "
            f"{path!r}: {cause[:500]} If the model uses custom layers, import "
            "the module that registers them before calling it (`import "
            "keras_regkit` registers keras_regkit's layers and schedules), "
            "or pass them in `custom_objects=`."
        ) from e


def snapshot_ensemble_model(
    directory,
    last=None,
    average="probabilities",
    from_logits=False,
    name="snapshot_ensemble",
    custom_objects=None,
):
    """Returns one `keras.Model` averaging the last snapshots in `directory`.

    Each of the last `last` snapshots that
    `keras_regkit.callbacks.SnapshotEnsemble` listed in `directory` is
    rebuilt from `model.json`, given its weights with `load_weights`, named
    `snapshot_K` (`K` its cycle) and called on shared inputs; a Keras
    `Average` layer combines the outputs `f_1..f_m`:

    - `average="probabilities"` (the paper): `mean_i f_i` for members that
      end in a softmax (or a regression's plain mean), or
      `mean_i softmax(f_i)` with `from_logits=True`.
    - `average="logits"`: `mean_i f_i` of members without a softmax, still
      logits, so a loss with `from_logits=True` fits it unchanged.

    The result is a plain functional model: it predicts in one call, saves
    as `.keras` (loading it needs `import keras_regkit` only if the members
    use keras_regkit layers) and exports as one SavedModel. It is returned
    uncompiled; a member is `ensemble.get_layer("snapshot_K")`.

    Args:
        directory: str or `os.PathLike`. A `SnapshotEnsemble` directory.
        last: int or `None`. How many of the latest snapshots to average,
            in `[1, number of snapshots]`; `None` takes all. Defaults to
            `None`.
        average: str. `"probabilities"` or `"logits"`. Defaults to
            `"probabilities"`.
        from_logits: bool. With `average="probabilities"`, apply a softmax
            (last axis) to each member first. Defaults to `False`.
        name: str. The ensemble's name. Defaults to `"snapshot_ensemble"`.
        custom_objects: dict or `None`. For unregistered custom layers.
            Defaults to `None`.

    Returns:
        An uncompiled `keras.Model`.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> from keras_regkit.callbacks import SnapshotEnsemble
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
    directory = check_path("directory", directory)
    check_choice("average", average, _AVERAGES)
    if not isinstance(from_logits, bool):
        raise argument_error("from_logits", "a bool", from_logits)
    if not isinstance(name, str) or not name:
        raise argument_error("name", "a non-empty str", name)
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise argument_error("custom_objects", "a dict or None", custom_objects)
    manifest = read_manifest(directory)
    entries = [] if manifest is None else manifest["snapshots"]
    if not entries:
        raise argument_error(
            "directory",
            f"a directory whose {MANIFEST_FILENAME} lists at least one "
            "snapshot (written by `fit` with the SnapshotEnsemble callback)",
            directory,
        )
    if manifest.get("version") == 1:
        raise argument_error(
            "directory",
            "a directory written by this version of SnapshotEnsemble (this "
            "one holds `.weights.npz` snapshots of keras_regkit 0.1; train "
            "again to write Keras `.weights.h5` snapshots)",
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
    architecture_path = inside(directory, ARCHITECTURE_FILENAME)
    with open(architecture_path, encoding="utf-8") as f:
        architecture = f.read()
    members = []
    for entry in entries[-int(last) :]:
        member = _rebuild(architecture, architecture_path, custom_objects)
        member.name = f"snapshot_{entry['cycle']}"
        member.load_weights(inside(directory, entry["file"]))
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
