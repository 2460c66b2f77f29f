"""Each training method's loss against its paper's equation on networks small enough to bound by hand,
then a short real run per method on MNIST (docs/methods.md)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.bounds import margin_spec
from trainers.config import ConfigError, TrainConfig
from trainers.input_box import InputBox
from trainers.methods import (Batch, GradientConnector, attack_input, certified_loss, ibp_family_loss,
                              mtl_ibp_loss, cc_ibp_loss, exp_ibp_loss, sabr_box, sabr_loss, split_at_relu,
                              taps_margins, robust_ce)
from trainers.models import build_model
from trainers.train import TIMING_METRICS, Trainer

NEW = ["sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps"]
UNIT_BOX = InputBox.for_stats([0.0], [1.0], "cpu")  # normalized space = pixel space


def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def cfg_for(method, eps=0.25, **sections) -> TrainConfig:
    return TrainConfig.from_dict({"method": method, "eps": eps, **sections}).resolve()


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def loss_of(model, cfg, x=0.5, n=2, seed=0) -> torch.Tensor:
    """The method's data loss at the target ε on n copies of the 1-pixel image x, label 0 of 2 classes."""
    torch.manual_seed(seed)
    x01 = torch.full((n, 1, 1, 1), x)
    return certified_loss(model, UNIT_BOX, cfg, 2, x01, torch.zeros(n, dtype=torch.long), cfg.eps, False)["loss"]


# ---- a network whose IBP bound is loose and whose worst point is known -------------------------------------
def loose_net() -> nn.Sequential:
    """x ↦ h = (relu x, relu x, relu x); margin z0 − z1 = h1 − h2 + h3 − 0.1, i.e. x − 0.1 for x > 0.
    On x ∈ [0.25, 0.75]: the worst point is x = 0.25 (margin 0.15); IBP treats h1, h2 as independent and
    gives 0.25 − 0.75 + 0.25 − 0.1 = −0.35."""
    return nn.Sequential(nn.Flatten(), linear([[1.0], [1.0], [1.0]], [0, 0, 0]), nn.ReLU(),
                         linear([[1.0, -1.0, 1.0], [0, 0, 0]], [-0.1, 0.0]))


def batch_for(model, cfg, x01, y, num_classes, box=UNIT_BOX) -> Batch:
    x, lower, upper = box.box(x01, cfg.eps)
    return Batch(model, cfg, box, x01, x, y, margin_spec(y, num_classes), lower, upper, cfg.eps, cfg.eps)


def test_attack_finds_the_worst_point_of_the_loose_net():
    cfg = cfg_for("sabr")
    b = batch_for(loose_net(), cfg, torch.full((3, 1, 1, 1), 0.5), torch.zeros(3, dtype=torch.long), 2)
    point, lower, upper = attack_input(b, 0.25, steps=8, step_size=0.5)
    assert torch.equal(point, torch.full_like(point, 0.25)) and torch.equal(lower, point)
    assert torch.equal(upper, torch.full_like(point, 0.75))


def test_sabr_is_ibp_over_the_small_box_around_the_shifted_attack_point():
    # x* = 0.25; λ = 0.4 → radius 0.4·0.25 = 0.1, center shifted to 0.35, box [0.25, 0.45];
    # IBP margin = 0.25 − 0.45 + 0.25 − 0.1 = −0.05, loss = log(1 + e^0.05).
    loss = loss_of(loose_net(), cfg_for("sabr", sabr={"ratio": 0.4}))
    assert loss.item() == pytest.approx(softplus(0.05), abs=1e-6)
    # λ = 1: the small box is the ε-box, so SABR's loss is IBP's: log(1 + e^0.35)
    assert loss_of(loose_net(), cfg_for("sabr", sabr={"ratio": 1.0})).item() == pytest.approx(softplus(0.35), abs=1e-6)


@pytest.mark.parametrize("ratio", [0.05, 0.4, 0.9])
def test_sabr_box_lies_in_the_eps_box_on_a_random_cnn(ratio):
    torch.manual_seed(ratio * 100)
    model = build_model("cnn_small", "mnist").train()
    cfg = cfg_for("sabr", eps=0.3, sabr={"ratio": ratio})
    x01 = torch.rand(8, 1, 28, 28)
    x01[:, :, :4] = 0.0  # pixels at the clip edge: the ε-box is one-sided there
    box = InputBox.for_stats([0.1307], [0.3081], "cpu")
    b = batch_for(model, cfg, x01, torch.randint(0, 10, (8,)), 10, box)
    lower, upper = sabr_box(b)
    tol = 1e-6
    assert (lower >= b.lower - tol).all() and (upper <= b.upper + tol).all()
    center = (lower + upper) / 2
    assert (center >= b.lower).all() and (center <= b.upper).all()
    torch.testing.assert_close(upper - lower, ratio * (b.upper - b.lower), rtol=1e-5, atol=1e-6)


