"""Training throughput: the classic configuration against ours, side by side, in one run.

    python benchmark.py -net resnet50 -att ema

(a) classic: torchvision transforms in a DataLoader with --workers, fp32, contiguous, eager;
(b) fast: the trainer's defaults on this device (device-resident data and batched augmentation,
    autocast, channels_last where they help), plus --compile if asked.
Also: each data path alone, and on a GPU the model FLOPs utilization. Warm-up steps are not timed,
and the device is synchronized before every clock read. Speed is measured here, never in tests.
"""
import argparse
import os
import platform
import time

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
import utils
from conf import settings
from models.attention import EMA

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "V100": 125e12,
}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-net", default="resnet50", choices=models.list_models())
    p.add_argument("-att", default="ema", choices=models.list_attentions())
    p.add_argument("-b", "--b", "--batch-size", dest="b", type=int, default=128 if cuda else 32)
    p.add_argument("--steps", type=int, default=50 if cuda else 5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2, help="untimed steps first")
    p.add_argument("--workers", type=int, default=4 if cuda else 0, help="classic loader processes")
    p.add_argument("--recipe", default="classic", choices=list(settings.RECIPES),
                   help="whose augmentations both paths run (classic has the rotation)")
    p.add_argument("--data", default=settings.DATA_DIR,
                   help="CIFAR-100 root; random images of CIFAR's shape when it holds none")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None, help="fast config (default: the trainer's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    args = p.parse_args(argv)
    for name in ("b", "steps", "warmup", "workers"):
        if getattr(args, name) < (1 if name in ("b", "steps") else 0):
            p.error(f"--{name} is out of range: {getattr(args, name)}")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_images(args) -> tuple[utils.ImageArray, str]:
    n = args.b * (args.warmup + args.steps + 1)
    folder = os.path.join(args.data, utils.CIFAR_FOLDER)
    if os.path.isfile(os.path.join(folder, "train")):
        dataset = utils.CIFAR100Folder(args.data, train=True)
        dataset.truncate(n)
        return dataset, f"CIFAR-100 from {folder}"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return utils.ImageArray(data, rng.integers(0, 100, n).tolist()), "random images of CIFAR's shape"


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


