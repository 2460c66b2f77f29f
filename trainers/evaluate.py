"""Errors at a fixed ε: clean, IBP-verified, CROWN-IBP-verified, PGD; ReLU states and bound tightness."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attacks import pgd_attack
from .bounds import ReluInput, crown_lower, margin_spec, propagate


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


def relu_state_stats(relu_inputs: list[ReluInput], input_width: Tensor) -> dict[str, Tensor]:
    """Sums over neurons (for averaging across batches) of active/inactive/unstable counts, and the
    tightness Ê(Δ0)/Ê(Δi) averaged over ReLU layers (1 = as tight as the input box; smaller = looser)."""
    active = sum((b.lower > 0).sum() for b in relu_inputs)
    inactive = sum((b.upper < 0).sum() for b in relu_inputs)
    total = sum(b.lower.numel() for b in relu_inputs)
    tightness = torch.stack([input_width / (2 * b.radius.mean()).clamp(min=1e-12) for b in relu_inputs]).mean()
    return {"active": active, "inactive": inactive, "total": total, "tightness": tightness}


class UnsoundCertificateError(RuntimeError):
    """PGD broke an example that a bound called verified: a bug in the bounds, never to be ignored."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, eps: float, box: InputBox, num_classes: int,
             metrics=("clean", "ibp"), pgd_steps: int = 20, pgd_restarts: int = 1,
             pgd_step_size: float = 0.25, device="cpu") -> dict[str, float]:
    """Errors of `model` (put in eval mode here, restored after) at ε over every batch of `loader`."""
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k in ("clean", "ibp", "crown-ibp", "pgd", "active", "inactive", "total", "tightness")}
    n, n_batches = 0, 0
    generator = torch.Generator().manual_seed(0)
    for x01, y in loader:
        x01, y = x01.to(device), y.to(device)
        x, lower, upper = box.box(x01, eps)
        C = margin_spec(y, num_classes)
        p = propagate(model, lower, upper, C, x=x)
        wrong = p.clean_logits.argmax(1) != y
        sums["clean"] += wrong.sum().item()
        ibp_ok = (p.lower > 0).all(1) & ~wrong
        sums["ibp"] += (~ibp_ok).sum().item()
        verified = ibp_ok
        if "crown-ibp" in metrics:
            crown_ok = (crown_lower(model, p, C, lower, upper) > 0).all(1) & ~wrong
            sums["crown-ibp"] += (~crown_ok).sum().item()
            verified = verified | crown_ok
        if "pgd" in metrics:
            broken = pgd_attack(model, x, y, lower, upper, pgd_steps, pgd_restarts, pgd_step_size, generator)
            sums["pgd"] += broken.sum().item()
            if (broken & verified).any():
                raise UnsoundCertificateError(
                    f"{(broken & verified).sum().item()} examples verified at eps={eps} were broken by PGD")
        stats = relu_state_stats(p.relu_inputs, (upper - lower).mean())
        for k in ("active", "inactive", "total"):
            sums[k] += float(stats[k])
        sums["tightness"] += stats["tightness"].item()
        n += len(y)
        n_batches += 1
    model.train(was_training)
    out = {"n": n, "clean_err": sums["clean"] / n, "ibp_err": sums["ibp"] / n}
    if "crown-ibp" in metrics:
        out["crown_ibp_err"] = sums["crown-ibp"] / n
    if "pgd" in metrics:
        out["pgd_err"] = sums["pgd"] / n
    out["relu_active"] = sums["active"] / sums["total"]
    out["relu_inactive"] = sums["inactive"] / sums["total"]
    out["relu_unstable"] = 1 - out["relu_active"] - out["relu_inactive"]
    out["bound_tightness"] = sums["tightness"] / n_batches
    return out
