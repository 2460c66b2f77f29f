"""Interval (IBP) and linear (CROWN-IBP) bound propagation for the layer kinds our models use.

Supported modules: nn.Sequential, nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.ReLU, nn.Flatten and
`ResidualBlock` (main(x) + shortcut(x)). Inputs live in the model's input space (already normalized); the
caller builds the box [x_lower, x_upper].

IBP carries an interval as (center, radius). Alongside it we carry the clean batch through the same layers:
in train mode a BatchNorm layer is the fixed affine map given by the *clean* batch's statistics, and the
trainer gets the clean logits from the same walk instead of a separate forward pass.

The walk notes what the backward passes need to know of each layer, keyed by the layer (`Tape.facts`).
CROWN-IBP keeps IBP bounds for every hidden layer and runs one backward linear pass (trainers/backward.py)
from the output: the margins C·f(x) are written as A·x + bias over the input box, with each ReLU relaxed by
its IBP pre-activation bounds (upper line through (l, 0) and (u, u); lower slope 1 if u > −l else 0).
The verifiers built on the same passes: CROWN (trainers/crown.py), α-CROWN (alpha_crown.py), BaB (bab.py).

The specification C (B, S, K) is folded into the last linear layer (W' = C·W, b' = C·b) so IBP bounds the
margins directly, which is tighter than differencing logit bounds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backward import (LayerFacts, _back_relu, concretize, lower_bound_over, relu_relaxation,  # noqa: F401
                       two_sided, walk_back)
from .layers import ResidualBlock


# ---- the specification matrix -------------------------------------------------------------------
def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """C of shape (B, K-1, K): row i is e_y − e_j for each class j ≠ y (in order), so C·z = z_y − z_j.

    The classes j ≠ y are indexed arithmetically, not by a boolean mask, whose data-dependent shape costs a
    device-to-host sync on a GPU and breaks a torch.compile graph (after which, in torch 2.14, the compiled
    IBP loss came back without a grad_fn)."""
    eye = torch.eye(num_classes, device=y.device)
    j = torch.arange(num_classes - 1, device=y.device)
    others = j + (j >= y.unsqueeze(1)).long()  # (B, K-1): 0..K-1 without y
    return eye[y].unsqueeze(1) - eye[others]


# ---- IBP: one function per layer kind -------------------------------------------------------------
@dataclass
class State:
    """What flows forward: the clean batch (or None) and the interval as center ± radius."""

    clean: Tensor | None
    center: Tensor
    radius: Tensor


class ReluInput(NamedTuple):
    """The interval entering one ReLU in both forms: the bounds for the masks, center/radius for the sums."""

    lower: Tensor
    upper: Tensor
    center: Tensor
    radius: Tensor


class BatchNormAffine(NamedTuple):
    """BN as the per-channel affine map z ↦ scale·z + shift it was in this walk."""

    scale: Tensor
    shift: Tensor


@dataclass
class Tape:
    """What the backward passes need to know of each layer, one fact per layer, keyed by the layer module
    itself: a conv's input size (H, W), a BN's `BatchNormAffine`, a Flatten's input shape, a ReLU's
    `ReluInput`. Linear layers need none. `relu_inputs` lists the ReLU inputs in forward order (for the
    regularizers)."""

    facts: LayerFacts = field(default_factory=dict)
    relu_inputs: list[ReluInput] = field(default_factory=list)  # every ReLU's input interval
    update_bn_stats: bool = False

    def note(self, layer: nn.Module, fact) -> None:
        if layer in self.facts:  # a module object used twice would have two facts under one key
            raise TypeError(f"bound propagation needs each layer object once; {layer!r} appears twice in the model")
        self.facts[layer] = fact


def ibp_linear(layer: nn.Linear, s: State) -> State:
    clean = None if s.clean is None else F.linear(s.clean, layer.weight, layer.bias)
    return State(clean, F.linear(s.center, layer.weight, layer.bias), F.linear(s.radius, layer.weight.abs()))


def ibp_conv(layer: nn.Conv2d, s: State) -> State:
    def conv(x, w, b):
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    clean = None if s.clean is None else conv(s.clean, layer.weight, layer.bias)
    return State(clean, conv(s.center, layer.weight, layer.bias), conv(s.radius, layer.weight.abs(), None))


class ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of a batch (channels on dim 1), as BN takes them in train mode.

    Two passes, mean then the spread about it: not E[z²] − E[z]², which loses the variance to cancellation
    when a channel's mean dwarfs its spread. `torch.var_mean` computes the same but its CPU kernel is ~2.5×
    slower with its backward (docs/decisions.md); the backward here is one pass:
    ∂mean/∂z = 1/n, ∂var/∂z = 2(z − mean)/n."""

    @staticmethod
    def forward(ctx, z: Tensor):
        dims = [0] + list(range(2, z.dim()))
        mean = z.mean(dims, keepdim=True)
        var = (z - mean).square().mean(dims)
        ctx.save_for_backward(z, mean)
        return var, mean.view(-1)

    @staticmethod
    def backward(ctx, grad_var: Tensor, grad_mean: Tensor):
        z, mean = ctx.saved_tensors
        n = z.numel() // z.shape[1]
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.view(mean.shape)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.view(mean.shape)
        return torch.addcmul(grad_mean / n, z - mean, grad_var * (2 / n))


