"""DropConnect on MNIST-1D: dropped weights vs dropped units vs neither.

Trains the same MLP on MNIST-1D (Greydanus, 2020; generated offline by the
`mnist1d` package, 4000 training and 1000 test signals of length 40) three
ways, for 3 seeds and the same number of epochs: hidden layers
`keras.layers.Dense` (no regularization), `Dense` followed by
`Dropout(0.5)`, and `keras_regkit.layers.DropConnectDense(rate=0.5)`
(Wan et al., 2013). It prints the test accuracy and log-loss of each, per
seed and as mean ± std, and, for the DropConnect model, both inference
rules: `inference="mean"` (the plain kernel) and `inference="gaussian"`
(the paper's moment-matched sampling, Algorithm 2), the same trained
weights in both.

It exports the DropConnect model of the last seed, with the paper's
`inference="gaussian"`, to `saved_models/drop_connect`, reloads it with
`tf.saved_model.load` and exits non-zero unless serving equals `predict`.

With `--settings [INDEX ...]` it instead runs the settings searched for
one where DropConnect helps (Wan et al. regularize the fully connected
layer over convolutional features): a hidden layer under the softmax
without regularization, with `Dropout` or as a `DropConnectDense`, on the
MNIST-1D MLP at rate 0.2, over the mnist1d paper's CNN features, and over
a small CNN's features on scikit-learn's 8x8 digits. It prints one table
per setting and exports the last DropConnect model the same way.
`--seeds N` runs seeds 0 .. N-1 (3 by default).

Run from the repository root (about 1-2 minutes on 2 CPU cores; the
settings take longer):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/drop_connect.py
    TF_CPP_MIN_LOG_LEVEL=2 python examples/drop_connect.py --settings
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from _common import accuracy_and_log_loss
from _common import add_seeds_argument
from _common import export_and_check
from _common import load_digits_images
from _common import load_mnist1d
from _common import print_seed_table

from keras_regkit.layers import DropConnectDense

SEEDS = (0, 1, 2)
EPOCHS = 60
BATCH_SIZE = 64
UNITS = 256
RATE = 0.5
VARIANTS = ("Dense", "Dense + Dropout(0.5)", "DropConnectDense(0.5)")


def build_model(variant, seed, inference="mean"):
    """40 -> 256 -> 256 -> 10 MLP; `variant` picks the hidden layers."""
    layers = [keras.Input((40,))]
    for i in range(2):
        if variant == "DropConnectDense(0.5)":
            layers.append(
                DropConnectDense(
                    UNITS,
                    rate=RATE,
                    inference=inference,
                    activation="relu",
                    seed=seed * 10 + i,
                )
            )
        else:
            layers.append(keras.layers.Dense(UNITS, activation="relu"))
            if variant == "Dense + Dropout(0.5)":
                layers.append(keras.layers.Dropout(RATE, seed=seed * 10 + i))
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def train(variant, seed, data):
    x, y, _, _ = data
    keras.utils.set_random_seed(seed)
    model = build_model(variant, seed)
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
    return model


def run(seed, data):
    x_test, y_test = data[2], data[3]
    rows, exported = {}, None
    for variant in VARIANTS:
        model = train(variant, seed, data)
        if variant != "DropConnectDense(0.5)":
            rows[variant] = accuracy_and_log_loss(
                model.predict(x_test, verbose=0), y_test
            )
            continue
        rows[f"{variant}, mean inference"] = accuracy_and_log_loss(
            model.predict(x_test, verbose=0), y_test
        )
        # The same trained weights, served with the paper's inference.
        gaussian = build_model(variant, seed, inference="gaussian")
        gaussian.set_weights(model.get_weights())
        exported = gaussian
        rows[f"{variant}, gaussian inference"] = accuracy_and_log_loss(
            gaussian.predict(x_test, verbose=0), y_test
        )
    return rows, exported


def print_table(results, seeds, corner="MNIST-1D test set (1000)"):
    rows = {
        f"{metric}, {row}": [results[s][row][index] for s in seeds]
        for metric, index in (("accuracy", 0), ("log-loss", 1))
        for row in results[seeds[0]]
    }
    print_seed_table(corner, rows, seeds, digits=4)


# Settings searched for one where DropConnect helps (`--settings`): name ->
# (data set, trunk, rate, epochs). The head is one hidden layer of
# `HEAD_UNITS` ReLU units (none / Dropout / DropConnect), then a softmax.
SETTINGS = {
    "MNIST-1D MLP, rate 0.2": ("mnist1d", "mlp", 0.2, 60),
    "MNIST-1D CNN, FC head, rate 0.5": ("mnist1d", "cnn", 0.5, 60),
    "digits CNN, FC head, rate 0.5": ("digits", "cnn", 0.5, 60),
}
HEAD_UNITS = 150  # Wan et al.'s MNIST network: a 150-unit DropConnect layer


def build_trunk(kind, shape):
    """The feature extractor under the head of a `--settings` model."""
    layers = [keras.Input(shape)]
    if kind == "mlp":
        layers.append(keras.layers.Dense(UNITS, activation="relu"))
    elif len(shape) == 2:
        # MNIST-1D: the mnist1d paper's CNN without its linear layer.
        for kernel_size in (5, 3, 3):
            layers += [
                keras.layers.ZeroPadding1D(1),
                keras.layers.Conv1D(
                    25, kernel_size, strides=2, activation="relu"
                ),
            ]
    else:
        # 8x8 digits: two 3x3 convolutions and a 2x2 max-pool.
        layers += [
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        ]
    layers.append(keras.layers.Flatten())
    return layers


def build_setting_model(trunk, shape, head, rate, seed, inference="mean"):
    """`trunk` features, one hidden layer with `head` regularization, softmax.

    `head` is `"none"`, `"dropout"` or `"dropconnect"`.
    """
    layers = build_trunk(trunk, shape)
    units = UNITS if trunk == "mlp" else HEAD_UNITS
    if head == "dropconnect":
        layers.append(
            DropConnectDense(
                units,
                rate=rate,
                inference=inference,
                activation="relu",
                seed=seed,
            )
        )
    else:
        layers.append(keras.layers.Dense(units, activation="relu"))
        if head == "dropout":
            layers.append(keras.layers.Dropout(rate, seed=seed))
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def load_setting_data(name):
    if name == "digits":
        x, x_test, y, y_test = load_digits_images()
        return x, y, x_test, y_test
    return load_mnist1d(channels=True)


def run_setting(name, seed, data):
    _, trunk, rate, epochs = SETTINGS[name]
    x, y, x_test, y_test = data
    if trunk == "mlp":
        x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    rows, exported = {}, None
    for head in ("none", "dropout", "dropconnect"):
        keras.utils.set_random_seed(seed)
        model = build_setting_model(trunk, x.shape[1:], head, rate, seed)
        model.compile(
            keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
        )
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
        label = {
            "none": "no regularization",
            "dropout": f"Dropout({rate:g})",
            "dropconnect": f"DropConnect({rate:g}), mean inference",
        }[head]
        rows[label] = accuracy_and_log_loss(
            model.predict(x_test, verbose=0), y_test
        )
        if head == "dropconnect":
            gaussian = build_setting_model(
                trunk, x.shape[1:], head, rate, seed, inference="gaussian"
            )
            gaussian.set_weights(model.get_weights())
            exported = (gaussian, x_test)
            rows[f"DropConnect({rate:g}), gaussian inference"] = (
                accuracy_and_log_loss(
                    gaussian.predict(x_test, verbose=0), y_test
                )
            )
    return rows, exported


def main_settings(names, seeds, start):
    exported = None
    for name in names:
        data = load_setting_data(SETTINGS[name][0])
        results = {}
        for seed in seeds:
            results[seed], exported = run_setting(name, seed, data)
            print(
                f"{name}: seed {seed} done ({time.time() - start:.0f} s)",
                flush=True,
            )
        _, trunk, rate, epochs = SETTINGS[name]
        print(
            f"\n{name}: {len(data[2])} test examples; the hidden layer under "
            f"the softmax ({UNITS if trunk == 'mlp' else HEAD_UNITS} ReLU "
            f"units) without regularization, with Dropout({rate:g}) or as "
            f"DropConnectDense(rate={rate:g}); Adam(1e-3), {epochs} epochs, "
            f"batch {BATCH_SIZE}.\n"
        )
        print_table(results, seeds, corner=name)
        print(flush=True)
    print(f"Total time: {time.time() - start:.0f} s")
    model, x_test = exported
    print("The last DropConnect model (gaussian inference), exported:")
    return export_and_check(model, x_test, "drop_connect")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--settings",
        nargs="*",
        metavar="INDEX",
        type=int,
        help="run the settings searched for one where DropConnect helps "
        "(all, or those at the given indices: "
        + "; ".join(f"{i}: {n}" for i, n in enumerate(SETTINGS))
        + ")",
    )
    add_seeds_argument(parser, len(SEEDS))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seeds = tuple(range(args.seeds))
    start = time.time()
    if args.settings is not None:
        names = list(SETTINGS)
        names = [names[i] for i in args.settings] if args.settings else names
        if not main_settings(names, seeds, start):
            sys.exit(1)
        return
    data = load_mnist1d()
    results = {}
    for seed in seeds:
        results[seed], exported = run(seed, data)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    print(
        f"\nMNIST-1D, MLP 40-{UNITS}-{UNITS}-10 (ReLU), Adam(1e-3), "
        f"{EPOCHS} epochs, batch {BATCH_SIZE}; DropConnect: rate {RATE}, "
        "one mask per batch, bias dropped too, 100 Gaussian samples.\n"
    )
    print_table(results, seeds)
    print(
        "\nThe DropConnect model of the last seed (gaussian inference), "
        "exported:"
    )
    if not export_and_check(exported, data[2], "drop_connect"):
        sys.exit(1)
    print(f"\nTotal time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
