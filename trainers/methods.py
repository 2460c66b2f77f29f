"""The training loss of each method (`TrainConfig.method`), one small function each; equations in docs/methods.md.

    certified_loss(model, box, cfg, num_classes, x01, y, eps_sched, reg_on) -> {"loss", "loss_robust", "loss_reg"}

The training loop calls only `certified_loss`; it does not know which method runs. Every method shares the
seed paper's ingredients (Shi et al. 2021): the ε schedule, the IBP init, BN placement and the warmup
regularizers, which read the ReLU-input bounds of the method's own IBP pass. While the scheduled ε is 0
every method trains on the clean loss (with the regularizers at ε = reg.min_eps when they are on).

Conventions shared by the newer methods:
- margins are C·f with C = margin_spec(y): row j is z_y − z_j; `robust_ce(m)` = log(1 + Σ_j exp(−m_j)), so
  robust_ce of the margins at a point is the CE of the logits there, and of IBP lower bounds IBP's loss;
- in train mode a BN layer is the affine map of the clean batch's statistics in every loss term (bounds and
  points alike, as in the bound pass), and BN's running statistics are updated once per step, by the IBP
  pass, from the clean batch;
- attacks in input space (SABR's, the expressive losses') run the model in eval mode (running statistics):
  one plain forward per step, as CTRAIN's MTL-IBP attack does. They start from a uniform random point of the
  box (global RNG, which checkpoints save, so resume stays exact) and step by step_size·ε per coordinate;
- TAPS's search in the latent box runs the classifier head with the clean batch's statistics, as TAPS does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import pgd_maximize
from .bounds import State, Tape, crown_lower, has_batchnorm, ibp_walk, margin_spec, propagate
from .config import TrainConfig
from .input_box import InputBox
from .regularizers import warmup_regularizer
from .schedules import reg_weight


def robust_ce(margin_lower: Tensor, reduction: str = "mean") -> Tensor:
    """CE of the worst-case logits: log(1 + Σ_i exp(−m_i)) per example, averaged over the batch by default."""
    zeros = torch.zeros(len(margin_lower), 1, device=margin_lower.device, dtype=margin_lower.dtype)
    logits = torch.cat([zeros, -margin_lower], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                           reduction=reduction)


@dataclass
class Batch:
    """One (sub-)batch at the training ε: what every method's loss reads."""

    model: nn.Sequential
    cfg: TrainConfig
    box: InputBox
    x01: Tensor  # images in [0, 1]
    x: Tensor  # the clean batch, normalized
    y: Tensor
    C: Tensor  # margin_spec(y)
    lower: Tensor  # the ε-box, normalized and clipped to valid pixels
    upper: Tensor
    eps: float  # the training ε (scheduled ε × train_eps_mul), raw pixel scale
    eps_sched: float  # the scheduled ε

    @property
    def clean(self) -> Tensor | None:
        """The clean batch where BN needs it for its statistics."""
        return self.x if has_batchnorm(self.model) else None


@dataclass
class Robust:
    """A method's robust loss and the IBP pass the warmup regularizers read."""

    loss: Tensor
    relu_inputs: list  # ReluInput of every ReLU layer, from the method's IBP pass
    input_width: Tensor  # mean width of the input box that pass started from


# ---- shared pieces ----------------------------------------------------------------------------------
def forward_at(module: nn.Module, points: Tensor, clean: Tensor | None) -> Tensor:
    """module(points), with each BN (in train mode) the affine map of the clean batch's statistics, as in
    the bound pass; running statistics untouched. `clean` may have fewer rows than `points`."""
    if clean is None or not module.training or not has_batchnorm(module):
        return module(points)
    return ibp_walk(module, State(clean, points, torch.zeros_like(points)), Tape()).center


def margins_at(logits: Tensor, C: Tensor) -> Tensor:
    """C·z per example: (B, K) logits → (B, S) margins."""
    return torch.einsum("bsk,bk->bs", C, logits)


