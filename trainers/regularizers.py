"""The two warmup regularizers of Shi et al. (Eq. 7, 8) and the code-only L_std, from IBP ReLU-input bounds.

Ê is the mean over every element of a layer's (batch × neurons) bound tensor. Each term lies in [0, τ] and
the sum over the m ReLU layers is divided by τ·m.
"""
from __future__ import annotations

import torch
from torch import Tensor


class ReluMoments(torch.autograd.Function):
    """Sums the regularizers need from one ReLU layer's bounds (l, u), with s = l + u (twice the center):

        Σ_A s, Σ_A s², Σ_I s, Σ_I s², Σ l, Σ u, |A|, |I|    (A: l > 0 active, I: u < 0 inactive)

    Masks are kept as 0/1 floats and sums over them are dot products: on the CPU `torch.where` over a
    layer costs about five additions, and autograd would run about fifteen passes per layer where the
    hand-written backward runs six. This runs for every ReLU layer in every warmup step.
    """

    @staticmethod
    def forward(ctx, lower: Tensor, upper: Tensor) -> Tensor:
        active = torch.gt(lower, 0, out=torch.empty_like(lower)).flatten()
        inactive = torch.lt(upper, 0, out=torch.empty_like(upper)).flatten()
        s = (lower + upper).flatten()
        s2 = s * s
        ctx.save_for_backward(s, active, inactive)
        ctx.shape = lower.shape
        return torch.stack([torch.dot(s, active), torch.dot(s2, active), torch.dot(s, inactive),
                            torch.dot(s2, inactive), lower.sum(), upper.sum(), active.sum(), inactive.sum()])

    @staticmethod
    def backward(ctx, g: Tensor):
        s, active, inactive = ctx.saved_tensors
        # d/ds of Σ_A s and Σ_A s² is 1 and 2s on A (likewise on I); s = l + u passes it to both.
        offset = torch.addcmul(active * g[0], inactive, g[2])
        slope = torch.addcmul(active * (2 * g[1]), inactive, 2 * g[3])
        g_s = torch.addcmul(offset, s, slope).view(ctx.shape)
        return g_s + g[4], g_s + g[5]


def layer_terms(lower: Tensor, upper: Tensor, input_width: Tensor, tau: float):
    """(tightness term, ReLU-balance term) of one layer, from its moments. The balance term is 0 for a
    layer with no inactive neuron (skipped, as in the reference code)."""
    sum_act, sq_act, sum_inact, sq_inact, sum_l, sum_u, n_act, n_inact = ReluMoments.apply(lower, upper)
    n = lower.numel()
    tightness = torch.relu(tau - input_width / ((sum_u - sum_l) / n).clamp(min=1e-12))
    mu = (sum_l + sum_u) / n
    # Σ_M (s − μ)² = Σ_M s² − 2μ Σ_M s + n_M μ²
    var_act = sq_act - 2 * mu * sum_act + n_act * mu * mu
    var_inact = sq_inact - 2 * mu * sum_inact + n_inact * mu * mu
    has_inactive = n_inact > 0
    alpha = sum_act / torch.where(has_inactive, -sum_inact, torch.ones_like(sum_inact))
    beta = var_act / var_inact.clamp(min=1e-12)
    balance = _balance(alpha, tau) + _balance(beta, tau)
    return tightness, torch.where(has_inactive, balance, torch.zeros_like(balance))


def tightness_loss(relu_bounds: list[tuple[Tensor, Tensor]], input_width: Tensor, tau: float) -> Tensor:
    """Penalize layers whose mean bound width exceeds the input's by more than 1/τ (Eq. 7)."""
    terms = [layer_terms(l, u, input_width, tau)[0] for l, u in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def relu_balance_loss(relu_bounds: list[tuple[Tensor, Tensor]], tau: float) -> Tensor:
    """Balance active and inactive ReLUs' contributions to the mean and variance of the centers (Eq. 8).

    α and β are ratios, so s = 2·center serves as well as the center. A layer with no inactive neuron has
    no ratio: its term is skipped (it still counts in m), as in the reference code; safe denominators keep
    the skipped branch from putting NaN into the gradient.
    """
    one = torch.ones(())
    terms = [layer_terms(l, u, one, tau)[1] for l, u in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def _balance(ratio: Tensor, tau: float) -> Tensor:
    return torch.relu(tau - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12)))


def std_loss(relu_bounds: list[tuple[Tensor, Tensor]], tau: float) -> Tensor:
    """L_std (camera-ready code only): keep the spread of the centers from collapsing."""
    terms = [torch.relu(tau - ((u + l) / 2).std()) for l, u in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def warmup_regularizer(relu_bounds, input_width: Tensor, reg_cfg) -> Tensor:
    """L_tightness + L_relu (+ L_std), each switched by the config; one pass of moments per layer serves both."""
    tau, m = reg_cfg.tau, len(relu_bounds)
    loss = torch.zeros((), device=input_width.device)
    if reg_cfg.tightness or reg_cfg.relu:
        terms = [layer_terms(l, u, input_width, tau) for l, u in relu_bounds]
        if reg_cfg.tightness:
            loss = loss + torch.stack([t for t, _ in terms]).sum() / (tau * m)
        if reg_cfg.relu:
            loss = loss + torch.stack([b for _, b in terms]).sum() / (tau * m)
    if reg_cfg.std:
        loss = loss + std_loss(relu_bounds, tau)
    return loss
