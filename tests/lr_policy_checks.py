"""Shared helpers for the learning-rate policy tests: NumPy references, probes.

The references are written from the papers' formulas in NumPy, apart from the
library code. The probe model turns the learning rate actually applied by the
optimizer into a weight change: one kernel weight `w`, inputs of ones and the
loss `mean(y_pred)`, so the gradient is exactly 1 and plain SGD moves `w` by
`-lr` per step (with momentum `m`: `v = m * v - lr`, `w += v`).
"""

import glob
import os

import keras
import numpy as np
import pytest
from keras import ops


def cyclic_reference(
    iterations,
    base_lr,
    max_lr,
    step_size,
    mode="triangular",
    gamma=1.0,
    scale_fn=None,
    scale_mode="cycle",
):
    """Smith (2017), Section 3.1, in float64 (`scale_mode` for `scale_fn`)."""
    it = np.asarray(iterations, dtype=np.float64)
    cycle = np.floor(1.0 + it / (2.0 * step_size))
    x = np.abs(it / step_size - 2.0 * cycle + 1.0)
    if scale_fn is not None:
        scale = np.array(
            [
                float(scale_fn(c if scale_mode == "cycle" else i))
                for c, i in zip(cycle, it)
            ]
        )
    elif mode == "triangular":
        scale = np.ones_like(it)
    elif mode == "triangular2":
        scale = 1.0 / 2.0 ** (cycle - 1.0)
    else:
        scale = gamma**it
    return base_lr + (max_lr - base_lr) * np.maximum(0.0, 1.0 - x) * scale


def one_cycle_reference(
    iterations,
    max_lr,
    total_steps,
    pct_start=0.45,
    div_factor=25.0,
    final_div_factor=1e4,
    anneal_strategy="linear",
    three_phase=True,
    base_momentum=0.85,
    max_momentum=0.95,
):
    """Smith & Topin (2017) with PyTorch's phase boundaries, phase by phase.

    Returns `(learning_rates, momenta)` in float64.
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    # (last iteration, lr from, lr to, momentum from, momentum to)
    warm_up = (
        pct_start * total_steps - 1,
        initial,
        max_lr,
        max_momentum,
        base_momentum,
    )
    if three_phase:
        phases = [
            warm_up,
            (
                2 * pct_start * total_steps - 2,
                max_lr,
                initial,
                base_momentum,
                max_momentum,
            ),
            (total_steps - 1, initial, final, max_momentum, max_momentum),
        ]
    else:
        phases = [
            warm_up,
            (total_steps - 1, max_lr, final, base_momentum, max_momentum),
        ]

    def anneal(start, end, fraction):
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (np.cos(np.pi * fraction) + 1)
        return (end - start) * fraction + start

    rates, momenta = [], []
    for step in np.asarray(iterations, dtype=np.float64):
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                fraction = min(
                    (step - start_step) / (end_step - start_step), 1.0
                )
                rates.append(anneal(lr0, lr1, fraction))
                momenta.append(anneal(m0, m1, fraction))
                break
            start_step = end_step
    return np.array(rates), np.array(momenta)


@keras.saving.register_keras_serializable(package="keras_regkit_tests")
def mean_prediction(y_true, y_pred):
    """A loss whose gradient with respect to the probe's weight is 1."""
    return ops.mean(y_pred)


def probe_model(optimizer, steps_per_execution=1, jit_compile="auto"):
    """One weight, initialised at 0, trained with `mean_prediction`."""
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(
        optimizer,
        loss=mean_prediction,
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return model


def probe_data(batches):
    """`batches` batches of size 1 for the probe."""
    return np.ones((batches, 1), "float32"), np.zeros((batches, 1), "float32")


def fit_probe(model, batches, epochs, callbacks=(), **kwargs):
    """Fits the probe on `batches` batches of size 1 per epoch, in order."""
    x, y = probe_data(batches)
    return model.fit(
        x,
        y,
        batch_size=1,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def momentum_sgd_weights(rates, momenta, nesterov=False, weight=0.0):
    """The probe's weight after each step of Keras SGD with momentum.

    The gradient is 1, so each step is `v = m * v - lr`, then `w += v`
    (Nesterov: `w += m * v - lr`), in float64.
    """
    velocity, weights = 0.0, []
    for rate, momentum in zip(rates, momenta):
        velocity = momentum * velocity - rate
        weight += momentum * velocity - rate if nesterov else velocity
        weights.append(weight)
    return np.array(weights)


def assert_momentum_policy_applied(
    recorder, rates, momenta, rtol, nesterov=False
):
    """Checks a probe fit with SGD with momentum under a cycled policy.

    The logged `learning_rate` (as the float32 variable holds it) and
    `momentum` are `rates` and `momenta` (one per iteration), and the
    probe's weight moved as SGD with them would, within `rtol` (float32
    weights against the float64 reference).
    """
    np.testing.assert_allclose(recorder.logs["learning_rate"], rates, rtol=1e-7)
    np.testing.assert_allclose(recorder.logs["momentum"], momenta, rtol=1e-12)
    np.testing.assert_allclose(
        recorder.probe_weights(),
        momentum_sgd_weights(rates, momenta, nesterov),
        rtol=rtol,
    )


def regression_data(samples, features, outputs, seed=0):
    """A noiseless linear regression problem, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = (x @ rng.normal(size=(features, outputs))).astype("float32")
    return x, y


def small_mlp(optimizer, features, outputs, seed=0):
    """A seeded two-layer MLP compiled with `optimizer` and the MSE."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(outputs),
        ]
    )
    model.compile(optimizer, loss="mse")
    return model


