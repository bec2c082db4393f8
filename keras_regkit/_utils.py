"""Private helpers shared across keras_regkit: argument errors, atomic files."""

import contextlib
import os
import shutil
import tempfile


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


def check_float_in_range(name, value, low, high, closed_low, closed_high):
    """Returns `float(value)` or raises `argument_error` naming the interval."""
    interval = (
        f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
    )
    expected = f"a float in {interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise argument_error(name, expected, value)
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    if not (above and below):
        raise argument_error(name, expected, value)
    return float(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise argument_error(name, f"one of {allowed}", value)
    return value


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`, renamed onto `path` on success.

    Whatever the body writes at the temporary path (a file or a directory)
    becomes visible under `path` in one `os.replace`, so a reader never sees a
    half-written file and a crash leaves at most a stray temporary entry whose
    name starts with `.tmp-`. If the body raises, the temporary entry is
    removed and the exception propagates; `path` is left as it was.

    Example:

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.txt")) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("done")
    >>> sorted(os.listdir(d))
    ['a.txt']
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Keep the final suffix: Keras chooses the format from it (".keras", ".h5").
    suffix = "".join(name.partition(".")[1:]) if "." in name else ""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=suffix, dir=directory)
    os.close(fd)
    os.remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
