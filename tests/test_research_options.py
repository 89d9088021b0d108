"""What researchers ask an attention repo for, end to end on tiny data in each on-disk format:
placement ablations (--att-stages), their own data (--dataset cifar10 / folder), honest model
selection (--val), deterministic runs (--deterministic; on the CPU: nothing changes) and export to
ONNX (export.py; skipped where the ONNX packages are not installed)."""
import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training import cifar, image_folder, run_data, run_records

import export
import table
import test as test_script
import train_cifar100
from conftest import SMALL_RUN
from fake_cifar import write_fake_cifar10, write_image_folder
from test_runs import folder, resume, roots, snapshot, train
from tiny_net import NET


def train_on(data, base, run, *extra):
    return train_cifar100.main(SMALL_RUN + ["--data", str(data), "--run-name", run] + roots(base)
                               + list(extra))


def recorded(base, run) -> dict:
    return json.loads((folder(base, run) / "args.json").read_text())


# ---------------------------------------------------------------- --att-stages

def test_att_stages_are_recorded_and_followed_by_test_py_and_table_py(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "deep", "--epochs", "1", "--att-stages", "4,3") == 0
    run = folder(tmp_path, "deep")
    assert recorded(tmp_path, "deep")["att_stages"] == "3,4"
    capsys.readouterr()
    assert test_script.main(["-weights", str(run / "best.pth")]) == 0
    # The tiny network's baseline of 1,252,100 and EMA's 10 k^2 + 4 k (k = c/32) in its one block of
    # stage 3 (k = 4) and of stage 4 (k = 8): 176 + 672.
    assert "parameters 1,252,948 (all)" in capsys.readouterr().out
    assert table.main(["--checkpoint-dir", str(tmp_path / "checkpoint"), "--out",
                       str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "att_stages=3,4" in out and "1.25M" in out


# ---------------------------------------------------------------- --dataset

def test_cifar10_trains_tests_and_resumes_with_its_own_classes_and_statistics(tmp_path, capsys):
    data = write_fake_cifar10(tmp_path / "data")
    assert train_on(data, tmp_path, "ten", "--dataset", "cifar10", "--epochs", "1") == 0
    args = recorded(tmp_path, "ten")
    assert (args["data_format"], args["classes"]) == ("cifar10",
                                                      10) and args["dataset"].startswith("custom-")
    assert args["mean"] == pytest.approx([0.49139968, 0.48215827, 0.44653124])
    state = torch.load(folder(tmp_path, "ten") / "last.pth", weights_only=True)
    assert state["model"]["fc.weight"].shape[0] == 10
    assert resume(tmp_path, folder(tmp_path, "ten"), "--epochs", "2") == 0
    capsys.readouterr()
    assert test_script.main(["-weights", str(folder(tmp_path, "ten"))]) == 0
    assert "after 2 epochs, 20 test images" in capsys.readouterr().out


def test_a_custom_cifar10_set_is_named_so_and_older_records_of_it_still_match(tmp_path, capsys):
    """table.py shows CIFAR-10 runs as CIFAR-10, not like a custom CIFAR-100 folder; a run that
    recorded the set before it was named so resumes as the same data, not as a mixed run."""
    data = write_fake_cifar10(tmp_path / "data")
    assert train_on(data, tmp_path, "ten", "--dataset", "cifar10", "--epochs", "1") == 0
    named = recorded(tmp_path, "ten")["dataset"]
    assert named.startswith("custom-cifar-10-") and len(named) == len("custom-cifar-10-") + 8
    assert f"dataset={named}" in run_records.label(run_records.run_identity(
        recorded(tmp_path, "ten")))
    last = folder(tmp_path, "ten") / "last.pth"
    state = torch.load(last, weights_only=True)
    state["args"]["dataset"] = "custom-" + named[-8:]  # as recorded before
    torch.save(state, last)
    assert resume(tmp_path, folder(tmp_path, "ten"), "--epochs", "2") == 0
    assert "mixed run" not in capsys.readouterr().out
    assert "changed_on_resume" not in recorded(tmp_path, "ten")


def test_the_other_cifar_in_data_is_named_with_its_flag(small_data, tmp_path, monkeypatch, capsys):
    """--dataset cifar100 (the default) on a folder of CIFAR-10: the refusal says --dataset cifar10
    where the command chose the dataset; a resume and test.py, which follow the run's, say whose it
    is."""
    data = write_fake_cifar10(tmp_path / "data")

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(cifar, "_download", offline)
    assert train_on(data, tmp_path, "c100", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert ("could not be downloaded (OSError: no network). " in err
            and "holds CIFAR-10: for it, pass --dataset cifar10." in err)
    assert len(err.strip().splitlines()) == 1 and not (data / cifar.CIFAR100.folder).exists()
    assert train_on(data / cifar.CIFAR10.folder, tmp_path, "inner", "--epochs", "1") == 2
    assert (f"is CIFAR-10's own folder: point --data at {data} and pass --dataset cifar10"
            in capsys.readouterr().err)
    assert not (tmp_path / "checkpoint").exists()

    assert train_on(small_data, tmp_path, "run", "--epochs", "1") == 0  # a CIFAR-100 run
    run = folder(tmp_path, "run")
    capsys.readouterr()
    for command in (lambda: resume(tmp_path, run, "--epochs", "2", "--data", str(data)),
                    lambda: test_script.main(["-weights", str(run), "--data", str(data)])):
        assert command() == 2
        err = capsys.readouterr().err
        assert "holds CIFAR-10: the run is CIFAR-100's." in err and "--dataset" not in err, err
    assert test_script.main(["-weights", str(run), "--data", str(data / cifar.CIFAR10.folder)]) == 2
    assert "is CIFAR-10's own folder: point --data at" in capsys.readouterr().err
    monkeypatch.setattr(cifar, "_download", lambda root, form: None)  # a download that worked
    cifar.ensure(data, cifar.CIFAR100)
    assert capsys.readouterr().err == (
        f"note: CIFAR-100 was not in {data}, so it was downloaded there. {data} holds "
        f"CIFAR-10: for it, pass --dataset cifar10.\n")


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_an_image_folder_trains_tests_and_resumes_and_is_decoded_once(
        tmp_path, monkeypatch, capsys, test_name):
    data = write_image_folder(tmp_path / "images", test_name=test_name)
    assert train_on(data, tmp_path, "own", "--dataset", "folder", "--epochs", "1") == 0
    args = recorded(tmp_path, "own")
    assert args["classes"] == 3 and args["dataset"].startswith("folder-")
    pixels = np.concatenate([image_folder.ImageFolderSplit(data, True).data]).reshape(-1, 3) / 255
    assert args["mean"] == pytest.approx(pixels.mean(0).tolist()) and args["std"] == pytest.approx(
        pixels.std(0).tolist())
    caches = [f".cache-32x32-{test_name}.npz", ".cache-32x32-train.npz"]
    assert sorted(p.name for p in data.glob(".cache-*")) == sorted(caches)

    def decode(*_):
        raise AssertionError("decoded again: the cache was not used")

    monkeypatch.setattr(image_folder, "decode", decode)
    assert resume(tmp_path, folder(tmp_path, "own"), "--epochs", "2") == 0
    capsys.readouterr()
    assert test_script.main(["-weights", str(folder(tmp_path, "own"))]) == 0
    assert "12 test images" in capsys.readouterr().out
    monkeypatch.undo()  # the other folders are decoded
    other = write_image_folder(tmp_path / "other", classes=("a", "b"))
    assert test_script.main(["-weights", str(folder(tmp_path, "own")), "--data", str(other)]) == 2
    assert f"{other} holds 2 classes; the checkpoint was trained on 3" in capsys.readouterr().err
    test_only = write_image_folder(tmp_path / "test-only", test_name=test_name)
    shutil.rmtree(test_only / "train")
    assert test_script.main(["-weights", str(folder(tmp_path, "own")), "--data",
                             str(test_only)]) == 0


def test_data_whose_class_names_differ_from_training_is_refused(tmp_path, capsys):
    """The same number of classes under other names would be scored against the wrong labels
    without a word: test.py (a test/-only folder too) and a resume refuse it, naming the first
    label that differs."""
    data = write_image_folder(tmp_path / "pets", n_train=6, n_test=3)
    assert train_on(data, tmp_path, "pets", "--dataset", "folder", "--epochs", "1") == 0
    run = folder(tmp_path, "pets")
    assert recorded(tmp_path, "pets")["class_names"] == ["cat", "dog", "emu"]
    other = write_image_folder(tmp_path / "other", n_train=6, n_test=3,
                               classes=("cat", "cow", "emu"))
    test_only = tmp_path / "test-only"
    shutil.copytree(other / "test", test_only / "test")
    capsys.readouterr()
    assert test_script.main(["-weights", str(run), "--data", str(test_only)]) == 2
    err = capsys.readouterr().err
    assert "does not hold the classes the run was trained on, in its order" in err
    assert "label 1 is 'cow' there, 'dog' in training" in err
    assert resume(tmp_path, run, "--epochs", "2", "--data", str(other)) == 2
    assert "label 1 is 'cow' there, 'dog' in training" in capsys.readouterr().err


def test_class_names_in_another_order_are_refused():
    """CIFAR's names come from its meta file, whose order could differ from the run's."""
    run_data.check_class_names(["a", "b"], None, "old run: nothing recorded")
    run_data.check_class_names(["a", "b"], ["a", "b"], "the same")
    with pytest.raises(run_data.UserError, match="label 0 is 'b' there, 'a' in training"):
        run_data.check_class_names(["b", "a"], ["a", "b"], "data")


def test_a_folder_split_equals_its_images_resized_once(tmp_path):
    from PIL import Image
    data = write_image_folder(tmp_path / "images")
    split = image_folder.ImageFolderSplit(data, train=False)
    assert split.classes == ["cat", "dog", "emu"]
    first = sorted((data / "test" / "cat").iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert split.data.shape[1:] == (32, 32, 3) and (
        split.data[0] == expected).all() and split.targets[0] == 0


def broken_folder(root: Path, how: str) -> Path:
    write_image_folder(root)
    if how == "an empty class folder":
        (root / "train" / "fox").mkdir()
        (root / "test" / "fox").mkdir()
        (root / "test" / "fox" / "1.png").write_bytes(
            (root / "test" / "cat").glob("*.png").__next__().read_bytes())
    elif how == "a file that is not an image":
        (root / "train" / "cat" / "notes.txt").write_text("not an image")
    elif how == "an unreadable image":
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    elif how == "other classes in test":
        (root / "test" / "dog").rename(root / "test" / "wolf")
    elif how == "no train folder":
        (root / "train").rename(root / "training")
    elif how == "a class folder not named in UTF-8":
        os.mkdir(os.fsencode(root / "train") + b"/caf\xe9")
        image = next((root / "train" / "cat").glob("*.png"))
        os.rename(image, os.fsencode(root / "train") + b"/caf\xe9/" + os.fsencode(image.name))
    elif how == "a FIFO among the images":
        os.mkfifo(root / "train" / "dog" / "stream.png")
    elif how == "an image not named in UTF-8":
        image = next((root / "train" / "dog").glob("*.png"))
        os.rename(image, os.fsencode(root / "train" / "dog") + b"/x\xfe.png")
    return root


def test_a_folder_of_odd_images_and_files(tmp_path, monkeypatch, capsys):
    """A channel that never varies (no division by 0), a damaged cache (decoded again), a dangling
    link and an image over PIL's size limit (one line each), a test/ folder alone for test.py."""
    from PIL import Image
    data = write_image_folder(tmp_path / "images")
    for path in data.rglob("*.png"):  # blue 0 everywhere
        rgb = np.asarray(Image.open(path).convert("RGB")).copy()
        rgb[..., 2] = 0
        Image.fromarray(rgb).save(path)
    for path in data.rglob("*.jpg"):
        path.unlink()
    train_set = image_folder.ImageFolderSplit(data, True)
    assert run_data.normalization("folder", "paper", train_set)[1][2] == pytest.approx(1 / 255)
    cache = data / ".cache-32x32-train.npz"
    cache.write_bytes(cache.read_bytes()[:1000])
    assert (image_folder.ImageFolderSplit(data, True).data == train_set.data).all()
    link = data / "train" / "cat" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(run_data.UserError, match="cannot read .*gone.png"):
        image_folder.ImageFolderSplit(data, True)
    link.unlink()
    monkeypatch.setattr(image_folder.Image, "MAX_IMAGE_PIXELS", 100)
    cache.unlink()
    with pytest.raises(run_data.UserError,
                       match="is not an image PIL can read .DecompressionBombError"):
        image_folder.ImageFolderSplit(data, True)


WHY = {"an empty class folder": "fox holds no images",
       "a file that is not an image": "notes.txt is not an image",
       "an unreadable image": "broken.png is not an image PIL can read",
       "other classes in test": "different classes (dog, wolf)",
       "no train folder": "has no train/ folder",
       "a class folder not named in UTF-8": "a class folder whose name is not valid UTF-8",
       "a FIFO among the images": "stream.png is not a regular file",
       "an image not named in UTF-8": "a file whose name is not valid UTF-8"}


@pytest.mark.parametrize("how", WHY)
def test_a_bad_image_folder_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, how):
    data = broken_folder(tmp_path / "images", how)
    assert train_on(data, tmp_path, "bad", "--dataset", "folder", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert WHY[how] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- --val

def test_the_validation_split_is_stratified_fixed_and_exact():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    kept, held = run_data.validation_split(targets, 10)
    assert len(held) == 10 and len(kept) == 90 and not set(kept) & set(held)
    assert np.bincount(np.asarray(targets)[held]).tolist() == [5, 3, 2]
    again_kept, again_held = run_data.validation_split(targets, 10)
    assert (again_held == held).all() and (again_kept == kept).all()
    # shares 3.5, 2.1, 1.4: the largest remainders round up
    _, seven = run_data.validation_split(targets, 7)
    assert len(seven) == 7 and np.bincount(np.asarray(targets)[seven]).tolist() == [4, 2, 1]


def test_a_subset_represents_every_class_and_says_how_it_was_drawn(tmp_path, capsys):
    """An image folder is listed class by class: --subset takes every class's share (stratified,
    seeded), not the first class or two, and records how; a run from before the draw was
    recorded resumes on the first N it trained on."""
    data = write_image_folder(tmp_path / "pets", n_train=24, n_test=6)
    assert train_on(data, tmp_path, "few", "--dataset", "folder", "--subset", "6",
                    "--epochs", "1") == 0
    args = recorded(tmp_path, "few")
    assert args["subset"] == 6 and args["subset_draw"] == "stratified"
    splits = run_data.open_splits(argparse.Namespace(**args))
    assert sorted(np.bincount(splits.train.targets).tolist()) == [2, 2, 2]
    again = run_data.open_splits(argparse.Namespace(**args))
    assert (again.train.data == splits.train.data).all()
    older = {key: value for key, value in args.items() if key != "subset_draw"}
    resumed = argparse.Namespace(**{**older, "resume": str(folder(tmp_path, "few"))})
    assert run_data.open_splits(resumed).train.targets == [0] * 6
    assert run_records.run_identity(older).subset_draw == "first"


def test_val_trains_on_the_rest_and_picks_best_pth_on_validation(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "val", "--epochs", "3", "--val", "6") == 0
    out = capsys.readouterr().out
    assert "10 training images" in out and "picked on the validation split" in out
    rows = list(csv.DictReader(open(folder(tmp_path, "val") / "metrics.csv")))
    assert {"val_loss", "val_top1"} <= rows[0].keys()
    best = max(rows, key=lambda r: float(r["val_top1"]))["epoch"]
    assert torch.load(folder(tmp_path, "val") / "best.pth", weights_only=True)["epoch"] == int(best)
    run = run_records.read_run(folder(tmp_path, "val"))
    assert run.best["epoch"] == int(best) and run.identity.val == 6
    assert "val=6" in run_records.label(run.identity).split(", ")


def test_val_that_holds_out_everything_is_refused(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "all", "--epochs", "1", "--val", "16") == 2
    assert "--val 16 holds out every training image (there are 16)" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


# ---------------------------------------------------------------- --deterministic

def test_deterministic_changes_nothing_on_the_cpu_and_says_so(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "plain", "--epochs", "1") == 0
    assert train(small_data, tmp_path, "det", "--epochs", "1", "--deterministic") == 0
    assert "--deterministic changes nothing here" in capsys.readouterr().out
    weights = [torch.load(folder(tmp_path, run) / "last.pth",
                          weights_only=True)["model"] for run in ("plain", "det")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert recorded(tmp_path, "det")["deterministic"] is True
    assert resume(tmp_path, folder(tmp_path, "plain"), "--epochs", "2", "--deterministic") == 0
    # nothing changes on the CPU, and nothing is said to
    assert "not bitwise" not in capsys.readouterr().out
    assert resume(tmp_path, folder(tmp_path, "det"), "--epochs", "2") == 0  # a resume keeps it
    assert recorded(tmp_path, "det")["deterministic"] is True


# ---------------------------------------------------------------- export.py

needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="export needs onnx, onnxscript and onnxruntime (requirements-export.txt)")


def a_checkpoint(path: Path, att: str, classes: int = 100) -> Path:
    """A checkpoint of this repo's format with random weights (export does not need training), of
    the suite's tiny network."""
    import models
    torch.manual_seed(0)
    model = models.create_model(NET, att, classes)
    for module in model.modules():  # BatchNorm statistics away from 0 and 1, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    args = {"net": NET, "att": att, "recipe": "paper", "classes": classes}
    torch.save({"format": 2, "model": model.state_dict(), "args": args, "epoch": 3}, path)
    return path


@needs_onnx
@pytest.mark.parametrize("att", ["none", "ema", "se", "cbam", "eca", "sa", "nam", "ca"])
def test_export_writes_onnx_that_onnxruntime_runs_like_pytorch(tmp_path, att, capsys):
    import onnx
    import onnxruntime

    from training import checkpoints
    weights = a_checkpoint(tmp_path / "model.pth", att)
    out = tmp_path / f"{att}.onnx"
    assert export.main(["-weights", str(weights), "--out", str(out)]) == 0
    assert "checked with onnxruntime at batches 1 and 7" in capsys.readouterr().out
    # no temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pth", out.name])
    model = checkpoints.load_trained_model(weights)[0].eval()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == (batch, 100) and np.abs(got - expected).max() <= 1e-3
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert metadata["att"] == att and metadata["epoch"] == 3 and len(metadata["mean"]) == 3


@needs_onnx
def test_export_refuses_what_it_cannot_write_and_keeps_nothing_half_written(
        tmp_path, monkeypatch, capsys):
    weights = a_checkpoint(tmp_path / "model.pth", "ema", classes=10)
    assert export.main(["-weights", str(weights), "--out",
                        str(tmp_path / "nowhere" / "m.onnx")]) == 2
    assert export.main(["-weights", str(weights), "--out", str(tmp_path / "m.pt")]) == 2
    (tmp_path / "a.onnx").mkdir()
    assert export.main(["-weights", str(weights), "--out", str(tmp_path / "a.onnx")]) == 2
    (tmp_path / "a.onnx").rmdir()
    monkeypatch.setattr(export, "check_with_onnxruntime", lambda model, path: 0.5)
    assert export.main(["-weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "differ from PyTorch's by up to 0.5 of their scale" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def a_diverged_checkpoint(path: Path) -> tuple[Path, str]:
    """a_checkpoint with one NaN weight, as a diverged run's; (its path, that weight's name)."""
    weights = a_checkpoint(path, "ema")
    checkpoint = torch.load(weights, weights_only=True)
    name = "stem.0.weight"  # the first convolution
    checkpoint["model"][name][0, 0, 0, 0] = math.nan
    torch.save(checkpoint, weights)
    return weights, name


@needs_onnx
def test_export_refuses_a_diverged_checkpoint(tmp_path, capsys):
    """NaN weights: the comparison with onnxruntime would pass (a NaN difference is never above a
    tolerance)."""
    weights, name = a_diverged_checkpoint(tmp_path / "model.pth")
    assert export.main(["-weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"{weights} holds NaN or infinite weights ({name}): a diverged run" in err
    assert not (tmp_path / "m.onnx").exists()


def test_test_py_flags_a_diverged_checkpoint(small_data, tmp_path, capsys):
    """Its 0% top-1 would read as a result."""
    weights, name = a_diverged_checkpoint(tmp_path / "model.pth")
    assert test_script.main(["-weights", str(weights), "--data", str(small_data)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {weights} holds NaN or infinite weights ({name})" in err
    assert "its scores below mean nothing" in err


def test_export_without_the_onnx_packages_says_what_to_install(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def without_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxscript"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnx)
    before = snapshot(tmp_path)
    assert export.main(["-weights", str(tmp_path / "missing.pth"), "--out",
                        str(tmp_path / "m.onnx")]) == 2
    assert "pip install -r requirements-export.txt" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
