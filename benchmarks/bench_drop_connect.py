"""DropConnectDense(1024) training step vs Dense(1024) + Dropout.

Target (issue 2): with `mask="batch"`, at most 1.5x the Dense + Dropout step
of the same size, timed side by side in one run.

Run: python benchmarks/bench_drop_connect.py [--quick]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _timing import fit_epoch_medians
from _timing import main

from keras_regkit.layers import DropConnectDense

UNITS = 1024
BATCH = 128


def _model(dropconnect, jit_compile):
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


def run(quick=False):
    steps = 10 if quick else 40
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, UNITS)).astype("float32")
    y = rng.normal(size=(BATCH * steps, UNITS)).astype("float32")
    rows = []
    for jit in (False, True):
        models = {"ours": _model(True, jit), "base": _model(False, jit)}
        medians = fit_epoch_medians(models, x, y, BATCH, quick)
        rows.append(
            {
                "technique": "DropConnectDense(1024), mask='batch', "
                f"train step, batch {BATCH}, jit_compile={jit}",
                "baseline": "Dense(1024) + Dropout(0.5)",
                "ratio": medians["ours"] / medians["base"],
                "target": "<= 1.5x",
            }
        )
    return rows


if __name__ == "__main__":
    main(run)
