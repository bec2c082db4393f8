"""keras_regkit: regularization layers and training-schedule callbacks.

Each part follows its paper exactly and plugs into an ordinary Keras 3
workflow: layers go into `keras.Sequential` or functional models, callbacks go
into `model.fit`, and trained models export with `model.export`.
"""

__version__ = "0.1.0"

from keras_regkit import callbacks
from keras_regkit import ensembles
from keras_regkit import layers
from keras_regkit import models
from keras_regkit import optimizers
from keras_regkit import schedules
from keras_regkit.callbacks.batch_norm_statistics import (
    recompute_batchnorm_statistics,
)

__all__ = [
    "__version__",
    "callbacks",
    "ensembles",
    "layers",
    "models",
    "optimizers",
    "recompute_batchnorm_statistics",
    "schedules",
]
