"""Training callbacks for `model.fit`."""

from keras_regkit.callbacks.cyclic_lr import CyclicLR
from keras_regkit.callbacks.lr_range_test import LRRangeTest
from keras_regkit.callbacks.lr_range_test import lr_range_test
from keras_regkit.callbacks.one_cycle import OneCycle
from keras_regkit.callbacks.snapshot_ensemble import SnapshotEnsemble
from keras_regkit.callbacks.snapshot_ensemble import snapshot_ensemble_model

__all__ = [
    "CyclicLR",
    "LRRangeTest",
    "OneCycle",
    "SnapshotEnsemble",
    "lr_range_test",
    "snapshot_ensemble_model",
]
