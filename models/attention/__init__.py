"""The attention modules of the paper's CIFAR-100 table, one file each, and their registry."""
from torch import nn

from models.attention.ca import CoordAtt
from models.attention.cbam import CBAM
from models.attention.eca import ECA
from models.attention.ema import EMA
from models.attention.nam import NAM, nam_l1_penalty
from models.attention.sa import ShuffleAttention, shuffle_attention_for
from models.attention.se import SE

ATTENTIONS = {
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
    if name == "sa":
        return shuffle_attention_for(channels)
    return ATTENTIONS[name](channels)


__all__ = ["ATTENTIONS", "build_attention", "nam_l1_penalty",
           "CBAM", "CoordAtt", "ECA", "EMA", "NAM", "SE", "ShuffleAttention"]
