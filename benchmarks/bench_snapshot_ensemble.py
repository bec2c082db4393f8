"""Serving cost of an exported snapshot ensemble against one member.

Builds snapshot directories of M members (2 and 5) by training a small MLP
with `SnapshotEnsemble`, exports `snapshot_ensemble_model(directory)` and one
member (the last snapshot) as SavedModels, and times one `serve` call of
each on a batch (256 rows; also 1 row for M=5), alternating the two in every
repeat after a warm-up. The ratio is median(ensemble) / median(member); the
target is at most M: one call that runs the M members in a single graph
should cost no more than M separate member calls (it saves M - 1 round
trips, and TensorFlow may run the members in parallel).

Run: `TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/bench_snapshot_ensemble.py`
"""

import os
import statistics
import tempfile
import time

import keras
import numpy as np

from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.ensembles import snapshot_ensemble_model

FEATURES = 64
CLASSES = 10
BATCH = 256


def _train_snapshots(directory, members):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=256)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(momentum=0.9), "sparse_categorical_crossentropy"
    )
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=members,
        verbose=0,
        callbacks=[SnapshotEnsemble(members, 0.05, directory)],
    )


def _export(model, path):
    import tensorflow as tf

    model.export(path, verbose=False)
    return tf.saved_model.load(path)


def _time_call(serve, x):
    start = time.perf_counter()
    serve(x).numpy()
    return time.perf_counter() - start


def _median_ms(first, second, x, repeats):
    """Medians (ms) of `first(x)` and `second(x)`, alternated after warm-up."""
    for _ in range(10):
        _time_call(first, x)
        _time_call(second, x)
    times = ([], [])
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            times[k].append(_time_call((first, second)[k], x))
    return tuple(1e3 * statistics.median(t) for t in times)


def _measure(members, batches, repeats, workdir):
    import tensorflow as tf

    directory = os.path.join(workdir, f"snapshots_{members}")
    _train_snapshots(directory, members)
    model = snapshot_ensemble_model(directory)
    ensemble = _export(model, os.path.join(workdir, f"ensemble_{members}"))
    single = _export(
        model.get_layer(f"snapshot_{members}"),
        os.path.join(workdir, f"member_{members}"),
    )
    rows = []
    for batch in batches:
        x = tf.constant(
            np.random.default_rng(1).normal(size=(batch, FEATURES)),
            dtype="float32",
        )
        ensemble_ms, single_ms = _median_ms(
            ensemble.serve, single.serve, x, repeats
        )
        rows.append(
            {
                "technique": (
                    f"SnapshotEnsemble SavedModel, M={members}, one serve "
                    f"call, batch {batch} ({ensemble_ms:.3f} ms)"
                ),
                "baseline": f"one member's SavedModel ({single_ms:.3f} ms)",
                "ratio": ensemble_ms / single_ms,
                "target": f"<= {members:.2f}x",
            }
        )
    return rows


def run(quick=False):
    """Returns one row per ensemble size: serving latency ratio vs a member."""
    repeats = 30 if quick else 200
    with tempfile.TemporaryDirectory() as workdir:
        return _measure(2, (BATCH,), repeats, workdir) + _measure(
            5, (1, BATCH), repeats, workdir
        )


if __name__ == "__main__":
    rows = run()
    print("| technique | baseline | ratio | target |")
    print("|---|---|---:|---|")
    for row in rows:
        print(
            f"| {row['technique']} | {row['baseline']} | "
            f"{row['ratio']:.2f}x | {row['target']} |"
        )
