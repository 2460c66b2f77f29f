"""Writing only certtune's own files: never through a symbolic link, never into a FIFO or a device.

On shared storage another user can leave a link where certtune is about to write (`<out>/metrics.jsonl ->
~victim/notes`), and a plain `open(path, "w")` would overwrite the link's target. Every file certtune writes
goes through one of these, the one home of that rule (tuner/ uses them too; this module imports nothing of
certtune but the error class):

    write_atomic(path, data)          # a fresh temporary file beside `path` (exclusive create), then a rename
    with open_append(path) as f: ...  # an append log (metrics.jsonl), opened without following a link
    fd = open_lock(path)              # a lock file, opened without following a link, never truncated here
    owner = take_lock(fd)             # flock; None when taken, else what the holder wrote (pid and host)
    check_own_files(folder, names)    # before any work: each name is absent or a regular file
    data = read_regular(path)         # a file read without ever blocking on a FIFO

A path that is a link or not a regular file is refused with one `UnsafeFileError` line; nothing is written.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable

from .errors import ConfigError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
REFUSAL = "certtune writes only regular files of its own, never through a link or into a special file"


class UnsafeFileError(ConfigError):
    """A path certtune would write is a symbolic link or not a regular file; nothing was written."""


def check_own_files(folder: str | Path, names) -> None:
    """Each `folder/name` is absent or a regular file (not a link, FIFO, device or directory)."""
    for name in names:
        check_target(Path(folder) / name)


def check_target(path: str | Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # absent (its folder may not be one: found when writing)
        return
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot be written ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{path}: is {_kind(mode)}; {REFUSAL}; remove it or choose another path")


def write_atomic(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None], sync: bool = False) -> None:
    """Write `data` (bytes, text, or a function writing to a binary file) to a fresh temporary file in `path`'s
    folder, created exclusively (so no link planted under a temporary name is followed), flush it (`sync`:
    to disk), then rename it over `path` (a rename replaces a link itself, never its target). A failure (a
    full disk) removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    check_target(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_append(path: str | Path) -> IO[str]:
    """A text file opened for appending, created if missing; refused if it is a link or not a regular file."""
    fd = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a")


def open_lock(path: str | Path) -> int:
    """The descriptor of a lock file (created if missing, not truncated: only the holder rewrites it)."""
    return _open_regular(path, os.O_RDWR | os.O_CREAT)


def take_lock(fd: int) -> str | None:
    """An exclusive `flock` on `fd`, without waiting. Taken: it records this process as `<pid> on <host>`
    and returns None. Held by another process: returns what that process recorded. The kernel releases the
    lock when its holder ends, however it ends (`kill -9` included), so a lock is never stale."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}".encode(), 0)
    return None


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file, opened read-only; a FIFO or device is refused at once instead of
    blocking the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFileError(f"{path}: is {_kind(mode)}, not a file certtune can read")
        return f.read()


def _open_regular(path: str | Path, flags: int) -> int:
    """os.open without following a final link and without blocking on a FIFO; only a regular file is kept."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a link; a FIFO without reader; a folder
            check_target(path)
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFileError(f"{path}: is {_kind(mode)}; {REFUSAL}; remove it or choose another path")
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a regular file"
