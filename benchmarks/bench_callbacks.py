"""The toolkit's callbacks together in one `fit`, against a plain `fit`.

Target (issue 11): on a small model of about 2 ms a step, `fit` with the
callbacks that combine (one learning-rate policy with momentum cycling,
plus weight averaging at every step) costs at most 1.15x a plain `fit`.
Two combinations are timed: `OneCycle` (learning rate and SGD momentum)
with `PolyakAveraging` (EMA every step), and `SnapshotEnsemble` (cosine
restarts, one snapshot per cycle written to disk) with `PolyakAveraging`
(SWA, one iterate per cycle). A second plain model is the noise row.

The model is sized to the issue's small model: an MLP 40-U-U-10 whose
plain step takes about 2 ms on the 2-core machine the README's tables come
from, U = 448 on JAX. On TensorFlow the smallest (U = 256) already takes
over 3 ms a step, most of it the framework's own cost per step, so U = 256
there. The table prints the step time it measured.

Each candidate is its own model; one timing is a `fit` of 2 epochs with
fresh callbacks (snapshots written to a temporary directory). Rounds
alternate the order of the candidates (ABC, CBA, ...) and the table gives
the median of the per-round ratios (`_timing.py`).

Run: python benchmarks/bench_callbacks.py [--quick]
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _backend import fit_runner
from _timing import main
from _timing import paired_ratios
from _timing import rows_from

from keras_regkit.callbacks import OneCycle
from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.callbacks import SnapshotEnsemble

__all__ = ["run"]

SAMPLES = 4096
BATCH = 64
STEPS = SAMPLES // BATCH
EPOCHS = 2
BASELINE = "plain fit"
# Hidden width per backend: a plain step of about 2 ms (see above).
UNITS = {"jax": 448}.get(keras.backend.backend(), 256)


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Dense(UNITS, activation="relu"),
            keras.layers.Dense(UNITS, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def run(quick=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 40)).astype("float32")
    y = rng.integers(0, 10, size=SAMPLES)
    directory = tempfile.mkdtemp(prefix="bench-callbacks-")

    def one_cycle_and_ema():
        return [
            # The optimizer's counter runs on across the timings.
            OneCycle(0.05, total_steps=10**7),
            PolyakAveraging(decay=0.999, final_weights="training"),
        ]

    def snapshots_and_swa():
        return [
            SnapshotEnsemble(
                cycles=EPOCHS,
                max_lr=0.05,
                directory=os.path.join(directory, "snapshots"),
            ),
            PolyakAveraging(decay=None, every=STEPS, final_weights="training"),
        ]

    def fitter(model, make_callbacks):
        # A fresh run of EPOCHS epochs with fresh callbacks per timing.
        return fit_runner(model, x, y, BATCH, make_callbacks, epochs=EPOCHS)

    one_cycle = "OneCycle (lr + momentum) + PolyakAveraging (EMA every step)"
    snapshots = "SnapshotEnsemble + PolyakAveraging (SWA once per cycle)"
    measurement = paired_ratios(
        {
            BASELINE: fitter(_model(), list),
            "noise": fitter(_model(), list),
            one_cycle: fitter(_model(), one_cycle_and_ema),
            snapshots: fitter(_model(), snapshots_and_swa),
        },
        BASELINE,
        "noise",
        quick=quick,
    )
    step_ms = measurement.seconds(BASELINE) / (EPOCHS * STEPS) * 1e3
    return rows_from(
        measurement,
        [(name, name, "<= 1.15x", "") for name in (one_cycle, snapshots)],
        BASELINE,
        f"MLP 40-{UNITS}-{UNITS}-10, batch {BATCH}, {step_ms:.2f} ms a step, "
        f"{keras.backend.backend()}",
    )


if __name__ == "__main__":
    main(run)
