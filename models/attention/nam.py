"""NAM: Normalization-based Attention Module (channel attention).

Liu et al., "NAM: Normalization-based Attention Module", NeurIPS 2021 workshop (ImageNet PPML).
Authors' code: github.com/Christian-lyc/NAM. The BN is named `bn2` as in their `Channel_Att`.
"""
import torch
from torch import nn


class NAM(nn.Module):
    """BN(C); each channel scaled by |gamma_i| / sum|gamma| (detached, as upstream reads `.data`);
    sigmoid gate on the input: 2C parameters."""

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"NAM needs a positive number of channels; got channels={channels}")
        self.bn2 = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.bn2.weight.detach().abs()
        channel_weight = gamma / gamma.sum()
        return x * (self.bn2(x) * channel_weight[:, None, None]).sigmoid()


def nam_l1_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """NAM's optional sparsity term, strength * sum |gamma| over every NAM's BN weights (zero when
    the model has no NAM). Add it to the loss."""
    gammas = [m.bn2.weight.abs().sum() for m in model.modules() if isinstance(m, NAM)]
    if not gammas:
        return torch.zeros(())
    return strength * torch.stack(gammas).sum()
