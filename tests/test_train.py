"""train_cifar100.py and test.py end to end on a tiny dataset in CIFAR-100's on-disk format."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import utils
from conf import settings
from training import cifar, loaders, recipes, run_folder

import test as test_script
import train_cifar100
from fake_cifar import write_fake_cifar100
from tiny_net import NET, command

ROOT = Path(__file__).resolve().parents[1]
# The suite's tiny ResNet (tests/tiny_net.py) + EMA, 24 images in batches of 8: 3 steps per epoch.
TINY = ["-net", NET, "-att", "ema", "-b", "8", "-lr", "0.02", "--seed", "0"]
# for the script itself, without tiny_net
PAPER_NET = ["-net", "resnet18", "-att", "ema", "-b", "8"]
TAGS = {"Train/loss", "Train/top1", "Train/lr", "Test/loss", "Test/top1", "Test/top5"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("data"), n_train=24, n_test=8)


def out_args(base: Path, run: str):
    return ["--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs"),
            "--run-name", run]


def run_dir(base: Path, run: str, kind="checkpoint"):
    return base / kind / f"{NET}_ema" / run


def train(data_root, base, run, *extra):
    return train_cifar100.main(TINY + ["--data", str(data_root)] + out_args(base, run)
                               + list(extra))


def read_metrics(folder: Path):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def scalars(log_folder: Path):
    acc = EventAccumulator(str(log_folder))
    acc.Reload()
    return acc, {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def weights(path: Path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory, skip_tensorboard_graphs):
    """One uninterrupted two-epoch run, with its TensorBoard graph, and the warnings it raised."""
    import warnings
    base = tmp_path_factory.mktemp("reference")
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder.RunFolder, "graph", skip_tensorboard_graphs)
        warnings.simplefilter("always")
        assert train(data_root, base, "ref", "--epochs", "2") == 0
    return base, [w for w in caught if "not the official CIFAR-100 file" not in str(w.message)]


def test_two_epochs_write_everything(reference, capsys):
    base, other_warnings = reference
    folder = run_dir(base, "ref")
    assert (folder / "last.pth").is_file() and (folder / "best.pth").is_file()
    assert json.loads((folder / "args.json").read_text())["net"] == NET
    assert not list(folder.glob("*.tmp"))
    rows = read_metrics(folder)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1",
                            "test_top5", "seconds"}
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    # No PyTorch (or other) warnings beyond ours about the unofficial dataset.
    assert not other_warnings, [str(w.message) for w in other_warnings]

    acc, steps = scalars(run_dir(base, "ref", "runs"))
    assert TAGS <= set(steps) and all(steps[tag] == [1, 2] for tag in TAGS)
    assert {"hparam/final_top1", "hparam/best_top1"} <= set(steps)
    assert acc.Graph() is not None
    assert acc.PluginTagToContent("hparams")  # the hyper-parameters with the final metrics

    checkpoint = weights(folder / "last.pth")
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 0
    assert checkpoint["args"]["recipe"] == "paper" and checkpoint["args"]["warm"] == 0
    best = weights(folder / "best.pth")
    assert best["best"]["top1"] == max(float(r["test_top1"]) for r in rows)

    # test.py reads the run folder (its last.pth) and reproduces the logged test accuracy.
    capsys.readouterr()
    assert test_script.main(["-weights", str(folder), "--data", str(reference_data(folder))]) == 0
    out = capsys.readouterr().out
    top1_error = 100 - float(rows[-1]["test_top1"])
    assert f"top-1 error {top1_error:.2f}%" in out
    assert "1,253,010 (all)" in out and "MFLOPs" in out  # tests/tiny_net.py's network + EMA
    assert "MFLOPs per 32x32 image (EMA as its authors compute it; this repo's EMA runs " in out


def reference_data(folder: Path):
    return weights(folder / "last.pth")["args"]["data"]


def test_resume_is_bitwise_identical(reference, data_root, tmp_path):
    ref_base, _ = reference
    assert train(data_root, tmp_path, "split", "--epochs", "1") == 0
    assert train_cifar100.main(["--resume", str(run_dir(tmp_path, "split")), "--epochs", "2",
                                "--log-dir", str(tmp_path / "runs")]) == 0
    expected, got = weights(run_dir(ref_base, "ref") / "last.pth"), weights(
        run_dir(tmp_path, "split") / "last.pth")
    assert got["epoch"] == 2
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    assert torch.equal(expected["optimizer"]["state"][0]["momentum_buffer"],
                       got["optimizer"]["state"][0]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(read_metrics(run_dir(tmp_path,
                                      "split"))) == strip(read_metrics(run_dir(ref_base, "ref")))
    _, steps = scalars(run_dir(tmp_path, "split", "runs"))
    assert all(steps[tag] == [1, 2] for tag in TAGS)


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_sigterm_mid_epoch_saves_and_resumes_exactly(loader, tmp_path):
    # 15 steps an epoch: the signal, sent when the header is printed, lands within the first epoch
    # even if this process waits a second to send it.
    data = write_fake_cifar100(tmp_path / "data", n_train=120, n_test=8)
    assert train(data, tmp_path, "ref", "--epochs", "2", "--loader", loader) == 0
    cmd = command("train_cifar100.py", *TINY, "--data", str(data), *out_args(tmp_path, "killed"),
                  "--epochs", "2", "--loader", loader)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the header is printed once Ctrl-C/SIGTERM are handled
        if "checkpoints in" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume with" in out and "--resume" in out
    saved = weights(run_dir(tmp_path, "killed") / "last.pth")
    assert saved["epoch"] == 0 and 1 <= saved["step"] < 15  # stopped inside the first epoch
    assert saved["args"]["loader"] == loader

    assert train_cifar100.main(["--resume", str(run_dir(tmp_path, "killed")), "--log-dir",
                                str(tmp_path / "runs")]) == 0
    expected = weights(run_dir(tmp_path, "ref") / "last.pth")["model"]
    got = weights(run_dir(tmp_path, "killed") / "last.pth")["model"]
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    _, steps = scalars(run_dir(tmp_path, "killed", "runs"))
    assert all(steps[tag] == [1, 2] for tag in TAGS)


def test_sigterm_during_start_up_stops_with_a_message(data_root, tmp_path, monkeypatch, capsys):
    """Before the loop can save a checkpoint, SIGTERM stops as Ctrl-C does: one line, 128 + 15,
    nothing written, and the caller's SIGTERM handler back afterwards."""
    def terminated_before_outputs(self):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_cifar100.Trainer, "open_outputs", terminated_before_outputs)
    before = signal.getsignal(signal.SIGTERM)
    assert train(data_root, tmp_path, "run", "--epochs", "1") == 128 + signal.SIGTERM
    assert ("SIGTERM: stopped; the newest last.pth (if any) is from before it"
            in capsys.readouterr().err)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "runs").exists()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_script_loads_ends_it_with_one_line(sig, data_root, tmp_path):
    """torch takes seconds to import: a signal then ends the script with one line and 128 + the
    signal, not a silent kill (SIGTERM) or a traceback (Ctrl-C)."""
    # As from a terminal: a suite started with & ignores SIGINT, and so would the script (rightly).
    # A signal with a handler here is back to its default in the script (exec resets it).
    ignored = signal.getsignal(sig) is signal.SIG_IGN
    before = signal.signal(sig, signal.default_int_handler) if ignored else None
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_cifar100.py"), *PAPER_NET,
                                 "--data", str(data_root), "--epochs", "1",
                                 *out_args(tmp_path, "run")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if ignored:
            signal.signal(sig, before)
    time.sleep(0.5)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 128 + sig, err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"{signal.Signals(sig).name}: stopped while loading; nothing was written"], err
    assert not (tmp_path / "checkpoint").exists()


