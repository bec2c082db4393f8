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
