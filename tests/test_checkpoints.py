"""checkpoints.py: the NAM authors' and the classic CIFAR-100 repo's checkpoints load into our
ResNets with identical logits; anything that does not fit is one message naming the key.

The upstream files are written here from our own weights by the inverse renaming, spelled out
independently of the module's tables."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import utils
from training import checkpoints

import gradcam
import test as test_script
from fake_cifar import write_fake_cifar100

ROOT = Path(__file__).resolve().parents[1]

# Our key -> the NAM authors' ResNet (MODELS/model_resnet.py): (pattern, replacement), all applied
# in order. The attention slot's name is a parameter ({slot}): the EMA authors' copy of the script
# is not public.
TO_NAM_SCRIPT = [
    (r"^stem\.0\.", "conv1."), (r"^stem\.1\.", "bn1."),
    (r"\.residual\.0\.", ".conv1."), (r"\.residual\.1\.", ".bn1."), (r"\.residual\.3\.", ".conv2."),
    (r"\.residual\.4\.", ".bn2."), (r"\.residual\.6\.", ".conv3."), (r"\.residual\.7\.", ".bn3."),
    (r"\.shortcut\.", ".downsample."),
    # NAM's own CBAM (Flatten first in its MLP) and NAM modules, in slots named cbam and nam.
    (r"\.attention\.channel_gate\.mlp\.0\.", ".cbam.ChannelGate.mlp.1."),
    (r"\.attention\.channel_gate\.mlp\.2\.", ".cbam.ChannelGate.mlp.3."),
    (r"\.attention\.spatial_gate\.", ".cbam.SpatialGate.spatial."),
    (r"\.attention\.bn2\.", ".nam.Channel_Att.bn2."),
    (r"\.attention\.", ".{slot}."),
]
# Our key -> weiaicunzai/pytorch-cifar100's models/resnet.py.
TO_CLASSIC = [
    (r"^stem\.0\.", "conv1.0."), (r"^stem\.1\.", "conv1.1."),
    (r"^layer1\.", "conv2_x."), (r"^layer2\.", "conv3_x."), (r"^layer3\.", "conv4_x."),
    (r"^layer4\.", "conv5_x."),
    (r"\.residual\.", ".residual_function."),
]


def renamed(state: dict, rules, slot="att", prefix="") -> dict:
    """A copy of `state` with each key rewritten by `rules`, the attention slot named `slot`, and
    `prefix` added."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement.replace("{slot}", slot), key)
        out[prefix + key] = value.clone()
    return out


def trained_looking(net: str, att: str, seed: int = 0):
    """A model in eval mode whose BatchNorm statistics are not the defaults, so that they matter."""
    torch.manual_seed(seed)
    model = models.create_model(net, att, 100).eval()
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2)
    return model


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_logits(original, net, att, path) -> str:
    """Load `path` into a differently initialised model of the same kind; return the detected
    layout."""
    fresh = trained_looking(net, att, seed=1)
    assert not torch.equal(fresh(IMAGES), original(IMAGES))
    layout = checkpoints.load_weights_into(fresh, path)
    assert torch.equal(fresh(IMAGES), original(IMAGES))
    return layout


def nam_script_file(model, path, slot="att", prefix="module.", wrapped=True):
    state = renamed(model.state_dict(), TO_NAM_SCRIPT, slot, prefix)
    torch.save({"epoch": 200, "arch": "resnet", "state_dict": state, "best_prec1": 80.7,
                "optimizer": {}}
               if wrapped else state, path)
    return path


@pytest.mark.parametrize("net, att, slot, prefix, wrapped", [
    ("resnet18", "none", "att", "module.", True),
    ("resnet50", "ema", "ema_att", "module.", True),  # the EMA authors' table: slot name unknown
    ("resnet18", "cbam", "cbam", "", False),
    ("resnet18", "nam", "nam", "module.", False),
    ("resnet18", "ca", "ca", "", True),
])
def test_nam_script_checkpoints_give_the_same_logits(tmp_path, net, att, slot, prefix, wrapped):
    original = trained_looking(net, att)
    path = nam_script_file(original, tmp_path / "their.pth.tar", slot, prefix, wrapped)
    layout = assert_same_logits(original, net, att, path)
    assert layout.startswith(checkpoints.NAM_SCRIPT.name)
    assert ("module." in layout) == bool(prefix) and ("with state_dict" in layout) == wrapped


@pytest.mark.parametrize("net, prefix, wrapped",
                         [("resnet18", "", False), ("resnet50", "module.", True)])
