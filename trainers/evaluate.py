"""Errors at a fixed ε: clean, IBP-, CROWN-IBP-, CROWN-, α-CROWN- and BaB-verified, PGD; ReLU states and
bound tightness."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .alpha_crown import ITERATIONS, LR, optimise_bound
from .attacks import pgd_attack
from .bab import FALSIFIED, UNKNOWN, VERIFIED, BabConfig, bab
from .bounds import ReluInput, crown_lower, margin_spec, propagate
from .crown import crown_intermediate, crown_lower_bound
from .input_box import InputBox


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


VERIFIERS = ("crown", "alpha-crown", "bab")  # the complete-ish verifiers, beyond IBP and CROWN-IBP


@dataclass
class VerifierOptions:
    alpha_iterations: int = ITERATIONS
    alpha_lr: float = LR
    bab: BabConfig = field(default_factory=BabConfig)


def stronger_verifiers(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, wrong: Tensor, metrics,
                       opts: VerifierOptions, already: Tensor) -> dict[str, Tensor]:
    """Masks of examples verified by CROWN, α-CROWN and BaB (those asked for, and those they build on),
    and BaB's statuses. Each runs only where the one before did not verify, so the sets are nested by
    construction: CROWN ⊆ α-CROWN (initialised at, and never below, CROWN's bound) ⊆ BaB (its root is α-CROWN).
    BaB, the complete verifier, also takes as proven what the cheaper ones (`already`: IBP, CROWN-IBP) proved,
    as a verification pipeline does: it branches only on the rest, and its set holds every other verifier's."""
    out = {}
    inter = crown_intermediate(model, lower, upper)
    crown = crown_lower_bound(model, inter, C, lower, upper)
    out["crown"] = (crown > 0).all(1) & ~wrong
    if "alpha-crown" not in metrics and "bab" not in metrics:
        return out
    todo = (~out["crown"] & ~wrong).nonzero().flatten()
    alpha_ok = out["crown"].clone()
    if len(todo):
        sub = {r: (lo[todo], up[todo]) for r, (lo, up) in inter.bounds.items()}
        best, _ = optimise_bound(model, type(inter)(inter.records, sub), C[todo], lower[todo], upper[todo],
                                 opts.alpha_iterations, opts.alpha_lr, crown[todo])
        alpha_ok[todo] = (best > 0).all(1)
    out["alpha-crown"] = alpha_ok
    if "bab" in metrics:
        proven = (alpha_ok | already).tolist()
        status = [VERIFIED if ok else FALSIFIED if w else None for ok, w in zip(proven, wrong.tolist())]
        todo = [i for i, s in enumerate(status) if s is None]
        if todo:
            index = torch.tensor(todo, device=lower.device)
            found, _ = bab(model, lower[index], upper[index], C[index], opts.bab)
            for i, s in zip(todo, found):
                status[i] = s
        out["bab"] = torch.tensor([s == VERIFIED for s in status], device=lower.device)
        out["bab_falsified"] = sum(s == FALSIFIED for s in status)
        out["bab_unknown"] = sum(s == UNKNOWN for s in status)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, eps: float, box: InputBox, num_classes: int,
             metrics=("clean", "ibp"), pgd_steps: int = 20, pgd_restarts: int = 1,
             pgd_step_size: float = 0.25, device="cpu", verifier_options: VerifierOptions | None = None
             ) -> dict[str, float]:
    """Errors of `model` (put in eval mode here, restored after) at ε over every batch of `loader`.
    `metrics` may name "crown", "alpha-crown" and "bab" too (knobs in `verifier_options`); with any of them,
    `verified_err` counts an example as verified when any verifier that ran proves it (IBP always runs)."""
    opts = verifier_options or VerifierOptions()
    stronger = any(v in metrics for v in VERIFIERS)
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k in ("clean", "ibp", "crown-ibp", "pgd", "active", "inactive", "total", "tightness",
                             *VERIFIERS, "any", "bab_falsified", "bab_unknown")}
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
        if stronger:
            found = stronger_verifiers(model, lower, upper, C, wrong, metrics, opts, verified)
            for name in VERIFIERS:
                if name in metrics:
                    sums[name] += (~found[name]).sum().item()
                    verified = verified | found[name]
            sums["any"] += (~verified).sum().item()
            if "bab" in metrics:
                sums["bab_falsified"] += found["bab_falsified"]
                sums["bab_unknown"] += found["bab_unknown"]
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
    for name in VERIFIERS:
        if name in metrics:
            out[name.replace("-", "_") + "_err"] = sums[name] / n
    if stronger:  # verified by any verifier that ran: the certificate one has
        out["verified_err"] = sums["any"] / n
    if "bab" in metrics:
        out["bab_falsified"], out["bab_unknown"] = int(sums["bab_falsified"]), int(sums["bab_unknown"])
    if "pgd" in metrics:
        out["pgd_err"] = sums["pgd"] / n
    out["relu_active"] = sums["active"] / sums["total"]
    out["relu_inactive"] = sums["inactive"] / sums["total"]
    out["relu_unstable"] = 1 - out["relu_active"] - out["relu_inactive"]
    out["bound_tightness"] = sums["tightness"] / n_batches
    return out
