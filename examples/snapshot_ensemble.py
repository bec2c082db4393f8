"""Snapshot Ensembles on MNIST-1D: several models for the price of one.

Trains a small 1-D CNN (dropout, weight decay) on MNIST-1D (generated
offline by the `mnist1d` package) with
`keras_regkit.callbacks.SnapshotEnsemble`: the learning rate
follows `CYCLES` cosine cycles and a snapshot is saved at the end of each.
For 3 seeds it prints, in one markdown table, the test accuracy of each
snapshot, of the ensembles of the last 2, 3 and all snapshots, and of the
same architecture trained for the same number of epochs with a standard
step schedule (learning rate divided by 10 at 50% and 75% of training, the
paper's baseline), then the mean and standard deviation over the seeds.

It exports the ensemble of all snapshots of the last seed to
`saved_models/snapshot_ensemble` as one SavedModel, reloads it with
`tf.saved_model.load` and exits non-zero unless serving equals
`model.predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/snapshot_ensemble.py
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import export_and_check
from _common import load_mnist1d
from _common import print_seed_table

from keras_regkit.callbacks import SnapshotEnsemble

SEEDS = (0, 1, 2)
EPOCHS = 100
BATCH_SIZE = 128
CYCLES = 5
MAX_LR = 0.05
WEIGHT_DECAY = 5e-4


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


def main():
    start = time.time()
    data = load_mnist1d()
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
    per_seed = {
        row: [results[s][row] for s in SEEDS] for row in results[SEEDS[0]]
    }
    print_seed_table("test accuracy", per_seed, SEEDS, digits=3)
    mean = {row: np.mean(values) for row, values in per_seed.items()}
    last3 = mean["ensemble of last 3"]
    print(
        f"\nEnsemble of last 3 vs best single snapshot: "
        f"{last3 - mean['best single snapshot']:+.3f}; vs standard "
        f"schedule: {last3 - mean['standard schedule (step decay)']:+.3f}"
    )
    members = [x for x in ensemble.layers if x.name.startswith("snapshot_")]
    print(
        f"\nThe ensemble of {len(members)} snapshots (last seed), exported as "
        "one SavedModel:"
    )
    if not export_and_check(ensemble, data[2], "snapshot_ensemble"):
        sys.exit(1)
    print(f"Total time {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