def test_resume_newest_run_of_net_and_attention(reference, data_root, tmp_path, capsys):
    assert train(data_root, tmp_path, "older", "--epochs", "1") == 0
    assert train(data_root, tmp_path, "newer", "--epochs", "1") == 0
    os.utime(run_dir(tmp_path, "older") / "last.pth", (0, 0))
    capsys.readouterr()
    assert train_cifar100.main(["-net", NET, "-att", "ema", "-resume", "--epochs", "1",
                                "--checkpoint-dir", str(tmp_path / "checkpoint")]) == 0
    assert "newer" in capsys.readouterr().out  # already finished: reported, nothing trained


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
        data_root, tmp_path, monkeypatch, capsys):
    assert train(data_root, tmp_path, "nan", "--epochs", "1") == 0
    last = run_dir(tmp_path, "nan") / "last.pth"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    real_cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def diverging(*a, **kw):
        calls.append(1)
        loss = real_cross_entropy(*a, **kw)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    assert train_cifar100.main(["--resume", str(last), "--epochs", "2", "--log-dir",
                                str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite at epoch 2, step 3" in err and str(last) in err
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("argv,message", [
    (["-net", "vgg16"], ("invalid choice: 'vgg16'", "resnet18", "resnet152")),
    (["-att", "bam"], ("invalid choice: 'bam'", "none", "ema", "cbam")),
    (["-b", "0"], "must be positive"),
    (["--epochs", "-3"], "must be positive"),
    (["-lr", "0"], "must be positive"),
    (["-lr", "nan"], "must be positive"),
    (["-b", "many"], "expected a whole number"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cifar100.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(part in err for part in ([message] if isinstance(message, str) else message)), err


def test_missing_data_without_network(tmp_path, monkeypatch, capsys):
    def no_network(*a, **kw):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(cifar.torchvision.datasets, "CIFAR100", no_network)
    assert train_cifar100.main(TINY + ["--data", str(tmp_path / "nowhere")]
                               + out_args(tmp_path, "x")) == 2
    err = capsys.readouterr().err
    assert (str(tmp_path / "nowhere") in err
            and "cifar-100-python/ with the files train, test and meta" in err)
    assert not (tmp_path / "checkpoint").exists()


def test_unwritable_output_folder(data_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = TINY + ["--data", str(data_root), "--checkpoint-dir", str(blocker), "--log-dir",
                   str(tmp_path / "runs")]
    assert train_cifar100.main(argv) == 2
    assert f"cannot write to {blocker}" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
    # An unwritable log folder: the checkpoint folders made a moment before go again.
    argv = TINY + ["--data", str(data_root), "--checkpoint-dir", str(tmp_path / "ckpt"),
                   "--log-dir", str(blocker)]
    assert train_cifar100.main(argv) == 2
    assert f"cannot write to {blocker}" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_unreadable_and_corrupt_checkpoints(tmp_path, capsys):
    assert train_cifar100.main(["--resume", str(tmp_path / "missing.pth")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(2048))
    assert train_cifar100.main(["--resume", str(corrupt)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert test_script.main(["-weights", str(corrupt)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


class SideEffect:
    """Unpickling this runs a shell command: a checkpoint holding it must never be executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"model": SideEffect(marker), "args": {}}, evil)
    assert train_cifar100.main(["--resume", str(evil)]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert test_script.main(["-weights", str(evil)]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_test_py_rejects_another_architecture(reference, capsys):
    base, _ = reference
    folder = run_dir(base, "ref")
    assert test_script.main(["-net", "resnet34", "-weights", str(folder / "best.pth")]) == 2
    assert f"holds {NET} + ema, not the requested resnet34 + ema" in capsys.readouterr().err


def test_errors_are_messages_not_tracebacks(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar100.py"), "--resume",
                             str(tmp_path / "none.pth")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no checkpoint at") and "Traceback" not in result.stderr


def test_lr_schedule():
    spe = 10
    paper = [recipes.lr_factor(s, spe, warm_epochs=0) for s in range(200 * spe)]
    assert paper[0] == 1 and paper[60 * spe - 1] == 1
    assert paper[60 * spe] == pytest.approx(0.2) and paper[120 * spe] == pytest.approx(0.04)
    assert paper[160 * spe] == pytest.approx(0.008) and paper[-1] == pytest.approx(0.008)
    classic = [recipes.lr_factor(s, spe, warm_epochs=1) for s in range(2 * spe)]
    assert classic[0] == pytest.approx(0.1)  # the first step does not run at LR 0
    assert classic[spe - 1] == 1 and classic[spe] == 1
    assert all(a < b for a, b in zip(classic[:spe - 1], classic[1:spe]))


def test_recipes_transforms_and_init():
    paper, classic = settings.RECIPES["paper"], settings.RECIPES["classic"]
    assert "RandomRotation" not in repr(loaders.train_transform(paper))
    assert "RandomRotation(degrees=[-15.0, 15.0]" in repr(loaders.train_transform(classic))
    assert f"mean={settings.CIFAR10_MEAN}" in repr(loaders.test_transform(paper))
    assert "RandomCrop" not in repr(loaders.test_transform(paper))

    import models
    torch.manual_seed(0)
    model = models.create_model("resnet18", "ema")
    conv = model.layer4[0].residual[3]
    fan_in = conv.weight[0].numel()
    assert conv.weight.abs().max() <= 1 / fan_in ** 0.5  # PyTorch's default bound
    recipes.initialise(model, paper)
    # kaiming_uniform_ bound
    assert 1.5 / fan_in ** 0.5 < conv.weight.abs().max() <= (6 / fan_in) ** 0.5
    ema_conv = model.layer1[0].attention.conv3x3
    assert ema_conv.weight.abs().max() > 1.5 / ema_conv.weight[0].numel() ** 0.5


def test_unofficial_dataset_loads_with_a_warning(data_root, monkeypatch, capsys):
    # an earlier test may have loaded data_root
    monkeypatch.setattr(cifar, "_reported_unofficial", set())
    dataset = cifar.CIFAR100Folder(data_root, train=True)
    assert "not the official CIFAR-100 file" in capsys.readouterr().err
    image, label = dataset[0]
    assert image.size == (32, 32) and 0 <= label < 100
    assert dataset.data.shape == (24, 32, 32, 3) and len(dataset.classes) == 100


def test_dataset_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_fake_cifar100(tmp_path, n_train=4, n_test=4)
    marker = tmp_path / "executed"
    with open(folder / "train", "wb") as f:
        import pickle
        pickle.dump({b"data": SideEffect(marker), b"fine_labels": [0]}, f, protocol=2)
    with pytest.raises(utils.UserError, match="refused posix.system|refused os.system"):
        cifar.CIFAR100Folder(tmp_path, train=True)
    assert not marker.exists()


def test_numpy1_pickles_like_the_official_files_load(tmp_path):
    # The official files were written by NumPy 1 under Python 2: their arrays name numpy.core.
    write_fake_cifar100(tmp_path, n_train=8, n_test=8)
    train = tmp_path / "cifar-100-python" / "train"
    original = cifar.CIFAR100Folder(tmp_path, train=True).data
    train.write_bytes(train.read_bytes().replace(b"cnumpy._core.multiarray\n",
                                                 b"cnumpy.core.multiarray\n"))
    assert b"cnumpy.core.multiarray\n" in train.read_bytes()
    assert (cifar.CIFAR100Folder(tmp_path, train=True).data == original).all()


def test_paper_recipe_uses_the_nam_scripts_exact_statistics():
    # The NAM authors' script normalizes CIFAR-100 with CIFAR-10's statistics, to these digits.
    paper = settings.RECIPES["paper"]
    assert paper["mean"] == (0.49139968, 0.48215827, 0.44653124)
    assert paper["std"] == (0.24703233, 0.24348505, 0.26158768)

