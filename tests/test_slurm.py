"""reproduce.py --slurm against a real SLURM: tests/slurm_up.sh's single-node cluster (.ci/run
starts it; a developer runs `bash tests/slurm_up.sh` as root). A tiny campaign (the suite's
network, 32 images, 2 rows x 2 seeds, 3 epochs) is submitted and submitted again (the second skips
what is queued); one task is sent SIGTERM mid-run by `scancel --signal=TERM`, saves, requeues
itself once and resumes to the same final weights as the same run uninterrupted (a second
campaign); a run that fails is not requeued; table.py lists the runs. Skipped, with the reason,
where sbatch is not installed or no node answers; with EMA_REQUIRE_SLURM=1 (as .ci/run sets it)
that skip is a failure. About a minute on two cores. Then the script and the flags, without a
cluster."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import reproduce
import table
import tiny_net
from fake_cifar import write_fake_cifar100
from training import slurm

TRAINING = ["-b", "16", "-lr", "0.02", "--amp", "off", "--epochs", "3"]
WAIT = 80  # seconds for the whole campaign


def cluster_missing():
    if not shutil.which("sbatch"):
        return "sbatch is not installed (bash tests/slurm_up.sh, as root, installs and starts one)"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if done.returncode or not {"idle", "mixed", "allocated"} & set(done.stdout.split()):
        return f"no SLURM node answers (sinfo: {(done.stdout + done.stderr).strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = cluster_missing()
    if why and os.environ.get("EMA_REQUIRE_SLURM") == "1":
        pytest.fail(f"EMA_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


def campaign(base: Path, monkeypatch, *extra, data="data") -> int:
    """reproduce.py in base (its working folder), on the tiny network's two rows."""
    monkeypatch.chdir(base)
    monkeypatch.setattr(reproduce, "ROWS", [("resnet_tiny", "ema"), ("resnet_tiny", "none")])
    monkeypatch.setattr(reproduce, "trainer_command", lambda: tiny_net.command("train_cifar100.py"))
    return reproduce.main(["--data", str(base.parent / data), "--gpus-per-task", "0",
                           "--cpus-per-task", "1", "--max-requeues", "1", *extra, *TRAINING])


def queue() -> list[str]:
    done = subprocess.run(["squeue", "-h", "-r", "--me", "-n", slurm.JOB_NAME, "-o", "%i %T"],
                          capture_output=True, text=True)
    return done.stdout.split("\n")[:-1]


