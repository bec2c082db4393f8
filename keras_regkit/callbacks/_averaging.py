"""The arithmetic and the state files of `PolyakAveraging`.

The average of each variable is kept as a float32 accumulator `T` and one
shared float32 `scale`, with `average = T / scale`. Folding in an iterate
`w` with weight `r` (`avg' = (1 - r) avg + r w`) is `scale' = scale / (1 - r)`
and `T' = T + r * scale' * w`: one multiply and one add per element, where
the textbook update needs three operations. For the uniform average
`scale = n` and `T` is the plain running sum. An EMA's scale grows as
`d ** -n`; whenever it passes 2 ** 64 it is folded back into `T`
(`T /= scale`, `scale = 1`), once every `44 / (1 - d)` iterates. The first
iterate sets `T = w` and `scale = 1` (`T` is zero before it).
"""

import errno
import functools
import json
import os
import tempfile

import keras
import numpy as np
from keras import ops

from keras_regkit._training import compiled
from keras_regkit._utils import fsync_directory

SCALE_LIMIT = 2.0**64
# Variables with fewer elements share one flat accumulator, so that the
# update runs a few operations for all of them instead of a few each: where
# the backend launches one kernel per operation, their cost is the launch.
GROUP_BELOW = 2**14

STATE_FORMAT = "keras_regkit.PolyakAveraging/1"
STATE_FILES = ("polyak_averaging-0.npz", "polyak_averaging-1.npz")


def size_of(shape):
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def layout(shapes):
    """Which variables share which accumulator: a tuple of index tuples."""
    sizes = [size_of(s) for s in shapes]
    small = tuple(i for i, s in enumerate(sizes) if s < GROUP_BELOW)
    if len(small) < 2:
        small = ()
    slots = [(i,) for i in range(len(shapes)) if i not in small]
    if small:
        slots.append(small)
    return tuple(slots)


def accumulator_shapes(slots, shapes):
    return [
        tuple(shapes[slot[0]])
        if len(slot) == 1
        else (sum(size_of(shapes[i]) for i in slot),)
        for slot in slots
    ]


def _coefficients(decay, warmup, count, scale):
    """`(c, scale')`: the multiplier of `w` (`None` for 1), the new scale."""
    n = ops.cast(count, "float32")
    if decay is None:
        return None, n + 1.0
    rate = 1.0 - decay
    if warmup:
        # 1 - min(d, (1 + n) / (10 + n)), written to keep float32 exact.
        rate = ops.maximum(rate, 9.0 / (10.0 + n))
        new_scale = scale / (1.0 - rate)
    else:
        new_scale = scale * (1.0 / decay)
    first = ops.equal(n, 0.0)
    new_scale = ops.where(first, 1.0, new_scale)
    return ops.where(first, 1.0, rate * new_scale), new_scale


def _weights_by_slot(slots, weights):
    return [
        ops.cast(weights[slot[0]], "float32")
        if len(slot) == 1
        else ops.concatenate(
            [ops.reshape(ops.cast(weights[i], "float32"), (-1,)) for i in slot]
        )
        for slot in slots
    ]


def _all_finite(values):
    # Not finite exactly when some weight is NaN or infinite (barring a
    # float32 overflow of the sum, i.e. weights near 1e38).
    return ops.isfinite(ops.sum(ops.stack([ops.sum(v) for v in values])))


def _fold(decay, warmup, slots, accumulators, scale, count, skipped, weights):
    """Pure fold: returns the new `(accumulators, scale, count, skipped)`."""
    values = _weights_by_slot(slots, weights)
    accumulators = [ops.convert_to_tensor(t) for t in accumulators]
    scale = ops.convert_to_tensor(scale)
    finite = _all_finite(values)
    coefficient, new_scale = _coefficients(decay, warmup, count, scale)
    overflow = ops.logical_and(finite, new_scale > SCALE_LIMIT)
    new = []
    for t, w in zip(accumulators, values):
        added = t + (w if coefficient is None else coefficient * w)
        if decay is not None:
            added = ops.where(overflow, added / new_scale, added)
        new.append(ops.where(finite, added, t))
    new_scale = ops.where(overflow, 1.0, ops.where(finite, new_scale, scale))
    grew = ops.cast(finite, "int32")
    return new, new_scale, count + grew, skipped + (1 - grew)


def _fold_in_place(
    decay, warmup, slots, accumulators, scale, count, skipped, weights
):
    """The same fold, assigning the TensorFlow variables it is given.

    In place, because on TensorFlow assigning a returned tensor to a
    variable is one more copy of every accumulator per step. Written with
    selections rather than branches, which XLA fuses into one pass over
    each accumulator.
    """
    values = _weights_by_slot(slots, weights)
    finite = _all_finite(values)
    coefficient, new_scale = _coefficients(
        decay, warmup, count, ops.convert_to_tensor(scale)
    )
    overflow = ops.logical_and(finite, new_scale > SCALE_LIMIT)
    for t, w in zip(accumulators, values):
        # A skipped iterate adds exactly 0 (not NaN * 0).
        w = ops.where(finite, w, 0.0)
        added = t + (w if coefficient is None else coefficient * w)
        if decay is not None:
            added = ops.where(overflow, added / new_scale, added)
        t.assign(added)
    scale.assign(ops.where(overflow, 1.0, ops.where(finite, new_scale, scale)))
    grew = ops.cast(finite, "int32")
    count.assign_add(grew)
    skipped.assign_add(1 - grew)
    return grew


