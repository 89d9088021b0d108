"""A run's folder: written only where it was pointed, by one process at a time, never before the
inputs are validated; best.pth consistent with the record; TensorBoard without duplicated steps."""
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_accumulator
from torch.utils.tensorboard import SummaryWriter

import utils
from training import cifar, run_folder, run_records, stopping

import test as test_script
import train_cifar100
from conftest import SMALL_RUN
from fake_cifar import write_fake_cifar100
from tiny_net import NET


def copy_run(finished, base, run):
    """A copy of the conftest's finished run, as `run` under base."""
    for kind in ("checkpoint", "runs"):
        shutil.copytree(folder(finished, "run", kind), folder(base, run, kind))
    return folder(base, run)


def roots(base):
    return ["--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs")]


def train(small_data, base, run, *extra):
    return train_cifar100.main(SMALL_RUN + ["--data", str(small_data), "--run-name", run]
                               + roots(base) + list(extra))


def resume(base, folder, *extra):
    return train_cifar100.main(["--resume", str(folder), "--log-dir", str(base / "runs")]
                               + list(extra))


def folder(base, run, kind="checkpoint"):
    return base / kind / f"{NET}_ema" / run


def snapshot(path):
    """Every file below path with its bytes."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tensorboard_steps(log_folder, tag="Test/top1"):
    """Steps of `tag` as `tensorboard --load_fast=false` reads them (its plugin event
    accumulator)."""
    acc = plugin_event_accumulator.EventAccumulator(str(log_folder))
    acc.Reload()
    return [event.step for event in acc.Tensors(tag)]


def test_a_copied_run_continues_as_the_copy(finished_small_run, tmp_path):
    copy_run(finished_small_run, tmp_path, "original")
    copy = folder(tmp_path, "copy")
    shutil.copytree(folder(tmp_path, "original"), copy)
    before = snapshot(folder(tmp_path, "original"))
    assert resume(tmp_path, copy, "--epochs", "2") == 0
    assert snapshot(folder(tmp_path, "original")) == before
    assert torch.load(copy / "last.pth", weights_only=True)["epoch"] == 2
    # The copy's own log folder, new: its whole history from the checkpoint, then its epoch 2.
    assert tensorboard_steps(folder(tmp_path, "copy", "runs")) == [1, 2]


def test_recorded_paths_cannot_send_writes_elsewhere(finished_small_run, tmp_path):
    base = tmp_path / "inside"
    copy_run(finished_small_run, base, "run")
    last = folder(base, "run") / "last.pth"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["args"].update(run="../../../escaped", checkpoint_dir="../../..", log_dir="../../..")
    torch.save(checkpoint, last)
    outside = snapshot(tmp_path)
    assert resume(base, last, "--epochs", "2") == 0
    changed = {path for path, data in snapshot(tmp_path).items() if outside.get(path) != data}
    assert changed and all(path.parts[0] == "inside" for path in changed), changed


def test_nothing_is_written_before_the_checkpoint_is_validated(
        finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "run")
    before = snapshot(tmp_path)
    assert resume(tmp_path, run, "--epochs", "1") == 0  # already finished
    assert "already finished" in capsys.readouterr().out
    checkpoint = torch.load(run / "last.pth", weights_only=True)
    bad = tmp_path / "elsewhere" / "last.pth"
    bad.parent.mkdir()
    for broken in ({**checkpoint, "format": 99}, {**checkpoint, "args": {}},
                   {**checkpoint, "args": [1, 2]},
                   {**checkpoint, "args": {**checkpoint["args"], "net": "resnet7"}}):
        torch.save(broken, bad)
        before[bad.relative_to(tmp_path)] = bad.read_bytes()
        assert resume(tmp_path, bad) == 2
        assert "error:" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args",
                         [{}, [1, 2], {"net": "resnet18"}, {"net": "resnet7", "att": "ema"}])
def test_test_py_refuses_checkpoints_without_usable_arguments(args, tmp_path, capsys):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "args": args, "format": 2}, path)
    assert test_script.main(["-weights", str(path), "--data", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_one_process_per_run_folder(small_data, tmp_path, capsys):
    run = folder(tmp_path, "busy")
    run.mkdir(parents=True)
    lock = run_folder.RunLock(run)  # another training holds it
    try:
        assert train(small_data, tmp_path, "busy", "--epochs", "1") == 2
        assert "in use by another training" in capsys.readouterr().err
        assert not (run / "args.json").exists()
    finally:
        lock.release()
    assert train(small_data, tmp_path, "busy", "--epochs", "1") == 0  # free again
    # A resume is refused as well, without the advice that only a new run can follow.
    lock = run_folder.RunLock(run)
    try:
        assert resume(tmp_path, run, "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert "in use by another training" in err and "--run-name" not in err
    finally:
        lock.release()


def test_a_new_run_never_reuses_a_finished_runs_folder(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "taken", "--epochs", "1") == 0
    before = snapshot(tmp_path)
    assert train(small_data, tmp_path, "taken", "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [
    ["--run-name", "../escape"], ["--run-name", "/tmp/abs"], ["--run-name", "."],
    ["--run-name", "a/b/c"],
    ["--seed", "1e23"], ["--seed", str(2 ** 64)], ["--seed", "-1"], ["-lr", "1e300"],
    ["--init-from", "x.pth", "--resume", "y"], ["--att-stages", "5"], ["--att-stages", "2,2"],
    ["--att-stages", "3", "-att", "none"], ["--att-stages", "3", "-net", "mobilenetv2"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cifar100.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_stale_best_checkpoint_is_rebuilt_from_the_record(finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "best")
    (run / "best.pth").unlink()  # as if the process died while writing it
    (run / "best.pth.tmp").write_bytes(b"half a file")
    capsys.readouterr()
    assert resume(tmp_path, run, "--epochs", "2") == 0
    assert "rebuilt" in capsys.readouterr().out
    record = torch.load(run / "last.pth", weights_only=True)["best"]
    assert torch.load(run / "best.pth", weights_only=True)["epoch"] == record["epoch"]
    assert not list(run.glob("*.tmp"))


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(
        finished_small_run, tmp_path, monkeypatch, capsys):
    run = copy_run(finished_small_run, tmp_path, "full")
    last = (run / "last.pth").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full_disk)
    assert resume(tmp_path, run, "--epochs", "2") == 2
    assert "cannot write" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == last
    assert not list(run.glob("*.tmp"))


class SignalledFile(io.RawIOBase):
    """A file whose third write() is interrupted by SIGTERM, as a second signal lands in
    torch.save."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def writable(self):
        return True

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise stopping.Interrupted(signal.SIGTERM)
        return self.f.write(data)


