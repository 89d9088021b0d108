"""Helpers shared by the scripts: parameter and FLOP counts."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conf import settings

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(every parameter, every parameter outside BatchNorm/GroupNorm/LayerNorm layers)."""
    total = sum(p.numel() for p in model.parameters())
    norm = sum(p.numel() for m in model.modules() if isinstance(m, NORM_LAYERS)
               for p in m.parameters(recurse=False))
    return total, total - norm


@torch.no_grad()
def count_mflops(model: nn.Module, image_size: int = settings.IMAGE_SIZE) -> float:
    """Forward MFLOPs for one image, as torch.utils.flop_counter counts them (convolutions and matrix
    products, a multiply-add = 2 FLOPs; element-wise work, pooling and normalization not counted)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False) as counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops() / 1e6
