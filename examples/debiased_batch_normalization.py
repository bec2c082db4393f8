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
layer's inputs over the training set, per seed and as the mean and standard
deviation over the seeds. It exports the debiased model (last
seed, batch size 2) to `saved_models/debiased_batch_normalization`, reloads
it with `tf.saved_model.load` and exits non-zero unless serving equals
`predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/debiased_batch_normalization.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import accuracy_and_log_loss
from _common import export_and_check
from _common import load_mnist1d
from _common import print_seed_table

from keras_regkit.layers import DebiasedBatchNormalization

SEEDS = (0, 1, 2)
BATCH_SIZES = (2, 4, 8)
STEPS = 4000
LAYERS = {
    "Keras BatchNormalization": keras.layers.BatchNormalization,
    "DebiasedBatchNormalization": DebiasedBatchNormalization,
}


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
    accuracy, log_loss = accuracy_and_log_loss(probabilities, y_test)
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
    metrics = ("accuracy", "log-loss", "moving var / input var, layer 1")
    rows = {
        f"{metric}, batch {batch_size}, {name}": [
            results[s, batch_size][name][index] for s in SEEDS
        ]
        for index, metric in enumerate(metrics)
        for batch_size in BATCH_SIZES
        for name in LAYERS
    }
    print_seed_table("MNIST-1D test set (1000)", rows, SEEDS, digits=3)


def main():
    start = time.time()
    data = load_mnist1d()
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
    print(
        f"\nThe debiased model (last seed, batch size {BATCH_SIZES[0]}), "
        "exported:"
    )
    if not export_and_check(exported, data[2], "debiased_batch_normalization"):
        sys.exit(1)


if __name__ == "__main__":
    main()
