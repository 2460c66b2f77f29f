"""Branch and bound over unstable ReLUs with β-CROWN's split constraints (Wang et al., NeurIPS 2021).

Per example: the root is α-CROWN (trainers/alpha_crown.py); then a margin PGD looks for a counterexample;
then domains are split on one unstable neuron each, z ≥ 0 (active) and z ≤ 0 (inactive). A domain's bound
is the backward bound of C·f with
- the split neuron's relaxation fixed to its linear piece (its bounds clamped to [0, u] or [l, 0]), and
- the split constraint s·z ≥ 0 added by Lagrangian, A_z ← A_z − β·s with β ≥ 0 optimised jointly with α
  (one β per split neuron and specification row), which is β-CROWN's bound.
Intermediate bounds are the root's CROWN bounds (clamped at split neurons), not recomputed per domain, as
in β-CROWN. A child's bound is the elementwise max with its parent's (its region is a subset).

Each example ends `verified` (every domain's bound > 0), `falsified` (a point inside the box where some
row of C·f is < 0, found by PGD, at a bound's minimising box corner, or by the exact LP of a leaf, and
always checked on the model) or `unknown` (time limit). A leaf — a domain with no unstable neuron left — is
linear on its region, so an LP over the box and the split constraints (scipy's HiGHS) decides it exactly.
BN must be in eval mode (a domain batch is not a data batch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .alpha_crown import Variables, alpha_step, ascend, slopes
from .backward import ReluStep, crown_step, minimizing_corner
from .crown import Bounds, back_through, crown_intermediate, crown_lower_bound, relu_chains
from .bounds import split_last_linear
from .verifiers import default

VERIFIED, FALSIFIED, UNKNOWN = "verified", "falsified", "unknown"


@dataclass
class BabConfig:
    time_limit: float = default("bab_time_limit")  # seconds per example
    iterations: int = default("alpha_iterations")  # α (and β) steps at the root and per domain batch
    lr: float = default("alpha_lr")  # α's step size
    beta_lr: float = 0.05  # β's step size
    batch: int = 32  # domains branched per step
    attack_steps: int = 50
    attack_restarts: int = 5


@dataclass
class Domains:
    """A batch of subproblems of one example: clamped intermediate bounds, splits, bound per row."""

    bounds: dict  # relu -> (lower, upper), (D, *shape)
    splits: dict  # relu -> (D, *shape) in {+1, −1, 0}
    lower: Tensor  # (D, S)
    scores: dict  # relu -> (D, *shape) branching score

    def __len__(self):
        return len(self.lower)

    def take(self, index: Tensor) -> "Domains":
        return Domains({r: (lo[index], up[index]) for r, (lo, up) in self.bounds.items()},
                       {r: s[index] for r, s in self.splits.items()}, self.lower[index],
                       {r: s[index] for r, s in self.scores.items()})

    @staticmethod
    def cat(parts: list["Domains"]) -> "Domains":
        first = parts[0]
        return Domains({r: (torch.cat([p.bounds[r][0] for p in parts]), torch.cat([p.bounds[r][1] for p in parts]))
                        for r in first.bounds}, {r: torch.cat([p.splits[r] for p in parts]) for r in first.splits},
                       torch.cat([p.lower for p in parts]), {r: torch.cat([p.scores[r] for p in parts]) for r in first.scores})


def violated(model: nn.Module, C: Tensor, points: Tensor) -> Tensor:
    """Per point, whether some row of C·f(point) is < 0 (C: (1, S, K), points: (P, *input shape))."""
    with torch.no_grad():
        return (torch.einsum("sk,pk->ps", C[0], model(points)) < 0).any(1)


def margin_attack(model, C, x_lower, x_upper, steps, restarts, generator, deadline: float = math.inf
                  ) -> Tensor | None:
    """PGD on the smallest margin over the box (first start: the center); a checked counterexample or None
    (also when `deadline` passes first)."""
    for r in range(restarts):
        z = (x_lower + x_upper) / 2 if r == 0 else x_lower + (x_upper - x_lower) * torch.rand(
            x_lower.shape, generator=generator).to(x_lower.device)
        step = 0.1 * (x_upper - x_lower)
        for _ in range(steps):
            if time.monotonic() >= deadline:
                return None
            z.requires_grad_(True)
            with torch.enable_grad():
                margin = torch.einsum("bsk,bk->bs", C, model(z)).min(1).values.sum()
                grad, = torch.autograd.grad(margin, z)
            z = torch.max(torch.min(z.detach() - step * grad.sign(), x_upper), x_lower)
            if violated(model, C, z).any():
                return z
    return None


def beta_step(bounds: Bounds, alpha: dict, beta: dict, splits: dict) -> ReluStep:
    """β-CROWN's ReLU step (Wang et al., NeurIPS 2021): α-CROWN's, then each split s·z ≥ 0 as A_z ← A_z − β·s."""
    relaxed = alpha_step(bounds, alpha)

    def step(relu, A, bias):
        A, bias = relaxed(relu, A, bias)
        if relu in beta:
            A = A - beta[relu] * splits[relu].unsqueeze(1).to(A.dtype)
        return A, bias
    return step


def multipliers(splits: dict, alpha: dict, lr: float) -> Variables:
    """β ≥ 0 as variables, one per neuron and row of every layer with a split, starting at 0."""
    return Variables({relu: torch.zeros_like(alpha[relu]).requires_grad_() for relu in splits}, lr, 0.0, None)


def keeping_incoming(step: ReluStep, incoming: dict) -> ReluStep:
    """`step`, keeping each ReLU's incoming A (the coefficients of its output) in `incoming` for branch_scores."""
    def keeping(relu, A, bias):
        incoming[relu] = A.detach()
        return step(relu, A, bias)
    return keeping


