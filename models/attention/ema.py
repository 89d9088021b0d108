"""EMA: Efficient Multi-Scale Attention with cross-spatial learning.

Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023.
Authors' code: github.com/YOLOonMe/EMA-attention-module. Submodule names (`gn`, `conv1x1`,
`conv3x3`) match theirs so that their state dicts load with ``strict=True``.
"""
import torch
from torch import nn
from torch.nn import functional as F


class EMA(nn.Module):
    """Channels are split into ``factor`` groups of k = channels / factor that share one set of
    weights: 10k^2 + 4k parameters.

    The authors fold the groups into the batch, (B, C, H, W) -> (B*G, k, H, W). That reshape copies
    a channels_last tensor, so this module computes the same thing on (B, C, H, W) directly: the
    shared k -> k convolutions become grouped convolutions with the weights repeated per group, the
    one-channel-per-group GroupNorm becomes a GroupNorm with one channel per group over all C, and
    the sums over a group's k channels are views (B, G, k, ...). Every step keeps the input's memory
    layout; the result equals the folded computation (tests/test_ema.py).
    """

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
        # The gate in x's dtype, so that under autocast the output keeps the input's bf16/fp16 as
        # the authors' does (their matmuls run in it), rather than turning the residual stream fp32.
        gate = self.spatial_gate(x).to(x.dtype)
        return (x.unflatten(1, (self.groups, -1)) * gate.unsqueeze(2)).flatten(1, 2)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, G, H, W): the gate that forward() multiplies each group by, sigmoid of
        the cross-spatial weights (also drawn by the pictures)."""
        h, w = x.shape[2:]
        g = self.groups
        # 1x1 branch: strip pooling along each axis, one shared 1x1 conv on both strips.
        strips = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        gate_h, gate_w = self._grouped(self.conv1x1, strips).sigmoid().split([h, w], dim=2)
        y = x * gate_h * gate_w.transpose(2, 3)
        # torch.group_norm, not F.group_norm: the latter refuses a batch of one 1x1 map, which the
        # authors' folded (B*G, k, 1, 1) input passes.
        x1 = torch.group_norm(y, y.shape[1], self.gn.weight.repeat(g), self.gn.bias.repeat(g), self.gn.eps)
        # 3x3 branch.
        x2 = self._grouped(self.conv3x3, x)

        # Cross-spatial learning: each branch's channel descriptor (softmax over a group's k
        # channels of its global mean) weights the other branch's map; the k weighted maps of a
        # group are summed. A GroupNorm with one channel per group leaves every map with mean
        # exactly its bias, so the first branch's descriptor is softmax(bias), with no pass over x1
        # (in x1's dtype, as the mean would have been: autocast makes GroupNorm float32 on CUDA only).
        a1 = self.gn.bias.softmax(0).repeat(g).to(x1.dtype)[:, None, None]
        a2 = x2.mean((2, 3)).unflatten(1, (g, -1)).softmax(-1).flatten(1)[:, :, None, None]
        weights = (a1 * x2 + a2 * x1).unflatten(1, (g, -1)).sum(2)
        return weights.sigmoid()

    def _grouped(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv applied to each group of x's channels with the same (shared) weights."""
        return F.conv2d(x, conv.weight.repeat(self.groups, 1, 1, 1), conv.bias.repeat(self.groups),
                        padding=conv.padding, groups=self.groups)
