"""GoogLeNet (torchvision layout, no aux heads): 4 parallel branches concatenated per Inception."""
import torch
from torch import nn

from ._common import conv_bn


def basic(cin, cout, k=1, stride=1):
    return conv_bn(cin, cout, k, stride, eps=1e-3)  # torchvision uses eps=1e-3


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool_proj):
        super().__init__()
        self.branch1 = basic(cin, c1)
        self.branch2 = nn.Sequential(basic(cin, c3r), basic(c3r, c3, 3))
        # torchvision (and thus the usual 6.6M-parameter reference) uses 3x3 in the "5x5" branch
        self.branch3 = nn.Sequential(basic(cin, c5r), basic(c5r, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic(cin, pool_proj))
        self.cout = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj); "M" = stride-2 max pool
FULL = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
        (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
        (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M2",
        (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]


class GoogLeNet(nn.Module):
    def __init__(self, cfg=FULL, div=1, num_classes=1000):
        super().__init__()
        c64, c192 = 64 // div, 192 // div
        layers = [basic(3, c64, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True), basic(c64, c64), basic(c64, c192, 3),
                  nn.MaxPool2d(3, 2, ceil_mode=True)]
        c = c192
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            elif v == "M2":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.append(Inception(c, *(x // div for x in v)))
                c = layers[-1].cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.avgpool(self.features(x)).flatten(1)))


def googlenet(small: bool = False) -> nn.Module:
    if small:  # one Inception per stage (3a, 4a, 5b) at 1/8 width
        return GoogLeNet([FULL[0], "M", FULL[3], "M2", FULL[9]], div=8, num_classes=10)
    return GoogLeNet()
