"""What a new user's attacks found, each kept from coming back: results a new run would replace, a
hang-up (SIGHUP) that lost the partial epoch, names and paths that ended in a traceback or a wrong
message, a --subset that was the whole set, a stale TensorBoard temporary file, a table that trusted
metrics.csv's rows as they came."""
import csv
import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from training import arguments, engine, run_records

import reproduce
import train_cifar100
from conftest import SMALL_RUN
from fake_cifar import write_fake_cifar100
from test_runs import copy_run, folder, resume, snapshot, tensorboard_steps, train
from tiny_net import NET


def test_sighup_saves_and_stops_like_sigterm(small_data, tmp_path, monkeypatch, capsys):
    """Closing the SSH session a training runs in sends SIGHUP: a checkpoint, exit 128 + 1."""
    original = train_cifar100.Trainer.check

    def hang_up(self, watch, stop, *rest):
        os.kill(os.getpid(), signal.SIGHUP)
        return original(self, watch, stop, *rest)

    monkeypatch.setattr(train_cifar100.Trainer, "check", hang_up)
    assert train(small_data, tmp_path, "hup", "--epochs", "2") == 128 + signal.SIGHUP
    out = capsys.readouterr().out
    assert "resume with" in out
    assert torch.load(folder(tmp_path, "hup") / "last.pth", weights_only=True)["epoch"] == 1


