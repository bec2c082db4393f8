"""Learning-rate schedules (`keras.optimizers.schedules.LearningRateSchedule`)."""

from keras_regkit.schedules.cyclical_learning_rate import CyclicalLearningRate
from keras_regkit.schedules.one_cycle_learning_rate import OneCycleLearningRate

__all__ = [
    "CyclicalLearningRate",
    "OneCycleLearningRate",
]
