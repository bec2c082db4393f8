"""Fractional max pooling on the scikit-learn digits, with test-time averaging.

Trains a small CNN with two `FractionalMaxPooling2D(2 ** 0.5)` layers
(8x8 -> 5x5 -> 3x3, fresh pseudo-random overlapping regions at every
training step, as in Graham's paper) on the 8x8 digits of
`sklearn.datasets.load_digits` (offline), for 3 seeds. For each it prints the
test accuracy and log-loss of one deterministic pass (`model.predict`) and of
the paper's test-time averaging over 12 poolings
(`keras_regkit.layers.FractionalPoolingAverage`, one batched graph), then the
mean and standard deviation over the seeds; it exits non-zero unless
averaging is at least as accurate as the single pass on average.

It exports the averaged model of the last seed to
`saved_models/fractional_max_pooling`, reloads it with `tf.saved_model.load`
and exits non-zero unless serving equals `predict`.

Run from the repository root (about 1-2 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/fractional_max_pooling.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import accuracy_and_log_loss
from _common import export_and_check
from _common import load_digits_images
from _common import print_seed_table

from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage

SEEDS = (0, 1, 2)
EPOCHS = 30
BATCH_SIZE = 32
PASSES = 12


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


def run(seed, data):
    x, x_test, y, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model(seed)
    model.compile(
        keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
    averaged = FractionalPoolingAverage(model, num_passes=PASSES)
    single = accuracy_and_log_loss(model.predict(x_test, verbose=0), y_test)
    multi = accuracy_and_log_loss(averaged.predict(x_test, verbose=0), y_test)
    rows = {"1 deterministic pass": single, f"{PASSES} passes averaged": multi}
    return rows, averaged


def print_table(results):
    rows = {
        f"{metric}, {row}": [results[s][row][index] for s in SEEDS]
        for metric, index in (("accuracy", 0), ("log-loss", 1))
        for row in results[SEEDS[0]]
    }
    print_seed_table("digits test set (450)", rows, SEEDS, digits=4)


def main():
    start = time.time()
    data = load_digits_images(seed=0, test_size=0.25)
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
    print(
        f"\nThe {PASSES}-pass averaged model of the last seed, exported as one "
        "graph:"
    )
    served_ok = export_and_check(averaged, data[1], "fractional_max_pooling")
    if not (holds and served_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
