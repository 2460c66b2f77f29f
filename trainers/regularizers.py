"""The two warmup regularizers of Shi et al. (Eq. 7, 8) and the code-only L_std, from IBP ReLU-input bounds.

Ê is the mean over every element of a layer's (batch × neurons) bound tensor. Each term lies in [0, τ] and
the sum over the m ReLU layers is divided by τ·m. Layers come as the `ReluInput`s bound propagation notes
(or as plain (lower, upper) pairs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bounds import ReluInput


class ReluMoments(torch.autograd.Function):
    """Sums the regularizers need from one ReLU layer's input interval, center c ± radius r:

        Σ_A c, Σ_A c², Σ_I c, Σ_I c², Σ c, Σ r, |A|, |I|    (A: l > 0 active, I: u < 0 inactive)

    Masks are 0/1 floats and sums over them are dot products: on the CPU `torch.where` over a layer
    costs about five additions. The hand-written backward writes one tensor (for c); the gradient for r is
    a constant, returned as a broadcast view. The masks come from the bounds l, u, which take no gradient
    (the masks are piecewise constant). This runs for every ReLU layer in every warmup step.
    """

    @staticmethod
    def forward(ctx, center: Tensor, radius: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        active = torch.gt(lower, 0, out=torch.empty_like(lower)).flatten()
        inactive = torch.lt(upper, 0, out=torch.empty_like(upper)).flatten()
        c = center.flatten()
        c_act, c_inact = c * active, c * inactive
        ctx.save_for_backward(c, active, inactive)
        ctx.shapes = center.shape, radius.shape
        return torch.stack([c_act.sum(), torch.dot(c_act, c), c_inact.sum(), torch.dot(c_inact, c), c.sum(),
                            radius.sum(), active.sum(), inactive.sum()])

    @staticmethod
    def backward(ctx, g: Tensor):
        c, active, inactive = ctx.saved_tensors
        c_shape, r_shape = ctx.shapes
        # d/dc of Σ_A c + Σ_A c² is A·(1 + 2c) with the upstream weights; likewise on I; Σ c adds g[4].
        g_c = torch.addcmul(g[0], c, 2 * g[1]).mul_(active)
        g_c.addcmul_(torch.addcmul(g[2], c, 2 * g[3]), inactive).add_(g[4])
        return g_c.view(c_shape), g[5].expand(r_shape), None, None


def as_relu_input(b) -> ReluInput:
    """A `ReluInput` from bound propagation, or a plain (lower, upper) pair."""
    if isinstance(b, ReluInput):
        return b
    lower, upper = b
    return ReluInput(lower, upper, (lower + upper) / 2, (upper - lower) / 2)


def layer_terms(relu_inputs, input_width: Tensor, tau: float):
    """Per-layer (tightness terms, ReLU-balance terms), each of shape (m,), from the layers' moments.

    The moments of all m layers are stacked so the scalar algebra below runs once, not once per layer
    (on small models the per-op overhead of ~30 scalar ops per layer was a tenth of a step). A layer with
    no inactive neuron has balance term 0 (skipped, as in the reference code). α and β are ratios, so
    the center c serves as well as the paper's bound sum l + u = 2c.
    """
    inputs = [as_relu_input(b) for b in relu_inputs]
    moments = torch.stack([ReluMoments.apply(b.center, b.radius, b.lower, b.upper) for b in inputs])  # (m, 8)
    sum_act, sq_act, sum_inact, sq_inact, sum_c, sum_r, n_act, n_inact = moments.unbind(1)
    n = torch.tensor([b.center.numel() for b in inputs], dtype=moments.dtype, device=moments.device)
    tightness = torch.relu(tau - input_width / (2 * sum_r / n).clamp(min=1e-12))  # mean width = 2·mean radius
    mu = sum_c / n
    # Σ_M (c − μ)² = Σ_M c² − 2μ Σ_M c + n_M μ²
    var_act = sq_act - 2 * mu * sum_act + n_act * mu * mu
    var_inact = sq_inact - 2 * mu * sum_inact + n_inact * mu * mu
    has_inactive = n_inact > 0
    # Safe denominators keep a skipped layer from putting NaN into the gradient.
    alpha = sum_act / torch.where(has_inactive, -sum_inact, torch.ones_like(sum_inact))
    beta = var_act / var_inact.clamp(min=1e-12)
    balance = _balance(alpha, tau) + _balance(beta, tau)
    return tightness, torch.where(has_inactive, balance, torch.zeros_like(balance))


def tightness_loss(relu_bounds, input_width: Tensor, tau: float) -> Tensor:
    """Penalize layers whose mean bound width exceeds the input's by more than 1/τ (Eq. 7)."""
    return layer_terms(relu_bounds, input_width, tau)[0].sum() / (tau * len(relu_bounds))


def relu_balance_loss(relu_bounds, tau: float) -> Tensor:
    """Balance active and inactive ReLUs' contributions to the mean and variance of the centers (Eq. 8).

    A layer with no inactive neuron has no ratio: its term is skipped (it still counts in m), as in the
    reference code.
    """
    return layer_terms(relu_bounds, torch.ones(()), tau)[1].sum() / (tau * len(relu_bounds))


def _balance(ratio: Tensor, tau: float) -> Tensor:
    return torch.relu(tau - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12)))


def std_loss(relu_bounds, tau: float) -> Tensor:
    """L_std (camera-ready code only): keep the spread of the centers from collapsing."""
    terms = [torch.relu(tau - as_relu_input(b).center.std()) for b in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def warmup_regularizer(relu_bounds, input_width: Tensor, reg_cfg) -> Tensor:
    """L_tightness + L_relu (+ L_std), each switched by the config; one pass of moments per layer serves both."""
    tau, m = reg_cfg.tau, len(relu_bounds)
    loss = torch.zeros((), device=input_width.device)
    if reg_cfg.tightness or reg_cfg.relu:
        tightness, balance = layer_terms(relu_bounds, input_width, tau)
        if reg_cfg.tightness:
            loss = loss + tightness.sum() / (tau * m)
        if reg_cfg.relu:
            loss = loss + balance.sum() / (tau * m)
    if reg_cfg.std:
        loss = loss + std_loss(relu_bounds, tau)
    return loss
