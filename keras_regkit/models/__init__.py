"""Models that average a trained network's outputs at test time."""

from keras_regkit.models.test_time_augmentation import TestTimeAugmentation

__all__ = [
    "TestTimeAugmentation",
]
