"""Compiled layer calls for the benchmarks, on TensorFlow and on JAX.

TensorFlow compiles with `tf.function` (with or without XLA); JAX compiles
every function with `jax.jit`, threading the layer's non-trainable state
(seed generators, moving statistics) through `Layer.stateless_call`, so
that each call draws fresh random numbers as the TensorFlow version does.
Neither module is imported unless it is the Keras backend.
"""

import inspect

import keras
import numpy as np

__all__ = ["fit_runner", "jit_settings", "layer_runner", "tensor"]


def jit_settings():
    """The `jit_compile` values worth timing: JAX always compiles."""
    if keras.backend.backend() == "jax":
        return (True,)
    return (False, True)


def tensor(array):
    return keras.ops.convert_to_tensor(np.asarray(array))


def layer_runner(layer, x, training, jit_compile, upstream=None):
    """A zero-argument callable: one call of `layer` on `x`, blocking.

    With `upstream`, one forward and backward pass: the callable computes
    the input gradient of `sum(layer(x) * upstream)`. Otherwise the
    forward pass only.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_runner(layer, x, training, jit_compile, upstream)
    if backend == "jax":
        return _jax_runner(layer, x, training, upstream)
    raise NotImplementedError(f"no runner for the {backend} backend")


def _tensorflow_runner(layer, x, training, jit_compile, upstream):
    import tensorflow as tf

    if upstream is None:

        def step(x):
            return layer(x, training=training)

    else:

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
            return tape.gradient(y, x, output_gradients=upstream)

    step = tf.function(step, jit_compile=jit_compile)
    return lambda: step(x).numpy()


def _jax_runner(layer, x, training, upstream):
    import jax

    if not layer.built:
        layer.build(tuple(x.shape))
    trainable = [v.value for v in layer.trainable_variables]
    state = [[v.value for v in layer.non_trainable_variables]]

    # `stateless_call` hands its keywords to `call` as they are.
    kwargs = (
        {"training": training}
        if "training" in inspect.signature(layer.call).parameters
        else {}
    )

    def call(x, non_trainable):
        return layer.stateless_call(trainable, non_trainable, x, **kwargs)

    if upstream is None:
        step = jax.jit(call)
    else:

        def forward_backward(x, non_trainable):
            (_, updated), pullback = jax.vjp(
                lambda x: call(x, non_trainable), x
            )
            zeros = jax.tree_util.tree_map(jax.numpy.zeros_like, updated)
            return pullback((upstream, zeros))[0], updated

        step = jax.jit(forward_backward)

    def run():
        result, state[0] = step(x, state[0])
        return jax.block_until_ready(result)

    return run


def fit_runner(model, x, y, batch_size, callbacks=list, epochs=1):
    """A zero-argument callable: one `fit` epoch (or `epochs`) of `model`.

    `callbacks` makes a fresh list of callbacks for each timing.
    """

    def run():
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            callbacks=callbacks(),
        )

    return run
