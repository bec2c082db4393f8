"""A recipe from keras_regkit's parts against a plain CNN on MNIST-1D.

MNIST-1D (Greydanus, 2020; 4000 training and 1000 test signals of length
40, generated offline by the `mnist1d` package) is small enough to train on
2 CPU cores and hard enough to separate models: its paper reports 32% / 68% /
94% test accuracy for logistic regression / an MLP / a CNN.

For 3 seeds this script trains

- the baseline: the paper's CNN in plain Keras, three `Conv1D` layers of 25
  filters (kernel 5 stride 2, then kernel 3 stride 2 twice, padding 1 each,
  ReLU) and a linear layer to 10 logits, Adam at 1e-2, batch 100, 60 epochs;
- the same network as the recipe built from plain Keras parts
  (`BatchNormalization`, a `Dense` head), Adam at a constant 1e-2, 30
  epochs, no averaging: the ablation;
- the recipe: three same-padded `Conv1D` layers of 64 filters (kernels
  5, 3, 3, stride 1, so the head sees every position) each followed by
  `keras_regkit.layers.DebiasedBatchNormalization` and ReLU, then a
  `keras_regkit.layers.DropConnectDense` head (rate 0.5) to 10 logits;
  Adam, batch 100, 30 epochs under `keras_regkit.callbacks.OneCycle`
  (peak 1e-2, PyTorch's cosine two-phase form; the learning rate only:
  Adam's `beta_1` is a constant of its compiled step), with
  `keras_regkit.callbacks.PolyakAveraging` (an EMA of the weights, decay
  0.99, batch-norm statistics averaged with them) whose averaged weights
  are the final model.

With `--ablation` it instead separates the recipe's three factors on its
network: plain Keras parts at a constant learning rate (none), the
toolkit's parts alone, `OneCycle` alone, `PolyakAveraging` alone, and all
three, and prints their test accuracy per seed and how far each mean is
from the first row's against the larger of the two seed spreads.
`--seeds N` runs seeds 0 .. N-1 (3 by default).

By default it prints one table over the seeds of the test and training
accuracy of both (training accuracy measured in inference mode after
training), the mean and sample standard deviation, and the total wall
time. It exports the recipe model of the last seed to
`saved_models/mnist1d_recipe`, reloads it with `tf.saved_model.load` and
exits non-zero unless serving equals `predict`.

Run from the repository root (about 1-2 minutes on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/mnist1d_recipe.py
    TF_CPP_MIN_LOG_LEVEL=2 python examples/mnist1d_recipe.py --ablation
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import add_seeds_argument
from _common import export_and_check
from _common import load_mnist1d
from _common import mean_and_spread
from _common import print_seed_table

from keras_regkit.callbacks import OneCycle
from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.layers import DebiasedBatchNormalization
from keras_regkit.layers import DropConnectDense

SEEDS = (0, 1, 2)
BATCH_SIZE = 100
BASELINE_EPOCHS = 60
RECIPE_EPOCHS = 30
RECIPE_WIDTH = 64
PEAK_LR = 1e-2
PAPER_CNN_ACCURACY = 0.94


def build_baseline():
    """The paper's CNN: 3 x [pad 1, Conv1D(25, stride 2), ReLU], linear."""
    layers = [keras.Input((40, 1))]
    for kernel_size in (5, 3, 3):
        layers += [
            keras.layers.ZeroPadding1D(1),
            keras.layers.Conv1D(25, kernel_size, strides=2, activation="relu"),
        ]
    layers += [keras.layers.Flatten(), keras.layers.Dense(10)]
    return keras.Sequential(layers, name="baseline")


def build_recipe(seed, toolkit=True):
    """3 x [Conv1D(64, same), DebiasedBatchNormalization, ReLU], DropConnect.

    With `toolkit=False`, the same network from plain Keras parts
    (`BatchNormalization`, `Dense`): the ablation that shows what the
    toolkit's parts add to the architecture.
    """
    normalization = (
        DebiasedBatchNormalization
        if toolkit
        else keras.layers.BatchNormalization
    )
    layers = [keras.Input((40, 1))]
    for kernel_size in (5, 3, 3):
        layers += [
            keras.layers.Conv1D(
                RECIPE_WIDTH, kernel_size, padding="same", use_bias=False
            ),
            normalization(),
            keras.layers.ReLU(),
        ]
    head = (
        DropConnectDense(10, rate=0.5, seed=seed)
        if toolkit
        else keras.layers.Dense(10)
    )
    layers += [keras.layers.Flatten(), head]
    return keras.Sequential(layers, name="recipe" if toolkit else "ablation")


def compile_for_logits(model, learning_rate):
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def train_recipe_network(
    seed, data, toolkit=True, schedule=True, averaging=True
):
    """Trains the recipe's network with any subset of its three factors.

    Args:
        toolkit: bool. `DebiasedBatchNormalization` and a
            `DropConnectDense(rate=0.5)` head; plain `BatchNormalization` and
            `Dense` otherwise.
        schedule: bool. `OneCycle` (peak `PEAK_LR`); a constant `PEAK_LR`
            otherwise.
        averaging: bool. `PolyakAveraging` (EMA 0.99), whose averaged
            weights are the final model; the last weights otherwise.
    """
    x, y, _, _ = data
    keras.utils.set_random_seed(seed)
    model = build_recipe(seed, toolkit=toolkit)
    # OneCycle sets the learning rate at every step; this is its start value.
    compile_for_logits(model, PEAK_LR)
    callbacks = []
    if schedule:
        callbacks.append(
            OneCycle(
                max_lr=PEAK_LR,
                pct_start=0.3,
                anneal_strategy="cos",
                three_phase=False,
                base_momentum=None,
                max_momentum=None,
            )
        )
    if averaging:
        callbacks.append(PolyakAveraging(decay=0.99))
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=RECIPE_EPOCHS,
        callbacks=callbacks,
        verbose=0,
    )
    return model


