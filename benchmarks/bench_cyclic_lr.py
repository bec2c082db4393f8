"""Overhead of cyclical learning rates in `model.fit`, against a constant rate.

Each variant trains its own copy of the same MLP (MNIST-1D-sized inputs: 40
features, 10 classes, 4000 examples, batch 32) with SGD and momentum; the
timed `fit` calls of all variants are interleaved after warm-up rounds (which
trace the steps), so load from other processes hits every variant alike, and
each time is divided by the constant-rate time of the same round; the
table gives the median of these ratios (see `_timing.py`).

`CyclicLR` and `OneCycle` assign the public `optimizer.learning_rate` (and
rescale SGD's momentum slots) before each batch, and do nothing at batch end:
a callback with an `on_train_batch_end` costs Keras its asynchronous dispatch
of steps. A do-nothing callback with an `on_train_batch_begin` is timed too,
as the floor of what a per-batch callback can cost; the schedule form has no
callback at all. A second copy of the baseline is the noise row.

Run: `python benchmarks/bench_cyclic_lr.py [--quick]`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import fit_runner
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.schedules import CyclicalLearningRate

__all__ = ["run"]

BASELINE = "fit, constant learning rate"
NOISE = "noise"
BATCH_SIZE = 32


def _data(samples=4000, features=40, classes=10):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.integers(0, classes, size=samples)
    return x, y


def _model(learning_rate):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.SGD(learning_rate, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _BatchHook(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        pass


def run(quick=False):
    """Times `fit` with each policy against a constant rate; returns rows."""
    epochs = 1 if quick else 2
    x, y = _data()
    steps = -(-len(x) // BATCH_SIZE)
    step_size = 2 * steps
    # (learning rate given to the optimizer, callbacks, target)
    variants = {
        BASELINE: (0.01, [], None),
        NOISE: (0.01, [], None),
        "fit + a do-nothing callback with a batch hook (floor of any "
        "per-batch callback)": (
            0.01,
            [_BatchHook()],
            "(reference)",
        ),
        "fit + CyclicLR": (
            0.01,
            [CyclicLR(0.001, 0.01, step_size)],
            "<= 1.03x",
        ),
        "fit + CyclicLR, momentum cycled": (
            0.01,
            [
                CyclicLR(
                    0.001,
                    0.01,
                    step_size,
                    base_momentum=0.85,
                    max_momentum=0.95,
                )
            ],
            "<= 1.03x",
        ),
        "fit + OneCycle (lr and momentum)": (
            0.01,
            # Far from the end: the rounds run on for as long as needed.
            [OneCycle(0.01, total_steps=10**7)],
            "<= 1.03x",
        ),
        "fit, CyclicalLearningRate schedule (no callback)": (
            CyclicalLearningRate(0.001, 0.01, step_size),
            [],
            "<= 1.03x",
        ),
    }

    candidates = {
        name: fit_runner(
            _model(learning_rate),
            x,
            y,
            BATCH_SIZE,
            callbacks=lambda callbacks=callbacks: callbacks,
            epochs=epochs,
        )
        for name, (learning_rate, callbacks, _) in variants.items()
    }
    measurement = paired_ratios(candidates, BASELINE, NOISE, quick=quick)
    return rows_from(
        measurement,
        [
            (name, name, target, "")
            for name, (_, _, target) in variants.items()
            if name not in (BASELINE, NOISE)
        ],
        BASELINE,
        f"{epochs * steps} steps of batch {BATCH_SIZE}, "
        f"{keras.backend.backend()}",
    )


if __name__ == "__main__":
    main(run)
