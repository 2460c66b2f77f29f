"""Empirical soundness of a bound: points inside the input box never leave the bounds computed for it.

The reference function is computed independently of trainers.bounds. In eval mode it is the model itself;
in train mode a bound describes the network whose BN layers are fixed to the clean batch's mean and biased
variance (docs/method.md §1b), so the reference is a deep copy in eval mode holding those statistics.

Points tried: the box's two extreme corners, random corners, uniform samples, and a PGD attack that pushes
each margin on its own (one row per example and margin) down toward its lower bound and up toward its upper
bound. Used by tests/test_bounds.py and by bench/gpu_check.py.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def frozen_bn_copy(model: nn.Module, x: Tensor) -> nn.Module:
    """The function f that train-mode bounds describe: BN fixed to the clean batch's mean/biased var."""
    stats = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: stats.__setitem__(
        m, (inp[0].transpose(0, 1).flatten(1).mean(1), inp[0].transpose(0, 1).flatten(1).var(1, unbiased=False))))
        for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    snapshot = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(x)
    model.load_state_dict(snapshot)  # undo the running-stat update of that forward pass
    for h in hooks:
        h.remove()
    frozen = copy.deepcopy(model).eval()
    for m_orig, m_copy in zip(model.modules(), frozen.modules()):
        if m_orig in stats:
            m_copy.running_mean.copy_(stats[m_orig][0])
            m_copy.running_var.copy_(stats[m_orig][1])
    return frozen


def warm_bn(model: nn.Module, x: Tensor, passes: int = 3) -> None:
    """Give BN non-trivial running statistics and affine parameters (some scales negative)."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x + 0.1 * torch.randn_like(x))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_(0.5, 0.8)  # some negative: BN can flip a channel's sign
                m.bias.normal_(0.0, 0.3)


def points_in_box(lower: Tensor, upper: Tensor, n_random: int, n_corners: int, gen: torch.Generator):
    """The two extreme corners, `n_corners` random corners and `n_random` uniform points (drawn on the CPU
    from `gen`, so the points do not depend on the device)."""
    pts = [lower, upper]
    for _ in range(n_corners):
        pts.append(torch.where((torch.rand(lower.shape, generator=gen) < 0.5).to(lower.device), lower, upper))
    for _ in range(n_random):
        pts.append(lower + (upper - lower) * torch.rand(lower.shape, generator=gen).to(lower.device))
    return pts


def pgd_on_margins(f: nn.Module, C: Tensor, x: Tensor, lower: Tensor, upper: Tensor, steps: int = 30,
                   per_margin: bool = True):
    """(lowest, highest) value PGD finds for each margin C·f, each of shape (B, S).

    per_margin: every (example, margin) pair gets its own row, so each margin is attacked on its own (S
    times the work); otherwise one attack per example pushes the sum of its margins. `f` must treat rows
    independently (eval mode).
    """
    B, S = C.shape[:2]
    if per_margin:
        rows = C.reshape(B * S, 1, -1)  # one spec row per attacked margin
        x, lower, upper = (t.repeat_interleave(S, dim=0) for t in (x, lower, upper))
    else:
        rows = C
    extremes = []
    for sign in (1.0, -1.0):  # minimize, then maximize
        z = x.clone()
        for _ in range(steps):
            z.requires_grad_(True)
            obj = sign * torch.einsum("rsk,rk->rs", rows, f(z)).sum()
            g, = torch.autograd.grad(obj, z)
            z = torch.max(torch.min(z.detach() - 0.1 * (upper - lower) * g.sign(), upper), lower)
        with torch.no_grad():
            extremes.append(torch.einsum("rsk,rk->rs", rows, f(z)).reshape(B, S))
    return extremes[0], extremes[1]


@torch.no_grad()
def margins_at(f: nn.Module, C: Tensor, points: list[Tensor], chunk: int = 32) -> list[Tensor]:
    """C·f(z) for each batch z in `points`, evaluated `chunk` batches per forward pass (f in eval mode)."""
    out = []
    for i in range(0, len(points), chunk):
        group = points[i:i + chunk]
        logits = f(torch.cat(group)).view(len(group), len(group[0]), -1)
        out += list(torch.einsum("bsk,pbk->pbs", C, logits))
    return out


def max_violation(lo: Tensor, up: Tensor, values) -> float:
    """How far any of `values` (each (B, S)) lies outside [lo, up]; ≤ 0 means inside."""
    return max(float(torch.maximum(lo - v, v - up).max()) for v in values)


def assert_bounds_contain(f: nn.Module, C: Tensor, x: Tensor, lower: Tensor, upper: Tensor, lo: Tensor,
                          up: Tensor, samples: int, gen: torch.Generator, per_margin: bool = True):
    """The soundness check the bound tests share: finite, ordered bounds; the box's extreme corners,
    `samples` random corners and `samples` uniform points, and a PGD on the margins all inside [lo, up]
    within fp32 slack. Returns (tolerance, PGD's lowest margins, PGD's highest margins) for extra checks."""
    assert torch.isfinite(lo).all() and torch.isfinite(up).all() and (lo <= up).all()
    tol = 1e-4 * (1 + up.abs().max())
    with torch.no_grad():
        for z in points_in_box(lower, upper, n_random=samples, n_corners=samples, gen=gen):
            m = torch.einsum("bsk,bk->bs", C, f(z))
            assert (m >= lo - tol).all(), f"sample below the lower bound by {(lo - m).max():.3g}"
            assert (m <= up + tol).all(), f"sample above the upper bound by {(m - up).max():.3g}"
    low_pgd, high_pgd = pgd_on_margins(f, C, x, lower, upper, per_margin=per_margin)
    assert (low_pgd >= lo - tol).all() and (high_pgd <= up + tol).all()
    return tol, low_pgd, high_pgd
