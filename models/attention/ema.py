"""EMA: Efficient Multi-Scale Attention with cross-spatial learning.

Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023.
Authors' code: github.com/YOLOonMe/EMA-attention-module. The function is the seven steps of
docs/reference.md, 2.2 EMA. Two classes compute it, with the same parameters and state dict:

- EMA, the module the networks use: the paper's steps in order, on (B, C, H, W) as it comes, or
  (option `fused`, not in the paper) the whole module in one Triton kernel each way (ema_fused.py);
- FoldedEMA, the authors' formulation (the G groups folded into the batch, adaptive pools, two
  matmuls), the reference for the tests and the benchmark.

Submodule names (`gn`, `conv1x1`, `conv3x3`) are the authors', so that their state dicts load with
``strict=True``.
"""
import torch
from torch import nn
from torch.nn import functional as F

import models.attention.ema_fused as ema_fused


class EMA(nn.Module):
    """Channels are split into ``factor`` groups of k = channels / factor that share one set of
    weights: 10k^2 + 4k parameters. Each group gets one spatial gate, shared by its k channels.

    The authors fold the groups into the batch, (B, C, H, W) -> (B*G, k, H, W), a reshape that copies
    a channels_last tensor. Here every step keeps the input's layout: a group's shared k -> k
    convolution is a grouped convolution with the weights repeated per group, and a sum over a
    group's k channels is a view (B, G, k, ...).

    ``fused`` (not in the paper) picks how it is computed, never what: the same parameters, state
    dict and function either way. None: the fused kernels where they apply (on CUDA with Triton, maps
    they hold, and only once ema_fused.ON_CUDA_BY_DEFAULT says a GPU has checked them), else PyTorch;
    True: the kernels, or a ValueError saying why not (on the CPU they need TRITON_INTERPRET=1);
    False: PyTorch.
    """

    def __init__(self, channels: int, factor: int = 32, fused=None):
        super().__init__()
        if fused not in (None, True, False):
            raise ValueError(f"EMA's fused must be None, True or False, got {fused!r}")
        self.fused = fused
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

    def forward(self, x: torch.Tensor, gate_only: bool = False) -> torch.Tensor:
        """The paper's steps (docs/reference.md, 2.2 EMA) on x (B, C, H, W); with gate_only, step 7's
        gate instead, (B, G, H, W) (spatial_gate)."""
        if not gate_only and self.takes_fused_path(x):  # one kernel reads x and writes the output
            return ema_fused.ema_fused(x, self.conv1x1.weight, self.conv1x1.bias, self.gn.weight, self.gn.bias,
                                       self.conv3x3.weight, self.conv3x3.bias, self.groups, self.gn.eps)
        h, w = x.shape[2:]
        g = self.groups  # 1. Groups: left in place (see the class docstring), not folded into the batch.
        # 2. Strip pooling: the mean along each axis, the W strip laid along H beside the H strip, so
        # that one shared 1x1 convolution serves both; a sigmoid gate per strip.
        strips = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        gate_h, gate_w = self._grouped(self.conv1x1, strips).sigmoid().split([h, w], dim=2)
        # 3. 1x1 branch: x gated along both axes, each channel's map normalised by the GroupNorm.
        # torch.group_norm, not F.group_norm: the latter refuses a batch of one 1x1 map, which the
        # authors' folded input passes.
        x1 = torch.group_norm(x * gate_h * gate_w.transpose(2, 3), x.shape[1], self.gn.weight.repeat(g),
                              self.gn.bias.repeat(g), self.gn.eps)
        # 4. 3x3 branch.
        x2 = self._grouped(self.conv3x3, x)
        # 5. Channel descriptors: softmax over a group's k channels of each branch's global mean. Every
        # map of x1 has mean exactly its GroupNorm bias (one channel per group), so a1 = softmax(bias):
        # no pass over x1 (in x1's dtype, as the mean's; autocast makes GroupNorm float32 on CUDA only).
        a1 = self.gn.bias.softmax(0).repeat(g).to(x1.dtype)[:, None, None]
        a2 = x2.mean((2, 3)).unflatten(1, (g, -1)).softmax(-1).flatten(1)[:, :, None, None]
        # 6. Cross-spatial learning: each branch's descriptor weights the other branch's map, and a
        # group's k weighted maps are summed (element-wise: the authors' matmuls without a reshape).
        weights = (a1 * x2 + a2 * x1).unflatten(1, (g, -1)).sum(2)
        # 7. Gate: each group's k channels times sigmoid of its weights. In x's dtype, so that under
        # autocast the output keeps the input's bf16/fp16 as the authors' does (their matmuls run in it).
        gate = weights.sigmoid()
        if gate_only:
            return gate
        return (x.unflatten(1, (g, -1)) * gate.to(x.dtype).unsqueeze(2)).flatten(1, 2)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, G, H, W): the gate that forward() multiplies each group by (drawn by
        the pictures)."""
        return self.forward(x, gate_only=True)

    def takes_fused_path(self, x: torch.Tensor) -> bool:
        if self.fused is False:
            return False
        if self.fused is None:
            return x.is_cuda and ema_fused.ON_CUDA_BY_DEFAULT and ema_fused.unsupported(x, self.groups) is None
        why = ema_fused.unsupported(x, self.groups)
        if why is not None:
            raise ValueError(f"EMA(fused=True) cannot run on this input: {why}")
        return True

    def _grouped(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv applied to each group of x's channels with the same (shared) weights."""
        return F.conv2d(x, conv.weight.repeat(self.groups, 1, 1, 1), conv.bias.repeat(self.groups),
                        padding=conv.padding, groups=self.groups)


class FoldedEMA(EMA):
    """The authors' formulation, step by step as their code runs it: the groups folded into the batch,
    adaptive pools, a sigmoid per strip, two matmuls and an add. The reference that EMA is tested
    against and timed beside (it copies a channels_last input in its first reshape). Always PyTorch."""

    def __init__(self, channels: int, factor: int = 32):
        super().__init__(channels, factor, fused=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, -1, h, w)  # 1. group
        x_h = F.adaptive_avg_pool2d(g, (h, 1))  # 2. strip pooling + shared 1x1
        x_w = F.adaptive_avg_pool2d(g, (1, w)).permute(0, 1, 3, 2)
        x_h, x_w = torch.split(self.conv1x1(torch.cat([x_h, x_w], dim=2)), [h, w], dim=2)
        x1 = self.gn(g * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())  # 3. GroupNorm branch
        x2 = self.conv3x3(g)  # 4. 3x3 branch
        k = c // self.groups  # 5. channel descriptors
        a1 = F.adaptive_avg_pool2d(x1, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1).softmax(-1)
        a2 = F.adaptive_avg_pool2d(x2, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1).softmax(-1)
        weights = a1 @ x2.reshape(b * self.groups, k, -1) + a2 @ x1.reshape(b * self.groups, k, -1)  # 6.
        return (g * weights.reshape(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)  # 7. gate
