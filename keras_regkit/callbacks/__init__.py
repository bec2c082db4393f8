"""Training callbacks for `model.fit`."""

from keras_regkit.callbacks.cyclic_lr import CyclicLR
from keras_regkit.callbacks.lr_range_test import LRRangeTest
from keras_regkit.callbacks.lr_range_test import lr_range_test
from keras_regkit.callbacks.one_cycle import OneCycle

__all__ = [
    "CyclicLR",
    "LRRangeTest",
    "OneCycle",
    "lr_range_test",
]