def test_under_nohup_sighup_stays_ignored(small_data, tmp_path, monkeypatch):
    """nohup ignores SIGHUP before the script starts: a closed session must not stop the run."""
    original = train_cifar100.Trainer.check

    def hang_up(self, watch, stop, *rest):
        os.kill(os.getpid(), signal.SIGHUP)
        return original(self, watch, stop, *rest)

    monkeypatch.setattr(train_cifar100.Trainer, "check", hang_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert train(small_data, tmp_path, "nohup", "--epochs", "2") == 0
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_during_start_up_stops_with_a_message(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cifar100.Trainer, "open_outputs",
                        lambda self: os.kill(os.getpid(), signal.SIGHUP))
    assert train(small_data, tmp_path, "hup", "--epochs", "1") == 128 + signal.SIGHUP
    assert ("SIGHUP: stopped; the newest last.pth (if any) is from before it"
            in capsys.readouterr().err)
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("kept", [("best.pth", "metrics.csv"), ("metrics.csv",), ("best.pth",)])
def test_a_new_run_never_replaces_results_without_last_pth(
        kept, small_data, finished_small_run, tmp_path, capsys):
    """last.pth deleted to save disk, the results kept: a new run with the same name is refused."""
    run = copy_run(finished_small_run, tmp_path, "run")
    for name in {"last.pth", "best.pth", "metrics.csv"} - set(kept):
        (run / name).unlink()
    before, logs = snapshot(run), snapshot(folder(tmp_path, "run", "runs"))
    assert train(small_data, tmp_path, "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run's results ({', '.join(sorted(kept))})" in err
    assert snapshot(run) == before and snapshot(folder(tmp_path, "run", "runs")) == logs


def test_reproduce_plans_a_folder_without_last_pth_by_its_results(
        finished_small_run, tmp_path, capsys):
    """Finished (by metrics.csv): done; unfinished without a checkpoint to resume: skipped, never
    new."""
    def planned(epochs):  # the small run's own options
        return reproduce.planned_identity(["-b", "16", "-lr", "0.02", "--epochs", str(epochs)], NET,
                                          "ema",
                                          "paper")

    done = copy_run(finished_small_run, tmp_path, "done")
    (done / "last.pth").unlink()
    assert reproduce.run_state(done, planned(1)) == "done"
    stuck = copy_run(finished_small_run, tmp_path, "stuck")
    (stuck / "last.pth").unlink()
    args = json.loads((stuck / "args.json").read_text())
    (stuck / "args.json").write_text(json.dumps({**args, "epochs": 5}))
    assert reproduce.run_state(stuck, planned(5)) == "skipped"
    assert (f"skipped {stuck}: unfinished (1/5 epochs) and no last.pth to resume"
            in capsys.readouterr().err)
    (stuck / "metrics.csv").unlink()
    assert reproduce.run_state(stuck, planned(5)) == "skipped"
    assert "best.pth without last.pth or metrics.csv" in capsys.readouterr().err


def test_a_run_name_too_long_for_the_file_system_is_one_line(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        train(small_data, tmp_path, "x" * 300, "--epochs", "1")
    assert refused.value.code == 2
    assert "at most 200 bytes" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


def test_a_subset_as_large_as_the_data_is_no_subset(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "all", "--epochs", "1", "--subset", "500") == 0
    assert ("--subset 500 covers the whole training set (16 images): recorded as no subset"
            in capsys.readouterr().out)
    recorded = json.loads((folder(tmp_path, "all") / "args.json").read_text())
    assert recorded["subset"] is None


def test_one_folder_for_checkpoints_and_logs(small_data, tmp_path, capsys):
    """--checkpoint-dir X --log-dir X: one run folder holds both, and the run does not lock itself
    out."""
    both = ["--checkpoint-dir", str(tmp_path / "x"), "--log-dir", str(tmp_path / "x")]
    assert train_cifar100.main(SMALL_RUN + ["--data", str(small_data), "--run-name", "r",
                                            "--epochs", "1"] + both) == 0
    run = tmp_path / "x" / f"{NET}_ema" / "r"
    assert (run / "last.pth").is_file() and list(run.glob("events.out.tfevents.*"))
    assert train_cifar100.main(["--resume", str(run), "--epochs", "2", "--log-dir",
                                str(tmp_path / "x")]) == 0


def test_data_that_is_a_file_or_the_inner_folder_is_one_line(small_data, tmp_path, capsys):
    a_file = tmp_path / "data.tar"
    a_file.write_bytes(b"not a folder")
    assert train(a_file, tmp_path, "f", "--epochs", "1") == 2
    assert f"--data {a_file} is a file, not a folder" in capsys.readouterr().err
    inner = small_data / "cifar-100-python"
    assert train(inner, tmp_path, "inner", "--epochs", "1") == 2
    assert (f"--data {inner} is the dataset's own folder: point --data at {small_data}"
            in capsys.readouterr().err)
    assert not (tmp_path / "checkpoint").exists()


def test_gate_images_without_ema_is_refused(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        train(small_data, tmp_path, "g", "--epochs", "1", "-att", "none", "--gate-images", "1")
    assert refused.value.code == 2
    assert "--gate-images draws EMA's gates, and -att none has none" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


def test_a_resume_with_fewer_epochs_than_it_has_begun_is_refused(
        small_data, tmp_path, monkeypatch, capsys):
    """Stopped in epoch 2 of 3 and resumed with --epochs 1: not 'already finished'."""
    steps, original = [], engine.train_step

    def stopped_in_epoch_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:  # epoch 2's first step of two
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", stopped_in_epoch_2)
    assert train(small_data, tmp_path, "mid", "--epochs", "3", "-b", "8") == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert resume(tmp_path, folder(tmp_path, "mid"), "--epochs", "1") == 2
    assert "stopped in epoch 2 (step 1 of 2): give --epochs 2 or more" in capsys.readouterr().err


def test_an_interrupted_event_file_rewrite_is_cleaned_up(small_data, finished_small_run, tmp_path):
    """kill -9 inside a rewrite leaves a temporary file, and kills at start-up leave event files
    with nothing but their header: the next resume removes both, and TensorBoard sees each step
    once."""
    run = copy_run(finished_small_run, tmp_path, "tb")
    logs = folder(tmp_path, "tb", "runs")
    events = next(logs.glob("events.out.tfevents.*"))
    shutil.copy(events, logs / (events.name + ".tmp"))  # what the killed rewrite left
    SummaryWriter(logs, filename_suffix=".empty").close()  # a start-up killed before its first step
    assert resume(tmp_path, run, "--epochs", "2") == 0
    names = sorted(p.name for p in logs.iterdir() if not p.name.startswith("."))
    assert not [name for name in names if name.endswith((".tmp", ".empty"))], names
    assert tensorboard_steps(logs) == [1, 2]


def write_metrics(run, epochs):
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {int(float(row["epoch"])): row for row in rows}
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**by_epoch[1], "epoch": epoch} for epoch in epochs)


@pytest.mark.parametrize("epochs, why", [
    ([2, 1], "metrics.csv lists epochs 2, 1, not 1 to 2 in order"),
    ([1, 1], "metrics.csv lists epochs 1, 1, not 1 to 2 in order"),
    ([1, 3], "metrics.csv lists epochs 1, 3, not 1 to 2 in order"),
])
def test_the_table_reads_epochs_by_number_and_skips_a_file_it_cannot_trust(
        epochs, why, finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "odd")
    args = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**args, "epochs": 2}))
    write_metrics(run, epochs)
    assert run_records.read_runs(tmp_path / "checkpoint") == []
    assert f"skipped {run}: {why}" in capsys.readouterr().err


