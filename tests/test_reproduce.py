"""reproduce.py: the campaign's commands, what it counts as done, resumes or skips, and how it
runs the jobs."""
import sys

import pytest

from conf import settings

import reproduce
from fake_cifar import write_fake_cifar100
from test_table import WHY, break_folder, fake_run


def test_reproduce_prints_every_row(tmp_path, capsys):
    assert reproduce.main(["--seeds", "2", "--recipe", "paper", "classic",
                           "--checkpoint-dir", str(tmp_path), "--gpus", "0,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = {(net, att) for net, att, *_ in settings.PAPER_TABLE if att != "ssa"}
    assert len(expected) == 10
    seen = set()
    for line in lines:
        words = line.split()
        assert words[0] in ("CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1")
        value = lambda flag: words[words.index(flag) + 1]
        seen.add((value("-net"), value("-att"), value("--recipe"), value("--seed")))
        assert value("--run-name") == f"{value('--recipe')}-seed{value('--seed')}"
    assert seen == {(net, att, recipe, seed) for net, att in expected
                    for recipe in ("paper", "classic") for seed in ("0", "1")}


@pytest.mark.parametrize("flags,message", [
    (["--first-seed", "-1"], "must be between 0 and 2**63 - 1"),
    (["--seeds", "0"], "must be positive"),
    (["--gpus", "0,0"], "expected distinct GPU numbers"),
    (["--gpus", "cuda:0"], "expected distinct GPU numbers"),
])
def test_reproduce_refuses_bad_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(flags + ["--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_reproduce_skips_finished_and_resumes_interrupted(tmp_path, capsys):
    fake_run(tmp_path, "resnet50", "ema", 0, [10.0, 20.0], planned=2)  # finished
    interrupted = fake_run(tmp_path, "resnet101", "ca", 0, [10.0], planned=2)
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "# resnet50 + ema, paper, seed 0: done" in captured.out
    assert f"python train_cifar100.py --resume {interrupted} --epochs 2   # resumes" in captured.out
    assert "1 done, 1 to resume, 8 to start" in captured.err


def test_reproduce_never_takes_a_small_trials_runs_for_the_campaigns(tmp_path, capsys):
    """A campaign tried small (--epochs 2 --subset 64) and then run in full: the trial's folders are
    neither done nor resumed, but skipped with one line each."""
    done = fake_run(tmp_path, "resnet50", "ema", 0, [10.0, 20.0], planned=2, subset=64)
    interrupted = fake_run(tmp_path, "resnet101", "ca", 0, [10.0], planned=2, subset=64)
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    for run in (done, interrupted):
        assert (
            f"skipped {run}: it holds another run, epochs=2 (planned: 200), subset=64 (planned: "
            "None); "
            in captured.err) and str(run) not in captured.out
    assert "0 done, 0 to resume, 8 to start, 2 skipped" in captured.err
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path), "--epochs", "2",
                           "--subset", "64"]) == 0
    assert "1 done, 1 to resume, 8 to start" in capsys.readouterr().err
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path), "--epochs", "2",
                           "--subset", "64",
                           "--dataset", "cifar10"]) == 0
    assert "data_format=cifar100 (planned: cifar10)" in capsys.readouterr().err


@pytest.mark.parametrize("how",
                         ["corrupt args.json", "half-written metrics.csv", "args.json a list",
                          "empty metrics.csv"])
def test_reproduce_skips_an_unreadable_folder_with_one_line(tmp_path, capsys, how):
    folder = fake_run(tmp_path, "resnet50", "ema", 0, [79.0, 79.0], planned=2)
    break_folder(folder, how)
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if str(folder) in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipped {folder}: ") and WHY[
        how] in warnings[0]
    assert "Traceback" not in captured.err
    assert str(folder) not in captured.out and len(captured.out.splitlines()) == 9
    assert "0 done, 0 to resume, 9 to start, 1 skipped" in captured.err


@pytest.mark.parametrize("stop",
                         ["import os, signal; os.kill(os.getpid(), signal.SIGTERM)",  # killed: -15
                          "raise SystemExit(143)"])  # handled, as train_cifar100.py does
def test_reproduce_starts_nothing_more_after_a_job_stopped_by_a_signal(
        stop, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "plan", lambda args: [
        reproduce.Job("resnet50", "ema", "paper", seed, tmp_path / str(seed), "new",
                      [sys.executable, "-c", code])
        for seed, code in enumerate(["pass", stop, "pass"])])
    assert reproduce.main(["--run"]) == 1
    out = capsys.readouterr().out
    assert f"done: {tmp_path / '0'}" in out and f": {tmp_path / '1'}" in out and str(
        tmp_path / "2") not in out
    assert "1 of 3 runs ended well; 1 not started (rerun this command to continue)" in out


def test_reproduce_goes_on_after_a_crash(tmp_path, monkeypatch, capsys):
    """A job that fails or crashes (here SIGSEGV) does not stop the others."""
    monkeypatch.setattr(reproduce, "plan", lambda args: [
        reproduce.Job("resnet50", "ema", "paper", seed, tmp_path / str(seed), "new",
                      [sys.executable, "-c", code])
        for seed, code in enumerate(["import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                                     "pass"])])
    assert reproduce.main(["--run"]) == 1
    assert "1 of 2 runs ended well; then" in capsys.readouterr().out


def test_reproduce_never_counts_a_run_on_other_data_or_of_another_seed_as_done(tmp_path, capsys):
    """A folder named for seed 0 whose run recorded seed 5, or a run on CIFAR files other than
    --data's (by the trainer's own dataset name): skipped with one line, never done."""
    data = write_fake_cifar100(tmp_path / "data", n_train=8, n_test=8)  # a custom set
    custom = reproduce.planned_dataset(data, "cifar100")
    assert custom.startswith("custom-")
    root = tmp_path / "checkpoint"
    other_data = fake_run(root, "resnet50", "ema", 0, [10.0, 20.0], planned=2, dataset="cifar-100")
    wrong_seed = fake_run(root, "resnet50", "ca", 5, [10.0, 20.0], planned=2, run="paper-seed0",
                          dataset=custom)
    fake_run(root, "resnet50", "none", 0, [10.0, 20.0], planned=2, dataset=custom)
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(root), "--epochs", "2",
                           "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert (f"skipped {other_data}: it holds another run, dataset=cifar-100 (planned: {custom})"
            in captured.err)
    assert f"skipped {wrong_seed}: it holds another run, seed=5 (planned: 0)" in captured.err
    assert "# resnet50 + none, paper, seed 0: done" in captured.out
    assert "1 done, 0 to resume, 7 to start, 2 skipped" in captured.err
