"""Architectures (docs/method.md §4, BN placement §1b) and initializations (§1a)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.init import apply_init, hidden_weights, ibp_init, ibp_std, residual_consumers
from trainers.layers import ResidualBlock
from trainers.models import DATASET_SHAPES, MODELS, build_model

ALLOWED = (nn.Sequential, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Flatten,
           ResidualBlock)
BN = (nn.BatchNorm1d, nn.BatchNorm2d)
AFFINE = (nn.Conv2d, nn.Linear)


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def sequentials(model):
    return [m for m in model.modules() if isinstance(m, nn.Sequential)]


# ---- architectures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(DATASET_SHAPES))
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_plain_layers(name, dataset):
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    c, h, w, classes = DATASET_SHAPES[dataset]
    with torch.no_grad():
        out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    assert isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)
    assert model[-1].out_features == classes
    for m in model.modules():
        assert type(m) in ALLOWED, f"{name}/{dataset}: {type(m).__name__} is not a plain layer"
        if isinstance(m, AFFINE):
            assert m.bias is not None


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bn", ["full", "conv", "none"])
def test_bn_placement(name, bn):
    model = build_model(name, "mnist", bn=bn)
    n_conv, n_linear = count(model, nn.Conv2d), count(model, nn.Linear)
    expected_2d = n_conv if bn in ("full", "conv") else 0
    expected_1d = n_linear - 1 if bn == "full" else 0  # never after the final linear
    assert (count(model, nn.BatchNorm2d), count(model, nn.BatchNorm1d)) == (expected_2d, expected_1d)
    for seq in sequentials(model):
        layers = list(seq)
        for prev, layer in zip(layers, layers[1:]):
            if isinstance(layer, BN):  # a BN always sits right after the layer it normalizes
                assert isinstance(prev, AFFINE)
                assert layer.num_features == getattr(prev, "out_channels", getattr(prev, "out_features", None))
            if isinstance(prev, AFFINE) and prev is not model[-1] and bn == "full":
                assert isinstance(layer, BN)
    assert not isinstance(model[-1], BN)


def test_cnn7_bn_counts_match_the_ablation_models():
    # Table 4: full BN = 5 BN2d + BN1d on the hidden FC; "BN-Conv only" drops the BN1d; "no BN" has none.
    counts = {bn: count(build_model("cnn7", "cifar10", bn), BN) for bn in ("full", "conv", "none")}
    assert counts == {"full": 6, "conv": 5, "none": 0}


# docs/method.md §4 (weights + biases + BN affine; running statistics excluded)
SPEC_PARAMS_M = {
    ("cnn7", "cifar10"): 17.19, ("cnn7", "mnist"): 13.26, ("cnn7", "tinyimagenet"): 17.29,
    ("wrn8", "cifar10"): 21.55, ("wrn8", "mnist"): 17.62,
    ("resnext", "cifar10"): 17.61, ("resnext", "mnist"): 13.68, ("resnext", "tinyimagenet"): 16.98,
}


@pytest.mark.parametrize("name,dataset", sorted(SPEC_PARAMS_M))
def test_param_counts_match_method_md(name, dataset):
    model = build_model(name, dataset)
    n = sum(p.numel() for p in model.parameters())
    expected = SPEC_PARAMS_M[(name, dataset)] * 1e6
    assert abs(n - expected) / expected < 0.005, f"{name}/{dataset}: {n} params, spec {expected:.0f}"


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="vgg", dataset="cifar10"), "model name"),
    (dict(name="cnn7", dataset="svhn"), "dataset"),
    (dict(name="cnn7", dataset="cifar10", bn="some"), "bn"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        build_model(**kwargs)
    assert "one of" in str(err.value)


def test_residual_block_adds_branches():
    torch.manual_seed(0)
    main = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(ResidualBlock(main)(x), main(x) + x)


# ---- initialization --------------------------------------------------------------------------------------

def affine_widths(model, center, radius):
    """Plain IBP through a BN-free Sequential; returns the mean width 2·radius after each affine layer."""
    widths = []
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            center = layer(center)
            radius = F.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation,
                              layer.groups)
        elif isinstance(layer, nn.Linear):
            center, radius = layer(center), F.linear(radius, layer.weight.abs())
        elif isinstance(layer, nn.ReLU):
            lower, upper = (center - radius).relu(), (center + radius).relu()
            center, radius = (upper + lower) / 2, (upper - lower) / 2
        elif isinstance(layer, nn.Flatten):
            center, radius = layer(center), layer(radius)
        else:
            raise TypeError(f"no interval rule for {type(layer).__name__}")
        if isinstance(layer, AFFINE):
            widths.append((2 * radius).mean().item())
    return widths


def measured_gains(init, seed=0):
    """Gain E(Δ_i)/E(Δ_{i-1}) of CNN-7 (no BN) for the hidden affine layers i = 2..6 (paper Eq. 3-6);
    the ReLU between them passes about half of the width, as the paper's gain assumes."""
    torch.manual_seed(seed)
    model = build_model("cnn7", "cifar10", bn="none")
    apply_init(model, init)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        widths = affine_widths(model, x, 2e-3 * torch.rand_like(x))
    gains = [b / a for a, b in zip(widths, widths[1:])]
    return gains[:-1]  # the last ratio belongs to the final classifier, which keeps its default init


