"""Classic UNet: ConvTranspose2d up-sampling and skip connections joined with torch.cat."""
import torch
from torch import nn

from ._common import conv_bn


def double_conv(cin, cout):
    return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    def __init__(self, base=64, depth=4, in_ch=3, num_classes=2):
        super().__init__()
        chs = [base * 2**i for i in range(depth + 1)]  # 64 .. 1024
        self.inc = double_conv(in_ch, chs[0])
        self.down = nn.ModuleList(double_conv(chs[i], chs[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(chs[i + 1], chs[i], 2, 2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(double_conv(2 * chs[i], chs[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(chs[0], num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.outc(x)


def unet(small: bool = False) -> nn.Module:
    return UNet(base=8) if small else UNet()
