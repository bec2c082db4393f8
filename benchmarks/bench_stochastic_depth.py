"""Epoch time of a 20-block residual network with and without stochastic depth.

Target (issue 2): with the linear decay rule down to `p_L = 0.5`, an epoch
takes at most 0.8x the time of the same network without stochastic depth,
timed in the same rounds, with and without `jit_compile` on TensorFlow (JAX
always compiles). Closed gates skip their blocks (forward and backward), and
about a quarter of the blocks are closed on average (mean survival over
l = 1..20 is 1 - 10.5 / 40 = 0.74), so 0.74x plus the fixed cost of the
step (data, head, optimizer) is the floor. A second plain network is the
noise row. Two diagnostic networks are timed in the same rounds: every block
at `survival_probability=1` (no conditional: the wrapper's own cost), and
every block at `1 - 1e-6` (the gate almost surely open, but the branch runs
inside `keras.ops.cond`): their ratio is what running a branch inside a
conditional costs the backend, which the skipped blocks must pay back.

Run: python benchmarks/bench_stochastic_depth.py [--quick]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import fit_runner
from _backend import jit_settings
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.layers import StochasticDepth
from keras_regkit.layers import linear_survival_probabilities

__all__ = ["run"]

BLOCKS = 20
WIDTH = 512
BATCH = 128


def _branch():
    return [
        keras.layers.Dense(WIDTH, activation="relu"),
        keras.layers.Dense(WIDTH),
    ]


def _model(final_survival, jit_compile):
    """`final_survival=None`: the plain residual network."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    x = inputs
    if final_survival is not None:
        survival = linear_survival_probabilities(BLOCKS, final_survival)
    for i in range(BLOCKS):
        if final_survival is not None:
            x = StochasticDepth(_branch(), survival[i], seed=i)(x)
        else:
            branch = x
            for layer in _branch():
                branch = layer(branch)
            x = keras.layers.Add()([x, branch])
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model


def run(quick=False):
    steps = 8 if quick else 10
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH * steps, 10)).astype("float32")
    backend = keras.backend.backend()
    rows = []
    for jit in jit_settings():
        models = {
            "base": _model(None, jit),
            "noise": _model(None, jit),
            "ours": _model(0.5, jit),
            "open": _model(1.0, jit),
            "cond": _model(1.0 - 1e-6, jit),
        }
        measurement = paired_ratios(
            {name: fit_runner(m, x, y, BATCH) for name, m in models.items()},
            "base",
            "noise",
            quick=quick,
        )
        note = (
            "same rounds: every gate open inside the conditional "
            f"{measurement.ratio('cond'):.2f}x, without a conditional "
            f"{measurement.ratio('open'):.2f}x"
        )
        rows += rows_from(
            measurement,
            [
                (
                    "ours",
                    "StochasticDepth, linear rule to p_L=0.5",
                    "<= 0.8x",
                    note,
                ),
                (
                    "open",
                    "StochasticDepth, survival_probability=1 (gates open)",
                    "(information)",
                    "",
                ),
            ],
            "same residual network, no stochastic depth",
            f"{BLOCKS} Dense({WIDTH}) blocks, batch {BATCH}, epoch of {steps} "
            f"steps, {backend}, jit_compile={jit}",
        )
    return rows


if __name__ == "__main__":
    main(run)
