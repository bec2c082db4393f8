"""Averaging at test time, on real data: passes, views, members, iterates.

Four experiments, 3 seeds each, every row against the same network without
the averaging (test accuracy and log-loss, mean ± std over the seeds):

- `mc`: Monte Carlo averaging (`keras_regkit.models.MonteCarloAverage`) of
  an MLP on MNIST-1D with `Dropout(0.5)` and one with `DropConnectDense(0.5)`,
  against their deterministic inference (weight scaling; DropConnect's mean
  and Gaussian moment matching). Gal & Ghahramani (2016) report MC dropout
  at or below the weight-scaling error; Wan et al. (2013) prefer their
  Gaussian inference to the mean.
- `tta`: test-time augmentation (`keras_regkit.models.TestTimeAugmentation`)
  of a CNN on scikit-learn's digits, padded to 12x12 and trained on random
  10x10 crops (random translations): the center crop against the average of
  the center and the four corners (`"five_crop"`); the ten views with flips
  for a network also trained on flips (digits are not mirror symmetric, so
  this one is expected to lose). Krizhevsky et al. (2012) report 10-view
  averaging lowering top-1 error by about 1.5 points on ImageNet.
- `ensemble`: `keras_regkit.ensembles.ensemble_model` of four 1-D CNNs on
  MNIST-1D trained with different widths, learning rates and dropout,
  against each member and the best member, and the ensemble of the best
  settings trained from 4 seeds (Lakshminarayanan et al., 2017: ensembles
  beat their members in accuracy and log-loss).
- `swa`: `keras_regkit.callbacks.StochasticWeightAveraging` with the SWA
  paper's schedule (the training rate until 75% of the epochs, then annealed
  to a constant SWA rate, one iterate per epoch, batch-norm statistics
  recomputed), against the final weights of the same run and a run with the
  same budget under a step decay (Izmailov et al., 2018: SWA beats the
  standard schedule's final weights).

Each part exports its averaging model of seed 0 to
`saved_models/test_time_averaging_<part>` and exits non-zero unless the
SavedModel serves what `predict` returns.

Run from the repository root (about 10 minutes on 2 CPU cores):

    python examples/test_time_averaging.py            # all parts
    python examples/test_time_averaging.py mc tta     # some parts
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _common import accuracy_and_log_loss
from _common import export_and_check
from _common import load_digits_images
from _common import load_mnist1d
from _common import print_seed_table

import keras_regkit
from keras_regkit.callbacks import StochasticWeightAveraging
from keras_regkit.ensembles import ensemble_model
from keras_regkit.models import MonteCarloAverage
from keras_regkit.models import TestTimeAugmentation

SEEDS = (0, 1, 2)
PARTS = ("mc", "tta", "ensemble", "swa")


def evaluate(model, x, y):
    return accuracy_and_log_loss(model.predict(x, batch_size=500, verbose=0), y)


def record(rows, label, result):
    accuracy, log_loss = result
    rows.setdefault(f"accuracy, {label}", []).append(accuracy)
    rows.setdefault(f"log-loss, {label}", []).append(log_loss)


def print_rows(corner, rows):
    ordered = {k: v for k, v in rows.items() if k.startswith("accuracy")}
    ordered.update({k: v for k, v in rows.items() if k.startswith("log-loss")})
    print_seed_table(corner, ordered, SEEDS)


# Monte Carlo averaging ------------------------------------------------------

MC_PASSES = 32


def mlp(noise):
    dense = {
        "dropout": lambda: [
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.5),
        ],
        "dropconnect": lambda: [
            keras_regkit.layers.DropConnectDense(
                256, rate=0.5, activation="relu"
            ),
        ],
    }[noise]
    layers = [keras.Input((40,))]
    for _ in range(2):
        layers += dense()
    layers.append(keras.layers.Dense(10, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    return model


def with_inference(model, inference):
    """The trained model with its DropConnect layers' inference rule set."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras_regkit.layers.DropConnectDense):
            config["inference"] = inference
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def monte_carlo():
    x, y, x_test, y_test = load_mnist1d()
    rows, exported = {}, True
    for seed in SEEDS:
        for noise in ("dropout", "dropconnect"):
            keras.utils.set_random_seed(seed)
            model = mlp(noise)
            model.fit(x, y, batch_size=100, epochs=60, verbose=0)
            if noise == "dropout":
                record(
                    rows,
                    "Dropout, weight scaling",
                    evaluate(model, x_test, y_test),
                )
            else:
                for inference in ("mean", "gaussian"):
                    record(
                        rows,
                        f"DropConnect, {inference} inference",
                        evaluate(
                            with_inference(model, inference), x_test, y_test
                        ),
                    )
            averaged = MonteCarloAverage(model, num_passes=MC_PASSES, seed=seed)
            label = "Dropout" if noise == "dropout" else "DropConnect"
            record(
                rows,
                f"{label}, {MC_PASSES} passes averaged",
                evaluate(averaged, x_test, y_test),
            )
            if seed == SEEDS[0] and noise == "dropout":
                exported &= export_and_check(
                    averaged, x_test[:64], "test_time_averaging_mc"
                )
    print_rows("MNIST-1D test set (1000), MLP", rows)
    return exported


# Test-time augmentation -----------------------------------------------------


def padded_digits(seed):
    x, x_test, y, y_test = load_digits_images(seed=seed)
    pad = ((0, 0), (2, 2), (2, 2), (0, 0))
    return np.pad(x, pad), np.pad(x_test, pad), y, y_test


