"""Regularization layers."""

from keras_regkit.layers.batch_normalization import DebiasedBatchNormalization
from keras_regkit.layers.drop_connect import DropConnectConv2D
from keras_regkit.layers.drop_connect import DropConnectDense
from keras_regkit.layers.drop_path import DropPath
from keras_regkit.layers.fractional_max_pooling import FractionalMaxPooling2D
from keras_regkit.layers.fractional_pooling_average import (
    FractionalPoolingAverage,
)
from keras_regkit.layers.stochastic_depth import StochasticDepth
from keras_regkit.layers.stochastic_depth import linear_survival_probabilities

__all__ = [
    "DebiasedBatchNormalization",
    "DropConnectConv2D",
    "DropConnectDense",
    "DropPath",
    "FractionalMaxPooling2D",
    "FractionalPoolingAverage",
    "StochasticDepth",
    "linear_survival_probabilities",
]
