"""Quick start: every keras_regkit part in one small model on real data.

Trains a small residual CNN on scikit-learn's handwritten digits (8x8 images,
shipped with scikit-learn, so it works offline), prints the test accuracy,
exports a SavedModel to `saved_models/quickstart`, reloads it with
`tf.saved_model.load` and checks that it serves the same outputs as
`model.predict`. Exits non-zero if it does not.

Run: python examples/quickstart.py
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from keras_regkit import layers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORT_DIR = os.path.join(HERE, os.pardir, "saved_models", "quickstart")


def load_data(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=seed,
                            stratify=y)


def residual_block(filters):
    return [
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
    ]


def build_model(seed, num_blocks=4, filters=32):
    survival = layers.linear_survival_probabilities(num_blocks, 0.5)
    return keras.Sequential(
        [keras.Input((8, 8, 1)),
         keras.layers.Conv2D(filters, 3, padding="same", activation="relu")]
        + [
            layers.StochasticDepth(residual_block(filters), p,
                                   seed=seed + i)
            for i, p in enumerate(survival)
        ]
        + [
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            layers.DropConnectDense(64, rate=0.3, activation="relu",
                                    seed=seed),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="quickstart",
    )


def check_saved_model(model, x, export_dir):
    import tensorflow as tf

    model.export(export_dir, verbose=False)
    reloaded = tf.saved_model.load(export_dir)
    served = reloaded.serve(x).numpy()
    expected = model.predict(x, verbose=0)
    return float(np.max(np.abs(served - expected)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-dir", default=EXPORT_DIR)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_model(args.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs,
              validation_split=0.1, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")

    export_dir = os.path.normpath(args.export_dir)
    difference = check_saved_model(model, x_test, export_dir)
    print(f"exported to {export_dir}; max |served - predict| = {difference:.2e}")
    if difference > 1e-5:
        print("FAILED: the SavedModel serves different outputs")
        return 1
    print("OK: the SavedModel serves the same outputs as model.predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
