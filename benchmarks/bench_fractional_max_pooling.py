"""FractionalMaxPooling2D forward + backward vs MaxPooling2D(2).

Target (issue 3): on a (64, 32, 32, 64) float32 input at ratio 1.414, one
forward and backward pass of `FractionalMaxPooling2D` in training mode (fresh
pooling regions each step) costs at most 4x a `MaxPooling2D(2)` forward and
backward on the same input, timed in the same rounds, with and without
`jit_compile` on TensorFlow (JAX always compiles). On TensorFlow,
`tf.nn.fractional_max_pool` (no XLA kernel, a sequential gradient loop) is
timed in the same rounds as a reference, without jit. Inference (forward
only, deterministic regions) is reported too.

Each candidate returns the input gradient for a fixed random upstream
gradient; a second `MaxPooling2D(2)` is the noise row.

Run: python benchmarks/bench_fractional_max_pooling.py [--quick]
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

from keras_regkit.layers import FractionalMaxPooling2D

__all__ = ["run"]

SHAPE = (64, 32, 32, 64)
RATIO = 1.414
BASELINE = "MaxPooling2D(2)"


class _TensorFlowFractionalMaxPool(keras.layers.Layer):
    """`tf.nn.fractional_max_pool`, TensorFlow's own kernel."""

    def call(self, x, training=None):
        import tensorflow as tf

        return tf.nn.fractional_max_pool(
            x, [1.0, RATIO, RATIO, 1.0], pseudo_random=True, overlapping=True
        )[0]


class _Negate(keras.layers.Layer):
    """One elementwise pass over the input: the unit of op-by-op cost."""

    def call(self, x, training=None):
        return -x


def run(quick=False):
    """Times each candidate against MaxPooling2D(2); returns table rows."""
    rng = np.random.default_rng(0)
    x = tensor(rng.normal(size=SHAPE).astype("float32"))
    ours = FractionalMaxPooling2D(RATIO, seed=0)
    pools = [keras.layers.MaxPooling2D(2) for _ in range(2)]
    up_ours = tensor(
        rng.normal(size=ours.compute_output_shape(SHAPE)).astype("float32")
    )
    up_max = tensor(
        rng.normal(size=pools[0].compute_output_shape(SHAPE)).astype("float32")
    )
    tensorflow = keras.backend.backend() == "tensorflow"
    backend = keras.backend.backend()
    rows = []
    for jit in jit_settings():
        candidates = {
            "max": layer_runner(pools[0], x, True, jit, up_max),
            "noise": layer_runner(pools[1], x, True, jit, up_max),
            "ours": layer_runner(ours, x, True, jit, up_ours),
            # What the forward costs without the first-maximum search (the
            # inference path: region maxima only), and one elementwise op.
            "values": layer_runner(ours, x, False, jit),
            "negate": layer_runner(_Negate(name="negate"), x, False, jit),
        }
        specs = [
            (
                "ours",
                f"FractionalMaxPooling2D({RATIO}) forward + backward",
                "<= 4x",
                None,
            )
        ]
        if tensorflow and not jit:
            candidates["tf"] = layer_runner(
                _TensorFlowFractionalMaxPool(name="tf_fractional_max_pool"),
                x,
                True,
                False,
                up_ours,
            )
            specs.append(
                (
                    "tf",
                    "reference: tf.nn.fractional_max_pool forward + backward",
                    "(reference)",
                    "",
                )
            )
        measurement = paired_ratios(candidates, "max", "noise", quick=quick)
        note = (
            "same rounds: the region maxima alone (no first-maximum search, "
            f"no backward) {measurement.ratio('values'):.2f}x, one "
            f"elementwise op on the input {measurement.ratio('negate'):.2f}x"
        )
        specs[0] = (*specs[0][:3], note)
        rows += rows_from(
            measurement,
            specs,
            f"{BASELINE} forward + backward",
            f"{SHAPE} float32, {backend}, jit_compile={jit}",
        )

    jit = jit_settings()[0]
    measurement = paired_ratios(
        {
            "max": layer_runner(pools[0], x, False, jit),
            "noise": layer_runner(pools[1], x, False, jit),
            "ours": layer_runner(ours, x, False, jit),
        },
        "max",
        "noise",
        quick=quick,
    )
    rows += rows_from(
        measurement,
        [
            (
                "ours",
                f"FractionalMaxPooling2D({RATIO}) inference forward",
                "(information)",
                "",
            )
        ],
        f"{BASELINE} forward",
        f"{SHAPE} float32, {backend}, jit_compile={jit}",
    )
    return rows


if __name__ == "__main__":
    main(run)
