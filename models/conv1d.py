"""Small 1-D CNN (audio/keyword-spotting style): Conv1d + BN1d + ReLU + pooling + Linear."""
from torch import nn

from ._common import conv_bn


class Conv1dNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), num_classes=10):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            conv_bn(1, a, 5, dim=1), nn.MaxPool1d(2),
            conv_bn(a, b, 5, dim=1), nn.MaxPool1d(2),
            conv_bn(b, c, 3, dim=1), nn.AdaptiveAvgPool1d(1),
        )
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def conv1d_net(small: bool = False) -> nn.Module:
    return Conv1dNet((8, 16, 32)) if small else Conv1dNet()