def branch_scores(inter_bounds: dict, incoming: dict, lower: Tensor) -> dict:
    """Per unstable neuron, how much its upper line's intercept costs the open rows (BaBSR's intercept
    score): Σ_s [row s open]·max(−A_s, 0)·u(−l)/(u − l); plus a tiny triangle-height term so that every
    unstable neuron scores above every stable one."""
    open_rows = (lower <= 0).to(lower.dtype)  # (D, S)
    scores = {}
    for relu, (lo, up) in inter_bounds.items():
        unstable = (lo < 0) & (up > 0)
        intercept = torch.where(unstable, up * (-lo) / (up - lo).clamp(min=1e-12), torch.zeros_like(lo))
        cost = torch.einsum("ds,dsn->dn", open_rows, (-incoming[relu]).clamp(min=0).flatten(2)).view_as(lo)
        scores[relu] = torch.where(unstable, cost * intercept + 1e-6 * intercept + 1e-12, torch.full_like(lo, -1.0))
    return scores


def bound_domains(model, facts, d: Domains, C, x_lower, x_upper, cfg: BabConfig, deadline: float = math.inf):
    """β-CROWN bound of a batch of domains; returns the new Domains and the minimising box corners. At
    `deadline` the α/β ascent stops with the bounds it has (valid, looser)."""
    D = len(d)
    Cd, xl, xu = C.expand(D, *C.shape[1:]), x_lower.expand(D, *x_lower.shape[1:]), x_upper.expand(D, *x_upper.shape[1:])
    splits = {r: s for r, s in d.splits.items() if (s != 0).any()}
    alpha = slopes(d.bounds, Cd.shape[1], cfg.lr)
    beta = multipliers(splits, alpha.tensors, cfg.beta_lr)
    incoming: dict = {}
    step = keeping_incoming(beta_step(d.bounds, alpha.tensors, beta.tensors, splits), incoming)
    groups = [alpha, beta] if splits else [alpha]  # the root has no split: α alone
    lower, A = ascend(model, facts, Cd, xl, xu, step, groups, cfg.iterations, d.lower, deadline)
    corners = minimizing_corner(A, xl, xu)  # (D, S, *input)
    return Domains(d.bounds, d.splits, lower, branch_scores(d.bounds, incoming, lower)), corners


