"""The paper's architectures (docs/method.md §4), built only from plain torch layers and ResidualBlock.

Every model is an nn.Sequential whose last module is the final nn.Linear, so the bound code can fold the
specification matrix into it. The only layer types used are Conv2d, Linear, BatchNorm1d/2d, ReLU, Flatten,
Sequential and ResidualBlock (no pooling): these are all the bound propagator knows.

BN placement (docs/method.md §1b): "full" puts a BN after every conv and every hidden linear, before the ReLU;
"conv" after convs only (the ablation's "BN-Conv only"); "none" nowhere. The final linear never gets one.
"""
from __future__ import annotations

from torch import nn

from trainers.layers import ResidualBlock

# (channels, height, width, classes)
DATASET_SHAPES = {"mnist": (1, 28, 28, 10), "cifar10": (3, 32, 32, 10), "tinyimagenet": (3, 64, 64, 200)}
MODELS = ("cnn7", "wrn8", "resnext", "cnn_small")
BN_PLACEMENTS = ("full", "conv", "none")
HIDDEN_FC = 512  # width of the hidden linear layer of cnn7, wrn8 and resnext


def build_model(name: str, dataset: str, bn: str = "full") -> nn.Sequential:
    if name not in MODELS:
        raise ValueError(f"model name must be one of {MODELS}, got {name!r}")
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"dataset must be one of {tuple(DATASET_SHAPES)}, got {dataset!r}")
    if bn not in BN_PLACEMENTS:
        raise ValueError(f"bn must be one of {BN_PLACEMENTS}, got {bn!r}")
    builder = {"cnn7": cnn7, "wrn8": wrn8, "resnext": resnext, "cnn_small": cnn_small}[name]
    return builder(dataset, bn)


# ---- building blocks -------------------------------------------------------------------------------------

def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, padding: int, bn: str,
            relu: bool = True, groups: int = 1) -> list[nn.Module]:
    """Conv [-BN] [-ReLU]; BN is kept for both "full" and "conv"."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=True)]
    if bn in ("full", "conv"):
        layers.append(nn.BatchNorm2d(c_out))
    if relu:
        layers.append(nn.ReLU())
    return layers


def head(n_flat: int, classes: int, bn: str) -> list[nn.Module]:
    """Flatten - Linear(n_flat -> 512) [-BN1d] - ReLU - Linear(512 -> classes); BN1d only for "full"."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(n_flat, HIDDEN_FC)]
    if bn == "full":
        layers.append(nn.BatchNorm1d(HIDDEN_FC))
    return layers + [nn.ReLU(), nn.Linear(HIDDEN_FC, classes)]


# ---- CNN-7 -----------------------------------------------------------------------------------------------

def cnn7(dataset: str, bn: str) -> nn.Sequential:
    """CNN-7 (code `cnn_7layer_bn2`, width 64, linear 512): five 3x3 convs, the third with stride 2.

    TinyImageNet (`cnn_7layer_bn_imagenet`): the fifth conv also has stride 2, so the FC input is 32768.
    """
    c_in, size, _, classes = DATASET_SHAPES[dataset]
    strides = (1, 1, 2, 1, 2 if dataset == "tinyimagenet" else 1)
    widths = (64, 64, 128, 128, 128)
    layers: list[nn.Module] = []
    for c_out, stride in zip(widths, strides):
        layers += conv_bn(c_in, c_out, 3, stride, 1, bn)
        c_in, size = c_out, conv_out(size, 3, stride, 1)
    return nn.Sequential(*layers, *head(c_in * size * size, classes, bn))


# ---- Wide-ResNet-8 ---------------------------------------------------------------------------------------

def wrn_block(c_in: int, c_out: int, stride: int, bn: str) -> list[nn.Module]:
    """BasicBlock: conv3x3-BN-ReLU-conv3x3-BN plus identity or 1x1 conv+BN shortcut, then ReLU."""
    main = nn.Sequential(*conv_bn(c_in, c_out, 3, stride, 1, bn),
                         *conv_bn(c_out, c_out, 3, 1, 1, bn, relu=False))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride, 0, bn, relu=False))
    return [ResidualBlock(main, shortcut), nn.ReLU()]