def _fold_in_place_branching(
    decay, warmup, slots, accumulators, scale, count, skipped, weights
):
    """`_fold_in_place` with branches: fewer passes where XLA is not used."""
    values = _weights_by_slot(slots, weights)
    finite = _all_finite(values)
    coefficient, new_scale = _coefficients(
        decay, warmup, count, ops.convert_to_tensor(scale)
    )

    def rescale():
        for t in accumulators:
            t.assign(t / new_scale)
        scale.assign(1.0)

    def keep():
        scale.assign(new_scale)

    def fold_in():
        for t, w in zip(accumulators, values):
            t.assign_add(w if coefficient is None else coefficient * w)
        count.assign_add(1)
        if decay is None:
            keep()
        else:
            ops.cond(new_scale > SCALE_LIMIT, rescale, keep)

    def skip():
        skipped.assign_add(1)

    ops.cond(finite, fold_in, skip)
    return ops.cast(finite, "int32")


@functools.lru_cache(maxsize=16)
def fold_function(decay, warmup, slots, xla=False):
    """The compiled fold for one configuration (shared by callbacks).

    Called as `fn(accumulators, scale, count, skipped, weights)` with the
    state's current values, it folds the iterate `weights` in (or, if some
    weight is not finite, counts it in `skipped`). On TensorFlow it is given
    the variables themselves and assigns them in place (`xla`: compiled
    with XLA, which fuses the update into one pass per accumulator); on the
    other backends it returns the new `(accumulators, scale, count,
    skipped)` for the caller to assign, and on JAX it takes over the buffers
    of the accumulators it is given (read them no more after the call).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # The TensorFlow backend has imported it.

        body = _fold_in_place if xla else _fold_in_place_branching
        return tf.function(
            functools.partial(body, decay, warmup, slots),
            jit_compile=xla,
            reduce_retracing=True,
        )
    # The accumulators' buffers are reused for the new ones (the caller
    # assigns them at once): a fold then writes each accumulator in place
    # instead of allocating it again, about 40% of its time on a CPU.
    return compiled(
        functools.partial(_fold, decay, warmup, slots), donate_argnums=(0,)
    )


def average_values(slots, accumulators, scale, shapes):
    """The averages as float32 tensors, one per variable, in source order."""
    scale = ops.convert_to_tensor(scale)
    values = [None] * len(shapes)
    for slot, t in zip(slots, accumulators):
        average = ops.convert_to_tensor(t) / scale
        if len(slot) == 1:
            values[slot[0]] = average
            continue
        begin = 0
        for i in slot:
            end = begin + size_of(shapes[i])
            values[i] = ops.reshape(average[begin:end], tuple(shapes[i]))
            begin = end
    return values


# State files ---------------------------------------------------------------


def signature(config, paths, shapes):
    """What a state file must match to be restored: config and variables."""
    return json.dumps(
        {
            "config": config,
            "variables": [
                [p, [int(d) for d in s]] for p, s in zip(paths, shapes)
            ],
        },
        sort_keys=True,
    )


def _load(path, arrays=True):
    """The arrays of a state file (or `{}` with `arrays=False`), or None.

    None if `path` is not a state file written by `PolyakAveraging`.
    """
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if (
                "format" not in data.files
                or str(data["format"]) != STATE_FORMAT
            ):
                return None
            return {key: data[key] for key in data.files} if arrays else {}
    except (OSError, ValueError, EOFError):
        return None


def read_states(directory):
    """The state files in `directory`, as dicts of arrays.

    Raises a `ValueError` if a file under one of our names was not written
    by `PolyakAveraging` (it is neither read nor, later, overwritten).
    """
    states = []
    for name in STATE_FILES:
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            continue
        state = _load(path)
        if state is None:
            raise _foreign(path)
        states.append(state)
    return states


def _foreign(path):
    return ValueError(
        f"PolyakAveraging: {path} exists and is not a state file written by "
        "PolyakAveraging; it is left untouched. Pass a `backup_dir` that "
        "holds no such file, or remove it."
    )


def write_state(directory, name, arrays):
    """Writes `arrays` to `directory/name` atomically.

    The bytes go to a new temporary file opened exclusively beside the
    target (no other process can hold or redirect it), are flushed to disk,
    and the file is renamed over the target, so a reader sees either the
    previous state or the new one. A target that is not a state file of
    ours is refused with a `ValueError`.
    """
    path = os.path.join(directory, name)
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.lexists(path) and _load(path, arrays=False) is None:
            raise _foreign(path)
        fd, tmp = tempfile.mkstemp(
            prefix=".tmp-polyak_averaging-", suffix=".npz", dir=directory
        )
    except OSError as error:
        raise _os_error(error, directory) from error
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, format=np.array(STATE_FORMAT), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _os_error(error, path) from error
        raise
    fsync_directory(directory)
    return path


def remove_states(directory):
    """Removes the state files of ours in `directory` (nothing else)."""
    for name in STATE_FILES:
        path = os.path.join(directory, name)
        if _load(path, arrays=False) is not None:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def _os_error(error, path):
    code = error.errno if error.errno is not None else errno.EIO
    return OSError(
        code,
        f"PolyakAveraging could not write its state to {path}: "
        f"{error.strerror or error}",
    )
