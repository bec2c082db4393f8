"""Training callbacks for `model.fit`."""

from keras_regkit.callbacks.batch_norm_statistics import BatchNormStatistics
from keras_regkit.callbacks.batch_norm_statistics import (
    recompute_batchnorm_statistics,
)
from keras_regkit.callbacks.cyclic_lr import CyclicLR
from keras_regkit.callbacks.lr_range_test import LRRangeTest
from keras_regkit.callbacks.lr_range_test import lr_range_test
from keras_regkit.callbacks.one_cycle import OneCycle
from keras_regkit.callbacks.polyak_averaging import PolyakAveraging
from keras_regkit.callbacks.snapshot_ensemble import SnapshotEnsemble
from keras_regkit.callbacks.snapshot_ensemble import snapshot_ensemble_model
from keras_regkit.callbacks.stochastic_weight_averaging import (
    StochasticWeightAveraging,
)

__all__ = [
    "BatchNormStatistics",
    "CyclicLR",
    "LRRangeTest",
    "OneCycle",
    "PolyakAveraging",
    "SnapshotEnsemble",
    "StochasticWeightAveraging",
    "lr_range_test",
    "recompute_batchnorm_statistics",
    "snapshot_ensemble_model",
]
