"""The backward linear pass: a linear lower bound A·z_out + bias pushed back through the layers to the input.

One small function per layer kind. The pass reads what the forward (IBP) walk noted of each layer,
keyed by the layer itself (`Tape.facts` in trainers/bounds.py): a conv's input size, a BN's scale and
shift, a Flatten's input shape. How each ReLU is relaxed is the caller's choice, passed as `relu_step`:
`crown_step` over IBP's bounds (CROWN-IBP) or CROWN's own intermediate bounds (CROWN), `alpha_step` with
optimised lower slopes (α-CROWN, trainers/alpha_crown.py), `beta_step` adding the split multipliers
(β-CROWN, trainers/bab.py).

Shapes: A is (B, S, *layer shape) for B examples and S specification rows; bias is (B, S).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ResidualBlock

# relu_step(relu_module, A, bias) -> (A, bias): A·relu(z) ≥ A'·z + bias' − bias, over the ReLU's input z.
ReluStep = Callable[[nn.ReLU, Tensor, Tensor], "tuple[Tensor, Tensor]"]
# layer module -> what the forward walk learnt of it that a backward pass needs (bounds.Tape.facts): called
# facts, not records, because "record" is the search's (tuner's SearchRecord).
LayerFacts = dict


def relu_relaxation(lower: Tensor, upper: Tensor):
    """Linear bounds a_l·z ≤ relu(z) ≤ a_u·z + b_u on [l, u]; adaptive lower slope (1 if u > −l).

    Written with clamps instead of masks: with u⁺ = max(u, 0) and l⁻ = min(l, 0) the upper slope
    u⁺/(u⁺ − l⁻) is 1 for active, 0 for inactive and u/(u − l) for unstable neurons, and the lower slope
    [u⁺ + l⁻ > 0] is 1, 0 and [u > −l] respectively (torch.where costs several passes on the CPU).
    """
    up, low = upper.clamp(min=0), lower.clamp(max=0)
    up_slope = up / (up - low).clamp(min=1e-12)
    up_bias = -low * up_slope
    low_slope = torch.gt(up + low, 0, out=torch.empty_like(up))
    return low_slope, up_slope, up_bias


def back_relu_lines(A: Tensor, bias: Tensor, low_slope: Tensor, up_slope: Tensor, up_bias: Tensor):
    """Lower bound of A·relu(z) from the lines a_l·z ≤ relu(z) ≤ a_u·z + b_u: positive coefficients take
    the lower line, negative ones the upper line and its intercept, i.e. A·a_l + min(A, 0)·(a_u − a_l).
    The slopes broadcast against A: (B, 1, ...) for one line per neuron, (B, S, ...) for one per row."""
    A_neg = A.clamp(max=0)
    bias = bias + torch.einsum("bsn,bn->bs", A_neg.flatten(2), up_bias.flatten(1))
    return torch.addcmul(A * low_slope, A_neg, up_slope - low_slope), bias


def _back_relu(A: Tensor, bias: Tensor, lower: Tensor, upper: Tensor):
    """The ReLU step with the adaptive relaxation of the bounds [lower, upper] (CROWN-IBP, CROWN)."""
    low_slope, up_slope, up_bias = relu_relaxation(lower, upper)
    return back_relu_lines(A, bias, low_slope.unsqueeze(1), up_slope.unsqueeze(1), up_bias)


def crown_step(bounds: dict) -> ReluStep:
    """CROWN's ReLU step (Zhang et al., NeurIPS 2018): each ReLU relaxed adaptively over its input's bounds."""
    def step(relu, A, bias):
        return _back_relu(A, bias, *bounds[relu])
    return step


def _back_linear(layer: nn.Linear, A: Tensor, bias: Tensor):
    if layer.bias is not None:
        bias = bias + A @ layer.bias
    return A @ layer.weight, bias


def _back_conv(layer: nn.Conv2d, A: Tensor, bias: Tensor, in_hw):
    B, S = A.shape[:2]
    if layer.bias is not None:
        bias = bias + torch.einsum("bschw,c->bs", A, layer.bias)
    out_hw = A.shape[-2:]
    out_pad = [in_hw[i] - ((out_hw[i] - 1) * layer.stride[i] - 2 * layer.padding[i]
                           + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1) for i in range(2)]
    A_in = F.conv_transpose2d(A.reshape(B * S, *A.shape[2:]), layer.weight, None, layer.stride,
                              layer.padding, out_pad, layer.groups, layer.dilation)
    return A_in.view(B, S, *A_in.shape[1:]), bias


def _back_batchnorm(A: Tensor, bias: Tensor, scale: Tensor, shift: Tensor):
    shape = (1, 1, -1) + (1,) * (A.dim() - 3)
    bias = bias + torch.einsum("bsc...,c->bs", A, shift)
    return A * scale.view(shape), bias


def walk_back(module: nn.Module, A: Tensor, bias: Tensor, facts: LayerFacts, relu_step: ReluStep):
    """Push the linear lower bound A·z_out + bias back to the module's input, layer by layer."""
    if isinstance(module, nn.Sequential):
        for layer in reversed(module):
            A, bias = walk_back(layer, A, bias, facts, relu_step)
        return A, bias
    if isinstance(module, ResidualBlock):  # a sum: both branches receive A, their input coefficients add
        A_short, bias = walk_back(module.shortcut, A, bias, facts, relu_step)
        A_main, bias = walk_back(module.main, A, bias, facts, relu_step)
        return A_main + A_short, bias
    if isinstance(module, nn.Linear):
        return _back_linear(module, A, bias)
    if isinstance(module, nn.Conv2d):
        return _back_conv(module, A, bias, facts[module])
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _back_batchnorm(A, bias, *facts[module])
    if isinstance(module, nn.ReLU):
        return relu_step(module, A, bias)
    if isinstance(module, nn.Flatten):
        return A.view(*A.shape[:2], *facts[module]), bias
    raise TypeError(f"bound propagation does not support {type(module).__name__}")


