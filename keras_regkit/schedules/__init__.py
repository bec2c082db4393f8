"""Learning-rate schedules: `keras.optimizers.schedules` subclasses."""

from keras_regkit.schedules.cyclical_learning_rate import CyclicalLearningRate
from keras_regkit.schedules.one_cycle_learning_rate import OneCycleLearningRate
from keras_regkit.schedules.snapshot_cosine_annealing import (
    SnapshotCosineAnnealing,
)

__all__ = [
    "CyclicalLearningRate",
    "OneCycleLearningRate",
    "SnapshotCosineAnnealing",
]
