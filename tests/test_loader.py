"""The device-resident data path against torchvision, the speed options, and benchmark.py."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from conf import settings
from models.attention import EMA
from training import cifar, loaders
from training.speed import SpeedSettings, native_cpu_bf16

import benchmark
import train_cifar100
from fake_cifar import write_fake_cifar100
from tiny_net import NET

CLASSIC = settings.RECIPES["classic"]
MEAN, STD = torch.tensor(CLASSIC["mean"]), torch.tensor(CLASSIC["std"])


def random_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    angles = torch.empty(n).uniform_(-15, 15, generator=g)
    return images, offsets, flips, angles


def torchvision_pil(image, top, left, flip, angle):
    """torchvision's PIL pipeline with these parameters: pad, crop, flip, rotate, ToTensor,
    Normalize."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil = TF.crop(TF.pad(pil, 4), top, left, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    if angle is not None:
        pil = TF.rotate(pil, angle, interpolation=InterpolationMode.NEAREST)
    return TF.normalize(TF.to_tensor(pil), CLASSIC["mean"], CLASSIC["std"])


def torchvision_tensor(image, top, left, flip, angle):
    """The same pipeline through torchvision's tensor implementations."""
    x = TF.crop(TF.pad(image, [4]), top, left, 32, 32)
    if flip:
        x = TF.hflip(x)
    if angle is not None:
        x = TF.rotate(x, angle, interpolation=InterpolationMode.NEAREST)
    return TF.normalize(x.float().div(255), CLASSIC["mean"], CLASSIC["std"])


def test_crop_and_flip_equal_torchvision_exactly():
    images, offsets, flips, _ = random_batch(64)
    out = loaders.augment(images, offsets, flips, None, MEAN, STD)
    assert flips.any() and not flips.all()
    for i in range(len(images)):
        top, left = offsets[i].tolist()
        assert torch.equal(out[i], torchvision_pil(images[i], top, left, bool(flips[i]), None)), i


def test_rotation_equals_torchvision():
    images, offsets, flips, angles = random_batch(64, seed=1)
    out = loaders.augment(images, offsets, flips, angles, MEAN, STD)
    differing = 0
    for i in range(len(images)):
        top, left = offsets[i].tolist()
        args = (images[i], top, left, bool(flips[i]), float(angles[i]))
        assert torch.equal(out[i], torchvision_tensor(*args)), i
        differing += (out[i] != torchvision_pil(*args)).any(0).sum().item()
    # PIL's own nearest rotation rounds a few boundary pixels differently from torchvision's tensor
    # one.
    assert differing / (64 * 32 * 32) < 1e-3


def test_random_parameters_have_torchvision_distributions():
    n = 90_000
    loader = loaders.DeviceLoader(loaders.ImageArray(np.zeros((n, 32, 32, 3), np.uint8), [0] * n),
                                  128, CLASSIC, torch.device("cpu"),
                                  torch.Generator().manual_seed(0))
    order, offsets, flips, angles = loader.epoch_parameters()
    assert torch.equal(order.sort().values, torch.arange(n))
    # torchvision: RandomCrop offsets uniform on 0..8, flip with p = 1/2, angle uniform on (-15,
    # 15).
    crop = transforms.RandomCrop(32, padding=4)
    torchvision_offsets = {crop.get_params(torch.zeros(3, 40, 40), (32, 32))[0] for _ in range(500)}
    assert torchvision_offsets == set(range(9))
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9).float()
        assert len(counts) == 9 and torch.allclose(counts / n, torch.full((9,), 1 / 9), rtol=0.05)
    assert abs(flips.float().mean().item() - 0.5) < 0.01
    assert angles.min() >= -15 and angles.max() <= 15
    assert abs(angles.mean().item()) < 0.2
    assert abs(angles.var().item() - 15 ** 2 / 3) < 2  # variance of U(-15, 15)
    assert transforms.RandomRotation(15).degrees == [-15.0, 15.0]


def test_paper_recipe_has_no_rotation():
    loader = loaders.DeviceLoader(loaders.ImageArray(np.zeros((8, 32, 32, 3), np.uint8), [0] * 8),
                                  4, settings.RECIPES["paper"], torch.device("cpu"),
                                  torch.Generator().manual_seed(0))
    assert loader.epoch_parameters()[3] is None


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("data"), n_train=100, n_test=50)


def test_device_loader_is_seeded_and_covers_the_epoch(data_root):
    dataset = cifar.CIFAR100Folder(data_root, train=True)

    def epochs(seed):
        loader = loaders.make_loader("device", dataset, 32, CLASSIC, torch.device("cpu"), True,
                                     generator=torch.Generator().manual_seed(seed))
        return [list(loader) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert [len(b[0]) for b in first[0]] == [32, 32, 32, 4]
    assert sorted(torch.cat([b[1] for b in first[0]]).tolist()) == sorted(dataset.targets)
    same = lambda a, b: all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                            for x, y in zip(a, b))
    assert same(first[0], again[0]) and same(first[1], again[1])
    assert not same(first[0], first[1]) and not same(first[0], other[0])
    # Starting an epoch at step 2 gives the same batches as running through steps 0 and 1.
    loader = loaders.make_loader("device", dataset, 32, CLASSIC, torch.device("cpu"), True,
                                 generator=torch.Generator().manual_seed(0))
    skipped = [batch for _, batch in loaders.batches(loader, 2)]
    assert same(skipped, first[0][2:])


