"""A run directory (`--out`): one writer at a time, and a start that checks everything before it writes.

    with RunDir.open(out, cfg.to_dict(), restart=False) as run:
        state = run.resume_state   # the last checkpoint's contents, or None for a fresh run
        ...

Opening takes an exclusive lock (`flock` on `<out>/.lock`, released when the process ends, however it ends),
so a second `certtune train` on the same directory stops with one line instead of interleaving its
metrics with the first. Then it checks, in this order and before writing anything: the path is a
directory; the run's files are absent or regular files (never a link certtune would write through,
trainers/files.py); a `config.yaml` or `last.pt` already there was written by this same config; `last.pt`
is readable. Only then is `config.yaml` written. A failed start leaves the directory as it was.

`restart=True` starts over: the old run's files move to `<out>/replaced-<UTC time>/`, so nothing is lost.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .errors import ConfigError, shown
from .files import UnsafeFileError, check_own_files, open_lock, take_lock
from .input_files import regular_file_size

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
LOCK_FILE = ".lock"


class RunDirError(ConfigError):
    """The run directory cannot be used as asked; nothing in it was changed."""


class RunDir:
    def __init__(self, path: Path, lock_fd: int, resume_state: dict | None):
        self.path, self._lock_fd, self.resume_state = path, lock_fd, resume_state

    @classmethod
    def open(cls, path: str | Path, config: dict, restart: bool = False, device="cpu") -> "RunDir":
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--out: {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = open_lock(path / LOCK_FILE)  # a link there is refused, its target never truncated
        except UnsafeFileError as e:
            raise RunDirError(f"--out: {e}") from None
        except OSError as e:
            raise RunDirError(f"--out: cannot use {path}: {e.strerror or e}") from None
        try:
            _lock(fd, path)
            try:
                check_own_files(path, RUN_FILES)
            except UnsafeFileError as e:
                raise RunDirError(f"--out: {e}") from None
            if restart:
                _set_aside(path)
            state = _check_existing(path, config, device)
            return cls(path, fd, state)
        except BaseException:
            os.close(fd)  # closing the descriptor releases the lock
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(fd: int, path: Path) -> None:
    owner = take_lock(fd)
    if owner is not None:
        raise RunDirError(f"--out: {path} is in use by another certtune process (pid {owner}); "
                          "wait for it to finish or choose another --out")


def _check_existing(path: Path, config: dict, device) -> dict | None:
    """The existing run must be this config's; return its last checkpoint's state (None: fresh start)."""
    hint = "use a fresh --out, or --restart to set the old run aside and start over"
    _check_regular(path, hint)
    saved = path / "config.yaml"
    if saved.exists():
        from .safe_yaml import read_yaml_file  # here: a GPU machine with only torch trains without --out

        try:
            old = read_yaml_file(saved)
        except ConfigError as e:
            raise RunDirError(f"{e}; {hint}") from None
        _same_config(old, config, str(saved), hint)
    last = path / "last.pt"
    if not last.exists():
        return None
    try:
        state = load_checkpoint(last, device, for_training=True)
    except CheckpointError as e:
        raise RunDirError(f"{e}; the run cannot resume from it: --restart sets it aside and starts over "
                          "(best.pt, if any, is kept there)") from None
    _same_config(state["config"], config, str(last), hint)
    return state


def _check_regular(path: Path, hint: str) -> None:
    """The run's files are plain files: a FIFO where metrics.jsonl should be would block the resume that
    reads it (checked by stat, which never blocks)."""
    for name in RUN_FILES:
        if os.path.lexists(path / name):
            try:
                regular_file_size(path / name, name)
            except ConfigError as e:
                raise RunDirError(f"{e}; {hint}") from None


def _same_config(old, new: dict, where: str, hint: str) -> None:
    if old == new:
        return
    key, a, b = first_difference(old, new)
    raise RunDirError(f"{where} was written by a different config ({key}: {shown(a)} there, {shown(b)} now); {hint}")


def first_difference(old, new, prefix: str = "") -> tuple[str, object, object]:
    """The first dotted key where two config trees differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key, _MISSING) != new.get(key, _MISSING):
                return first_difference(old.get(key, _MISSING), new.get(key, _MISSING), f"{prefix}{key}.")
    return prefix.rstrip(".") or "config", old, new


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _set_aside(path: Path) -> None:
    present = [name for name in RUN_FILES if (path / name).exists()]
    if not present:
        return
    stamp = time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    aside, n = path / stamp, 1
    while aside.exists():
        aside, n = path / f"{stamp}-{n}", n + 1
    aside.mkdir()
    for name in present:
        shutil.move(str(path / name), str(aside / name))
