"""ECA: Efficient Channel Attention.

Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR
2020. Authors' code: github.com/BangguWu/ECANet.
"""
import math

import torch
from torch import nn


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's k = |(log2(C) + b) / gamma|, taken to the next odd integer (5,5,5,7 on
    ResNet50)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """GAP -> 1-D conv across channels (no bias, 'same' padding) -> sigmoid gate: k_size
    parameters."""

    def __init__(self, channels: int, k_size: int | None = None, *, device=None, dtype=None):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"ECA needs a positive number of channels; got channels={channels}")
        if k_size is None:
            k_size = adaptive_kernel_size(channels)
        if k_size <= 0 or k_size % 2 == 0:
            raise ValueError(f"ECA needs an odd positive k_size; got k_size={k_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=k_size // 2, bias=False,
                              device=device,
                              dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv(x.mean((2, 3)).unsqueeze(1)).sigmoid()  # (B, 1, C)
        return x * gate.squeeze(1)[:, :, None, None]
