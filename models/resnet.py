"""ResNet-18/50, ResNeXt-50 (grouped 3x3) and CIFAR ResNet-56: residual Adds with 1x1 downsample."""
from torch import nn

from ._common import conv_bn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = conv_bn(cin, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3, act=None)
        self.downsample = None if stride == 1 and cin == planes else conv_bn(cin, planes, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, groups=1, width_per_group=64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        cout = planes * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.downsample = None if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    """ImageNet ResNet (7x7 stem + maxpool) or CIFAR ResNet (3x3 stem) via `cifar`."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), num_classes=1000,
                 groups=1, width_per_group=64, cifar=False):
        super().__init__()
        cin = widths[0]
        if cifar:
            self.stem = conv_bn(3, cin, 3)
        else:
            self.stem = nn.Sequential(conv_bn(3, cin, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages = []
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if (i > 0 and j == 0) else 1, groups, width_per_group))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))


def resnet18(small: bool = False) -> nn.Module:
    if small:
        return ResNet(BasicBlock, [2, 2, 2, 2], (16, 32, 64, 128), num_classes=10)
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50(small: bool = False) -> nn.Module:
    if small:  # 2 blocks in stage 1 keeps one identity (non-downsample) residual
        return ResNet(Bottleneck, [2, 1, 1, 1], (16, 32, 64, 128), num_classes=10)
    return ResNet(Bottleneck, [3, 4, 6, 3])


def resnext(small: bool = False) -> nn.Module:
    """ResNeXt-50 32x4d; small: 8 groups of 2..16 channels each."""
    if small:
        return ResNet(Bottleneck, [2, 1, 1, 1], (16, 32, 64, 128), num_classes=10, groups=8, width_per_group=8)
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)


def resnet56(small: bool = False) -> nn.Module:
    """CIFAR ResNet-56 (9 blocks/stage, 16/32/64); small = ResNet-20 layout at half width."""
    if small:
        return ResNet(BasicBlock, [3, 3, 3], (8, 16, 32), num_classes=10, cifar=True)
    return ResNet(BasicBlock, [9, 9, 9], (16, 32, 64), num_classes=10, cifar=True)