def split(d: Domains) -> Domains:
    """Two children per domain on its highest-scoring neuron: active (l ← 0, s = +1), inactive (u ← 0, s = −1)."""
    relus = list(d.scores)
    flat = torch.cat([d.scores[r].flatten(1) for r in relus], 1)  # (D, N_total)
    choice = flat.argmax(1)
    sizes = [d.scores[r][0].numel() for r in relus]
    offsets = torch.tensor([0] + sizes, device=choice.device).cumsum(0)
    bounds, splits = {}, {}
    rows = torch.arange(len(d), device=choice.device)
    for k, r in enumerate(relus):
        lo, up = d.bounds[r][0].flatten(1), d.bounds[r][1].flatten(1)
        s = d.splits[r].flatten(1)
        here = (choice >= offsets[k]) & (choice < offsets[k + 1])
        j = (choice - offsets[k]).clamp(0, sizes[k] - 1)
        lo_a, up_i, s_a, s_i = lo.clone(), up.clone(), s.clone(), s.clone()
        lo_a[rows[here], j[here]] = 0.0
        s_a[rows[here], j[here]] = 1
        up_i[rows[here], j[here]] = 0.0
        s_i[rows[here], j[here]] = -1
        shape = d.bounds[r][0].shape
        bounds[r] = (torch.cat([lo_a, lo]).view(2 * len(d), *shape[1:]), torch.cat([up, up_i]).view(2 * len(d), *shape[1:]))
        splits[r] = torch.cat([s_a, s_i]).view(2 * len(d), *shape[1:])
    return Domains(bounds, splits, torch.cat([d.lower, d.lower]), {})


def is_leaf(d: Domains) -> Tensor:
    """Per domain, whether no neuron is unstable under its (split-clamped) bounds."""
    return ~torch.stack([((lo < 0) & (up > 0)).flatten(1).any(1) for lo, up in d.bounds.values()]).any(0)


def solve_leaf(model, facts, leaf: Domains, C, x_lower, x_upper, deadline: float = math.inf
               ) -> tuple[str, Tensor | None]:
    """A leaf is linear on {x in box: s·z(x) ≥ 0 for its splits}: min of each row of C·f there by LP.
    `unknown` when `deadline` passes before every row is decided."""
    from scipy.optimize import linprog

    bounds, splits = leaf.bounds, leaf.splits
    body, _ = split_last_linear(model)
    step = crown_step(bounds)  # every neuron is stable or split here: each relaxation is exact
    A_ub, b_ub = [], []
    for relu, chain in relu_chains(body):
        s = splits[relu][0].flatten()
        chosen = (s != 0).nonzero().flatten()
        if len(chosen) == 0:
            continue
        E = torch.zeros(1, len(chosen), s.numel(), dtype=x_lower.dtype, device=x_lower.device)
        E[0, torch.arange(len(chosen), device=chosen.device), chosen] = 1.0
        A, bias = back_through(chain, E.view(1, len(chosen), *splits[relu].shape[1:]), facts, step)
        sign = s[chosen].to(A.dtype).unsqueeze(1)  # s·(a·x + b) ≥ 0  ⇔  −s·a·x ≤ s·b
        A_ub.append(-sign * A[0].flatten(1))
        b_ub.append(sign.squeeze(1) * bias[0])
    A_obj, bias_obj = back_through((model,), C, facts, step)
    lo, up = x_lower.flatten().double().cpu().numpy(), x_upper.flatten().double().cpu().numpy()
    A_ub = torch.cat(A_ub).double().cpu().numpy() if A_ub else None
    b_ub = torch.cat(b_ub).double().cpu().numpy() if b_ub else None
    all_positive = True
    for row in range(C.shape[1]):
        if time.monotonic() >= deadline:
            return UNKNOWN, None
        c = A_obj[0, row].flatten().double().cpu().numpy()
        res = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=list(zip(lo, up)), method="highs")
        if res.status == 2:  # infeasible: the split pattern is empty
            return VERIFIED, None
        if res.status != 0:
            all_positive = False
            continue
        if res.fun + bias_obj[0, row].item() <= 0:
            point = torch.tensor(res.x, dtype=x_lower.dtype, device=x_lower.device).view_as(x_lower)
            point = torch.max(torch.min(point, x_upper), x_lower)
            if violated(model, C, point).any():
                return FALSIFIED, point
            all_positive = False
    return (VERIFIED, None) if all_positive else (UNKNOWN, None)