def test_device_and_workers_test_loaders_agree(data_root):
    dataset = cifar.CIFAR100Folder(data_root, train=False)
    device = list(loaders.make_loader("device", dataset, 16, CLASSIC, torch.device("cpu"), False))
    workers = list(loaders.make_loader("workers", dataset, 16, CLASSIC, torch.device("cpu"), False))
    assert len(device) == len(workers) == 4
    for (a, la), (b, lb) in zip(device, workers):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_bf16_and_channels_last_training(small_data, tmp_path):
    argv = ["-net", NET, "-att", "ema", "-b", "8", "--epochs", "1", "--data", str(small_data),
            "--amp", "bf16", "--channels-last", "--checkpoint-dir", str(tmp_path / "c"),
            "--log-dir", str(tmp_path / "r"),
            "--run-name", "fast"]
    assert train_cifar100.main(argv) == 0
    checkpoint = torch.load(tmp_path / f"c/{NET}_ema/fast/last.pth", weights_only=True)
    assert checkpoint["args"]["amp"] == "bf16" and checkpoint["args"]["channels_last"] is True
    assert all(
        torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    # autocast keeps fp32 weights
    assert checkpoint["model"]["layer1.0.residual.0.weight"].dtype == torch.float32


def test_speed_settings_step():
    speed = SpeedSettings(torch.device("cpu"), amp="bf16", channels_last=True)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=speed.memory_format)
    images = speed.inputs(torch.randn(2, 3, 8, 8))
    assert images.is_contiguous(memory_format=torch.channels_last)
    with speed.autocast():
        out = conv(images)
    assert out.dtype == torch.bfloat16
    assert not speed.grad_scaler().is_enabled()
    assert SpeedSettings(torch.device("cpu"), amp="fp16").grad_scaler().is_enabled()
    resolved = SpeedSettings.resolve(torch.device("cpu"))
    assert resolved.amp == ("bf16" if native_cpu_bf16() else "off") and not resolved.channels_last


def test_compile_matches_eager_within_bf16_tolerance():
    speed = SpeedSettings(torch.device("cpu"), amp="bf16")
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def losses(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                              EMA(32, 8),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        step_model = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for _ in range(3):
            with speed.autocast():
                loss = nn.functional.cross_entropy(step_model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=1e-2)  # bf16 keeps 8 bits of mantissa


def test_benchmark_prints_every_part(capsys):
    assert benchmark.main(["-net", NET, "-att", "ema", "-b", "4", "--steps", "1", "--warmup", "1",
                           "--data", "/nonexistent", "--profile"]) == 0
    out = capsys.readouterr().out
    for line in ("workers loader (0 workers)", "device / workers per core",
                 "classic      workers loader, fp32",
                 "eager        device loader", "x classic", "random images of CIFAR's shape",
                 "host synchronisations per training step: 0\n", "0 graph break(s)",
                 "ATen ops per training step",
                 "Self CPU time total", "EMA alone as trained (",
                 "contiguous, eager), forward + backward, batch 4",
                 "input (32, 32, 32)    x  1 module", "input (256, 4, 4)     x  1 module",
                 "all 4 modules:", "the eager training step above:",
                 "EMA alone against the authors' formulation (FoldedEMA), eager, fp32, forward + "
                 "backward, batch 16",
                 f"result: EMA alone | eager | {NET} x 4 | batch 16 | authors/ours "):
        assert line in out, out
    assert "compiled, fp32" not in out  # on the CPU, with --ema-alone only
    assert (f"result: {NET} + ema | classic | batch 4 | " in out and "images/s | " in out
            and " | commit " in out)


def test_benchmark_ema_alone_eager_and_compiled(capsys, monkeypatch):
    """--ema-alone: EMA against the authors' formulation, eager and compiled (here traced with the
    aot_eager backend: the graphs without Inductor's minutes of C++)."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda module, **kw: compile(module, **{**kw, "backend": "aot_eager"}))
    assert benchmark.main(["-net", NET, "--ema-alone", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for mode in ("eager", "compiled"):
        assert f"EMA alone against the authors' formulation (FoldedEMA), {mode}, fp32" in out, out
        assert f"result: EMA alone | {mode} | {NET} x 4 | batch 16 | authors/ours " in out, out
    assert out.count("input (256, 4, 4)     x  1 module   ours ") == 2
    assert "training (images/s" not in out  # nothing else


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_benchmark_refuses_cuda_graphs_without_cuda_or_warm_up(capsys):
    assert benchmark.main(["-net", "resnet18", "--configs", "classic", "graphs"]) == 2
    assert "need a CUDA device; this machine has cpu only" in capsys.readouterr().err
    # the graphs' recording would fall inside the timed steps
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["-net", "resnet18", "--configs", "graphs", "--warmup", "1"])
    assert refused.value.code == 2 and "--warmup must be 2 or more" in capsys.readouterr().err


def test_benchmark_times_the_tables_rows_in_the_trainers_defaults(capsys):
    args = benchmark.parse_args(["-b", "4", "--steps", "1", "--warmup", "1", "--table-rows",
                                 "--seeds", "2"])
    benchmark.time_table_rows(args, torch.device("cpu"),
                              rows=[("resnet18", "none"), ("resnet18", "ema")])
    out = capsys.readouterr().out
    assert out.count("result: resnet18 + ") == 2 and "| default | batch 4 |" in out
    assert ("the table: 2 rows x 2 seeds = " in out
            and "below half their network's baseline rate: " in out)
