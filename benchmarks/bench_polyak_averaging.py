"""`fit` with PolyakAveraging (EMA every step) vs plain `fit`.

Target (issue 11, item 6): on a 3-layer Dense(256) MLP, batch 64, `fit`
with `PolyakAveraging(decay=0.999)` folding in every step costs at most
1.10x `fit` without it, timed side by side in one run. The callback folds
the previous step's weights in from `on_train_batch_begin`, in one compiled
call per batch (outside the train step; nothing at batch end, which would
cost Keras its asynchronous dispatch of steps). Keras's own
`optimizer(use_ema=True)`, which updates inside the step, is timed in the
same run for comparison, and so is this toolkit's in-step form of the same
average, `optimizers.AveragedOptimizer(Adam, decay=0.999)`.

On TensorFlow the rows are the default `jit_compile` (off on a CPU-only
machine) and `jit_compile=True`; on JAX, whose trainer always compiles,
the `jit_compile=True` rows only. Each candidate is a model of its own,
trained by one `fit` call of `steps` steps per timing (the train function
is traced in the warm-up); candidates are timed in alternating rounds
(ABC, CBA, ...) with the protocol of `_timing.py`. A second plain model is
the noise row.

Run: python benchmarks/bench_polyak_averaging.py [--quick]
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

from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.optimizers import AveragedOptimizer

__all__ = ["run"]

FEATURES = 784
UNITS = 256
CLASSES = 10
BATCH = 64


def _model(use_ema=False, jit_compile=False, averaged=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((FEATURES,))]
        + [keras.layers.Dense(UNITS, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(CLASSES)]
    )
    optimizer = keras.optimizers.Adam(1e-3, use_ema=use_ema)
    if averaged:
        optimizer = AveragedOptimizer(optimizer, decay=0.999)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _rows(x, y, steps, jit_compile, quick):
    averaging = PolyakAveraging(decay=0.999, final_weights="training")
    candidates = {
        "plain": (_model(jit_compile=jit_compile), []),
        "noise": (_model(jit_compile=jit_compile), []),
        "polyak": (_model(jit_compile=jit_compile), [averaging]),
        "use_ema": (_model(use_ema=True, jit_compile=jit_compile), []),
        "averaged": (_model(jit_compile=jit_compile, averaged=True), []),
    }
    if keras.backend.backend() == "jax":
        # Keras 3.15 on JAX: the second `fit` of a model whose optimizer
        # has `use_ema=True` fails ("Attempt to donate the same buffer
        # twice"), so the reference row is TensorFlow's only.
        del candidates["use_ema"]
    measurement = paired_ratios(
        {
            name: fit_runner(
                model, x, y, BATCH, lambda callbacks=callbacks: callbacks
            )
            for name, (model, callbacks) in candidates.items()
        },
        "plain",
        "noise",
        quick=quick,
    )
    if averaging.num_averaged == 0:
        raise RuntimeError("PolyakAveraging averaged nothing: broken setup.")
    specs = [
        ("polyak", "PolyakAveraging(decay=0.999) every step", "<= 1.10x", "")
    ]
    if "use_ema" in candidates:
        specs.append(("use_ema", "Keras Adam(use_ema=True)", "(reference)", ""))
    specs.append(
        (
            "averaged",
            "AveragedOptimizer(Adam, decay=0.999), in the step",
            "<= 1.10x",
            "",
        )
    )
    return rows_from(
        measurement,
        specs,
        "plain fit",
        f"3 x Dense({UNITS}) MLP, batch {BATCH}, Adam, fit of {steps} "
        f"steps, {keras.backend.backend()}, jit_compile={jit_compile}",
    )


def run(quick=False):
    steps = 30 if quick else 150
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=BATCH * steps)
    return [
        row
        for jit_compile in jit_settings()
        for row in _rows(x, y, steps, jit_compile, quick)
    ]


if __name__ == "__main__":
    main(run)
