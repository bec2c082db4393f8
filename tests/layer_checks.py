"""The shared harness that every keras_regkit layer passes.

`run_layer_checks` builds the layer several ways and checks what a Keras user
relies on: shapes, symbolic and eager calls, deterministic inference, a
training mode that differs from inference, config and `.keras` round trips,
SavedModel serving equal to `predict`, and `fit` with `jit_compile=True`.
"""

import os
import tempfile

import keras
import numpy as np
from keras import ops


def _random_input(input_shape, seed=0):
    return (
        np.random.default_rng(seed).normal(size=input_shape).astype("float32")
    )


def _normalized(config):
    """Config with tuples as lists, as it reads back from a `.keras` file."""
    if isinstance(config, dict):
        return {key: _normalized(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_normalized(value) for value in config]
    return config


def _assert_shape(actual, expected, what):
    assert tuple(actual) == tuple(expected), (
        f"{what}: expected shape {tuple(expected)}, got {tuple(actual)}"
    )


def _sequential(layer, input_shape):
    return keras.Sequential([keras.Input(shape=input_shape[1:]), layer])


def _functional(layer, input_shape):
    inputs = keras.Input(shape=input_shape[1:])
    return keras.Model(inputs, layer(inputs))


def _check_fit(model, x, output_shape):
    y = np.random.default_rng(1).normal(size=output_shape).astype("float32")
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    history = model.fit(
        x, y, batch_size=max(1, len(x) // 2), epochs=1, verbose=0
    )
    loss = history.history["loss"][-1]
    assert np.isfinite(loss), f"fit produced a non-finite loss: {loss}"


def run_layer_checks(
    layer_cls,
    init_kwargs,
    input_shape,
    *,
    expected_output_shape,
    training_differs=True,
    fit=True,
    export=True,
    atol=1e-5,
):
    """Runs the shared layer checks; raises `AssertionError` on a failure.

    Args:
        layer_cls: The layer class.
        init_kwargs: dict, or a zero-argument callable returning one (use
            that when the arguments hold layers, which can't be shared
            between layer instances). Constructor arguments; include a
            `seed` for stochastic layers so runs are reproducible.
        input_shape: tuple. Full input shape, batch included.
        expected_output_shape: tuple. Full output shape, batch included.
        training_differs: bool. Whether `training=True` must give outputs
            different from inference on a random input.
        fit: bool. Run one epoch of `fit` in a functional model with
            `jit_compile=True` (the Sequential form is checked by the
            `.keras` round trip).
        export: bool. Export with `model.export` and serve the SavedModel
            through `tf.saved_model.load` (TensorFlow backend only).
        atol: float. Tolerance between SavedModel serving and `predict`.
    """
    x = _random_input(input_shape)
    batch = input_shape[0]
    make_kwargs = init_kwargs if callable(init_kwargs) else lambda: init_kwargs

    def new_layer():
        return layer_cls(**make_kwargs())

    # Shapes: compute_output_shape, symbolic and eager calls agree.
    layer = new_layer()
    _assert_shape(
        layer.compute_output_shape(input_shape),
        expected_output_shape,
        "compute_output_shape",
    )
    symbolic = layer(keras.KerasTensor(input_shape))
    _assert_shape(symbolic.shape, expected_output_shape, "symbolic call")
    symbolic_none = new_layer()(keras.Input(input_shape[1:]))
    _assert_shape(
        symbolic_none.shape,
        (None,) + tuple(expected_output_shape[1:]),
        "symbolic call with unknown batch",
    )
    eager = ops.convert_to_numpy(layer(x))
    _assert_shape(eager.shape, expected_output_shape, "eager call")
    assert np.all(np.isfinite(eager)), "inference output is not finite"

    # Inference is deterministic; training differs from it.
    again = ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_array_equal(
        eager, again, err_msg="inference is not deterministic"
    )
    trained = ops.convert_to_numpy(layer(x, training=True))
    _assert_shape(trained.shape, expected_output_shape, "training call")
    if training_differs:
        draws = [trained] + [
            ops.convert_to_numpy(layer(x, training=True)) for _ in range(4)
        ]
        assert any(not np.allclose(d, eager) for d in draws), (
            "training-mode output never differs from inference"
        )
        assert any(not np.allclose(d, draws[0]) for d in draws[1:]), (
            "training-mode output is the same on every call: no fresh draws"
        )

    # get_config / from_config round trip, with the same weights.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert _normalized(clone.get_config()) == _normalized(config), (
        "from_config(get_config()) differs"
    )
    clone(keras.KerasTensor(input_shape))
    clone.set_weights(layer.get_weights())
    # Training calls may have moved statistics (batch norm inside a block).
    reference = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(
        ops.convert_to_numpy(clone(x)),
        reference,
        rtol=1e-6,
        atol=1e-6,
        err_msg="from_config clone infers differently",
    )

    with tempfile.TemporaryDirectory() as tmp:
        # .keras save / load without custom objects: the layer is registered.
        model = _sequential(new_layer(), input_shape)
        expected = model.predict(x, verbose=0)
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(
            loaded.predict(x, verbose=0),
            expected,
            err_msg=".keras round trip changed inference outputs",
        )
        assert _normalized(loaded.layers[-1].get_config()) == _normalized(
            model.layers[-1].get_config()
        ), ".keras round trip changed the layer's config"

        # SavedModel serving equals predict.
        if export and keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            export_dir = os.path.join(tmp, "export")
            model.export(export_dir, verbose=False)
            # Keep the loaded object alive while its function runs.
            reloaded = tf.saved_model.load(export_dir)
            served = reloaded.serve(x).numpy()
            np.testing.assert_allclose(
                served,
                expected,
                rtol=0,
                atol=atol,
                err_msg="SavedModel serving differs from model.predict",
            )

    # One epoch of fit in a functional model, compiled with XLA.
    if fit:
        fit_x = _random_input((max(batch, 2) * 2,) + tuple(input_shape[1:]), 3)
        out_shape = (len(fit_x),) + tuple(expected_output_shape[1:])
        _check_fit(_functional(new_layer(), input_shape), fit_x, out_shape)
