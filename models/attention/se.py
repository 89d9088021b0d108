"""SE: Squeeze-and-Excitation.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.
"""
import torch
from torch import nn


class SE(nn.Module):
    """GAP -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid gate: C^2/8 + C/16 + C
    parameters."""

    def __init__(self, channels: int, reduction: int = 16, *, device=None, dtype=None):
        super().__init__()
        if channels <= 0 or reduction <= 0 or channels % reduction:
            raise ValueError(f"SE needs channels to be a positive multiple of reduction; "
                             f"got channels={channels}, reduction={reduction}")
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, device=device, dtype=dtype),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()
