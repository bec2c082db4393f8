"""Serving cost of an exported snapshot ensemble against one member.

Builds snapshot directories of M members (2 and 5) by training a small MLP
with `SnapshotEnsemble`, exports `snapshot_ensemble_model(directory)` and one
member (the last snapshot) as SavedModels, and times one `serve` call of
each on a batch (256 rows; also 1 row for M=5), with the paired rounds of
`_timing.py`; a second export of the member is the noise row. On JAX, which
cannot serve SavedModels, the same models are timed as `jax.jit`-compiled
inference calls instead. The target is at most M: one call that runs the M
members in a single graph should cost no more than M separate member calls
(it saves M - 1 round trips, and the backend may run the members in
parallel).

Run: python benchmarks/bench_snapshot_ensemble.py [--quick]
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import layer_runner
from _backend import tensor
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.ensembles import snapshot_ensemble_model

__all__ = ["run"]

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


def _server(model, path, x):
    """One blocking inference call of `model` on `x`: a SavedModel's
    `serve` on TensorFlow, a `jax.jit` call on JAX."""
    if keras.backend.backend() != "tensorflow":
        return layer_runner(model, x, False, True)
    import tensorflow as tf

    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # Kept: `serve` uses its variables.
    return lambda: loaded.serve(x).numpy()


def _measure(members, batches, quick, workdir):
    directory = os.path.join(workdir, f"snapshots_{members}")
    _train_snapshots(directory, members)
    model = snapshot_ensemble_model(directory)
    member = model.get_layer(f"snapshot_{members}")
    rows = []
    for batch in batches:
        x = tensor(
            np.random.default_rng(1)
            .normal(size=(batch, FEATURES))
            .astype("float32")
        )
        path = os.path.join(workdir, f"{members}_{batch}")
        measurement = paired_ratios(
            {
                "member": _server(member, path + "_member", x),
                "noise": _server(member, path + "_member_again", x),
                "ensemble": _server(model, path + "_ensemble", x),
            },
            "member",
            "noise",
            quick=quick,
        )
        rows += rows_from(
            measurement,
            [
                (
                    "ensemble",
                    f"SnapshotEnsemble, M={members}, one inference call",
                    f"<= {members:.2f}x",
                    "",
                )
            ],
            "one member",
            f"batch {batch}, {keras.backend.backend()}",
        )
    return rows


def run(quick=False):
    """Returns rows per ensemble size: inference latency ratio vs a member."""
    with tempfile.TemporaryDirectory() as workdir:
        return _measure(2, (BATCH,), quick, workdir) + _measure(
            5, (1, BATCH), quick, workdir
        )


if __name__ == "__main__":
    main(run)
