"""EMA: Efficient Multi-Scale Attention with cross-spatial learning.

Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023.
Authors' code: github.com/YOLOonMe/EMA-attention-module. The function is the seven steps of
docs/reference.md, 2.2 EMA. Two classes compute it, with the same parameters and state dict:

- EMA, the module the networks use: the paper's steps in order, on (B, C, H, W) as it comes,
  computing only what the output uses (the 3x3 branch's map is never made: its two uses come from
  x by algebra), or (option `fused`, not in the paper) Triton kernels that stream each group's
  maps (ema_fused.py);
- FoldedEMA, the authors' formulation (the G groups folded into the batch, adaptive pools, the k ->
  k 3x3 convolution, two matmuls), the reference for the tests and the benchmark, and what params.py
  counts FLOPs of.

This file can be copied alone into another project (ema_fused.py is optional): `EMA(channels)` is
a module for any block of `channels` outputs (docs/reference.md, "EMA in your network").

Submodule names (`gn`, `conv1x1`, `conv3x3`) are the authors', so that their state dicts load with
``strict=True``.
"""
import torch
from torch import nn
from torch.nn import functional as F

try:  # the optional Triton kernels, ema_fused.py beside this file
    from . import ema_fused
except ImportError:
    try:  # this file copied alone, as a top-level module
        import ema_fused
    except ModuleNotFoundError as missing:
        if missing.name != "ema_fused":
            raise
        ema_fused = None


