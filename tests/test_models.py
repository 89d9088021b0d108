"""Every net x attention pair builds, runs, trains one step, and has the exact parameter totals of
docs/reference.md; a module added to the registry needs nothing else."""
import pytest
import torch
from torch import nn

import models
from models.attention import (ATTENTIONS, CBAM, ECA, EMA, NAM, SE, CoordAtt, ShuffleAttention,
                              build_attention, nam_l1_penalty)
from models.attention.eca import adaptive_kernel_size
from models.resnet import ResidualBlock

import train_cifar100
from fake_cifar import write_fake_cifar100
from tiny_net import NET as TINY_NET

# docs/reference.md, 2.1 Summary and 4 How the paper counted #Params: every parameter, 100 classes.
EXACT_TOTALS = {
    ("resnet18", "none"): 11_220_132,
    ("resnet50", "none"): 23_705_252,
    ("resnet101", "none"): 42_697_380,
    ("resnet50", "cbam"): 26_237_844,
    ("resnet50", "sa"): 23_705_960,
    ("resnet50", "eca"): 23_705_338,
    ("resnet50", "nam"): 23_735_460,
    ("resnet50", "ca"): 25_623_084,
    ("resnet50", "ema"): 23_903_620,
    ("resnet101", "ca"): 46_322_828,
    ("resnet101", "ema"): 43_072_004,
}