# ---- the expressive losses: hand values and the α endpoints ----------------------------------------------
ADV, IBP = 0.15, -0.35  # the loose net's margins: at the worst point and IBP's lower bound


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_expressive_losses_match_their_equations(alpha):
    l_adv, l_ibp = softplus(-ADV), softplus(-IBP)
    expected = {"mtl-ibp": (1 - alpha) * l_adv + alpha * l_ibp,  # convex combination of the losses
                "cc-ibp": softplus(-((1 - alpha) * ADV + alpha * IBP)),  # ... of the logit differences
                "exp-ibp": l_adv ** (1 - alpha) * l_ibp ** alpha}  # the exponential form
    for method, value in expected.items():
        cfg = cfg_for(method, expressive={"alpha": alpha, "pgd_steps": 3, "pgd_step_size": 1.0})
        assert loss_of(loose_net(), cfg).item() == pytest.approx(value, abs=1e-6), method


@pytest.mark.parametrize("loss_fn", [mtl_ibp_loss, cc_ibp_loss, exp_ibp_loss])
def test_expressive_alpha_endpoints_on_a_random_cnn(loss_fn):
    """α = 0: the CE at the attack point (an adversarial loss); α = 1: IBP's loss."""
    torch.manual_seed(1)
    model = build_model("cnn_small", "mnist", bn="none").train()
    x01, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    box = InputBox.for_stats([0.1307], [0.3081], "cpu")
    b0 = batch_for(model, cfg_for("mtl-ibp", eps=0.1, expressive={"alpha": 0.0}), x01, y, 10, box)
    torch.manual_seed(5)
    adversarial = loss_fn(b0).loss
    torch.manual_seed(5)
    point, _, _ = attack_input(b0, 0.1, b0.cfg.expressive.pgd_steps, b0.cfg.expressive.pgd_step_size)
    torch.testing.assert_close(adversarial, F.cross_entropy(model(point), y), rtol=1e-5, atol=1e-6)
    b1 = batch_for(model, cfg_for("mtl-ibp", eps=0.1, expressive={"alpha": 1.0}), x01, y, 10, box)
    torch.testing.assert_close(loss_fn(b1).loss, ibp_family_loss(b1).loss, rtol=1e-5, atol=1e-6)


# ---- TAPS: the split, the latent search, the gradient connector, L_TAPS·L_IBP -----------------------------
def taps_net() -> nn.Sequential:
    """Extractor x ↦ (relu x, relu x); head h ↦ g = (relu(h1 − h2), relu(h2 − h1)), margin 0.3 − g1 − g2.
    On x ∈ [0.25, 0.75] the latent box is [0.25, 0.75]²: the head's worst point is a corner with
    |h1 − h2| = 0.5 (margin −0.2, exact over the box), IBP through the head gives 0.3 − 0.5 − 0.5 = −0.7,
    and the true margin over the input box is 0.3 (h1 = h2)."""
    return nn.Sequential(nn.Flatten(), linear([[1.0], [1.0]], [0, 0]), nn.ReLU(),
                         linear([[1.0, -1.0], [-1.0, 1.0]], [0, 0]), nn.ReLU(),
                         linear([[-1.0, -1.0], [0, 0]], [0.3, 0.0]))


def test_split_at_relu():
    model = taps_net()
    extractor, head = split_at_relu(model, 1)
    assert list(extractor) == list(model[:3]) and list(head) == list(model[3:])
    with pytest.raises(ValueError, match="head_relus"):
        split_at_relu(model, 2)


def test_taps_loss_is_the_product_and_its_gradient_scales_the_taps_factor():
    model = taps_net()
    w = 3.0
    loss = loss_of(model, cfg_for("taps", taps={"gradient_scale": w, "head_relus": 1}))
    l_taps, l_ibp = softplus(0.2), softplus(0.7)
    assert loss.item() == pytest.approx(l_taps * l_ibp, abs=1e-6)
    loss.backward()
    # d/d(bias of z0): both margins move by 1; d softplus(−m)/dm = −sigmoid(−m)
    sig = torch.sigmoid(torch.tensor([0.2, 0.7], dtype=torch.float64)).tolist()
    expected = w * l_ibp * -sig[0] + l_taps * -sig[1]
    assert model[-1].bias.grad[0].item() == pytest.approx(expected, abs=1e-5)


def test_taps_margins_reach_the_bounds_through_the_connector():
    model = taps_net()
    extractor, head = split_at_relu(model, 1)
    x = torch.full((1, 1, 1, 1), 0.5)
    z_lower, z_upper = extractor(x - 0.25), extractor(x + 0.25)  # monotone extractor: its exact box
    C = margin_spec(torch.zeros(1, dtype=torch.long), 2)
    torch.manual_seed(0)
    margins = taps_margins(head, z_lower, z_upper, None, C, cfg_for("taps").taps)
    torch.testing.assert_close(margins, torch.full((1, 1), -0.2))
    robust_ce(margins).backward()
    # The point sits at a corner: one latent coordinate at its upper bound, the other at its lower bound.
    # Each passes the full gradient to that bound (connector weight 1), and the margin moves by ∓1 with
    # them, so d/d(extractor bias) = ±sigmoid(0.2).
    g = model[1].bias.grad
    s = torch.sigmoid(torch.tensor(0.2)).item()
    assert sorted(g.tolist()) == pytest.approx([-s, s], abs=1e-6)


