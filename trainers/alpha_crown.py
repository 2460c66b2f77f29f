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

import math
import time
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backward import LayerFacts, ReluStep, back_relu_lines, concretize, relu_relaxation, two_sided
from .crown import Bounds, Intermediate, back_through, crown_intermediate, crown_lower_bound, spec_or_identity
from .verifiers import default

ITERATIONS, LR = default("alpha_iterations"), default("alpha_lr")  # the table's defaults (trainers/verifiers.py)


def initial_alpha(bounds, rows: int) -> dict:
    """CROWN's adaptive slopes (1 where u > −l), one copy per specification row: (B, S, *shape)."""
    alpha = {}
    for relu, (lower, upper) in bounds.items():
        low_slope = relu_relaxation(lower, upper)[0]
        alpha[relu] = low_slope.unsqueeze(1).expand(-1, rows, *low_slope.shape[1:]).clone()
    return alpha


def alpha_step(bounds: Bounds, alpha: dict) -> ReluStep:
    """α-CROWN's ReLU step (Xu et al., ICLR 2021): lower line α·z, α ∈ [0, 1] per unstable neuron and row."""
    def step(relu, A, bias):
        lower, upper = bounds[relu]
        _, up_slope, up_bias = relu_relaxation(lower, upper)
        unstable = ((lower < 0) & (upper > 0)).unsqueeze(1)
        low_slope = torch.where(unstable, alpha[relu], (lower >= 0).unsqueeze(1).to(A.dtype))
        return back_relu_lines(A, bias, low_slope, up_slope.unsqueeze(1), up_bias)
    return step


class Variables(NamedTuple):
    """Tensors the ascent optimises (ReLU -> tensor), their Adam step size, and the interval [low, high]
    they are projected back onto after each step (high None: no upper end)."""

    tensors: dict
    lr: float
    low: float
    high: float | None


def slopes(bounds: Bounds, rows: int, lr: float) -> Variables:
    """α as variables in [0, 1], starting from CROWN's adaptive slopes."""
    return Variables({relu: a.requires_grad_() for relu, a in initial_alpha(bounds, rows).items()}, lr, 0.0, 1.0)


def ascend(model: nn.Module, facts: LayerFacts, C: Tensor, x_lower: Tensor, x_upper: Tensor, step: ReluStep,
           groups: list[Variables], iterations: int, best: Tensor, deadline: float = math.inf
           ) -> tuple[Tensor, Tensor]:
    """Projected gradient ascent on the backward bound of C·f, the ReLUs relaxed by `step`, over the
    variables of `groups`. Returns the best bound per example and row, elementwise max with `best`, and
    the A at the input of the last iteration's pass (for the box corner that attains it). Stops early at
    `deadline` (time.monotonic()): every point of the variables' intervals gives a valid bound, so the
    best so far is still sound, only less tight."""
    optimizer = torch.optim.Adam([{"params": list(g.tensors.values()), "lr": g.lr} for g in groups])
    variables = [p for g in groups for p in g.tensors.values()]
    for it in range(iterations + 1):
        with torch.enable_grad():
            A, bias = back_through((model,), C, facts, step)
            lower = concretize(A, bias, x_lower, x_upper)
            objective = -lower.sum()
        best = torch.maximum(best, lower.detach())
        if it == iterations or time.monotonic() >= deadline:
            break
        for p, g in zip(variables, torch.autograd.grad(objective, variables)):
            p.grad = g
        optimizer.step()
        with torch.no_grad():
            for g in groups:
                for p in g.tensors.values():
                    p.clamp_(g.low, g.high)
    return best, A.detach()


def optimise_alpha(model: nn.Module, inter: Intermediate, C: Tensor, x_lower: Tensor, x_upper: Tensor,
                   iterations: int, lr: float, best: Tensor) -> Tensor:
    """The α-CROWN bound of C·f over the box, never below `best`: the ascent over the slopes alone."""
    alpha = slopes(inter.bounds, C.shape[1], lr)
    step = alpha_step(inter.bounds, alpha.tensors)
    return ascend(model, inter.facts, C, x_lower, x_upper, step, [alpha], iterations, best)[0]


@torch.no_grad()
def alpha_crown_lower(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor, x: Tensor | None = None,
                      iterations: int = ITERATIONS, lr: float = LR) -> Tensor:
    """α-CROWN lower bound of C·f over the box, never below CROWN's."""
    inter = crown_intermediate(model, x_lower, x_upper, x)
    start = crown_lower_bound(model, inter, C, x_lower, x_upper)
    return optimise_alpha(model, inter, C, x_lower, x_upper, iterations, lr, start)


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
        best = optimise_alpha(problem.model, Intermediate(inter.facts, sub), problem.C[todo],
                              problem.lower[todo], problem.upper[todo], opts.alpha_iterations, opts.alpha_lr,
                              crown[todo])
        verified[todo] = (best > 0).all(1)
    return verified
