"""Snapshot Ensembles on MNIST-1D: several models for the price of one.

Trains a small 1-D CNN (dropout, weight decay) on MNIST-1D (generated
offline by the `mnist1d` package) with
`keras_regkit.callbacks.SnapshotEnsemble`: the learning rate
follows `CYCLES` cosine cycles and a snapshot is saved at the end of each.
For 3 seeds it prints, in one markdown table, the test accuracy of each
snapshot, of the ensembles of the last 2, 3 and all snapshots, and of the
same architecture trained for the same number of epochs with a standard
step schedule (learning rate divided by 10 at 50% and 75% of training, the
paper's baseline), then the mean over the seeds.

It exports the ensemble of all snapshots of the last seed to
`saved_models/snapshot_ensemble` as one SavedModel, reloads it with
`tf.saved_model.load` and exits non-zero unless serving equals
`model.predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/snapshot_ensemble.py
"""

import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
from mnist1d.data import get_dataset_args
from mnist1d.data import make_dataset

from keras_regkit.callbacks import SnapshotEnsemble

SEEDS = (0, 1, 2)
EPOCHS = 100
BATCH_SIZE = 128
CYCLES = 5
MAX_LR = 0.05
WEIGHT_DECAY = 5e-4
EXPORT_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    os.pardir,
    "saved_models",
    "snapshot_ensemble",
)


def load_data():
    data = make_dataset(get_dataset_args())
    return (
        data["x"].astype("float32"),
        data["y"].astype("int32"),
        data["x_test"].astype("float32"),
        data["y_test"].astype("int32"),
    )


def build_model():
    """A small 1-D CNN with dropout that outputs logits (no softmax)."""
    return keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Reshape((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", activation="relu"
            ),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", activation="relu"
            ),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10),
        ]
    )


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=WEIGHT_DECAY,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def run_snapshots(seed, data, directory):
    """Returns {row: accuracy} and the ensemble of all snapshots."""
    x, y, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model()
    compile_model(model, MAX_LR)
    callback = SnapshotEnsemble(CYCLES, MAX_LR, directory)
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[callback],
    )
    rows = {}
    ensemble = callback.ensemble_model(from_logits=True)
    for entry in callback.snapshots:
        member = ensemble.get_layer(f"snapshot_{entry['cycle']}")
        rows[f"snapshot {entry['cycle']} (epoch {entry['epoch']})"] = accuracy(
            member, x_test, y_test
        )
    rows["best single snapshot"] = max(rows.values())
    for last in (2, 3):
        rows[f"ensemble of last {last}"] = accuracy(
            callback.ensemble_model(last=last, from_logits=True),
            x_test,
            y_test,
        )
    rows[f"ensemble of all {len(callback.snapshots)}"] = accuracy(
        ensemble, x_test, y_test
    )
    return rows, ensemble


def run_standard(seed, data):
    x, y, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model()
    steps = EPOCHS * int(np.ceil(len(x) / BATCH_SIZE))
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [steps // 2, 3 * steps // 4], [MAX_LR, MAX_LR / 10, MAX_LR / 100]
    )
    compile_model(model, schedule)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
    return accuracy(model, x_test, y_test)


def print_table(results):
    rows = list(results[SEEDS[0]])
    header = ["test accuracy"] + [f"seed {s}" for s in SEEDS] + ["mean"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(SEEDS) + 1)) + "|")
    for row in rows:
        values = [results[s][row] for s in SEEDS]
        cells = [f"{v:.3f}" for v in values] + [f"{np.mean(values):.3f}"]
        print(f"| {row} | " + " | ".join(cells) + " |")


def export_and_check(ensemble, x_test):
    import tensorflow as tf

    shutil.rmtree(EXPORT_PATH, ignore_errors=True)
    ensemble.export(EXPORT_PATH, verbose=False)
    reloaded = tf.saved_model.load(EXPORT_PATH)
    served = reloaded.serve(tf.constant(x_test)).numpy()
    predicted = ensemble.predict(x_test, verbose=0)
    error = float(np.max(np.abs(served - predicted)))
    members = [x for x in ensemble.layers if x.name.startswith("snapshot_")]
    print(
        f"\nExported the ensemble of {len(members)} snapshots as one "
        f"SavedModel to {os.path.relpath(EXPORT_PATH)}; "
        f"max |serve - predict| = {error:.2e}"
    )
    return error <= 1e-5


def main():
    start = time.time()
    data = load_data()
    results = {}
    for seed in SEEDS:
        with tempfile.TemporaryDirectory() as directory:
            rows, ensemble = run_snapshots(seed, data, directory)
        rows["standard schedule (step decay)"] = run_standard(seed, data)
        results[seed] = rows
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    # Snapshot rows are named with their epoch, which is the same per seed.
    print(
        f"\nMNIST-1D, {EPOCHS} epochs, {CYCLES} cycles, max_lr={MAX_LR}, "
        "SGD (Nesterov momentum 0.9, weight decay "
        f"{WEIGHT_DECAY}), batch size "
        f"{BATCH_SIZE}; test accuracy on 1000 examples.\n"
    )
    print_table(results)
    mean = {
        row: np.mean([results[s][row] for s in SEEDS])
        for row in results[SEEDS[0]]
    }
    last3 = mean["ensemble of last 3"]
    print(
        f"\nEnsemble of last 3 vs best single snapshot: "
        f"{last3 - mean['best single snapshot']:+.3f}; vs standard "
        f"schedule: {last3 - mean['standard schedule (step decay)']:+.3f}"
    )
    if not export_and_check(ensemble, data[2]):
        print("FAILED: the SavedModel does not serve what predict returns.")
        sys.exit(1)
    print(f"Total time {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
