"""Every part of the toolkit, trained by one JAX process or by one of two.

Run by `tests/test_jax_multi_process.py`, which starts three of these: a
single-device reference, and two processes of one `keras.distribution` run
on localhost (the README's "Across machines" recipe). Usage:

    python jax_multi_process_job.py OUTPUT_DIR            # one device
    python jax_multi_process_job.py OUTPUT_DIR PORT ID    # process ID of 2

Both runs see the same global batches (`GLOBAL_BATCH` examples; each of the
two processes is fed its half of every one), build the same models from the
same seeds, and write `OUTPUT_DIR/<run>.npz` (`single`, `process0`,
`process1`) with, per part, the losses, the final variables (seed states
included) and what the part produced. Files go under `OUTPUT_DIR/single/`
and `OUTPUT_DIR/multi/` (shared by both processes: only process 0 may write
there).
"""

import faulthandler
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import keras
import numpy as np

from keras_regkit.callbacks import CyclicLR
from keras_regkit.callbacks import OneCycle
from keras_regkit.callbacks import PolyakAveraging
from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.callbacks import lr_range_test
from keras_regkit.callbacks import recompute_batchnorm_statistics
from keras_regkit.layers import DebiasedBatchNormalization
from keras_regkit.layers import DropConnectConv2D
from keras_regkit.layers import DropConnectDense
from keras_regkit.layers import DropPath
from keras_regkit.layers import FractionalMaxPooling2D
from keras_regkit.layers import FractionalPoolingAverage
from keras_regkit.layers import StochasticDepth

NUM_PROCESSES = 2
GLOBAL_BATCH = 16
SAMPLES = 64  # Four global batches per epoch, all full.
EPOCHS = 2
HANG_SECONDS = 340  # Below the test's TIMEOUT.


class Record(keras.layers.Layer):
    """Identity that keeps what it saw in the last training step.

    Its variable holds the whole global batch, so on two processes it shows
    which example got which per-example mask, in global order.
    """

    def build(self, input_shape):
        self.seen = self.add_weight(
            shape=(GLOBAL_BATCH,) + tuple(input_shape[1:]),
            initializer="zeros",
            trainable=False,
            name="seen",
        )

    def call(self, inputs, training=None):
        if training:
            self.seen.assign(inputs)
        return inputs


class Run:
    """Where this process stands: its share of each global batch, its files."""

    def __init__(self, output, process_id=None):
        self.process_id = process_id
        self.local = process_id is None
        self.num_processes = 1 if self.local else NUM_PROCESSES
        self.name = "single" if self.local else f"process{process_id}"
        self.files = os.path.join(output, "single" if self.local else "multi")
        self.batch_size = GLOBAL_BATCH // self.num_processes
        self.results = {}

    def shard(self, array):
        """This process's rows of every global batch, in order."""
        if self.local:
            return array
        batches = array.reshape((-1, GLOBAL_BATCH) + array.shape[1:])
        start = self.process_id * self.batch_size
        mine = batches[:, start : start + self.batch_size]
        return mine.reshape((-1,) + array.shape[1:])

    def fit(self, model, x, y, callbacks=(), epochs=EPOCHS):
        history = model.fit(
            self.shard(x),
            self.shard(y),
            batch_size=self.batch_size,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=list(callbacks),
        )
        return history.history["loss"]

    def keep(self, part, **arrays):
        for key, value in arrays.items():
            if isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    self.results[f"{part}/{key}/{i}"] = np.asarray(item)
            else:
                self.results[f"{part}/{key}"] = np.asarray(value)

    def keep_model(self, part, model, losses):
        """The losses and every variable, by path (seed states included)."""
        self.keep(part, losses=losses)
        for variable in model.variables:
            self.results[f"{part}/variables/{variable.path}"] = (
                keras.ops.convert_to_numpy(variable)
            )


def images(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SAMPLES, 8, 8, 2)).astype("float32")
    return x, rng.integers(0, 3, size=(SAMPLES,))


