"""training/ema_kernels.py: EMA's path chosen by measurement on the GPU a run trains on. Without a
GPU, the child process's verdicts are simulated (faster, slower, a failed check, a crash, a hang)
on a CUDA device that only the selection sees (the model runs on the CPU), and the cache's keys are
checked; the real child runs once, under Triton's interpreter on the CPU; and --ema-kernel is
tried on the trainer."""
import json
import subprocess

import pytest
import torch

import train_cifar100
from models.attention import ema_fused
from models.attention.ema import EMA
from training import ema_kernels
from training.ema_kernels import EmaInput, Verdict
from training.speed import SpeedSettings
from utils import Distributed, UserError

from conftest import SMALL_RUN

CUDA = SpeedSettings(torch.device("cuda"))  # never runs anything: the model stays on the CPU
REAL_MACHINE_KEY = ema_kernels.machine_key
KEY = {"gpu": "NVIDIA Test GPU", "capability": "9.0", "torch": "2.11.0", "triton": "3.6.0",
       "kernels": "0123456789abcdef"}


class TwoEmas(torch.nn.Module):
    """Two EMA inputs: 16 channels at 4x4 and 32 at 2x2, groups of 2 and 4."""

    def __init__(self):
        super().__init__()
        self.first, self.second = EMA(16, 2), EMA(32, 4)
        self.widen = torch.nn.Conv2d(16, 32, 1, stride=2)

    def forward(self, x):
        return self.second(self.widen(self.first(x)))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Each test with its own cache folder, an empty CHOSEN, and the machine key above."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ema_fused, "CHOSEN", {})
    monkeypatch.setattr(ema_kernels, "machine_key", lambda device: dict(KEY))


def images():
    return torch.randn(2, 16, 4, 4)


def simulated_child(monkeypatch, verdicts, returncode=0, hang=False):
    """subprocess.run stands in for the child: for each input asked, in order, the verdict fields
    of `verdicts` (None: the child stopped before it); returns the list of requests it got."""
    requests = []

    def run(command, **kwargs):
        request = json.loads(command[-1])
        requests.append(request)
        lines = []
        for item, fields in zip(request["items"], verdicts):
            if fields is None:
                break
            name = ema_kernels.key_of(EmaInput(*item), request["batch"], CUDA)
            lines.append(ema_kernels.VERDICT_PREFIX + json.dumps([name, fields]))
        output = "\n".join(lines) + "\n"
        if hang:
            raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=output.encode())
        return subprocess.CompletedProcess(command, returncode, output,
                                           "Fatal Python error: Segmentation fault\n")

    monkeypatch.setattr(ema_kernels.subprocess, "run", run)
    return requests


def choose(mode="auto", speed=CUDA):
    model = TwoEmas()
    return ema_kernels.choose(model, images, mode, speed, 8, Distributed()), model


def test_the_faster_correct_path_is_taken_at_each_shape_and_cached(monkeypatch, tmp_path):
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.5, "pytorch_ms": 0.8},
                                             {"triton_ms": 0.9, "pytorch_ms": 0.4}])
    (line,), _ = choose()
    assert ema_fused.CHOSEN == {(16, 4, 4, 2, "float32"): True, (32, 2, 2, 4, "float32"): False}
    assert line.startswith("EMA: the Triton kernels at 1 of 2 input shapes")
    assert "16x4x4 Triton (0.500 ms Triton, 0.800 ms PyTorch)" in line
    assert "32x2x2 PyTorch (0.900 ms Triton, 0.400 ms PyTorch)" in line
    assert "measured now on this GPU for 2 of 2 shapes" in line and "batch 8" in line
    assert len(requests) == 1 and requests[0]["batch"] == 8
    cached = list((tmp_path / "cache" / "ema-cifar100").glob("ema-kernels-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["key"] == KEY
    # The second run on this GPU measures nothing.
    ema_fused.CHOSEN.clear()
    (line,), _ = choose()
    assert len(requests) == 1 and f"cached in {cached[0]}" in line
    assert ema_fused.CHOSEN[(16, 4, 4, 2, "float32")] is True


@pytest.mark.parametrize("changed", ["gpu", "capability", "torch", "triton", "kernels"])
def test_another_gpu_torch_triton_or_kernel_source_measures_again(monkeypatch, changed):
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.5, "pytorch_ms": 0.8}] * 2)
    choose()
    monkeypatch.setattr(ema_kernels, "machine_key", lambda device: {**KEY, changed: "other"})
    choose()
    assert len(requests) == 2


def test_the_key_names_the_gpu_the_versions_and_the_kernels_source(monkeypatch, tmp_path):
    import triton
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    key = REAL_MACHINE_KEY(torch.device("cuda"))
    assert {k: key[k] for k in ("gpu", "capability", "torch", "triton")} == {
        "gpu": "NVIDIA H200", "capability": "9.0", "torch": torch.__version__,
        "triton": triton.__version__}
    edited = tmp_path / "ema_fused.py"  # the kernels' source, one character changed
    edited.write_text(open(ema_fused.__file__).read() + "\n")
    monkeypatch.setattr(ema_fused, "__file__", str(edited))
    assert REAL_MACHINE_KEY(torch.device("cuda"))["kernels"] != key["kernels"]
    assert ema_kernels.cache_file(key) != ema_kernels.cache_file({**key, "kernels": "x"})
    assert ema_kernels.cache_file(key) == ema_kernels.cache_file(dict(reversed(key.items())))


