"""Weight initializations; `ibp` is the IBP initialization of Shi et al. 2021 (docs/method.md §1a).

For an affine layer IBP gives the output width Δ_i = |W_i| δ_{i-1}; with iid zero-mean weights and a ReLU
halving the width in expectation, the per-layer "difference gain" E(Δ_i)/E(Δ_{i-1}) is (n_i/2)·E|W_i|
(n_i = fan-in). Drawing W ~ N(0, σ²) with σ = √(2π)/n_i makes E|W| = √(2/π)·σ = 2/n_i, so the gain is 1 and
bounds neither explode nor vanish with depth at initialization.

Only conv/linear weights are touched (parameters named "weight" with ndim > 1), and never the last one, the
final classifier, which keeps PyTorch's default. Biases and BN parameters keep their defaults.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainers.layers import ResidualBlock

INITS = ("ibp", "default", "kaiming", "orthogonal")


def apply_init(model: nn.Module, init: str) -> None:
    """Re-initialize `model` in place. "default" leaves PyTorch's initialization as it is."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "ibp":
        ibp_init(model)
    elif init == "kaiming":
        for w in hidden_weights(model):
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
    elif init == "orthogonal":
        for w in hidden_weights(model):
            nn.init.orthogonal_(w)


def hidden_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weights in definition order, without the last one (the final classifier)."""
    weights = [p for name, p in model.named_parameters() if "weight" in name and p.ndim > 1]
    return weights[:-1]


def ibp_std(weight: torch.Tensor) -> float:
    """σ = √(2π)/fan_in; for grouped convs torch's fan_in is (c_in/groups)·k², read off the weight shape."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(2 * math.pi) / fan_in


@torch.no_grad()
def ibp_init(model: nn.Module) -> None:
    """Redraw hidden conv/linear weights from N(0, ibp_std²), then halve the weights of layers that read a
    residual block's output: the sum of two branches doubles the bound width (a detail of the paper's code)."""
    for w in hidden_weights(model):
        nn.init.normal_(w, mean=0.0, std=ibp_std(w))
    for layer in residual_consumers(model):
        layer.weight.mul_(0.5)


# ---- which layers read ReLU(ResidualBlock(...)) ---------------------------------------------------------

_SUM = "sum"  # the current tensor is a residual block's output
_RELU_SUM = "relu(sum)"  # ... passed through a ReLU


def residual_consumers(model: nn.Module) -> list[nn.Module]:
    """Conv/linear layers whose input is ReLU(ResidualBlock(...)): the first convs of the next block's main
    and shortcut branches. docs/method.md's rule is literal: a Flatten in between (the FC after the last block)
    makes the input a reshape, not ReLU(Add), so that FC keeps the full σ, as in the reference code's graph."""
    found: list[nn.Module] = []
    _walk(model, None, found)
    return found


def _walk(module: nn.Module, state: str | None, found: list[nn.Module]) -> str | None:
    """Visit `module` in forward order; `state` describes its input, the return value its output."""
    if isinstance(module, nn.Sequential):
        for child in module:
            state = _walk(child, state, found)
        return state
    if isinstance(module, ResidualBlock):
        _walk(module.main, state, found)
        _walk(module.shortcut, state, found)
        return _SUM
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if state == _RELU_SUM:
            found.append(module)
        return None
    if isinstance(module, nn.ReLU):
        return _RELU_SUM if state == _SUM else None
    if any(True for _ in module.children()):
        raise ValueError(f"ibp_init: cannot follow the data flow of a {type(module).__name__}; "
                         "models must be nn.Sequential of plain layers and ResidualBlock")
    return None  # BN and other leaves: the input is no longer a plain residual sum
