"""α-CROWN (Xu et al., ICLR 2021): CROWN with the lower ReLU slopes optimised on the bound.

Every unstable neuron's lower line relu(z) ≥ α·z is valid for any α ∈ [0, 1], so the CROWN bound
g(α) = min_x A(α)·x + b(α) is a valid lower bound for each α; we maximise it by projected gradient ascent
(Adam, then clamp to [0, 1]), one α per neuron *and per specification row* of the output (each margin gets
its own slopes, as α-CROWN does), starting from CROWN's adaptive slopes. The best bound seen is kept per
example and row, starting from CROWN's own bound, so the result is never worse than CROWN.

Intermediate layers (our choice, docs/methods.md): their bounds are CROWN's (trainers/crown.py), computed
once and not optimised. Optimising them too, as the paper does, would rerun a backward pass from every ReLU
layer per iteration; with fixed intermediate bounds an iteration is one backward pass from the output.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .backward import concretize, relu_relaxation, two_sided
from .crown import Intermediate, back_through, crown_intermediate, crown_lower_bound, relaxed_step, spec_or_identity
from .verifiers import default

ITERATIONS, LR = default("alpha_iterations"), default("alpha_lr")  # the table's defaults (trainers/verifiers.py)


def initial_alpha(bounds, rows: int) -> dict:
    """CROWN's adaptive slopes (1 where u > −l), one copy per specification row: (B, S, *shape)."""
    alpha = {}
    for relu, (lower, upper) in bounds.items():
        low_slope = relu_relaxation(lower, upper)[0]
        alpha[relu] = low_slope.unsqueeze(1).expand(-1, rows, *low_slope.shape[1:]).clone()
    return alpha


def optimise_bound(model: nn.Module, inter: Intermediate, C: Tensor, x_lower: Tensor, x_upper: Tensor,
                   iterations: int, lr: float, best: Tensor, splits: dict | None = None,
                   beta_lr: float = 0.05, seen: dict | None = None, deadline: float | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Projected gradient ascent on the backward bound of C·f over α (and over β ≥ 0 for the split
    constraints `splits`, β-CROWN). Returns the best bound per example and row, elementwise max with `best`,
    and the A at the input of the last iteration's pass (for the box corner that attains it). Stops early
    at `deadline` (time.monotonic()): every α ∈ [0, 1] and β ≥ 0 gives a valid bound, so the best so far is
    still sound, only less tight."""
    params = [p.requires_grad_() for p in initial_alpha(inter.bounds, C.shape[1]).values()]
    alpha = dict(zip(inter.bounds, params))
    beta = None
    groups = [{"params": params, "lr": lr}]
    if splits:
        beta = {relu: torch.zeros_like(alpha[relu]).requires_grad_() for relu in splits}
        groups.append({"params": list(beta.values()), "lr": beta_lr})
    optimizer = torch.optim.Adam(groups)
    step = relaxed_step(inter.bounds, alpha, beta, splits, seen)
    for it in range(iterations + 1):
        with torch.enable_grad():
            A, bias = back_through((model,), C, inter.records, step)
            lower = concretize(A, bias, x_lower, x_upper)
            objective = -lower.sum()
        best = torch.maximum(best, lower.detach())
        if it == iterations or (deadline is not None and time.monotonic() >= deadline):
            break
        variables = [p for g in groups for p in g["params"]]
        grads = torch.autograd.grad(objective, variables)
        for p, g in zip(variables, grads):
            p.grad = g
        optimizer.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(0, 1)
            for p in groups[1]["params"] if beta else ():
                p.clamp_(min=0)
    return best, A.detach()


@torch.no_grad()
def alpha_crown_lower(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor, x: Tensor | None = None,
                      iterations: int = ITERATIONS, lr: float = LR) -> Tensor:
    """α-CROWN lower bound of C·f over the box, never below CROWN's."""
    inter = crown_intermediate(model, x_lower, x_upper, x)
    start = crown_lower_bound(model, inter, C, x_lower, x_upper)
    return optimise_bound(model, inter, C, x_lower, x_upper, iterations, lr, start)[0]


def alpha_crown_bounds(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor | None = None,
                       x: Tensor | None = None, iterations: int = ITERATIONS, lr: float = LR) -> tuple[Tensor, Tensor]:
    """α-CROWN bounds (lower, upper) of C·f(x') (or f(x')) over the box; the upper bound is the lower bound
    of −C·f with its own slopes. `iterations` Adam steps of learning rate `lr` on the slopes."""
    C = spec_or_identity(C, model, x_lower)
    return two_sided(lambda spec: alpha_crown_lower(model, x_lower, x_upper, spec, x, iterations, lr), C)


@torch.no_grad()
def alpha_crown_verified(problem, base: Tensor) -> Tensor:
    """evaluate's α-CROWN step (trainers/verifiers.py): `base` (CROWN's verified examples) plus those of the
    rest, correctly classified, whose α-CROWN bound is > 0 on every row. Starts from CROWN's intermediate
    bounds and bound in `problem.shared`, so its set contains CROWN's."""
    inter, crown = problem.shared["crown_intermediate"]
    todo = (~base & ~problem.wrong).nonzero().flatten()
    verified = base.clone()
    if len(todo):
        sub = {r: (lo[todo], up[todo]) for r, (lo, up) in inter.bounds.items()}
        opts = problem.options
        best, _ = optimise_bound(problem.model, Intermediate(inter.records, sub), problem.C[todo],
                                 problem.lower[todo], problem.upper[todo], opts.alpha_iterations, opts.alpha_lr,
                                 crown[todo])
        verified[todo] = (best > 0).all(1)
    return verified