def test_metrics_csv_never_lists_an_epoch_that_no_checkpoint_holds(
        small_data, tmp_path, monkeypatch, capsys):
    """last.pth is written before metrics.csv: a failed save leaves both at the epoch before."""
    from training import run_folder
    original = run_folder.RunFolder.save

    def disk_full_in_epoch_2(self, name, state):
        if state["epoch"] == 2:
            raise run_folder.UserError(f"cannot write {name}: No space left on device")
        return original(self, name, state)

    monkeypatch.setattr(run_folder.RunFolder, "save", disk_full_in_epoch_2)
    assert train(small_data, tmp_path, "full", "--epochs", "2") == 2
    run = folder(tmp_path, "full")
    assert [row["epoch"] for row in csv.DictReader(open(run / "metrics.csv"))] == ["1"]
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


# 6: more steps than an epoch has, timed over the epoch
@pytest.mark.parametrize("estimate_after", [1, 6])
def test_the_cpu_estimate_is_printed_once_a_run_in_its_unit(
        small_data, tmp_path, monkeypatch, capsys, estimate_after):
    monkeypatch.setattr(train_cifar100, "ESTIMATE_AFTER", estimate_after)
    assert train(small_data, tmp_path, "est", "--epochs", "3") == 0
    out = capsys.readouterr().out
    assert out.count("warning: no GPU; about") == 1
    assert "(a first estimate, from the first steps; evaluation included)" in out
    assert (engine.cpu_estimate(30, 1)
            == "warning: no GPU; about 30 s per epoch, 30 s for the remaining 1 epoch")
    assert (engine.cpu_estimate(600, 200)
            == "warning: no GPU; about 10.0 min per epoch, 33.3 h for the remaining 200 epochs")
    assert engine.cpu_estimate(3600, 200).endswith(
        "1.0 h per epoch, 8.3 days for the remaining 200 epochs")


# ---------------------------------------------------------------- reproduce.py

def test_reproduce_passes_training_options_through_and_runs_from_any_folder(
        tmp_path, monkeypatch, capsys):
    jobs = []
    monkeypatch.setattr(reproduce, "run_all", lambda planned, gpus: jobs.extend(planned)
                        or (0, 0, 0))
    monkeypatch.chdir(tmp_path)  # not the repo
    flags = ["--seeds", "1", "-net", "resnet101", "-att", "none", "--epochs", "1", "--subset", "32"]
    assert reproduce.main(flags + ["--run"]) == 0
    assert [(job.net, job.att) for job in jobs] == [("resnet101", "none")]
    assert jobs[0].command[1] == str(reproduce.TRAINER) and reproduce.TRAINER.is_file()
    assert jobs[0].command[-4:] == ["--epochs", "1", "--subset", "32"]
    assert reproduce.main(flags) == 0
    assert capsys.readouterr().out.strip().endswith("--epochs 1 --subset 32")


@pytest.mark.parametrize("flags, message", [
    (["--seed", "3"], "reproduce.py sets seed for each job itself"),
    # the training parser's default value too
    (["--seed", "0"], "reproduce.py sets seed for each job itself"),
    (["--run-name", "x"], "reproduce.py sets run for each job itself"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "x"], "argument --epochs: expected a whole number, got 'x'"),
])
def test_reproduce_refuses_what_it_cannot_pass_through(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        reproduce.main(["--checkpoint-dir", str(tmp_path)] + flags)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_a_sigterm_to_reproduce_reaches_its_running_job(tmp_path, monkeypatch, capsys):
    ready, got = tmp_path / "ready", tmp_path / "got"
    job = (f"import pathlib, signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: "
           f"(pathlib.Path({str(got)!r}).write_text('saved'), "
           f"sys.exit(143)))\npathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(120)\n")
    monkeypatch.setattr(reproduce, "plan", lambda args: [
        reproduce.Job("resnet50", "ema", "paper", seed, tmp_path / str(seed), "new",
                      [sys.executable, "-c", job])
        for seed in range(2)])

    def kill_when_ready():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_ready, daemon=True).start()
    assert reproduce.main(["--run"]) == 128 + signal.SIGTERM
    assert got.read_text() == "saved"
    assert "0 of 2 runs ended well; 1 not started" in capsys.readouterr().out


