"""DropConnect on MNIST-1D: dropped weights vs dropped units vs neither.

Trains the same MLP on MNIST-1D (Greydanus, 2020; generated offline by the
`mnist1d` package, 4000 training and 1000 test signals of length 40) three
ways, for 3 seeds and the same number of epochs: hidden layers
`keras.layers.Dense` (no regularization), `Dense` followed by
`Dropout(0.5)`, and `keras_regkit.layers.DropConnectDense(rate=0.5)`
(Wan et al., 2013). It prints the test accuracy and log-loss of each, per
seed and as mean ± std, and, for the DropConnect model, both inference
rules: `inference="mean"` (the plain kernel) and `inference="gaussian"`
(the paper's moment-matched sampling, Algorithm 2), the same trained
weights in both.

It exports the DropConnect model of the last seed, with the paper's
`inference="gaussian"`, to `saved_models/drop_connect`, reloads it with
`tf.saved_model.load` and exits non-zero unless serving equals `predict`.

Run from the repository root (about 1-2 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/drop_connect.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from _common import accuracy_and_log_loss
from _common import export_and_check
from _common import load_mnist1d
from _common import print_seed_table

from keras_regkit.layers import DropConnectDense

SEEDS = (0, 1, 2)
EPOCHS = 60
BATCH_SIZE = 64
UNITS = 256
RATE = 0.5
VARIANTS = ("Dense", "Dense + Dropout(0.5)", "DropConnectDense(0.5)")


def build_model(variant, seed, inference="mean"):
    """40 -> 256 -> 256 -> 10 MLP; `variant` picks the hidden layers."""
    layers = [keras.Input((40,))]
    for i in range(2):
        if variant == "DropConnectDense(0.5)":
            layers.append(
                DropConnectDense(
                    UNITS,
                    rate=RATE,
                    inference=inference,
                    activation="relu",
                    seed=seed * 10 + i,
                )
            )
        else:
            layers.append(keras.layers.Dense(UNITS, activation="relu"))
            if variant == "Dense + Dropout(0.5)":
                layers.append(keras.layers.Dropout(RATE, seed=seed * 10 + i))
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def train(variant, seed, data):
    x, y, _, _ = data
    keras.utils.set_random_seed(seed)
    model = build_model(variant, seed)
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
    return model


def run(seed, data):
    x_test, y_test = data[2], data[3]
    rows, exported = {}, None
    for variant in VARIANTS:
        model = train(variant, seed, data)
        if variant != "DropConnectDense(0.5)":
            rows[variant] = accuracy_and_log_loss(
                model.predict(x_test, verbose=0), y_test
            )
            continue
        rows[f"{variant}, mean inference"] = accuracy_and_log_loss(
            model.predict(x_test, verbose=0), y_test
        )
        # The same trained weights, served with the paper's inference.
        gaussian = build_model(variant, seed, inference="gaussian")
        gaussian.set_weights(model.get_weights())
        exported = gaussian
        rows[f"{variant}, gaussian inference"] = accuracy_and_log_loss(
            gaussian.predict(x_test, verbose=0), y_test
        )
    return rows, exported


def print_table(results):
    rows = {
        f"{metric}, {row}": [results[s][row][index] for s in SEEDS]
        for metric, index in (("accuracy", 0), ("log-loss", 1))
        for row in results[SEEDS[0]]
    }
    print_seed_table("MNIST-1D test set (1000)", rows, SEEDS, digits=4)


def main():
    start = time.time()
    data = load_mnist1d()
    results = {}
    for seed in SEEDS:
        results[seed], exported = run(seed, data)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    print(
        f"\nMNIST-1D, MLP 40-{UNITS}-{UNITS}-10 (ReLU), Adam(1e-3), "
        f"{EPOCHS} epochs, batch {BATCH_SIZE}; DropConnect: rate {RATE}, "
        "one mask per batch, bias dropped too, 100 Gaussian samples.\n"
    )
    print_table(results)
    print(
        "\nThe DropConnect model of the last seed (gaussian inference), "
        "exported:"
    )
    if not export_and_check(exported, data[2], "drop_connect"):
        sys.exit(1)
    print(f"\nTotal time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
