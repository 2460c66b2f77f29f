"""The L∞ input box in the model's normalized input space: what training losses and verifiers both take.

It sits below both (docs/decisions.md, "The import order"), so a training loss does not import the
verifiers to get its input region.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InputBox:
    """Maps [0, 1] images to the model's normalized input space and builds the L∞ box around them."""

    mean: Tensor  # (1, C, 1, 1)
    std: Tensor

    @classmethod
    def for_stats(cls, mean, std, device) -> "InputBox":
        def shape(v):
            return torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return cls(shape(mean), shape(std))

    def normalize(self, x01: Tensor) -> Tensor:
        return (x01 - self.mean) / self.std

    def box(self, x01: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """(x, lower, upper) in normalized space; the box is clipped to valid pixels [0, 1] first."""
        return (self.normalize(x01), self.normalize((x01 - eps).clamp(0, 1)),
                self.normalize((x01 + eps).clamp(0, 1)))
