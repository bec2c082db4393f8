"""Weight averaging on MNIST-1D: final weights vs EMA vs SWA.

Trains a small 1-D CNN with batch normalization on MNIST-1D (generated
offline by the `mnist1d` package) two ways, for 3 seeds:

- SGD with momentum at a constant learning rate, with
  `PolyakAveraging(decay=0.99)` (an EMA of the weights, updated every step,
  batch-norm statistics averaged along): the final weights and the EMA of the
  same run are compared;
- SGD with momentum under a cyclic learning rate
  (`keras_regkit.callbacks.CyclicLR`, triangular, one cycle every
  `CYCLE_EPOCHS` epochs), with SWA: `PolyakAveraging(decay=None,
  every=cycle, start=...)` takes the uniform average of the weights at the
  end of each cycle of the second half of training, where the learning rate
  is lowest, and recomputes the batch-norm statistics for the averaged
  weights on the training data (`batch_norm="recompute"`), as the SWA
  authors do. The final weights and SWA of the same run are compared.

It prints the test accuracy and loss of each, mean and standard deviation
over the seeds, as a markdown table. It exports the SWA model of the first
seed (the model holds the averaged weights when `fit` returns) to
`saved_models/polyak_averaging`, reloads it with `tf.saved_model.load` and
exits non-zero unless serving equals `model.predict`.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/polyak_averaging.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import export_and_check
from _common import load_mnist1d
from _common import mean_and_spread

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import PolyakAveraging

SEEDS = (0, 1, 2)
EPOCHS = 40
BATCH_SIZE = 128
LEARNING_RATE = 0.1
EMA_DECAY = 0.99
CYCLE_EPOCHS = 4
BASE_LR = 0.01
MAX_LR = 0.2
SWA_START_EPOCH = EPOCHS // 2


def build_model(learning_rate):
    """A small 1-D CNN with batch normalization that outputs logits."""
    model = keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Reshape((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", use_bias=False
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", use_bias=False
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class KeepTrainingWeights(keras.callbacks.Callback):
    """Copies the weights at the end of training (list it before averaging)."""

    def on_train_end(self, logs=None):
        self.weights = self.model.get_weights()


def evaluate(model, x, y):
    loss, accuracy = model.evaluate(x, y, batch_size=512, verbose=0)
    return accuracy, loss


def run_ema(seed, x, y, x_test, y_test):
    keras.utils.set_random_seed(seed)
    model = build_model(LEARNING_RATE)
    ema = PolyakAveraging(decay=EMA_DECAY, final_weights="training")
    model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0, callbacks=[ema]
    )
    final = evaluate(model, x_test, y_test)
    with ema.swap_weights():
        averaged = evaluate(model, x_test, y_test)
    return final, averaged


def run_swa(seed, x, y, x_test, y_test):
    keras.utils.set_random_seed(seed)
    model = build_model(MAX_LR)
    steps = -(-len(x) // BATCH_SIZE)
    cycle = CYCLE_EPOCHS * steps
    clr = CyclicLR(base_lr=BASE_LR, max_lr=MAX_LR, step_size=cycle // 2)
    keep = KeepTrainingWeights()
    swa = PolyakAveraging(
        decay=None,
        every=cycle,
        start=SWA_START_EPOCH * steps,
        batch_norm="recompute",
        batch_norm_data=x,
        batch_norm_steps=None,
    )
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[clr, keep, swa],
    )
    averaged = evaluate(model, x_test, y_test)  # the model holds SWA
    swa_weights = model.get_weights()
    model.set_weights(keep.weights)
    final = evaluate(model, x_test, y_test)
    model.set_weights(swa_weights)
    return final, averaged, swa.num_averaged, model


def summary(values):
    """`(accuracy in %, loss)` cells, each `mean ± std` over the seeds."""
    values = np.asarray(values)
    return (
        mean_and_spread(100 * values[:, 0], digits=2),
        mean_and_spread(values[:, 1], digits=4),
    )


def main():
    begin = time.perf_counter()
    x, y, x_test, y_test = load_mnist1d()
    rows = {
        "Final weights, constant lr": [],
        f"EMA (decay={EMA_DECAY}, every step), same run": [],
        "Final weights, cyclic lr": [],
        "SWA (uniform, once per cycle, BN recomputed), same run": [],
    }
    names = list(rows)
    export_model = None
    for seed in SEEDS:
        final, ema = run_ema(seed, x, y, x_test, y_test)
        rows[names[0]].append(final)
        rows[names[1]].append(ema)
        final, swa, averaged, model = run_swa(seed, x, y, x_test, y_test)
        rows[names[2]].append(final)
        rows[names[3]].append(swa)
        if export_model is None:
            export_model = model
        print(
            f"seed {seed}: constant-lr final {rows[names[0]][-1][0]:.4f}, "
            f"EMA {ema[0]:.4f}; cyclic final {final[0]:.4f}, SWA of "
            f"{averaged} iterates {swa[0]:.4f} "
            f"({time.perf_counter() - begin:.0f} s)",
            flush=True,
        )

    print()
    print(
        f"MNIST-1D, 1-D CNN with batch norm, SGD momentum 0.9, {EPOCHS} "
        f"epochs, batch {BATCH_SIZE}, seeds {', '.join(map(str, SEEDS))} "
        "(mean ± std):"
    )
    print()
    print("| weights | test accuracy (%) | test loss |")
    print("| --- | --- | --- |")
    for name, values in rows.items():
        accuracy, loss = summary(values)
        print(f"| {name} | {accuracy} | {loss} |")
    print()

    print(f"The SWA model (seed {SEEDS[0]}), exported as a SavedModel:")
    if not export_and_check(export_model, x_test, "polyak_averaging"):
        return 1
    print(f"OK ({time.perf_counter() - begin:.0f} s in all).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
