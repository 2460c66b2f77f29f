"""CROWN (Zhang et al., NeurIPS 2018): backward linear bounds, with CROWN bounds for every ReLU's input.

For each ReLU layer in forward order, one backward pass from that layer's input to the model input gives
its pre-activation bounds, relaxing every earlier ReLU with the bounds already computed; then one backward
pass from the specification C·f gives the final bounds. Each intermediate bound is intersected with IBP's
(sound, and IBP-stable neurons need no backward row: only IBP-unstable neurons are bounded, as
auto_LiRPA's sparse intermediate bounds do). Where IBP is exact (one conv/linear layer, then BN, before
the first ReLU) its bounds are taken as they are.

Each pass relaxes the ReLUs with the step its caller passes (trainers/backward.py): `crown_step` here,
`alpha_step` for α-CROWN's optimised slopes (trainers/alpha_crown.py), `beta_step` for β-CROWN's split
constraints (trainers/bab.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backward import LayerFacts, ReluStep, concretize, crown_step, lower_bound_over, two_sided, walk_back
from .bounds import ReluInput, has_batchnorm, propagate, split_last_linear
from .layers import ResidualBlock

Bounds = dict  # nn.ReLU -> (lower, upper) of its input, (B, *shape)


def relu_chains(module: nn.Module, outer: tuple = ()) -> list[tuple[nn.ReLU, tuple[nn.Sequential, ...]]]:
    """Every ReLU in forward order, with the chain of layer sequences (outermost first) that computes its
    input from the model input: a ReLU inside a residual block's main branch is reached through the layers
    before the block, then the branch up to the ReLU."""
    found = []
    if isinstance(module, ResidualBlock):
        return relu_chains(module.main, outer) + relu_chains(module.shortcut, outer)
    if not isinstance(module, nn.Sequential):
        return found
    for i, layer in enumerate(module):
        if isinstance(layer, nn.ReLU):
            found.append((layer, outer + (module[:i],)))
        elif isinstance(layer, (nn.Sequential, ResidualBlock)):
            found += relu_chains(layer, outer + (module[:i],))
    return found


def ibp_is_exact(chain: tuple[nn.Sequential, ...]) -> bool:
    """IBP is exact through one conv/linear layer followed by per-channel maps (BN, Flatten)."""
    leaves = [m for part in chain for m in part.modules() if not isinstance(m, nn.Sequential)]
    if any(isinstance(m, (nn.ReLU, ResidualBlock)) for m in leaves):
        return False
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in leaves) <= 1


def back_through(chain, A: Tensor, facts: LayerFacts, relu_step: ReluStep) -> tuple[Tensor, Tensor]:
    """A·z (z the output of the chain) as A'·x + bias' over the model input x, bounded from below."""
    bias = torch.zeros(A.shape[:2], device=A.device, dtype=A.dtype)
    for part in reversed(chain):
        A, bias = walk_back(part, A, bias, facts, relu_step)
    return A, bias


def unstable_rows(lower: Tensor, upper: Tensor, mask: Tensor | None = None):
    """Indices (B, n) of the neurons to bound per example (unstable, or `mask`), padded; `valid` marks real ones."""
    pick = ((lower < 0) & (upper > 0)).flatten(1) if mask is None else mask.flatten(1)
    n = int(pick.sum(1).max()) if pick.numel() else 0
    idx = torch.argsort(pick.to(torch.int8), dim=1, descending=True, stable=True)[:, :n]
    return idx, pick.gather(1, idx)


def unit_rows(idx: Tensor, shape) -> Tensor:
    """(B, n, *shape): row r of example b is the unit vector of neuron idx[b, r]."""
    B, n = idx.shape
    E = torch.zeros(B, n, shape.numel(), device=idx.device)
    return E.scatter_(2, idx.unsqueeze(-1), 1.0).view(B, n, *shape)


def layer_bounds(chain, prior: tuple[Tensor, Tensor], facts: LayerFacts, relu_step: ReluStep,
                 x_lower: Tensor, x_upper: Tensor, max_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """CROWN bounds of the ReLU input that `chain` computes, intersected with `prior`; only the neurons
    `prior` leaves unstable get a backward row (a lower and an upper row each), in chunks of rows."""
    lower, upper = prior
    idx, valid = unstable_rows(lower, upper)
    B, n = idx.shape
    if n == 0:
        return prior
    shape = lower.shape[1:]
    # The widest A of the chain is about the widest layer: a ReLU input or the model input.
    widest = max(shape.numel(), x_lower[0].numel(),
                 *(r.lower[0].numel() for r in facts.values() if isinstance(r, ReluInput)))
    chunk = max(1, max_elements // (2 * B * widest))
    new_lower, new_upper = [], []
    for start in range(0, n, chunk):
        E = unit_rows(idx[:, start:start + chunk], shape).to(lower.dtype)
        lo_rows, up_rows = two_sided(
            lambda spec: concretize(*back_through(chain, spec, facts, relu_step), x_lower, x_upper), E)
        new_lower.append(lo_rows)
        new_upper.append(up_rows)
    new_lower, new_upper = torch.cat(new_lower, 1), torch.cat(new_upper, 1)
    lo, up = lower.flatten(1).clone(), upper.flatten(1).clone()
    old_lo, old_up = lo.gather(1, idx), up.gather(1, idx)
    lo.scatter_(1, idx, torch.where(valid, torch.maximum(old_lo, new_lower), old_lo))
    up.scatter_(1, idx, torch.where(valid, torch.minimum(old_up, new_upper), old_up))
    return lo.view_as(lower), up.view_as(upper)


class Intermediate(NamedTuple):
    facts: LayerFacts  # what the forward walk noted of each layer (conv sizes, BN maps, ...)
    bounds: Bounds  # CROWN ∩ IBP bounds of every ReLU's input


def crown_intermediate(model: nn.Module, x_lower: Tensor, x_upper: Tensor, x: Tensor | None = None) -> Intermediate:
    """IBP walk for the layer facts, then CROWN bounds for every ReLU layer's input, in forward order."""
    if model.training and x is None and has_batchnorm(model):
        x = (x_lower + x_upper) / 2
    p = propagate(model, x_lower, x_upper, None, x)
    facts = p.tape.facts
    body, _ = split_last_linear(model)
    bounds: Bounds = {}
    for relu, chain in relu_chains(body):
        ibp = (facts[relu].lower, facts[relu].upper)
        bounds[relu] = ibp if ibp_is_exact(chain) else layer_bounds(
            chain, ibp, facts, crown_step(bounds), x_lower, x_upper)
    return Intermediate(facts, bounds)


