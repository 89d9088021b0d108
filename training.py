"""The training engine that train_cifar100.py, test.py and benchmark.py share: how a model runs on a
device (SpeedSettings), the model, optimizer and LR schedule a run trains, one training step, the
watch for a diverged loss, evaluation, the recipes' initialisation, and each epoch's randomness.

Nothing in a training step or an evaluation batch reads a value back from the device: losses and
hit counts stay there, and are read only where the caller chooses to wait (every few dozen steps).
"""
import bisect
import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import checkpoints
import models
from conf import settings
from models.attention import nam_l1_penalty
from utils import SINGLE_PROCESS, Distributed, UserError

# Attention modules with which a compiled network trains faster in NCHW than in channels_last on a
# GPU. ResNet50, batch 128, bf16, on an H200, images/s contiguous -> channels_last: with EMA 3,690 ->
# 2,519 compiled, 5,415 -> 5,166 with CUDA graphs; without attention 4,572 -> 6,356 compiled,
# 17,134 -> 17,432 with CUDA graphs. docs/speed.md.
CONTIGUOUS_FASTER = {"ema"}

# Static shapes: one graph per batch shape (the full batches, the epoch's last partial batch, the
# test batches), each compiled once per run, with kernels tuned for it.
COMPILE_OPTIONS = {"dynamic": False}


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_cuda_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability 8.0, Ampere, and newer). torch.cuda.is_bf16_supported()
    also counts emulation, which makes V100s and T4s slower than fp32."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass
class SpeedSettings:
    """How the model runs on `device`: autocast dtype, memory format, torch.compile, CUDA graphs."""
    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    deterministic: bool = False  # on CUDA: deterministic kernels only (--deterministic)

    @classmethod
    def resolve(cls, device, amp=None, channels_last=None, compile=None, attention=None, cuda_graphs=None,
                processes: int = 1, deterministic: bool = False) -> "SpeedSettings":
        """Fill unset options with the defaults for the device and the attention module, chosen from
        benchmark.py's GPU run (docs/speed.md). CUDA graphs only where they apply (see
        cuda_graphs_obstacle); asked for elsewhere, they are off."""
        cuda = device.type == "cuda"
        if amp is None:
            # bf16 halves memory traffic and runs on tensor cores, with fp32's range (no loss
            # scaling); where only fp16 is native, fp16 with a gradient scaler.
            if cuda:
                amp = "bf16" if native_cuda_bf16(device) else "fp16"
            else:
                amp = "bf16" if native_cpu_bf16() else "off"
        # NHWC is the layout cuDNN's tensor-core convolutions want: without it every convolution
        # transposes its input and output. Not with the modules in CONTIGUOUS_FASTER, nor on the CPU,
        # where it measured slower.
        if channels_last is None:
            channels_last = cuda and attention not in CONTIGUOUS_FASTER
        # Eager PyTorch launches a kernel per operation, ~2,400 per ResNet50 + EMA step: the GPU
        # waits on the launches. Compiled, they fuse. On the CPU compiling costs more than it saves.
        compile = cuda if compile is None else compile
        # A compiled step still launches its kernels one by one from Python, and the GPU waited on
        # the CPU; a CUDA graph replays all of a forward's (or backward's) kernels with one launch.
        cuda_graphs = cuda_graphs is not False and cuda_graphs_obstacle(device, compile, processes) is None
        return cls(device, amp, channels_last, compile, cuda_graphs, deterministic)

    def enable_fast_kernels(self) -> None:
        """cuDNN picks the fastest convolution algorithm per shape on first use (EMA's grouped
        convolutions have unusual shapes); the choice is not bitwise reproducible across runs. With
        `deterministic`, cuDNN's deterministic algorithms and PyTorch's deterministic kernels only (an
        operation that has none raises), and the cuBLAS workspace setting that makes its matrix
        products deterministic; before the first one, which reads it."""
        if self.device.type == "cuda":
            if self.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = not self.deterministic
            torch.backends.cudnn.deterministic = self.deterministic
            torch.use_deterministic_algorithms(self.deterministic)

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    @property
    def amp_dtype(self):
        """The dtype autocast computes in, None with --amp off."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def grad_scaler(self):
        # fp16's narrow range needs the loss scaled up so that small gradients do not flush to zero.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def compiled(self, model: nn.Module) -> nn.Module:
        if not self.compile:
            return model
        return torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None, **COMPILE_OPTIONS)

    def describe(self) -> str:
        """For the logs: e.g. 'bf16, contiguous, compiled + CUDA graphs'."""
        if self.cuda_graphs:
            execution = "compiled + CUDA graphs"
        else:
            execution = "compiled" if self.compile else "eager"
        layout = "channels_last" if self.channels_last else "contiguous"
        deterministic = ", deterministic" if self.deterministic else ""
        return f"{'fp32' if self.amp == 'off' else self.amp}, {layout}, {execution}{deterministic}"


def cuda_graphs_obstacle(device: torch.device, compile: bool, processes: int):
    """Why CUDA graphs cannot be used here, or None. They replay torch.compile's graphs, on CUDA;
    not under torchrun, where DDP's all-reduces would run inside captured graphs (untested here)."""
    if device.type != "cuda":
        return f"they need a CUDA device, this run is on {device.type}"
    if not compile:
        return "they need --compile"
    if processes > 1:
        return f"not under torchrun ({processes} processes)"
    return None


