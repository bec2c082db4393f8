"""Training callbacks for `model.fit`."""

__all__ = []
