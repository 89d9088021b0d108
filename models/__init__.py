"""Model registry: ``create_model(net, attention=None, num_classes=100)``."""
import functools
from typing import Optional

from torch import nn

from models.attention import ATTENTIONS, build_attention
from models.mobilenetv2 import MobileNetV2
from models.resnet import RESNETS, ResNet, resnet

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


def stage_ends(model: nn.Module) -> dict[str, nn.Module]:
    """The last block of each stage, by name, in order; the last one gives the last stage's output
    (the feature map that is pooled), which Grad-CAM explains."""
    if isinstance(model, ResNet):
        return {f"layer{i}": getattr(model, f"layer{i}")[-1] for i in range(1, 5)}
    if isinstance(model, MobileNetV2):
        return {name: model.features[index] for name, index in model.stage_ends.items()}
    raise TypeError(f"no stages known for {type(model).__name__}")
