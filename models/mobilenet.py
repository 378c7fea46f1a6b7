"""MobileNetV2 (depthwise, inverted residual, ReLU6) and MobileNetV3-Small (SE, hard-swish)."""
from torch import nn

from ._common import conv_bn, make_divisible


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> linear 1x1 project (+ skip)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width=1.0, depths=None, last=1280, num_classes=1000):
        super().__init__()
        cin = make_divisible(32 * width)
        layers = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for (t, c, _, s), n in zip(self.SETTING, depths or [row[2] for row in self.SETTING]):
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


class SqueezeExcitation(nn.Module):
    """AdaptiveAvgPool -> 1x1 conv -> act -> 1x1 conv -> gate -> Mul (channel attention)."""

    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, squeeze, 1), act(), nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))


class V3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        layers = [conv_bn(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4)))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3Small(nn.Module):
    RE, HS = nn.ReLU, nn.Hardswish
    # (in, kernel, expanded, out, SE, activation, stride) as in the paper / torchvision
    SETTING = [(16, 3, 16, 16, True, RE, 2), (16, 3, 72, 24, False, RE, 2), (24, 3, 88, 24, False, RE, 1),
               (24, 5, 96, 40, True, HS, 2), (40, 5, 240, 40, True, HS, 1), (40, 5, 240, 40, True, HS, 1),
               (40, 5, 120, 48, True, HS, 1), (48, 5, 144, 48, True, HS, 1), (48, 5, 288, 96, True, HS, 2),
               (96, 5, 576, 96, True, HS, 1), (96, 5, 576, 96, True, HS, 1)]

    def __init__(self, width=1.0, blocks=range(11), last_channel=1024, num_classes=1000):
        super().__init__()
        d = lambda c: make_divisible(c * width)  # noqa: E731
        layers = [conv_bn(3, d(16), 3, 2, act=nn.Hardswish)]
        for cin, k, exp, cout, se, act, s in (self.SETTING[i] for i in blocks):
            layers.append(V3Block(d(cin), k, d(exp), d(cout), se, act, s))
        layers.append(conv_bn(d(96), d(576), 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(d(576), last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def mobilenet_v2(small: bool = False) -> nn.Module:
    # small: 1/4 width, inverted-residual skips kept in the 24- and 64-channel stages
    return MobileNetV2(0.25, depths=(1, 2, 1, 2, 1, 1, 1), last=320, num_classes=10) if small else MobileNetV2()


def mobilenet_v3_small(small: bool = False) -> nn.Module:
    # small: drops repeated blocks but keeps every kind (SE/no-SE, ReLU/h-swish, stride 2, residual)
    if small:
        return MobileNetV3Small(0.25, blocks=(0, 1, 2, 3, 4, 6, 8, 9), last_channel=128, num_classes=10)
    return MobileNetV3Small()
