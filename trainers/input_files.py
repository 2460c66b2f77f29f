"""Reading a file someone handed us, bounded: it must be a regular file (a FIFO or a device would block
the reader forever or never end), not larger than what such a file can sensibly be (checked by `stat`
before a byte is read), and JSON in it has a nesting depth limit and finite numbers only.

Every problem is one ConfigError line naming the file. The callers raise their own error classes where
they need one (a CheckpointError, a DataError); this module stays below all of them.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_NESTING = 50  # configs, spaces and certtune's own state are a few levels deep
KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def regular_file_size(path: str | Path, what: str = "file") -> int:
    """The size of `path`, which must be a regular file (following links). `stat` never blocks, where
    opening a FIFO for reading waits for a writer."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = KIND.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ConfigError(f"{path}: {kind}, not a regular file; refused ({what} must be a plain file)")
    return st.st_size


def read_bytes(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (checked before reading). O_NONBLOCK: a file
    swapped for a FIFO between the check and the open still cannot block."""
    size = regular_file_size(path, what)
    if size > max_bytes:
        raise ConfigError(f"{path}: {_mib(size)} is too large for a {what} (at most {_mib(max_bytes)})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{path}: not a regular file; refused ({what} must be a plain file)")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: grew past {_mib(max_bytes)} while being read; refused")
    return data


def read_text(path: str | Path, max_bytes: int, what: str = "file") -> str:
    data = read_bytes(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start})") from None


def parse_json(text: str, source: str) -> Any:
    """Strict JSON: NaN/Infinity are refused (Python's json accepts them) and so is nesting deeper than
    MAX_NESTING (which would otherwise end in a RecursionError). One ConfigError line naming `source`."""
    try:
        tree = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ConfigError(f"{source}: nesting deeper than {MAX_NESTING} levels; refused") from None
    except ValueError as e:
        raise ConfigError(f"{source}: not valid JSON: {' '.join(str(e).split())[:200]}") from None
    check_depth(tree, source)
    return tree


def read_json(path: str | Path, max_bytes: int, what: str = "file") -> Any:
    return parse_json(read_text(path, max_bytes, what), str(path))


def check_depth(tree: Any, source: str, limit: int = MAX_NESTING) -> None:
    """Refuse a parsed tree (dicts and lists) nested deeper than `limit`, without recursion."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                raise ConfigError(f"{source}: nesting deeper than {limit} levels; refused")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
