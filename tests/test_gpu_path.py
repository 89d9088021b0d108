"""What makes the GPU path fast and safe, checked on the CPU: no host synchronisation inside
training steps, no graph breaks under torch.compile, EMA keeping channels_last, static graphs
compiled once per run, resumes that change device, loader, precision or layout, fp16 overflow vs
divergence."""
import shutil

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
import training.speed
from models.attention import ATTENTIONS, EMA
from models.attention.ema import FoldedEMA
from models.resnet import RESNETS, BasicBlock, Bottleneck, ResNet
from training import engine
from training.speed import COMPILE_OPTIONS, HostSyncCounter, SpeedSettings, graph_breaks

import train_cifar100
from conftest import SMALL_RUN
from fake_cifar import write_fake_cifar100
from tiny_net import NET


def train(data, base, run, *extra):
    return train_cifar100.main(SMALL_RUN + ["--seed", "0", "--data", str(data), "--run-name", run,
                                            "--checkpoint-dir", str(base / "checkpoint"),
                                            "--log-dir", str(base / "runs")] + list(extra))


def last_checkpoint(base, run):
    return torch.load(base / "checkpoint" / f"{NET}_ema" / run / "last.pth", weights_only=True)


def test_no_host_synchronisation_inside_training_steps(small_data, tmp_path, monkeypatch):
    """Between two checks a step neither reads a device value nor builds a tensor from Python
    values."""
    calls, checked_at = [], []
    counter = HostSyncCounter()
    original_epoch = train_cifar100.Trainer.train_epoch
    original_check = train_cifar100.Trainer.check

    def train_epoch(self, stop):
        with counter:
            try:
                return original_epoch(self, stop)
            finally:
                calls.extend(counter.calls)

    def check(self, *args):
        counter.paused = True  # the check is where reading is allowed
        try:
            checked_at.append(self.step)
            return original_check(self, *args)
        finally:
            counter.paused = False

    monkeypatch.setattr(train_cifar100.Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(train_cifar100.Trainer, "check", check)
    monkeypatch.setattr(train_cifar100, "CHECK_EVERY", 3)
    assert train(small_data, tmp_path, "sync", "--epochs", "1", "-b", "4") == 0  # 4 steps
    assert checked_at == [3, 4]
    assert calls == []


def test_the_sync_counter_sees_what_it_must():
    with HostSyncCounter() as counter:
        x = torch.ones(3)
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        torch.tensor([1.0])
    assert counter.calls == ["item", "__bool__", "tolist", "tensor"]


def test_every_block_and_attention_compiles_without_graph_breaks():
    """Every ResNet is made of BasicBlocks or Bottlenecks: a one-block-per-stage ResNet of each
    kind, without attention and with EMA, runs the same code as the deep ones, and each other
    attention module is traced in both kinds of block. MobileNetV2 with EMA (its own placement rule)
    and without."""
    assert {spec.block for spec in RESNETS.values()} == {BasicBlock, Bottleneck}
    speed = SpeedSettings(torch.device("cpu"))
    images, features = torch.randn(2, 3, 32, 32), torch.randn(2, 64, 8, 8)
    traced = {("mobilenetv2", attention): (models.create_model("mobilenetv2", attention), images)
              for attention in (None, "ema")}
    for block in (BasicBlock, Bottleneck):
        for attention in (None, "ema"):
            constructor = ATTENTIONS[attention] if attention else None
            traced[(block.__name__, attention)] = (ResNet(block, (1, 1, 1, 1), 100, constructor),
                                                   images)
        for attention in set(ATTENTIONS) - {"ema"}:
            traced[(block.__name__, attention)] = (block(64, 64, 1, ATTENTIONS[attention]),
                                                   features)
    assert len(traced) == 2 + 2 * len(ATTENTIONS) + 2
    for (name, attention), (net, inputs) in traced.items():
        torch._dynamo.reset()
        graphs, breaks, reason = graph_breaks(net, inputs, speed)
        assert (graphs, breaks) == (1, 0), (name, attention, reason)


class LayoutCopies(TorchDispatchMode):
    """The copies made of tensors of at least `size` elements (x's: a copy into another layout)."""
    COPIES = {"aten.clone.default", "aten._to_copy.default", "aten.copy_.default"}

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __enter__(self):
        self.copies = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.COPIES and args[0].numel() >= self.size:
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ema_keeps_the_layout_and_equals_the_folded_computation(memory_format):
    """No copy of x, or of anything its size, in another layout (the small strips may be); and the
    output in x's layout."""
    torch.manual_seed(0)
    ours = EMA(64, 8).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    folded = FoldedEMA(64, 8).double()  # the authors' (B*G, k, H, W) formulation
    folded.load_state_dict(ours.state_dict())
    x = torch.randn(3, 64, 6, 5,
                    dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    with LayoutCopies(x.numel()) as layout:
        out = ours(x)
    assert layout.copies == [] and out.is_contiguous(memory_format=memory_format)
    with LayoutCopies(x.numel()) as folded_layout:
        expected = folded(x)
    # The check can fail: the authors' fold copies a channels_last x.
    assert bool(folded_layout.copies) == (memory_format == torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [x, *ours.parameters()], grad_out)
    folded_grads = torch.autograd.grad(expected, [x, *folded.parameters()], grad_out)
    for got, want in zip(ours_grads, folded_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_compiled_training_makes_each_graph_once(small_data, tmp_path, monkeypatch):
    """Full and partial training batches and the test batches: each static graph made in the first
    epoch, none in the second (backend "eager": dynamo's graphs without inductor's minutes)."""
    monkeypatch.setattr(training.speed, "COMPILE_OPTIONS", {**COMPILE_OPTIONS, "backend": "eager"})
    graphs_after = []
    original = train_cifar100.Trainer.end_epoch

    def end_epoch(self):
        original(self)
        graphs_after.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    monkeypatch.setattr(train_cifar100.Trainer, "end_epoch", end_epoch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # 16 training images in batches of 12: a full one and one of 4; the 16 test images fit one test
    # batch: three graphs.
    assert train(small_data, tmp_path, "compiled", "--epochs", "2", "--compile", "-b", "12") == 0
    assert graphs_after == [3, 3]


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    """A one-epoch SMALL_RUN on 4 images in one batch: fp16, emulated on CPUs, costs seconds an
    image."""
    base = tmp_path_factory.mktemp("tiny")
    data = write_fake_cifar100(base / "data", n_train=4, n_test=4)
    assert train(data, base, "run", "--epochs", "1", "-b", "4") == 0
    return base


def fresh_run(finished_tiny_run, base):
    shutil.copytree(finished_tiny_run / "checkpoint", base / "checkpoint")


@pytest.mark.parametrize("override", [
    ["--amp", "fp16"],
    ["--amp", "bf16"],
    ["--loader", "workers"],
    ["--channels-last"],
])
def test_every_allowed_override_resumes(override, finished_tiny_run, tmp_path, capsys):
    fresh_run(finished_tiny_run, tmp_path)
    capsys.readouterr()
    folder = tmp_path / "checkpoint" / f"{NET}_ema" / "run"
    assert train_cifar100.main(["--resume", str(folder), "--epochs", "2", "--log-dir",
                                str(tmp_path / "runs"), *override]) == 0
    out = capsys.readouterr().out
    assert "not bitwise" in out
    checkpoint = last_checkpoint(tmp_path, "run")
    assert checkpoint["epoch"] == 2
    assert all(
        torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_a_gpu_checkpoint_resumes_on_the_cpu(finished_tiny_run, tmp_path, capsys):
    """A checkpoint written on CUDA by the old format (one CUDA RNG state per visible GPU, a CUDA
    loader generator) or by this one (device "cuda") continues here, and says it is not bitwise."""
    fresh_run(finished_tiny_run, tmp_path)
    path = tmp_path / "checkpoint" / f"{NET}_ema" / "run" / "last.pth"
    new_format = last_checkpoint(tmp_path, "run")
    new_format["device"] = "cuda"
    new_format["args"]["cuda_graphs"] = True
    old_format = last_checkpoint(tmp_path, "run")
    old_format.update(format=1, rng={"torch": torch.get_rng_state(),
                                     "loader": torch.zeros(16, dtype=torch.uint8),
                                     "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4})
    del old_format["device"], old_format["world"]
    for checkpoint, expected in ((new_format, ("device cuda -> cpu",
                                               "CUDA graphs off: they need a CUDA device")),
                                 (old_format, ("format-1",))):
        torch.save(checkpoint, path)
        capsys.readouterr()
        assert train_cifar100.main(["--resume", str(path), "--epochs", "2", "--log-dir",
                                    str(tmp_path / "runs")]) == 0
        out = capsys.readouterr().out
        assert all(line in out for line in expected), out
        resumed = last_checkpoint(tmp_path, "run")
        assert resumed["epoch"] == 2
        # Recorded as asked, not as resolved here: back on a GPU, the run has its CUDA graphs again.
        assert resumed["args"]["cuda_graphs"] == checkpoint["args"].get("cuda_graphs")


def losses(*values):
    return [torch.tensor(v) for v in values]


def test_loss_watch_calls_divergence_only_what_fp16_would_not_skip():
    nan, inf = float("nan"), float("inf")
    strict = engine.LossWatch(tolerated=0)
    for step, loss in enumerate(losses(1.0, 2.0, nan, 1.0)):
        strict.add(loss, step)
    assert strict.diverged_at() == 3  # 1-based: the third step

    fp16 = engine.LossWatch(tolerated=2)  # the scaler may skip up to 2 overflowing steps in a row
    for step, loss in enumerate(losses(1.0, inf, inf, 1.0)):
        fp16.add(loss, step)
    assert fp16.diverged_at() is None
    for step, loss in enumerate(losses(inf, 2.0, inf), 4):
        fp16.add(loss, step)
    assert fp16.diverged_at() is None
    for step, loss in enumerate(losses(nan, nan), 7):  # three in a row across two checks: steps 7-9
        fp16.add(loss, step)
    assert fp16.diverged_at() == 7


def test_cuda_defaults_follow_the_measurements():
    """Resolved without touching CUDA (amp given): compiled, channels_last except with EMA."""
    cuda = torch.device("cuda")
    speed = SpeedSettings.resolve(cuda, amp="bf16", attention="none")
    assert speed.compile and speed.channels_last
    assert not SpeedSettings.resolve(cuda, amp="bf16", attention="ema").channels_last
    cpu = SpeedSettings.resolve(torch.device("cpu"), attention="none")
    assert not cpu.compile and not cpu.channels_last


def test_cuda_graphs_only_where_they_apply(monkeypatch):
    """On by default with --compile on one CUDA device; off, even when asked, without compiling, on
    the CPU, or under torchrun. On, the model is compiled in the mode that captures CUDA graphs."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert SpeedSettings.resolve(cuda, amp="bf16").cuda_graphs
    assert not SpeedSettings.resolve(cuda, amp="bf16", cuda_graphs=False).cuda_graphs
    assert not SpeedSettings.resolve(cuda, amp="bf16", compile=False, cuda_graphs=True).cuda_graphs
    assert not SpeedSettings.resolve(cuda, amp="bf16", cuda_graphs=True, processes=2).cuda_graphs
    assert not SpeedSettings.resolve(cpu, compile=True, cuda_graphs=True).cuda_graphs
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **options: modes.append(mode)
                        or model)
    SpeedSettings(cuda, "bf16", compile=True, cuda_graphs=True).compiled(nn.Identity())
    SpeedSettings(cuda, "bf16", compile=True).compiled(nn.Identity())
    assert modes == ["reduce-overhead", None]
