"""Quick start: every keras_regkit part in one small model on real data.

Trains a small residual CNN on scikit-learn's handwritten digits (8x8 images,
shipped with scikit-learn, so it works offline) with the toolkit's parts:

- layers: `DebiasedBatchNormalization`, `StochasticDepth` blocks with the
  linear decay rule, a `DropPath` residual block, `FractionalMaxPooling2D`
  and `DropConnectDense`;
- the LR range test (`lr_range_test`) to pick the learning-rate bounds, then
  `CyclicLR` between them (`OneCycle` is the alternative policy);
- `PolyakAveraging` as SWA, one iterate per cycle, with the batch-norm
  statistics recomputed for the averaged weights
  (`recompute_batchnorm_statistics`);
- the paper's test-time averaging of fractional poolings
  (`FractionalPoolingAverage`);
- a short `SnapshotEnsemble` run whose snapshots are averaged in one model.

It prints the test accuracies, exports the averaged model with test-time
averaging (one graph) to `saved_models/quickstart`, reloads it with
`tf.saved_model.load` and checks that it serves the same outputs as
`model.predict`. Exits non-zero if it does not.

Run: python examples/quickstart.py
"""

import argparse
import sys
import tempfile

import keras
import numpy as np
from _common import export_and_check
from _common import export_dir
from _common import load_digits_images

from keras_regkit import callbacks
from keras_regkit import layers

BATCH_SIZE = 64


def conv_block(filters):
    """The residual branch: conv, batch norm, ReLU, conv, batch norm."""
    return [
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
        layers.DebiasedBatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
        layers.DebiasedBatchNormalization(),
    ]


def build_model(seed, filters=32, num_blocks=3):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(inputs)
    x = layers.DebiasedBatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    # Stochastic depth: whole blocks skipped per batch, p_l = 1 - l/L * 0.5.
    survival = layers.linear_survival_probabilities(num_blocks, 0.5)
    for i, p in enumerate(survival):
        x = layers.StochasticDepth(conv_block(filters), p, seed=seed + i)(x)
    # Drop path: the per-example form, on a functional residual branch.
    branch = x
    for layer in conv_block(filters):
        branch = layer(branch)
    x = keras.layers.Add()([x, layers.DropPath(0.1, seed=seed)(branch)])
    x = keras.layers.ReLU()(x)
    x = layers.FractionalMaxPooling2D(2**0.5, seed=seed)(x)  # 8x8 -> 5x5
    x = keras.layers.Flatten()(x)
    x = layers.DropConnectDense(64, rate=0.3, activation="relu", seed=seed)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="quickstart")


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-dir", default=export_dir("quickstart"))
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = load_digits_images(args.seed)
    keras.utils.set_random_seed(args.seed)
    model = build_model(args.seed)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    # 1. LR range test (Smith, 2017): the model is restored afterwards.
    test = callbacks.lr_range_test(
        model,
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        min_lr=1e-4,
        max_lr=3.0,
        steps=120,
    )
    bounds = test.suggestion
    print(
        f"LR range test: base_lr={bounds['base_lr']:.3g}, "
        f"max_lr={bounds['max_lr']:.3g}"
    )

    # 2. CyclicLR between the bounds; SWA takes one iterate at the end of
    # each cycle (lowest learning rate) in the second half of training, and
    # recomputes the batch-norm statistics for the averaged weights.
    steps_per_epoch = -(-len(x_train) // BATCH_SIZE)
    step_size = 2 * steps_per_epoch
    cycle = 2 * step_size
    total = args.epochs * steps_per_epoch
    swa = callbacks.PolyakAveraging(
        decay=None,
        start=(total // 2) // cycle * cycle,
        every=cycle,
        batch_norm="recompute",
        batch_norm_data=x_train,
    )
    model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        callbacks=[callbacks.CyclicLR(**bounds, step_size=step_size), swa],
        verbose=2,
    )
    print(f"test accuracy, SWA weights: {accuracy(model, x_test, y_test):.4f}")

    # 3. Test-time averaging over 12 fractional poolings (Graham, 2014).
    averaged = layers.FractionalPoolingAverage(model, num_passes=12)
    print(
        "test accuracy, SWA + 12 poolings averaged: "
        f"{accuracy(averaged, x_test, y_test):.4f}"
    )

    # 4. Snapshot ensemble (Huang et al., 2017): 3 cosine cycles from here.
    with tempfile.TemporaryDirectory() as directory:
        snapshots = callbacks.SnapshotEnsemble(
            cycles=3, max_lr=bounds["base_lr"], directory=directory
        )
        model.fit(
            x_train,
            y_train,
            batch_size=BATCH_SIZE,
            epochs=6,
            callbacks=[snapshots],
            verbose=0,
        )
        ensemble = snapshots.ensemble_model(last=3)
        print(
            "test accuracy, ensemble of 3 snapshots: "
            f"{accuracy(ensemble, x_test, y_test):.4f}"
        )

    # 5. Export the SWA model with test-time averaging as one SavedModel.
    if not export_and_check(averaged, x_test, args.export_dir):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
