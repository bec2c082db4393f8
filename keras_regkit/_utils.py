"""Private helpers shared across keras_regkit: safe files and directory locks.

The file helpers never follow a name that someone else could have planted:
temporary files are created exclusively (`O_CREAT | O_EXCL`, which refuses
an existing name, symlinks included) and written through the descriptor
that created them; a writer that needs a path (Keras's `save_weights`,
`model.export`, `savefig`) gets one inside a private directory created
exclusively with mode 0700 (`tempfile.mkdtemp`). Everything is fsynced and
renamed into place, so a reader sees the old content or the new, never a
half-written file.
"""

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
import stat
import tempfile
import weakref

from keras_regkit._validation import argument_error  # noqa: F401
from keras_regkit._validation import check_choice  # noqa: F401
from keras_regkit._validation import check_float_in_range  # noqa: F401
from keras_regkit._validation import check_int_in_range  # noqa: F401
from keras_regkit._validation import check_path  # noqa: F401

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def writing_error(error, path, writer):
    """An `OSError` like `error` whose message names `writer` and `path`.

    Keeps the errno, so `PermissionError`, a full disk (`ENOSPC`) and so on
    are still told apart by type and `errno`.
    """
    reason = error.strerror or str(error) or type(error).__name__
    message = f"{writer} could not write {os.fspath(path)!r}: {reason}"
    return OSError(error.errno, message) if error.errno else OSError(message)


_OPEN_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _exclusive_temporary(directory, name):
    """Creates `.tmp-<name>-<random>` in `directory`; returns `(fd, path)`.

    `O_EXCL` refuses any existing entry, a planted symlink included, so the
    descriptor is of a new file that this call created. Mode 0o666 less the
    umask, as for a plain `open(path, "w")`.
    """
    for _ in range(100):
        path = os.path.join(directory, f".tmp-{name}-{secrets.token_hex(8)}")
        try:
            return os.open(path, _OPEN_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(
        errno.EEXIST, "no free temporary name", os.path.join(directory, name)
    )


def fsync_directory(directory):
    """Makes a rename in `directory` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_entry(path):
    """Removes a file, symlink or directory tree at `path` if present."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Yields a new file object whose content replaces `path` on success.

    The file is a temporary created exclusively beside `path` and written
    through its own descriptor; on success it is flushed, fsynced and
    renamed onto `path` (and the directory fsynced). If the body raises, the
    temporary is removed and `path` is left as it was.

    Example:

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_file(os.path.join(d, "a.txt"), "w") as f:
    ...     _ = f.write("done")
    >>> sorted(os.listdir(d))
    ['a.txt']
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, temporary = _exclusive_temporary(directory, name)
    try:
        with os.fdopen(
            fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})
        ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_entry(temporary)
        raise
    fsync_directory(directory)


def atomic_write_text(path, text):
    """Writes `text` (UTF-8) to `path` atomically, as `atomic_file` does."""
    with atomic_file(path, "w") as f:
        f.write(text)


def _fsync_tree(path):
    """Fsyncs a regular file, or every file and folder of a tree."""
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_tree(os.path.join(root, name))
            fsync_directory(root)
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(first, second):
    """Swaps two directory entries in one step; False where unsupported.

    Linux `renameat2(RENAME_EXCHANGE)` and macOS `renamex_np(RENAME_SWAP)`:
    no moment where either name is missing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    a, b = os.fsencode(first), os.fsencode(second)
    if hasattr(libc, "renameat2"):
        function = libc.renameat2
        function.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        result = function(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif hasattr(libc, "renamex_np"):
        function = libc.renamex_np
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        result = function(a, b, 2)  # RENAME_SWAP
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # Not supported by this kernel or file system.
    raise OSError(code, os.strerror(code), second)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path whose file or folder replaces `path`.

    For writers that only take a path (`model.save_weights`,
    `model.export`, `figure.savefig`). The path lies in a private folder
    `.tmp-<name>-<random>` created exclusively beside `path` with mode
    0700, so no other user can plant a name there; it ends with the same
    name as `path` (Keras picks the format from the suffix). On success the
    result is fsynced and renamed onto `path`: an existing folder is swapped
    in one step where the system can (Linux, macOS), otherwise moved aside
    first. If the body raises, `path` is left as it was. The private folder
    is removed either way.

    Example:

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.txt")) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("done")
    >>> sorted(os.listdir(d))
    ['a.txt']
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory)
    temporary = os.path.join(private, name)
    try:
        yield temporary
        mode = os.lstat(temporary).st_mode  # FileNotFoundError: nothing made
        if stat.S_ISLNK(mode):
            raise OSError(
                errno.ELOOP,
                "refusing to move a symbolic link into place",
                temporary,
            )
        _fsync_tree(temporary)
        if (
            stat.S_ISDIR(mode)
            and os.path.isdir(path)
            and not os.path.islink(path)
        ):
            if not _exchange(temporary, path):
                os.replace(path, os.path.join(private, ".old"))
                os.replace(temporary, path)
        else:
            os.replace(temporary, path)
        fsync_directory(directory)
    finally:
        shutil.rmtree(private, ignore_errors=True)


_HELD_LOCKS = {}  # (st_dev, st_ino) of a lock file -> DirectoryLock


class DirectoryLocked(Exception):
    """Raised by `DirectoryLock.acquire` when another process holds it."""

    def __init__(self, path, holder):
        super().__init__(path, holder)
        self.path = path
        self.holder = holder


class DirectoryLock:
    """An exclusive lock of a folder, held by one writer for a whole run.

    The lock is an advisory OS lock (`flock`, or `msvcrt.locking` on
    Windows) on a lock file in the folder. The operating system drops it
    when the holding process ends, however it ends (`kill -9` included), so
    the lock file a dead run leaves behind never blocks anyone; the pid and
    host written in it only name the holder in error messages. Within one
    process, a new holder takes the lock over from an earlier one (whose
    `fit` raised and so never released it) and marks it `lost`; the earlier
    writer checks `lost` before it writes.
    """

    def __init__(self, fd, key, path, created):
        self.fd = fd
        self.key = key
        self.path = path
        self.created = created
        self.lost = False

    @classmethod
    def acquire(cls, path, owner):
        """Locks the lock file `path` (created if needed) for `owner`.

        Returns the lock; `.created` says whether this call made the file.
        Raises `DirectoryLocked` if another process holds it.
        """
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            fd, created = os.open(path, flags), False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            key = (info.st_dev, info.st_ino)
            held = _HELD_LOCKS.get(key)
            if held is None and not _try_lock(fd):
                raise DirectoryLocked(path, _read_holder(fd))
        except BaseException:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        if held is not None:
            # This process holds it already: the same owner keeps it; a new
            # owner takes over its descriptor (and with it the OS lock).
            os.close(fd)
            if held.owner() is owner:
                return held
            held.lost = True
            fd, held.fd = held.fd, None
        lock = cls(fd, key, path, created)
        lock.owner = weakref.ref(owner)
        _HELD_LOCKS[key] = lock
        weakref.finalize(owner, lock.release)
        _write_holder(fd)
        return lock

    def release(self):
        """Unlocks (closes the descriptor); the lock file stays."""
        if _HELD_LOCKS.get(self.key) is self:
            del _HELD_LOCKS[self.key]
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # Closing the descriptor drops the OS lock.


def _try_lock(fd):
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _write_holder(fd):
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode())


def _read_holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def naming_write_errors(path, writer):
    """Re-raises an `OSError` of the body as `writing_error`."""
    try:
        yield
    except OSError as e:
        raise writing_error(e, path, writer) from e