def test_a_failed_check_a_crash_and_a_hang_mean_the_pytorch_path_and_say_why(monkeypatch):
    simulated_child(monkeypatch, [{"error": "output off by 3.0e-01 (relative; allowed 1e-02)"},
                                  {"triton_ms": 0.1, "pytorch_ms": 0.8}])
    (line,), _ = choose()
    assert ema_fused.CHOSEN == {(16, 4, 4, 2, "float32"): False, (32, 2, 2, 4, "float32"): True}
    assert "16x4x4 PyTorch (not the kernels: output off by 3.0e-01" in line
    # A crash after the first verdict: the second shape is against the kernels, with the reason.
    monkeypatch.setenv("XDG_CACHE_HOME", str(ema_kernels.cache_file(KEY).parents[2] / "other"))
    simulated_child(monkeypatch, [{"triton_ms": 0.1, "pytorch_ms": 0.8}, None], returncode=-11)
    (line,), _ = choose()
    assert ema_fused.CHOSEN == {(16, 4, 4, 2, "float32"): True, (32, 2, 2, 4, "float32"): False}
    assert "the check crashed (exit -11: Fatal Python error: Segmentation fault)" in line
    monkeypatch.setenv("XDG_CACHE_HOME", str(ema_kernels.cache_file(KEY).parents[2] / "third"))
    simulated_child(monkeypatch, [None, None], hang=True)
    (line,), _ = choose()
    assert not any(ema_fused.CHOSEN.values())
    assert f"did not finish in {ema_kernels.CHILD_TIMEOUT} s" in line


def test_a_corrupt_or_unwritable_cache_is_measured_again_and_said(monkeypatch, tmp_path):
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.5, "pytorch_ms": 0.8}] * 2)
    path = ema_kernels.cache_file(KEY)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    choose()
    assert len(requests) == 1 and json.loads(path.read_text())["key"] == KEY
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    (tmp_path / "a file").write_text("")
    (line,), _ = choose()
    assert len(requests) == 2 and "not cached:" in line


def test_forced_paths_and_the_cpu():
    (line,), model = choose("pytorch")
    assert line == "EMA: the PyTorch path (--ema-kernel pytorch)"
    assert all(m.fused is False for m in model.modules() if isinstance(m, EMA))
    (line,), model = choose("triton", SpeedSettings(torch.device("cpu")))
    assert line == "EMA: the Triton kernels (--ema-kernel triton)"
    assert all(m.fused is True for m in model.modules() if isinstance(m, EMA))
    assert choose("auto", SpeedSettings(torch.device("cpu")))[0] == []
    assert ema_kernels.choose(torch.nn.Linear(2, 2), images, "triton", CUDA, 8,
                              Distributed()) == []


def test_triton_where_the_kernels_cannot_run_is_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match=r"--ema-kernel triton: on the CPU the kernels run only "
                                        r"under Triton's interpreter"):
        choose("triton", SpeedSettings(torch.device("cpu")))


def test_the_verdict_decides_by_error_then_time():
    assert Verdict(0.1, 0.2).fused and not Verdict(0.2, 0.1).fused
    assert not Verdict(0.1, 0.1).fused and not Verdict(0.1, 0.2, error="crashed").fused


def test_the_real_child_under_the_interpreter():
    """The child process itself, on the CPU: the kernels checked against float64 and both paths
    timed."""
    speed = SpeedSettings(torch.device("cpu"))
    item = EmaInput(8, 3, 5, 2, "float32")
    verdicts = ema_kernels.measure([item], 2, speed)
    verdict = verdicts[ema_kernels.key_of(item, 2, speed)]
    assert verdict.error is None, verdict.error
    assert verdict.triton_ms > 0 and verdict.pytorch_ms > 0


def test_the_child_reports_a_failed_check():
    """A kernel that computes something else: the child's verdict names what is off."""
    speed = SpeedSettings(torch.device("cpu"))
    item = EmaInput(8, 3, 5, 2, "float32")
    original = ema_kernels.TOLERANCE["float32"]
    try:
        ema_kernels.TOLERANCE["float32"] = 0.0  # nothing passes a zero tolerance in float32
        verdict = ema_kernels.check(item, 2, speed)
    finally:
        ema_kernels.TOLERANCE["float32"] = original
    assert verdict.error and "off by" in verdict.error and verdict.triton_ms is None


