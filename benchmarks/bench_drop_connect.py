"""DropConnectDense(1024) training step vs Dense(1024) + Dropout.

Target (issue 2): with `mask="batch"`, one `fit` epoch costs at most 1.5x
that of Dense(1024) + Dropout(0.5) of the same size, timed in the same
rounds, with and without `jit_compile` on TensorFlow (JAX always compiles).
A second Dense + Dropout model is the noise row.

The kernel mask has a million entries, eight times the dropout mask of a
batch of 128, so the cost of drawing random numbers decides the ratio.
DropConnect hashes a counter with one random key per mask
(`keras_regkit.layers.drop_connect.keep_mask`) rather than drawing a
million values from `keras.random.uniform`, whose TensorFlow kernel under
XLA costs about 100 times its non-XLA cost on CPU. The rows below also time
both ways of drawing a kernel-sized mask on their own, compiled the same
way, so the table shows what the draw costs.

Run: python benchmarks/bench_drop_connect.py [--quick]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import fit_runner
from _backend import jit_settings
from _backend import layer_runner
from _backend import tensor
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.layers import DropConnectDense
from keras_regkit.layers.drop_connect import keep_mask

__all__ = ["run"]

UNITS = 1024
BATCH = 128


def _model(dropconnect, jit_compile):
    keras.utils.set_random_seed(0)
    head = (
        [
            DropConnectDense(
                UNITS, rate=0.5, mask="batch", activation="relu", seed=0
            )
        ]
        if dropconnect
        else [
            keras.layers.Dense(UNITS, activation="relu"),
            keras.layers.Dropout(0.5, seed=0),
        ]
    )
    model = keras.Sequential([keras.Input((UNITS,))] + head)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model


class _Mask(keras.layers.Layer):
    """A kernel-sized keep mask, by the hash or by `keras.random.uniform`."""

    def __init__(self, hashed, **kwargs):
        super().__init__(**kwargs)
        self.hashed = hashed
        self.seed_generator = keras.random.SeedGenerator(0)

    def call(self, x, training=None):
        shape = (UNITS, UNITS)
        if self.hashed:
            keep = keep_mask(shape, 0.5, self.seed_generator)
        else:
            keep = keras.random.uniform(shape, seed=self.seed_generator) >= 0.5
        return x + keras.ops.mean(keras.ops.cast(keep, "float32"))


def run(quick=False):
    steps = 10 if quick else 20
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, UNITS)).astype("float32")
    y = rng.normal(size=(BATCH * steps, UNITS)).astype("float32")
    backend = keras.backend.backend()
    rows = []
    for jit in jit_settings():
        models = {
            "base": _model(False, jit),
            "noise": _model(False, jit),
            "ours": _model(True, jit),
        }
        measurement = paired_ratios(
            {name: fit_runner(m, x, y, BATCH) for name, m in models.items()},
            "base",
            "noise",
            quick=quick,
        )
        step_ms = measurement.seconds("base") / steps * 1e3
        # The two ways of drawing the mask alone, in one compiled call each.
        probe = tensor(np.zeros((1,), "float32"))
        draws = paired_ratios(
            {
                "hash": layer_runner(
                    _Mask(True, name="hash"), probe, True, jit
                ),
                "hash_copy": layer_runner(
                    _Mask(True, name="hash_copy"), probe, True, jit
                ),
                "uniform": layer_runner(
                    _Mask(False, name="uniform"), probe, True, jit
                ),
            },
            "hash",
            None,
            quick=quick,
            min_rounds=3,
            max_rounds=5,
            # One call per timing: the XLA uniform draw is far the slowest.
            min_timing_s=0.0,
        )
        hash_ms = draws.seconds("hash") * 1e3
        uniform_ms = draws.seconds("uniform") * 1e3
        note = (
            f"one {UNITS}x{UNITS} mask: hash {hash_ms:.2f} ms, "
            f"keras.random.uniform {uniform_ms:.2f} ms; Dense+Dropout step "
            f"{step_ms:.2f} ms"
        )
        rows += rows_from(
            measurement,
            [
                (
                    "ours",
                    f"DropConnectDense({UNITS}), mask='batch', train step",
                    "<= 1.5x",
                    note,
                )
            ],
            "Dense(1024) + Dropout(0.5)",
            f"batch {BATCH}, epoch of {steps} steps, {backend}, "
            f"jit_compile={jit}",
        )
    return rows


if __name__ == "__main__":
    main(run)