def test_gradient_connector_is_rectified_linear():
    lower, upper = torch.zeros(1, 4, requires_grad=True), torch.ones(1, 4, requires_grad=True)
    points = torch.tensor([[[1.0, 0.75, 0.6, 0.52], [0.0, 0.25, 0.9, 0.3]]])  # two estimates of one example
    out = GradientConnector.apply(lower, upper, points, 0.5)
    assert torch.equal(out, points)
    out.sum().backward()
    # upper: weight (p − 0.5)/0.5 where p ≥ 0.5: 1 + 0, 0.5 + 0, 0.2 + 0.8, 0.04 + 0
    # lower: weight (0.5 − p)/0.5 where p ≤ 0.5: 0 + 1, 0 + 0.5, 0 + 0, 0 + 0.4
    torch.testing.assert_close(upper.grad, torch.tensor([[1.0, 0.5, 1.0, 0.04]]))
    torch.testing.assert_close(lower.grad, torch.tensor([[1.0, 0.5, 0.0, 0.4]]))
    lower.grad = upper.grad = None
    GradientConnector.apply(lower, upper, points, 0.25).sum().backward()  # linear zone: the outer quarter
    torch.testing.assert_close(upper.grad, torch.tensor([[1.0, 0.0, 0.6, 0.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(lower.grad, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-4, rtol=0)


def test_staps_is_taps_over_the_small_box():
    # The input-space margin is 0.3 everywhere, so SABR's point is wherever PGD started; with λ = 1 the
    # small box is the ε-box and STAPS equals TAPS.
    loss = loss_of(taps_net(), cfg_for("staps", sabr={"ratio": 1.0}))
    assert loss.item() == pytest.approx(softplus(0.2) * softplus(0.7), abs=1e-6)
    # λ = 0.5 → latent box of width 0.25 around a center in [0.375, 0.625]: TAPS −0.25 + 0.3 = 0.05,
    # IBP 0.3 − 0.25 − 0.25 = −0.2
    loss = loss_of(taps_net(), cfg_for("staps", sabr={"ratio": 0.5}))
    assert loss.item() == pytest.approx(softplus(-0.05) * softplus(0.2), abs=1e-6)


# ---- config -------------------------------------------------------------------------------------------------
def test_presets_and_knob_validation():
    for method in NEW:
        cfg = TrainConfig.from_dict({"method": method}).resolve()
        assert (cfg.init, cfg.bound, cfg.reg.tightness, cfg.reg.relu, cfg.bn) == ("ibp", "ibp", True, True, "full")
    for raw, field in [({"sabr": {"ratio": 0.0}}, "sabr.ratio"), ({"sabr": {"ratio": 1.5}}, "sabr.ratio"),
                       ({"expressive": {"alpha": -0.1}}, "expressive.alpha"),
                       ({"expressive": {"attack_eps_scale": 0}}, "expressive.attack_eps_scale"),
                       ({"taps": {"soft_threshold": 0.7}}, "taps.soft_threshold"),
                       ({"taps": {"head_relus": 0}}, "taps.head_relus"),
                       ({"method": "taps", "model": "cnn_small", "taps": {"head_relus": 3}}, "taps.head_relus"),
                       ({"method": "sabr", "bound": "crown-ibp"}, "bound")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            TrainConfig.from_dict(raw).resolve()


# ---- real runs --------------------------------------------------------------------------------------------
TINY = {"dataset": "mnist", "model": "cnn_small", "eps": 0.1, "epochs": 2, "batch_size": 32, "lr": 1e-3,
        "lr_milestones": [2], "schedule": {"start": 1, "length": 1},
        "data": {"subset": 64, "val_size": 32}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 32},
        "sabr": {"pgd_steps": 3}, "taps": {"pgd_steps": 3}}


@pytest.mark.parametrize("method", NEW)
def test_each_new_method_trains_on_mnist(tmp_path, data_dir, method):
    cfg = TrainConfig.from_dict({**TINY, "method": method})
    final = Trainer(cfg, data_dir, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["at_target"]
    assert all(math.isfinite(r["loss"]) and r["loss_robust"] > 0 for r in rows)
    assert rows[0]["loss_reg"] > 0  # the warmup regularizers run during the ramp (CTBench's preset)
    assert 0 <= final["clean_err"] <= final["ibp_err"] <= 1
    assert (tmp_path / "best.pt").exists()


def test_staps_resume_after_crash_is_exact(tmp_path, data_dir):
    cfg = TrainConfig.from_dict({**TINY, "method": "staps"})
    Trainer(cfg, data_dir, tmp_path / "full").fit()

    class Crash(Exception):
        pass

    def crash(metrics, _):
        if metrics["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        Trainer(cfg, data_dir, tmp_path / "part").fit(on_epoch=crash)
    Trainer(cfg, data_dir, tmp_path / "part").fit()
    drop = TIMING_METRICS

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if k not in drop}
                for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert rows("part") == rows("full")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
