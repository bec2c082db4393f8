"""Ensembles of models, or of saved snapshots, as one `keras.Model`."""

import json
import numbers
import os
import re

import keras

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_path
from keras_regkit.models._combine import OutputAverage
from keras_regkit.models._combine import check_average
from keras_regkit.models._combine import check_weights

__all__ = ["ensemble_model", "snapshot_ensemble_model"]

MANIFEST_FILENAME = "manifest.json"
ARCHITECTURE_FILENAME = "model.json"
LOCK_FILENAME = ".snapshot_ensemble.lock"
FORMAT = "keras_regkit.SnapshotEnsemble"
FORMAT_VERSION = 2
# Version 1 (keras_regkit 0.1) stored `.weights.npz` archives; such a
# directory is still recognized as the callback's own, to be replaced.
SNAPSHOT_FILE = re.compile(r"snapshot-\d{3,}\.weights\.h5")
VERSION_1_SNAPSHOT_FILE = re.compile(r"snapshot-\d{3,}\.weights\.npz")


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


def _model_inputs(member):
    """The input structure of a Functional or Sequential model, or `None`."""
    try:
        if isinstance(member, keras.Sequential):
            return member.inputs[0]
        return member.input
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _spec(tensor, dtype=True):
    if not dtype:
        return tuple(tensor.shape)
    return (tuple(tensor.shape), keras.backend.standardize_dtype(tensor.dtype))


def _describe(structure, dtype=True):
    return keras.tree.map_structure(
        lambda t: f"{tuple(t.shape)}{f' {t.dtype}' if dtype else ''}",
        structure,
    )


def _same_specs(first, other, dtype=True):
    """Same structure and shapes, and dtypes unless `dtype=False` (outputs:
    float16 and float32 members are averaged alike, in float32)."""
    try:
        keras.tree.assert_same_structure(first, other)
    except (ValueError, TypeError):
        return False
    return all(
        _spec(a, dtype) == _spec(b, dtype)
        for a, b in zip(keras.tree.flatten(first), keras.tree.flatten(other))
    )


def _check_models(models):
    if isinstance(models, keras.Model) or not isinstance(models, (list, tuple)):
        raise argument_error(
            "models", "a list or tuple of at least one keras.Model", models
        )
    models = list(models)
    if not models or not all(isinstance(m, keras.Model) for m in models):
        raise argument_error(
            "models", "a list or tuple of at least one keras.Model", models
        )
    seen = {}
    for index, member in enumerate(models):
        first = seen.setdefault(member.name, (index, member))
        if first[1] is not member:
            raise ValueError(
                f"ensemble_model needs members with distinct names (they "
                f"become layers of one model), but models[{first[0]}] and "
                f"models[{index}] are both named {member.name!r}. Rename "
                f"one first, e.g. `models[{index}].name = "
                f"'{member.name}_{index}'`."
            )
    return models


def _shared_inputs(models, inputs):
    if inputs is not None:
        for t in keras.tree.flatten(inputs):
            if not isinstance(t, keras.KerasTensor):
                raise argument_error(
                    "inputs",
                    "None or a structure of `keras.Input` tensors",
                    inputs,
                )
        return inputs
    specs = [_model_inputs(member) for member in models]
    for index, (member, spec) in enumerate(zip(models, specs)):
        if spec is None:
            raise ValueError(
                f"ensemble_model cannot tell the inputs of models[{index}] "
                f"({member.name!r}, a {type(member).__name__}): only "
                "Functional and Sequential models (with an Input) define "
                "them. Pass `inputs=keras.Input(...)` (the structure the "
                "members are called on)."
            )
        if not _same_specs(specs[0], spec):
            raise ValueError(
                f"ensemble_model needs members with the same inputs, but "
                f"models[{index}] ({member.name!r}) takes "
                f"{_describe(spec)} while models[0] "
                f"({models[0].name!r}) takes {_describe(specs[0])}."
            )
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name),
        specs[0],
    )


