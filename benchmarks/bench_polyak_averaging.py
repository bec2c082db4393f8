"""`fit` with PolyakAveraging (EMA every step) vs plain `fit`.

Target (issue 6): on a 3-layer Dense(256) MLP, batch 64, `fit` with
`PolyakAveraging(decay=0.999)` updated every step costs at most 1.10x `fit`
without it, timed side by side in one run. Keras's own
`optimizer(use_ema=True)` is timed in the same run for comparison. The
target row is the default `jit_compile` (off on a CPU-only machine, where
TensorFlow runs each element-wise operation as its own kernel); rows with
`jit_compile=True` (XLA fuses the update) follow.

Each candidate is a model of its own, trained by one `fit` call of `steps`
steps per timing (the train function is traced once, in the warm-up);
candidates are timed in alternating rounds (ABC, CBA, ...) and the medians
compared. A second plain model is timed too: its ratio to the first shows
the run's noise floor (ideally 1.00x).

Run: python benchmarks/bench_polyak_averaging.py [--quick]
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
from _timing import markdown_table

from keras_regkit.callbacks import PolyakAveraging

FEATURES = 784
UNITS = 256
CLASSES = 10
BATCH = 64


def _model(use_ema=False, jit_compile=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((FEATURES,))]
        + [keras.layers.Dense(UNITS, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(CLASSES)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, use_ema=use_ema),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _alternating_medians(candidates, repeats, warmup=2):
    """Median wall time of each callable, timed in rounds of ABC then CBA.

    Reversing the order every other round cancels both slow drifts of the
    machine and any advantage of a position in the round.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            gc.collect()
            begin = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(t) for name, t in times.items()}


def _rows(x, y, steps, jit_compile, repeats):
    averaging = PolyakAveraging(decay=0.999, final_weights="training")
    candidates = {
        "plain": (_model(jit_compile=jit_compile), []),
        "polyak": (_model(jit_compile=jit_compile), [averaging]),
        "use_ema": (_model(use_ema=True, jit_compile=jit_compile), []),
        "plain_again": (_model(jit_compile=jit_compile), []),
    }

    def fit(model, callbacks):
        return lambda: model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )

    medians = _alternating_medians(
        {name: fit(*candidate) for name, candidate in candidates.items()},
        repeats=repeats,
    )
    if averaging.num_averaged == 0:
        raise RuntimeError("PolyakAveraging averaged nothing: broken setup.")
    setup = (
        f"3 x Dense({UNITS}) MLP, batch {BATCH}, Adam, fit of {steps} steps, "
        f"jit_compile={jit_compile}"
    )
    return [
        {
            "technique": f"PolyakAveraging(decay=0.999) every step; {setup}",
            "baseline": "plain fit",
            "ratio": medians["polyak"] / medians["plain"],
            "target": "<= 1.10x",
        },
        {
            "technique": f"Keras Adam(use_ema=True); {setup}",
            "baseline": "plain fit",
            "ratio": medians["use_ema"] / medians["plain"],
            "target": "(reference)",
        },
        {
            "technique": f"plain fit of a second, identical model; {setup}",
            "baseline": "plain fit",
            "ratio": medians["plain_again"] / medians["plain"],
            "target": "(noise check: 1.00x)",
        },
    ]


def run(quick=False):
    steps = 30 if quick else 150
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=BATCH * steps)
    repeats = 4 if quick else 12
    return _rows(x, y, steps, False, repeats) + _rows(
        x, y, steps, True, repeats
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(parser.parse_args().quick)))