def test_a_signal_inside_a_checkpoint_write_stops_as_a_signal(
        finished_small_run, tmp_path, monkeypatch, capsys):
    """torch.save turns a signal inside its writes into a RuntimeError: still an interruption (128 +
    15), not a failed write (exit 2); the previous last.pth kept, no temporary file."""
    run = copy_run(finished_small_run, tmp_path, "signalled")
    last = (run / "last.pth").read_bytes()
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, SignalledFile(f)))
    assert resume(tmp_path, run, "--epochs", "2") == 128 + signal.SIGTERM
    assert "SIGTERM: stopped" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == last
    assert not list(run.glob("*.tmp"))


def test_tensorboard_has_no_duplicates_after_a_restart_before_the_first_checkpoint(
        small_data, tmp_path):
    logs = folder(tmp_path, "again", "runs")
    with SummaryWriter(logs) as earlier:  # an attempt killed during its first epoch
        earlier.add_scalar("Test/top1", 1.0, 1)
    assert train(small_data, tmp_path, "again", "--epochs", "1") == 0
    assert tensorboard_steps(logs) == [1]


def test_tensorboard_has_no_duplicates_after_a_kill_during_a_checkpoint_write(
        finished_small_run, tmp_path):
    run = copy_run(finished_small_run, tmp_path, "killed")
    logs = folder(tmp_path, "killed", "runs")
    # epoch 2 logged, then killed before its last.pth was written
    with SummaryWriter(logs) as crashed:
        crashed.add_scalar("Test/top1", 1.0, 2)
    assert resume(tmp_path, run, "--epochs", "2") == 0
    assert tensorboard_steps(logs) == [1, 2]


def test_a_stop_at_the_very_last_step_still_finishes_the_run(small_data, tmp_path, monkeypatch):
    original = train_cifar100.Trainer.check

    def stop_at_the_end(self, watch, stop, *rest):
        if self.epoch + 1 == self.args.epochs and self.step == len(self.train_data):
            stop.signal = signal.SIGTERM
        return original(self, watch, stop, *rest)

    monkeypatch.setattr(train_cifar100.Trainer, "check", stop_at_the_end)
    assert train(small_data, tmp_path, "last", "--epochs", "1") == 0
    acc = plugin_event_accumulator.EventAccumulator(str(folder(tmp_path, "last", "runs")))
    acc.Reload()
    assert acc.PluginTagToContent("hparams")


