"""Debiased batch normalization vs Keras's, at small batch sizes, on MNIST-1D.

Trains the same MLP (two `Dense(128)` layers, each followed by batch
normalization and a ReLU) on MNIST-1D (generated offline by the `mnist1d`
package) with batch sizes 2, 4 and 8, once with
`keras.layers.BatchNormalization` and once with
`keras_regkit.layers.DebiasedBatchNormalization`, from the same initial
weights, for 3 seeds and the same number of steps per batch size. Training
normalizes with the batch statistics in both, so the two runs learn the same
weights; they differ only in the moving variance used at inference, which
Keras averages from the biased batch variance, converging to `(m - 1) / m`
of the population variance (m = batch size for a `Dense` input).

For each batch size it prints the test accuracy and log-loss of both, and
the ratio of the first layer's mean moving variance to the variance of that
layer's inputs over the training set. It exports the debiased model (last
seed, batch size 2) to `saved_models/debiased_batch_normalization`, reloads
it with `tf.saved_model.load` and exits non-zero unless serving equals
`predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/debiased_batch_normalization.py
"""

import os
import sys
import time

import keras
import numpy as np
from mnist1d.data import get_dataset_args
from mnist1d.data import make_dataset

from keras_regkit._utils import atomic_path
from keras_regkit.layers import DebiasedBatchNormalization

SEEDS = (0, 1, 2)
BATCH_SIZES = (2, 4, 8)
STEPS = 4000
LAYERS = {
    "Keras BatchNormalization": keras.layers.BatchNormalization,
    "DebiasedBatchNormalization": DebiasedBatchNormalization,
}
EXPORT_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    os.pardir,
    "saved_models",
    "debiased_batch_normalization",
)


def load_data():
    data = make_dataset(get_dataset_args())
    return (
        data["x"].astype("float32"),
        data["y"].astype("int32"),
        data["x_test"].astype("float32"),
        data["y_test"].astype("int32"),
    )


def build_model(normalization):
    layers = [keras.Input((40,))]
    for _ in range(2):
        layers += [
            keras.layers.Dense(128, use_bias=False),
            normalization(),
            keras.layers.ReLU(),
        ]
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def evaluate(model, x, x_test, y_test):
    probabilities = model.predict(x_test, verbose=0)
    accuracy = float(np.mean(np.argmax(probabilities, -1) == y_test))
    picked = probabilities[np.arange(len(y_test)), y_test]
    log_loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    first_bn = model.layers[1]
    inputs = keras.Model(model.inputs, first_bn.input).predict(x, verbose=0)
    ratio = float(
        np.mean(
            keras.ops.convert_to_numpy(first_bn.moving_variance)
            / inputs.var(axis=0)
        )
    )
    return accuracy, log_loss, ratio


def run(seed, batch_size, data):
    """Returns {layer name: (accuracy, log-loss, variance ratio)}."""
    x, y, x_test, y_test = data
    epochs = max(1, STEPS * batch_size // len(x))
    results, models = {}, {}
    for name, normalization in LAYERS.items():
        keras.utils.set_random_seed(seed)
        model = build_model(normalization)
        model.compile(
            keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy"
        )
        model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
        results[name] = evaluate(model, x, x_test, y_test)
        models[name] = model
    return results, models["DebiasedBatchNormalization"]


def print_table(results):
    header = ["MNIST-1D test set (1000)"] + [f"seed {s}" for s in SEEDS]
    print("| " + " | ".join(header + ["mean"]) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(SEEDS) + 1)) + "|")
    metrics = ("accuracy", "log-loss", "moving var / input var, layer 1")
    for index, metric in enumerate(metrics):
        for batch_size in BATCH_SIZES:
            for name in LAYERS:
                values = [results[s, batch_size][name][index] for s in SEEDS]
                cells = [f"{v:.3f}" for v in values]
                cells.append(f"{np.mean(values):.3f}")
                print(
                    f"| {metric}, batch {batch_size}, {name} | "
                    + " | ".join(cells)
                    + " |"
                )


def export_and_check(model, x_test):
    import tensorflow as tf

    with atomic_path(EXPORT_PATH) as tmp:
        model.export(tmp, verbose=False)
    reloaded = tf.saved_model.load(EXPORT_PATH)
    served = reloaded.serve(tf.constant(x_test)).numpy()
    predicted = model.predict(x_test, verbose=0)
    error = float(np.max(np.abs(served - predicted)))
    print(
        f"\nExported the debiased model (batch size {BATCH_SIZES[0]}) to "
        f"{os.path.relpath(EXPORT_PATH)}; max |serve - predict| = {error:.2e}"
    )
    return error <= 1e-5


def main():
    start = time.time()
    data = load_data()
    results, exported = {}, None
    for seed in SEEDS:
        for batch_size in BATCH_SIZES:
            results[seed, batch_size], model = run(seed, batch_size, data)
            if batch_size == BATCH_SIZES[0]:
                exported = model
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    print(
        "\nMNIST-1D, MLP 40-128-128-10 with batch normalization after each "
        f"hidden Dense, Adam(2e-3), about {STEPS} steps per run, momentum "
        "0.99; same seeds and initial weights for both layers.\n"
    )
    print_table(results)
    if not export_and_check(exported, data[2]):
        sys.exit(1)


if __name__ == "__main__":
    main()
