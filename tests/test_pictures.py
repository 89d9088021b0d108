"""Grad-CAM (gradcam.py) and the EMA gate images in TensorBoard."""
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradcam
import cifar
import models
import train_cifar100
import utils
from conf import settings
from fake_cifar import write_fake_cifar100


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy ResNet18 + EMA trained 2 epochs with gate images on, and a 1-epoch run with them off."""
    base = tmp_path_factory.mktemp("pictures")
    data = write_fake_cifar100(base / "data", n_train=160, n_test=32)
    common = ["-net", "resnet18", "-att", "ema", "-b", "32", "-lr", "0.02", "--data", str(data),
              "--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs")]
    assert train_cifar100.main(common + ["--epochs", "2", "--gate-images", "1", "--run-name", "on"]) == 0
    assert train_cifar100.main(common + ["--epochs", "1", "--run-name", "off"]) == 0
    return base, data


def image_tags(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc, acc.Tags()["images"]


def test_gate_images_in_tensorboard_only_when_asked(trained):
    base, _ = trained
    acc, tags = image_tags(base / "runs" / "resnet18_ema" / "on")
    assert set(tags) == {f"EMA gates/layer{i}" for i in range(1, 5)}
    assert [event.step for event in acc.Images("EMA gates/layer4")] == [1, 2]
    assert acc.Images("EMA gates/layer1")[0].width > 2 * 32  # images and gates side by side
    assert image_tags(base / "runs" / "resnet18_ema" / "off")[1] == []


def test_grad_cam_maps(trained):
    base, data = trained
    model, checkpoint, _ = utils.load_trained_model(base / "checkpoint" / "resnet18_ema" / "on")
    model.eval()
    recipe = settings.RECIPES[checkpoint["args"]["recipe"]]
    dataset = cifar.CIFAR100Folder(data, train=False)
    images, _ = next(iter(cifar.make_loader("device", dataset, 8, recipe, torch.device("cpu"), train=False)))
    cams, predicted = gradcam.grad_cam(model, images)
    assert cams.shape == (8, 32, 32) and predicted.shape == (8,)
    assert cams.min() >= 0 and cams.max() <= 1
    spread = cams.flatten(1).std(1)
    assert (spread > 0.05).all(), spread  # not constant: the trained model looks somewhere
    assert torch.equal(predicted, model(images).argmax(1))


def test_gradcam_png(trained, tmp_path, capsys):
    base, data = trained
    out = tmp_path / "cam.png"
    argv = ["-weights", str(base / "checkpoint" / "resnet18_ema" / "on"), "--images", "6", "--columns", "3",
            "--data", str(data), "--out", str(out)]
    assert gradcam.main(argv) == 0
    with Image.open(out) as image:
        image.verify()
    side = 32 * gradcam.SCALE
    with Image.open(out) as image:
        assert image.size == (3 * (2 * side + gradcam.GAP) - gradcam.GAP, 2 * (side + gradcam.CAPTION))
    assert "on 6 test images" in capsys.readouterr().out


@pytest.mark.parametrize("attention", models.list_attentions())
@pytest.mark.parametrize("net", models.list_models())
def test_grad_cam_works_for_every_pair(net, attention):
    torch.manual_seed(0)
    model = models.create_model(net, attention).eval()
    cams, _ = gradcam.grad_cam(model, torch.randn(2, 3, 32, 32))
    assert cams.shape == (2, 32, 32) and cams.min() >= 0 and cams.max() <= 1


def test_gradcam_rejects_another_architecture(trained, capsys):
    base, data = trained
    argv = ["-net", "resnet34", "-weights", str(base / "checkpoint" / "resnet18_ema" / "on"), "--data", str(data)]
    assert gradcam.main(argv) == 2
    assert "holds resnet18 + ema, not the requested resnet34 + ema" in capsys.readouterr().err
