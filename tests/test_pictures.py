"""Grad-CAM (pictures.py, gradcam.py) and the EMA gate images in TensorBoard."""
import gc
import os
import weakref

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import models
from conf import settings
from training import checkpoints, cifar, loaders, pictures

import gradcam
import train_cifar100
from fake_cifar import write_fake_cifar100, write_meta
from tiny_net import NET


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """The suite's tiny ResNet + EMA trained 2 epochs with gate images on, and a 1-epoch run with
    them off."""
    base = tmp_path_factory.mktemp("pictures")
    common = ["-net", NET, "-att", "ema", "-b", "8", "-lr", "0.02", "--data", str(small_data),
              "--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs")]
    assert train_cifar100.main(common
                               + ["--epochs", "2", "--gate-images", "1", "--run-name", "on"]) == 0
    assert train_cifar100.main(common + ["--epochs", "1", "--run-name", "off"]) == 0
    return base, small_data


def image_tags(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc, acc.Tags()["images"]


def test_gate_images_in_tensorboard_only_when_asked(trained):
    base, _ = trained
    acc, tags = image_tags(base / "runs" / f"{NET}_ema" / "on")
    assert set(tags) == {f"EMA gates/layer{i}" for i in range(1, 5)}
    assert [event.step for event in acc.Images("EMA gates/layer4")] == [1, 2]
    assert acc.Images("EMA gates/layer1")[0].width > 2 * 32  # images and gates side by side
    assert image_tags(base / "runs" / f"{NET}_ema" / "off")[1] == []


def test_grad_cam_maps(trained):
    base, data = trained
    model, checkpoint, _ = checkpoints.load_trained_model(base / "checkpoint" / f"{NET}_ema" / "on")
    model.eval()
    recipe = settings.RECIPES[checkpoint["args"]["recipe"]]
    dataset = cifar.CIFAR100Folder(data, train=False)
    images, _ = next(iter(loaders.make_loader("device", dataset, 8, recipe, torch.device("cpu"),
                                              train=False)))
    cams, predicted = pictures.grad_cam(model, images)
    assert cams.shape == (8, 32, 32) and predicted.shape == (8,)
    assert cams.min() >= 0 and cams.max() <= 1
    spread = cams.flatten(1).std(1)
    assert (spread > 0.05).all(), spread  # not constant: the trained model looks somewhere
    assert torch.equal(predicted, model(images).argmax(1))


def test_gradcam_png(trained, tmp_path, capsys):
    base, data = trained
    out = tmp_path / "cam.png"
    argv = ["-weights", str(base / "checkpoint" / f"{NET}_ema" / "on"), "--images", "6",
            "--columns", "3",
            "--data", str(data), "--out", str(out)]
    assert gradcam.main(argv) == 0
    with Image.open(out) as image:
        image.verify()
    side = 32 * pictures.SCALE
    with Image.open(out) as image:
        assert image.size == (3 * (2 * side + pictures.GAP) - pictures.GAP,
                              2 * (side + pictures.CAPTION))
    assert "on 6 test images" in capsys.readouterr().out


# A few pairs, not all 48: the baseline, EMA in a basic block, in a Bottleneck and in MobileNetV2's
# stages, and another module. tests/test_models.py runs every pair forward and backward.
@pytest.mark.parametrize("net, attention",
                         [("resnet18", "none"), ("resnet18", "ema"), ("resnet50", "ema"),
                          ("mobilenetv2", "ema"), ("resnet18", "sa")])
def test_grad_cam_works_for_representative_pairs(net, attention):
    torch.manual_seed(0)
    model = models.create_model(net, attention).eval()
    cams, _ = pictures.grad_cam(model, torch.randn(2, 3, 32, 32))
    assert cams.shape == (2, 32, 32) and cams.min() >= 0 and cams.max() <= 1


def test_grad_cam_leaves_nothing_behind():
    """No hook stays on the model, nothing keeps the last stage's output (and with it the graph: it
    once leaked 330 MB a call on ResNet101), the parameters' .grad stay unset."""
    model = models.create_model("resnet18", "ema").eval()
    last_stage = list(models.stage_ends(model).values())[-1]
    outputs = []
    spy = last_stage.register_forward_hook(
        lambda module, inputs, output: outputs.append(weakref.ref(output)))
    cams, _ = pictures.grad_cam(model, torch.randn(2, 3, 32, 32))
    spy.remove()
    gc.collect()  # a leak through a reference cycle that the collector can see is no leak
    assert len(outputs) == 1 and outputs[0]() is None
    assert not cams.requires_grad
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks
                   for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_rejects_another_architecture(trained, capsys):
    base, data = trained
    argv = ["-net", "resnet34", "-weights", str(base / "checkpoint" / f"{NET}_ema" / "on"),
            "--data", str(data)]
    assert gradcam.main(argv) == 2
    assert f"holds {NET} + ema, not the requested resnet34 + ema" in capsys.readouterr().err


def assert_refused(argv, message, capsys, out_folder):
    """gradcam.main(argv): exit code 2, one line on stderr holding `message`, nothing written."""
    assert gradcam.main(argv) == 2  # an exception (a traceback from the script) would fail here
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(out_folder.iterdir()) == []


@pytest.mark.parametrize("names, message", [(None, "has no list fine_label_names"),
                                            ([f"class_{i}".encode() for i in range(3)],
                                             "names 3 classes")])
def test_gradcam_refuses_a_meta_without_a_name_for_every_label(
        trained, tmp_path, capsys, names, message):
    base, _ = trained
    data = write_fake_cifar100(tmp_path / "data", n_train=8, n_test=8)  # labels 0..4
    write_meta(data, names)
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    argv = ["-weights", str(base / "checkpoint" / f"{NET}_ema" / "on"), "--data", str(data),
            "--out", str(out_folder / "cam.png")]
    assert_refused(argv, message, capsys, out_folder)


ROOT_WRITES_ANYWHERE = os.name != "posix" or os.geteuid() == 0


@pytest.mark.parametrize("out, folder_mode, message", [
    ("cam.xyz", 0o755, "PIL writes no image format with that extension"),
    ("missing/cam.png", 0o755, "is not a folder we can write into"),
    pytest.param("cam.png", 0o555, "is not a folder we can write into", id="read-only folder",
                 marks=pytest.mark.skipif(ROOT_WRITES_ANYWHERE,
                                          reason="root writes into read-only folders")),
])
def test_gradcam_refuses_an_out_it_cannot_write_before_any_work(
        tmp_path, capsys, out, folder_mode, message):
    out_folder = tmp_path / "out"
    out_folder.mkdir(mode=folder_mode)
    # No checkpoint and no dataset either: the --out check comes first, so only it is reported.
    argv = ["-weights", str(tmp_path / "no-checkpoint"), "--data", str(tmp_path / "no-data"),
            "--out", str(out_folder / out)]
    assert_refused(argv, message, capsys, out_folder)