def wait_for(condition, what: str, deadline: float):
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}; queue: {queue()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def finished_campaigns(cluster, tmp_path_factory):
    """The campaigns, run once: (their folders, what each submit printed)."""
    base = tmp_path_factory.mktemp("slurm")
    write_fake_cifar100(base / "data", n_train=32, n_test=16)
    (base / "empty").mkdir()
    folders = {name: base / name for name in ("main", "reference", "failing")}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, folder in folders.items():
            folder.mkdir()
        deadline = time.time() + WAIT
        assert campaign(folders["main"], monkeypatch, "--seeds", "2", "--slurm", "--submit") == 0
        second = io.StringIO()
        with contextlib.redirect_stdout(second):
            assert campaign(folders["main"], monkeypatch, "--seeds", "2", "--slurm",
                            "--submit") == 0
        assert campaign(folders["reference"], monkeypatch, "--first-seed", "1", "--seeds", "1",
                        "-att", "ema", "--slurm", "--submit") == 0
        # A folder of images with no class folders in it: the trainer exits 2.
        assert campaign(folders["failing"], monkeypatch, "--seeds", "1", "-att", "none",
                        "--dataset", "folder", "--slurm", "--submit", data="empty") == 0
        signalled = folders["main"] / "checkpoint" / "resnet_tiny_ema" / "paper-seed1"
        # Once its first epoch is saved, SIGTERM to its training process, mid-run.
        wait_for(lambda: (signalled / "metrics.csv").is_file(), "the first epoch", deadline)
        task = slurm.queued(folders["main"] / "checkpoint")[signalled.resolve()][1]
        subprocess.run(["scancel", "--signal=TERM", task], check=True)
        wait_for(lambda: not queue(), "every task done", deadline)
    return folders, signalled, task, second.getvalue()


def test_the_second_submit_skips_what_is_queued(finished_campaigns):
    folders, _, _, second = finished_campaigns
    assert second.count("already in the queue (") == 4, second
    assert "nothing to submit: 4 run(s) need work, all queued or running" in second
    scripts = sorted((folders["main"] / "checkpoint" / "slurm").glob("campaign-*.sbatch"))
    assert len(scripts) == 1, "the second submit wrote a script: it did not skip the queued runs"
    assert "--array=0-3" in scripts[0].read_text()


def test_every_run_finishes_and_the_signalled_one_resumes_bitwise(finished_campaigns):
    folders, signalled, task, _ = finished_campaigns
    runs = sorted((folders["main"] / "checkpoint").glob("resnet_tiny_*/paper-seed*"))
    assert len(runs) == 4
    for run in runs:
        assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 3, run
    log = (signalled / "slurm.log").read_text()
    assert "stopped by a signal (exit 143), last.pth saved: requeued" in log
    assert f"task {task} " in log and "requeued 1 time(s)" in log and log.count("finished") == 1
    reference = folders["reference"] / "checkpoint" / "resnet_tiny_ema" / "paper-seed1"
    ours, theirs = (torch.load(folder / "last.pth", weights_only=True)["model"]
                    for folder in (signalled, reference))
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    for run in runs:
        if run != signalled:
            assert "requeued 0 time(s)" in (run / "slurm.log").read_text()
            assert "requeued 1 time(s)" not in (run / "slurm.log").read_text()


def test_a_failing_run_is_not_requeued_and_says_why(finished_campaigns):
    folders, _, _, _ = finished_campaigns
    log = (folders["failing"] / "checkpoint" / "resnet_tiny_none" / "paper-seed0"
           / "slurm.log").read_text()
    assert "failed (exit 2): not requeued" in log and "error:" in log
    assert log.count("== ") == 2 and "requeued 1 time(s)" not in log


def test_table_lists_the_campaign(finished_campaigns, capsys):
    folders, _, _, _ = finished_campaigns
    assert table.main(["--checkpoint-dir", str(folders["main"] / "checkpoint"), "--out",
                       str(folders["main"] / "results")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("ResNet_tiny") and "32x32" in line]
    assert [row.split("  ")[0] for row in rows] == ["ResNet_tiny + EMA", "ResNet_tiny"]
    assert all(re.search(r"1\.25M +2 ", row) for row in rows), rows  # two seeds each


def test_the_plan_shows_slurm_states(finished_campaigns, monkeypatch, capsys):
    """Nothing queued now: the plan says done for all four."""
    folders, _, _, _ = finished_campaigns
    assert campaign(folders["main"], monkeypatch, "--seeds", "2") == 0
    assert capsys.readouterr().out.count(": done") == 4


# ---------------------------------------------------------------- without a cluster

def test_the_script_reads_back_and_asks_for_what_was_given(tmp_path):
    tasks = [(Path("checkpoint/resnet50_ema/paper-seed0"), ["-net", "resnet50", "-att", "ema"]),
             (Path("ck pt/it's/seed1"), ["--run-name", "a b"])]
    resources = slurm.Resources(partition="gpu", gpus=2, cpus=8, time="4:00:00", warning=120,
                                max_requeues=3, sbatch=["--account=lab", "--qos=long"])
    text = slurm.script(tasks, resources, tmp_path, tmp_path / "logs", ["/venv/python", "t.py"],
                        ["--epochs", "2"])
    for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=4:00:00",
                 "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --account=lab", "#SBATCH --qos=long", "MAX_REQUEUES=3",
                 "passed=(--epochs 2)"):
        assert line in text.splitlines(), line
    assert "/venv/python -m torch.distributed.run --standalone --nproc_per_node=2 t.py" in text
    path = tmp_path / "campaign.sbatch"
    path.write_text(text)
    assert slurm.task_folders(path) == {0: (tmp_path / tasks[0][0]).resolve(),
                                        1: (tmp_path / tasks[1][0]).resolve()}
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    one_cpu = slurm.script(tasks[:1], slurm.Resources(gpus=0), tmp_path, tmp_path, ["p"], [])
    assert "--gpus-per-task" not in one_cpu and "--partition" not in one_cpu


def test_a_folder_a_training_holds_is_locked(tmp_path):
    import multiprocessing
    from training.run_folder import RunLock
    folder = tmp_path
    assert not slurm.locked(folder)  # no .lock yet
    lock = RunLock(folder)
    try:
        # another process: flock is per open file, so ask from a fresh one
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.apply(slurm.locked, (folder,)) is True
    finally:
        lock.release()
    assert not slurm.locked(folder)


@pytest.mark.parametrize("flags,message", [
    (["--run", "--slurm"], "give one of them"),
    (["--submit"], "--submit goes with --slurm"),
    (["--slurm", "--gpus-per-task", "-1"], "must be >= 0"),
])
def test_slurm_flags_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(flags + ["--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_submit_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert reproduce.main(["--slurm", "--submit", "--checkpoint-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: --submit needs sbatch, which is not on this machine's PATH\n")
    assert not (tmp_path / "slurm").exists()


def test_squeue_is_asked_only_where_a_campaign_was_written(tmp_path, monkeypatch):
    """A machine with SLURM's client and no controller makes squeue wait: a plan without a
    campaign script in its checkpoint folder does not ask."""
    asked = []
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm.subprocess, "run", lambda command, **kw: asked.append(command)
                        or subprocess.CompletedProcess(command, 1, "", "no controller"))
    assert slurm.queued(tmp_path) == {} and asked == []
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "campaign-1.sbatch").write_text("")
    assert slurm.queued(tmp_path) == {} and len(asked) == 1
