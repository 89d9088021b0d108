"""SA: Shuffle Attention.

Zhang and Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", ICASSP 2021.
Authors' code: github.com/wofmanaf/SA-Net. Parameter names (`cweight`, `cbias`, `sweight`, `sbias`,
`gn`) match theirs.
"""
import torch
from torch import nn


class ShuffleAttention(nn.Module):
    """x viewed as (B*G, C/G, H, W); one half of each group gets a channel gate, the other a spatial
    gate; halves concatenated, then a channel shuffle with 2 groups: 3C/G parameters."""

    def __init__(self, channels: int, groups: int | None = None, *, device=None, dtype=None):
        """groups=None: the paper's G = 64 where the width allows it (a multiple of 128: every
        ResNet50/101 block). Not in the paper: elsewhere (ResNet18/34's 64-wide stage, MobileNetV2's
        expanded widths) the largest G below 64 that divides the width into halves, e.g. 32 for 64
        channels, 48 for 192."""
        super().__init__()
        if channels <= 0 or channels % 2:
            raise ValueError(f"ShuffleAttention needs a positive, even number of channels; "
                             f"got channels={channels}")
        if groups is None:
            groups = max(g for g in range(1, 65) if channels % (2 * g) == 0)
        if groups <= 0 or channels % (2 * groups):
            raise ValueError(
                f"ShuffleAttention needs channels to be a positive multiple of 2 * groups; "
                f"got channels={channels}, groups={groups}")
        self.groups = groups
        half = channels // (2 * groups)
        factory = dict(device=device, dtype=dtype)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1, **factory))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1, **factory))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1, **factory))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1, **factory))
        self.gn = nn.GroupNorm(half, half, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        channel_half, spatial_half = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        channel_out = channel_half * (self.cweight * channel_half.mean((2, 3), keepdim=True)
                                      + self.cbias).sigmoid()
        spatial_out = spatial_half * (self.sweight * self.gn(spatial_half) + self.sbias).sigmoid()
        out = torch.cat([channel_out, spatial_out], dim=1).reshape(b, c, h, w)
        # Channel shuffle with 2 groups: (B, 2, C/2, H, W) -> swap the two channel axes.
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