def test_classic_checkpoints_give_the_same_logits(tmp_path, net, prefix, wrapped):
    original = trained_looking(net, "none")
    state = renamed(original.state_dict(), TO_CLASSIC, prefix=prefix)
    torch.save({"state_dict": state} if wrapped else state, tmp_path / "classic.pth")
    layout = assert_same_logits(original, net, "none", tmp_path / "classic.pth")
    assert layout.startswith(checkpoints.CLASSIC.name)


def test_our_own_checkpoint_initialises_a_model(tmp_path):
    original = trained_looking("resnet18", "eca")
    torch.save({"model": original.state_dict(), "args": {"net": "resnet18", "att": "eca"}},
               tmp_path / "last.pth")
    # A run folder means its last.pth.
    assert assert_same_logits(original, "resnet18", "eca", tmp_path) == "this repo, resnet18 + eca"


def nam_script_ema_file(tmp_path, edit=lambda state: None):
    """A ResNet18 + EMA checkpoint of the NAM script's layout, `edit`ed first."""
    state = renamed(trained_looking("resnet18", "ema").state_dict(), TO_NAM_SCRIPT, "ema_att")
    edit(state)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ema_checkpoint.pth.tar")
    return tmp_path / "ema_checkpoint.pth.tar"


def load_error(path, net="resnet18", att="ema") -> str:
    model = models.create_model(net, att, 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(utils.UserError) as error:
        checkpoints.load_weights_into(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    return str(error.value)


def test_a_missing_key_is_named(tmp_path):
    path = nam_script_ema_file(tmp_path, lambda state: state.pop("layer2.1.bn2.running_var"))
    message = load_error(path)
    assert message.endswith(
        "does not fit the model: no weights for layer2.1.residual.4.running_var")


def test_a_reshaped_key_is_named_with_both_shapes(tmp_path):
    def narrow(state):
        state["layer3.0.conv1.weight"] = torch.zeros(256, 64, 3, 3)

    message = load_error(nam_script_ema_file(tmp_path, narrow))
    assert message.endswith(
        "does not fit the model: layer3.0.conv1.weight (ours: layer3.0.residual.0.weight) "
        "has shape (256, 64, 3, 3), the model needs (256, 128, 3, 3)")


def test_another_attention_or_network_does_not_fit(tmp_path):
    path = nam_script_ema_file(tmp_path)
    # The EMA slot is not taken for CA's, nor dropped without attention.
    assert "no weights for layer1.0.attention.conv1.weight" in load_error(path, att="ca")
    assert (": unexpected key layer1.0.ema_att.gn.weight: no place for it in the model ("
            in load_error(path, att="none"))
    assert "layer1.0.conv1.weight (ours: layer1.0.residual.0.weight) has shape (64, 64, 3, 3), " \
           "the model needs (64, 64, 1, 1)" in load_error(path, net="resnet50")
    assert "only the CIFAR ResNets" in load_error(path, net="mobilenetv2")


def test_unknown_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    assert "is not a checkpoint this repo can read" in load_error(tmp_path / "other.pth")
    # The scripts that need this repo's own checkpoints keep their message.
    with pytest.raises(utils.UserError, match="is not a checkpoint of this repo"):
        checkpoints.load_checkpoint(tmp_path / "other.pth")


def test_net_and_att_are_required(tmp_path, capsys):
    path = nam_script_ema_file(tmp_path)
    assert test_script.main(["-net", "resnet18", "-weights", str(path)]) == 2
    assert "does not record its network: give both -net and -att" in capsys.readouterr().err


def test_test_py_evaluates_an_upstream_file(tmp_path):
    data = write_fake_cifar100(tmp_path / "data", n_train=8, n_test=16)
    state = renamed(trained_looking("resnet18", "none").state_dict(), TO_CLASSIC)
    torch.save(state, tmp_path / "resnet18-200-regular.pth")
    result = subprocess.run([sys.executable, str(ROOT / "test.py"), "-net", "resnet18", "-att",
                             "none",
                             "-weights", str(tmp_path / "resnet18-200-regular.pth"), "--data",
                             str(data),
                             "--amp", "off"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "resnet18 + none, recipe classic, 16 test images" in result.stdout
    assert f"checkpoint layout: {checkpoints.CLASSIC.name}: a bare state dict" in result.stdout


def test_gradcam_py_reads_an_upstream_file(tmp_path, capsys):
    data = write_fake_cifar100(tmp_path / "data", n_train=8, n_test=4)
    path = nam_script_ema_file(tmp_path)
    out = tmp_path / "cam.png"
    argv = ["-net", "resnet18", "-att", "ema", "-weights", str(path), "--data", str(data),
            "--images", "2",
            "--out", str(out)]
    assert gradcam.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Grad-CAM of resnet18 + ema" in printed and ", epoch 3)" in printed
    assert f"checkpoint layout: {checkpoints.NAM_SCRIPT.name}: a dict with state_dict" in printed
    assert out.is_file()
