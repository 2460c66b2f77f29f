"""The two warmup regularizers of Shi et al. (Eq. 7, 8) and the code-only L_std, from IBP ReLU-input bounds.

Ê is the mean over every element of a layer's (batch × neurons) bound tensor. Each term lies in [0, τ] and
the sum over the m ReLU layers is divided by τ·m.
"""
from __future__ import annotations

import torch
from torch import Tensor


def tightness_loss(relu_bounds: list[tuple[Tensor, Tensor]], input_width: Tensor, tau: float) -> Tensor:
    """Penalize layers whose mean bound width exceeds the input's by more than 1/τ (Eq. 7)."""
    terms = [torch.relu(tau - input_width / (u.mean() - l.mean()).clamp(min=1e-12)) for l, u in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def relu_balance_loss(relu_bounds: list[tuple[Tensor, Tensor]], tau: float) -> Tensor:
    """Balance active and inactive ReLUs' contributions to the mean and variance of the centers (Eq. 8).

    A layer with no inactive neuron has no ratio: its term is skipped (it still counts in m), as in the
    reference code. Safe denominators keep the skipped branch from putting NaN into the gradient.
    """
    total = 0.0
    for l, u in relu_bounds:
        active, inactive = l > 0, u < 0
        # s = 2·center: α and β are ratios, so the factor 2 cancels. Sums over a mask use the expansion
        # Σ_M (s − μ)² = Σ_M s² − 2μ Σ_M s + n_M μ², which needs one pass per sum instead of three.
        s = (l + u).flatten()
        mu = s.mean()
        s_act, s_inact = torch.where(active.flatten(), s, 0.0), torch.where(inactive.flatten(), s, 0.0)
        sum_act, sum_inact = s_act.sum(), s_inact.sum()
        n_act, n_inact = active.sum(), inactive.sum()
        var_act = s_act @ s_act - 2 * mu * sum_act + n_act * mu * mu
        var_inact = s_inact @ s_inact - 2 * mu * sum_inact + n_inact * mu * mu
        has_inactive = n_inact > 0
        alpha = sum_act / torch.where(has_inactive, -sum_inact, torch.ones_like(sum_inact))
        beta = var_act / var_inact.clamp(min=1e-12)
        term = _balance(alpha, tau) + _balance(beta, tau)
        total = total + torch.where(has_inactive, term, torch.zeros_like(term))
    return total / (tau * len(relu_bounds))


def _balance(ratio: Tensor, tau: float) -> Tensor:
    return torch.relu(tau - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12)))


def std_loss(relu_bounds: list[tuple[Tensor, Tensor]], tau: float) -> Tensor:
    """L_std (camera-ready code only): keep the spread of the centers from collapsing."""
    terms = [torch.relu(tau - ((u + l) / 2).std()) for l, u in relu_bounds]
    return torch.stack(terms).sum() / (tau * len(relu_bounds))


def warmup_regularizer(relu_bounds, input_width: Tensor, reg_cfg) -> Tensor:
    """L_tightness + L_relu (+ L_std), each switched by the config."""
    loss = torch.zeros((), device=input_width.device)
    if reg_cfg.tightness:
        loss = loss + tightness_loss(relu_bounds, input_width, reg_cfg.tau)
    if reg_cfg.relu:
        loss = loss + relu_balance_loss(relu_bounds, reg_cfg.tau)
    if reg_cfg.std:
        loss = loss + std_loss(relu_bounds, reg_cfg.tau)
    return loss