def test_two_seeds_started_in_the_same_second_get_two_folders(small_data, tmp_path, monkeypatch):
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 12, 1, 20, 15, 0)

    monkeypatch.setattr(arguments, "datetime", Frozen)
    both = SMALL_RUN + ["--data", str(small_data), "--epochs", "1", "--checkpoint-dir",
                        str(tmp_path / "checkpoint"),
                        "--log-dir", str(tmp_path / "runs")]
    assert train_cifar100.main(both + ["--seed", "0"]) == 0
    assert train_cifar100.main(both + ["--seed", "1"]) == 0
    # A sweep launched at once: another learning rate, and the very same command again.
    assert train_cifar100.main(both + ["--seed", "0", "-lr", "0.05"]) == 0
    assert train_cifar100.main(both + ["--seed", "0"]) == 0
    names = sorted(p.name for p in (tmp_path / "checkpoint" / f"{NET}_ema").iterdir())
    assert len(names) == 4 and [name[:-7] for name in names].count("2026-12-01T20-15-00-seed0") == 3
    assert [name[:-7] for name in names].count("2026-12-01T20-15-00-seed1") == 1


def test_a_tensorboard_folder_belongs_to_its_run_wherever_its_checkpoints_live(
        small_data, tmp_path):
    """Two campaigns in two --checkpoint-dirs with the same run names and one --log-dir."""
    logs = ["--log-dir", str(tmp_path / "runs")]
    first, second = (SMALL_RUN
                     + ["--data", str(small_data), "--run-name", "paper-seed0", "--epochs", "1",
                        "--checkpoint-dir", str(tmp_path / name)]
                     + logs for name in ("a", "b"))
    assert train_cifar100.main(first) == 0
    shared = tmp_path / "runs" / f"{NET}_ema" / "paper-seed0"
    before = snapshot(shared)
    assert train_cifar100.main(second) == 0
    assert snapshot(shared) == before  # the first campaign's log untouched
    others = [p for p in shared.parent.iterdir() if p.name.startswith("paper-seed0-")]
    assert len(others) == 1 and tensorboard_steps(others[0]) == [1]
    assert train_cifar100.main(["--resume", str(tmp_path / "a" / f"{NET}_ema" / "paper-seed0"),
                                "--epochs", "2"]
                               + logs) == 0
    assert tensorboard_steps(shared) == [1, 2] and tensorboard_steps(others[0]) == [1]


def test_resume_newest_takes_a_renamed_run(small_data, finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "run")
    older = copy_run(finished_small_run, tmp_path, "older")
    os.utime(older / "last.pth", (1e9, 1e9))
    renamed = run.parent / "renamed"
    run.rename(renamed)
    assert train_cifar100.main(["-net", NET, "-att", "ema", "-resume", "--epochs", "2",
                                "--checkpoint-dir", str(tmp_path / "checkpoint"), "--log-dir",
                                str(tmp_path / "runs")]) == 0
    assert f"resuming {renamed / 'last.pth'}" in capsys.readouterr().out


def test_resume_newest_prefers_the_run_to_its_backup_copy(
        small_data, finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "run")
    shutil.copytree(run, run.parent / "run.bak")  # newer on disk
    assert train_cifar100.main(["-net", NET, "-att", "ema", "-resume", "--epochs", "2",
                                "--checkpoint-dir", str(tmp_path / "checkpoint"), "--log-dir",
                                str(tmp_path / "runs")]) == 0
    assert f"resuming {run / 'last.pth'}" in capsys.readouterr().out
    assert torch.load(run.parent / "run.bak" / "last.pth", weights_only=True)["epoch"] == 1


