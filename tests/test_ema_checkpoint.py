"""A checkpoint trained before EMA's 3x3 branch was computed by algebra (docs/reference.md, 2.2 EMA)
gives the same logits and the same test accuracy with today's code.

The fixture, tests/fixtures/ema_before_algebra.pt, was written by this file run as a script,
`python tests/test_ema_checkpoint.py`, at commit c0b0556 (EMA's 3x3 branch a k -> k grouped
convolution): three epochs of train_cifar100.py, fp32 on the CPU, on a fake CIFAR-100 of 512
training and 128 test images of the same 50 classes (tests/fake_cifar.py's images, seed 0) with a
small ResNet + EMA (one BasicBlock per stage, 64 channels each: k = 2 at every stage), so that the
file stays near 1 MB. It holds the run's last.pth without its optimizer state, the logits of the 128
test images, and test.py's top-1/top-5 on them. Rerunning the script now would record today's code,
not the old: it is the record of how the file was made.
"""
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ema_before_algebra.pt"
NET = "resnet_ema_fixture"
TRAIN, TEST, CLASSES = 512, 128, 50


def register():
    from models.resnet import RESNETS, BasicBlock, ResNetSpec
    RESNETS.setdefault(NET, ResNetSpec(BasicBlock, (1, 1, 1, 1), (64, 64, 64, 64)))


def images():
    """(data, labels) of the training and test images together: one draw, so that both splits share
    the classes' colours."""
    from fake_cifar import make_images
    return make_images(TRAIN + TEST, CLASSES, seed=0)


def write_data(root):
    from fake_cifar import write_meta, write_split
    data, labels = images()
    write_split(root, "train", data[:TRAIN], [int(x) for x in labels[:TRAIN]])
    write_split(root, "test", data[TRAIN:], [int(x) for x in labels[TRAIN:]])
    write_meta(root, [f"class_{i}".encode() for i in range(100)])
    return root


def held_out_images():
    return images()[0][TRAIN:]


def normalized(data, saved):
    images = torch.from_numpy(data).float().div(255).view(-1, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (saved["mean"], saved["std"]))
    return (images - mean) / std


def run_test_script(weights, data_root):
    import test as test_script
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert test_script.main(["-weights", str(weights), "--data", str(data_root), "--amp",
                                 "off"]) == 0
    return next(line for line in out.getvalue().splitlines() if line.startswith("top-1 error"))


def test_a_checkpoint_from_before_the_algebra_gives_the_same_logits_and_accuracy(tmp_path):
    from training import checkpoints

    register()
    fixture = torch.load(FIXTURE, weights_only=True)
    weights = tmp_path / "last.pth"
    torch.save(fixture["checkpoint"], weights)
    model, checkpoint, _ = checkpoints.load_trained_model(weights)
    with torch.no_grad():
        logits = model.eval()(normalized(held_out_images(), checkpoint["args"]))
    # float32 rounding: the old and new arithmetic differ in the order of their sums.
    scale = fixture["logits"].abs().max()
    torch.testing.assert_close(logits, fixture["logits"], rtol=0, atol=1e-5 * scale)
    assert torch.equal(logits.argmax(1), fixture["logits"].argmax(1))
    # A trained checkpoint that is neither right nor wrong on every image (56.25% top-1 when made),
    # so that the same accuracy means something.
    assert 10 < fixture["top1"] < 90

    data_root = write_data(tmp_path / "data")
    assert run_test_script(weights, data_root) == fixture["test_line"]


def make():
    """Train the fixture's run with this checkout's code and write
    tests/fixtures/ema_before_algebra.pt."""
    import subprocess

    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    import train_cifar100

    register()
    with tempfile.TemporaryDirectory() as tmp:
        data_root = write_data(Path(tmp) / "data")
        assert train_cifar100.main([
            "-net", NET, "-att", "ema", "-b", "32", "-lr", "0.05", "--epochs", "3", "-warm", "0",
            "--seed", "0", "--amp", "off", "--data", str(data_root), "--run-name", "fixture",
            "--checkpoint-dir", str(Path(tmp) / "checkpoint"), "--log-dir",
            str(Path(tmp) / "runs")]) == 0
        last = Path(tmp) / "checkpoint" / f"{NET}_ema" / "fixture" / "last.pth"
        checkpoint = torch.load(last, weights_only=True)
        checkpoint.pop("optimizer", None)
        checkpoint.pop("scheduler", None)
        weights = Path(tmp) / "trimmed.pth"
        torch.save(checkpoint, weights)

        from training import checkpoints
        model, loaded, _ = checkpoints.load_trained_model(weights)
        with torch.no_grad():
            logits = model.eval()(normalized(held_out_images(), loaded["args"]))
        test_line = run_test_script(weights, data_root)
    top1 = float(test_line.split("top-1 ")[2].split("%")[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save({"checkpoint": checkpoint, "logits": logits, "test_line": test_line, "top1": top1,
                "commit": commit}, FIXTURE)
    print(f"{FIXTURE}: {FIXTURE.stat().st_size:,} bytes, commit {commit}, {test_line}")


if __name__ == "__main__":
    make()
