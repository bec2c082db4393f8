"""DebiasedBatchNormalization inference vs keras.layers.BatchNormalization.

Target (issue 3): inference within 1.05x of Keras's layer, timed side by side
in one run. Inference is Keras's own code path (the debiasing only changes
how the moving variance is accumulated in training), so the ratio should be
1 up to noise. The layers run on a (64, 32, 32, 64) float32 feature map,
compiled (`tf.function` with and without `jit_compile` on TensorFlow,
`jax.jit` on JAX). A training-mode call (batch statistics plus the
moving-statistics update) is reported for information; a second Keras layer
is the noise row.

Run: python benchmarks/bench_batch_normalization.py [--quick]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import jit_settings
from _backend import layer_runner
from _backend import tensor
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.layers import DebiasedBatchNormalization

__all__ = ["run"]

SHAPE = (64, 32, 32, 64)
BASELINE = "keras.layers.BatchNormalization"


def _layers():
    rng = np.random.default_rng(0)
    layers = [
        DebiasedBatchNormalization(),
        keras.layers.BatchNormalization(),
        keras.layers.BatchNormalization(),
    ]
    for layer in layers:
        layer.build(SHAPE)
    weights = [
        rng.normal(size=w.shape).astype("float32")
        for w in layers[1].get_weights()
    ]
    weights[3] = np.abs(weights[3]) + 0.5  # a positive moving variance
    for layer in layers:
        layer.set_weights(weights)
    return layers


def run(quick=False):
    """Times inference (and training) calls; returns table rows."""
    x = tensor(np.random.default_rng(1).normal(size=SHAPE).astype("float32"))
    ours, theirs, copy = _layers()
    backend = keras.backend.backend()
    settings = [(False, jit) for jit in jit_settings()]
    settings.append((True, jit_settings()[0]))
    rows = []
    for training, jit in settings:
        measurement = paired_ratios(
            {
                name: layer_runner(layer, x, training, jit)
                for name, layer in (
                    ("keras", theirs),
                    ("noise", copy),
                    ("ours", ours),
                )
            },
            "keras",
            "noise",
            quick=quick,
        )
        mode = "training call" if training else "inference"
        rows += rows_from(
            measurement,
            [
                (
                    "ours",
                    f"DebiasedBatchNormalization {mode}",
                    "(information)" if training else "<= 1.05x",
                    "",
                )
            ],
            BASELINE,
            f"{SHAPE} float32, {backend}, jit_compile={jit}",
        )
    return rows


if __name__ == "__main__":
    main(run)