def run(seed, data):
    x, y, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    baseline = build_baseline()
    compile_for_logits(baseline, PEAK_LR)
    baseline.fit(x, y, batch_size=BATCH_SIZE, epochs=BASELINE_EPOCHS, verbose=0)

    ablation = train_recipe_network(
        seed, data, toolkit=False, schedule=False, averaging=False
    )
    recipe = train_recipe_network(seed, data)
    row = {
        "baseline CNN, test": accuracy(baseline, x_test, y_test),
        "baseline CNN, train": accuracy(baseline, x, y),
        "same network, plain Keras parts, constant lr, test": accuracy(
            ablation, x_test, y_test
        ),
        "recipe, test": accuracy(recipe, x_test, y_test),
        "recipe, train": accuracy(recipe, x, y),
    }
    return row, recipe


# (label, toolkit parts, OneCycle schedule, weight averaging)
ABLATION = (
    ("plain Keras parts, constant lr (none)", False, False, False),
    ("toolkit parts alone", True, False, False),
    ("OneCycle alone", False, True, False),
    ("PolyakAveraging alone", False, False, True),
    ("all three (the recipe)", True, True, True),
)


def run_ablation(seed, data):
    """Test accuracy of the recipe's network with each factor alone."""
    row, model = {}, None
    for label, toolkit, schedule, averaging in ABLATION:
        model = train_recipe_network(
            seed, data, toolkit=toolkit, schedule=schedule, averaging=averaging
        )
        row[label] = accuracy(model, data[2], data[3])
    return row, model


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="separate the recipe's factors (parts, schedule, averaging)",
    )
    add_seeds_argument(parser, len(SEEDS))
    return parser.parse_args(argv)


def main_ablation(seeds, data, start):
    results = {}
    for seed in seeds:
        results[seed], model = run_ablation(seed, data)
        scores = ", ".join(f"{v:.4f}" for v in results[seed].values())
        print(
            f"seed {seed} done ({time.time() - start:.0f} s): {scores}",
            flush=True,
        )
    wall = time.time() - start
    print(
        f"\nMNIST-1D (4000 train / 1000 test), test accuracy of the recipe's "
        f"network, 3 x [Conv1D({RECIPE_WIDTH}, same), batch norm, ReLU], "
        f"Flatten, 10-way head; Adam, batch {BATCH_SIZE}, {RECIPE_EPOCHS} "
        "epochs. Toolkit parts: DebiasedBatchNormalization and "
        "DropConnectDense(10, rate=0.5) instead of BatchNormalization and "
        f"Dense. OneCycle: peak {PEAK_LR:g}, cosine, 30% warm-up; otherwise "
        f"a constant {PEAK_LR:g}. PolyakAveraging: EMA 0.99 of the weights "
        "and batch-norm statistics; otherwise the last weights.\n"
    )
    rows = {label: [results[s][label] for s in seeds] for label in results[0]}
    print_seed_table("MNIST-1D test accuracy", rows, seeds, digits=4)
    print(
        f"\nTotal wall time ({len(seeds)} seeds, 5 models each): {wall:.0f} s"
    )
    reference = rows[ABLATION[0][0]]
    print(f"\nEach row against '{ABLATION[0][0]}' (difference of means,")
    print("and whether it exceeds the larger of the two sample stds):")
    for label, values in rows.items():
        if label == ABLATION[0][0]:
            continue
        difference = np.mean(values) - np.mean(reference)
        spread = max(np.std(values, ddof=1), np.std(reference, ddof=1))
        verdict = "exceeds" if abs(difference) > spread else "within"
        print(
            f"- {label}: {difference:+.4f} ({verdict} the spread {spread:.4f})"
        )
    print("\nThe recipe model of the last seed (averaged weights):")
    return export_and_check(model, data[2], "mnist1d_recipe")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seeds = tuple(range(args.seeds))
    start = time.time()
    data = load_mnist1d(channels=True)
    if args.ablation:
        if not main_ablation(seeds, data, start):
            sys.exit(1)
        return
    results = {}
    for seed in seeds:
        results[seed], recipe = run(seed, data)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    wall = time.time() - start
    print(
        "\nMNIST-1D (4000 train / 1000 test), accuracy. Baseline: the paper's"
        f" CNN, Adam {PEAK_LR:g}, batch {BATCH_SIZE}, {BASELINE_EPOCHS} "
        f"epochs. Recipe: 3 x [Conv1D({RECIPE_WIDTH}, same), "
        "DebiasedBatchNormalization, ReLU], DropConnectDense(10, rate=0.5), "
        f"Adam, batch {BATCH_SIZE}, {RECIPE_EPOCHS} epochs, OneCycle "
        f"(peak {PEAK_LR:g}), PolyakAveraging (EMA 0.99).\n"
    )
    rows = {label: [results[s][label] for s in seeds] for label in results[0]}
    print_seed_table("MNIST-1D accuracy", rows, seeds, digits=4)
    print(f"\nTotal wall time ({len(seeds)} seeds, all models): {wall:.0f} s")
    recipe_test = rows["recipe, test"]
    beats = np.mean(recipe_test) > PAPER_CNN_ACCURACY
    print(
        f"Recipe test accuracy {mean_and_spread(recipe_test)} vs the paper's "
        f"CNN {PAPER_CNN_ACCURACY:.2f}: "
        f"{'beats it' if beats else 'does NOT beat it'}"
    )
    print("\nThe recipe model of the last seed (averaged weights):")
    if not export_and_check(recipe, data[2], "mnist1d_recipe"):
        sys.exit(1)


if __name__ == "__main__":
    main()
