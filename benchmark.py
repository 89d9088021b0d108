"""Training throughput: the classic configuration against ours, side by side, in one run.

    python benchmark.py -net resnet50 -att ema

Configurations (--configs), each training with the trainer's own step (engine.train_step):
  classic      torchvision transforms in a DataLoader with --workers, fp32, contiguous, eager
  eager        data on the device with batched augmentation (--loader device), autocast, eager
  compiled     the same, torch.compile'd
  compiled-cl  the same, torch.compile'd, channels_last
  graphs       compiled, replayed as CUDA graphs (CUDA only)
  graphs-cl    compiled, replayed as CUDA graphs, channels_last (CUDA only)
  graphs-fused graphs, with EMA's fused Triton kernels (CUDA with Triton only)
  graphs-deterministic  graphs, with --deterministic's kernels (CUDA only): what determinism costs
(default on a GPU: all but compiled-cl, which the graphs-cl configuration supersedes; classic and
eager on the CPU, where compiling takes minutes). Each configuration ends with a line
`result: <net> + <att> | <config> | batch <b> | <N> images/s | <device> | commit <hash>`.
With --table-rows, instead: the trainer's default configuration for every row reproduce.py trains,
and the device-hours of the whole table. With --profile, each configuration's top operations by
device time. Also the data paths alone, EMA alone as the trainer runs it (each of the network's EMA
shapes: its share of the step; on a GPU with Triton, the PyTorch and the fused path, beside the
memory floor and the card's copy rate) and against the authors' operations, the model FLOPs
utilization on a GPU, and proxies of GPU speed that any device can measure: host synchronisations
and ATen operations per training step, graphs and graph breaks under torch.compile. Warm-up steps
(which include compiling) are not timed; the device is synchronized before every clock read. Speed
is measured here, never in tests.
"""
import argparse
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import models
import utils
from conf import settings
from models.attention import EMA, ema_fused
from models.attention.ema import FoldedEMA
from training import cifar, cli, engine, loaders, options, recipes
from training import ema_kernels
from training.ema_kernels import ema_shapes, ema_step_ms
from training.speed import (HostSyncCounter, OpCounter, SpeedSettings, graph_breaks,
                            native_cpu_bf16, synchronize, timed)

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "V100": 125e12,
}
CONFIGS = ("classic", "eager", "compiled", "compiled-cl", "graphs", "graphs-cl", "graphs-fused",
           "graphs-deterministic")
# graphs-cl supersedes compiled-cl; graphs-fused needs Triton.
GPU_CONFIGS = ("classic", "eager", "compiled", "graphs", "graphs-cl") + (
    ("graphs-fused",) if ema_fused.available() else ())
CUDA_GRAPHS_CONFIGS = {"graphs", "graphs-cl", "graphs-fused", "graphs-deterministic"}
# EMA's fused Triton kernels (EMA(fused=True)) instead of its PyTorch path
FUSED_CONFIGS = {"graphs-fused"}
EPOCH_IMAGES = 50_000


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    cli.add_model(p, net="resnet50", att="ema")
    p.add_argument("-b", "--b", "--batch-size", dest="b", type=int, default=128 if cuda else 32,
                   help="batch size (default 128 on a GPU, 32 on the CPU)")
    p.add_argument("--steps", type=int, default=50 if cuda else 5,
                   help="timed steps per configuration (default 50 on a GPU, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2,
                   help="untimed steps first, compiling included (default 10 on a GPU, 2 on the "
                        "CPU)")
    p.add_argument("--workers", type=int, default=4 if cuda else 0,
                   help="classic loader processes (default 4 on a GPU, 0 on the CPU)")
    p.add_argument("--recipe", default="classic", choices=list(settings.RECIPES),
                   help="whose augmentations both paths run (default classic, which has the "
                        "rotation)")
    cli.add_data(p)
    cli.add_amp(p)
    p.add_argument("--configs", nargs="+", choices=CONFIGS,
                   default=list(GPU_CONFIGS if cuda else CONFIGS[:2]),
                   help="configurations to time (default: all but compiled-cl on a GPU, classic "
                        "and eager on the CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--table-rows", action="store_true",
                   help="time instead the trainer's default configuration for every row "
                        "reproduce.py trains, with the GPU-hours of the whole table")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per row for --table-rows' total (default 3)")
    p.add_argument("--ema-alone", action="store_true",
                   help="only EMA against the authors' formulation (FoldedEMA), over the network's "
                        "EMA shapes at batch 16 in fp32, eager and compiled: a minute or two on "
                        "the CPU")
    p.add_argument("--profile", action="store_true",
                   help="after timing each configuration, print its top operations by device time "
                        "(3 steps)")
    args = p.parse_args(argv)
    for name in ("b", "steps", "warmup", "workers"):
        if getattr(args, name) < (1 if name in ("b", "steps") else 0):
            p.error(f"--{name} is out of range: {getattr(args, name)}")
    if args.warmup < 2 and CUDA_GRAPHS_CONFIGS & set(args.configs):
        p.error("--warmup must be 2 or more with the graphs configurations: their first call runs "
                "eagerly and their second records the graphs, neither of which a timed step should "
                "include")
    return args


