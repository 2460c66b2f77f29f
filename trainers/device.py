"""The device a run uses, chosen and checked once: below both training and verification."""
from __future__ import annotations

import re

import torch

from .config import ConfigError
from .cpu_memory import keep_freed_memory

DEVICE_NAME = re.compile(r"cpu|cuda(:[0-9]+)?")


def pick_device(name: str | None) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when there is one); anything else is a ConfigError before any work."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"--device: unknown device {name!r}; allowed: cpu, cuda, cuda:N, auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {name} requested but no CUDA device is available")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()  # CPU steps are 25-30% faster without a page fault per fresh tensor
    return device
