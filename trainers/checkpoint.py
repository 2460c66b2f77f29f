"""Checkpoint files: written atomically, read without running code.

A checkpoint is a dict of tensors and plain data (the config as a dict of scalars and lists, numbers, the
optimizer and LR-scheduler state dicts, the RNG state as a byte tensor), so it loads with
`torch.load(weights_only=True)`. A `.pt` handed to us from shared storage or another machine is therefore
never unpickled into arbitrary objects: a file whose pickle would call a function (`__reduce__` →
`os.system`) is refused by the unpickler before anything runs. Every way a file can be wrong (missing,
empty, truncated, random bytes, not certtune's, weights of another architecture) ends in one
CheckpointError line.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .files import write_atomic
from .input_files import regular_file_size

FORMAT = "certtune-checkpoint-1"
REQUIRED_KEYS = ("config", "model")
TRAINING_KEYS = ("epoch", "step", "best_ibp_err", "train_seconds", "optimizer", "lr_scheduler", "rng_cpu")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used; the message names the file and says what is wrong."""


class WriteError(ConfigError):
    """A run's file could not be written (a full disk, a quota, a read-only file system): one line naming it."""


def _write_problem(e: BaseException, path: Path) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:  # torch's own message for a short write is "unexpected pos ...": say what the disk says instead
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < 2**20:
            return "No space left on device"
    except OSError:
        pass
    return " ".join(str(e).split())[:200] or type(e).__name__


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a fresh temporary file, flush it to disk, then rename (trainers/files.py): a crash or a full
    disk never leaves a half-written checkpoint under the real name, and a link there is never followed."""
    try:
        write_atomic(path, lambda f: torch.save({"format": FORMAT} | state, f), sync=True)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError("... unexpected pos")
        raise WriteError(f"{path}: cannot write the checkpoint ({_write_problem(e, path)}); the previous "
                         f"{path.name}, if any, is intact") from None


def load_checkpoint(path: str | Path, device="cpu", for_training: bool = False) -> dict:
    """Read a checkpoint safely. `for_training`: it must also hold the optimizer/RNG state to resume from."""
    path = Path(path)
    try:
        regular_file_size(path, "checkpoint")  # a FIFO would block torch.load
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    _check_archive(path)
    try:
        # First a memory-mapped look (nothing materialised): the tensors' sizes are checked against the
        # architecture its config names; only then is the file read into memory, where torch also checks
        # that every record holds the bytes the pickle claims.
        _check_tensor_sizes(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        state = torch.load(path, map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse the file means the same thing to the user
        wanted = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted:  # the pickle names a function or class to call: what a code-running file does
            raise CheckpointError(
                f"{path}: refused: it asks to call {wanted.group(1)} when loaded, which could run code; "
                "certtune only loads checkpoints of tensors and plain data") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{_one_line(e)}") from None
    missing = [k for k in REQUIRED_KEYS + (TRAINING_KEYS if for_training else ()) if not _has(state, k)]
    if missing:
        raise CheckpointError(f"{path}: not a certtune checkpoint (missing {', '.join(missing)})")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: not a certtune checkpoint (its config is not a mapping)")
    if for_training:
        check_training_state(state, path)
    return state


def _check_archive(path: Path) -> None:
    """The zip directory, read before any record: torch.save stores records uncompressed, so a compressed
    record (a small file that inflates to gigabytes) or records claiming more bytes than the file holds are
    refused here. A file that is no zip at all is left to torch.load's own message."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    packed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise CheckpointError(f"{path}: record {packed} is compressed; torch.save never compresses, so this file "
                              "was altered; refused")
    claimed, size = sum(i.file_size for i in infos), path.stat().st_size
    if claimed > size:
        raise CheckpointError(f"{path}: its records claim {_mib(claimed)} but the file holds {_mib(size)}; refused")


def _check_tensor_sizes(state, path: Path) -> None:
    """The tensors of a memory-mapped load (nothing read yet) must fit the architecture of the config:
    the model, two optimizer moments per weight, and a little for the RNG state and scalars."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return  # not certtune's: load_checkpoint says so after the real load
    claimed = sum(t.untyped_storage().nbytes() for t in _unique_storages(state))
    allowed = 3 * _model_bytes(state["config"]) + 2**20
    if claimed > allowed:
        raise CheckpointError(f"{path}: its tensors claim {_mib(claimed)}, more than a checkpoint of its "
                              f"architecture holds (at most {_mib(allowed)}); refused before reading them")


def _model_bytes(config: dict) -> float:
    """Bytes of the parameters and buffers of the model `config` names, built on the meta device (no memory);
    infinity when the config names no buildable model (the caller refuses such a config anyway)."""
    from .config import TrainConfig
    from .models import build_model

    try:
        cfg = TrainConfig.from_dict(config).resolve()
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.dataset, bn=cfg.bn)
    except Exception:  # noqa: BLE001 - an invalid config is reported by the caller with its own message
        return math.inf
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _unique_storages(tree) -> list[torch.Tensor]:
    """One tensor per distinct storage in a nested dict/list (views of one storage are counted once)."""
    seen, out, stack = set(), [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            key = node.untyped_storage().data_ptr(), node.untyped_storage().nbytes()
            if key not in seen:
                seen.add(key)
                out.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return out


MAX_STEP = 2**53  # optimizer steps: beyond this a float counter stops counting


def check_training_state(state: dict, path: Path) -> None:
    """The numbers a resume continues from are in range, checked before anything trains: an epoch of
    -1000000 would otherwise train a million epochs."""
    epochs = state["config"].get("epochs")
    epoch, step = state["epoch"], state["step"]
    if not _is_int(epoch) or not (isinstance(epochs, int) and 0 <= epoch <= epochs):
        raise CheckpointError(f"{path}: epoch {_short(epoch)} is not an epoch of its {_short(epochs)}-epoch run")
    if not _is_int(step) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{path}: step {_short(step)} is not a step count in [0, 2**53]")
    best, seconds = state["best_ibp_err"], state["train_seconds"]
    if not (_is_number(best) and (0 <= best <= 1 or best == math.inf)):
        raise CheckpointError(f"{path}: best_ibp_err {_short(best)} is not an error in [0, 1] (or inf)")
    if not (_is_number(seconds) and 0 <= seconds < math.inf):
        raise CheckpointError(f"{path}: train_seconds {_short(seconds)} is not a finite number >= 0")
    rng = state["rng_cpu"]
    expected = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != expected.dtype or rng.shape != expected.shape:
        raise CheckpointError(f"{path}: rng_cpu is not a CPU random-generator state (a {tuple(expected.shape)} "
                              f"{expected.dtype} tensor)")
    cuda = state.get("rng_cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and len(cuda) <= 1024 and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() <= 2**16
            for t in cuda)):
        raise CheckpointError(f"{path}: rng_cuda is not a list of CUDA random-generator states")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def load_weights(model: nn.Module, weights, path: str | Path) -> None:
    """`model.load_state_dict`, with a mismatch (another architecture, a tampered file) as one line."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: not a certtune checkpoint (its model entry is not a state dict)")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its weights do not fit this model: {_one_line(e)}") from None


def _has(state, key: str) -> bool:
    return isinstance(state, dict) and key in state


def _one_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # torch's unpickling errors bury the cause in the middle of a long advice text
    cause = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
    text = " ".join(" ".join(cause[-1:] or lines[:2]).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."
