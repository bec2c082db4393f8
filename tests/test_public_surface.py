"""The toolkit stands on Keras's public surface, and that surface holds.

The first test reads the package's source for the private Keras accesses
and patches that the toolkit gave up (assigning `model.train_step`,
`optimizer._learning_rate`, `_flatten_layers`, `keras.src` ...): there must
be none. The others check, on the installed Keras, each public behaviour the
callbacks rely on, so that a Keras release that changes one of them fails
here, loudly, instead of changing the toolkit's results silently.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

import keras_regkit

PRIVATE = re.compile(
    r"\.train_step *=[^=]|\.train_function *=[^=]|optimizer\._learning_rate"
    r"|\._track_variable|\._untrack_variable|\._flatten_layers|\._moments\("
    r"|\._reduction_axes|\._compose_transforms|\._renorm_correction"
    r"|\._loss_tracker|object\.__setattr__|keras\.src|\.jax_state_sync"
    r"|class [A-Za-z_]*\(keras\.Variable\)"
)
# The one access the JAX trainer leaves no alternative to: its public but
# undocumented `jax_state_sync()`, in one private module.
ALLOWED = {("_training.py", "model.jax_state_sync()")}


def test_no_private_keras_access_in_the_package():
    root = pathlib.Path(keras_regkit.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if (
                PRIVATE.search(line)
                and (
                    path.name,
                    line.strip(),
                )
                not in ALLOWED
            ):
                found.append(f"{path.relative_to(root)}:{number}: {line}")
    assert not found, "private Keras access:\n" + "\n".join(found)


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.params_ids = []

    def on_train_begin(self, logs=None):
        self.params_ids.append(id(self.params))


def _probe():
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.5), "mae")
    return model


def test_one_fit_shares_one_params_dict_among_its_callbacks():
    # `keras_regkit._training.claim` tells the callbacks of one `fit` from
    # those of an earlier one by this dict.
    model = _probe()
    x, y = np.ones((4, 1), "float32"), np.zeros((4, 1), "float32")
    first, second = _Recorder(), _Recorder()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[first, second])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[first])
    assert first.params_ids[0] == second.params_ids[0]
    assert first.params_ids[1] != first.params_ids[0]


def test_learning_rate_assigned_between_batches_drives_the_next_step():
    # The learning-rate callbacks assign `optimizer.learning_rate` (the
    # public setter) before each batch; the compiled step must read it,
    # on JAX after `sync_model_state`.
    from keras_regkit._training import sync_model_state

    rates = [0.1, 0.05, 0.2, 0.15]

    class SetRate(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            sync_model_state(self.model)
            self.model.optimizer.learning_rate = rates[batch]

    model = _probe()
    variables_before = len(model.optimizer.variables)
    # mae of a zero target: the gradient of the weight is sign(w) * 1 = 1
    # once w > 0, and the first step from w = 0 has gradient 0 on some
    # backends, so start from w = 1.
    model.layers[0].kernel.assign([[1.0]])
    x, y = np.ones((4, 1), "float32"), np.zeros((4, 1), "float32")
    model.fit(
        x,
        y,
        batch_size=1,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[SetRate()],
    )
    weight = float(np.asarray(model.layers[0].kernel)[0, 0])
    np.testing.assert_allclose(weight, 1.0 - sum(rates), rtol=1e-6)
    # The setter assigned the tracked variable; it did not replace it.
    assert len(model.optimizer.variables) == variables_before
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 0.15)


def test_sgd_keeps_its_momentum_slots_public():
    # CyclicLR and OneCycle cycle SGD's momentum by rescaling these slots.
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    variable = keras.Variable(np.ones((2, 3), "float32"))
    optimizer.build([variable])
    assert len(optimizer.momentums) == 1
    assert tuple(optimizer.momentums[0].shape) == (2, 3)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the JAX trainer's state"
)
def test_jax_models_expose_jax_state_sync():
    model = _probe()
    assert callable(getattr(model, "jax_state_sync", None))


@pytest.mark.parametrize(
    "name",
    [
        "CyclicLR",
        "OneCycle",
        "SnapshotEnsemble",
        "PolyakAveraging",
        "StochasticWeightAveraging",
    ],
)
def test_per_step_callbacks_leave_batch_end_to_keras(name):
    # Keras dispatches the steps of `fit` asynchronously only while no
    # callback overrides `on_train_batch_end` (a public method of
    # `keras.callbacks.Callback`); with one, it waits for every step, which
    # costs a small model more than the step. These callbacks work before
    # the next step instead.
    callback_class = getattr(keras_regkit.callbacks, name)
    assert (
        callback_class.on_train_batch_end
        is keras.callbacks.Callback.on_train_batch_end
    )
