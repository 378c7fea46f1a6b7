"""EfficientNet-B0: MBConv = expand 1x1 -> depthwise kxk -> SE (SiLU/Sigmoid) -> project (+ skip)."""
from torch import nn

from ._common import conv_bn, make_divisible
from .mobilenet import SqueezeExcitation


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.SiLU, eps=1e-3)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU, eps=1e-3),
                   SqueezeExcitation(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn(hidden, cout, 1, act=None, eps=1e-3)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNet(nn.Module):
    # (expand, kernel, stride, in, out, repeats) for B0
    SETTING = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

    def __init__(self, width=1.0, depths=None, last=1280, num_classes=1000):
        super().__init__()
        d = lambda c: make_divisible(c * width)  # noqa: E731
        layers = [conv_bn(3, d(32), 3, 2, act=nn.SiLU, eps=1e-3)]
        for (e, k, s, cin, cout, _), n in zip(self.SETTING, depths or [row[5] for row in self.SETTING]):
            for i in range(n):
                layers.append(MBConv(d(cin) if i == 0 else d(cout), d(cout), k, s if i == 0 else 1, e))
        layers.append(conv_bn(d(320), last, 1, act=nn.SiLU, eps=1e-3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def efficientnet_b0(small: bool = False) -> nn.Module:
    # small: 1/4 width, MBConv skips kept in one 3x3 and one 5x5 stage
    return EfficientNet(0.25, depths=(1, 2, 1, 1, 2, 1, 1), last=320, num_classes=10) if small else EfficientNet()
