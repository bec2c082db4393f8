"""What a layer or callback needs to know when it runs on several replicas.

Under `tf.distribute.MirroredStrategy` (and `MultiWorkerMirroredStrategy`)
each replica runs the train step on its slice of the global batch, with a
copy of every variable. Three things then need the replicas' view:

- a per-example random draw must differ between replicas (the replicas
  share the seed state, so they would otherwise draw identical masks for
  their first, second, ... examples): `batch_uniform` draws the global
  batch's values and keeps this replica's slice, which is exactly what one
  device draws for the same global batch;
- synchronized batch statistics need sums over every replica:
  `cross_replica_sum`;
- state that a callback creates during `fit` must be created in the
  strategy's scope, so that each replica updates its own copy once per step
  instead of all replicas updating one variable: `strategy_scope`;
- under `MultiWorkerMirroredStrategy` (or a multi-process JAX run) every
  worker runs the callbacks, and only one, the chief, should write files:
  `is_chief`.

Keras 3 has no backend-neutral API for the replica id or a cross-replica
sum inside a step; its own synchronized batch normalization calls
`tf.distribute` from its TensorFlow backend. These helpers do the same, and
only when Keras runs on TensorFlow, which Keras has then already imported.
Everywhere else the first three are identities: on one device, and on JAX,
whose `keras.distribution` API traces one program over the global batch, so
draws and statistics are already those of the global batch.
"""

import contextlib

import keras
from keras import ops

__all__ = [
    "batch_uniform",
    "cross_replica_sum",
    "is_chief",
    "replica_position",
    "strategy_scope",
]


def _replica_context():
    """The `tf.distribute` replica context of a multi-replica step, or None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf  # The TensorFlow backend has imported it.

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def replica_position():
    """`(replica_id, num_replicas)` inside a multi-replica step, else None.

    `replica_id` is a scalar int32 tensor, `num_replicas` a Python int.
    """
    context = _replica_context()
    if context is None:
        return None
    replica_id = ops.cast(context.replica_id_in_sync_group, "int32")
    return replica_id, context.num_replicas_in_sync


def batch_uniform(shape, seed):
    """Uniform [0, 1) draws whose first axis is this replica's batch.

    On one device, `keras.random.uniform(shape, seed=seed)`. On `R`
    replicas with per-replica batch `B`, the draw for the global batch
    `(R * B,) + shape[1:]` (every replica draws the same values: the seed
    state is mirrored), of which replica `r` keeps rows `r * B` to
    `(r + 1) * B`. The global batch thus gets the values one device would
    draw for it, at `R` times the random-number cost per replica. A last
    global batch that does not split evenly (replicas with `B` and `B - 1`
    examples) is the exception: two of its examples may share draws.
    """
    position = replica_position()
    if position is None:
        return keras.random.uniform(shape, seed=seed)
    replica_id, num_replicas = position
    batch = shape[0]
    draws = keras.random.uniform(
        (num_replicas * batch,) + tuple(shape[1:]), seed=seed
    )
    start = [replica_id * batch] + [0] * (len(shape) - 1)
    return ops.slice(draws, start, shape)


def cross_replica_sum(values):
    """Sums a list of tensors over the replicas of a multi-replica step.

    Outside one (one device, JAX), returns `values` unchanged.
    """
    context = _replica_context()
    if context is None:
        return values
    return [context.all_reduce("sum", value) for value in values]


def strategy_scope(model):
    """The scope of the `tf.distribute` strategy `model` trains under.

    Variables a callback creates for a model inside it are distributed like
    the model's own. A null context on other backends.
    """
    strategy = getattr(model, "distribute_strategy", None)
    if keras.backend.backend() != "tensorflow" or strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def is_chief(model):
    """Whether this process should write the files a callback saves.

    False only on the non-chief workers of a multi-worker strategy, and on
    the JAX processes other than process 0 of a multi-process
    `keras.distribution` run: they hold the same weights as the chief, and
    writing from each of them would race on a shared directory. True on one
    machine.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # The JAX backend has imported it.

        return jax.process_index() == 0
    strategy = getattr(model, "distribute_strategy", None)
    if backend != "tensorflow" or strategy is None:
        return True
    return bool(strategy.extended.should_checkpoint)