def resolve_device_options(args, device, processes: Distributed) -> tuple[SpeedSettings, list[str]]:
    """The run's SpeedSettings and the other options whose defaults depend on the device, resolved
    and recorded in `args` (with the number of processes); the notes for the log."""
    if args.sync_bn and processes.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only")
    args.deterministic = bool(args.deterministic)  # None: not given (off for a new run, as it was for an old one)
    speed = SpeedSettings.resolve(device, args.amp, args.channels_last, args.compile, args.att, args.cuda_graphs,
                                  processes.world, args.deterministic and device.type == "cuda")
    notes = []
    if args.deterministic and device.type != "cuda":
        notes.append("note: --deterministic changes nothing here: runs on the CPU are deterministic already")
    if device.type == "cpu" and (speed.amp == "fp16" or speed.amp == "bf16" and not native_cpu_bf16()):
        notes.append(f"warning: this CPU emulates --amp {speed.amp}, much slower than --amp off")
    if args.cuda_graphs and not speed.cuda_graphs:
        notes.append(f"note: CUDA graphs off: {cuda_graphs_obstacle(device, speed.compile, processes.world)}")
    # args.cuda_graphs stays as asked (None: wherever they apply): a run that passes through the
    # CPU or torchrun gets them back on one GPU.
    args.amp, args.channels_last, args.compile = speed.amp, speed.channels_last, speed.compile
    args.loader = args.loader or "device"
    args.workers = (4 if device.type == "cuda" else 0) if args.workers is None else args.workers
    args.world = processes.world
    return speed, notes


def build_model(args, recipe: dict, speed: SpeedSettings, processes: Distributed, notes: list):
    """(model, step_model, eval_model, penalty); what the log should say appended to `notes`. `model`
    is the plain module, on the device: checkpoints, the graph and the pictures use it. Steps go
    through DDP (gradients averaged over ranks) and torch.compile; evaluation through the compiled
    plain module (DDP adds nothing there). `penalty`: NAM's L1 term, or None."""
    torch.manual_seed(args.seed)
    model = models.model_of(vars(args))
    initialise(model, recipe)
    if args.init_from and not args.resume:  # a resumed run loads its own weights
        layout = checkpoints.load_weights_into(model, args.init_from, f"this run's {args.net} + {args.att}")
        notes.append(f"weights from {args.init_from} ({layout}); optimizer and schedule start fresh")
    if args.sync_bn and processes.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameter names: checkpoints load anywhere
    model = model.to(speed.device, memory_format=speed.memory_format)
    speed.enable_fast_kernels()
    eval_model = speed.compiled(model)
    if processes.enabled:
        cuda = speed.device.type == "cuda"
        step_model = speed.compiled(nn.parallel.DistributedDataParallel(model, device_ids=[speed.device] if cuda else None))
    else:
        step_model = eval_model
    penalty = (lambda: nam_l1_penalty(model, args.nam_l1)) if args.nam_l1 else None
    return model, step_model, eval_model, penalty


def cpu_estimate(epoch_seconds: float, epochs: int) -> str:
    """The warning a CPU run prints once: how long an epoch and the rest of the run take."""
    def span(seconds):
        if seconds >= 2 * 86400:
            return f"{seconds / 86400:.1f} days"
        if seconds >= 3600:
            return f"{seconds / 3600:.1f} h"
        if seconds >= 60:
            return f"{seconds / 60:.1f} min"
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    rest = f"{span(epoch_seconds * epochs)} for the remaining {epochs} epoch{'s' if epochs != 1 else ''}"
    return f"warning: no GPU; about {span(epoch_seconds)} per epoch, {rest}"


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.SGD:
    """The recipes' SGD. On CUDA the fused kernel updates every parameter in one launch, and takes
    fp16's overflow check from the gradient scaler without waiting for the GPU."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.MOMENTUM,
                           weight_decay=settings.WEIGHT_DECAY, fused=True if device.type == "cuda" else None)


def lr_schedule(optimizer, steps_per_epoch: int, warm_epochs: int, scaler) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipes' schedule (lr_factor), stepped after every optimizer step."""
    if scaler.is_enabled():  # fp16 skips the optimizer step on overflow; the LR schedule still advances
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, warm_epochs))


