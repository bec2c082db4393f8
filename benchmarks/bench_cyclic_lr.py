"""Overhead of cyclical learning rates in `model.fit`, against a constant rate.

Each variant trains its own copy of the same MLP (MNIST-1D-sized inputs: 40
features, 10 classes, 4000 examples, batch 32) with SGD and momentum; the
timed `fit` calls of all variants are interleaved after warm-up rounds (which
trace the steps), so load from other processes hits every variant alike, and
each time is divided by the constant-rate time of the same round; the
table gives the median of these ratios.

`CyclicLR` and `OneCycle` assign the public `optimizer.learning_rate` (and
rescale SGD's momentum slots) before each batch. Any callback with a batch
hook costs Keras its asynchronous dispatch of steps, so a do-nothing
callback with an `on_train_batch_begin` is timed too, as the floor of what
a per-batch callback can cost; the schedule form has no callback at all
and is the way to the issue's 1.03x. A second copy of the baseline shows
the noise floor of the run.

Run: `python benchmarks/bench_cyclic_lr.py [--quick]`.
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _timing import markdown_table

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.schedules import CyclicalLearningRate

__all__ = ["run"]

BASELINE = "fit, constant learning rate"
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


def _paired_ratios(candidates, baseline, repeats, warmup=1):
    """Median over rounds of each candidate's time over the baseline's.

    Every round times each candidate once, in turn (alternating the order),
    and divides by the baseline's time in the same round, so that drifts of
    a shared machine cancel within the pair rather than across the run.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    ratios = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        times = {}
        for name in names if round_ % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            candidates[name]()
            times[name] = time.perf_counter() - start
        for name in candidates:
            ratios[name].append(times[name] / times[baseline])
    return {name: statistics.median(r) for name, r in ratios.items()}


def run(quick=False):
    """Times `fit` with each policy against a constant rate; returns rows."""
    repeats, epochs = (3, 1) if quick else (21, 2)
    x, y = _data()
    steps = -(-len(x) // BATCH_SIZE)
    step_size = 2 * steps
    # (learning rate given to the optimizer, callbacks, target)
    variants = {
        BASELINE: (0.01, [], None),
        "same as the baseline, second copy (noise floor)": (
            0.01,
            [],
            "~1.00x",
        ),
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
            [OneCycle(0.01, total_steps=100 * steps)],
            "<= 1.03x",
        ),
        "fit, CyclicalLearningRate schedule (no callback)": (
            CyclicalLearningRate(0.001, 0.01, step_size),
            [],
            "<= 1.03x",
        ),
    }

    def fit(model, callbacks):
        return lambda: model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=epochs,
            verbose=0,
            callbacks=callbacks,
        )

    candidates = {
        name: fit(_model(learning_rate), callbacks)
        for name, (learning_rate, callbacks, _) in variants.items()
    }
    ratios = _paired_ratios(candidates, BASELINE, repeats)
    rows = []
    for name, (_, _, target) in variants.items():
        if target is None:
            continue
        rows.append(
            {
                "technique": f"{name}, {epochs * steps} steps of batch "
                f"{BATCH_SIZE}",
                "baseline": BASELINE,
                "ratio": ratios[name],
                "target": target,
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(quick=parser.parse_args().quick)))
