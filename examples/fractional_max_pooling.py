"""Fractional max pooling on the scikit-learn digits, with test-time averaging.

Trains a small CNN with two `FractionalMaxPooling2D(2 ** 0.5)` layers
(8x8 -> 5x5 -> 3x3, fresh pseudo-random overlapping regions at every
training step, as in Graham's paper) on the 8x8 digits of
`sklearn.datasets.load_digits` (offline), for 3 seeds. For each it prints the
test accuracy and log-loss of one deterministic pass (`model.predict`) and of
the paper's test-time averaging over 12 poolings
(`keras_regkit.layers.FractionalPoolingAverage`, one batched graph), then the
mean over the seeds; it exits non-zero unless averaging is at least as
accurate as the single pass on average.

It exports the averaged model of the last seed to
`saved_models/fractional_max_pooling`, reloads it with `tf.saved_model.load`
and exits non-zero unless serving equals `predict`.

Run from the repository root (about 1-2 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/fractional_max_pooling.py
"""

import os
import sys
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from keras_regkit._utils import atomic_path
from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage

SEEDS = (0, 1, 2)
EPOCHS = 30
BATCH_SIZE = 32
PASSES = 12
EXPORT_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    os.pardir,
    "saved_models",
    "fractional_max_pooling",
)


def load_data():
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def build_model(seed):
    """Two [Conv, Conv, FMP(1.414)] blocks (8 -> 5 -> 3), conv, softmax."""
    layers = [keras.Input((8, 8, 1))]
    for i, filters in enumerate((32, 64)):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(filters, 2, padding="same", activation="relu"),
            FractionalMaxPooling2D(2**0.5, seed=seed * 10 + i),
        ]
    layers += [
        keras.layers.Conv2D(128, 2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3, seed=seed),
        keras.layers.Dense(10, activation="softmax"),
    ]
    return keras.Sequential(layers)


def scores(probabilities, y):
    accuracy = float(np.mean(np.argmax(probabilities, -1) == y))
    picked = probabilities[np.arange(len(y)), y]
    log_loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return accuracy, log_loss


def run(seed, data):
    x, x_test, y, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model(seed)
    model.compile(
        keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
    averaged = FractionalPoolingAverage(model, num_passes=PASSES)
    single = scores(model.predict(x_test, verbose=0), y_test)
    multi = scores(averaged.predict(x_test, verbose=0), y_test)
    rows = {"1 deterministic pass": single, f"{PASSES} passes averaged": multi}
    return rows, averaged


def print_table(results):
    rows = list(results[SEEDS[0]])
    header = ["digits test set (450)"] + [f"seed {s}" for s in SEEDS] + ["mean"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(SEEDS) + 1)) + "|")
    for metric, index in (("accuracy", 0), ("log-loss", 1)):
        for row in rows:
            values = [results[s][row][index] for s in SEEDS]
            cells = [f"{v:.4f}" for v in values] + [f"{np.mean(values):.4f}"]
            print(f"| {metric}, {row} | " + " | ".join(cells) + " |")


def export_and_check(model, x_test):
    import tensorflow as tf

    with atomic_path(EXPORT_PATH) as tmp:
        model.export(tmp, verbose=False)
    reloaded = tf.saved_model.load(EXPORT_PATH)
    served = reloaded.serve(tf.constant(x_test)).numpy()
    predicted = model.predict(x_test, verbose=0)
    error = float(np.max(np.abs(served - predicted)))
    print(
        f"\nExported the {PASSES}-pass averaged model (one graph) to "
        f"{os.path.relpath(EXPORT_PATH)}; max |serve - predict| = {error:.2e}"
    )
    return error <= 1e-5


def main():
    start = time.time()
    data = load_data()
    results = {}
    for seed in SEEDS:
        results[seed], averaged = run(seed, data)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    print(
        "\nsklearn digits (8x8), 2 x [Conv2D, Conv2D, FractionalMaxPooling2D"
        f"(1.414)], Adam, {EPOCHS} epochs, batch {BATCH_SIZE}.\n"
    )
    print_table(results)
    mean = {
        row: np.mean([results[s][row][0] for s in SEEDS])
        for row in results[SEEDS[0]]
    }
    single, multi = mean.values()
    holds = multi >= single
    verdict = "at least as accurate" if holds else "WORSE"
    print(
        f"\nMean accuracy, {PASSES} passes averaged vs 1 pass: "
        f"{multi - single:+.4f} ({verdict})"
    )
    served_ok = export_and_check(averaged, data[1])
    if not (holds and served_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
