import json
import re

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow
from test_snapshot_ensemble import MAX_LR
from test_snapshot_ensemble import _data
from test_snapshot_ensemble import _fit
from test_snapshot_ensemble import _manifest
from test_snapshot_ensemble import _message
from test_snapshot_ensemble import _model
from test_snapshot_ensemble import _snapshot_weights

import keras_regkit
from keras_regkit.callbacks import SnapshotEnsemble
from keras_regkit.ensembles import ensemble_model
from keras_regkit.ensembles import snapshot_ensemble_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three snapshots of a softmax model and three of a logits model."""
    keras.utils.clear_session()
    runs = {}
    for softmax in (True, False):
        directory = tmp_path_factory.mktemp("softmax" if softmax else "logits")
        model = _model(softmax=softmax)
        _fit(model, [SnapshotEnsemble(3, MAX_LR, directory)])
        runs[softmax] = (model, directory)
    return runs


def _member_outputs(model, directory):
    """Each snapshot loaded into a clone of the model, called on data."""
    x = _data(2)[0]
    outputs = []
    for entry in _manifest(directory)["snapshots"]:
        member = keras.models.clone_model(model)
        member.set_weights(_snapshot_weights(model, directory / entry["file"]))
        outputs.append(keras.ops.convert_to_numpy(member(x)))
    return np.stack(outputs)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "softmax, average, from_logits, combine",
    [
        (True, "probabilities", False, lambda f: f.mean(0)),
        (False, "logits", False, lambda f: f.mean(0)),
        (False, "probabilities", True, lambda f: _softmax(f).mean(0)),
    ],
)
def test_ensemble_equals_numpy_mean_of_members(
    trained, softmax, average, from_logits, combine
):
    model, directory = trained[softmax]
    members = _member_outputs(model, directory)
    assert not np.allclose(members[0], members[-1], atol=1e-3)
    x = _data(2)[0]
    for last in (1, 2, None):
        ensemble = snapshot_ensemble_model(
            directory, last=last, average=average, from_logits=from_logits
        )
        count = last or 3
        assert [layer.name for layer in ensemble.layers[1 : 1 + count]] == [
            f"snapshot_{k}" for k in range(4 - count, 4)
        ]
        np.testing.assert_allclose(
            ensemble.predict(x, verbose=0),
            combine(members[-count:]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_callback_method_and_old_import_path_give_the_same_ensemble(trained):
    from keras_regkit.callbacks import snapshot_ensemble_model as old_path

    _, directory = trained[True]
    assert old_path is snapshot_ensemble_model
    callback = SnapshotEnsemble(3, MAX_LR, directory)
    x = _data(2)[0]
    np.testing.assert_allclose(
        callback.ensemble_model(last=2).predict(x, verbose=0),
        snapshot_ensemble_model(directory, last=2).predict(x, verbose=0),
    )


def test_ensemble_saves_as_keras_and_loads_without_custom_objects(
    trained, tmp_path
):
    model, directory = trained[True]
    ensemble = snapshot_ensemble_model(directory)
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(_data(2)[0], verbose=0),
        _member_outputs(model, directory).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


@requires_tensorflow
def test_exported_ensemble_serves_the_mean_of_members(trained, tmp_path):
    import tensorflow as tf

    model, directory = trained[True]
    ensemble = snapshot_ensemble_model(directory)
    export_path = str(tmp_path / "saved_model")
    ensemble.export(export_path, verbose=False)
    x = _data(2)[0]
    reloaded = tf.saved_model.load(export_path)
    served = reloaded.serve(tf.constant(x)).numpy()
    expected = _member_outputs(model, directory).mean(0)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(
        served, ensemble.predict(x, verbose=0), atol=1e-5
    )


def test_unregistered_layer_error_says_what_to_import(tmp_path):
    @keras.saving.register_keras_serializable(package="not_imported")
    class Scale(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    model = keras.Sequential(
        [keras.Input((5,)), Scale(), keras.layers.Dense(3)]
    )
    model.compile(keras.optimizers.SGD(), "mse")
    x = _data()[0]
    model.fit(
        x,
        x[:, :3],
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[SnapshotEnsemble(2, MAX_LR, tmp_path)],
    )
    # As in a process that never imported the module defining `Scale`.
    del keras.saving.get_custom_objects()["not_imported>Scale"]
    with pytest.raises(
        ValueError,
        match=r"(?s)could not rebuild the model saved in .*model.json.*"
        r"Could not locate class 'Scale'.*import the module that registers "
        r"them.*`import keras_regkit`.*custom_objects=",
    ):
        snapshot_ensemble_model(tmp_path)
    ensemble = snapshot_ensemble_model(
        tmp_path, average="logits", custom_objects={"not_imported>Scale": Scale}
    )
    assert ensemble.predict(x, verbose=0).shape == (32, 3)


def test_version_1_directory_is_named(tmp_path, trained):
    _, directory = trained[True]
    manifest = _manifest(directory)
    manifest["version"] = 1
    for entry in manifest["snapshots"]:
        entry["file"] = entry["file"].replace(".h5", ".npz")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"`\.weights\.npz` snapshots of"):
        snapshot_ensemble_model(tmp_path)


def test_ensemble_bad_arguments(tmp_path, trained):
    with pytest.raises(
        ValueError,
        match=_message(
            "directory",
            "a directory whose manifest.json lists at least one snapshot "
            "(written by `fit` with the SnapshotEnsemble callback)",
            str(tmp_path),
        ),
    ):
        snapshot_ensemble_model(tmp_path)
    _, directory = trained[True]
    expected = (
        f"None or an int in [1, 3] ({str(directory)!r} holds 3 snapshot(s))"
    )
    for last in (4, 0, 1.0, True):
        with pytest.raises(ValueError, match=_message("last", expected, last)):
            snapshot_ensemble_model(directory, last=last)
    ensemble = snapshot_ensemble_model(directory, last=np.int64(2))
    assert len(ensemble.layers) == 4  # input, two members, average
    for kwargs, name, expected, value in [
        (
            {"average": "geometric"},
            "average",
            "one of 'probabilities', 'logits'",
            "geometric",
        ),
        ({"from_logits": "no"}, "from_logits", "a bool", "no"),
        ({"name": ""}, "name", "a non-empty str", ""),
        ({"custom_objects": []}, "custom_objects", "a dict or None", []),
    ]:
        with pytest.raises(ValueError, match=_message(name, expected, value)):
            snapshot_ensemble_model(directory, **kwargs)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected a non-empty path (str or os.PathLike). "
            "Received: directory=3"
        ),
    ):
        snapshot_ensemble_model(3)


def test_package_exposes_the_module():
    assert keras_regkit.ensembles.snapshot_ensemble_model is (
        snapshot_ensemble_model
    )


def _member(seed, activation=None, name=None, units=3, dtype=None):
    inputs = keras.Input((5,), name="features")
    hidden = keras.layers.Dense(
        4,
        activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        dtype=dtype,
    )(inputs)
    outputs = keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed + 100),
        dtype=dtype,
    )(hidden)
    return keras.Model(inputs, outputs, name=name or f"member_{seed}")


def _outputs(members, x):
    return np.stack(
        [keras.ops.convert_to_numpy(m(x)).astype("float32") for m in members]
    )


@pytest.mark.parametrize(
    "activation, kwargs, combine",
    [
        ("softmax", {}, lambda f, w: np.einsum("m,m...->...", w, f)),
        (
            None,
            {"from_logits": True},
            lambda f, w: np.einsum("m,m...->...", w, _softmax(f)),
        ),
        (
            None,
            {"average": "logits"},
            lambda f, w: np.einsum("m,m...->...", w, f),
        ),
    ],
)
@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.0, 4.0]])
def test_ensemble_model_is_the_numpy_weighted_mean_of_its_members(
    activation, kwargs, combine, weights
):
    members = [_member(seed, activation) for seed in range(4)]
    x = _data(2)[0]
    f = _outputs(members, x)
    assert not np.allclose(f[0], f[1], atol=1e-3)
    w = np.full(4, 0.25) if weights is None else np.array(weights) / 8.0
    ensemble = ensemble_model(members, weights=weights, **kwargs)
    assert [layer.name for layer in ensemble.layers[1:5]] == [
        m.name for m in members
    ]
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), combine(f, w), rtol=1e-5, atol=1e-6
    )


def test_ensemble_model_spread_is_the_weighted_standard_deviation():
    members = [_member(seed, "softmax") for seed in range(3)]
    x = _data(2)[0]
    f = _outputs(members, x)
    w = np.array([0.5, 0.25, 0.25])
    mean, spread = ensemble_model(
        members, weights=[2, 1, 1], return_spread=True
    ).predict(x, verbose=0)
    expected_mean = np.einsum("m,m...->...", w, f)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        spread,
        np.sqrt(np.einsum("m,m...->...", w, (f - expected_mean) ** 2)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_ensemble_model_mixes_model_kinds_and_structured_outputs():
    functional = _member(0)
    sequential = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3)], name="sequential_member"
    )

    @keras.saving.register_keras_serializable(package="test_ensembles")
    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed(name="subclassed_member")
    members = [functional, sequential, subclassed]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "ensemble_model cannot tell the inputs of models[2] "
            "('subclassed_member', a Subclassed): only Functional and "
            "Sequential models (with an Input) define them. Pass "
            "`inputs=keras.Input(...)`"
        ),
    ):
        ensemble_model(members)
    ensemble = ensemble_model(
        members, average="logits", inputs=keras.Input((5,))
    )
    x = _data(2)[0]
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0),
        _outputs(members, x).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )

    def two_heads(seed):
        inputs = keras.Input((5,))
        return keras.Model(
            inputs,
            {
                "class": keras.layers.Dense(3, activation="softmax")(inputs),
                "value": keras.layers.Dense(1)(inputs),
            },
            name=f"heads_{seed}",
        )

    heads = [two_heads(seed) for seed in range(2)]
    averaged = ensemble_model(heads).predict(x, verbose=0)
    for key in ("class", "value"):
        np.testing.assert_allclose(
            averaged[key],
            np.mean([keras.ops.convert_to_numpy(m(x)[key]) for m in heads], 0),
            rtol=1e-5,
            atol=1e-6,
        )


def test_ensemble_model_averages_float16_members_in_float32():
    members = [_member(0, dtype="float16"), _member(1)]
    x = _data(2)[0]
    ensemble = ensemble_model(members, from_logits=True)
    predicted = ensemble.predict(x, verbose=0)
    assert predicted.dtype == np.float32
    # Within float16's resolution: eager and compiled float16 matmuls round
    # differently.
    np.testing.assert_allclose(
        predicted, _softmax(_outputs(members, x)).mean(0), atol=2e-3
    )
    assert not np.allclose(predicted, predicted.astype("float16"), atol=0)


def test_ensemble_model_keras_file_and_saved_model(tmp_path):
    members = [_member(seed) for seed in range(3)]
    x = _data(2)[0]
    ensemble = ensemble_model(
        members, weights=[1, 2, 3], from_logits=True, return_spread=True
    )
    expected = ensemble.predict(x, verbose=0)
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    for got, want in zip(
        keras.saving.load_model(path).predict(x, verbose=0), expected
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    tf = pytest.importorskip("tensorflow")
    ensemble.export(str(tmp_path / "saved_model"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    served = reloaded.serve(tf.constant(x))
    for got, want in zip(served, expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_ensemble_model_shares_the_members_weights():
    members = [_member(0), _member(1)]
    ensemble = ensemble_model(members, average="logits")
    assert ensemble.get_layer("member_0") is members[0]
    assert len(ensemble.weights) == sum(len(m.weights) for m in members)


def test_ensemble_model_bad_arguments():
    members = [_member(0), _member(1)]
    expected = "a list or tuple of at least one keras.Model"
    for value in [members[0], [], [members[0], "model"], None]:
        with pytest.raises(
            ValueError, match=_message("models", expected, value)
        ):
            ensemble_model(value)
    weights = (
        "None or a list of 2 non-negative finite floats, not all zero (one "
        "per averaged output)"
    )
    for value in [[1.0], [1.0, -1.0], [0, 0], [1.0, float("nan")], "ab"]:
        with pytest.raises(
            ValueError, match=_message("weights", weights, value)
        ):
            ensemble_model(members, weights=value)
    for kwargs, name, expected, value in [
        (
            {"average": "median"},
            "average",
            "one of 'probabilities', 'logits'",
            "median",
        ),
        ({"from_logits": 1}, "from_logits", "a bool", 1),
        ({"return_spread": "no"}, "return_spread", "a bool", "no"),
        ({"name": ""}, "name", "a non-empty str", ""),
        (
            {"inputs": np.zeros((2, 5))},
            "inputs",
            "None or a structure of `keras.Input` tensors",
            np.zeros((2, 5)),
        ),
    ]:
        with pytest.raises(ValueError, match=_message(name, expected, value)):
            ensemble_model(members, **kwargs)
    with pytest.raises(ValueError, match="False with average='logits'"):
        ensemble_model(members, average="logits", from_logits=True)


def test_ensemble_model_names_what_differs():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "ensemble_model needs members with distinct names (they become "
            "layers of one model), but models[0] and models[1] are both "
            "named 'twin'. Rename one first, e.g. `models[1].name = "
            "'twin_1'`."
        ),
    ):
        ensemble_model([_member(0, name="twin"), _member(1, name="twin")])
    wide = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"ensemble_model needs members with the same inputs, but "
            f"models[1] ({wide.name!r}) takes (None, 6) float32 while "
            "models[0] ('member_0') takes (None, 5) float32."
        ),
    ):
        ensemble_model([_member(0), wide])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "ensemble_model needs members with the same outputs, but "
            "models[1] ('member_1') returns (None, 4) while models[0] "
            "('member_0') returns (None, 3)."
        ),
    ):
        ensemble_model([_member(0), _member(1, units=4)])
    # One model twice is allowed (the same layer called twice).
    member = _member(0)
    ensemble = ensemble_model([member, member], weights=[1, 3])
    x = _data(2)[0]
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0),
        keras.ops.convert_to_numpy(member(x)),
        rtol=1e-5,
        atol=1e-6,
    )
