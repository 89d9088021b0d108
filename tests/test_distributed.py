"""torchrun / DistributedDataParallel on the CPU (gloo), two processes, on a tiny dataset and the
suite's tiny network (tests/tiny_net.py)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test as test_script
import tiny_net
import train_cifar100
from fake_cifar import write_fake_cifar100

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-net", tiny_net.NET, "-att", "ema", "-b", "4", "-lr", "0.02", "--seed", "0"]


def torchrun(script, *args, timeout=300, env=None):
    """`script` under torchrun, each process with the tiny network registered
    (tests/tiny_net.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           tiny_net.__file__,
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 3 steps of 2 x 4
    return write_fake_cifar100(tmp_path_factory.mktemp("data"), n_train=24, n_test=8)


def test_two_processes_train_resume_and_test(data_root, tmp_path, capsys):
    outputs = ["--checkpoint-dir", str(tmp_path / "checkpoint"), "--log-dir",
               str(tmp_path / "runs"), "--run-name", "ddp"]
    first = torchrun(ROOT / "train_cifar100.py", *TINY, "--data", str(data_root), "--epochs", "1",
                     *outputs)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("epoch 1/1 ") == 1  # rank 0 alone prints
    assert "2 processes, global batch 8" in first.stdout
    assert first.stderr.count("is not the official CIFAR-100 file") == 1  # rank 0 alone

    folder = tmp_path / "checkpoint" / f"{tiny_net.NET}_ema" / "ddp"
    resumed = torchrun(ROOT / "train_cifar100.py", "--resume", str(folder), "--epochs", "2",
                       "--log-dir", str(tmp_path / "runs"))
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2/2, step 0/" in resumed.stdout and resumed.stdout.count("epoch 2/2 ") == 1

    # Only rank 0 wrote: one set of files, one TensorBoard event file per process that logged.
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "args.json", "best.pth",
                                                        "last.pth", "metrics.csv"]
    events = list((tmp_path / "runs" / f"{tiny_net.NET}_ema" / "ddp").glob("events.out.tfevents.*"))
    assert len(events) == 2  # the first launch and the resumed one, rank 0 each time
    checkpoint = torch.load(folder / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and [row["epoch"] for row in checkpoint["history"]] == [1, 2]
    assert not any(name.startswith("module.") for name in checkpoint["model"])

    # The reduced test metrics are what a single process measures on the saved weights.
    capsys.readouterr()
    assert test_script.main(["-weights", str(folder), "--data", str(data_root)]) == 0
    out = capsys.readouterr().out
    final = checkpoint["history"][-1]
    assert f"top-1 {final['test_top1']:.2f}%" in out and f"loss {final['test_loss']:.4f}" in out
    assert "8 test images" in out

    # A DDP checkpoint resumes in a single process too.
    assert train_cifar100.main(["--resume", str(folder), "--epochs", "3", "--log-dir",
                                str(tmp_path / "runs")]) == 0
    assert torch.load(folder / "last.pth", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("failure,message", [
    ("raise", "injected failure on rank 1"),
    ("nan", "the loss became NaN or infinite at epoch 1, step 3"),
])
def test_a_failing_rank_ends_the_job(failure, message, data_root, tmp_path):
    started = time.time()
    result = torchrun(ROOT / "tests" / "ddp_failing_rank.py", *TINY, "--data", str(data_root),
                      "--epochs", "2",
                      "--checkpoint-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "r"),
                      timeout=240,
                      env={"FAIL": failure})
    assert result.returncode != 0
    assert message in result.stderr
    if failure == "nan":  # every rank agrees on the divergence (the MIN all-reduce matched on both)
        assert result.stderr.count(message) == 2 and "collective mismatch" not in result.stderr
    assert time.time() - started < 180
    assert not list((tmp_path / "c").rglob("last.pth"))  # nothing written after the failure
