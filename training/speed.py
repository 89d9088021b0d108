"""How a model runs on a device, and what makes it fast there: SpeedSettings (autocast dtype,
memory format, torch.compile, CUDA graphs, deterministic kernels) with the defaults chosen from
benchmark.py's GPU run (docs/speed.md); the model wrapped for speed (compile, DDP); and what the
speed tests and benchmark.py count without a GPU: host synchronisations, ATen operations, graph
breaks.
"""
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from utils import Distributed

# Attention modules with which a compiled network trains faster in NCHW than in channels_last on a
# GPU. ResNet50, batch 128, bf16, on an H200, images/s contiguous -> channels_last: with EMA 3,690
# -> 2,519 compiled, 5,415 -> 5,166 with CUDA graphs; without attention 4,572 -> 6,356 compiled,
# 17,134 -> 17,432 with CUDA graphs. docs/speed.md.
CONTIGUOUS_FASTER = {"ema"}

# Static shapes: one graph per batch shape (the full batches, the epoch's last partial batch, the
# test batches), each compiled once per run, with kernels tuned for it.
COMPILE_OPTIONS = {"dynamic": False}


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated,
    slower."""
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
    def resolve(cls, device, amp=None, channels_last=None, compile=None, attention=None,
                cuda_graphs=None,
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
        # transposes its input and output. Not with the modules in CONTIGUOUS_FASTER, nor on the
        # CPU, where it measured slower.
        if channels_last is None:
            channels_last = cuda and attention not in CONTIGUOUS_FASTER
        # Eager PyTorch launches a kernel per operation, ~2,400 per ResNet50 + EMA step: the GPU
        # waits on the launches. Compiled, they fuse. On the CPU compiling costs more than it saves.
        compile = cuda if compile is None else compile
        # A compiled step still launches its kernels one by one from Python, and the GPU waited on
        # the CPU; a CUDA graph replays all of a forward's (or backward's) kernels with one launch.
        cuda_graphs = cuda_graphs is not False and cuda_graphs_obstacle(
            device, compile, processes) is None
        return cls(device, amp, channels_last, compile, cuda_graphs, deterministic)

    def enable_fast_kernels(self) -> None:
        """cuDNN picks the fastest convolution algorithm per shape on first use (EMA's grouped
        convolutions have unusual shapes); the choice is not bitwise reproducible across runs. With
        `deterministic`, cuDNN's deterministic algorithms and PyTorch's deterministic kernels only
        (an operation that has none raises), and the cuBLAS workspace setting that makes its matrix
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
        return images.to(self.device,
                         non_blocking=True).contiguous(memory_format=self.memory_format)

    @property
    def amp_dtype(self):
        """The dtype autocast computes in, None with --amp off."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def grad_scaler(self):
        # fp16's narrow range needs the loss scaled up so that small gradients do not flush to zero.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def compiled(self, model: nn.Module) -> nn.Module:
        if not self.compile:
            return model
        return torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None,
                             **COMPILE_OPTIONS)

    def describe(self) -> str:
        """For the logs: e.g. 'bf16, contiguous, compiled + CUDA graphs'."""
        if self.cuda_graphs:
            execution = "compiled + CUDA graphs"
        else:
            execution = "compiled" if self.compile else "eager"
        layout = "channels_last" if self.channels_last else "contiguous"
        deterministic = ", deterministic" if self.deterministic else ""
        return f"{'fp32' if self.amp == 'off' else self.amp}, {layout}, {execution}{deterministic}"

    def wrapped(self, model: nn.Module, processes: Distributed) -> tuple[nn.Module, nn.Module]:
        """(step_model, eval_model) of a model on the device. Steps go through DDP (gradients
        averaged over ranks) and torch.compile; evaluation through the compiled plain module (DDP
        adds nothing there)."""
        self.enable_fast_kernels()
        eval_model = self.compiled(model)
        if not processes.enabled:
            return eval_model, eval_model
        ids = [self.device] if self.device.type == "cuda" else None
        return self.compiled(nn.parallel.DistributedDataParallel(model, device_ids=ids)), eval_model


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


# ---------------------------------------------------------------- what a CPU can count


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched (each one kernel launch or more on a GPU)."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchFunctionMode):
    """Records the calls that make the host wait for the device: reading a value back (.item(),
    .tolist(), bool(), ...) or building a tensor from Python values (torch.tensor(...), a copy to
    the device). While `paused`, nothing is recorded."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
    BUILDS = {torch.tensor, torch.as_tensor, torch.scalar_tensor}

    def __enter__(self):
        self.calls, self.paused = [], False
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and (func in self.READS or func in self.BUILDS):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def graph_breaks(model: nn.Module, images: torch.Tensor, speed: SpeedSettings):
    """(graphs, graph breaks, first break reason) that torch.compile makes of the training
    forward."""
    model.train()
    with speed.autocast():
        explanation = torch._dynamo.explain(model)(images)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    return explanation.graph_count, explanation.graph_break_count, (reasons[0] if reasons else None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, warmup: int, repeats: int) -> tuple[float, float]:
    """step() `warmup` times, then `repeats` times on the clock: (seconds of the warm-up, seconds
    per timed call)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmed = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return warmed - start, (time.perf_counter() - warmed) / repeats