def test_the_trainer_takes_ema_kernel_and_says_it(small_data, tmp_path, capsys, monkeypatch):
    """--ema-kernel recorded and said; triton where the kernels cannot run is one line, exit 2,
    nothing written. (Training through the kernels under the interpreter takes a quarter of an hour:
    their equality with the PyTorch path is tests/test_ema_fused.py's.)"""
    outputs = ["--checkpoint-dir", str(tmp_path / "checkpoint"), "--log-dir",
               str(tmp_path / "runs"), "--data", str(small_data), "--epochs", "1"]
    assert train_cifar100.main(SMALL_RUN + outputs + ["--run-name", "plain", "--ema-kernel",
                                                      "pytorch"]) == 0
    assert "EMA: the PyTorch path (--ema-kernel pytorch)" in capsys.readouterr().out
    folder = tmp_path / "checkpoint" / "resnet_tiny_ema" / "plain"
    assert json.loads((folder / "args.json").read_text())["ema_kernel"] == "pytorch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert train_cifar100.main(SMALL_RUN + outputs + ["--run-name", "fused", "--ema-kernel",
                                                      "triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ema-kernel triton: on the CPU the kernels run only under")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoint" / "resnet_tiny_ema" / "fused").exists()


def test_crashes_and_hangs_are_checked_again_next_time_failed_comparisons_are_not(monkeypatch):
    """A crash (or an exception in the child: out of memory, say) may pass: it is not cached. A
    failed comparison with float64 is."""
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.1, "pytorch_ms": 0.8}, None],
                               returncode=-11)
    choose()
    choose()
    assert len(requests) == 2 and [len(r["items"]) for r in requests] == [2, 1]
    monkeypatch.setenv("XDG_CACHE_HOME", str(ema_kernels.cache_file(KEY).parents[2] / "other"))
    requests = simulated_child(monkeypatch, [{"error": "output off by 1.0e+00", "lasting": True},
                                             {"error": "OutOfMemoryError: ...", "lasting": False}])
    choose()
    choose()
    # both shapes, then the second only: its out-of-memory may pass
    assert [len(r["items"]) for r in requests] == [2, 1]


def test_a_malformed_child_line_or_cache_entry_is_no_verdict(monkeypatch):
    def run(command, **kwargs):
        name = ema_kernels.key_of(EmaInput(16, 4, 4, 2, "float32"), 8, CUDA)
        return subprocess.CompletedProcess(command, -9, ema_kernels.VERDICT_PREFIX + json.dumps(
            [name, {"triton_ms": 0.1}]) + "\n" + ema_kernels.VERDICT_PREFIX + '["cut sho', "")

    monkeypatch.setattr(ema_kernels.subprocess, "run", run)
    (line,), _ = choose()
    assert not any(ema_fused.CHOSEN.values()) and "the check crashed (exit -9" in line
    path = ema_kernels.cache_file(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": KEY, "verdicts": {"x": {}}}))
    assert ema_kernels.read_cache(path, KEY) == {}
    assert not Verdict().fused


def test_a_map_the_kernels_cannot_hold_is_not_measured(monkeypatch):
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.1, "pytorch_ms": 0.8}])
    monkeypatch.setattr(ema_fused, "MAX_MAP", 8)  # 16 values of a 4x4 map: too many now
    (line,), _ = choose()
    assert [len(r["items"]) for r in requests] == [1]  # the 2x2 map only
    assert "16x4x4 PyTorch (not the kernels: they cannot run here: a map of 4 x 4" in line


class Ranks:
    """A stand-in for utils.Distributed under torchrun: records the barriers."""

    def __init__(self, main):
        self.enabled, self.main, self.barriers = True, main, 0

    def barrier(self):
        self.barriers += 1


def test_under_torchrun_the_main_process_measures_and_the_others_read(monkeypatch):
    requests = simulated_child(monkeypatch, [{"triton_ms": 0.1, "pytorch_ms": 0.8}] * 2)
    main = Ranks(main=True)
    ema_kernels.choose(TwoEmas(), images, "auto", CUDA, 8, main)
    assert main.barriers == 1 and len(requests) == 1
    ema_fused.CHOSEN.clear()
    other = Ranks(main=False)
    ema_kernels.choose(TwoEmas(), images, "auto", CUDA, 8, other)
    assert other.barriers == 1 and len(requests) == 1  # read, not measured
    assert ema_fused.CHOSEN[(16, 4, 4, 2, "float32")] is True
    # Where the main process cached nothing, the others take the PyTorch path, unmeasured.
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent/cache")
    ema_fused.CHOSEN.clear()
    ema_kernels.choose(TwoEmas(), images, "auto", CUDA, 8, Ranks(main=False))
    assert ema_fused.CHOSEN == {(16, 4, 4, 2, "float32"): False, (32, 2, 2, 4, "float32"): False}


def test_the_main_process_reaches_the_barrier_when_measuring_fails(monkeypatch):
    def fail(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(ema_kernels, "measure", fail)
    main = Ranks(main=True)
    with pytest.raises(RuntimeError, match="boom"):
        ema_kernels.choose(TwoEmas(), images, "auto", CUDA, 8, main)
    assert main.barriers == 1
