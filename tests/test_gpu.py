"""The default configuration on a GPU, and EMA's fused kernels compiled for it. Skipped without
CUDA; run on a GPU machine with

    EMA_TEST_GPU=1 python -m pytest -q tests/test_gpu.py

(only this file: the rest of the suite is meant for the CPU)."""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import models
import utils
from models.attention import ema_fused
from models.attention.ema import FoldedEMA
from training import ema_kernels, loaders
from training.speed import SpeedSettings, native_cuda_bf16

import train_cifar100
from fake_cifar import write_fake_cifar100
from test_loader import MEAN, STD, random_batch, torchvision_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA and EMA_TEST_GPU=1 (docs/speed.md: The GPU "
                                       "check)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def kernel_verdicts(tmp_path_factory):
    """The trainer's EMA kernel verdicts in a folder of this run (tests/gpu_check.sh gives one),
    not the user's cache."""
    if "XDG_CACHE_HOME" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # Two full batches of the default 128, and two test batches of 256: evaluation's graph is
    # recorded in the first epoch and replayed in the second.
    return write_fake_cifar100(tmp_path_factory.mktemp("data"), n_train=256, n_test=512)


def outputs(base, run):
    return ["--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs"),
            "--run-name", run]


def test_defaults_resolve_to_compiled_graphs_bf16_and_the_measured_layout():
    device = torch.device("cuda")
    speed = SpeedSettings.resolve(device)
    assert speed.compile and speed.channels_last and speed.cuda_graphs
    assert speed.amp == ("bf16" if native_cuda_bf16(device) else "fp16")
    assert not SpeedSettings.resolve(device, attention="ema").channels_last


def test_ema_returns_the_input_dtype_under_cuda_autocast():
    """CUDA's autocast runs GroupNorm and softmax in float32; EMA still hands back the input's
    dtype, as the authors' does (its matmuls run in it), close to theirs."""

    torch.manual_seed(0)
    ours = models.attention.EMA(256).cuda()
    upstream = FoldedEMA(256).cuda()
    upstream.load_state_dict(ours.state_dict())
    amp = SpeedSettings.resolve(torch.device("cuda")).amp_dtype
    x = torch.randn(4, 256, 16, 16, device="cuda", dtype=amp)
    with torch.autocast("cuda", dtype=amp):
        out, expected = ours(x), upstream(x)
    assert out.dtype == expected.dtype == amp
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)


