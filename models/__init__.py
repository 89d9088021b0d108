"""Model registry, ``create_model(net, attention=None, num_classes=100, stages=ALL_STAGES)``,
``model_of(recorded arguments)``, and the parameter and FLOP counts of a model."""
import types
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conf import settings
from models.attention import ATTENTIONS, EMA
from models.attention.ema import FoldedEMA
from models.mobilenetv2 import MobileNetV2
from models.resnet import RESNETS, ResNet, resnet

NO_ATTENTION = "none"


def list_models() -> list[str]:
    """The network names `create_model` accepts."""
    return [*RESNETS, "mobilenetv2"]


def list_attentions() -> list[str]:
    """The attention names `create_model` accepts, "none" (the baseline) first."""
    return [NO_ATTENTION, *ATTENTIONS]


ALL_STAGES = (1, 2, 3, 4)  # a ResNet's stages, layer1 to layer4


def parse_stages(text: Optional[str]) -> tuple[int, ...]:
    """"3,4" -> (3, 4); None -> all four (the paper's placement). A ValueError says what is
    wrong."""
    if text is None:
        return ALL_STAGES
    parts = [part.strip() for part in str(text).split(",")]
    known = {str(s) for s in ALL_STAGES}
    if not all(part in known for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"expected distinct ResNet stages from 1 to 4 such as 3,4, got {text!r}")
    return tuple(sorted(map(int, parts)))


def create_model(net: str, attention: Optional[str] = None, num_classes: int = 100,
                 stages: tuple[int, ...] = ALL_STAGES) -> nn.Module:
    """Network `net` (CIFAR-shaped) with attention module `attention` (None or "none" for the
    baseline) in every block of the ResNet stages `stages` (all four: the paper's placement);
    MobileNetV2 places EMA by its own rule (models/mobilenetv2.py)."""
    if net not in list_models():
        raise ValueError(f"unknown net {net!r}; choose from: {', '.join(list_models())}")
    if attention == NO_ATTENTION:
        attention = None
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(
            f"unknown attention {attention!r}; choose from: {', '.join(list_attentions())}")
    constructor = ATTENTIONS[attention] if attention else None
    if net == "mobilenetv2":
        if tuple(stages) != ALL_STAGES:
            raise ValueError("stages (--att-stages) place the module in a ResNet's stages; "
                             "mobilenetv2 has its own rule")
        return MobileNetV2(num_classes, constructor, cifar=True)
    return resnet(net, num_classes, constructor, tuple(stages))


def model_of(args: dict) -> nn.Module:
    """The model a run's recorded arguments describe (args.json, a checkpoint's "args"): its
    network, attention, stages (att_stages; absent in older runs: all four) and classes (absent:
    CIFAR-100's)."""
    return create_model(args["net"], args["att"], args.get("classes") or settings.NUM_CLASSES,
                        parse_stages(args.get("att_stages")))


def stage_ends(model: nn.Module) -> dict[str, nn.Module]:
    """The last block of each stage, by name, in order; the last one gives the last stage's output
    (the feature map that is pooled), which Grad-CAM explains."""
    if isinstance(model, ResNet):
        return {f"layer{i}": getattr(model, f"layer{i}")[-1] for i in range(1, 5)}
    if isinstance(model, MobileNetV2):
        return {name: model.features[index] for name, index in model.stage_ends.items()}
    raise TypeError(f"no stages known for {type(model).__name__}")


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(every parameter, every parameter outside BatchNorm/GroupNorm/LayerNorm layers)."""
    total = sum(p.numel() for p in model.parameters())
    norm = sum(p.numel() for m in model.modules() if isinstance(m, NORM_LAYERS)
               for p in m.parameters(recurse=False))
    return total, total - norm


@torch.no_grad()
def count_mflops(model: nn.Module, image_size: int = settings.IMAGE_SIZE,
                 executed: bool = False) -> float:
    """Forward MFLOPs for one image, as torch.utils.flop_counter counts them (convolutions and
    matrix products, a multiply-add = 2 FLOPs; element-wise work, pooling and normalization not
    counted). EMA is counted as the authors' formulation runs it (FoldedEMA: its k -> k 3x3
    convolution), as the paper's table counts it; executed=True counts what this repo's EMA runs
    (docs/reference.md, 2.2 EMA: the 3x3 branch by algebra)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    emas = [] if executed else [m for m in model.modules() if isinstance(m, EMA)]
    for ema in emas:
        ema.forward = types.MethodType(FoldedEMA.forward, ema)
    try:
        with FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        for ema in emas:
            del ema.forward
        model.train(was_training)
    return counter.get_total_flops() / 1e6
