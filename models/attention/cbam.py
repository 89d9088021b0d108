"""CBAM: Convolutional Block Attention Module.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
Authors' code: github.com/Jongchan/attention-module.
"""
import torch
from torch import nn


class ChannelGate(nn.Module):
    """One shared MLP over the average- and the max-pooled channel vectors, summed, sigmoid."""

    def __init__(self, channels: int, reduction: int, **factory):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels // reduction, **factory),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, **factory),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return x * logits.sigmoid()[:, :, None, None]


class SpatialGate(nn.Module):
    """[max over C, mean over C] (the authors' order) -> 7x7 conv -> BN -> sigmoid."""

    def __init__(self, kernel_size: int = 7, **factory):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **factory)
        self.bn = nn.BatchNorm2d(1, momentum=0.01, **factory)  # the authors' momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * self.bn(self.conv(pooled)).sigmoid()


class CBAM(nn.Module):
    """Channel gate, then spatial gate: C^2/8 + C/16 + C + 100 parameters (reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16, *, device=None, dtype=None):
        super().__init__()
        if channels <= 0 or reduction <= 0 or channels % reduction:
            raise ValueError(f"CBAM needs channels to be a positive multiple of reduction; "
                             f"got channels={channels}, reduction={reduction}")
        self.channel_gate = ChannelGate(channels, reduction, device=device, dtype=dtype)
        self.spatial_gate = SpatialGate(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))
