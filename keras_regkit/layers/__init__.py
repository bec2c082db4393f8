"""Regularization layers."""

from keras_regkit.layers.drop_connect import DropConnectConv2D
from keras_regkit.layers.drop_connect import DropConnectDense
from keras_regkit.layers.drop_path import DropPath
from keras_regkit.layers.stochastic_depth import StochasticDepth
from keras_regkit.layers.stochastic_depth import linear_survival_probabilities

__all__ = [
    "DropConnectConv2D",
    "DropConnectDense",
    "DropPath",
    "StochasticDepth",
    "linear_survival_probabilities",
]