# docs/reference.md, 2.1 Summary: parameters per block of width C.
PER_BLOCK = {
    "ema": lambda c: 10 * (c // 32) ** 2 + 4 * (c // 32),
    "se": lambda c: c * c // 8 + c // 16 + c,
    "cbam": lambda c: c * c // 8 + c // 16 + c + 100,
    "eca": adaptive_kernel_size,
    "sa": lambda c: 3 * c // 64,
    "nam": lambda c: 2 * c,
    "ca": lambda c: 3 * c * max(8, c // 32) + 3 * max(8, c // 32) + 2 * c,
}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("net,attention", sorted(EXACT_TOTALS))
def test_exact_parameter_totals(net, attention):
    assert n_params(models.create_model(net, attention)) == EXACT_TOTALS[(net, attention)]


@pytest.mark.parametrize("attention", list(PER_BLOCK))
@pytest.mark.parametrize("channels", [256, 512, 1024, 2048])
def test_parameter_formula_per_block(attention, channels):
    assert n_params(build_attention(attention, channels)) == PER_BLOCK[attention](channels)


def test_eca_adaptive_kernel_sizes_on_resnet50_widths():
    assert [adaptive_kernel_size(c) for c in (256, 512, 1024, 2048)] == [5, 5, 5, 7]


# ResNet50's blocks, only more of them: built and checked, not run (a second each of the suite's
# time).
DEEPER_RESNET50S = {"resnet101", "resnet152"}
# not the suite's own (tests/tiny_net.py)
PAPER_NETS = [net for net in models.list_models() if net != TINY_NET]


@pytest.mark.parametrize("attention", models.list_attentions())
@pytest.mark.parametrize("net", PAPER_NETS)
def test_every_pair_trains_one_step(net, attention):
    torch.manual_seed(0)
    model = models.create_model(net, attention, num_classes=10)
    if net not in DEEPER_RESNET50S:
        images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
        logits = model(images)
        assert logits.shape == (2, 10)
        nn.functional.cross_entropy(logits, labels).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if attention != "none":
        cls = ATTENTIONS[attention]
        assert any(isinstance(m, cls) for m in model.modules())
        # every one carries it
        resnet_blocks = [m for m in model.modules() if hasattr(m, "attention")]
        assert all(isinstance(b.attention, cls) for b in resnet_blocks)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("shape", [(1, 256, 8, 8), (3, 256, 5, 9), (2, 256, 1, 1)])
def test_modules_keep_the_input_shape(attention, shape):
    module = ATTENTIONS[attention](shape[1]).eval()
    x = torch.randn(shape)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_every_module_rejects_a_width_it_cannot_take(attention):
    with pytest.raises(ValueError):
        ATTENTIONS[attention](0)


@pytest.mark.parametrize("make,match", [
    (lambda: EMA(48, 32), "positive multiple of factor"),
    (lambda: SE(40), "positive multiple of reduction"),
    (lambda: CBAM(24), "positive multiple of reduction"),
    (lambda: ECA(0), "positive number of channels"),
    (lambda: ECA(64, k_size=4), "odd positive k_size"),
    (lambda: ShuffleAttention(192, groups=64), "positive multiple of 2 \\* groups"),
    (lambda: ShuffleAttention(7), "positive, even number of channels"),
    (lambda: NAM(0), "positive number of channels"),
    (lambda: CoordAtt(0), "positive channels"),
])
def test_bad_channel_counts_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sa_narrow_blocks_use_fewer_groups():
    # Not in the paper: widths that are not multiples of 2 * 64 take the largest G below 64 that
    # fits.
    sa = ATTENTIONS["sa"]
    assert sa(64).groups == 32
    # MobileNetV2
    assert [sa(c).groups for c in (32, 96, 144, 192, 384, 576, 960)] == [16, 48, 36, 48, 64, 48, 60]
    assert sa(256).groups == 64
    assert sa(6).groups == 3 and ShuffleAttention(256, groups=8).groups == 8


def test_sa_channel_shuffle_interleaves_halves():
    # With gates at their initial values and a constant input, every gate is sigmoid(1): the output
    # is the input's permutation scaled by that constant, so the shuffle order is visible.
    sa = ShuffleAttention(8, groups=2)
    x = torch.arange(8.0).reshape(1, 8, 1, 1).repeat(1, 1, 2, 2)
    sa.gn = nn.Identity()  # keep the spatial half's values so the order is visible
    out = sa(x) / torch.sigmoid(torch.tensor(1.0))
    # groups (0..3) and (4..7) are kept in place by the group view, then 2-group shuffle interleaves
    # the first and second halves of the concatenated tensor: 0,4,1,5,2,6,3,7.
    assert out[0, :, 0, 0].tolist() == pytest.approx([0, 4, 1, 5, 2, 6, 3, 7])


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        models.create_model("vgg16")
    with pytest.raises(ValueError, match=", ".join(models.list_attentions())):
        models.create_model("resnet18", "bam")
    with pytest.raises(ValueError, match=", ".join(models.list_attentions())):
        build_attention("bam", 64)


def test_ema_import_path_and_registry():
    from models.attention import EMA as imported
    assert imported is ATTENTIONS["ema"]
    assert models.list_attentions() == ["none", *ATTENTIONS]
    # the paper's table (but SSA)
    assert {"ema", "se", "cbam", "eca", "sa", "nam", "ca"} <= set(ATTENTIONS)


class TinyGate(nn.Module):
    """A throwaway module: one learnt sigmoid gate per channel."""

    def __init__(self, channels: int):
        super().__init__()
        if channels <= 0:
            raise ValueError(
                f"TinyGate needs a positive number of channels; got channels={channels}")
        self.logit = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit.sigmoid()


def test_a_new_module_is_one_registry_line(monkeypatch, tmp_path):
    """The README's promise: a module file and its line in ATTENTIONS, nothing else, and every net,
    `train_cifar100.py -att` and the registry-driven tests take it."""
    monkeypatch.setitem(ATTENTIONS, "tiny", TinyGate)
    assert "tiny" in models.list_attentions()

    torch.manual_seed(0)
    model = models.create_model("resnet18", "tiny", num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 8 and all(isinstance(b.attention, TinyGate) for b in blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 7])).backward()
    optimizer.step()
    # every gate moved off its zero start
    assert all(b.attention.logit.abs().sum() > 0 for b in blocks)
    assert any(isinstance(m,
                          TinyGate) for m in models.create_model("mobilenetv2", "tiny").modules())

    data = write_fake_cifar100(tmp_path / "data", n_train=32, n_test=16)
    argv = ["-net", "resnet18", "-att", "tiny", "-b", "32", "-warm", "0", "--epochs", "1", "--data",
            str(data),
            "--checkpoint-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "r"), "--run-name",
            "t"]
    assert train_cifar100.main(argv) == 0
    checkpoint = torch.load(tmp_path / "c/resnet18_tiny/t/last.pth", weights_only=True)
    gates = [w for name, w in checkpoint["model"].items() if name.endswith("attention.logit")]
    assert checkpoint["epoch"] == 1 and len(gates) == 8
    # one optimizer step (32 images, batch 32) trained them
    assert all(w.abs().sum() > 0 for w in gates)


def test_nam_l1_penalty():
    assert nam_l1_penalty(models.create_model("resnet18", "ema")).item() == 0
    model = models.create_model("resnet18", "nam")
    nams = [m for m in model.modules() if isinstance(m, NAM)]
    for i, nam in enumerate(nams):
        nn.init.constant_(nam.bn2.weight, -(i + 1.0))
    expected = 1e-4 * sum((i + 1.0) * nam.bn2.num_features for i, nam in enumerate(nams))
    penalty = nam_l1_penalty(model, strength=1e-4)
    assert penalty.item() == pytest.approx(expected)
    penalty.backward()
    assert torch.equal(nams[0].bn2.weight.grad, torch.full_like(nams[0].bn2.weight, -1e-4))


def test_nam_channel_weights_are_detached():
    nam = NAM(16)
    nn.init.uniform_(nam.bn2.weight, 0.5, 2.0)
    x = torch.randn(4, 16, 3, 3)
    nam(x).sum().backward()
    g_detached = nam.bn2.weight.grad.clone()
    # Recompute with the channel weights attached: gradients then differ, so detaching is visible.
    nam.zero_grad()
    gamma = nam.bn2.weight.abs()
    (x * (nam.bn2(x) * (gamma / gamma.sum())[:, None, None]).sigmoid()).sum().backward()
    assert not torch.allclose(g_detached, nam.bn2.weight.grad)


@pytest.mark.parametrize("stages", [(3, 4), (1,)])
@pytest.mark.parametrize("att", sorted(PER_BLOCK))
def test_att_stages_hold_the_modules_of_those_stages_only(att, stages):
    """--att-stages: the baseline's parameters plus the modules of the blocks of those stages."""
    from models.resnet import RESNETS
    block, blocks, planes = RESNETS["resnet50"]
    widths = [p * block.expansion for p in planes]
    model = models.create_model("resnet50", att, 100, stages)
    expected = EXACT_TOTALS[("resnet50", "none")] + sum(
        blocks[s - 1] * PER_BLOCK[att](widths[s - 1]) for s in stages)
    assert models.count_parameters(model)[0] == expected
    for stage in models.ALL_STAGES:
        placed = [not isinstance(b.attention, nn.Identity) for b in getattr(model, f"layer{stage}")]
        assert placed == [stage in stages] * blocks[stage - 1]


def test_att_stages_are_parsed_strictly():
    assert models.parse_stages("4, 3") == (3, 4) and models.parse_stages(None) == models.ALL_STAGES
    for bad in ("", "0", "5", "3,3", "3;4", "1.5"):
        with pytest.raises(ValueError, match="distinct ResNet stages from 1 to 4"):
            models.parse_stages(bad)
    with pytest.raises(ValueError, match="mobilenetv2 has its own rule"):
        models.create_model("mobilenetv2", "ema", 100, (3, 4))