def classifier(*middle, momentum=0.9):
    """Conv2D -> middle layers ("flatten": Flatten, Dense) -> Dense(3)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    for layer in middle:
        if layer == "flatten":
            x = keras.layers.Flatten()(x)
            x = keras.layers.Dense(8)(x)
        else:
            x = layer(x)
    if len(x.shape) > 2:
        x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def per_batch_model():
    """Masks and gates drawn once per batch, and global batch statistics."""
    return classifier(
        DropConnectConv2D(4, 3, rate=0.3, mask="batch", seed=3),
        FractionalMaxPooling2D(1.5, seed=4),
        DebiasedBatchNormalization(momentum=0.5),
        "flatten",
        DropConnectDense(8, rate=0.5, mask="batch", seed=5),
        StochasticDepth(
            [keras.layers.Dense(8, activation="relu"), keras.layers.Dense(8)],
            survival_probability=0.5,
            seed=6,
        ),
    )


def per_example_model():
    """Masks drawn per example; `Record` keeps each for the comparison."""
    return classifier(
        DropConnectConv2D(4, 3, rate=0.3, mask="sample", seed=3),
        Record(name="drop_connect_conv_output"),
        FractionalMaxPooling2D(
            1.3, pseudo_random=False, overlapping=False, seed=4
        ),
        "flatten",
        DebiasedBatchNormalization(moving_statistics="cumulative", renorm=True),
        DropPath(0.5, seed=5),
        Record(name="drop_path_output"),
        DropConnectDense(8, rate=0.5, mask="sample", seed=6),
        Record(name="drop_connect_dense_output"),
    )


def train_layers(run, output):
    """Both layer models; then precise batch norm, the pooling average and
    serving from process 0 on the per-batch one."""
    x, y = images()
    model = per_example_model()
    run.keep_model("per_example", model, run.fit(model, x, y))

    model = per_batch_model()
    run.keep_model("per_batch", model, run.fit(model, x, y))
    # Every process gets the whole data: the statistics are computed with
    # `predict_on_batch`, which each process runs on the batch it is given.
    recompute_batchnorm_statistics(model, x, batch_size=GLOBAL_BATCH)
    run.keep_model("recompute_batchnorm_statistics", model, [])
    averaged = FractionalPoolingAverage(model, num_passes=4)
    # `predict` cannot return outputs that span processes (Keras
    # concatenates them on the host); `predict_on_batch` can.
    run.keep(
        "serving",
        predicted=model.predict_on_batch(x),
        pooling_average=averaged.predict_on_batch(x),
    )
    if not run.process_id:
        serve(run, model, x, output)


def serve(run, model, x, output):
    """Saves and exports on this process alone (process 0), then reloads.

    `model.save` or `model.export` on process 0 alone would hang: saving
    creates a reference optimizer, whose variables under the distribution
    every process must create together. The weights are replicated, so
    process 0 reads them and rebuilds the model outside the distribution.
    """
    weights = model.get_weights()
    keras.distribution.set_distribution(None)
    served = keras.models.clone_model(model)
    served.set_weights(weights)
    path = os.path.join(output, f"{run.name}.keras")
    served.save(path)
    loaded = keras.saving.load_model(path)
    run.keep("serving", loaded=loaded.predict(x, verbose=0))
    try:
        import tensorflow as tf
    except ImportError:
        return  # `model.export` on JAX needs TensorFlow (jax2tf).
    directory = os.path.join(output, f"{run.name}_export")
    served.export(directory, verbose=False)
    reloaded = tf.saved_model.load(directory)
    run.keep("serving", exported=np.asarray(reloaded.serve(x)))


def train_callbacks(run, output):
    """One model through three `fit`s with the callbacks (OneCycle first:
    it runs from the optimizer's first step), then the LR range test; the
    model compiles once."""
    del output
    x, y = images()
    model = classifier(DebiasedBatchNormalization(momentum=0.5), "flatten")

    losses = run.fit(model, x, y, [OneCycle(0.1, total_steps=8)])
    run.keep_model("one_cycle", model, losses)

    averaging = PolyakAveraging(
        decay=0.8, backup_dir=os.path.join(run.files, "polyak_backup")
    )
    snapshots = SnapshotEnsemble(2, 0.1, os.path.join(run.files, "snapshots"))
    losses = run.fit(model, x, y, [averaging, snapshots], epochs=4)
    run.keep_model("polyak_snapshots", model, losses)
    run.keep("polyak_snapshots", averages=averaging.get_averages())

    swa = PolyakAveraging(
        decay=None,
        unit="epoch",
        batch_norm="recompute",
        # The whole data on every process, as for
        # `recompute_batchnorm_statistics`.
        batch_norm_data=x,
        batch_norm_steps=2,
    )
    cyclic = CyclicLR(
        0.01, 0.1, step_size=3, base_momentum=0.8, max_momentum=0.95
    )
    losses = run.fit(model, x, y, [swa, cyclic], epochs=3)
    run.keep_model("cyclic_lr_swa", model, losses)
    run.keep("cyclic_lr_swa", averages=swa.get_averages())

    before = model.get_weights()
    test = lr_range_test(
        model,
        run.shard(x),
        run.shard(y),
        batch_size=run.batch_size,
        min_lr=1e-4,
        max_lr=1.0,
        steps=8,
        shuffle=False,
    )
    after = model.get_weights()
    run.keep(
        "lr_range_test",
        learning_rates=test.learning_rates,
        losses=test.losses,
        restored=all(np.array_equal(a, b) for a, b in zip(before, after)),
    )


def log(run, part, started):
    seconds = time.perf_counter() - started
    print(f"{run.name}: {part} took {seconds:.1f} s", file=sys.stderr)


def main(output, port=None, process_id=None):
    # A process that waits on a peer that died prints where it waits and
    # exits, before the test's own timeout kills it without a word.
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    if port is None:
        run = Run(output)
    else:
        # Gloo gives the CPU backend its cross-process collectives; it must be
        # chosen before JAX starts its runtime.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(
            job_addresses=f"localhost:{port}",
            num_processes=NUM_PROCESSES,
            process_id=int(process_id),
        )
        run = Run(output, int(process_id))
        assert jax.process_count() == NUM_PROCESSES, jax.process_count()
        assert len(jax.devices()) == NUM_PROCESSES, jax.devices()
        # Each process is fed its own half of each global batch already.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=jax.devices(), auto_shard_dataset=False
            )
        )
    # Serving leaves the distribution on process 0: the layers go last.
    for part in (train_callbacks, train_layers):
        started = time.perf_counter()
        part(run, output)
        log(run, part.__name__, started)
    np.savez(os.path.join(output, f"{run.name}.npz"), **run.results)


if __name__ == "__main__":
    main(*sys.argv[1:])
