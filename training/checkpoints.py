"""Checkpoint files, read in one place: this repo's (its format, safe loading, a trained model from
one) and those of the two training scripts this repo replaces, loaded strictly.

Every file is read with weights_only=True: one that needs arbitrary code to unpickle is refused,
never executed. Writing is utils.save_atomic (a temporary file, then a rename).

Three layouts are recognised; the two upstream ones with or without DataParallel's `module.` prefix:

- this repo's checkpoints: a dict with "model" and "args" (train_cifar100.py writes them);
- the NAM authors' train_cifar100.py (Christian-lyc/NAM; the EMA authors trained their table with a
  modified copy): {"epoch", "state_dict", "best_prec1", "optimizer", ...}, or its bare state dict;
- the classic CIFAR-100 repo (weiaicunzai/pytorch-cifar100): a bare state dict (or one under
  "state_dict").

A bare state dict is told apart by its stem convolution's key: `conv1.weight` (NAM script) or
`conv1.0.weight` (classic). Upstream files record neither the network nor the attention module, so
the caller names them (test.py -net/-att) and the keys are renamed to that model's (CIFAR ResNets
only: MobileNetV2 is named differently there):

|ours                  | NAM script                             | classic                          |
|----------------------|----------------------------------------|----------------------------------|
|stem.0, stem.1        | conv1, bn1                             | conv1.0, conv1.1                 |
|layerN.i (N = 1..4)   | layerN.i                               | conv{N+1}_x.i                    |
|layerN.i.residual.K   | layerN.i.conv1/bn1/conv2/bn2/conv3/bn3 | conv{N+1}_x.i.residual_function.K|
|  (K = 0,1,3,4,6,7)   |   (BasicBlock: conv1/bn1/conv2/bn2)    |                                  |
|layerN.i.shortcut.0/1 | layerN.i.downsample.0/1                | conv{N+1}_x.i.shortcut.0/1       |
|layerN.i.attention.*  | layerN.i.<slot>.* (below)              | none: no attention there         |
|fc                    | fc                                     | fc                               |

The attention slot's attribute name differs from script to script (NAM's own code says `cbam` and
`nam`; the EMA authors' copy is not public), so it is found by what it holds: the one block child,
other than the block's own layers, whose parameter names are those of our attention module in that
block (EMA: gn, conv1x1, conv3x3; CA: conv1, bn1, conv_h, conv_w; SA: cweight, cbias, sweight,
sbias, gn; ECA: conv). The NAM repository's own modules are renamed inside the slot:
ChannelGate.mlp.1/3 -> channel_gate.mlp.0/2 and SpatialGate.spatial.* -> spatial_gate.* (CBAM),
Channel_Att.bn2 -> bn2 (NAM).

Loading is strict: every key of the file must land on a key of the model with the same shape and
every key of the model must be filled; otherwise one UserError names the first key that does not
fit.
"""
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import models
from conf import settings
from models.resnet import RESNETS, ResNet
from utils import UserError

# what train_cifar100.py writes; 2: no RNG states (each epoch's randomness comes from the seed and
# the epoch)
FORMAT = 2
READABLE_FORMATS = (1, 2)

OURS = "this repo"
DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class Layout:
    """How one upstream script names a CIFAR ResNet's tensors. Each table maps a name prefix (or a
    block child) of theirs to ours."""
    name: str
    stem_key: str  # the stem convolution's weight: the key that tells the layouts apart
    recipe: str  # the normalization that script trained with: the key of conf.settings.RECIPES
    outside: dict  # prefixes outside the residual stages
    stages: dict  # stage names
    block: dict  # a residual block's own layers; any other child may be the attention slot