class EMA(nn.Module):
    """Channels are split into ``factor`` groups of k = channels / factor that share one set of
    weights: 10k^2 + 4k parameters. Each group gets one spatial gate, shared by its k channels.

    The authors fold the groups into the batch, (B, C, H, W) -> (B*G, k, H, W), a reshape that
    copies a channels_last tensor. Here every step keeps the input's layout: a sum over a group's k
    channels is a view (B, G, k, ...), and the shared weights act on it by products with their
    matrices.

    ``fused`` (not in the paper) picks how it is computed, never what: the same parameters, state
    dict and function either way. None: the fused kernels on CUDA at the shapes where a
    measurement on this GPU found them correct and faster (ema_fused.CHOSEN, filled by the trainer:
    docs/speed.md), else PyTorch; True: the kernels, or a ValueError saying why not (on the CPU they
    need TRITON_INTERPRET=1); False: PyTorch.
    """

    def __init__(self, channels: int, factor: int = 32, fused=None, *, device=None, dtype=None):
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
        factory = dict(device=device, dtype=dtype)
        self.gn = nn.GroupNorm(k, k, **factory)
        self.conv1x1 = nn.Conv2d(k, k, kernel_size=1, **factory)
        self.conv3x3 = nn.Conv2d(k, k, kernel_size=3, padding=1, **factory)

    def forward(self, x: torch.Tensor, gate_only: bool = False) -> torch.Tensor:
        """The paper's steps (docs/reference.md, 2.2 EMA) on x (B, C, H, W); with gate_only, step
        7's gate instead, (B, G, H, W) (spatial_gate)."""
        if not gate_only and self.takes_fused_path(x):  # one kernel reads x and writes the output
            return ema_fused.ema_fused(x, self.conv1x1.weight, self.conv1x1.bias, self.gn.weight,
                                       self.gn.bias,
                                       self.conv3x3.weight, self.conv3x3.bias, self.groups,
                                       self.gn.eps)
        h, w = x.shape[2:]
        # 1. Groups: left in place (see the class docstring), not folded into the batch.
        g = self.groups
        # 2. Strip pooling: the mean along each axis, the W strip laid beside the H strip, so that
        # one shared 1x1 convolution (a product with its k x k matrix) serves both; a sigmoid gate
        # per strip.
        row_means = x.mean(3)  # (B, C, H)
        strips = torch.cat([row_means, x.mean(2)], dim=2).unflatten(1, (g, -1))  # (B, G, k, H + W)
        mixed = self.conv1x1.weight[:, :, 0, 0] @ strips + self.conv1x1.bias[:, None]
        gate_h, gate_w = mixed.flatten(1, 2).sigmoid().split([h, w], dim=2)
        # 3. 1x1 branch: x gated along both axes, each channel's map normalised by the GroupNorm.
        # torch.group_norm, not F.group_norm: the latter refuses a batch of one 1x1 map, which the
        # authors' folded input passes.
        x1 = torch.group_norm(x * gate_h[..., None] * gate_w[:, :, None], x.shape[1],
                              self.gn.weight.repeat(g),
                              self.gn.bias.repeat(g), self.gn.eps)
        # 4. 3x3 branch, x2 = conv3x3(x): never made. Steps 5 and 6 use it only through sums that
        # are linear in it, each taken from x directly (docs/reference.md, 2.2 EMA).
        w3, b3 = self.conv3x3.weight, self.conv3x3.bias
        # 5. Channel descriptors: softmax over a group's k channels of each branch's global mean.
        # Every map of x1 has mean exactly its GroupNorm bias (one channel per group), so a1 =
        # softmax(bias). x2's map mean is b3 plus W3 applied to the sums of x over the window each
        # tap reads.
        a1 = self.gn.bias.softmax(0)
        x2_means = torch.einsum("bgcij,ocij->bgo",
                                window_sums(x, row_means * w).unflatten(1, (g, -1)), w3)
        a2 = (x2_means / (h * w) + b3).softmax(-1)
        # 6. Cross-spatial learning: each branch's descriptor weights the other branch's map, summed
        # over a group's k channels. a1ᵀ·x2 is x convolved with the one filter a1ᵀ·W3 (k -> 1), plus
        # a1·b3. (TorchScript cannot save a Python Function: traced, autograd's own backward of the
        # same sums.)
        filtered = tap_sums if torch.jit.is_tracing() else SharedFilter.apply
        a1_x2 = filtered(x.unflatten(1, (g, -1)), torch.einsum("o,ocij->cij", a1, w3)) + a1 @ b3
        weights = a1_x2.to(x1.dtype) + (a2.to(x1.dtype)[..., None,
                                                        None] * x1.unflatten(1, (g, -1))).sum(2)
        # 7. Gate: each group's k channels times sigmoid of its weights. In x's dtype, so that under
        # autocast the output keeps the input's bf16/fp16 as the authors' does (their matmuls run in
        # it).
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
        if ema_fused is None:
            if self.fused:
                raise ValueError(
                    "EMA(fused=True) needs ema_fused.py beside ema.py, which is not there")
            return False
        if self.fused is None:
            return (x.is_cuda and ema_fused.CHOSEN.get(ema_fused.choice_key(x, self.groups), False)
                    and ema_fused.unsupported(x, self.groups) is None)
        why = ema_fused.unsupported(x, self.groups)
        if why is not None:
            raise ValueError(f"EMA(fused=True) cannot run on this input: {why}")
        return True


class SharedFilter(torch.autograd.Function):
    """(B, G, k, H, W), (k, 3, 3) -> (B, G, H, W): each group's k maps convolved (zero padding 1)
    with one filter, the same for every group, as nine taps: each tap's sum over the k channels (a
    matrix product in x's layout, no copy of x), shifted by the tap and added. No convolution: a k
    -> 1 one runs slowly on CPUs, and under torch.compile it makes the compiler re-lay x out. The
    backward is written out the same way (a shifted sum's gradient is the shifted gradient):
    autograd's own, through the padding and the slices, compiles to a slow kernel. torch.func's vmap
    and grad work through it; forward-mode AD (jvp) does not: a custom jvp would break
    torch.compile's graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight):
        return tap_sums(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # In the gradient's dtype: under autocast the forward ran in bf16/fp16, and the backward
        # runs outside autocast.
        x_, weight_ = x.to(grad.dtype), weight.to(grad.dtype)
        h, w = x.shape[-2:]
        padded = F.pad(grad, (1, 1, 1, 1))
        slices = [padded[..., 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)]
        # (B, G, 9, H, W): the gradient each tap's map received, where it read x
        if x.is_contiguous():
            shifted = torch.stack(slices, 2)
        else:  # in x's channels_last layout: (B, H, W, G, 9) in memory
            shifted = torch.stack([s.permute(0, 2, 3, 1) for s in slices],
                                  -1).permute(0, 3, 4, 1, 2)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = channel_product(weight_.flatten(1), shifted).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = channel_sums(x_, shifted).view_as(weight).to(weight.dtype)
        return grad_x, grad_weight


def tap_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SharedFilter's forward: x (B, G, k, H, W) through one (k, 3, 3) filter, zero padding 1."""
    h, w = x.shape[-2:]
    taps = F.pad(channel_product(weight.flatten(1).T, x), (1, 1, 1, 1))  # (B, G, 9, H + 2, W + 2)
    return sum(taps[:, :, 3 * i + j, i:i + h, j:j + w] for i in range(3) for j in range(3))


