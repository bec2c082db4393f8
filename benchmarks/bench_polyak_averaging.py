"""`fit` with PolyakAveraging (EMA every step) vs plain `fit`.

Target (issue 11, item 6): on a 3-layer Dense(256) MLP, batch 64, `fit`
with `PolyakAveraging(decay=0.999)` folding in every step costs at most
1.10x `fit` without it, timed side by side in one run. The callback folds
the weights in from `on_train_batch_end`, in one compiled call per batch
(outside the train step). Keras's own `optimizer(use_ema=True)`, which
updates inside the step, is timed in the same run for comparison.

On TensorFlow the rows are the default `jit_compile` (off on a CPU-only
machine) and `jit_compile=True`; on JAX, whose trainer always compiles,
the `jit_compile=True` rows only. Each candidate is a model of its own,
trained by one `fit` call of `steps` steps per timing (the train function
is traced in the warm-up); candidates are timed in alternating rounds
(ABC, CBA, ...) and the medians compared, in wall time (`ratio`) and in
the CPU time of this process (`cpu_ratio`, less sensitive to other
processes on a shared machine). A second plain model is timed too: its
ratios to the first show the run's noise floor (ideally 1.00x).

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
    """Median wall and CPU times of each callable, in rounds ABC then CBA.

    Reversing the order every other round cancels both slow drifts of the
    machine and any advantage of a position in the round.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            gc.collect()
            begin, begin_cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            wall[name].append(time.perf_counter() - begin)
            cpu[name].append(time.process_time() - begin_cpu)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


def _rows(x, y, steps, jit_compile, repeats):
    averaging = PolyakAveraging(decay=0.999, final_weights="training")
    candidates = {
        "plain": (_model(jit_compile=jit_compile), []),
        "polyak": (_model(jit_compile=jit_compile), [averaging]),
        "use_ema": (_model(use_ema=True, jit_compile=jit_compile), []),
        "plain_again": (_model(jit_compile=jit_compile), []),
    }
    if keras.backend.backend() == "jax":
        # Keras 3.15 on JAX: the second `fit` of a model whose optimizer
        # has `use_ema=True` fails ("Attempt to donate the same buffer
        # twice"), so the reference row is TensorFlow's only.
        del candidates["use_ema"]

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

    medians, cpu = _alternating_medians(
        {name: fit(*candidate) for name, candidate in candidates.items()},
        repeats=repeats,
    )
    if averaging.num_averaged == 0:
        raise RuntimeError("PolyakAveraging averaged nothing: broken setup.")
    setup = (
        f"3 x Dense({UNITS}) MLP, batch {BATCH}, Adam, fit of {steps} steps, "
        f"jit_compile={jit_compile}, {keras.backend.backend()}"
    )

    def row(technique, name, target):
        return {
            "technique": f"{technique}; {setup}",
            "baseline": "plain fit",
            "ratio": medians[name] / medians["plain"],
            "cpu_ratio": f"{cpu[name] / cpu['plain']:.2f}x",
            "target": target,
        }

    rows = [
        row("PolyakAveraging(decay=0.999) every step", "polyak", "<= 1.10x"),
        row(
            "plain fit of a second, identical model",
            "plain_again",
            "(noise check: 1.00x)",
        ),
    ]
    if "use_ema" in candidates:
        rows.insert(
            1, row("Keras Adam(use_ema=True)", "use_ema", "(reference)")
        )
    return rows


def run(quick=False):
    steps = 30 if quick else 150
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=BATCH * steps)
    repeats = 6 if quick else 12
    settings = [True] if keras.backend.backend() == "jax" else [False, True]
    return [
        row
        for jit_compile in settings
        for row in _rows(x, y, steps, jit_compile, repeats)
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(parser.parse_args().quick)))
