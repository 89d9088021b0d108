"""CA: Coordinate Attention.

Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021.
Authors' code: github.com/houqb/CoordAttention.
"""
import torch
from torch import nn


class CoordAtt(nn.Module):
    """Pool along W and along H, shared 1x1 conv C->mip + BN + h-swish, then one 1x1 conv + sigmoid
    per axis: 3*C*mip + 3*mip + 2C parameters, mip = max(8, C // reduction)."""

    def __init__(self, channels: int, reduction: int = 32, *, device=None, dtype=None):
        super().__init__()
        if channels <= 0 or reduction <= 0:
            raise ValueError(f"CoordAtt needs positive channels and reduction; "
                             f"got channels={channels}, reduction={reduction}")
        mip = max(8, channels // reduction)
        factory = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(channels, mip, kernel_size=1, **factory)
        self.bn1 = nn.BatchNorm2d(mip, **factory)
        self.act = nn.Hardswish()  # x * relu6(x + 3) / 6, the authors' h_swish
        self.conv_h = nn.Conv2d(mip, channels, kernel_size=1, **factory)
        self.conv_w = nn.Conv2d(mip, channels, kernel_size=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        strips = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)],
                           dim=2)
        y_h, y_w = self.act(self.bn1(self.conv1(strips))).split([h, w], dim=2)
        return x * self.conv_h(y_h).sigmoid() * self.conv_w(y_w.transpose(2, 3)).sigmoid()
