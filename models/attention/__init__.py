"""The attention modules of the paper's CIFAR-100 table, one file each, and their registry.

Adding a module is one new file here and one line in ATTENTIONS (README.md, "Adding an attention
module")."""
from typing import Callable

from torch import nn

from models.attention.ca import CoordAtt
from models.attention.cbam import CBAM
from models.attention.eca import ECA
from models.attention.ema import EMA
from models.attention.nam import NAM, nam_l1_penalty
from models.attention.sa import ShuffleAttention
from models.attention.se import SE

# What the networks receive: called with a block's width alone, it builds the module for that block.
AttentionConstructor = Callable[[int], nn.Module]

# name (the `-att` choice) -> constructor; the paper's defaults are the constructors' own defaults.
ATTENTIONS: dict[str, AttentionConstructor] = {
    "ema": EMA,
    "se": SE,
    "cbam": CBAM,
    "eca": ECA,
    "sa": ShuffleAttention,
    "nam": NAM,
    "ca": CoordAtt,
}


def build_attention(name: str, channels: int) -> nn.Module:
    """The module `name` with its paper's defaults, for a block of `channels` output channels."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from: none, {', '.join(ATTENTIONS)}")
    return ATTENTIONS[name](channels)


__all__ = ["ATTENTIONS", "AttentionConstructor", "build_attention", "nam_l1_penalty",
           "CBAM", "CoordAtt", "ECA", "EMA", "NAM", "SE", "ShuffleAttention"]
