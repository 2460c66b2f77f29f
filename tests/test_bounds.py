"""Soundness of IBP and CROWN-IBP: sampled points, box corners and a real PGD attack never leave the bounds.

The reference function is computed independently of trainers.bounds (bench/soundness.py, shared with the
GPU check): a deep copy of the model whose BN layers are frozen (eval mode) with the statistics a
train-mode forward hook measured on the clean batch.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.soundness import assert_bounds_contain, frozen_bn_copy, points_in_box, warm_bn
from trainers.bounds import crown_ibp_bounds, ibp_bounds, margin_spec, propagate
from trainers.init import apply_init
from trainers.layers import ResidualBlock
from trainers.models import build_model


def tiny_resnet(c_in=1, classes=10):
    """Identity and projection shortcuts, a grouped conv and BN1d: every supported layer kind."""
    def stage(c):
        main = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, 1, 1, groups=2), nn.BatchNorm2d(c))
        return [ResidualBlock(main), nn.ReLU()]

    proj = ResidualBlock(nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)),
                         nn.Sequential(nn.Conv2d(8, 16, 1, 2, 0), nn.BatchNorm2d(16)))
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), *stage(8), proj, nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, classes))


def make_model(kind):
    torch.manual_seed(1)
    if kind == "cnn_small":
        return build_model("cnn_small", "mnist")
    if kind == "cnn_small_ibp_init":
        m = build_model("cnn_small", "mnist")
        apply_init(m, "ibp")
        return m
    return tiny_resnet()


@pytest.mark.parametrize("kind", ["cnn_small", "cnn_small_ibp_init", "tiny_resnet"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("bound_fn", [ibp_bounds, crown_ibp_bounds])
def test_bounds_contain_samples_corners_and_pgd(kind, mode, bound_fn):
    gen = torch.Generator().manual_seed(0)
    model = make_model(kind)
    x = torch.rand(8, 1, 28, 28, generator=gen)
    warm_bn(model, x)
    getattr(model, mode)()
    y = torch.randint(0, 10, (8,), generator=gen)
    C = margin_spec(y, 10)
    lower_box, upper_box = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
    f = frozen_bn_copy(model, x) if mode == "train" else model
    lo, up = bound_fn(model, lower_box, upper_box, C, x=x if mode == "train" else None)
    _, low_pgd, _ = assert_bounds_contain(f, C, x, lower_box, upper_box, lo, up, samples=150, gen=gen,
                                          per_margin=False)
    # The bounds are not vacuous: PGD gets within the bound width's reach.
    assert ((low_pgd - lo) < (up - lo)).all()


@pytest.mark.parametrize("kind", ["cnn_small", "tiny_resnet"])
def test_bounds_without_spec_bound_logits(kind):
    gen = torch.Generator().manual_seed(2)
    model = make_model(kind)
    x = torch.rand(4, 1, 28, 28, generator=gen)
    warm_bn(model, x)
    model.eval()
    lower_box, upper_box = x - 0.02, x + 0.02
    for fn in (ibp_bounds, crown_ibp_bounds):
        lo, up = fn(model, lower_box, upper_box)
        assert lo.shape == (4, 10)
        with torch.no_grad():
            for z in points_in_box(lower_box, upper_box, 100, 100, gen):
                out = model(z)
                assert (out >= lo - 1e-4).all() and (out <= up + 1e-4).all()


def test_crown_ibp_tighter_than_ibp_on_average_and_spec_folding_helps():
    gen = torch.Generator().manual_seed(3)
    model = make_model("tiny_resnet")
    x = torch.rand(16, 1, 28, 28, generator=gen)
    warm_bn(model, x)
    model.eval()
    y = torch.randint(0, 10, (16,), generator=gen)
    C = margin_spec(y, 10)
    lb, ub = x - 0.01, x + 0.01
    ibp_lo, ibp_up = ibp_bounds(model, lb, ub, C)
    crown_lo, crown_up = crown_ibp_bounds(model, lb, ub, C)
    assert (crown_up - crown_lo).mean() < (ibp_up - ibp_lo).mean()
    # Folding C into the last layer beats differencing logit bounds.
    logit_lo, logit_up = ibp_bounds(model, lb, ub)
    naive_lo = torch.einsum("bsk,bk->bs", C.clamp(min=0), logit_lo) + torch.einsum("bsk,bk->bs", C.clamp(max=0), logit_up)
    assert (ibp_lo >= naive_lo - 1e-5).all() and (ibp_lo > naive_lo + 1e-6).any()


def test_margin_spec_rows():
    y = torch.tensor([0, 3])
    C = margin_spec(y, 4)
    z = torch.tensor([[5.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 9.0]])
    margins = torch.einsum("bsk,bk->bs", C, z)
    assert margins.tolist() == [[4.0, 3.0, 2.0], [8.0, 7.0, 6.0]]


def test_train_mode_clean_logits_match_forward_and_stats_update_only_when_asked():
    gen = torch.Generator().manual_seed(4)
    model = make_model("tiny_resnet")
    x = torch.rand(8, 1, 28, 28, generator=gen)
    warm_bn(model, x)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    p = propagate(model, x - 0.01, x + 0.01, x=x)
    assert torch.equal(bn.running_mean, before)  # the public bound functions are pure
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(x)  # a plain train-mode forward: batch stats, and it updates running stats
    p = propagate(model, x - 0.01, x + 0.01, x=x, update_bn_stats=True)
    torch.testing.assert_close(p.clean_logits, expected, rtol=1e-4, atol=1e-4)
    ref_bn = next(m for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 4)])
def test_channel_moments_are_batchnorms_statistics_in_value_and_gradient(shape):
    from trainers.bounds import ChannelMoments

    gen = torch.Generator().manual_seed(5)
    z64 = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ChannelMoments.apply, (z64,))
    # fp32, a channel mean 10⁴ times its spread: E[z²] − E[z]² would lose the variance entirely here.
    z = (torch.randn(*shape, generator=gen) + 1e4).requires_grad_()
    var, mean = ChannelMoments.apply(z)
    dims = [0] + list(range(2, len(shape)))
    exact_var, exact_mean = torch.var_mean(z.detach().double(), dims, unbiased=False)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=0)
    # Through BN's normalization, the same output and gradient as PyTorch's own batch norm.
    z = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_()
    weights = torch.randn(*shape, generator=gen, dtype=torch.float64)
    var, mean = ChannelMoments.apply(z)
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    normalized = (z - mean.view(per_channel)) * torch.rsqrt(var + 1e-5).view(per_channel)
    (grad,) = torch.autograd.grad((normalized * weights).sum(), z)
    z_ref = z.detach().clone().requires_grad_()
    reference = F.batch_norm(z_ref, None, None, training=True, eps=1e-5)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), z_ref)
    torch.testing.assert_close(normalized, reference)
    torch.testing.assert_close(grad, grad_ref)


def test_unsupported_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(TypeError, match="MaxPool2d"):
        ibp_bounds(model.eval(), x, x + 0.1)


# ---- exactness where the true extreme is known: these catch a bound that is shrunk, not only one that is wrong
def attained_extremes(f, lower, upper):
    """Exact min and max of each output of an affine f over the box: the extreme of output j sits at the
    corner chosen by the sign of its (constant) gradient."""
    center = (lower + upper) / 2
    J = torch.autograd.functional.jacobian(lambda z: f(z.unsqueeze(0)).squeeze(0), center[0])
    J = J.reshape(J.shape[0], -1)
    lo_corner = torch.where(J > 0, lower.flatten(), upper.flatten())  # (outputs, inputs)
    hi_corner = torch.where(J > 0, upper.flatten(), lower.flatten())
    shape = (-1,) + tuple(lower.shape[1:])
    with torch.no_grad():
        lo = f(lo_corner.view(shape)).diagonal()
        hi = f(hi_corner.view(shape)).diagonal()
    return lo, hi


def identity_head(n):
    head = nn.Linear(n, n)
    with torch.no_grad():
        head.weight.copy_(torch.eye(n))
        head.bias.zero_()
    return head


@pytest.mark.parametrize("affine, relu", [
    (lambda: [nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3)], True),
    (lambda: [nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)], False),
    (lambda: [nn.Flatten(), nn.Linear(72, 12), nn.BatchNorm1d(12)], True),
])
def test_ibp_is_exact_for_one_affine_layer_then_elementwise_maps(affine, relu):
    """One affine layer (conv or linear, then BN) is exact under IBP, and so is a ReLU after it."""
    torch.manual_seed(5)
    affine_part = nn.Sequential(*affine(), nn.Flatten())
    warm_bn(affine_part, torch.randn(16, 2, 6, 6))
    affine_part.eval()
    x = torch.randn(1, 2, 6, 6)
    n = affine_part(x).shape[1]
    layers = list(affine_part)[:-1] + ([nn.ReLU()] if relu else []) + [nn.Flatten(), identity_head(n)]
    model = nn.Sequential(*layers).eval()
    lower, upper = x - 0.3, x + 0.3
    lo, up = ibp_bounds(model, lower, upper)
    true_lo, true_hi = attained_extremes(affine_part, lower, upper)
    if relu:
        true_lo, true_hi = true_lo.clamp(min=0), true_hi.clamp(min=0)
    torch.testing.assert_close(lo[0], true_lo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up[0], true_hi, atol=1e-5, rtol=1e-5)


def test_crown_is_exact_on_an_affine_network_with_residual_blocks():
    """No ReLU: C·f is affine, so the backward linear pass must give the exact extremes."""
    torch.manual_seed(6)
    block = ResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, groups=2), nn.BatchNorm2d(4)))
    proj = ResidualBlock(nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6)),
                         nn.Sequential(nn.Conv2d(4, 6, 1, 2, 0), nn.BatchNorm2d(6)))
    model = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), block, proj, nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 16), nn.BatchNorm1d(16), nn.Linear(16, 5))
    warm_bn(model, torch.randn(16, 2, 7, 7))
    model.eval()
    x = torch.randn(1, 2, 7, 7)
    y = torch.tensor([2])
    C = margin_spec(y, 5)
    lower, upper = x - 0.2, x + 0.2
    lo, up = crown_ibp_bounds(model, lower, upper, C)
    true_lo, true_hi = attained_extremes(lambda z: torch.einsum("sk,bk->bs", C[0], model(z)), lower, upper)
    torch.testing.assert_close(lo[0], true_lo, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(up[0], true_hi, atol=1e-4, rtol=1e-5)


def test_relu_relaxation_lines_touch_relu_at_the_interval_ends():
    from trainers.bounds import relu_relaxation
    lower = torch.tensor([-2.0, -1.0, 0.5, -3.0])
    upper = torch.tensor([1.0, 3.0, 2.0, -0.5])
    low_slope, up_slope, up_bias = relu_relaxation(lower, upper)
    for z in (lower, upper):  # the upper line is exact at both ends
        torch.testing.assert_close(up_slope * z + up_bias, z.clamp(min=0))
    grid = lower + (upper - lower) * torch.linspace(0, 1, 101).unsqueeze(1)
    assert (low_slope * grid <= grid.clamp(min=0) + 1e-6).all()
    assert (up_slope * grid + up_bias >= grid.clamp(min=0) - 1e-6).all()
    assert low_slope.tolist() == [0.0, 1.0, 1.0, 0.0]  # adaptive: 1 where u > −l


def test_backward_relu_step_is_valid_pointwise_and_uses_the_whole_relaxation():
    """A·relu(z) ≥ A'·z + b' for every z in [l, u], with A', b' equal to an independent computation:
    positive coefficients take the lower line, negative ones the upper line and its intercept."""
    from trainers.bounds import _back_relu
    gen = torch.Generator().manual_seed(7)
    B, S, N = 3, 4, 50
    center, radius = torch.randn(B, N, generator=gen), torch.rand(B, N, generator=gen)
    lower, upper = center - radius, center + radius
    A = torch.randn(B, S, N, generator=gen)
    A_new, bias = _back_relu(A, torch.zeros(B, S), lower, upper)
    unstable = (lower < 0) & (upper > 0)
    up_slope = torch.where(unstable, upper / (upper - lower), (lower >= 0).float())
    up_bias = torch.where(unstable, -lower * up_slope, torch.zeros_like(lower))
    low_slope = torch.where(unstable, (upper > -lower).float(), (lower >= 0).float())
    expected_A = torch.where(A >= 0, A * low_slope.unsqueeze(1), A * up_slope.unsqueeze(1))
    expected_bias = (A.clamp(max=0) * up_bias.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(A_new, expected_A)
    torch.testing.assert_close(bias, expected_bias)
    for _ in range(200):
        z = lower + (upper - lower) * torch.rand(B, N, generator=gen)
        value = torch.einsum("bsn,bn->bs", A, z.clamp(min=0))
        assert (value >= torch.einsum("bsn,bn->bs", A_new, z) + bias - 1e-5).all()


def test_margin_spec_is_every_other_class_in_order():
    y = torch.arange(10).repeat(3)
    C = margin_spec(y, 10)
    eye = torch.eye(10)
    for b, label in enumerate(y.tolist()):
        expected = torch.stack([eye[label] - eye[j] for j in range(10) if j != label])
        assert torch.equal(C[b], expected)
