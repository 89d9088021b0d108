"""What a run trains, as its recipe says (conf/global_settings.py, docs/reference.md section 3): the
model, seeded and initialised (or started from given weights), the loss, SGD, the LR schedule, and
each epoch's randomness.
"""
import bisect
import hashlib
import warnings

import torch
from torch import nn

import models
from conf import settings
from models.attention import nam_l1_penalty
from training import checkpoints


def build_model(args, recipe: dict, device: torch.device, memory_format, distributed: bool,
                notes: list) -> nn.Module:
    """The run's model on `device`, seeded and initialised, or holding --init-from's weights; what
    the log should say appended to `notes`. Checkpoints, the graph and the pictures use it; speed
    wraps it (training/speed.py)."""
    torch.manual_seed(args.seed)
    model = models.model_of(vars(args))
    initialise(model, recipe)
    if args.init_from and not args.resume:  # a resumed run loads its own weights
        target = f"this run's {args.net} + {args.att}"
        layout = checkpoints.load_weights_into(model, args.init_from, target)
        notes.append(
            f"weights from {args.init_from} ({layout}); optimizer and schedule start fresh")
    if args.sync_bn and distributed:
        # The same parameter names: checkpoints load anywhere.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=memory_format)


def initialise(model: nn.Module, recipe: dict) -> None:
    """The paper recipe's init (the NAM authors' script): every Conv2d weight kaiming_uniform_ with
    default arguments, every BatchNorm weight 1 and bias 0; PyTorch's defaults elsewhere."""
    if recipe["init"] == "pytorch":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def loss_function(model: nn.Module, args: dict):
    """The training loss of a run with these arguments (a dict), as a function of (logits, labels):
    cross-entropy, plus NAM's L1 term on its BN weights with --nam-l1. The trainer and benchmark.py
    both train with it."""
    l1 = args["nam_l1"]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = nn.functional.cross_entropy(logits, labels)
        return value + nam_l1_penalty(model, l1) if l1 else value

    return loss


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.SGD:
    """The recipes' SGD. On CUDA the fused kernel updates every parameter in one launch, and takes
    fp16's overflow check from the gradient scaler without waiting for the GPU."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.MOMENTUM,
                           weight_decay=settings.WEIGHT_DECAY,
                           fused=True if device.type == "cuda" else None)


def lr_schedule(optimizer, steps_per_epoch: int, warm_epochs: int,
                scaler) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipes' schedule (lr_factor), stepped after every optimizer step."""
    # fp16 skips the optimizer step on overflow; the LR schedule still advances
    if scaler.is_enabled():
        warnings.filterwarnings("ignore",
                                message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                        r"`optimizer\.step\(\)`")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, warm_epochs))


def lr_factor(step: int, steps_per_epoch: int, warm_epochs: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): a linear warm-up over the first
    warm_epochs, reaching 1 at its last step (the classic script's first step ran at LR 0), then
    x0.2 at each milestone. Stepped per iteration; between milestones it equals MultiStepLR stepped
    per epoch."""
    warm_steps = warm_epochs * steps_per_epoch
    warm = (step + 1) / warm_steps if step < warm_steps else 1.0
    return warm * settings.LR_DECAY ** bisect.bisect_right(
        settings.MILESTONES, step // steps_per_epoch)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's shuffle and augmentations, from the run's seed and the epoch:
    any epoch can start anywhere (another loader, device or process count) with no state carried."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:8], "little") >> 1


def seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    """Seed everything an epoch draws from: the loader's generator, and the global generators that
    torchvision's transforms use in the main process (DataLoader workers get seeds from
    `generator`)."""
    torch.manual_seed(epoch_seed(seed, epoch))
    generator.manual_seed(epoch_seed(seed, epoch))
