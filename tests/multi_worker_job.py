"""The training job of the multi-device tests, and one worker of them.

`build_model` and `train` are shared by the `MultiWorkerMirroredStrategy`
test and the JAX `keras.distribution` test (`jax_data_parallel_job.py`).

`tests/test_distributed.py` starts two of these with a `TF_CONFIG` naming
both (a chief and a worker on localhost), as the README's recipe does on
two machines. Usage: `python multi_worker_job.py SNAPSHOT_DIR OUTPUT.npz`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.layers import DebiasedBatchNormalization
from keras_regkit.layers import DropConnectDense
from keras_regkit.layers import DropPath
from keras_regkit.layers import StochasticDepth

GLOBAL_BATCH = 16
EPOCHS = 4


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, rng.integers(0, 3, size=(64,))


def build_model(synchronized=True):
    """`synchronized=False` for JAX, where Keras refuses it (and where
    `keras.distribution` computes batch statistics on the global batch)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8)(inputs)
    x = DebiasedBatchNormalization(synchronized=synchronized)(x)
    x = x + DropPath(0.3, seed=3)(keras.layers.Dense(8)(x))
    x = StochasticDepth(keras.layers.Dense(8), 0.5, seed=4)(x)
    x = DropConnectDense(8, mask="sample", seed=5)(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def train(model, snapshot_dir):
    """Fits with the averaging and snapshot callbacks; returns the weights."""
    x, y = data()
    averaging = PolyakAveraging(decay=0.8)
    model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[
            averaging,
            SnapshotEnsemble(2, 0.1, snapshot_dir),
        ],
    )
    return model.get_weights() + averaging.get_averages()


def main(snapshot_dir, output):
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
    weights = train(model, snapshot_dir)
    np.savez(output, *weights)


if __name__ == "__main__":
    main(*sys.argv[1:])