def channel_product(matrix: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(m, n) applied to the channel axis of maps (B, G, n, H, W) -> (B, G, m, H, W), in maps'
    layout (contiguous, or channels_last's (B, H, W, G, n) in memory) without copying them."""
    if maps.is_contiguous():
        return (matrix.expand(*maps.shape[:2], -1,
                              -1) @ maps.flatten(3)).unflatten(3, maps.shape[-2:])
    return (maps.permute(0, 3, 4, 1, 2) @ matrix.T).permute(0, 3, 4, 1, 2)


def channel_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, n): Σ a[..., i, h, w]·b[..., j, h, w] over batch, groups and positions, for a (B, G, m,
    H, W) and b (B, G, n, H, W) in the same layout, without copying them."""
    if a.is_contiguous():
        return (a.flatten(3) @ b.flatten(3).mT).sum((0, 1))
    return a.permute(0, 3, 4, 1, 2).flatten(0, 3).T @ b.permute(0, 3, 4, 1, 2).flatten(0, 3)


def window_sums(x: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
    """(B, C, 3, 3): for each tap (di, dj) of a 3x3 convolution with zero padding, each channel's
    sum over the pixels that tap reads, from x (B, C, H, W) and its row sums (B, C, H). Tap -1 never
    reads the last row or column, tap +1 never the first: columns first, then rows."""
    # (B, C, H, 3): each row's sum over the columns that tap dj = -1, 0, +1 reads
    by_column_tap = torch.stack([row_sums - x[..., -1], row_sums, row_sums - x[..., 0]], dim=-1)
    total = by_column_tap.sum(2)
    return torch.stack([total - by_column_tap[:, :, -1], total, total - by_column_tap[:, :, 0]],
                       dim=2)


class FoldedEMA(EMA):
    """The authors' formulation, step by step as their code runs it: the groups folded into the
    batch, adaptive pools, a sigmoid per strip, two matmuls and an add. The reference that EMA is
    tested against and timed beside (it copies a channels_last input in its first reshape). Always
    PyTorch."""

    def __init__(self, channels: int, factor: int = 32, *, device=None, dtype=None):
        super().__init__(channels, factor, fused=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, -1, h, w)  # 1. group
        x_h = F.adaptive_avg_pool2d(g, (h, 1))  # 2. strip pooling + shared 1x1
        x_w = F.adaptive_avg_pool2d(g, (1, w)).permute(0, 1, 3, 2)
        x_h, x_w = torch.split(self.conv1x1(torch.cat([x_h, x_w], dim=2)), [h, w], dim=2)
        x1 = self.gn(g * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())  # 3. GroupNorm branch
        x2 = self.conv3x3(g)  # 4. 3x3 branch
        k = c // self.groups  # 5. channel descriptors
        a1 = F.adaptive_avg_pool2d(x1, 1).reshape(b * self.groups, -1,
                                                  1).permute(0, 2, 1).softmax(-1)
        a2 = F.adaptive_avg_pool2d(x2, 1).reshape(b * self.groups, -1,
                                                  1).permute(0, 2, 1).softmax(-1)
        # 6.
        weights = a1 @ x2.reshape(b * self.groups, k, -1) + a2 @ x1.reshape(b * self.groups, k, -1)
        # 7. gate
        return (g * weights.reshape(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)