def test_a_full_disk_is_said_in_words(tmp_path, monkeypatch):
    import utils

    def fills_the_disk(obj, f):
        f.write(b"x" * 4096)
        f.flush()
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 0")

    monkeypatch.setattr(utils.torch, "save", fills_the_disk)
    monkeypatch.setattr(utils.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    (tmp_path / "last.pth").write_bytes(b"y" * 3 * 2 ** 20)
    with pytest.raises(utils.UserError) as error:
        utils.save_atomic({}, tmp_path / "last.pth")
    assert str(error.value) == (
        f"cannot write {tmp_path / 'last.pth'}: no space left on device (about 3.0 MB "
        f"needed, 0.0 MB free in {tmp_path}); the previous last.pth, if any, is unchanged")
    assert (tmp_path / "last.pth").read_bytes() == b"y" * 3 * 2 ** 20 and not list(
        tmp_path.glob("*.tmp"))
    # A first checkpoint: what it needs is not known, only what was written before the disk filled.
    with pytest.raises(utils.UserError) as error:
        utils.save_atomic({}, tmp_path / "best.pth")
    assert "(0.0 MB written before it filled, 0.0 MB free in" in str(error.value)
    assert "needed" not in str(error.value)


def test_test_py_evaluates_on_the_data_it_was_trained_on(
        small_data, finished_small_run, tmp_path, monkeypatch, capsys):
    import test as test_script
    run = copy_run(finished_small_run, tmp_path, "run")
    monkeypatch.chdir(tmp_path)  # no ./data here: the recorded --data is used
    assert test_script.main(["-weights", str(run / "best.pth")]) == 0
    captured = capsys.readouterr()
    assert "16 test images" in captured.out and "warning" not in captured.err
    other = write_fake_cifar100(tmp_path / "other", n_train=16, n_test=16, seed=1)
    assert test_script.main(["-weights", str(run / "best.pth"), "--data", str(other)]) == 0
    assert f"warning: {other} holds custom-" in capsys.readouterr().err


@pytest.mark.parametrize("writes_left", [0, 2])  # full from the start; full within the first epoch
def test_a_full_log_disk_stops_the_logging_not_the_run_and_a_resume_logs_what_is_missing(
        small_data, tmp_path,
        monkeypatch, capsys,
        writes_left):
    """TensorBoard's writer thread dies on a full disk and its next write raises: one warning, the
    run goes on, and the resume (with space again) logs the epochs the log lacks."""
    import errno

    from tensorboard.summary.writer.record_writer import RecordWriter
    full, original, writes = [True], RecordWriter.write, []

    def write(self, data):
        writes.append(data)
        if full[0] and len(writes) > writes_left:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    assert train(small_data, tmp_path, "logs", "--epochs", "2") == 0
    captured = capsys.readouterr()
    assert captured.out.count(
        "warning: the TensorBoard log cannot be written: no space left on device") == 1
    assert "Traceback" not in captured.err + captured.out
    run = folder(tmp_path, "logs")
    assert [row["epoch"] for row in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
    full[0] = False
    assert resume(tmp_path, run, "--epochs", "3") == 0
    assert tensorboard_steps(folder(tmp_path, "logs", "runs")) == [1, 2, 3]
    assert tensorboard_steps(folder(tmp_path, "logs", "runs"), "Train/loss") == [1, 2, 3]


def test_a_relative_data_folder_is_found_from_any_folder(small_data, tmp_path, monkeypatch, capsys):
    import test as test_script
    monkeypatch.chdir(small_data.parent)
    assert train(small_data, tmp_path, "relative", "--epochs", "1", "--data", small_data.name) == 0
    run = folder(tmp_path, "relative")
    assert json.loads((run / "args.json").read_text())["data"] == str(small_data)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert test_script.main(["-weights", str(run / "best.pth")]) == 0
    assert "16 test images" in capsys.readouterr().out


def test_commands_printed_for_paths_with_spaces_work_when_pasted(small_data, tmp_path, monkeypatch,
                                                                 capsys):
    """The resume command printed at a stop, and reproduce.py's commands, quote their paths."""
    import shlex
    original = train_cifar100.Trainer.check

    def hang_up(self, watch, stop, *rest):
        os.kill(os.getpid(), signal.SIGHUP)
        return original(self, watch, stop, *rest)

    monkeypatch.setattr(train_cifar100.Trainer, "check", hang_up)
    spaced = tmp_path / "my runs"
    assert train_cifar100.main(SMALL_RUN + ["--data", str(small_data), "--epochs", "2",
                                            "--run-name", "a b", "--checkpoint-dir",
                                            str(spaced / "checkpoint"), "--log-dir",
                                            str(spaced / "runs")]) == 128 + signal.SIGHUP
    monkeypatch.undo()
    printed = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(printed) if line.endswith("resume with:"))
    command = shlex.split(printed[at + 1])
    assert command[:2] == ["python", "train_cifar100.py"]
    run = spaced / "checkpoint" / f"{NET}_ema" / "a b"
    assert command[command.index("--resume") + 1] == str(run)
    assert train_cifar100.main(command[2:]) == 0
    capsys.readouterr()
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(spaced / "plan")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert shlex.split(first)[shlex.split(first).index("--checkpoint-dir") + 1] == str(
        spaced / "plan")


def test_resume_newest_refuses_a_run_of_another_module_in_its_folder(
        finished_small_run, tmp_path, capsys):
    """-resume -net X -att Y picks the newest run under X_Y/: one moved there from another
    module's folder is named, not resumed as Y."""
    moved = tmp_path / "checkpoint" / f"{NET}_se" / "moved"
    shutil.copytree(copy_run(finished_small_run, tmp_path, "run"), moved)
    assert train_cifar100.main(["-net", NET, "-att", "se", "-resume", "--epochs", "2",
                                "--checkpoint-dir", str(tmp_path / "checkpoint")]) == 2
    err = capsys.readouterr().err
    assert f"the newest run of {NET} + se, {moved}, records {NET} + ema" in err