def bn_affine(layer: nn.modules.batchnorm._BatchNorm, clean: Tensor | None, update_stats: bool):
    """BN as a per-channel map z ↦ scale·z + shift. Train mode: the clean batch's mean and biased variance;
    eval mode: the running statistics. The perturbed intervals never enter the statistics."""
    if layer.training or layer.running_mean is None:
        if clean is None:
            raise ValueError("BatchNorm in train mode needs the clean batch to take its statistics from")
        var, mean = ChannelMoments.apply(clean)
        if update_stats and layer.running_mean is not None:
            _update_running_stats(layer, mean, var, clean.numel() // clean.shape[1])
    else:
        mean, var = layer.running_mean, layer.running_var
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift


@torch.no_grad()
def _update_running_stats(layer, mean: Tensor, var: Tensor, n: int) -> None:
    # Same update as F.batch_norm in train mode (running_var takes the unbiased variance).
    layer.num_batches_tracked += 1
    m = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
    layer.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
    layer.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def ibp_batchnorm(layer, s: State, tape: Tape) -> State:
    scale, shift = bn_affine(layer, s.clean, tape.update_bn_stats)
    tape.note(layer, BatchNormAffine(scale, shift))
    a, b = _per_channel(scale, s.center), _per_channel(shift, s.center)
    clean = None if s.clean is None else torch.addcmul(b, s.clean, a)
    return State(clean, torch.addcmul(b, s.center, a), s.radius * a.abs())


def ibp_affine_batchnorm(layer: nn.Conv2d | nn.Linear, bn, s: State, tape: Tape) -> State:
    """A conv/linear layer followed by BN, as one affine map: BN's per-channel scale a and shift b (from
    the clean batch's statistics) fold into the weights, W' = a·W and b' = a·bias + b, so the center and
    radius take one pass each instead of two. Only where W is smaller than the layer's output (convs,
    not a wide-input linear layer), else scaling W would cost more than it saves. The same map as
    `ibp_conv`/`ibp_linear` then `ibp_batchnorm`, rounded differently."""
    affine = _affine_op(layer)
    if isinstance(layer, nn.Conv2d):
        tape.note(layer, s.center.shape[-2:])
    clean = None if s.clean is None else affine(s.clean, layer.weight, layer.bias)
    scale, shift = bn_affine(bn, clean, tape.update_bn_stats)
    tape.note(bn, BatchNormAffine(scale, shift))
    weight = layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else torch.addcmul(shift, layer.bias, scale)
    if clean is not None:
        clean = torch.addcmul(_per_channel(shift, clean), clean, _per_channel(scale, clean))
    return State(clean, affine(s.center, weight, bias), affine(s.radius, weight.abs(), None))


def _affine_op(layer: nn.Conv2d | nn.Linear):
    if isinstance(layer, nn.Linear):
        return F.linear
    return lambda x, w, b: F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def folds_into_weights(layer: nn.Module, following: nn.Module | None, s: State) -> bool:
    """Whether `ibp_affine_batchnorm` applies to `layer` followed by `following`, and pays."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not isinstance(following, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return False
    if isinstance(layer, nn.Conv2d):  # output elements per example ≥ out_channels · (input pixels / stride²)
        out_per_example = layer.out_channels * s.center.shape[-2] * s.center.shape[-1] // (
            layer.stride[0] * layer.stride[1])
    else:
        out_per_example = layer.out_features
    return layer.weight.numel() < len(s.center) * out_per_example


def ibp_relu(layer: nn.ReLU, s: State, tape: Tape) -> State:
    lower, upper = s.center - s.radius, s.center + s.radius
    tape.relu_inputs.append(ReluInput(lower, upper, s.center, s.radius))
    tape.note(layer, tape.relu_inputs[-1])
    lo, up = torch.relu(lower), torch.relu(upper)
    clean = None if s.clean is None else torch.relu(s.clean)
    center = torch.lerp(lo, up, 0.5)  # (lo + up)/2 in one pass
    return State(clean, center, up - center)  # radius (up − lo)/2 = up − center, one pass fewer


def ibp_flatten(layer: nn.Flatten, s: State, tape: Tape) -> State:
    tape.note(layer, s.center.shape[1:])
    flat = layer  # nn.Flatten(start_dim=1) is the only form we support
    return State(None if s.clean is None else flat(s.clean), flat(s.center), flat(s.radius))


def ibp_residual(block: ResidualBlock, s: State, tape: Tape) -> State:
    # Interval of a sum: centers add and radii add.
    main, short = ibp_walk(block.main, s, tape), ibp_walk(block.shortcut, s, tape)
    clean = None if s.clean is None else main.clean + short.clean
    return State(clean, main.center + short.center, main.radius + short.radius)


def ibp_walk(module: nn.Module, s: State, tape: Tape) -> State:
    if isinstance(module, nn.Sequential):
        layers = list(module)
        i = 0
        while i < len(layers):
            following = layers[i + 1] if i + 1 < len(layers) else None
            if folds_into_weights(layers[i], following, s):
                s, i = ibp_affine_batchnorm(layers[i], following, s, tape), i + 2
            else:
                s, i = ibp_walk(layers[i], s, tape), i + 1
        return s
    if isinstance(module, nn.Linear):
        return ibp_linear(module, s)
    if isinstance(module, nn.Conv2d):
        tape.note(module, s.center.shape[-2:])
        return ibp_conv(module, s)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return ibp_batchnorm(module, s, tape)
    if isinstance(module, nn.ReLU):
        return ibp_relu(module, s, tape)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError("only nn.Flatten() with start_dim=1, end_dim=-1 is supported")
        return ibp_flatten(module, s, tape)
    if isinstance(module, ResidualBlock):
        return ibp_residual(module, s, tape)
    raise TypeError(f"bound propagation does not support {type(module).__name__}")


def ibp_spec_layer(layer: nn.Linear, s: State, C: Tensor) -> tuple[Tensor, Tensor]:
    """The last linear layer with C folded in: bounds of C·(W z + b) over z ∈ center ± radius."""
    W = C @ layer.weight  # (B, S, in)
    b = C @ layer.bias if layer.bias is not None else 0
    center = torch.einsum("bsi,bi->bs", W, s.center) + b
    radius = torch.einsum("bsi,bi->bs", W.abs(), s.radius)
    return center - radius, center + radius


# ---- the full forward pass -------------------------------------------------------------------------
@dataclass
class Propagation:
    clean_logits: Tensor | None  # f(x) of the clean batch, when one was carried
    lower: Tensor  # IBP lower bound of C·f (or of f without C)
    upper: Tensor
    tape: Tape
    last_input: State  # the interval entering the last linear layer (for mixing bounds)

    @property
    def relu_inputs(self) -> list[ReluInput]:
        return self.tape.relu_inputs


def split_last_linear(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("the model must be an nn.Sequential ending with an nn.Linear (the spec is folded into it)")
    return model[:-1], model[-1]


def propagate(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor | None = None,
              x: Tensor | None = None, update_bn_stats: bool = False) -> Propagation:
    """IBP through `model`, carrying the clean batch `x` alongside when given (or when BN needs it)."""
    if model.training and x is None and has_batchnorm(model):
        x = (x_lower + x_upper) / 2
    body, last = split_last_linear(model)
    tape = Tape(update_bn_stats=update_bn_stats)
    s = ibp_walk(body, State(x, (x_upper + x_lower) / 2, (x_upper - x_lower) / 2), tape)
    clean_logits = None if s.clean is None else last(s.clean)
    if C is None:
        out = ibp_linear(last, s)
        lower, upper = out.center - out.radius, out.center + out.radius
    else:
        lower, upper = ibp_spec_layer(last, s, C)
    return Propagation(clean_logits, lower, upper, tape, s)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def ibp_bounds(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor | None = None,
               x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """IBP bounds of C·f(x') (or f(x')) for all x' in [x_lower, x_upper]. In train mode BN uses the
    statistics of the clean batch x (default: the box center); running statistics are not touched."""
    p = propagate(model, x_lower, x_upper, C, x)
    return p.lower, p.upper


# ---- CROWN-IBP: one backward linear pass (trainers/backward.py) ----------------------------------
def crown_lower(model: nn.Module, p: Propagation, C: Tensor, x_lower: Tensor, x_upper: Tensor) -> Tensor:
    """CROWN-IBP: the lower bound of C·f over the box by CROWN's backward pass over the IBP bounds of every
    ReLU input on `p`'s tape (CROWN itself runs the same pass over its own intermediate bounds)."""
    facts = p.tape.facts
    ibp = {layer: (r.lower, r.upper) for layer, r in facts.items() if isinstance(r, ReluInput)}
    return lower_bound_over(model, C, facts, ibp, x_lower, x_upper)


def crown_ibp_bounds(model: nn.Module, x_lower: Tensor, x_upper: Tensor, C: Tensor | None = None,
                     x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CROWN-IBP bounds of C·f(x') (or f(x')) over the box: IBP for hidden layers, a backward linear pass
    for the output. Lower and upper come from one pass over the stacked specification [C; −C]."""
    p = propagate(model, x_lower, x_upper, None, x)
    if C is None:
        k = p.lower.shape[1]
        C = torch.eye(k, device=x_lower.device, dtype=x_lower.dtype).expand(len(x_lower), k, k)
    return two_sided(lambda spec: crown_lower(model, p, spec, x_lower, x_upper), C)
