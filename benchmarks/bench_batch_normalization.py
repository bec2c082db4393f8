"""DebiasedBatchNormalization inference vs keras.layers.BatchNormalization.

Target (issue 3): inference within 1.05x of Keras's layer, timed side by side
in one run. Inference is Keras's own code path (the debiasing only changes
how the moving variance is accumulated in training), so the ratio should be
1 up to noise. The layers run on a (64, 32, 32, 64) float32 feature map, as
`tf.function`s, with and without `jit_compile`. A training-mode call (batch
statistics plus the moving-statistics update) is reported for information.

Run: python benchmarks/bench_batch_normalization.py [--quick]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
import tensorflow as tf
from _timing import interleaved_medians
from _timing import markdown_table

from keras_regkit.layers import DebiasedBatchNormalization

__all__ = ["run"]

SHAPE = (64, 32, 32, 64)
BASELINE = "keras.layers.BatchNormalization"


def _layers():
    rng = np.random.default_rng(0)
    ours = DebiasedBatchNormalization()
    theirs = keras.layers.BatchNormalization()
    for layer in (ours, theirs):
        layer.build(SHAPE)
    weights = [
        rng.normal(size=w.shape).astype("float32") for w in theirs.get_weights()
    ]
    weights[3] = np.abs(weights[3]) + 0.5  # a positive moving variance
    for layer in (ours, theirs):
        layer.set_weights(weights)
    return ours, theirs


def run(quick=False):
    """Times inference (and training) calls; returns table rows."""
    repeats = 7 if quick else 31
    x = tf.constant(
        np.random.default_rng(1).normal(size=SHAPE).astype("float32")
    )
    ours, theirs = _layers()
    rows = []
    for training, jit in ((False, False), (False, True), (True, False)):
        candidates = {}
        for name, layer in (("ours", ours), ("keras", theirs)):
            fn = tf.function(
                lambda x, layer=layer, training=training: layer(
                    x, training=training
                ),
                jit_compile=jit,
            )
            candidates[name] = lambda fn=fn: fn(x).numpy()
        medians = interleaved_medians(candidates, repeats=repeats)
        mode = "training call" if training else "inference"
        rows.append(
            {
                "technique": f"DebiasedBatchNormalization {mode}, {SHAPE} "
                f"float32, jit_compile={jit}",
                "baseline": BASELINE,
                "ratio": medians["ours"] / medians["keras"],
                "target": "(information)" if training else "<= 1.05x",
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(quick=parser.parse_args().quick)))