def digits_cnn(flip):
    augment = [keras.layers.RandomCrop(10, 10)]
    if flip:
        augment.append(keras.layers.RandomFlip("horizontal"))
    network = keras.Sequential(
        [
            keras.Input((10, 10, 1)),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="network",
    )
    inputs = keras.Input((12, 12, 1))
    trainer = keras.Model(inputs, network(keras.Sequential(augment)(inputs)))
    trainer.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    return trainer, network


def test_time_augmentation():
    rows, exported = {}, True
    for seed in SEEDS:
        x, x_test, y, y_test = padded_digits(seed)
        for flip in (False, True):
            keras.utils.set_random_seed(seed)
            trainer, network = digits_cnn(flip)
            trainer.fit(x, y, batch_size=32, epochs=40, verbose=0)
            trained = "crops and flips" if flip else "crops"
            for views in ("center", "five_crop", "ten_crop"):
                if views == "ten_crop" and not flip:
                    continue
                averaged = TestTimeAugmentation(
                    network, views=views, crop_size=(10, 10)
                )
                record(
                    rows,
                    f"trained on {trained}, test {views}",
                    evaluate(averaged, x_test, y_test),
                )
                if seed == SEEDS[0] and views == "five_crop" and not flip:
                    exported &= export_and_check(
                        averaged, x_test[:64], "test_time_averaging_tta"
                    )
    print_rows("digits test set (450), 12x12", rows)
    return exported


# Ensembles of separately trained models -------------------------------------

MEMBERS = (
    # (filters, learning rate, dropout)
    (32, 3e-3, 0.0),
    (64, 1e-3, 0.0),
    (32, 1e-3, 0.3),
    (64, 3e-3, 0.3),
)


def cnn_1d(filters, learning_rate, dropout):
    model = keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(filters, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(
                filters, 3, strides=2, padding="same", activation="relu"
            ),
            keras.layers.Conv1D(
                filters, 3, strides=2, padding="same", activation="relu"
            ),
            keras.layers.Flatten(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy"
    )
    return model


def ensembles():
    x, y, x_test, y_test = load_mnist1d(channels=True)
    rows, exported = {}, True
    for seed in SEEDS:
        members, results = [], []
        for index, (filters, learning_rate, dropout) in enumerate(MEMBERS):
            keras.utils.set_random_seed(seed * 10 + index)
            member = cnn_1d(filters, learning_rate, dropout)
            member.fit(x, y, batch_size=100, epochs=25, verbose=0)
            members.append(member)
            result = evaluate(member, x_test, y_test)
            results.append(result)
            record(
                rows,
                f"member {index + 1} ({filters} filters, lr {learning_rate:g}, "
                f"dropout {dropout:g})",
                result,
            )
        best = max(results, key=lambda r: r[0])
        record(rows, "best member (by test accuracy)", best)
        ensemble = ensemble_model(members)
        record(rows, "ensemble of the 4", evaluate(ensemble, x_test, y_test))
        if seed == SEEDS[0]:
            exported &= export_and_check(
                ensemble, x_test[:64], "test_time_averaging_ensemble"
            )
        # The deep-ensemble recipe: the best settings, 4 initializations.
        repeats = [members[-1]]
        for index in range(1, 4):
            keras.utils.set_random_seed(seed * 10 + 100 + index)
            repeat = cnn_1d(*MEMBERS[-1])
            repeat.fit(x, y, batch_size=100, epochs=25, verbose=0)
            repeats.append(repeat)
        record(
            rows,
            "ensemble of member 4's settings, 4 seeds",
            evaluate(ensemble_model(repeats), x_test, y_test),
        )
    print_rows("MNIST-1D test set (1000), 1-D CNN", rows)
    return exported


# SWA as one object -----------------------------------------------------------

SWA_EPOCHS = 32
SWA_LEARNING_RATE = 0.05


def cnn_bn():
    model = keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", use_bias=False
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Conv1D(
                32, 3, strides=2, padding="same", use_bias=False
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return model


def swa():
    x, y, x_test, y_test = load_mnist1d(channels=True)
    steps = len(x) // 100
    rows, exported = {}, True
    for seed in SEEDS:
        keras.utils.set_random_seed(seed)
        model = cnn_bn()
        decay = keras.optimizers.schedules.PiecewiseConstantDecay(
            [steps * SWA_EPOCHS // 2, steps * 3 * SWA_EPOCHS // 4],
            [0.1, 0.01, 0.001],
        )
        model.compile(
            keras.optimizers.SGD(decay, momentum=0.9),
            "sparse_categorical_crossentropy",
        )
        model.fit(x, y, batch_size=100, epochs=SWA_EPOCHS, verbose=0)
        record(
            rows, "step decay, final weights", evaluate(model, x_test, y_test)
        )

        keras.utils.set_random_seed(seed)
        model = cnn_bn()
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            "sparse_categorical_crossentropy",
        )
        averaging = StochasticWeightAveraging(
            SWA_LEARNING_RATE, batch_norm_data=x, final_weights="training"
        )
        model.fit(
            x,
            y,
            batch_size=100,
            epochs=SWA_EPOCHS,
            verbose=0,
            callbacks=[averaging],
        )
        record(
            rows, "SWA schedule, final weights", evaluate(model, x_test, y_test)
        )
        averaged = averaging.averaged_model()
        record(
            rows, "SWA schedule, averaged", evaluate(averaged, x_test, y_test)
        )
        if seed == SEEDS[0]:
            exported &= export_and_check(
                averaged, x_test[:64], "test_time_averaging_swa"
            )
    print_rows(f"MNIST-1D test set (1000), {SWA_EPOCHS} epochs", rows)
    return exported


def main(parts):
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    run = {
        "mc": monte_carlo,
        "tta": test_time_augmentation,
        "ensemble": ensembles,
        "swa": swa,
    }
    ok = True
    for part in parts or PARTS:
        start = time.perf_counter()
        print(f"\n## {part}\n")
        ok &= run[part]()
        print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
