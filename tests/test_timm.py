"""Every attention module of the registry as timm's `attn_layer` (docs/reference.md, "EMA in your
network"): the paper's ImageNet rows are trained with timm's networks. The trainer never imports
timm (test_trainer_does_not_import_timm)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from models.attention import ATTENTIONS, EMA

ROOT = Path(__file__).resolve().parents[1]
# timm's ResNet-50: Bottleneck outputs of 256, 512, 1024 and 2048 channels, 3, 4, 6 and 3 blocks.
RESNET50_WIDTHS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def test_timm_resnet50_with_ema_counts_and_trains():
    torch.manual_seed(0)
    plain = timm.create_model("resnet50", num_classes=10)
    # zero_init_last=False: with timm's default, each block's last BatchNorm starts at zero, so EMA
    # sees zeros and its first gradients vanish; the check below wants them.
    model = timm.create_model("resnet50", num_classes=10, block_args=dict(attn_layer=EMA),
                              zero_init_last=False)
    emas = [m for m in model.modules() if isinstance(m, EMA)]
    assert len(emas) == 16
    assert parameters(model) == parameters(plain) + sum(parameters(EMA(c)) for c in RESNET50_WIDTHS)
    # 3 x 672 + 4 x 2,624 + 6 x 10,368 + 3 x 41,216
    assert parameters(model) - parameters(plain) == 198_368

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = emas[0].conv3x3.weight.detach().clone()
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(emas[0].conv3x3.weight, before)  # EMA's weights train
    assert losses[1] < losses[0]


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_module_is_a_timm_attn_layer(name):
    """timm calls attn_layer(width, device=..., dtype=...), as torch's own layers are made."""
    module = ATTENTIONS[name]
    model = timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer=module))
    assert sum(isinstance(m, module) for m in model.modules()) == 8
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    built = module(64, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in built.parameters())


def test_ema_in_timm_se_slot_through_the_adapter():
    """timm's EfficientNet/MobileNetV3 blocks call se_layer(channels, act_layer=..., device=...,
    dtype=...) and first probe it with rd_ratio=: the one-line adapter of docs/reference.md."""
    # noqa: E731
    adapter = lambda channels, act_layer=None, **factory: EMA(channels, factor=16, **factory)
    model = timm.create_model("efficientnet_b0", num_classes=10, se_layer=adapter)
    assert sum(isinstance(m, EMA) for m in model.modules()) == 16
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_trainer_does_not_import_timm():
    code = ("import sys; sys.argv = ['train_cifar100.py', '-h']\n"
            "import runpy\n"
            "try:\n    runpy.run_path('train_cifar100.py', run_name='__main__')\nexcept "
            "SystemExit:\n    pass\nimport test, benchmark, export, gradcam, table, reproduce, "
            "params\nassert 'timm' not in sys.modules, 'timm imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of docs/reference.md's `section` (a '### ' heading)."""
    text = (ROOT / "docs" / "reference.md").read_text()
    body = re.split(r"\n#{2,3} ", text.split(f"### {section}\n", 1)[1])[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


def test_the_docs_snippets_run():
    """docs/reference.md 2.5's code as written: timm's ResNet-50, the adapter, torchvision's
    ResNet."""
    blocks = python_blocks("2.5 EMA in your network")
    assert len(blocks) == 3
    scope = {}
    for block in blocks:
        exec(block.replace('num_classes=1000', 'num_classes=10'), scope)  # noqa: S102
        model = scope["model"].eval()
        assert sum(isinstance(m, EMA) for m in model.modules()) == 16
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape[0] == 1