def ensemble_model(
    models,
    weights=None,
    average="probabilities",
    from_logits=False,
    return_spread=False,
    inputs=None,
    name="ensemble",
):
    """Returns one `keras.Model` averaging the outputs of several models.

    Every member is called on the same (shared) inputs and an
    `OutputAverage` layer combines their outputs `f_1..f_m`, output by
    output, with weights `w_i` normalized to sum to 1 (equal by default):

    - `average="probabilities"`: `sum_i w_i f_i` for members that end in a
      softmax (or regression outputs), or `sum_i w_i softmax(f_i)` with
      `from_logits=True` (the average of Lakshminarayanan et al.).
    - `average="logits"`: `sum_i w_i f_i` of members without a softmax;
      the result is still logits.

    With `return_spread=True` the model returns `[mean, spread]`, where
    `spread = sqrt(sum_i w_i (f_i - mean)^2)` is the members' weighted
    standard deviation, a measure of their disagreement. The average is
    computed in float32 whatever the members' dtype policies.

    Members are any `keras.Model` (Functional, Sequential, or subclassed
    when `inputs` is given) taking the same inputs and returning outputs
    of the same structure and shapes. The result is a plain functional
    model in which the members are nested layers (a member is
    `ensemble.get_layer(member.name)`; names must differ), so it predicts
    in one call, saves as `.keras` (load it after `import keras_regkit`,
    which registers `OutputAverage`) and exports as one SavedModel. It is
    returned uncompiled, sharing the members' weights.

    Args:
        models: list of `keras.Model`. The members, at least one.
        weights: list of floats or `None`. One non-negative weight per
            member, normalized to sum to 1. Defaults to `None` (equal).
        average: str. `"probabilities"` or `"logits"`. Defaults to
            `"probabilities"`.
        from_logits: bool. With `average="probabilities"`, apply a softmax
            (last axis) to each member first. Defaults to `False`.
        return_spread: bool. Also return the spread. Defaults to `False`.
        inputs: `keras.Input` structure or `None`. The ensemble's inputs;
            needed only for subclassed members. Defaults to `None` (those
            of `models[0]`).
        name: str. The ensemble's name. Defaults to `"ensemble"`.

    Returns:
        An uncompiled `keras.Model`.

    Example:

    >>> import numpy as np
    >>> members = [
    ...     keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    ...     for _ in range(3)
    ... ]
    >>> ensemble = ensemble_model(members, from_logits=True)
    >>> x = np.ones((2, 4), "float32")
    >>> probabilities = [keras.ops.softmax(m(x)) for m in members]
    >>> expected = keras.ops.mean(keras.ops.stack(probabilities), axis=0)
    >>> bool(np.allclose(ensemble.predict(x, verbose=0), expected, atol=1e-6))
    True

    Reference:
    - [Lakshminarayanan et al., 2017](https://arxiv.org/abs/1612.01474)
    - [Huang et al., 2017](https://arxiv.org/abs/1704.00109)
    """
    models = _check_models(models)
    weights = check_weights(weights, len(models))
    average, from_logits = check_average(average, from_logits)
    return_spread = check_bool("return_spread", return_spread)
    if not isinstance(name, str) or not name:
        raise argument_error("name", "a non-empty str", name)
    inputs = _shared_inputs(models, inputs)
    outputs = [member(inputs) for member in models]
    for index, (member, output) in enumerate(zip(models, outputs)):
        if not _same_specs(outputs[0], output, dtype=False):
            raise ValueError(
                f"ensemble_model needs members with the same outputs, but "
                f"models[{index}] ({member.name!r}) returns "
                f"{_describe(output, False)} while models[0] "
                f"({models[0].name!r}) returns {_describe(outputs[0], False)}."
            )
    flat = [keras.tree.flatten(output) for output in outputs]
    averaged = []
    for position, group in enumerate(zip(*flat)):
        merge = OutputAverage(
            average=average,
            from_logits=from_logits,
            weights=None if weights is None else list(weights),
            return_spread=return_spread,
            name="average" if len(flat[0]) == 1 else f"average_{position}",
        )
        averaged.append(merge(list(group)))
    if return_spread:
        mean = [pair[0] for pair in averaged]
        spread = [pair[1] for pair in averaged]
        result = [
            keras.tree.pack_sequence_as(outputs[0], mean),
            keras.tree.pack_sequence_as(outputs[0], spread),
        ]
    else:
        result = keras.tree.pack_sequence_as(outputs[0], averaged)
    return keras.Model(inputs, result, name=name)


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
    `snapshot_K` (`K` its cycle), and the members are averaged by
    `ensemble_model` (equal weights), outputs `f_1..f_m`:

    - `average="probabilities"` (the paper): `mean_i f_i` for members that
      end in a softmax (or a regression's plain mean), or
      `mean_i softmax(f_i)` with `from_logits=True`.
    - `average="logits"`: `mean_i f_i` of members without a softmax, still
      logits, so a loss with `from_logits=True` fits it unchanged.

    The result is a plain functional model: it predicts in one call, saves
    as `.keras` (load it after `import keras_regkit`) and exports as one
    SavedModel. It is returned uncompiled; a member is
    `ensemble.get_layer("snapshot_K")`.

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
    average, from_logits = check_average(average, from_logits)
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
    return ensemble_model(
        members, average=average, from_logits=from_logits, name=name
    )