def wrn8(dataset: str, bn: str) -> nn.Sequential:
    """Wide-ResNet-8 (code `wide_resnet_8`): stem 3x3 -> 16, one BasicBlock per stage, widths 16*8 =
    128/256/512, strides 1/2/2, no pooling, dense FC -> 512 -> classes.

    TinyImageNet: the paper's `wide_resnet_bn_imagenet64` uses widen factor 10 (160/320/640, 91.4 M params);
    we keep widen factor 8 (same design, 64x64 input, 200 classes) to keep the model smaller.
    """
    c_in, size, _, classes = DATASET_SHAPES[dataset]
    layers = conv_bn(c_in, 16, 3, 1, 1, bn)
    c_in = 16
    for c_out, stride in zip((128, 256, 512), (1, 2, 2)):
        layers += wrn_block(c_in, c_out, stride, bn)
        c_in, size = c_out, conv_out(size, 3, stride, 1)
    return nn.Sequential(*layers, *head(c_in * size * size, classes, bn))


# ---- ResNeXt ---------------------------------------------------------------------------------------------

def resnext_block(c_in: int, cardinality: int, width: int, stride: int, bn: str) -> list[nn.Module]:
    """Bottleneck: 1x1 conv-BN-ReLU, grouped 3x3 conv-BN-ReLU, 1x1 conv (x2 expansion)-BN, plus a
    1x1 conv+BN shortcut (identity when shape is kept), then ReLU."""
    group = cardinality * width
    c_out = 2 * group
    main = nn.Sequential(*conv_bn(c_in, group, 1, 1, 0, bn),
                         *conv_bn(group, group, 3, stride, 1, bn, groups=cardinality),
                         *conv_bn(group, c_out, 1, 1, 0, bn, relu=False))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride, 0, bn, relu=False))
    return [ResidualBlock(main, shortcut), nn.ReLU()]


def resnext(dataset: str, bn: str) -> nn.Sequential:
    """ResNeXt, cardinality 2, strides 1/2/2, bottleneck width doubling per stage, FC -> 512 -> classes.

    MNIST/CIFAR-10: `ResNeXt_2_32`, stem 3x3 -> 64, one block per stage, width 32/64/128 (out 128/256/512).
    TinyImageNet: `ResNeXt_bn_imagenet64`, stem 3x3 -> 16, two blocks per stage, width 8/16/32
    (out 32/64/128), FC 32768 -> 512 -> 200 (16.98 M params).
    """
    c_in, size, _, classes = DATASET_SHAPES[dataset]
    stem, blocks, width = (16, 2, 8) if dataset == "tinyimagenet" else (64, 1, 32)
    cardinality = 2
    layers = conv_bn(c_in, stem, 3, 1, 1, bn)
    c_in = stem
    for stage_stride in (1, 2, 2):
        for stride in [stage_stride] + [1] * (blocks - 1):
            layers += resnext_block(c_in, cardinality, width, stride, bn)
            c_in, size = 2 * cardinality * width, conv_out(size, 3, stride, 1)
        width *= 2
    return nn.Sequential(*layers, *head(c_in * size * size, classes, bn))


# ---- small CNN for fast runs and tests -------------------------------------------------------------------

def cnn_small(dataset: str, bn: str) -> nn.Sequential:
    """Conv(c->16, 4x4, s2, p1)-BN-ReLU, Conv(16->32, 4x4, s2, p1)-BN-ReLU, Flatten,
    Linear(->100)-BN1d-ReLU, Linear(100->classes)."""
    c_in, size, _, classes = DATASET_SHAPES[dataset]
    layers = conv_bn(c_in, 16, 4, 2, 1, bn) + conv_bn(16, 32, 4, 2, 1, bn)
    size = conv_out(conv_out(size, 4, 2, 1), 4, 2, 1)
    layers += [nn.Flatten(), nn.Linear(32 * size * size, 100)]
    if bn == "full":
        layers.append(nn.BatchNorm1d(100))
    layers += [nn.ReLU(), nn.Linear(100, classes)]
    return nn.Sequential(*layers)
