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

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .files import write_atomic

FORMAT = "certtune-checkpoint-1"
REQUIRED_KEYS = ("config", "model")
TRAINING_KEYS = ("epoch", "step", "best_ibp_err", "train_seconds", "optimizer", "lr_scheduler", "rng_cpu")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used; the message names the file and says what is wrong."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a fresh temporary file, flush it to disk, then rename (trainers/files.py): a crash or a full
    disk never leaves a half-written checkpoint under the real name, and a link there is never followed."""
    write_atomic(path, lambda f: torch.save({"format": FORMAT} | state, f), sync=True)


def load_checkpoint(path: str | Path, device="cpu", for_training: bool = False) -> dict:
    """Read a checkpoint safely. `for_training`: it must also hold the optimizer/RNG state to resume from."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
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
    return state


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