def test_init_from_is_recorded(small_data, finished_small_run, tmp_path, capsys):
    source = folder(finished_small_run, "run")
    assert train(small_data, tmp_path, "tuned", "--epochs", "1", "--init-from", str(source)) == 0
    assert str(source) in capsys.readouterr().out
    recorded = json.loads((folder(tmp_path, "tuned") / "args.json").read_text())
    assert recorded["init_from"] == str(source) and recorded["world"] == 1
    assert recorded["dataset"].startswith("custom-") and len(recorded["dataset"]) == 15
    # A resume keeps it: the run's identity is the one it started with, and its weights are not
    # loaded again over the checkpoint's.
    assert resume(tmp_path, folder(tmp_path, "tuned"), "--epochs", "2") == 0
    assert str(source) not in capsys.readouterr().out
    resumed = json.loads((folder(tmp_path, "tuned") / "args.json").read_text())
    assert resumed["init_from"] == str(source)
    # Weights of another network: the message names both sides.
    assert train(small_data, tmp_path, "misfit", "--epochs", "1", "--init-from", str(source),
                 "-att", "none") == 2
    assert f"{NET} + ema) does not fit this run's {NET} + none" in capsys.readouterr().err


def test_a_resume_that_changes_the_identity_is_a_mixed_run(finished_small_run, tmp_path, capsys):
    """Precision or data changed on resume: neither kind of run, so table.py lists it apart. On 4
    images in one batch: most CPUs emulate bf16, at seconds an image."""
    four = write_fake_cifar100(tmp_path / "four", n_train=4, n_test=4)
    assert train(four, tmp_path, "mixed", "--epochs", "1", "-b", "4") == 0
    run = folder(tmp_path, "mixed")
    other_data = write_fake_cifar100(tmp_path / "other", n_train=4, n_test=4, seed=1)
    assert resume(tmp_path, run, "--epochs", "2", "--amp", "bf16") == 0
    assert "amp off -> bf16 at epoch 2 step 0: a mixed run" in capsys.readouterr().out
    assert resume(tmp_path, run, "--epochs", "3", "--data", str(other_data)) == 0
    recorded = json.loads((run / "args.json").read_text())
    assert recorded["changed_on_resume"].startswith(
        "amp off -> bf16 at epoch 2 step 0; dataset custom-")
    assert recorded["changed_on_resume"].endswith(" at epoch 3 step 0")
    identity = run_records.run_identity(recorded)
    assert not run_records.in_paper_rows(
        identity) and "changed_on_resume=amp off -> bf16" in run_records.label(identity)
    unchanged = copy_run(finished_small_run, tmp_path, "unchanged")
    assert resume(tmp_path, unchanged, "--epochs", "2") == 0
    assert "changed_on_resume" not in json.loads((unchanged / "args.json").read_text())


def test_odd_recorded_arguments_and_states_are_refused(finished_small_run, tmp_path, capsys):
    run = copy_run(finished_small_run, tmp_path, "odd")
    last = run / "last.pth"
    good = torch.load(last, weights_only=True)
    odd_args = [{"seed": 2 ** 70}, {"subset": "abc"}, {"amp": "fp8"}, {"channels_last": "yes"},
                {"lr": 0.0}]
    odd_states = [{"epoch": 1.5}, {"best": None}, {"history": "x"}, {"step": 99}]
    for change in [{"args": {**good["args"], **odd}} for odd in odd_args] + odd_states:
        torch.save({**good, **change}, last)
        assert resume(tmp_path, run, "--epochs", "2") == 2, change
        assert "error:" in capsys.readouterr().err
    assert resume(tmp_path, run / "best.pth", "--epochs", "2") == 2  # best.pth is not resumed
    assert "for test.py" in capsys.readouterr().err


def test_a_partial_dataset_folder_is_never_overwritten(tmp_path):
    root = write_fake_cifar100(tmp_path / "mine", n_train=8, n_test=8)
    (root / "cifar-100-python" / "test").unlink()
    train_bytes = (root / "cifar-100-python" / "train").read_bytes()
    with pytest.raises(utils.UserError, match="not test"):
        cifar.ensure_cifar100(root)
    assert (root / "cifar-100-python" / "train").read_bytes() == train_bytes


