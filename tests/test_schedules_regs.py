"""ε/λ schedules against the docs/method.md formulas, and the warmup regularizers on hand-made bounds."""
import math

import pytest
import torch

from trainers.config import ScheduleConfig
from trainers.regularizers import relu_balance_loss, std_loss, tightness_loss
from trainers.schedules import EpsSchedule, first_target_epoch, last_reg_epoch, reg_weight

L = 10  # batches per epoch


def smoothed(start, length, eps=0.4, mid=0.25, beta=4.0):
    return EpsSchedule.from_config(ScheduleConfig("smoothed", start, length, mid, beta), eps, L)


def test_smoothed_schedule_matches_method_formula():
    sched = smoothed(start=2, length=20)
    s0, s1 = 10, 210
    s_mid = s0 + math.floor(0.25 * (s1 - s0))
    t = (s_mid - s0) ** 3
    a = 0.4 / ((s1 - s_mid) * 4 * t + (s_mid - s0) * t)
    assert sched(0) == 0 and sched(s0) == 0
    assert sched(s0 + 7) == pytest.approx(a * 7 ** 4)
    assert sched(s_mid) == pytest.approx(a * (s_mid - s0) ** 4)
    assert sched(130) == pytest.approx(a * (s_mid - s0) ** 4 + (0.4 - a * (s_mid - s0) ** 4) * (130 - s_mid) / (s1 - s_mid))
    assert sched(s1) == 0.4 and sched(10_000) == 0.4


def test_smoothed_schedule_slope_is_continuous_at_mid_and_monotone():
    sched = smoothed(start=1, length=40, mid=0.3, beta=3.0)
    s_mid = math.floor(0.3 * 400)
    left = sched(s_mid) - sched(s_mid - 1)
    right = sched(s_mid + 1) - sched(s_mid)
    assert right == pytest.approx(left, rel=0.02)
    values = [sched(s) for s in range(0, 420)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_linear_schedule_and_zero_length_ramp():
    lin = EpsSchedule.from_config(ScheduleConfig("linear", 3, 5), 0.1, L)
    assert lin(20) == 0 and lin(45) == pytest.approx(0.05) and lin(70) == 0.1
    jump = EpsSchedule.from_config(ScheduleConfig("smoothed", 3, 0), 0.1, L)
    assert jump(19) == 0 and jump(20) == 0.1


def test_reg_weight_and_epoch_ranges():
    assert reg_weight(0.0, 0.4, 0.5) == 0.5
    assert reg_weight(0.1, 0.4, 0.5) == pytest.approx(0.375)
    assert reg_weight(0.4, 0.4, 0.5) == 0
    assert reg_weight(0.1, 0.4, 0.5, decay=False) == 0.5
    cfg = ScheduleConfig(start=2, length=80)
    assert last_reg_epoch(cfg) == 81 and first_target_epoch(cfg) == 82


def bounds(centers, widths):
    c, w = torch.tensor([centers]), torch.tensor([widths])
    return c - w / 2, c + w / 2


def test_tightness_penalizes_only_layers_wider_than_input_over_tau():
    tight = bounds([0.0, 1.0], [1.0, 1.0])  # mean width 1
    loose = bounds([0.0, 1.0], [4.0, 4.0])  # mean width 4
    assert tightness_loss([tight], torch.tensor(1.0), tau=0.5) == 0
    # ReLU(0.5 − 1/4) over τ·m = 0.5·2
    assert tightness_loss([tight, loose], torch.tensor(1.0), 0.5).item() == pytest.approx(0.25 / 1.0)


def test_relu_balance_terms():
    balanced = bounds([2.0, -2.0], [1.0, 1.0])  # one active (c=2), one inactive (c=−2): α = β = 1
    assert relu_balance_loss([balanced], 0.5).item() == 0
    skewed = bounds([4.0, -1.0, -1.0], [1.0, 1.0, 1.0])  # α = 4/2 = 2 → min(2, 1/2) = 0.5: no penalty
    assert relu_balance_loss([skewed], 0.5).item() == 0
    very = bounds([10.0, -1.0], [1.0, 1.0])  # α = 10 → 0.1; β = 1 → ReLU(0.5 − 0.1) = 0.4
    assert relu_balance_loss([very], 0.5).item() == pytest.approx(0.4 / 0.5)
    no_inactive = bounds([1.0, 2.0], [1.0, 1.0])  # skipped, but still counted in m
    assert relu_balance_loss([no_inactive, very], 0.5).item() == pytest.approx(0.4 / (0.5 * 2))
    no_active = bounds([-1.0, -3.0], [1.0, 1.0])  # constant maximum 2τ
    assert relu_balance_loss([no_active], 0.5).item() == pytest.approx(1.0 / 0.5)


def test_skipped_layer_gives_finite_gradients():
    c = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = relu_balance_loss([(c - 0.1, c + 0.1)], 0.5) + std_loss([(c - 0.1, c + 0.1)], 0.5)
    loss.backward()
    assert torch.isfinite(c.grad).all()


def test_relu_moments_gradient_matches_autograd():
    from trainers.regularizers import ReluMoments
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64).requires_grad_()
    r = torch.rand(3, 5, 4, generator=gen, dtype=torch.float64).requires_grad_()
    lower, upper = (c - r).detach(), (c + r).detach()
    assert torch.autograd.gradcheck(lambda c_, r_: ReluMoments.apply(c_, r_, lower, upper), (c, r))
    a, i = lower > 0, upper < 0
    cd = c.detach()
    expected = [cd[a].sum(), (cd[a] ** 2).sum(), cd[i].sum(), (cd[i] ** 2).sum(), cd.sum(), r.detach().sum(),
                a.sum(), i.sum()]
    torch.testing.assert_close(ReluMoments.apply(c, r, lower, upper), torch.stack(expected).detach().to(cd.dtype))