def concretize(A: Tensor, bias: Tensor, x_lower: Tensor, x_upper: Tensor) -> Tensor:
    """min over the box of A·x + bias: A·center − |A|·radius + bias, per example and row."""
    center, radius = (x_upper + x_lower) / 2, (x_upper - x_lower) / 2
    A, center, radius = A.flatten(2), center.flatten(1).unsqueeze(-1), radius.flatten(1).unsqueeze(-1)
    return (A @ center).squeeze(-1) - (A.abs() @ radius).squeeze(-1) + bias


def minimizing_corner(A: Tensor, x_lower: Tensor, x_upper: Tensor) -> Tensor:
    """The box corner where A·x is smallest, per row: (B, S, *input shape)."""
    return torch.where(A > 0, x_lower.unsqueeze(1), x_upper.unsqueeze(1))


def lower_bound_over(model: nn.Module, C: Tensor, facts: LayerFacts, relu_bounds: dict, x_lower: Tensor,
                     x_upper: Tensor) -> Tensor:
    """Lower bound of C·f over the box: one backward pass from the output, each ReLU relaxed (adaptive
    slopes) over the bounds of its input, `relu_bounds[relu]` = (lower, upper). Over IBP's bounds this is
    CROWN-IBP (bounds.crown_lower); over CROWN's own intermediate bounds, CROWN's final pass
    (crown.crown_lower_bound). It lives here, below both, so the training losses use it without the
    CROWN verifier's module."""
    A, bias = walk_back(model, C, torch.zeros(C.shape[:2], device=C.device, dtype=C.dtype), facts,
                        crown_step(relu_bounds))
    return concretize(A, bias, x_lower, x_upper)


def two_sided(lower_bound: Callable[[Tensor], Tensor], C: Tensor) -> tuple[Tensor, Tensor]:
    """(lower, upper) bounds of C·f from a function that lower-bounds any specification, in one pass over
    the stacked [C; −C]: the upper bound of C·f is minus the lower bound of −C·f."""
    S = C.shape[1]
    both = lower_bound(torch.cat([C, -C], 1))
    return both[:, :S], -both[:, S:]