def training_images(args) -> tuple[loaders.ImageArray, str]:
    n = args.b * (args.warmup + args.steps + 1)
    folder = os.path.join(args.data, cifar.CIFAR_FOLDER)
    if os.path.isfile(os.path.join(folder, "train")):
        dataset = cifar.CIFAR100Folder(args.data, train=True)
        dataset.truncate(n)
        return dataset, f"CIFAR-100 from {folder}"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return loaders.ImageArray(data,
                              rng.integers(0, 100, n).tolist()), "random images of CIFAR's shape"


def endless(loader):
    while True:
        yield from loader


def data_rate(loader, device, batches: int) -> float:
    """Images/s of a loader alone (the first batch, which starts workers, not timed)."""
    stream = endless(loader)
    next(stream)
    synchronize(device)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(stream)
        images.to(device)
        seen += len(images)
    synchronize(device)
    return seen / (time.perf_counter() - start)


class StepRunner:
    """The trainer's per-step work (engine.train_step, the LR schedule, the running totals) for one
    configuration, on a fresh model."""

    def __init__(self, args, loader, speed: SpeedSettings, fused_ema: bool = False):
        torch.manual_seed(0)
        torch._dynamo.reset()  # each configuration compiles (and times its warm-up) on its own
        self.speed = speed
        self.model = models.create_model(args.net, args.att, settings.NUM_CLASSES)
        for module in self.model.modules():
            if isinstance(module, EMA):
                module.fused = fused_ema
        self.model.to(speed.device, memory_format=speed.memory_format)
        speed.enable_fast_kernels()
        self.step_model = speed.compiled(self.model)
        self.optimizer = recipes.make_optimizer(self.model, 0.01, speed.device)
        self.loss = recipes.loss_function(self.model, options.NEW_RUN_DEFAULTS)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scaler = speed.grad_scaler()
        self.totals = engine.RunningTotals(speed.device)
        self.stream = endless(loader)

    def step(self):
        images, labels = next(self.stream)
        images, labels = self.speed.inputs(images), labels.to(self.speed.device, non_blocking=True)
        loss, hits = engine.train_step(self.step_model, images, labels, self.loss, self.optimizer,
                                       self.scaler, self.speed)
        self.scheduler.step()
        self.totals.add(loss, hits, len(labels))

    def profile_table(self, steps: int = 3, rows: int = 15) -> str:
        """The operations taking the most device time over a few (warm) steps."""
        cuda = self.speed.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
            synchronize(self.speed.device)
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)

    def timed(self, warmup: int, steps: int) -> tuple[float, float]:
        """(seconds of the warm-up steps, seconds per timed step)."""
        return timed(self.step, self.speed.device, warmup, steps)


def step_proxies(runner: StepRunner) -> tuple[int, float]:
    """(ATen ops in one eager training step, host synchronisations per step over three steps)."""
    runner.step()  # first-use work (workers, lazy initialisation) is not a step's
    with OpCounter() as ops:
        runner.step()
    steps = 3
    with HostSyncCounter() as syncs:
        for _ in range(steps):
            runner.step()
    return ops.count, len(syncs.calls) / steps


