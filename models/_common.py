"""Shared helpers: non-trivial normalisation statistics and channel rounding."""
import torch
from torch import nn


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels like torchvision (keeps depthwise/SE widths hardware friendly)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


@torch.no_grad()
def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BN/LN random stats and affine params.

    Fresh BN (mean 0, var 1, weight 1, bias 0) is almost an identity; folding or
    pruning bugs would hide behind it, so every norm gets distinct values.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
    return model


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, dim=2, eps=1e-5):
    """Conv (no bias) -> BN -> optional activation, the basic CNN unit."""
    conv = (nn.Conv2d if dim == 2 else nn.Conv1d)(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
    bn = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(cout, eps=eps)
    return nn.Sequential(conv, bn, act(inplace=True)) if act else nn.Sequential(conv, bn)
