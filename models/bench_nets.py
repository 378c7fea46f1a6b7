"""Small trainable networks for the no-fine-tuning pruning quality benchmark (`tools/bench_quality.py`).

Unlike the zoo (random weights, only the graph matters), these are trained on offline data sets
(`models/datasets.py`) so that accuracy after pruning means something. They are plain torch (no
torchvision) and use only layers both pruners understand: Conv + BatchNorm + ReLU/ReLU6, residual Adds
with 1x1 conv+BN projection shortcuts, depthwise convs, global average pooling and one final Linear.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from ._common import conv_bn


class BasicBlock(nn.Module):
    """Two 3x3 (or 3-tap) conv+BN with a residual Add; 1x1 conv+BN projection when the shape changes.

    The projection ("option B") gives the shortcut its own weights, so both pruners see an ordinary coupled
    group at every stage boundary instead of a zero-padded identity.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dim: int = 2):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride, dim=dim)
        self.conv2 = conv_bn(cout, cout, 3, act=None, dim=dim)
        self.shortcut = (conv_bn(cin, cout, 1, stride, act=None, dim=dim)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def _stages(cin: int, widths, blocks_per_stage: int, dim: int) -> tuple[nn.Sequential, int]:
    """Residual stages; the first block of every stage after the first halves the resolution."""
    stages = []
    for i, w in enumerate(widths):
        blocks = []
        for j in range(blocks_per_stage):
            blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, dim=dim))
            cin = w
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), cin


class ResNet1d(nn.Module):
    """Residual Conv1d net for mnist1d: input [N, 1, 40] -> 10 logits.

    Stem conv 1->32 (5 taps), three stages of `blocks` residual blocks at 32/64/128 channels on lengths
    40/20/10, global average pool, Linear.
    """

    def __init__(self, widths=(32, 64, 128), blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(1, widths[0], 5, dim=1)
        self.layers, cout = _stages(widths[0], widths, blocks, dim=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, depth 6n+2) for 1x32x32 inputs: 16/32/64 channels."""

    def __init__(self, depth: int, widths=(16, 32, 64), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.stem = conv_bn(in_channels, widths[0], 3)
        self.layers, cout = _stages(widths[0], widths, (depth - 2) // 6, dim=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet_cifar(depth: int) -> ResNetCifar:
    """ResNet-20 (depth 20) or ResNet-56 (depth 56), option-B shortcuts, 1 input channel, 10 classes."""
    return ResNetCifar(depth)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> linear 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Small(nn.Module):
    """MobileNetV2 at about width 0.5 for 1x32x32 inputs (16..160 block channels, 3 stride-2 stages).

    Stem stride 1 (the input is only 32x32), resolution 32 -> 16 -> 8 -> 4, a 1x1 conv to 320 before the
    pool, no dropout (nothing to switch off at evaluation).
    """

    # (expansion t, output channels c, blocks n, stride of the first block s)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 1, 1))

    def __init__(self, in_channels: int = 1, stem: int = 16, last: int = 320, num_classes: int = 10):
        super().__init__()
        layers = [conv_bn(in_channels, stem, 3, act=nn.ReLU6)]
        cin = stem
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class BenchSpec(NamedTuple):
    build: Callable[[], nn.Module]
    dataset: str  # a name in models.datasets.DATASETS
    input_shape: tuple[int, ...]  # one sample, without the batch dim


BENCH_MODELS: dict[str, BenchSpec] = {
    "resnet1d_mnist1d": BenchSpec(ResNet1d, "mnist1d", (1, 40)),
    "resnet20_digits": BenchSpec(lambda: resnet_cifar(20), "digits32", (1, 32, 32)),
    "resnet56_digits": BenchSpec(lambda: resnet_cifar(56), "digits32", (1, 32, 32)),
    "mobilenetv2_digits": BenchSpec(MobileNetV2Small, "digits32", (1, 32, 32)),
}


def classifier(model: nn.Module) -> nn.Linear:
    """The final Linear (its outputs are the logits, which no pruner may remove)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no Linear classifier")
    return linears[-1]


__all__ = ["BENCH_MODELS", "BenchSpec", "MobileNetV2Small", "ResNet1d", "ResNetCifar", "classifier",
           "resnet_cifar"]
