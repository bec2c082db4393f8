"""Optimizer wrappers that own per-step state."""

from keras_regkit.optimizers.averaged_optimizer import AveragedOptimizer

__all__ = [
    "AveragedOptimizer",
]
