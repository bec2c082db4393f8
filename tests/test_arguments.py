"""A battery of bad values over every argument of every public entry point.

Each public constructor and function is called with valid arguments except
one, which gets a value no argument accepts (an arbitrary `object()`), and,
for numeric arguments, NaN and a NumPy scalar of the wrong kind. Each call
must raise a `ValueError` or `TypeError` at once (not later, in `fit`),
naming the argument. A new argument that is not validated fails here.
"""

import inspect
import math

import keras
import numpy as np
import pytest

from keras_regkit import callbacks
from keras_regkit import ensembles
from keras_regkit import layers
from keras_regkit import models
from keras_regkit import optimizers
from keras_regkit import schedules


def _model():
    return keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1)], name="battery"
    )


def _compiled():
    model = _model()
    model.compile("sgd", "mse")
    return model


_X = np.zeros((4, 2), "float32")
_Y = np.zeros((4, 1), "float32")

# Entry point -> the valid arguments it is called with.
ENTRY_POINTS = {
    layers.DropConnectDense: {"units": 2},
    layers.DropConnectConv2D: {"filters": 2, "kernel_size": 3},
    layers.DropPath: {},
    layers.StochasticDepth: {
        "block": keras.layers.Dense(2),
        "survival_probability": 0.5,
    },
    layers.FractionalMaxPooling2D: {},
    layers.DebiasedBatchNormalization: {},
    layers.linear_survival_probabilities: {"num_blocks": 4},
    schedules.CyclicalLearningRate: {
        "initial_learning_rate": 0.01,
        "maximal_learning_rate": 0.1,
        "step_size": 4,
    },
    schedules.OneCycleLearningRate: {
        "maximal_learning_rate": 0.1,
        "total_steps": 10,
    },
    schedules.SnapshotCosineAnnealing: {
        "initial_learning_rate": 0.1,
        "total_steps": 10,
        "cycles": 2,
    },
    callbacks.CyclicLR: {"base_lr": 0.01, "max_lr": 0.1, "step_size": 4},
    callbacks.OneCycle: {"max_lr": 0.1},
    callbacks.SnapshotEnsemble: {
        "cycles": 2,
        "max_lr": 0.1,
        "directory": "snapshots",
    },
    callbacks.PolyakAveraging: {
        "batch_norm": "recompute",
        "batch_norm_data": _X,
    },
    callbacks.StochasticWeightAveraging: {
        "swa_learning_rate": 0.05,
        "batch_norm_data": _X,
    },
    callbacks.BatchNormStatistics: {"data": _X},
    callbacks.LRRangeTest: {},
    optimizers.AveragedOptimizer: {
        "inner_optimizer": keras.optimizers.SGD(0.1)
    },
    models.TestTimeAugmentation: {"model": _model(), "views": "flip"},
    models.MonteCarloAverage: {
        "model": keras.Sequential(
            [keras.Input((2,)), keras.layers.Dropout(0.5)], name="noisy"
        )
    },
    ensembles.ensemble_model: {"models": [_model()]},
}

# Arguments that take any object by design (data pipelines, models, Keras's
# own layer keyword arguments), with the reason.
ANY_OBJECT = {
    "kwargs": "passed on to the Keras base class",
    "args": "passed on to the Keras base class",
    "block": "a layer or a list of layers; checked by type below",
    "name": "Keras checks layer and schedule names itself",
}


def _signature_names(entry):
    target = entry.__init__ if inspect.isclass(entry) else entry
    names = []
    for name, parameter in inspect.signature(target).parameters.items():
        if name == "self" or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        names.append((name, parameter.default))
    return names


def _cases():
    for entry, valid in ENTRY_POINTS.items():
        for name, default in _signature_names(entry):
            if name in ANY_OBJECT:
                continue
            yield entry, valid, name, object()
            numeric = isinstance(default, (int, float)) and not isinstance(
                default, bool
            )
            if numeric or (
                default is inspect.Parameter.empty
                and isinstance(valid.get(name), (int, float))
            ):
                yield entry, valid, name, math.nan
                yield entry, valid, name, np.array([1.0, 2.0])


CASES = list(_cases())


@pytest.mark.parametrize(
    "entry, valid, name, value",
    CASES,
    ids=[f"{e.__name__}-{n}-{type(v).__name__}" for e, _, n, v in CASES],
)
def test_bad_value_raises_at_construction_naming_the_argument(
    entry, valid, name, value
):
    arguments = {**valid, name: value}
    with pytest.raises((ValueError, TypeError)) as raised:
        entry(**arguments)
    assert f"`{name}`" in str(raised.value) or f"{name}=" in str(
        raised.value
    ), str(raised.value)


def test_the_battery_covers_every_public_entry_point():
    public = {
        getattr(module, name)
        for module in (layers, schedules, callbacks, optimizers, models)
        for name in module.__all__
    }
    # Functions that need a trained model and data run in their own tests
    # (test_lr_range_test, test_batch_norm_statistics, test_ensembles).
    covered_elsewhere = {
        callbacks.lr_range_test,
        callbacks.recompute_batchnorm_statistics,
        callbacks.snapshot_ensemble_model,
        layers.FractionalPoolingAverage,
    }
    public.add(ensembles.ensemble_model)
    missing = public - set(ENTRY_POINTS) - covered_elsewhere
    assert not missing, missing
    assert (
        ensembles.snapshot_ensemble_model is callbacks.snapshot_ensemble_model
    )


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    layers.DropPath(np.float32(0.25), seed=np.int64(1))
    layers.FractionalMaxPooling2D(np.float64(1.5), seed=np.int32(2))
    schedules.CyclicalLearningRate(np.float32(0.01), np.float32(0.1), 4)
    callbacks.CyclicLR(np.float32(0.01), np.float64(0.1), np.int64(4))
    callbacks.OneCycle(np.float32(0.1), total_steps=np.int64(100))
    callbacks.PolyakAveraging(decay=np.float32(0.9), every=np.int64(2))
    callbacks.SnapshotEnsemble(np.int64(2), np.float32(0.1), "snapshots")
    layers.DropConnectDense(np.int64(2), rate=np.float32(0.5))
