"""FractionalMaxPooling2D forward + backward vs MaxPooling2D(2).

Target (issue 3): on a (64, 32, 32, 64) float32 input at ratio 1.414, one
forward and backward pass of `FractionalMaxPooling2D` in training mode (fresh
pooling regions each step) costs at most 4x a `MaxPooling2D(2)` forward and
backward on the same input, timed side by side in one run, with and without
`jit_compile`. `tf.nn.fractional_max_pool` (no XLA kernel, a sequential
gradient loop) is timed in the same rounds as a reference, without jit.
Inference (forward only, deterministic regions) is reported too.

Each candidate is a `tf.function` returning the input gradient for a fixed
random upstream gradient; all candidates run in rotation after warm-up.

Run: python benchmarks/bench_fractional_max_pooling.py [--quick]
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

from keras_regkit.layers import FractionalMaxPooling2D

__all__ = ["run"]

SHAPE = (64, 32, 32, 64)
RATIO = 1.414
BASELINE = "MaxPooling2D(2)"


def _forward_backward(pool, jit_compile, upstream):
    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pool(x)
        return tape.gradient(y, x, output_gradients=upstream)

    return step


def _timed(step, x):
    return lambda: step(x).numpy()


def run(quick=False):
    """Times each candidate against MaxPooling2D(2); returns table rows."""
    repeats = 5 if quick else 21
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    ours = FractionalMaxPooling2D(RATIO, seed=0)
    max_pool = keras.layers.MaxPooling2D(2)
    out = ours.compute_output_shape(SHAPE)
    up_ours = tf.constant(rng.normal(size=out).astype("float32"))
    up_max = tf.constant(
        rng.normal(size=max_pool.compute_output_shape(SHAPE)).astype("float32")
    )

    def tf_fractional(x):
        return tf.nn.fractional_max_pool(
            x, [1.0, RATIO, RATIO, 1.0], pseudo_random=True, overlapping=True
        )[0]

    rows = []
    for jit in (False, True):
        candidates = {
            "max": _timed(_forward_backward(max_pool, jit, up_max), x),
            "ours": _timed(
                _forward_backward(
                    lambda x: ours(x, training=True), jit, up_ours
                ),
                x,
            ),
        }
        if not jit:
            candidates["tf"] = _timed(
                _forward_backward(tf_fractional, False, up_ours), x
            )
        medians = interleaved_medians(candidates, repeats=repeats)
        rows.append(
            {
                "technique": f"FractionalMaxPooling2D({RATIO}) forward + "
                f"backward, {SHAPE} float32, jit_compile={jit}",
                "baseline": BASELINE,
                "ratio": medians["ours"] / medians["max"],
                "target": "<= 4x",
            }
        )
        if not jit:
            rows.append(
                {
                    "technique": "reference: tf.nn.fractional_max_pool "
                    f"forward + backward, {SHAPE} float32, jit_compile=False",
                    "baseline": BASELINE,
                    "ratio": medians["tf"] / medians["max"],
                    "target": "(issue: 7x to 12x)",
                }
            )

    infer = {
        "max": tf.function(lambda x: max_pool(x)),
        "ours": tf.function(lambda x: ours(x, training=False)),
    }
    medians = interleaved_medians(
        {name: _timed(fn, x) for name, fn in infer.items()}, repeats=repeats
    )
    rows.append(
        {
            "technique": f"FractionalMaxPooling2D({RATIO}) inference forward, "
            f"{SHAPE} float32, jit_compile=False",
            "baseline": BASELINE,
            "ratio": medians["ours"] / medians["max"],
            "target": "(information)",
        }
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(quick=parser.parse_args().quick)))