def check_bad_arguments(factory, defaults, cases):
    """Each `(kwargs, message)` of `cases` makes `factory` raise `message`.

    `factory` is called with `defaults` updated by `kwargs`.
    """
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            factory(**{**defaults, **kwargs})


def assert_each_step_used_its_rate(recorder, rates, group):
    """Checks a probe fit with `steps_per_execution=group`, plain SGD.

    The batch hooks ran once per group, yet every step applied its own rate
    (`rates`, one per iteration), not the rate of the group's first step.
    """
    assert recorder.iterations == list(range(group, len(rates) + 1, group))
    np.testing.assert_allclose(
        -recorder.probe_weights(),
        np.cumsum(rates)[group - 1 :: group],
        rtol=1e-5,
    )


class BatchRecorder(keras.callbacks.Callback):
    """Records, after each step, the rate, the counter and the weights.

    The policy callbacks log nothing per batch (a batch-end hook would cost
    `fit` its asynchronous dispatch), so the rate of each step is read from
    the optimizer, and `policy.current_logs()` gives the rest (`momentum`).
    The weights are recorded as the next step (or the epoch end) finds them,
    after any correction the policy completes there (Nesterov momentum).
    """

    def __init__(self, keys=("learning_rate",), policy=None):
        super().__init__()
        self.keys = keys
        self.policy = policy
        self.logs = {key: [] for key in keys}
        self.iterations = []
        self.weights = []
        self._stepped = False

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        # The optimizer that applies the updates (Keras 3.8's
        # LossScaleOptimizer keeps an `iterations` of its own at 0).
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        current = self.policy.current_logs() if self.policy else {}
        for key in self.keys:
            value = current.get(key)
            if key == "learning_rate" and self.policy is None:
                value = float(
                    keras.ops.convert_to_numpy(optimizer.learning_rate)
                )
            self.logs[key].append(value)
        self.iterations.append(int(optimizer.iterations))
        self._stepped = True

    def _record_weights(self):
        if self._stepped:
            self._stepped = False
            self.weights.append(
                [np.array(w, copy=True) for w in self.model.get_weights()]
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._record_weights()

    def on_epoch_end(self, epoch, logs=None):
        self._record_weights()

    def probe_weights(self):
        """The probe's single weight after each batch hook, as a vector."""
        return np.array([w[0].item() for w in self.weights])

    def applied_rates(self, start=0.0):
        """The step of the probe's weight at each batch hook, sign flipped.

        With plain SGD this is the learning rate the optimizer applied (from
        a weight of `start` before the first recorded batch).
        """
        return -np.diff(np.concatenate([[start], self.probe_weights()]))


class InterruptAt(keras.callbacks.Callback):
    """Raises in the middle of an epoch, as a crash would."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch = epoch
        self.batch = batch
        self._current = None

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._current == self.epoch and batch == self.batch:
            raise RuntimeError("interrupted for the test")


def resumable_run(make_model, make_callbacks, x, y, epochs, interrupt=None):
    """Fits in batches of 8, straight through or interrupted and resumed.

    `make_callbacks()` returns a fresh list holding a `BackupAndRestore` and
    one `BatchRecorder`. With `interrupt=(epoch, batch)` the first run raises
    there (`InterruptAt`), and a new model with new callbacks resumes from
    the backup, as a new process would; the interrupted epoch is run again
    from its start, with the same values it had the first time.

    Returns `(trace, model)`: the recorder's logs over the whole run as if it
    had never been interrupted, and the model at the end.
    """

    def fit(model, callbacks):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )

    def recorder_of(callbacks):
        (recorder,) = [c for c in callbacks if isinstance(c, BatchRecorder)]
        return recorder

    first = make_callbacks()
    model = make_model()
    if interrupt is None:
        fit(model, first)
        return recorder_of(first).logs, model
    epoch, batch = interrupt
    with pytest.raises(RuntimeError, match="interrupted for the test"):
        fit(model, [*first, InterruptAt(epoch, batch)])
    model = make_model()
    second = make_callbacks()
    fit(model, second)
    before, after = recorder_of(first).logs, recorder_of(second).logs
    kept = epoch * -(-len(x) // 8)
    partial = before["learning_rate"][kept:]
    assert partial == after["learning_rate"][: len(partial)]
    trace = {key: before[key][:kept] + after[key] for key in before}
    return trace, model


def tensorboard_scalars(log_dir, tag):
    """The values TensorBoard wrote for `tag` under `log_dir`, in order."""
    pytest.importorskip("tensorboard")
    tf = pytest.importorskip("tensorflow")
    values = []
    pattern = os.path.join(log_dir, "**", "events.out.tfevents.*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values.append(float(tf.make_ndarray(value.tensor)))
    return values