def spec_or_identity(C: Tensor | None, model: nn.Module, like: Tensor) -> Tensor:
    if C is not None:
        return C
    k = split_last_linear(model)[1].out_features
    return torch.eye(k, device=like.device, dtype=like.dtype).expand(len(like), k, k)


def crown_lower_bound(model: nn.Module, inter: Intermediate, C: Tensor, x_lower: Tensor, x_upper: Tensor) -> Tensor:
    """Lower bound of C·f over the box: one backward pass from the output over the CROWN bounds (the pass
    CROWN-IBP runs over IBP's bounds: backward.lower_bound_over)."""
    return lower_bound_over(model, C, inter.facts, inter.bounds, x_lower, x_upper)


def crown_bounds(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor | None = None,
                 x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CROWN bounds (lower, upper) of C·f(x') (or f(x')) over the box [x_lower, x_upper]. In train mode BN
    is the affine map of the clean batch x's statistics (default: the box center), as in `ibp_bounds`."""
    C = spec_or_identity(C, model, x_lower)
    inter = crown_intermediate(model, x_lower, x_upper, x)
    return two_sided(lambda spec: crown_lower_bound(model, inter, spec, x_lower, x_upper), C)


def crown_verified(problem, base=None) -> Tensor:
    """evaluate's CROWN step (trainers/verifiers.py): the examples of `problem` whose CROWN bound is > 0 on
    every row. Its intermediate bounds and bound are left in `problem.shared` for α-CROWN to start from."""
    inter = crown_intermediate(problem.model, problem.lower, problem.upper)
    bound = crown_lower_bound(problem.model, inter, problem.C, problem.lower, problem.upper)
    problem.shared["crown_intermediate"] = (inter, bound)
    return (bound > 0).all(1) & ~problem.wrong