NAM_SCRIPT = Layout(
    name="NAM authors' train_cifar100.py",
    stem_key="conv1.weight",
    # that script normalizes CIFAR-100 with CIFAR-10's statistics, as the paper recipe does
    recipe="paper",
    outside={"conv1.": "stem.0.", "bn1.": "stem.1.", "fc.": "fc."},
    stages={f"layer{n}": f"layer{n}" for n in range(1, 5)},
    block={"conv1": "residual.0", "bn1": "residual.1", "conv2": "residual.3", "bn2": "residual.4",
           "conv3": "residual.6", "bn3": "residual.7", "downsample": "shortcut"},
)
CLASSIC = Layout(
    name="classic CIFAR-100 repo (weiaicunzai/pytorch-cifar100)",
    stem_key="conv1.0.weight",
    recipe="classic",
    outside={"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "fc.": "fc."},
    stages={f"conv{n + 1}_x": f"layer{n}" for n in range(1, 5)},
    block={"residual_function": "residual", "shortcut": "shortcut"},
)
UPSTREAM_LAYOUTS = (NAM_SCRIPT, CLASSIC)

# Inside the attention slot: the NAM repository's CBAM and NAM modules -> ours. The other modules'
# upstream code uses our names already.
ATTENTION_RENAMES = {"ChannelGate.mlp.1.": "channel_gate.mlp.0.",
                     "ChannelGate.mlp.3.": "channel_gate.mlp.2.",
                     "SpatialGate.spatial.": "spatial_gate.", "Channel_Att.": ""}

UNKNOWN = (
    "is not a checkpoint this repo can read: expected one of this repo's (a dict with model and "
    "args), a state dict of the NAM authors' train_cifar100.py (keys conv1, bn1, layer1..layer4, "
    "fc; alone or under state_dict) or of the classic CIFAR-100 repo (keys conv1.0, "
    "conv2_x..conv5_x, fc)")


# ---------------------------------------------------------------- this repo's checkpoints

def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run folder's last.pth."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return path


def load_trained_model(weights, net=None, att=None):
    """(model on the CPU with the checkpoint's weights, checkpoint, path). `net`/`att` default to
    the checkpoint's own; given, they must match it. A checkpoint of another repo's script (see
    py) records no net/att: both are then required, and the returned checkpoint
    only describes it (args net/att/recipe, epoch or None, layout). Every checkpoint has "layout",
    the detected layout in words."""
    path = checkpoint_file(weights)
    checkpoint = load_checkpoint(path, ours_only=False)
    if not is_ours(checkpoint):
        model, description = trained_model(checkpoint, path, net, att)
        return model, description, path
    saved = checkpoint["args"]
    if (not isinstance(saved, dict) or saved.get("net") not in models.list_models()
            or saved.get("att") not in models.list_attentions()
            or saved.get("recipe") not in settings.RECIPES):
        shown = {key: saved.get(key) for key in ("net", "att",
                                                 "recipe")} if isinstance(saved, dict) else saved
        raise UserError(
            f"{path}: its recorded arguments name no known network, attention and recipe ({shown})")
    net, att = net or saved["net"], att or saved["att"]
    if (net, att) != (saved["net"], saved["att"]):
        raise UserError(
            f"{path} holds {saved['net']} + {saved['att']}, not the requested {net} + {att}")
    try:
        model = models.model_of(saved)
    except ValueError as e:  # recorded stages that make no model
        raise UserError(f"{path}: {e}") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit {net} + {att}: {str(e).splitlines()[0]}") from None
    checkpoint["layout"] = describe_ours(checkpoint)
    return model, checkpoint, path


def load_checkpoint(path, ours_only: bool = True):
    """Read a checkpoint with weights_only=True: a file that needs arbitrary code to unpickle is
    refused, never executed. With ours_only=False, whatever the file holds is returned, for
    py to recognise; otherwise anything but one of this repo's is refused."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs_code = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not needs_code:
            raise UserError(
                f"cannot read checkpoint {path}: not a valid checkpoint file (corrupt?)") from None
        raise UserError(
            f"refused to load {path}: it holds objects that only arbitrary code could rebuild "
            f"({needs_code[0]}); checkpoints are read with weights_only=True") from None
    except Exception as e:
        # One line: a truncated file's error is empty (EOFError) or a paragraph (zip reader).
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "the file ends early"
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {detail} "
                        f"(truncated or damaged?)") from None
    if ours_only and not is_ours(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this repo (no model weights and arguments)")
    return checkpoint


def non_finite(model: nn.Module) -> list[str]:
    """The names of the model's weights and buffers that hold a NaN or an infinity: a diverged
    run's, which scores and exports as nonsense."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def non_finite_warning(model: nn.Module, path) -> str:
    """'' or what non_finite found, in one phrase."""
    bad = non_finite(model)
    if not bad:
        return ""
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"{path} holds NaN or infinite weights ({bad[0]}{more}): a diverged run"


def check_training_state(checkpoint) -> None:
    """A ValueError unless epoch, step, best and history have the shapes train_cifar100.py
    writes."""
    counts = [checkpoint["epoch"], checkpoint["step"], checkpoint["best"].get("epoch")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(f"epoch, step and best epoch must be whole numbers >= 0, got {counts}")
    numbers = [checkpoint["best"].get(key) for key in ("top1", "top5")]
    numbers += [
        row.get(key) for row in checkpoint["history"] for key in ("train_loss", "test_top1")]
    if (not all(isinstance(x, (int, float)) for x in numbers)
            or len(checkpoint["history"]) != checkpoint["epoch"]):
        raise ValueError("best and history are not what this script records")


def is_ours(loaded) -> bool:
    """Whether a loaded checkpoint is one of this repo's."""
    return isinstance(loaded, dict) and {"model", "args"} <= loaded.keys()


def load_weights_into(model: nn.Module, path, target: str = "the model") -> str:
    """Copy the weights of a checkpoint into `model`, for train_cifar100.py --init-from PATH; return
    the detected layout in words (for the log).

    `path`: a checkpoint file or a run folder (its last.pth), in any layout of this module's
    docstring.
    `model`: the new run's freshly built model (models.create_model with the run's -net/-att, after
    utils.initialise and any SyncBatchNorm conversion, before DDP or torch.compile wrap it), on any
    device. Every parameter and buffer (BatchNorm statistics included) is replaced; nothing else is
    read from the file: the optimizer, schedule, epoch and RNG start fresh. Strict: when a key of
    the file or of the model does not fit, a UserError names the first one and `model` is left
    unchanged;
    `target` names the model in that message (e.g. "resnet18 + ema").
    """
    path = checkpoint_file(path)
    loaded = load_checkpoint(path, ours_only=False)
    if is_ours(loaded):
        found, layout, state = describe_ours(loaded), None, loaded["model"]
    else:
        layout, state, found = detect_upstream(loaded, path)
    load_strictly(model, state, layout, f"{path} ({found})", target)
    return found


def trained_model(loaded, path: Path, net: Optional[str], att: Optional[str]):
    """For load_trained_model, given an upstream checkpoint: (model on the CPU with its weights,
    a dict describing it like one of our checkpoints: args net/att/recipe, epoch (None where the
    file does not say), layout in words)."""
    layout, state, found = detect_upstream(loaded, path)
    if not (net and att):
        raise UserError(
            f"{path} is a checkpoint of the {found}, which does not record its network: "
            f"give both -net and -att (e.g. -net resnet50 -att ema)")
    model = models.create_model(net, att, settings.NUM_CLASSES)
    load_strictly(model, state, layout, f"{path} ({found})", f"{net} + {att}")
    # A bare state dict has no "epoch" key: its keys are tensor names.
    description = {"args": {"net": net, "att": att, "recipe": layout.recipe},
                   "epoch": loaded.get("epoch"),
                   "layout": found}
    return model, description


def describe_ours(checkpoint: dict) -> str:
    saved = checkpoint["args"]
    return f"{OURS}, {saved['net']} + {saved['att']}"


def detect_upstream(loaded, path) -> tuple[Layout, dict, str]:
    """(layout, state dict without the `module.` prefix, what was found in words) of a loaded
    checkpoint that is not one of ours."""
    wrapped = isinstance(loaded, dict) and "state_dict" in loaded
    state = loaded["state_dict"] if wrapped else loaded
    if not is_state_dict(state):
        raise UserError(f"{path} {UNKNOWN}")
    prefixed = all(key.startswith(DATA_PARALLEL_PREFIX) for key in state)
    if prefixed:
        state = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
    layout = next((layout for layout in UPSTREAM_LAYOUTS if layout.stem_key in state), None)
    if layout is None:
        raise UserError(f"{path} {UNKNOWN}")
    form = "a dict with state_dict" if wrapped else "a bare state dict"
    prefix = ", DataParallel `module.` prefix" if prefixed else ""
    return layout, state, f"{layout.name}: {form}{prefix}"


def is_state_dict(state) -> bool:
    return (isinstance(state, dict) and len(state) > 0
            and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                    for key, value in state.items()))


def load_strictly(model: nn.Module, state: dict, layout: Optional[Layout], source: str,
                  target: str) -> None:
    """Load `state` (named by `layout`; None: our names) into `model`, or raise one UserError naming
    the first key that does not fit; `source` and `target` name the two sides in that message."""
    if layout is not None and not isinstance(model, ResNet):
        raise UserError(
            f"{source}: only the CIFAR ResNets ({', '.join(RESNETS)}) can be read from that layout")
    ours = model.state_dict()
    renamed = {key: key for key in state} if layout is None else our_names(state, layout, ours)
    problems = misfits(state, renamed, ours)
    if problems:
        more = f" ({len(problems) - 1} more keys do not fit)" if len(problems) > 1 else ""
        raise UserError(f"{source} does not fit {target}: {problems[0]}{more}")
    model.load_state_dict({renamed[key]: value for key, value in state.items()})


def misfits(state: dict, renamed: dict, ours: dict) -> list[str]:
    """What keeps `state` from loading: the model's keys that nothing fills or that get another
    shape, in the model's order, then the file's keys that have no place in the model."""
    theirs_by_ours = {our_key: key for key, our_key in renamed.items()}
    problems = []
    for our_key, tensor in ours.items():
        key = theirs_by_ours.get(our_key)
        if key is None:
            problems.append(f"no weights for {our_key}")
        elif state[key].shape != tensor.shape:
            alias = "" if key == our_key else f" (ours: {our_key})"
            problems.append(
                f"{key}{alias} has shape {tuple(state[key].shape)}, the model needs "
                f"{tuple(tensor.shape)}")
    problems += [f"unexpected key {key}: no place for it in the model"
                 for key in state if renamed.get(key) not in ours]
    return problems


def our_names(state: dict, layout: Layout, ours: dict) -> dict:
    """Their key -> our key, for every key of `state` that has a name in our model."""
    slots = attention_slots(state, layout, ours)
    renamed = {}
    for key in state:
        our_key = our_name(key, layout, slots)
        if our_key is not None:
            renamed[key] = our_key
    return renamed


def our_name(key: str, layout: Layout, slots: set) -> Optional[str]:
    parts = block_parts(key, layout)
    if parts is None:
        return renamed_prefix(key, layout.outside)
    block, child, rest = parts
    if child in layout.block:
        return f"{block}{layout.block[child]}.{rest}"
    if (block, child) in slots:
        return f"{block}attention.{renamed_prefix(rest, ATTENTION_RENAMES) or rest}"
    return None


def attention_slots(state: dict, layout: Layout, ours: dict) -> set:
    """(our block prefix, their child) for each block child of `state` that holds exactly the
    parameter names of our attention module in that block."""
    inside = defaultdict(set)
    for key in state:
        parts = block_parts(key, layout)
        if parts is not None and parts[1] not in layout.block:
            block, child, rest = parts
            inside[block, child].add(renamed_prefix(rest, ATTENTION_RENAMES) or rest)
    return {(block, child) for (block, child), names in inside.items()
            if names == attention_names(ours, block)}


def attention_names(ours: dict, block: str) -> set:
    """Our attention module's tensor names inside `block` (e.g. "layer1.0."); empty without one."""
    prefix = f"{block}attention."
    return {key[len(prefix):] for key in ours if key.startswith(prefix)}


def block_parts(key: str, layout: Layout) -> Optional[tuple[str, str, str]]:
    """(our block prefix, their child, the rest) of a key inside a residual block, e.g. NAM's
    layer2.0.downsample.0.weight -> ("layer2.0.", "downsample", "0.weight"); None outside the
    blocks."""
    parts = key.split(".", 3)
    if len(parts) < 4 or parts[0] not in layout.stages:
        return None
    stage, index, child, rest = parts
    return f"{layout.stages[stage]}.{index}.", child, rest


def renamed_prefix(name: str, table: dict) -> Optional[str]:
    """`name` with its prefix replaced by the first matching entry of `table`; None when none
    matches."""
    for theirs, ours in table.items():
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None