def test_ibp_init_gain_is_about_one_and_default_init_explodes():
    ibp, default = measured_gains("ibp"), measured_gains("default")
    print("ibp gains", [f"{g:.3f}" for g in ibp], "default gains", [f"{g:.2f}" for g in default])
    assert len(ibp) == 5  # conv2..conv5 and the hidden FC
    assert all(0.5 <= g <= 2 for g in ibp), ibp
    assert default[-1] > 10, default  # the FC with fan-in 32768; the paper's estimate is √n/4 ≈ 45
    assert all(d > 2 * i for d, i in zip(default, ibp))


def test_ibp_init_redraws_hidden_weights_only():
    torch.manual_seed(0)
    model = build_model("cnn7", "cifar10")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ibp_init(model)
    after = dict(model.named_parameters())
    weight_names = [n for n, p in after.items() if "weight" in n and p.ndim > 1]
    for name, p in after.items():
        unchanged = torch.equal(p, before[name])
        if name in weight_names[:-1]:
            assert not unchanged, name
        else:  # biases, BN affine and the final classifier keep PyTorch's defaults
            assert unchanged, name
    fc = model[16]
    assert isinstance(fc, nn.Linear) and fc.in_features == 32768
    sigma = math.sqrt(2 * math.pi) / 32768
    assert abs(fc.weight.std().item() / sigma - 1) < 0.05
    assert abs(fc.weight.mean().item()) < 0.01 * sigma


def test_ibp_std_uses_grouped_fan_in():
    torch.manual_seed(0)
    model = build_model("resnext", "cifar10")
    ibp_init(model)
    grouped = model[3].main[3]  # first block's grouped 3x3 conv: 64 -> 64 channels in 2 groups
    assert isinstance(grouped, nn.Conv2d) and grouped.groups == 2
    fan_in = (64 // 2) * 3 * 3
    assert abs(grouped.weight.std().item() / (math.sqrt(2 * math.pi) / fan_in) - 1) < 0.05


def test_ibp_init_halves_layers_reading_a_residual_sum():
    torch.manual_seed(0)
    model = build_model("wrn8", "cifar10")
    # 0-2 stem conv/BN/ReLU, 3 block1, 4 ReLU, 5 block2, 6 ReLU, 7 block3, 8 ReLU, 9 Flatten, 10 FC
    consumers = [model[5].main[0], model[5].shortcut[0], model[7].main[0], model[7].shortcut[0]]
    assert [id(m) for m in residual_consumers(model)] == [id(m) for m in consumers]
    plain = [model[3].main[0], model[3].main[3], model[5].main[3], model[7].main[3], model[10]]
    ibp_init(model)
    for layer in consumers:
        assert abs(layer.weight.std().item() / (ibp_std(layer.weight) / 2) - 1) < 0.05
    for layer in plain:
        assert abs(layer.weight.std().item() / ibp_std(layer.weight) - 1) < 0.05


def test_residual_consumers_follow_identity_shortcuts():
    model = build_model("resnext", "tinyimagenet")  # two blocks per stage; second blocks keep the identity
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 6
    expected = [b.main[0] for b in blocks[1:]] + [b.shortcut[0] for b in (blocks[2], blocks[4])]
    assert {id(m) for m in residual_consumers(model)} == {id(m) for m in expected}
    assert len(blocks[1].shortcut) == 0


def test_other_inits():
    torch.manual_seed(0)
    model = build_model("cnn_small", "mnist")
    before = [p.detach().clone() for p in model.parameters()]
    apply_init(model, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    apply_init(model, "kaiming")
    last = model[-1].weight
    assert torch.equal(last, before[-2])  # final classifier weight untouched
    for w in hidden_weights(model):
        fan_in = w[0].numel()
        assert abs(w.std().item() / math.sqrt(2 / fan_in) - 1) < 0.1

    apply_init(model, "orthogonal")
    hidden_fc = model[-4].weight  # Linear(1568 -> 100)
    assert torch.allclose(hidden_fc @ hidden_fc.T, torch.eye(100), atol=1e-4)

    with pytest.raises(ValueError, match="init must be one of"):
        apply_init(model, "xavier")
