"""Model registry: ``create_model(net, attention=None, num_classes=100)``."""
import functools
from typing import Optional

from torch import nn

from models.attention import ATTENTIONS, build_attention
from models.mobilenetv2 import MobileNetV2
from models.resnet import RESNETS, resnet

NO_ATTENTION = "none"


def list_models() -> list[str]:
    """The network names `create_model` accepts."""
    return [*RESNETS, "mobilenetv2"]


def list_attentions() -> list[str]:
    """The attention names `create_model` accepts, "none" (the baseline) first."""
    return [NO_ATTENTION, *ATTENTIONS]


def create_model(net: str, attention: Optional[str] = None, num_classes: int = 100) -> nn.Module:
    """Network `net` (CIFAR-shaped) with attention module `attention` (None or "none" for the
    baseline) in every block; MobileNetV2 places EMA by its own rule (models/mobilenetv2.py)."""
    if net not in list_models():
        raise ValueError(f"unknown net {net!r}; choose from: {', '.join(list_models())}")
    if attention == NO_ATTENTION:
        attention = None
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose from: {', '.join(list_attentions())}")
    if net == "mobilenetv2":
        return MobileNetV2(num_classes, attention, cifar=True)
    return resnet(net, num_classes, functools.partial(build_attention, attention) if attention else None)
