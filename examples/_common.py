"""Helpers shared by the examples: offline data sets, SavedModel checks, tables.

The examples run as scripts (`python examples/<name>.py`), so this module is
imported as `_common` from the examples folder.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from keras_regkit._utils import atomic_path

__all__ = [
    "EXPORT_ROOT",
    "accuracy_and_log_loss",
    "add_seeds_argument",
    "export_and_check",
    "export_dir",
    "load_digits_images",
    "load_mnist1d",
    "mean_and_spread",
    "print_seed_table",
]

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORT_ROOT = os.path.normpath(os.path.join(HERE, os.pardir, "saved_models"))


def export_dir(name):
    """Where an example exports its model: `saved_models/<name>`."""
    return os.path.join(EXPORT_ROOT, name)


def load_mnist1d(channels=False):
    """MNIST-1D (Greydanus, 2020), generated offline by the `mnist1d` package.

    4000 training and 1000 test signals of length 40, 10 classes. The data is
    the same on every call: `make_dataset` reseeds NumPy's global generator
    with the data set's own seed, so call it before seeding a run.

    Args:
        channels: bool. Add a trailing channel axis, `(n, 40, 1)`, for
            `Conv1D` models. Defaults to `False`.

    Returns:
        `(x, y, x_test, y_test)`, float32 signals and int32 labels.
    """
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset

    data = make_dataset(get_dataset_args())
    x, x_test = data["x"].astype("float32"), data["x_test"].astype("float32")
    if channels:
        x, x_test = x[..., None], x_test[..., None]
    return x, data["y"].astype("int32"), x_test, data["y_test"].astype("int32")


def load_digits_images(seed=0, test_size=0.25):
    """scikit-learn's 8x8 handwritten digits, as images in [0, 1].

    Args:
        seed: int. The seed of the stratified train/test split. Defaults to
            `0`.
        test_size: float. The fraction of the 1797 images held out for
            testing. Defaults to `0.25` (450 test images).

    Returns:
        `(x_train, x_test, y_train, y_test)`, float32 images of shape
        `(n, 8, 8, 1)` and int32 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return tuple(
        train_test_split(
            x, y, test_size=test_size, random_state=seed, stratify=y
        )
    )


def export_and_check(model, x, name_or_path, atol=1e-5):
    """Exports `model` as a SavedModel and checks it serves `model.predict`.

    The export is written to a temporary folder and renamed into place, so an
    interrupted run never leaves a half-written SavedModel. Prints one line,
    `OK: ...` or `FAILED: ...`, with the largest difference.

    Args:
        model: The Keras model to export (one input, one output).
        x: A batch of inputs to compare on.
        name_or_path: A bare name, exported to `saved_models/<name>`, or a
            path (anything with a folder part, or a `pathlib.Path`).
        atol: float. The largest absolute difference accepted. Defaults to
            `1e-5`.

    Returns:
        bool: whether the served outputs have the shape of `predict`'s and
        are all within `atol` of them (a NaN anywhere fails).
    """
    import tensorflow as tf

    path = os.fspath(name_or_path)
    if not os.path.dirname(path):
        path = export_dir(path)
    with atomic_path(path) as temporary:
        model.export(temporary, verbose=False)
    reloaded = tf.saved_model.load(path)  # keep it alive while it serves
    served = np.asarray(reloaded.serve(tf.constant(x)))
    expected = np.asarray(model.predict(x, verbose=0))
    where = os.path.relpath(path)
    if served.shape != expected.shape:
        # Broadcasting would compare the wrong numbers and could pass.
        print(
            f"FAILED: exported to {where}; serving returns shape "
            f"{served.shape}, predict returns {expected.shape}"
        )
        return False
    error = float(np.max(np.abs(served - expected)))
    ok = error <= atol  # False for NaN
    print(
        f"{'OK' if ok else 'FAILED'}: exported to {where}; "
        f"max |served - predict| = {error:.2e} (tolerance {atol:g})"
    )
    return ok


def accuracy_and_log_loss(probabilities, y):
    """Top-1 accuracy and mean log-loss of class probabilities `(n, k)`.

    Probabilities are clipped to `[1e-7, 1]` before the log, as Keras's
    cross-entropy does, so one confident mistake cannot make it infinite.
    """
    probabilities = np.asarray(probabilities)
    y = np.asarray(y)
    accuracy = float(np.mean(np.argmax(probabilities, -1) == y))
    picked = probabilities[np.arange(len(y)), y]
    log_loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return accuracy, log_loss


def mean_and_spread(values, digits=4):
    """Formats per-seed values as `mean ± std`.

    The spread is the sample standard deviation (`ddof=1`), the estimate
    usually reported over seeds; it is 0 for a single value.

    Args:
        values: The per-seed values.
        digits: int. Decimals printed. Defaults to `4`.
    """
    values = np.asarray(values, dtype="float64")
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {spread:.{digits}f}"


def print_seed_table(corner, rows, seeds, digits=4):
    """Prints a markdown table: one row a result, one column a seed.

    The last column is the mean ± the sample standard deviation over seeds.

    Args:
        corner: str. The header of the label column.
        rows: dict mapping a row label to its values, one per seed, in the
            order of `seeds`.
        seeds: The seeds, for the column headers.
        digits: int. Decimals printed. Defaults to `4`.
    """
    header = [corner] + [f"seed {s}" for s in seeds] + ["mean ± std"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(seeds) + 1)) + "|")
    for label, values in rows.items():
        cells = [f"{v:.{digits}f}" for v in values]
        cells.append(mean_and_spread(values, digits))
        print(f"| {label} | " + " | ".join(cells) + " |")


def add_seeds_argument(parser, default):
    """Adds `--seeds N` (run seeds 0 .. N-1) to an example's argument parser.

    Args:
        parser: An `argparse.ArgumentParser`.
        default: int. The number of seeds when `--seeds` is not given.
    """
    parser.add_argument(
        "--seeds",
        type=int,
        default=default,
        help=f"number of seeds, 0 .. n-1 (default {default})",
    )
