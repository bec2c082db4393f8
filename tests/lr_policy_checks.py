"""Shared helpers for the learning-rate policy tests: NumPy references, probes.

The references are written from the papers' formulas in NumPy, apart from the
library code. The probe model turns the learning rate actually applied by the
optimizer into a weight change: one kernel weight `w`, inputs of ones and the
loss `mean(y_pred)`, so the gradient is exactly 1 and plain SGD moves `w` by
`-lr` per step (with momentum `m`: `v = m * v - lr`, `w += v`).
"""

import keras
import numpy as np
import pytest
from keras import ops

# CyclicLR and OneCycle put the policy inside the compiled step except on
# JAX, where they set the rate between batches and refuse momentum cycling.
in_step_only = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="the policy runs inside the step on TensorFlow (and PyTorch)",
)
jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the JAX fallback"
)


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
    """Smith (2017), Section 3.1, in float64."""
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
    if three_phase:
        phases = [
            (
                pct_start * total_steps - 1,
                initial,
                max_lr,
                max_momentum,
                base_momentum,
            ),
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
            (
                pct_start * total_steps - 1,
                initial,
                max_lr,
                max_momentum,
                base_momentum,
            ),
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


class BatchRecorder(keras.callbacks.Callback):
    """Records, after each batch hook, the logs, the counter and the weight."""

    def __init__(self, keys=("learning_rate",)):
        super().__init__()
        self.keys = keys
        self.logs = {key: [] for key in keys}
        self.iterations = []
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        for key in self.keys:
            self.logs[key].append(logs.get(key))
        self.iterations.append(int(self.model.optimizer.iterations))
        self.weights.append(
            [np.array(w, copy=True) for w in self.model.get_weights()]
        )

    def probe_weights(self):
        """The probe's single weight after each batch hook, as a vector."""
        return np.array([w[0].item() for w in self.weights])


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
