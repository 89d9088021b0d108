"""EMA: Efficient Multi-Scale Attention with cross-spatial learning.

Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023.
Authors' code: github.com/YOLOonMe/EMA-attention-module. Submodule names (`gn`, `conv1x1`,
`conv3x3`) match theirs so that their state dicts load with ``strict=True``.
"""
import torch
from torch import nn


class EMA(nn.Module):
    """Channels are split into ``factor`` groups of k = channels / factor; the groups are folded into
    the batch and share one set of weights: 10k^2 + 4k parameters."""

    def __init__(self, channels: int, factor: int = 32):
        super().__init__()
        # Upstream only asserts channels // factor > 0 and then fails deep inside a reshape.
        if factor <= 0 or channels <= 0 or channels % factor:
            raise ValueError(
                f"EMA needs channels to be a positive multiple of factor (the number of groups); "
                f"got channels={channels}, factor={factor}")
        self.groups = factor
        k = channels // factor
        self.gn = nn.GroupNorm(k, k)
        self.conv1x1 = nn.Conv2d(k, k, kernel_size=1)
        self.conv3x3 = nn.Conv2d(k, k, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        return (g * self._gate(g)).reshape(b, c, h, w)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate forward() multiplies each group by, sigmoid of the cross-spatial weights:
        (B, G, H, W), for pictures."""
        b, c, h, w = x.shape
        return self._gate(x.reshape(b * self.groups, c // self.groups, h, w)).reshape(b, self.groups, h, w)

    def _gate(self, g: torch.Tensor) -> torch.Tensor:
        """(B*G, k, H, W) grouped input -> (B*G, 1, H, W) gate."""
        h, w = g.shape[2:]
        # 1x1 branch: strip pooling along each axis, one shared 1x1 conv on both strips.
        strips = torch.cat([g.mean(3, keepdim=True), g.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        gate_h, gate_w = self.conv1x1(strips).sigmoid().split([h, w], dim=2)
        x1 = self.gn(g * gate_h * gate_w.transpose(2, 3))
        # 3x3 branch.
        x2 = self.conv3x3(g)

        # Cross-spatial learning: each branch's channel descriptor weights the other branch's map.
        a1 = x1.mean((2, 3)).softmax(-1).unsqueeze(1)  # (B*G, 1, k)
        a2 = x2.mean((2, 3)).softmax(-1).unsqueeze(1)
        # baddbmm fuses the second product with the sum: a1 @ x2 + a2 @ x1.
        m = torch.baddbmm(a1 @ x2.flatten(2), a2, x1.flatten(2))  # (B*G, 1, H*W)
        return m.reshape(-1, 1, h, w).sigmoid()