# EMA against the authors': small, so that compiling every shape takes a minute on a CPU
EMA_BATCH = 16


def ema_comparison(device, shape, compiled: bool, rounds: int) -> dict:
    """Milliseconds of one forward + backward of EMA and of FoldedEMA (the authors' formulation) on
    an fp32 input of `shape`, with the same weights: the two timed in alternation, each round's time
    the mean of two calls, the fastest round kept (a shared CPU's noise only ever adds time)."""
    torch._dynamo.reset()  # each shape compiled on its own, within dynamo's recompile limit
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    steps = {}
    for name, cls in (("ours", EMA), ("authors", FoldedEMA)):
        torch.manual_seed(0)
        module = cls(shape[1]).to(device)
        run = torch.compile(module, dynamic=False) if compiled else module

        def step(module=module, run=run):
            x.grad = None
            module.zero_grad(set_to_none=True)
            run(x).backward(grad)

        timed(step, device, 2, 1)
        steps[name] = step
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], timed(step, device, 0, 2)[1] * 1e3)
    return best


def net_ema_shapes(net: str) -> list[tuple[tuple[int, int, int], int]]:
    """Each distinct (C, H, W) that an EMA of `net` sees on CIFAR's 32x32 images, and how many
    do."""
    return ema_shapes(models.create_model(net, "ema", settings.NUM_CLASSES))


