"""Errors at a fixed ε: clean, IBP-, CROWN-IBP-, CROWN-, α-CROWN- and BaB-verified, PGD; ReLU states and
bound tightness."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .attacks import pgd_attack
from .bounds import ReluInput, crown_lower, margin_spec, propagate
from .input_box import InputBox
from .verifiers import CLEAN, VERIFIERS, Problem, VerifierOptions, names, with_bases


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
             pgd_step_size: float = 0.25, device="cpu", verifier_options: VerifierOptions | None = None,
             progress: Callable[[int, str], None] | None = None) -> dict[str, float]:
    """Errors of `model` (put in eval mode here, restored after) at ε over every batch of `loader`.
    `metrics` may name the stronger verifiers too (trainers/verifiers.py; knobs in `verifier_options`); with
    any of them, `verified_err` counts an example as verified when any verifier that ran proves it (IBP always
    runs). `progress(examples done, what runs now)` is called after each batch and inside the stronger ones."""
    opts = verifier_options or VerifierOptions()
    stepped = with_bases(m for m in metrics if m in names(stepped=True))
    asked = [n for n in stepped if n in metrics]
    counts = [c for n in asked for c in VERIFIERS[n].counts]
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k in (CLEAN, *names(per_epoch=True), "active", "inactive", "total", "tightness",
                             *asked, "any", *counts)}
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
        if stepped:
            problem = Problem(model, lower, upper, C, wrong, verified, opts)
            if progress is not None:
                problem.progress = lambda stage, done=n, size=len(y): progress(
                    done, f"{stage} on examples {done + 1}-{done + size}")
            verified = run_stepped(stepped, asked, problem, sums)
            sums["any"] += (~verified).sum().item()
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
        if progress is not None:
            progress(n, "")
    model.train(was_training)
    out = {"n": n, "clean_err": sums["clean"] / n, "ibp_err": sums["ibp"] / n}
    if "crown-ibp" in metrics:
        out["crown_ibp_err"] = sums["crown-ibp"] / n
    for name in asked:
        out[VERIFIERS[name].metric] = sums[name] / n
    if stepped:  # verified by any verifier that ran: the certificate one has
        out["verified_err"] = sums["any"] / n
    for c in counts:
        out[c] = int(sums[c])
    if "pgd" in metrics:
        out["pgd_err"] = sums["pgd"] / n
    out["relu_active"] = sums["active"] / sums["total"]
    out["relu_inactive"] = sums["inactive"] / sums["total"]
    out["relu_unstable"] = 1 - out["relu_active"] - out["relu_inactive"]
    out["bound_tightness"] = sums["tightness"] / n_batches
    return out


def run_stepped(stepped, asked, problem: Problem, sums: dict) -> Tensor:
    """The stronger verifiers of one batch (trainers/verifiers.py: CROWN, α-CROWN, BaB), each on what the one
    it builds on left open, so their verified sets are nested by construction. Adds the errors of those
    `asked` to `sums`; returns what the batch's verifiers proved in all (`problem.already` included)."""
    found = {}
    for name in stepped:
        v = VERIFIERS[name]
        problem.progress(name)
        found[name] = v.function("step")(problem, found.get(v.builds_on))
    verified = problem.already
    for name in asked:
        sums[name] += (~found[name]).sum().item()
        verified = verified | found[name]
    for c, k in problem.counts.items():
        if c in sums:
            sums[c] += k
    return verified
