"""Models that average a trained network's outputs at test time."""

# The layers package first: its FractionalPoolingAverage subclasses
# MonteCarloAverage, which imports the layer modules, so whichever package
# is imported first, the other finds its modules defined.
import keras_regkit.layers  # noqa: F401
from keras_regkit.models.monte_carlo_average import MonteCarloAverage
from keras_regkit.models.test_time_augmentation import TestTimeAugmentation

__all__ = [
    "MonteCarloAverage",
    "TestTimeAugmentation",
]
