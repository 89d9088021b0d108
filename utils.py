"""Helpers shared by the scripts: data, schedules, checkpoints, metrics, parameter and FLOP counts."""
import bisect
import hashlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from conf import settings


class UserError(Exception):
    """A problem with the user's input or environment: reported as a message, never a traceback."""


# ---------------------------------------------------------------- data

CIFAR_FOLDER = "cifar-100-python"
CIFAR_LAYOUT = (f"<root>/{CIFAR_FOLDER}/ with the files train, test and meta "
                "(Python pickles, as in the official cifar-100-python.tar.gz)")


class CIFAR100Folder(Dataset):
    """CIFAR-100 read from `<root>/cifar-100-python/`, the official on-disk format.

    Unlike torchvision's CIFAR100, a folder whose files differ from the official ones (a subset, a
    custom set) is accepted with a warning instead of refused. `data` is (N, 32, 32, 3) uint8.
    """

    def __init__(self, root, train: bool, transform=None):
        folder = Path(root) / CIFAR_FOLDER
        split = "train" if train else "test"
        self.data, self.targets = _read_split(folder / split)
        self.classes = [name.decode() if isinstance(name, bytes) else name
                        for name in _read_pickle(folder / "meta")["fine_label_names"]]
        self.transform = transform
        _warn_if_unofficial(folder, split)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]

    def truncate(self, n: int) -> None:
        """Keep the first n images (for quick trials)."""
        self.data, self.targets = self.data[:n], self.targets[:n]


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    except Exception as e:
        raise UserError(f"cannot read {path} as a CIFAR-100 pickle ({type(e).__name__}: {e}); "
                        f"expected layout: {CIFAR_LAYOUT}") from None


def _read_split(path: Path):
    entry = _read_pickle(path)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        targets = [int(t) for t in entry["fine_labels"]]
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} is not in CIFAR-100's format ({type(e).__name__}: {e}); "
                        f"expected keys data (N x 3072 uint8) and fine_labels") from None
    if len(targets) != len(data):
        raise UserError(f"{path} holds {len(data)} images but {len(targets)} labels")
    return np.ascontiguousarray(data), targets


def _warn_if_unofficial(folder: Path, split: str) -> None:
    official = dict(torchvision.datasets.CIFAR100.train_list + torchvision.datasets.CIFAR100.test_list)
    with open(folder / split, "rb") as f:
        if hashlib.md5(f.read()).hexdigest() != official[split]:
            warnings.warn(f"{folder / split} is not the official CIFAR-100 file (MD5 differs): "
                          f"using it as a custom dataset", stacklevel=3)


def ensure_cifar100(root) -> None:
    """Download CIFAR-100 into root unless the folder is already there; a clear error otherwise."""
    folder = Path(root) / CIFAR_FOLDER
    if all((folder / name).is_file() for name in ("train", "test", "meta")):
        return
    try:
        torchvision.datasets.CIFAR100(root, train=True, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-100 is not in {Path(root).resolve()} and could not be downloaded "
                        f"({type(e).__name__}: {e}). Expected layout: {CIFAR_LAYOUT}. Download it "
                        f"elsewhere and copy it there, or point --data at the folder holding it.") from None


def train_transform(recipe: dict):
    steps = [transforms.RandomCrop(settings.IMAGE_SIZE, padding=4), transforms.RandomHorizontalFlip()]
    if recipe["rotation"]:
        steps.append(transforms.RandomRotation(recipe["rotation"]))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(recipe["mean"], recipe["std"])])


def test_transform(recipe: dict):
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(recipe["mean"], recipe["std"])])


def test_loader(root, recipe: dict, batch_size: int, workers: int) -> DataLoader:
    dataset = CIFAR100Folder(root, train=False, transform=test_transform(recipe))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


# ---------------------------------------------------------------- model initialisation and schedule

def initialise(model: nn.Module, recipe: dict) -> None:
    """The paper recipe's init (the NAM authors' script): every Conv2d weight kaiming_uniform_ with
    default arguments, every BatchNorm weight 1 and bias 0; PyTorch's defaults elsewhere."""
    if recipe["init"] == "pytorch":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def lr_factor(step: int, steps_per_epoch: int, warm_epochs: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): a linear warm-up over the first warm_epochs,
    reaching 1 at its last step (the classic script's first step ran at LR 0), then x0.2 at each
    milestone. Stepped per iteration; between milestones it equals MultiStepLR stepped per epoch."""
    warm_steps = warm_epochs * steps_per_epoch
    warm = (step + 1) / warm_steps if step < warm_steps else 1.0
    return warm * settings.LR_DECAY ** bisect.bisect_right(settings.MILESTONES, step // steps_per_epoch)


# ---------------------------------------------------------------- metrics

def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of images whose label is among the top-k predictions, for each k (as tensors)."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> dict:
    """Mean loss per image and top-1/top-5 accuracy (%) over the whole loader."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        top1, top5 = topk_correct(logits, labels)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        totals += torch.stack([loss.double(), top1.double(), top5.double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=device)])
    loss_sum, top1, top5, n = totals.tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(every parameter, every parameter outside BatchNorm/GroupNorm/LayerNorm layers)."""
    total = sum(p.numel() for p in model.parameters())
    norm = sum(p.numel() for m in model.modules() if isinstance(m, NORM_LAYERS)
               for p in m.parameters(recurse=False))
    return total, total - norm


@torch.no_grad()
def count_mflops(model: nn.Module, image_size: int = settings.IMAGE_SIZE) -> float:
    """Forward MFLOPs for one image, as torch.utils.flop_counter counts them (convolutions and matrix
    products, a multiply-add = 2 FLOPs; element-wise work, pooling and normalization not counted)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False) as counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops() / 1e6


# ---------------------------------------------------------------- checkpoints

def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run folder's last.pth."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint with weights_only=True: a file that needs arbitrary code to unpickle is
    refused, never executed."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs_code = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not needs_code:
            raise UserError(f"cannot read checkpoint {path}: not a valid checkpoint file (corrupt?)") from None
        raise UserError(f"refused to load {path}: it holds objects that only arbitrary code could rebuild "
                        f"({needs_code[0]}); checkpoints are read with weights_only=True") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(checkpoint, dict) or not {"model", "args"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this repo (no model weights and arguments)")
    return checkpoint
