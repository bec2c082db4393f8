"""Stochastic depth on MNIST-1D: a deep residual 1-D conv net, with and without.

Trains the same residual network, a `Conv1D` stem, 12 pre-activation
residual blocks `[BatchNorm, ReLU, Conv1D, BatchNorm, ReLU, Conv1D]` and a
pooled softmax head, on MNIST-1D (Greydanus, 2020; generated offline by the
`mnist1d` package, 4000 training and 1000 test signals of length 40), for 3
seeds and the same number of epochs, two ways: plain residual adds
(`x + f(x)` with `keras.layers.Add`), and every block wrapped in
`keras_regkit.layers.StochasticDepth` with the paper's linear decay
`linear_survival_probabilities(12, 0.5)` (Huang et al., 2016): in training
block `l` is skipped, not computed, with probability `1 - p_l`; in inference
it computes `x + p_l f(x)`.

It prints the test accuracy and log-loss per seed and as mean ± std, and the
median training wall time per epoch (the first epoch, which traces the
graph, left out) of both, since skipped blocks make a step cheaper.

It exports the stochastic-depth model of the last seed to
`saved_models/stochastic_depth`, reloads it with `tf.saved_model.load` and
exits non-zero unless serving equals `predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/stochastic_depth.py
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

from keras_regkit.layers import StochasticDepth
from keras_regkit.layers import linear_survival_probabilities

SEEDS = (0, 1, 2)
EPOCHS = 10
BATCH_SIZE = 64
BLOCKS = 12
FILTERS = 32
FINAL_SURVIVAL = 0.5
VARIANTS = ("plain residual", "stochastic depth")


def residual_branch():
    """Pre-activation branch `f`: [BN, ReLU, Conv1D, BN, ReLU, Conv1D]."""
    return [
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv1D(FILTERS, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv1D(FILTERS, 3, padding="same"),
    ]


def build_model(variant, seed):
    inputs = keras.Input((40, 1))
    x = keras.layers.Conv1D(FILTERS, 3, padding="same")(inputs)
    survival = linear_survival_probabilities(BLOCKS, FINAL_SURVIVAL)
    for block, probability in enumerate(survival):
        branch = residual_branch()
        if variant == "stochastic depth":
            x = StochasticDepth(branch, probability, seed=seed * 100 + block)(x)
        else:
            h = x
            for layer in branch:
                h = layer(h)
            x = keras.layers.Add()([x, h])
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every training epoch."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def run(seed, data):
    x, y, x_test, y_test = data
    rows, seconds, model = {}, {}, None
    for variant in VARIANTS:
        keras.utils.set_random_seed(seed)
        model = build_model(variant, seed)
        model.compile(
            keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
        )
        timer = EpochTimer()
        model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=EPOCHS,
            verbose=0,
            callbacks=[timer],
        )
        rows[variant] = accuracy_and_log_loss(
            model.predict(x_test, verbose=0), y_test
        )
        # The first epoch traces and compiles the graph.
        seconds[variant] = float(np.median(timer.times[1:]))
    return rows, seconds, model


def main():
    start = time.time()
    data = load_mnist1d(channels=True)
    results, seconds = {}, {}
    for seed in SEEDS:
        results[seed], seconds[seed], model = run(seed, data)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    print(
        f"\nMNIST-1D, residual Conv1D net: stem + {BLOCKS} pre-activation "
        f"blocks of {FILTERS} filters, Adam(1e-3), {EPOCHS} epochs, batch "
        f"{BATCH_SIZE}; stochastic depth: linear decay to p_L = "
        f"{FINAL_SURVIVAL}, one gate per batch.\n"
    )
    rows = {
        f"{metric}, {variant}": [results[s][variant][index] for s in SEEDS]
        for metric, index in (("accuracy", 0), ("log-loss", 1))
        for variant in VARIANTS
    }
    for variant in VARIANTS:
        rows[f"s / epoch, {variant}"] = [seconds[s][variant] for s in SEEDS]
    print_seed_table("MNIST-1D test set (1000)", rows, SEEDS, digits=4)
    plain, deep = (np.mean([seconds[s][v] for s in SEEDS]) for v in VARIANTS)
    print(
        f"\nMean training time per epoch, stochastic depth / plain: "
        f"{deep / plain:.2f}x (expected number of blocks computed: "
        f"{sum(linear_survival_probabilities(BLOCKS, FINAL_SURVIVAL)):.2f} "
        f"of {BLOCKS}; timings are noisy on a shared machine)"
    )
    print("\nThe stochastic-depth model of the last seed, exported:")
    if not export_and_check(model, data[2], "stochastic_depth"):
        sys.exit(1)
    print(f"\nTotal time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
