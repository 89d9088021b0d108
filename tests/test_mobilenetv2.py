"""MobileNetV2: exact parameter counts against torchvision, EMA's placement, both shapes, one
epoch."""
import pytest
import torch
import torchvision
from torch import nn

import models
from models.attention import ATTENTIONS, EMA
from models.mobilenetv2 import InvertedResidual, MobileNetV2

import params
import train_cifar100
from fake_cifar import write_fake_cifar100


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_imagenet_baseline_is_torchvisions_network():
    ours, theirs = MobileNetV2(1000, None, cifar=False), torchvision.models.mobilenet_v2()
    assert n_params(ours) == n_params(theirs) == 3_504_872
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


def test_imagenet_ema_parameter_count():
    # EMA goes where the expanded width is above 144: widths 192 (3 blocks), 384 (4), 576 (3) and
    # 960 (3). With k = width / 32, each EMA has 10k^2 + 4k parameters (conv1x1 k^2 + k, conv3x3
    # 9k^2 + k, GroupNorm 2k): 384, 1488, 3312 and 9120 for k = 6, 12, 18, 30, so
    # 3 * 384 + 4 * 1488 + 3 * 3312 + 3 * 9120 = 44,400 on top of the baseline's 3,504,872.
    model = MobileNetV2(1000, EMA, cifar=False)
    emas = [m for m in model.modules() if isinstance(m, EMA)]
    widths = sorted(m.conv1x1.in_channels * m.groups for m in emas)
    assert widths == [192] * 3 + [384] * 4 + [576] * 3 + [960] * 3
    assert n_params(model) == 3_504_872 + 44_400 == 3_549_272


def test_ema_skips_the_first_four_blocks():
    blocks = [m for m in models.create_model("mobilenetv2",
                                             "ema").modules() if isinstance(m, InvertedResidual)]
    assert [any(isinstance(x,
                           EMA) for x in b.modules()) for b in blocks] == [False] * 4 + [True] * 13


@pytest.mark.parametrize("attention",
                         [name for name, make in ATTENTIONS.items() if make is not EMA])
def test_other_modules_go_in_every_block(attention):
    model = models.create_model("mobilenetv2", attention)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert all(any(isinstance(x, ATTENTIONS[attention]) for x in b.modules()) for b in blocks)


def test_both_shapes_forward_and_backward():
    cifar = models.create_model("mobilenetv2", "ema")
    assert cifar.features(torch.randn(2, 3, 32, 32)).shape == (2, 1280, 4, 4)
    imagenet = MobileNetV2(1000, EMA, cifar=False)
    assert imagenet.features(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
    for model, shape, classes in ((cifar, (2, 3, 32, 32), 100), (imagenet, (2, 3, 224, 224), 1000)):
        logits = model(torch.randn(shape))
        assert logits.shape == (2, classes)
        nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_report_rows():
    rows = list(params.imagenet_rows())
    assert [(r["net"], r["attention"], r["total"]) for r in rows] == [
        ("mobilenetv2", "none", 3_504_872), ("mobilenetv2", "ema", 3_549_272)]
    assert all(r["match"] == "all" for r in rows)
    baseline, ema = rows
    assert 295 < baseline["mmacs"] < 305  # MobileNetV2's 300M multiply-adds
    one_group = baseline["mmacs"] + (ema["mmacs"] - baseline["mmacs"]) / 32
    assert ema["mmacs"] > baseline["mmacs"] + 100 and f"{one_group:.1f}" in ema["note"]
    assert 304 < one_group < 306  # the paper's 306


def test_one_cifar_epoch(tmp_path):
    # batch 8: its 32x32 maps take memory
    data = write_fake_cifar100(tmp_path / "data", n_train=16, n_test=8)
    argv = ["-net", "mobilenetv2", "-att", "ema", "-b", "8", "--epochs", "1", "--data", str(data),
            "--checkpoint-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "r"), "--run-name",
            "m"]
    assert train_cifar100.main(argv) == 0
    checkpoint = torch.load(tmp_path / "c/mobilenetv2_ema/m/last.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["net"] == "mobilenetv2"
