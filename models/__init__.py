"""Model registry: ``create_model(net, attention=None, num_classes=100)``."""
import functools
from typing import Optional

from torch import nn

from models.attention import ATTENTIONS, build_attention
from models.resnet import RESNETS, resnet

NO_ATTENTION = "none"


def list_models() -> list[str]:
    """The network names `create_model` accepts."""
    return list(RESNETS)


def list_attentions() -> list[str]:
    """The attention names `create_model` accepts, "none" (the baseline) first."""
    return [NO_ATTENTION, *ATTENTIONS]


def create_model(net: str, attention: Optional[str] = None, num_classes: int = 100) -> nn.Module:
    """Network `net` with attention module `attention` (None or "none" for the baseline) in every block."""
    if net not in RESNETS:
        raise ValueError(f"unknown net {net!r}; choose from: {', '.join(list_models())}")
    if attention in (None, NO_ATTENTION):
        factory = None
    elif attention in ATTENTIONS:
        factory = functools.partial(build_attention, attention)
    else:
        raise ValueError(f"unknown attention {attention!r}; choose from: {', '.join(list_attentions())}")
    return resnet(net, num_classes, factory)
