"""Argument validation shared by every public constructor and function.

Each check raises the toolkit's three-part `ValueError` (what was invalid,
what is allowed, what was received) and returns the value as a plain Python
object, so NumPy scalars (`np.float32(0.5)`, `np.int64(3)`) are accepted
wherever Python numbers are and stored as Python numbers in configs.
"""

import numbers
import os

import numpy as np

__all__ = [
    "argument_error",
    "check_averaging",
    "check_bool",
    "check_choice",
    "check_decay",
    "check_float_in_range",
    "check_int",
    "check_int_in_range",
    "check_path",
    "check_seed",
    "check_verbose",
]


def argument_error(name, expected, value):
    """Builds the toolkit's three-part `ValueError` for a bad argument.

    Args:
        name: str. The argument's name, as the user typed it.
        expected: str. What is allowed, e.g. "a float in [0, 1)".
        value: The value received.

    Returns:
        A `ValueError` (to be raised by the caller).
    """
    return ValueError(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _is_real(value):
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def check_float_in_range(name, value, low, high, closed_low, closed_high):
    """Returns `float(value)` or raises `argument_error` naming the interval.

    NaN is refused (it lies in no interval); `high=float("inf")` with
    `closed_high=False` allows any finite value above `low`.
    """
    interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
    expected = f"a float in {interval}"
    if not _is_real(value):
        raise argument_error(name, expected, value)
    number = float(value)
    above = number >= low if closed_low else number > low
    below = number <= high if closed_high else number < high
    if not (above and below):
        raise argument_error(name, expected, value)
    return number


def check_int(name, value, minimum=None, maximum=None, allow_none=False):
    """Returns `int(value)` for an integer in `[minimum, maximum]`."""
    if value is None and allow_none:
        return None
    parts = ["an int"]
    if minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    expected = " ".join(parts) + (" or None" if allow_none else "")
    if not _is_int(value):
        raise argument_error(name, expected, value)
    number = int(value)
    if (minimum is not None and number < minimum) or (
        maximum is not None and number > maximum
    ):
        raise argument_error(name, expected, value)
    return number


def check_bool(name, value):
    """Returns `bool(value)` for a Python or NumPy bool, else raises."""
    if not _is_bool(value):
        raise argument_error(name, "a bool", value)
    return bool(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises."""
    try:
        allowed = value in choices
    except (TypeError, ValueError):  # e.g. an array, whose `==` is a mask
        allowed = False
    if not allowed:
        listed = ", ".join(repr(c) for c in choices)
        raise argument_error(name, f"one of {listed}", value)
    return value


def check_int_in_range(name, value, low, high=None):
    """Returns `int(value)` for an integer in `[low, high]`, else raises.

    Python and NumPy integers are accepted; `bool` and floats are not.
    `high=None` leaves the range open above.
    """
    expected = (
        f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        raise argument_error(name, expected, value)
    return int(value)


def check_path(name, value):
    """Returns `os.fspath(value)` for a non-empty str or `os.PathLike`."""
    if not isinstance(value, (str, os.PathLike)):
        raise argument_error(
            name, "a non-empty path (str or os.PathLike)", value
        )
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise argument_error(
            name, "a non-empty path (str or os.PathLike)", value
        )
    return path


def check_decay(value):
    """An averaging decay: a float in (0, 1), or `None` (uniform average)."""
    if value is None:
        return None
    expected = "a float in (0, 1), or None for the uniform average"
    if not _is_real(value) or not 0 < value < 1:
        raise argument_error("decay", expected, value)
    return float(value)


def check_averaging(decay, start, every, warmup):
    """The averaging arguments shared by `PolyakAveraging` and
    `AveragedOptimizer`; returns `(decay, start, every, warmup)`."""
    decay = check_decay(decay)
    start = check_int("start", start, minimum=0)
    every = check_int("every", every, minimum=1)
    warmup = check_bool("warmup", warmup)
    if warmup and decay is None:
        raise argument_error(
            "warmup",
            "False when decay=None (the warm-up applies to the EMA only)",
            warmup,
        )
    return decay, start, every, warmup


def check_seed(name, value):
    """A seed: `None` or a non-negative int (as `keras.random` takes)."""
    return check_int(name, value, minimum=0, allow_none=True)


def check_verbose(value):
    """`verbose`: 0 (silent) or 1, as Keras callbacks take it."""
    return check_int("verbose", value, minimum=0, maximum=2)