def train_step(step_model: nn.Module, images, labels, optimizer, scaler, speed: SpeedSettings, penalty=None):
    """One optimizer step on a batch: (loss, top-1 hits), left on the device: nothing here waits for
    it. `penalty`, if given, returns a term added to the loss (NAM's L1)."""
    # Gradients freed before the forward: no memory held through it, and no CUDA-graph output of the
    # last step alive when the next one replays.
    optimizer.zero_grad(set_to_none=True)
    with speed.autocast():
        logits = step_model(images)
        loss = nn.functional.cross_entropy(logits, labels)
    if penalty is not None:
        loss = loss + penalty()
    scaler.scale(loss).backward()  # a no-op scale unless --amp fp16
    scaler.step(optimizer)  # skipped by an enabled scaler when fp16 gradients overflowed
    scaler.update()
    return loss.detach(), topk_correct(logits.detach(), labels, ks=(1,))[0]


class Diverged(UserError):
    pass


class LossWatch:
    """The step losses since the last check, kept on the device, and at each check the verdict.

    Training has diverged at the first non-finite loss. Under fp16 the gradient scaler skips a step
    whose gradients overflow and lowers its scale, so there only a loss that stays non-finite for
    `tolerated` + 1 steps in a row is divergence.
    """

    def __init__(self, tolerated: int):
        self.tolerated = tolerated  # non-finite steps in a row that are not divergence yet
        self.losses, self.first_step, self.streak, self.streak_start = [], 0, 0, 0
        self.last = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)

    def diverged_at(self):
        """The 1-based step at which the non-finite losses began, if training diverged; else None.
        Waits for the device."""
        finite = torch.isfinite(torch.stack(self.losses)).tolist()
        self.last = self.losses[-1].item()
        for step, ok in enumerate(finite, self.first_step + 1):
            self.streak = 0 if ok else self.streak + 1
            self.streak_start = step if self.streak == 1 else self.streak_start
            if self.streak > self.tolerated:
                return self.streak_start
        self.losses = []
        return None


def raise_divergence(epoch, step, ckpt_dir):
    last = ckpt_dir / "last.pth"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {step}; training stopped, "
                   f"{kept}. Try a lower -lr or a warm-up (-warm 1).")


class RunningTotals:
    """An epoch's loss sum and top-1 hits, kept on the device, and its image count, kept in Python."""

    def __init__(self, device, loss_sum: float = 0.0, hits: float = 0.0, images: int = 0):
        self.sums = torch.tensor([loss_sum, hits], dtype=torch.float64, device=device)
        self.images = images

    def add(self, loss: torch.Tensor, hits: torch.Tensor, images: int) -> None:
        self.sums[0].add_(loss, alpha=images)
        self.sums[1].add_(hits)
        self.images += images

    def read(self, processes: Distributed = SINGLE_PROCESS) -> list[float]:
        """[loss sum, hits, images] over every rank; waits for the device."""
        device = self.sums.device
        return processes.sum(torch.cat([self.sums, torch.tensor([self.images], dtype=torch.float64,
                                                                device=device)])).tolist()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of images whose label is among the top-k predictions, for each k (as tensors); with
    fewer than k classes (a small --dataset folder), every image's."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, speed: SpeedSettings, processes: Distributed = SINGLE_PROCESS) -> dict:
    """Mean loss per image and top-1/top-5 accuracy (%) over the loader; under torchrun, over every
    rank's shard (the shards cover the test set once). Reads the device once, at the end."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=speed.device)  # loss, top-1, top-5
    images = 0
    for batch, labels in loader:
        batch, labels = speed.inputs(batch), labels.to(speed.device, non_blocking=True)
        with speed.autocast():
            logits = model(batch)
        top1, top5 = topk_correct(logits, labels)
        sums[0].add_(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        sums[1].add_(top1)
        sums[2].add_(top5)
        images += len(labels)
    totals = torch.cat([sums, torch.tensor([images], dtype=torch.float64, device=speed.device)])
    loss_sum, top1, top5, n = processes.sum(totals).tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's shuffle and augmentations, from the run's seed and the epoch:
    any epoch can start anywhere (another loader, device or process count) with no state carried."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:8], "little") >> 1


def seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    """Seed everything an epoch draws from: the loader's generator, and the global generators that
    torchvision's transforms use in the main process (DataLoader workers get seeds from `generator`)."""
    torch.manual_seed(epoch_seed(seed, epoch))
    generator.manual_seed(epoch_seed(seed, epoch))


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


def lr_factor(step: int, steps_per_epoch: int, warm_epochs: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): a linear warm-up over the first warm_epochs,
    reaching 1 at its last step (the classic script's first step ran at LR 0), then x0.2 at each
    milestone. Stepped per iteration; between milestones it equals MultiStepLR stepped per epoch."""
    warm_steps = warm_epochs * steps_per_epoch
    warm = (step + 1) / warm_steps if step < warm_steps else 1.0
    return warm * settings.LR_DECAY ** bisect.bisect_right(settings.MILESTONES, step // steps_per_epoch)