def attack_input(b: Batch, eps: float, steps: int, step_size: float) -> tuple[Tensor, Tensor, Tensor]:
    """PGD on the CE in the box of radius `eps` around x (clipped to [0, 1]): (point, box lower, box upper)."""
    _, lower, upper = b.box.box(b.x01, eps)
    start = lower + (upper - lower) * torch.rand_like(lower)
    was_training = b.model.training
    b.model.eval()
    try:
        point = pgd_maximize(lambda z: F.cross_entropy(b.model(z), b.y, reduction="none"), start, lower, upper,
                             steps, step_size * eps / b.box.std)
    finally:
        b.model.train(was_training)
    return point, lower, upper


def small_box(point: Tensor, lower: Tensor, upper: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """SABR's box: radius λ·(upper − lower)/2 per coordinate, its center the point moved the least distance
    that keeps the box inside [lower, upper]."""
    radius = ratio * (upper - lower) / 2
    center = torch.min(torch.max(point, lower + radius), upper - radius)
    return center - radius, center + radius


def ibp_robust(b: Batch, lower: Tensor, upper: Tensor) -> tuple[Tensor, list]:
    """IBP lower bounds of the margins over [lower, upper] (BN from the clean batch, running stats updated)."""
    p = propagate(b.model, lower, upper, b.C, x=b.clean, update_bn_stats=True)
    return p.lower, p.relu_inputs


# ---- the 2021 family: IBP, CROWN-IBP, fast ---------------------------------------------------------------
def ibp_family_loss(b: Batch) -> Robust:
    """IBP's robust CE; for bound crown-ibp mixed with CROWN-IBP during the ramp (docs/method.md §2)."""
    cfg = b.cfg
    p = propagate(b.model, b.lower, b.upper, b.C, x=b.clean, update_bn_stats=True)
    margin = p.lower
    mix = 1 - b.eps_sched / cfg.eps  # CROWN-IBP's weight shrinks as ε grows
    if cfg.bound == "crown-ibp" and mix >= 1e-5:
        margin = mix * crown_lower(b.model, p, b.C, b.lower, b.upper) + (1 - mix) * margin
    return Robust(robust_ce(margin), p.relu_inputs, (b.upper - b.lower).mean())


# ---- SABR -------------------------------------------------------------------------------------------------
def sabr_box(b: Batch) -> tuple[Tensor, Tensor]:
    s = b.cfg.sabr
    point, _, _ = attack_input(b, b.eps, s.pgd_steps, s.pgd_step_size)
    return small_box(point, b.lower, b.upper, s.ratio)


def sabr_loss(b: Batch) -> Robust:
    """L = robust_ce(IBP margins over the small box B(x', λε)), x' from PGD, shifted into the ε-box."""
    lower, upper = sabr_box(b)
    margin, relu_inputs = ibp_robust(b, lower, upper)
    return Robust(robust_ce(margin), relu_inputs, (upper - lower).mean())


# ---- expressive losses: MTL-IBP, CC-IBP, Exp-IBP ----------------------------------------------------------
def adversarial_and_ibp_margins(b: Batch) -> tuple[Tensor, Tensor, list]:
    """(margins at the attack point, IBP margin lower bounds over the ε-box, the IBP pass's ReLU inputs)."""
    e = b.cfg.expressive
    point, _, _ = attack_input(b, e.attack_eps_scale * b.eps, e.pgd_steps, e.pgd_step_size)
    ibp_margin, relu_inputs = ibp_robust(b, b.lower, b.upper)
    return margins_at(forward_at(b.model, point, b.clean), b.C), ibp_margin, relu_inputs


def mtl_ibp_loss(b: Batch) -> Robust:
    """L = (1 − α)·L(−z_adv) + α·L(−z_IBP): the convex combination of the losses."""
    a = b.cfg.expressive.alpha
    adv, ibp, relu_inputs = adversarial_and_ibp_margins(b)
    return Robust((1 - a) * robust_ce(adv) + a * robust_ce(ibp), relu_inputs, (b.upper - b.lower).mean())


def cc_ibp_loss(b: Batch) -> Robust:
    """L = L(−[(1 − α)·z_adv + α·z_IBP]): the convex combination of the logit differences."""
    a = b.cfg.expressive.alpha
    adv, ibp, relu_inputs = adversarial_and_ibp_margins(b)
    return Robust(robust_ce((1 - a) * adv + a * ibp), relu_inputs, (b.upper - b.lower).mean())


def exp_ibp_loss(b: Batch) -> Robust:
    """L = L(−z_adv)^(1−α) · L(−z_IBP)^α per example, averaged: the exponential form."""
    a = b.cfg.expressive.alpha
    adv, ibp, relu_inputs = adversarial_and_ibp_margins(b)
    tiny = torch.finfo(adv.dtype).tiny  # a CE that underflows to 0 must not give 0·inf in the gradient
    per_example = robust_ce(adv, "none").clamp(min=tiny).pow(1 - a) * robust_ce(ibp, "none").clamp(min=tiny).pow(a)
    return Robust(per_example.mean(), relu_inputs, (b.upper - b.lower).mean())


# ---- TAPS, STAPS ------------------------------------------------------------------------------------------
class GradientConnector(torch.autograd.Function):
    """TAPS's rectified linear gradient connector. Forward: the points (B, S, ...) found in the latent box
    [lower, upper] (B, ...). Backward: a point within c·(u − l) of the upper bound passes the gradient to u
    scaled by (p − (u − c(u − l)))/(c(u − l)), rising linearly from 0 to 1 at p = u; likewise for l; the
    S points of an example add up. (The points themselves take no gradient: PGD chose them.)"""

    @staticmethod
    def forward(ctx, lower: Tensor, upper: Tensor, points: Tensor, c: float):
        ctx.save_for_backward(lower, upper, points)
        ctx.c = c
        return points.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        lower, upper, points = ctx.saved_tensors
        tol = 1e-5  # a zero-width box passes half the gradient to each bound, so they add up to the point's
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
        slack = ctx.c * (upper - lower)
        near_upper = points >= upper - slack
        near_lower = points <= lower + slack
        to_upper = ((points - (upper - slack)).clamp(min=0.5 * tol) / slack.clamp(min=tol)) * near_upper
        to_lower = (((lower + slack) - points).clamp(min=0.5 * tol) / slack.clamp(min=tol)) * near_lower
        return (grad * to_lower).sum(1), (grad * to_upper).sum(1), None, None


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by w (TAPS's gradient scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: float):
        ctx.w = w
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.w, None


def split_at_relu(model: nn.Sequential, head_relus: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(feature extractor, classifier head): the head holds the last `head_relus` top-level ReLUs."""
    relus = [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    if not 1 <= head_relus < len(relus):
        raise ValueError(f"taps.head_relus must be in [1, {len(relus) - 1}] for this model, got {head_relus}")
    k = relus[len(relus) - head_relus - 1] + 1
    return model[:k], model[k:]


def taps_margins(head: nn.Sequential, z_lower: Tensor, z_upper: Tensor, clean: Tensor | None, C: Tensor,
                 cfg) -> Tensor:
    """TAPS's margin estimates (B, S): for each class j ≠ y, PGD finds a point of the latent box that makes
    z_y − z_j small; the margin j at point j, connected to the box's bounds by the gradient connector."""
    B, S = C.shape[:2]
    shape = z_lower.shape[1:]

    def expand(t):
        return t.detach().unsqueeze(1).expand(B, S, *shape).reshape(B * S, *shape)

    lo, up = expand(z_lower), expand(z_upper)
    C_flat = C.reshape(B * S, 1, -1)
    stats = None if clean is None else clean.detach()

    def neg_margin(points):  # the margin of estimate j at its own point, negated for ascent
        return -margins_at(forward_at(head, points, stats), C_flat).squeeze(1)

    start = lo + (up - lo) * torch.rand_like(lo)
    points = pgd_maximize(neg_margin, start, lo, up, cfg.pgd_steps, cfg.pgd_step_size * (up - lo) / 2)
    points = GradientConnector.apply(z_lower, z_upper, points.view(B, S, *shape), cfg.soft_threshold)
    logits = forward_at(head, points.reshape(B * S, *shape), clean)
    return margins_at(logits, C_flat).view(B, S)


def taps_terms(b: Batch, lower: Tensor, upper: Tensor) -> Robust:
    """L = L_TAPS · L_IBP over the box [lower, upper], batch means as in TAPS's code; the TAPS factor's
    gradient is scaled by w. One IBP pass through the whole model gives L_IBP, the regularizers' bounds and
    the latent box (the output interval of the ReLU the extractor ends with)."""
    t = b.cfg.taps
    extractor, head = split_at_relu(b.model, t.head_relus)
    p = propagate(b.model, lower, upper, b.C, x=b.clean, update_bn_stats=True)
    split = p.relu_inputs[sum(isinstance(m, nn.ReLU) for m in extractor.modules()) - 1]
    z_lower, z_upper = torch.relu(split.lower), torch.relu(split.upper)
    clean = None  # the clean batch at the split, for the head's BN statistics
    if b.clean is not None:  # (its interval part is one example of radius 0: only the clean pass matters)
        clean = ibp_walk(extractor, State(b.clean, b.clean[:1], torch.zeros_like(b.clean[:1])), Tape()).clean
    taps = taps_margins(head, z_lower, z_upper, clean, b.C, t)
    loss = ScaleGradient.apply(robust_ce(taps), t.gradient_scale) * robust_ce(p.lower)
    return Robust(loss, p.relu_inputs, (upper - lower).mean())


def taps_loss(b: Batch) -> Robust:
    return taps_terms(b, b.lower, b.upper)


def staps_loss(b: Batch) -> Robust:
    """TAPS over SABR's small box."""
    return taps_terms(b, *sabr_box(b))


LOSSES = {"vanilla": ibp_family_loss, "fast": ibp_family_loss, "crown-ibp": ibp_family_loss,
          "sabr": sabr_loss, "mtl-ibp": mtl_ibp_loss, "cc-ibp": cc_ibp_loss, "exp-ibp": exp_ibp_loss,
          "taps": taps_loss, "staps": staps_loss}


# ---- the one entry point ----------------------------------------------------------------------------------
def certified_loss(model, box: InputBox, cfg: TrainConfig, num_classes: int, x01: Tensor, y: Tensor,
                   eps_sched: float, reg_on: bool) -> dict[str, Tensor]:
    """Loss of one (sub-)batch at the scheduled ε (docs/method.md §2). Returns the total and its parts."""
    eps_train = eps_sched * cfg.train_eps_mul
    if eps_train == 0 and not reg_on:  # plain clean training: no bounds needed
        logits = model(box.normalize(x01))
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "loss_robust": loss.detach(), "loss_reg": torch.zeros(())}
    # While ε = 0 the regularizers still need bounds: they use a tiny ε (docs/method.md §1c).
    x, lower, upper = box.box(x01, eps_train if eps_train > 0 else cfg.reg.min_eps)
    C = margin_spec(y, num_classes)
    if eps_train > 0:
        r = LOSSES[cfg.method](Batch(model, cfg, box, x01, x, y, C, lower, upper, eps_train, eps_sched))
        data_loss, relu_inputs, input_width = r.loss, r.relu_inputs, r.input_width
    else:  # the clean loss, from the clean batch carried through the bound pass
        p = propagate(model, lower, upper, C, x=x, update_bn_stats=True)
        data_loss, relu_inputs, input_width = F.cross_entropy(p.clean_logits, y), p.relu_inputs, (upper - lower).mean()
    reg = torch.zeros((), device=x.device)
    if reg_on:
        lam = reg_weight(eps_sched, cfg.eps, cfg.reg.lambda0, cfg.reg.decay)
        reg = lam * warmup_regularizer(relu_inputs, input_width, cfg.reg)
    return {"loss": data_loss + reg, "loss_robust": data_loss.detach(), "loss_reg": reg.detach()}