def reference_regularizers(bounds_, input_width, tau):
    """Eq. 7 and 8 written directly from the paper with boolean indexing and plain autograd."""
    tight, relu = [], []
    for lower, upper in bounds_:
        tight.append(torch.relu(tau - input_width / (upper - lower).mean()))
        s = lower + upper
        act, inact = lower > 0, upper < 0
        if inact.any():
            alpha = s[act].sum() / -s[inact].sum()
            beta = ((s[act] - s.mean()) ** 2).sum() / ((s[inact] - s.mean()) ** 2).sum()
            relu.append(sum(torch.relu(tau - torch.minimum(v, 1 / v)) for v in (alpha, beta)))
        else:
            relu.append(torch.zeros(()))
    m = len(bounds_)
    return torch.stack(tight).sum() / (tau * m), torch.stack(relu).sum() / (tau * m)


def test_regularizers_match_the_paper_formulas_in_value_and_gradient():
    from trainers.regularizers import ReluInput, layer_terms
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4, 3, 3), (6, 12), (6, 5)]
    centers = [(torch.randn(s, generator=gen, dtype=torch.float64) + 0.3).requires_grad_() for s in shapes]
    radii = [(torch.rand(s, generator=gen, dtype=torch.float64) * 2).requires_grad_() for s in shapes]
    width, tau = torch.tensor(0.7, dtype=torch.float64), 0.8
    ours = layer_terms([ReluInput(c - r, c + r, c, r) for c, r in zip(centers, radii)], width, tau)
    ours = [t.sum() / (tau * len(shapes)) for t in ours]
    ref = reference_regularizers([(c - r, c + r) for c, r in zip(centers, radii)], width, tau)
    assert ref[0].item() > 0 and ref[1].item() > 0  # both terms active, so the gradients below mean something
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine, theirs)
        g_mine = torch.autograd.grad(mine, centers + radii, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(theirs, centers + radii, retain_graph=True, allow_unused=True)
        for a, b in zip(g_mine, g_ref):
            torch.testing.assert_close(torch.zeros(()) if a is None else a, torch.zeros(()) if b is None else b)


def test_warmup_regularizer_equals_its_parts():
    from trainers.config import RegConfig
    from trainers.regularizers import warmup_regularizer
    gen = torch.Generator().manual_seed(1)
    bounds_ = []
    for shape in [(4, 6, 3, 3), (4, 10)]:
        c, r = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)
        bounds_.append((c - r, c + r))
    width = torch.tensor(0.3)
    cfg = RegConfig(tightness=True, relu=True, std=True, tau=0.5)
    expected = tightness_loss(bounds_, width, 0.5) + relu_balance_loss(bounds_, 0.5) + std_loss(bounds_, 0.5)
    torch.testing.assert_close(warmup_regularizer(bounds_, width, cfg), expected)
