"""Models that average a trained network's outputs at test time."""

__all__ = []
