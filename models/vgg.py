"""VGG-16 with BatchNorm: a plain chain of conv-BN-ReLU, the simplest pruning target."""
from torch import nn

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg, pool=7, hidden=4096, num_classes=1000):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                # conv keeps its bias before BN, as in torchvision (138,365,992 params)
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(cin * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg16_bn(small: bool = False) -> nn.Module:
    if small:  # 32x32 input -> 1x1 feature map, so pool to 1
        return VGG([v if v == "M" else v // 4 for v in CFG16], pool=1, hidden=256, num_classes=10)
    return VGG(CFG16)
