"""Cyclical learning rates on MNIST-1D: an LR range test, then CyclicLR.

Follows Smith (2017): run the learning-rate range test on a fresh model (the
model and optimizer are restored afterwards), write the loss-against-rate plot
to a PNG, and train with `CyclicLR` between the suggested bounds. For
comparison it trains the same network, from the same initial weights and for
the same number of iterations, with each bound held constant and with the
one-cycle policy (`OneCycle` at the suggested `max_lr`), and prints a table
of test accuracies. The data is MNIST-1D (Greydanus, 2020), generated offline
by the `mnist1d` package: 4000 training and 1000 test signals of length 40,
10 classes.

The CyclicLR model is exported to `saved_models/cyclic_lr`, reloaded with
`tf.saved_model.load`, and its serving outputs are checked against
`model.predict`; the script exits non-zero if they differ.

Run: python examples/cyclic_lr.py [--epochs 24] [--plot path.png]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from _common import export_and_check
from _common import export_dir
from _common import load_mnist1d

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.callbacks import lr_range_test

PLOT_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "cyclic_lr_range_test.png"
)
BATCH_SIZE = 64


def build_model():
    return keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="mnist1d_cnn",
    )


def compiled(initial_weights, learning_rate=0.01):
    model = build_model()
    model.set_weights(initial_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot",
        default=PLOT_PATH,
        help="where to write the range-test plot (PNG)",
    )
    parser.add_argument("--export-dir", default=export_dir("cyclic_lr"))
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x, y, x_test, y_test = load_mnist1d(channels=True)
    initial_weights = build_model().get_weights()

    model = compiled(initial_weights)
    test = lr_range_test(
        model,
        x,
        y,
        batch_size=BATCH_SIZE,
        min_lr=1e-5,
        max_lr=10.0,
        steps=150,
        plot_path=args.plot,
    )
    bounds = test.suggestion
    outcome = (
        f"diverged at lr={test.divergence_lr:.3g}"
        if test.divergence_lr is not None
        else "did not diverge"
    )
    print(
        f"range test: {len(test.losses)} batches, {outcome}; loss minimum "
        f"at lr={test.min_loss_lr:.3g}; suggested base_lr="
        f"{bounds['base_lr']:.3g}, max_lr={bounds['max_lr']:.3g}; plot "
        f"written to {os.path.normpath(args.plot)}"
    )

    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    # Smith: a half cycle of 2 to 10 epochs; 3 epochs gives 4 cycles here.
    step_size = 3 * steps_per_epoch
    runs = {
        f"constant lr {bounds['base_lr']:.3g} (base_lr)": (
            bounds["base_lr"],
            [],
        ),
        f"constant lr {bounds['max_lr']:.3g} (max_lr)": (bounds["max_lr"], []),
        "CyclicLR triangular2": (
            bounds["base_lr"],
            [CyclicLR(**bounds, step_size=step_size, mode="triangular2")],
        ),
        "OneCycle at max_lr": (bounds["base_lr"], [OneCycle(bounds["max_lr"])]),
    }
    results, trained = {}, {}
    for name, (learning_rate, callbacks) in runs.items():
        keras.utils.set_random_seed(args.seed)
        model = compiled(initial_weights, learning_rate)
        history = model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=args.epochs,
            callbacks=callbacks,
            verbose=0,
        )
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        results[name] = (history.history["loss"][-1], accuracy)
        trained[name] = model
        print(
            f"{name}: final train loss {results[name][0]:.4f}, "
            f"test accuracy {accuracy:.4f}"
        )

    print(
        f"\nMNIST-1D, SGD momentum 0.9, batch {BATCH_SIZE}, "
        f"{args.epochs} epochs ({args.epochs * steps_per_epoch} iterations)"
    )
    print("| schedule | final train loss | test accuracy |")
    print("| --- | --- | --- |")
    for name, (loss, accuracy) in results.items():
        print(f"| {name} | {loss:.4f} | {accuracy:.4f} |")

    print()
    # A path, even a bare folder name, so it is not taken as a name.
    served_ok = export_and_check(
        trained["CyclicLR triangular2"],
        x_test,
        os.path.abspath(args.export_dir),
    )
    return 0 if served_ok else 1


if __name__ == "__main__":
    sys.exit(main())