def test_an_extension_stopped_before_it_saves_leaves_the_finished_run(
        finished_small_run, tmp_path, monkeypatch, capsys):
    """--resume <finished run> --epochs 3, killed right after the banner: args.json still says
    what last.pth holds, so table.py lists the run as finished, reproduce.py as done, and a resume
    without --epochs says it is finished, as before the attempt."""
    run = copy_run(finished_small_run, tmp_path, "extended")
    before = (run / "args.json").read_text()

    def killed(self, stop):
        raise SystemError("killed")  # as a kill -9 right after the banner: nothing more runs

    monkeypatch.setattr(train_cifar100.Trainer, "train_epoch", killed)
    with pytest.raises(SystemError):
        resume(tmp_path, run, "--epochs", "3")
    monkeypatch.undo()
    assert (run / "args.json").read_text() == before
    assert run_records.read_run(run).finished
    assert resume(tmp_path, run) == 0
    assert "already finished 1/1 epochs" in capsys.readouterr().out
    # Extended for real, args.json follows last.pth.
    assert resume(tmp_path, run, "--epochs", "2") == 0
    assert json.loads((run / "args.json").read_text())["epochs"] == 2
    assert run_records.read_run(run).finished


@pytest.mark.parametrize("given", ["folder", "best.pth", "missing"])
def test_a_truncated_last_pth_resumes_from_best_pth_and_says_what_was_lost(
        finished_small_run, tmp_path, capsys, given):
    run = copy_run(finished_small_run, tmp_path, "truncated")
    data = (run / "last.pth").read_bytes()
    (run / "last.pth").write_bytes(data[:len(data) // 2])
    if given == "missing":
        (run / "last.pth").unlink()
    target = run / "best.pth" if given == "best.pth" else run
    assert resume(tmp_path, target, "--epochs", "2") == 0
    err = capsys.readouterr().err  # at once: a resume that finds the run finished says it too
    assert (f"cannot read checkpoint {run / 'last.pth'}" if given != "missing"
            else f"{run / 'last.pth'} is missing") in err
    assert f"resuming from {run / 'best.pth'} instead, the run's best epoch (1)" in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
    assert run_records.read_run(run).finished and len(run_records.read_run(run).rows) == 2


def test_an_empty_last_pth_is_one_line_that_says_so(tmp_path, capsys):
    (tmp_path / "last.pth").write_bytes(b"")
    assert train_cifar100.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read checkpoint") and "(truncated or damaged?)" in err
    assert len(err.splitlines()) == 1


def test_a_folder_named_like_an_event_file_is_left_alone(finished_small_run, tmp_path, capsys):
    """A directory (or a FIFO) in the run's log folder named like TensorBoard's event files: the
    resume, which rewrites the event files, leaves it alone with one line."""
    run = copy_run(finished_small_run, tmp_path, "odd-logs")
    odd = folder(tmp_path, "odd-logs", "runs") / "events.out.tfevents.0.elsewhere"
    odd.mkdir()
    assert resume(tmp_path, run, "--epochs", "2") == 0
    assert (f"note: {odd} is named like a TensorBoard event file but is not a file: left alone"
            in capsys.readouterr().err)
    assert odd.is_dir()


def test_a_finished_run_resumed_with_fewer_epochs_says_so_plainly(finished_small_run, tmp_path,
                                                                  capsys):
    run = copy_run(finished_small_run, tmp_path, "two")
    assert resume(tmp_path, run, "--epochs", "2") == 0
    capsys.readouterr()
    assert resume(tmp_path, run, "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "already finished 2 epochs, more than --epochs 1; raise --epochs" in out



@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_file_that_is_not_a_file_is_one_line(finished_small_run, tmp_path, capsys, kind):
    run = copy_run(finished_small_run, tmp_path, "locked")
    lock = run / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    assert resume(tmp_path, run, "--epochs", "2") == 2
    assert f"{lock} is not a file" in capsys.readouterr().err


def test_last_pth_and_args_json_land_together_even_with_a_second_ctrl_c(tmp_path, monkeypatch):
    """A second stop signal between the two renames waits for both: args.json never says one
    run's epochs beside another's last.pth."""
    folder_ = run_folder.RunFolder.__new__(run_folder.RunFolder)
    folder_.active, folder_.ckpt_dir = True, tmp_path
    real_replace, renamed = os.replace, []

    def interrupted_between(source, target):
        real_replace(source, target)
        renamed.append(Path(target).name)
        if len(renamed) == 1:  # as if a second Ctrl-C came right after the first rename
            with stopping.StopSignals() as stops:
                with stops.training(announce=False):
                    stops.signal = signal.SIGINT
                    stops._handle(signal.SIGINT, None)

    monkeypatch.setattr(run_folder.os, "replace", interrupted_between)
    with pytest.raises(stopping.Interrupted):
        folder_.save("last.pth", {"args": {"epochs": 3}, "epoch": 2})
    assert sorted(renamed) == ["args.json", "last.pth"]
    assert json.loads((tmp_path / "args.json").read_text())["epochs"] == 3