def train_rate(args, loader, speed: utils.SpeedSettings) -> float:
    """Training images/s of one configuration: warm-up steps first, then `steps` timed ones."""
    torch.manual_seed(0)
    model = models.create_model(args.net, args.att, settings.NUM_CLASSES).to(speed.device, memory_format=speed.memory_format)
    step_model = torch.compile(model) if speed.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=settings.MOMENTUM,
                                weight_decay=settings.WEIGHT_DECAY)
    scaler = speed.grad_scaler()
    stream = endless(loader)

    def step():
        images, labels = next(stream)
        images, labels = speed.inputs(images), labels.to(speed.device, non_blocking=True)
        with speed.autocast():
            loss = nn.functional.cross_entropy(step_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    synchronize(speed.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(speed.device)
    return args.steps * args.b / (time.perf_counter() - start)


class UpstreamStyleEMA(EMA):
    """The authors' sequence of operations (adaptive pools, a sigmoid per strip, two matmuls and an
    add), for timing against ours; the same math, tested equal in tests/test_loader.py."""

    def forward(self, x):
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, -1, h, w)
        x_h = nn.functional.adaptive_avg_pool2d(g, (h, 1))
        x_w = nn.functional.adaptive_avg_pool2d(g, (1, w)).permute(0, 1, 3, 2)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(g * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
        x2 = self.conv3x3(g)
        k = c // self.groups
        a1 = nn.functional.adaptive_avg_pool2d(x1, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1).softmax(-1)
        a2 = nn.functional.adaptive_avg_pool2d(x2, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1).softmax(-1)
        weights = (a1 @ x2.reshape(b * self.groups, k, -1) + a2 @ x1.reshape(b * self.groups, k, -1))
        return (g * weights.reshape(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched (each one kernel launch or more on a GPU)."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ema_comparison(device, batch: int, repeats: int):
    """Forward + backward of one EMA at ResNet50's first-stage shape: ours against upstream's ops."""
    x = torch.randn(batch, 256, 32, 32, device=device, requires_grad=True)
    results = {}
    for name, cls in (("ours", EMA), ("upstream", UpstreamStyleEMA)):
        torch.manual_seed(0)
        module = cls(256).to(device)
        with OpCounter() as counter:
            out = module(x)
        out.sum().backward()
        for _ in range(2):
            module(x).sum().backward()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            module(x).sum().backward()
        synchronize(device)
        results[name] = ((time.perf_counter() - start) / repeats * 1e3, counter.count)
    return results


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    device = utils.default_device()
    recipe = settings.RECIPES[args.recipe]
    dataset, source = training_images(args)
    classic = utils.SpeedSettings(device)  # fp32, contiguous, eager
    fast = utils.SpeedSettings.resolve(device, args.amp, args.channels_last, args.compile)
    generator = torch.Generator(device)
    generator.manual_seed(0)
    workers_loader = utils.make_loader("workers", dataset, args.b, recipe, device, True, args.workers,
                                       torch.Generator().manual_seed(0))
    device_loader = utils.make_loader("device", dataset, args.b, recipe, device, True, generator=generator)

    mflops = utils.count_mflops(models.create_model(args.net, args.att, settings.NUM_CLASSES))
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(f"{args.net} + {args.att}: {mflops:.0f} forward MFLOPs per image; batch {args.b}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; {args.recipe} augmentations; {source}")

    data_batches = max(args.steps, 10)
    workers_rate = data_rate(workers_loader, device, data_batches)
    workers_per_core = workers_rate / max(args.workers, 1)  # each worker (or the main process) is one core
    device_rate = data_rate(device_loader, device, data_batches)
    print("\ndata path alone (images/s):")
    print(f"  workers loader ({args.workers} workers): {workers_rate:10.0f}   per core {workers_per_core:9.0f}")
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, measured, rather than the all-threads rate divided
        device_per_core = data_rate(device_loader, device, data_batches)
        torch.set_num_threads(threads)
        print(f"  device loader ({threads} threads):   {device_rate:10.0f}   per core {device_per_core:9.0f} (1 thread)")
        print(f"  device / workers per core:  {device_per_core / workers_per_core:.1f}x")
    else:
        print(f"  device loader (on the GPU): {device_rate:10.0f}")
        print(f"  device / workers:           {device_rate / workers_rate:.1f}x")

    print(f"\ntraining (images/s):")
    classic_rate = train_rate(args, workers_loader, classic)
    print(f"  classic  workers loader, fp32, contiguous, eager: {classic_rate:10.1f}")
    fast_rate = train_rate(args, device_loader, fast)
    fast_label = (f"device loader, amp {fast.amp}, {'channels_last' if fast.channels_last else 'contiguous'}, "
                  f"{'compiled' if fast.compile else 'eager'}")
    print(f"  fast     {fast_label}: {fast_rate:10.1f}")
    print(f"  fast / classic: {fast_rate / classic_rate:.2f}x")
    epoch_minutes = 50_000 / fast_rate / 60
    print(f"  200 epochs of 50,000 images at the fast rate: {200 * epoch_minutes / 60:.2f} h")

    if args.att == "ema":
        ema = ema_comparison(device, args.b, max(args.steps, 3))
        print(f"\nEMA alone, forward + backward, input ({args.b}, 256, 32, 32):")
        for name, (ms, ops) in ema.items():
            print(f"  {name:<9} {ms:8.2f} ms   {ops:3d} ATen ops in the forward")
        print(f"  upstream / ours: {ema['upstream'][0] / ema['ours'][0]:.2f}x time")

    if device.type == "cuda":
        name = device_name(device)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
        if peak is None:
            print(f"\nMFU: unknown peak for {name}; pass --peak-tflops")
        else:
            train_flops = 3 * mflops * 1e6  # forward + backward (about twice the forward)
            print(f"\nMFU (3 x forward FLOPs x images/s / {peak / 1e12:.0f} TFLOP/s dense bf16 peak): "
                  f"classic {train_flops * classic_rate / peak:.1%}, fast {train_flops * fast_rate / peak:.1%}")


if __name__ == "__main__":
    main()
