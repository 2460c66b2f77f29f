"""PGD (L∞) on the box [lower, upper] in the model's input space: the empirical check on certificates."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, lower: Tensor, upper: Tensor, steps: int = 20,
               restarts: int = 1, step_size: float = 0.25, generator: torch.Generator | None = None) -> Tensor:
    """Return a bool mask of examples PGD misclassifies somewhere in the box (any restart).

    Each step moves every coordinate by `step_size` × the box's half-width, then projects onto the box;
    the first restart starts from x, later ones from uniform random points.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    alpha = step_size * (upper - lower) / 2
    broken = torch.zeros_like(y, dtype=torch.bool)
    for r in range(restarts):
        # Noise is drawn on the CPU from our own generator: evaluation must not consume the training RNG.
        if r == 0:
            x_adv = x.clone()
        else:
            x_adv = lower + (upper - lower) * torch.rand(x.shape, generator=generator).to(x.device)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_adv)
                grad, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_adv)
            broken |= logits.detach().argmax(1) != y  # this iterate, checked with the logits already computed
            x_adv = torch.max(torch.min(x_adv.detach() + alpha * grad.sign(), upper), lower)
        broken |= model_predicts_wrong(model, x_adv, y)  # the last iterate
    model.train(was_training)
    return broken


@torch.no_grad()
def model_predicts_wrong(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model(x).argmax(1) != y


def pgd_maximize(objective, start: Tensor, lower: Tensor, upper: Tensor, steps: int, alpha: Tensor | float) -> Tensor:
    """Sign-gradient ascent on `objective` (points → one value per point, shape (N,)) inside [lower, upper],
    from `start`; returns each point's best iterate (the first one on ties). Used by the training methods
    (docs/methods.md): it takes gradients only with respect to the points, never the model's parameters."""
    x = start.detach()
    best, best_val = x.clone(), None
    for i in range(steps + 1):
        x = x.detach().requires_grad_(i < steps)
        with torch.enable_grad():
            value = objective(x)
        with torch.no_grad():
            better = torch.ones_like(value, dtype=torch.bool) if best_val is None else value > best_val
            best_val = value.detach() if best_val is None else torch.where(better, value, best_val)
            best[better] = x.detach()[better]
        if i == steps:
            break
        grad, = torch.autograd.grad(value.sum(), x)
        x = torch.max(torch.min(x.detach() + alpha * grad.sign(), upper), lower)
    return best