def test_default_configuration_trains_without_syncs_inside_steps(data_root, tmp_path, monkeypatch):
    """ResNet50 + EMA as `python train_cifar100.py --b 128` runs it. The first epoch compiles and
    captures the CUDA graphs; in the second, which replays them, CUDA's sync debug mode reports any
    step that waits for the GPU (checks excepted)."""
    synced = []
    original_epoch = train_cifar100.Trainer.train_epoch
    original_check = train_cifar100.Trainer.check

    def train_epoch(self, stop):
        if self.epoch == 0:
            return original_epoch(self, stop)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original_epoch(self, stop)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                synced.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(
                    w.message))

    def check(self, *args):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return original_check(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(train_cifar100.Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(train_cifar100.Trainer, "check", check)
    assert train_cifar100.main(["--b", "128", "--epochs", "2", "--data", str(data_root)]
                               + outputs(tmp_path, "gpu")) == 0
    checkpoint = torch.load(tmp_path / "checkpoint/resnet50_ema/gpu/last.pth", weights_only=True)
    args = checkpoint["args"]
    assert (args["compile"], args["cuda_graphs"], args["channels_last"],
            args["loader"]) == (True, True, False, "device")
    assert args["amp"] == ("bf16" if native_cuda_bf16(torch.device("cuda")) else "fp16")
    assert all(math.isfinite(row["train_loss"]) for row in checkpoint["history"])
    assert synced == []


def test_device_loader_equals_torchvision_on_cuda():
    images, offsets, flips, angles = (t.cuda() for t in random_batch(64, seed=2))
    out = loaders.augment(images, offsets, flips, angles, MEAN.cuda(), STD.cuda())
    for i in range(len(images)):
        top, left = offsets[i].tolist()
        expected = torchvision_tensor(images[i], top, left, bool(flips[i]), float(angles[i]))
        assert torch.equal(out[i], expected), (i, int((out[i] != expected).sum()))


def test_gpu_checkpoint_resumes_on_the_cpu_and_gate_images_with_workers(data_root, tmp_path):
    tiny = ["-net", "resnet18", "-att", "ema", "-b", "64", "--data", str(data_root), "--no-compile"]
    assert train_cifar100.main(tiny + ["--epochs", "1", "--loader", "workers", "--workers", "2",
                                       "--gate-images", "1"] + outputs(tmp_path, "move")) == 0
    folder = tmp_path / "checkpoint/resnet18_ema/move"
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "EMA_TEST_GPU": "0"}
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar100.py"), "--resume",
                             str(folder), "--epochs", "2", "--log-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, env=cpu_only, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "device cuda -> cpu" in result.stdout
    assert torch.load(folder / "last.pth", weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------- EMA's fused kernels
# (ema_fused.py)

fused_needs_triton = pytest.mark.skipif(not ema_fused.available(), reason="Triton is not installed")
RESNET50_EMA_INPUTS = [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]


def fused_and_reference(c, seed=0):
    """EMA with random weights on the fused path, and the same weights on the PyTorch path in
    float64."""
    torch.manual_seed(seed)
    fused = models.attention.EMA(c, fused=True).cuda()
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.5)
    reference = models.attention.EMA(c, fused=False).cuda().double()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def relative_errors(module, reference, x, grad):
    """Relative error (norm of the difference / norm of the reference) of the output, the input's
    gradient and each parameter's, against the float64 reference."""
    results = []
    for m, inputs, g in ((module, x, grad), (reference, x.double(), grad.double())):
        m.zero_grad(set_to_none=True)
        inputs = inputs.detach().clone().requires_grad_()
        out = m(inputs)
        out.backward(g)
        results.append([out, inputs.grad] + [p.grad for p in m.parameters()])
    return [((got.double() - want).norm() / want.norm()).item() for got, want in zip(*results)]


@pytest.mark.parametrize("amp, tolerance", [(None, 1e-4), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", RESNET50_EMA_INPUTS)
def test_compiled_ema_against_the_authors_in_float64(shape, amp, tolerance):
    """EMA's PyTorch path as the trainer runs it on CUDA (torch.compile, autocast): its 3x3 branch
    by algebra, nine tap sums compiled by Inductor, against the authors' formulation in float64."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ema = models.attention.EMA(shape[0], fused=False).cuda()
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_(0, 0.5)
    reference = FoldedEMA(shape[0]).cuda().double()
    reference.load_state_dict(ema.state_dict())
    x = torch.randn(8, *shape, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    with torch.autocast("cuda", amp or torch.float32, enabled=amp is not None):
        out = torch.compile(ema, dynamic=False)(x)
    out.backward(grad.to(out.dtype))
    x64 = x.detach().double().requires_grad_()
    want = reference(x64)
    want.backward(grad.double())
    got = [out, x.grad] + [p.grad for p in ema.parameters()]
    wanted = [want, x64.grad] + [p.grad for p in reference.parameters()]
    errors = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, wanted)]
    assert max(errors) <= tolerance, errors


@fused_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", RESNET50_EMA_INPUTS + [(192, 16, 16), (576, 4, 4), (96, 5, 9)])
def test_fused_ema_against_float64(shape, dtype):
    """ResNet50's shapes, two of MobileNetV2's (k = 6 and 18) and an odd one, within the
    tolerance the trainer's own check uses (training/ema_kernels.py)."""
    fused, reference = fused_and_reference(shape[0])
    x = torch.randn(8, *shape, device="cuda", dtype=dtype)
    errors = relative_errors(fused, reference, x, torch.randn_like(x))
    assert max(errors) <= ema_kernels.TOLERANCE[str(dtype).split(".")[-1]], errors


@fused_needs_triton
def test_the_choice_on_this_gpu_checks_and_times_both_paths():
    """The trainer's check in its child process, at ResNet50's shapes in the default settings
    (measured by the default configuration's run above, if it ran: the same cache): the kernels
    pass it at every shape, and both paths are timed (which is faster, benchmark.py reports)."""
    speed = SpeedSettings.resolve(torch.device("cuda"), attention="ema")
    dtype = str(speed.amp_dtype).split(".")[-1]
    items = [ema_kernels.EmaInput(*shape, 32, dtype) for shape in RESNET50_EMA_INPUTS]
    verdicts, _ = ema_kernels.cached_or_measured(items, 128, speed, utils.Distributed())
    for name, verdict in verdicts.items():
        assert verdict.error is None, f"{name}: {verdict.error}"
        assert verdict.triton_ms > 0 and verdict.pytorch_ms > 0


@fused_needs_triton
def test_fused_ema_takes_channels_last_and_repeats_its_gradients_bitwise():
    fused, reference = fused_and_reference(256)
    x = torch.randn(8, 256, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    assert max(relative_errors(fused, reference, x, grad)) <= 1e-4
    runs = []
    for _ in range(2):
        fused.zero_grad(set_to_none=True)
        fused(x).backward(grad)
        runs.append([p.grad.clone() for p in fused.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@fused_needs_triton
def test_fused_ema_under_compile_and_cuda_graphs():
    fused, _ = fused_and_reference(512)
    x = torch.randn(16, 512, 16, 16, device="cuda", dtype=torch.bfloat16)
    eager = fused(x)
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    # the first call runs eagerly, the second records the graph, the third replays it
    for _ in range(3):
        out = compiled(x)
    torch.testing.assert_close(out.float(), eager.float(), rtol=0, atol=0)


@fused_needs_triton
def test_two_epochs_fused_and_unfused_agree(data_root, tmp_path):
    """ResNet18 + EMA, same seed, two epochs each way: the final losses within bf16 noise."""
    losses = {}
    for fused in (False, True):
        run = f"fused-{fused}"
        assert train_cifar100.main(["-net", "resnet18", "-att", "ema", "-b", "64", "--epochs", "2",
                                    "--ema-kernel", "triton" if fused else "pytorch",
                                    "--data", str(data_root)] + outputs(tmp_path, run)) == 0
        history = torch.load(tmp_path / f"checkpoint/resnet18_ema/{run}/last.pth",
                             weights_only=True)["history"]
        losses[fused] = [row["train_loss"] for row in history]
    assert losses[True] == pytest.approx(losses[False], rel=0.05), losses


def test_deterministic_runs_agree_bitwise(data_root, tmp_path):
    """--deterministic in the default configuration (compiled, CUDA graphs, bf16): two runs of one
    command end with bitwise-equal weights."""
    weights = []
    try:
        for run in ("first", "second"):
            assert train_cifar100.main(["-net", "resnet18", "-att", "ema", "-b", "64", "--epochs",
                                        "2", "--deterministic",
                                        "--data", str(data_root)] + outputs(tmp_path, run)) == 0
            weights.append(torch.load(tmp_path / f"checkpoint/resnet18_ema/{run}/last.pth",
                                      weights_only=True)["model"])
    finally:  # the flags are the process's: the other tests run as the trainer does by default
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert weights[0].keys() == weights[1].keys()
    different = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