def commit() -> str:
    """This checkout's commit, marked when files differ from it: what a result line measured."""
    def git(*words):
        return subprocess.run(["git", *words], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True,
                              text=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        return head + (" + uncommitted changes" if git("status", "--porcelain",
                                                       "--untracked-files=no") else "")
    except OSError:  # no git
        return "unknown"


def copy_bandwidth(device) -> float:
    """Bytes/s that one large copy moves on this device (read + write): the memory floor's
    yardstick."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    _, seconds = timed(lambda: y.copy_(x), device, 2, 5)
    return 2 * x.numel() * x.element_size() / seconds


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = "native bf16 (AVX512-BF16/AMX)" if native_cpu_bf16() else "no native bf16"
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, {bf16}")


def configurations(device, args) -> dict:
    fast = SpeedSettings.resolve(device, args.amp, channels_last=False, compile=False)
    compiled = replace(fast, compile=True)
    return {
        "classic": ("workers", SpeedSettings(device)),  # fp32, contiguous, eager
        "eager": ("device", fast),
        "compiled": ("device", compiled),
        "compiled-cl": ("device", replace(compiled, channels_last=True)),
        "graphs": ("device", replace(compiled, cuda_graphs=True)),
        "graphs-cl": ("device", replace(compiled, cuda_graphs=True, channels_last=True)),
        "graphs-fused": ("device", replace(compiled, cuda_graphs=True)),
        "graphs-deterministic": ("device", replace(compiled, cuda_graphs=True, deterministic=True)),
    }


def describe(loader: str, speed: SpeedSettings) -> str:
    return f"{loader} loader, {speed.describe()}"


def peak_flops(args, device):
    if device.type != "cuda":
        return None
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in device_name(device)),
                None)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        benchmark(args)
    except utils.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def benchmark(args):
    device = utils.default_device()
    if args.ema_alone:
        return print_ema_comparison(args, device)
    if args.table_rows:
        return time_table_rows(args, device)
    # read when cuBLAS starts, before any configuration runs
    if "graphs-deterministic" in args.configs:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type != "cuda" and CUDA_GRAPHS_CONFIGS & set(args.configs):
        raise utils.UserError(
            f"--configs {', '.join(sorted(CUDA_GRAPHS_CONFIGS))} need a CUDA device; this "
            f"machine has {device.type} only: leave them out")
    if FUSED_CONFIGS & set(args.configs) and not ema_fused.available():
        raise utils.UserError(
            "--configs graphs-fused needs Triton, which this torch does not have: leave it out")
    recipe = settings.RECIPES[args.recipe]
    dataset, source = training_images(args)
    generator = torch.Generator(device).manual_seed(0)
    paths = {"workers": loaders.make_loader("workers", dataset, args.b, recipe, device, True,
                                            args.workers,
                                            torch.Generator().manual_seed(0)),
             "device": loaders.make_loader("device", dataset, args.b, recipe, device, True,
                                           generator=generator)}
    configs = configurations(device, args)

    # What runs (EMA's 3x3 branch by algebra), for the utilization; params.py counts the paper's
    # way.
    mflops = models.count_mflops(models.create_model(args.net, args.att, settings.NUM_CLASSES),
                                 executed=True)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(f"{args.net} + {args.att}: {mflops:.0f} forward MFLOPs per image; batch {args.b}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; {args.recipe} augmentations; "
          f"{source}")

    print_data_paths(args, paths, device)
    print_proxies(args, paths["device"], configs["eager"][1])

    peak = peak_flops(args, device)
    print(
        f"\ntraining (images/s; 200 epochs = {200 * EPOCH_IMAGES:,} images, training steps only):")
    rates = {}
    for name in args.configs:
        loader, speed = configs[name]
        # the last configuration's model, gradients and graphs freed before the next is built
        runner = None
        runner = StepRunner(args, paths[loader], speed, fused_ema=name in FUSED_CONFIGS)
        warm_s, step_s = runner.timed(args.warmup, args.steps)
        rates[name] = args.b / step_s
        mfu = f"   MFU {3 * mflops * 1e6 * rates[name] / peak:5.1%}" if peak else ""
        ratio = f"   {rates[name] / rates['classic']:5.2f}x classic" if "classic" in rates else ""
        print(f"  {name:<12} {describe(loader, speed):<60} {rates[name]:9.1f}{ratio}{mfu}   "
              f"200 epochs {200 * EPOCH_IMAGES / rates[name] / 3600:6.2f} h   (warm-up "
              f"{warm_s:.0f} s)")
        print(
            f"  result: {args.net} + {args.att} | {name} | batch {args.b} | {rates[name]:.0f} "
            f"images/s | {device_name(device)} | commit {commit()}")
        if args.profile:
            print(runner.profile_table())
    if device.type == "cuda":
        print("  MFU: 3 x forward FLOPs x images/s / " +
              (f"{peak / 1e12:.0f} TFLOP/s dense bf16 peak" if peak
               else "unknown peak: pass --peak-tflops"))

    if args.att == "ema":
        runner = None  # the last configuration's model and graphs freed before EMA's own
        print_ema_as_trained(args, device, configs, rates)
        print_ema_comparison(args, device)


def print_data_paths(args, paths, device):
    data_batches = max(args.steps, 10)
    workers_rate = data_rate(paths["workers"], device, data_batches)
    # each worker (or the main process) is one core
    workers_per_core = workers_rate / max(args.workers, 1)
    device_rate = data_rate(paths["device"], device, data_batches)
    print("\ndata path alone (images/s):")
    print(
        f"  workers loader ({args.workers} workers): {workers_rate:10.0f}   per core "
        f"{workers_per_core:9.0f}")
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, measured, rather than the all-threads rate divided
        device_per_core = data_rate(paths["device"], device, data_batches)
        torch.set_num_threads(threads)
        print(
            f"  device loader ({threads} threads):   {device_rate:10.0f}   per core "
            f"{device_per_core:9.0f} (1 thread)")
        print(f"  device / workers per core:  {device_per_core / workers_per_core:.1f}x")
    else:
        print(f"  device loader (on the GPU): {device_rate:10.0f}")
        print(f"  device / workers:           {device_rate / workers_rate:.1f}x")


def print_proxies(args, loader, speed):
    """What predicts GPU speed, measured on any device."""
    runner = StepRunner(args, loader, speed)
    ops, syncs = step_proxies(runner)
    images = speed.inputs(next(iter(loader))[0])
    graphs, breaks, reason = graph_breaks(runner.model, images, speed)
    print(f"\nproxies ({describe('device', speed)}):")
    print(f"  host synchronisations per training step: {syncs:g}")
    print(f"  ATen ops per training step, eager (forward, backward, optimizer): {ops}")
    print(f"  torch.compile of the training forward: {graphs} graph(s), {breaks} graph break(s)"
          + (f"; first: {reason}" if reason else ""))


def time_table_rows(args, device, rows=settings.TRAINED_ROWS):
    """--table-rows: each row of the paper's table that reproduce.py trains, in the trainer's
    default configuration on this device (the paper recipe's data path), its images/s and the hours
    of a 200-epoch run (training steps only); then the table's total for --seeds seeds, and the rows
    far below their network's baseline."""
    recipe = settings.RECIPES["paper"]
    dataset, source = training_images(args)
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; batch {args.b}; {args.warmup} "
        f"warm-up + {args.steps} timed steps per row; {source}\n\nthe table's rows, the trainer's "
        "defaults (images/s):")
    rates, hours = {}, 0.0
    for net, att in rows:
        speed = SpeedSettings.resolve(device, args.amp, attention=att)
        loader = loaders.make_loader("device", dataset, args.b, recipe, device, True,
                                     generator=torch.Generator(device).manual_seed(0))
        runner = StepRunner(argparse.Namespace(**{**vars(args), "net": net, "att": att}), loader,
                            speed)
        rates[net, att] = args.b / runner.timed(args.warmup, args.steps)[1]
        runner = None  # freed before the next row's model is built
        hours += 200 * EPOCH_IMAGES / rates[net, att] / 3600 * args.seeds
        print(
            f"  {net + ' + ' + att:<18} {speed.describe():<40} {rates[net, att]:9.1f}   200 epochs "
            f"{200 * EPOCH_IMAGES / rates[net, att] / 3600:6.2f} h")
        print(
            f"  result: {net} + {att} | default | batch {args.b} | {rates[net, att]:.0f} images/s "
            f"| {device_name(device)} | commit {commit()}")
    print(
        f"the table: {len(rows)} rows x {args.seeds} seeds = {hours:.1f} device-hours of training "
        "steps")
    slow = [f"{net} + {att} ({rate / rates[net, 'none']:.2f}x its baseline)"
            for (net, att), rate in rates.items()
            if (net, "none") in rates and rate < 0.5 * rates[net, "none"]]
    print(f"below half their network's baseline rate: {', '.join(slow) or 'none'}")


def print_ema_as_trained(args, device, configs, rates):
    """An estimate of EMA's share of the training step: each of the network's EMA input shapes timed
    alone (compiled on its own, so without the fusions and launches it shares with its neighbours in
    the network), in the settings the trainer uses by default on this device. On a GPU with Triton,
    by the trainer's own check (training/ema_kernels.py, in a child process): the kernels against
    float64, both paths timed, and the path --ema-kernel auto would take at each shape."""
    speed = SpeedSettings.resolve(device, args.amp, attention="ema")
    fused = device.type == "cuda" and ema_fused.available()
    bandwidth = copy_bandwidth(device) if fused else None
    print(f"\nEMA alone as trained ({speed.describe()}), forward + backward, batch {args.b}"
          + (f"; this card copies at {bandwidth / 1e12:.2f} TB/s" if fused else "") + ":")
    paths = ("pytorch", "fused") if fused else ("pytorch",)
    shapes = net_ema_shapes(args.net)
    dtype = str(speed.amp_dtype or torch.float32).split(".")[-1]
    items = [ema_kernels.EmaInput(c, h, w, 32, dtype) for (c, h, w), _ in shapes]
    verdicts = ema_kernels.measure(items, args.b, speed) if fused else {}
    totals, modules, chosen, failed = dict.fromkeys(paths, 0.0), 0, 0, 0
    for item, (_, count) in zip(items, shapes):
        modules += count
        c, h, w = item[:3]
        # The floor: a forward reads x and writes the output, a backward reads x and the output's
        # gradient and writes the input's: 5 tensors of x's size.
        floor = 5 * args.b * c * h * w * (
            torch.finfo(speed.amp_dtype).bits // 8 if speed.amp_dtype else 4)
        verdict = verdicts.get(ema_kernels.key_of(item, args.b, speed))
        if verdict is None:
            ms = {"pytorch": ema_step_ms((args.b, c, h, w), speed, max(args.warmup, 3),
                                         max(args.steps, 3))}
        elif verdict.error:
            failed += 1
            ms = {"pytorch": ema_step_ms((args.b, c, h, w), speed, 3, 10), "fused": math.nan}
        else:
            ms = {"pytorch": verdict.pytorch_ms, "fused": verdict.triton_ms}
            chosen += verdict.fused
        cells = []
        for path in paths:
            totals[path] += count * ms[path]
            cells.append(f"{path} {ms[path]:8.3f} ms")
        if verdict is not None:
            cells.append(f"floor {floor / 1e6:6.1f} MB = {floor / bandwidth * 1e3:6.3f} ms, fused "
                         f"at {floor / (ms['fused'] / 1e3) / bandwidth:5.1%} of the copy rate")
            cells.append(f"kernels failed their check: {verdict.error}" if verdict.error else
                         f"auto takes {'fused' if verdict.fused else 'pytorch'}")
        print(
            f"  input {f'({c}, {h}, {w})':<15} x {count:2d} "
            f"{'module ' if count == 1 else 'modules'}  "
            + "   ".join(cells))
    for path in paths:
        trained = next((name for name, (loader, config_speed) in configs.items()
                        if loader == "device" and config_speed == speed and name in rates
                        and (name in FUSED_CONFIGS) == (path == "fused")), None)
        step = (f"; the {trained} training step above: {args.b / rates[trained] * 1e3:.2f} ms"
                if trained else "")
        print(f"  {path} path, all {modules} modules: {totals[path]:.2f} ms a step{step}")
    if fused:
        print(f"  result: EMA kernels | {args.net} | {len(items) - failed} of {len(items)} shapes "
              f"pass the check, auto takes the kernels at {chosen} | pytorch "
              f"{totals['pytorch']:.2f} ms, fused {totals['fused']:.2f} ms a step | batch {args.b} "
              f"| {device_name(device)} | commit {commit()}")


def print_ema_comparison(args, device):
    """EMA alone against the authors' formulation, summed over the network's EMA modules: what the
    algebra of docs/reference.md 2.2 saves, eager and compiled."""
    shapes = net_ema_shapes(args.net)
    modules = sum(count for _, count in shapes)
    # Compiling every shape twice takes minutes on a CPU: there, with --ema-alone only.
    for compiled in (False, True) if device.type == "cuda" or args.ema_alone else (False,):
        print(
            "\nEMA alone against the authors' formulation (FoldedEMA), "
            f"{'compiled' if compiled else 'eager'}, fp32, forward + backward, batch {EMA_BATCH}, "
            f"{args.net}'s {modules} modules:")
        totals = {"ours": 0.0, "authors": 0.0}
        for (c, h, w), count in shapes:
            ms = ema_comparison(device, (EMA_BATCH, c, h, w), compiled, max(args.steps, 3))
            for name in totals:
                totals[name] += count * ms[name]
            print(
                f"  input {f'({c}, {h}, {w})':<15} x {count:2d} "
                f"{'module ' if count == 1 else 'modules'}  ours {ms['ours']:8.2f} ms   authors "
                f"{ms['authors']:8.2f} ms   {ms['authors'] / ms['ours']:5.2f}x")
        print(
            f"  all {modules} modules: ours {totals['ours']:.1f} ms, authors "
            f"{totals['authors']:.1f} ms: {totals['authors'] / totals['ours']:.2f}x")
        print(
            f"  result: EMA alone | {'compiled' if compiled else 'eager'} | {args.net} x {modules} "
            f"| batch {EMA_BATCH} | authors/ours {totals['authors'] / totals['ours']:.2f}x | "
            f"{device_name(device)} | commit {commit()}")


if __name__ == "__main__":
    sys.exit(main())
