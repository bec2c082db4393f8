"""Learning-rate schedules (`keras.optimizers.schedules.LearningRateSchedule`)."""

__all__ = []
