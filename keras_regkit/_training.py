"""Private helpers for callbacks that act on the model during `fit`.

Everything here goes through Keras's public surface: the optimizer's public
`iterations` and `learning_rate`, the JAX trainer's public `jax_state_sync()`
(the one way a callback makes the variables current between JAX steps), and
the `params` dict that one `fit` shares among its callbacks.
"""

import weakref

import keras

__all__ = [
    "IterationCounter",
    "claim",
    "compiled",
    "inner_optimizer",
    "read_iterations",
    "release",
    "sync_model_state",
]


def sync_model_state(model):
    """Makes the model's variables current during `fit` on the JAX backend.

    The JAX trainer keeps the training state outside the variables between
    steps. A callback that reads or assigns variables mid-epoch first writes
    that state back; the trainer then reads the variables again before its
    next step, so assignments made after this call are seen by that step.
    """
    if keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def read_iterations(optimizer):
    """Returns the optimizer's step counter as a Python int.

    Inside a `LossScaleOptimizer` the inner optimizer's counter is read:
    before Keras 3.9 the wrapper had a counter of its own that never
    advanced.
    """
    iterations = inner_optimizer(optimizer).iterations
    # `int()` of the scalar is about 3x cheaper than a NumPy round trip and
    # this runs at every batch; a `tf.distribute` mirrored variable has no
    # `__int__`, and its value is the same on every replica.
    try:
        return int(iterations)
    except TypeError:
        return int(keras.ops.convert_to_numpy(iterations))


class IterationCounter:
    """`optimizer.iterations` for per-batch callbacks, read once per epoch.

    Reading the counter waits for the step that is running (on JAX it also
    stops the asynchronous dispatch of steps), which costs more than a small
    step itself. Where each batch hook is exactly one optimizer iteration
    (`steps_per_execution=1`, no `LossScaleOptimizer`, which may skip a
    step, no gradient accumulation) the counter is read at the first batch
    of each epoch, after every `on_train_begin` (a `BackupAndRestore` may
    restore it there), and counted in Python after; otherwise it is read at
    every batch.

    Call `reset(model)` at each epoch begin, `now(model)` for the count of
    iterations taken, and `advance()` in `on_train_batch_begin` for the step
    about to run.
    """

    def __init__(self):
        self._known = None
        self._countable = False

    def reset(self, model):
        self._known = None
        optimizer = model.optimizer
        inner = inner_optimizer(optimizer)
        self._countable = (
            int(getattr(model, "steps_per_execution", 1) or 1) == 1
            and inner is optimizer
            and not getattr(inner, "gradient_accumulation_steps", None)
        )

    @property
    def counting(self):
        """Whether the count is kept in Python between reads."""
        return self._countable

    def now(self, model):
        """The iterations taken so far, as a Python int."""
        if self._known is None:
            sync_model_state(model)
            iteration = read_iterations(model.optimizer)
            if not self._countable:
                return iteration
            self._known = iteration
        return self._known

    def advance(self):
        """Counts one optimizer step."""
        if self._known is not None:
            self._known += 1


def inner_optimizer(optimizer):
    """The optimizer that applies the updates (inside a LossScaleOptimizer)."""
    return getattr(optimizer, "inner_optimizer", None) or optimizer


# model -> {role: (params, weak reference to the callback)}. `params` is the
# dict that one `fit` hands to all of its callbacks (`Callback.set_params`),
# so it tells the callbacks of the running `fit` from those of an earlier
# one that raised before its `on_train_end`.
_CLAIMS = weakref.WeakKeyDictionary()

_ROLE_WORDS = {
    "learning_rate": "set the learning rate",
    "averaging": "average the weights",
}


def claim(callback, role):
    """Makes `callback` the one callback of this `fit` that plays `role`.

    Call from `on_train_begin`. Raises a `ValueError` naming both callbacks
    if another callback of the same `fit` already claimed `role` on the same
    model (two learning-rate policies, two averagings), since the later one
    would silently override the earlier.
    """
    model = callback.model
    claims = _CLAIMS.setdefault(model, {})
    held = claims.get(role)
    if held is not None:
        params, other = held[0], held[1]()
        if (
            other is not None
            and other is not callback
            and params is callback.params
        ):
            words = _ROLE_WORDS.get(role, role)
            raise ValueError(
                f"Two callbacks of one `fit` both {words}: "
                f"{type(other).__name__} and {type(callback).__name__}. "
                "Keep one of them in `callbacks=`: the later would silently "
                "override the earlier."
            )
    # A weak reference: a claim left by a `fit` that raised must not keep
    # its callback, and through it the model, alive.
    claims[role] = (callback.params, weakref.ref(callback))


def _dead():
    return None


def release(callback, role):
    """Undoes `claim` (call from `on_train_end`)."""
    claims = _CLAIMS.get(callback.model)
    if claims is not None and claims.get(role, (None, _dead))[1]() is callback:
        del claims[role]


def compiled(function, donate_argnums=()):
    """`function` compiled by the backend (`tf.function`, `jax.jit`).

    `function` must be a pure function of tensors written with `keras.ops`
    (no variable assignment): the caller assigns what it returns. Callbacks
    use it for work they do between steps, which would otherwise run as one
    eager operation per tensor. `donate_argnums`: on JAX, the arguments whose
    buffers the call may reuse for its outputs; the caller must not read them
    after the call (it assigns the outputs in their place).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(function, donate_argnums=donate_argnums)
    return function