def bab_one(model, x_lower, x_upper, C, cfg: BabConfig, generator) -> tuple[str, Tensor | None]:
    """Branch and bound for one example (x_lower, x_upper: (1, ...); C: (1, S, K)).

    The time limit is checked inside every part that can take long (each α/β step, each attack step, each
    leaf LP), not only between branching steps: a step that runs out of time keeps the valid bounds it has,
    and an example whose open domains or leaves are not all decided by then is `unknown`, never `verified`.
    What is not interruptible is the root's CROWN intermediate bounds and one α/β step or LP."""
    deadline = time.monotonic() + cfg.time_limit
    with torch.no_grad():
        inter = crown_intermediate(model, x_lower, x_upper)
        start = crown_lower_bound(model, inter, C, x_lower, x_upper)
        root = Domains(inter.bounds, {r: torch.zeros_like(lo, dtype=torch.int8) for r, (lo, _) in inter.bounds.items()},
                       start, {})
        root, _ = bound_domains(model, inter.facts, root, C, x_lower, x_upper, cfg, deadline)
    if (root.lower > 0).all():
        return VERIFIED, None
    if is_leaf(root).all():  # no unstable neuron at all: the network is linear on the box
        return solve_leaf(model, inter.facts, root, C, x_lower, x_upper, deadline)
    point = margin_attack(model, C, x_lower, x_upper, cfg.attack_steps, cfg.attack_restarts, generator, deadline)
    if point is not None:
        return FALSIFIED, point
    open_domains = root
    while len(open_domains) and time.monotonic() < deadline:
        order = open_domains.lower.min(1).values.argsort()  # the worst bounds first
        batch, rest = open_domains.take(order[:cfg.batch]), open_domains.take(order[cfg.batch:])
        with torch.no_grad():
            children, corners = bound_domains(model, inter.facts, split(batch), C, x_lower, x_upper, cfg,
                                              deadline)
        bad = violated(model, C, corners.flatten(0, 1))
        if bad.any():
            return FALSIFIED, corners.flatten(0, 1)[bad.nonzero()[0]]
        keep = ~(children.lower > 0).all(1)
        leaf = keep & is_leaf(children)
        for i in leaf.nonzero().flatten().tolist():
            status, point = solve_leaf(model, inter.facts, children.take(torch.tensor([i], device=leaf.device)),
                                       C, x_lower, x_upper, deadline)
            if status != VERIFIED:  # falsified, or unknown at the deadline
                return status, point
        keep &= ~leaf
        parts = [p for p in (rest, children.take(keep.nonzero().flatten())) if len(p)]
        if not parts:
            return VERIFIED, None
        open_domains = Domains.cat(parts)
    return (VERIFIED, None) if len(open_domains) == 0 else (UNKNOWN, None)


def bab(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor, cfg: BabConfig | None = None,
        seed: int = 0, on_example: Callable[[int], None] | None = None) -> tuple[list[str], list[Tensor | None]]:
    """Complete verification of C·f > 0 over each example's box: a status per example (`verified`,
    `falsified`, `unknown`) and, for falsified ones, the counterexample (checked on the model).
    `on_example(i)` is called before example i (for a progress line)."""
    if model.training:
        raise ValueError("bab needs the model in eval mode (BN in train mode depends on the batch)")
    cfg = cfg or BabConfig()
    generator = torch.Generator().manual_seed(seed)
    statuses, points = [], []
    for i in range(len(x_lower)):
        if on_example is not None:
            on_example(i)
        status, point = bab_one(model, x_lower[i:i + 1], x_upper[i:i + 1], C[i:i + 1], cfg, generator)
        statuses.append(status)
        points.append(point)
    return statuses, points


def bab_verified(problem, base: Tensor) -> Tensor:
    """evaluate's BaB step (trainers/verifiers.py): examples proven by `base` (α-CROWN) or by the cheaper
    verifiers that ran (`problem.already`: IBP, CROWN-IBP), as a verification pipeline does, plus those BaB
    verifies among the rest; BaB's falsified and unknown counts go to `problem.counts`."""
    opts = problem.options
    cfg = opts.bab or BabConfig(time_limit=opts.bab_time_limit, iterations=opts.alpha_iterations, lr=opts.alpha_lr)
    proven = (base | problem.already).tolist()
    status = [VERIFIED if ok else FALSIFIED if w else None for ok, w in zip(proven, problem.wrong.tolist())]
    todo = [i for i, s in enumerate(status) if s is None]
    if todo:
        index = torch.tensor(todo, device=problem.lower.device)
        found, _ = bab(problem.model, problem.lower[index], problem.upper[index], problem.C[index], cfg,
                       on_example=lambda i: problem.progress(f"bab (image {i + 1} of the {len(todo)} left)"))
        for i, s in zip(todo, found):
            status[i] = s
    problem.counts["bab_falsified"] = sum(s == FALSIFIED for s in status)
    problem.counts["bab_unknown"] = sum(s == UNKNOWN for s in status)
    return torch.tensor([s == VERIFIED for s in status], device=problem.lower.device)
