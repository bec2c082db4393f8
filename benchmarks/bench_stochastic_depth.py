"""Epoch time of a 20-block residual network with and without stochastic depth.

Target (issue 2): with the linear decay rule down to `p_L = 0.5`, an epoch
takes at most 0.8x the time of the same network without stochastic depth,
timed side by side in one run. Closed gates skip their blocks (forward and
backward), and about a quarter of the blocks are closed on average
(mean survival over l = 1..20 is 1 - 10.5 / 40 = 0.74).

Run: python benchmarks/bench_stochastic_depth.py [--quick]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _timing import fit_epoch_medians
from _timing import main

from keras_regkit.layers import StochasticDepth
from keras_regkit.layers import linear_survival_probabilities

BLOCKS = 20
WIDTH = 512
BATCH = 128


def _branch():
    return [
        keras.layers.Dense(WIDTH, activation="relu"),
        keras.layers.Dense(WIDTH),
    ]


def _model(stochastic_depth, jit_compile):
    inputs = keras.Input((WIDTH,))
    x = inputs
    survival = linear_survival_probabilities(BLOCKS, 0.5)
    for i, p in enumerate(survival):
        if stochastic_depth:
            x = StochasticDepth(_branch(), p, seed=i)(x)
        else:
            branch = x
            for layer in _branch():
                branch = layer(branch)
            x = keras.layers.Add()([x, branch])
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model


def run(quick=False):
    steps = 8 if quick else 30
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH * steps, 10)).astype("float32")
    rows = []
    for jit in (False, True):
        models = {"ours": _model(True, jit), "base": _model(False, jit)}
        medians = fit_epoch_medians(models, x, y, BATCH, quick)
        rows.append(
            {
                "technique": f"StochasticDepth, {BLOCKS} Dense({WIDTH}) "
                f"blocks, p_L=0.5, epoch, jit_compile={jit}",
                "baseline": "same residual network, no stochastic depth",
                "ratio": medians["ours"] / medians["base"],
                "target": "<= 0.8x",
            }
        )
    return rows


if __name__ == "__main__":
    main(run)
