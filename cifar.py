"""CIFAR-100 data: the official on-disk folder (read with a safe unpickler), torchvision's transforms
for the classic DataLoader path, the device-resident loader that augments a whole batch with one
gather (`augment`), equal per image to torchvision's result, and a training run's loaders
(`training_data`)."""
import hashlib
import itertools
import math
import os
import pickle
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

from conf import settings
from utils import SINGLE_PROCESS, Distributed, UserError, folders_to_make, remove_empty

CIFAR_FOLDER = "cifar-100-python"
CROP_PADDING = 4
CIFAR_LAYOUT = (f"<root>/{CIFAR_FOLDER}/ with the files train, test and meta "
                "(Python pickles, as in the official cifar-100-python.tar.gz)")
IMAGE_VALUES = 3 * 32 * 32  # one row of a split's data: the red, then green, then blue 32 x 32 planes
# urllib waits forever by default: a network that accepts and never answers would hang the run. This
# bounds every wait (connecting, each read), not the whole download.
DOWNLOAD_TIMEOUT_S = 60


class ImageArray(Dataset):
    """Images held as an (N, 32, 32, 3) uint8 array with integer labels; PIL images go through
    `transform`, as torchvision's datasets do."""

    def __init__(self, data: np.ndarray, targets: list, transform=None):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]

    def truncate(self, n: int) -> None:
        """Keep the first n images (for quick trials)."""
        self.data, self.targets = self.data[:n], self.targets[:n]


class CIFAR100Folder(ImageArray):
    """CIFAR-100 read from `<root>/cifar-100-python/`, the official on-disk format.

    Unlike torchvision's CIFAR100, a folder whose files differ from the official ones (a subset, a
    custom set) is accepted with a warning instead of refused. What training relies on is checked
    when loading: at least one image, whole 3 x 32 x 32 images, whole-number labels within the
    classes, and a class name for each class.
    """

    def __init__(self, root, train: bool, transform=None):
        folder = Path(root) / CIFAR_FOLDER
        split = "train" if train else "test"
        super().__init__(*_read_split(folder / split), transform)
        self.classes = _read_class_names(folder / "meta")
        self.md5 = file_md5(folder / split)
        self.official = self.md5 == dict(torchvision.datasets.CIFAR100.train_list +
                                         torchvision.datasets.CIFAR100.test_list)[split]
        if not self.official:
            _warn_unofficial(folder, split)


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def dataset_identity(train: CIFAR100Folder, test: CIFAR100Folder) -> str:
    """"cifar-100" for the official files, else "custom-" and 8 hex digits of the two files' MD5s:
    what table.py groups runs by, whatever folder the data sits in."""
    return identity_of(train.md5, test.md5)


def identity_of(train_md5: str, test_md5: str) -> str:
    official = dict(torchvision.datasets.CIFAR100.train_list + torchvision.datasets.CIFAR100.test_list)
    if (train_md5, test_md5) == (official["train"], official["test"]):
        return "cifar-100"
    return "custom-" + hashlib.md5((train_md5 + test_md5).encode()).hexdigest()[:8]


def trained_on(saved: dict, data=None) -> "CIFAR100Folder":
    """The test split to evaluate a trained model on: --data, else the folder its run recorded, else
    ./data; a warning when those files are not the data it was trained on (its recorded dataset)."""
    root = data or saved.get("data") or settings.DATA_DIR
    ensure_cifar100(root)
    test_set = CIFAR100Folder(root, train=False)
    recorded = saved.get("dataset")
    if recorded:
        found = identity_of(file_md5(Path(root) / CIFAR_FOLDER / "train"), test_set.md5)
        if found != recorded:
            print(f"warning: {root} holds {found}, but the checkpoint was trained on {recorded}", file=sys.stderr)
    return test_set


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a dataset file cannot run code either."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"),
               # numpy scalars, such as labels written as a list of numpy ints
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not plain data or a numpy array")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    except Exception as e:
        raise UserError(f"cannot read {path} as a CIFAR-100 pickle ({type(e).__name__}: {e}); "
                        f"expected layout: {CIFAR_LAYOUT}") from None


def _read_split(path: Path):
    entry = _read_pickle(path)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["fine_labels"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} is not in CIFAR-100's format ({type(e).__name__}: {e}); "
                        f"expected keys data (N x 3072 uint8) and fine_labels") from None
    if data.size % IMAGE_VALUES:
        raise UserError(f"{path}: its data holds {data.size} values, not a whole number of "
                        f"3 x 32 x 32 images ({IMAGE_VALUES} values each)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if len(images) == 0:
        raise UserError(f"{path} holds no images")
    targets = _checked_labels(path, labels)
    if len(targets) != len(images):
        raise UserError(f"{path} holds {len(images)} images but {len(targets)} labels")
    return np.ascontiguousarray(images), targets


def _checked_labels(path: Path, labels: np.ndarray) -> list:
    """The labels as ints, once each is known to be a whole number naming one of the classes (int()
    alone would turn 2.7 into 2, and an index past the classes would fail only inside the loss)."""
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise UserError(f"{path}: fine_labels must be a list of integers, not {labels.dtype} values "
                        f"of shape {labels.shape}")
    if labels.dtype.kind == "f":
        fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if fractional.any():
            first = int(np.argmax(fractional))
            raise UserError(f"{path}: fine_labels[{first}] is {labels[first].item()}, not a whole number "
                            f"(labels must be integers); non-integer labels: {fractional.sum()} of {len(labels)}")
    outside = (labels < 0) | (labels >= settings.NUM_CLASSES)
    if outside.any():
        first, last_class = int(np.argmax(outside)), settings.NUM_CLASSES - 1
        raise UserError(f"{path}: fine_labels[{first}] is {labels[first].item()}, outside 0..{last_class} "
                        f"(CIFAR-100 has {settings.NUM_CLASSES} classes); out-of-range labels: "
                        f"{outside.sum()} of {len(labels)}")
    return labels.astype(np.int64).tolist()


def _read_class_names(path: Path) -> list:
    """fine_label_names, one per class. Every label is below NUM_CLASSES (checked when reading the
    split), so NUM_CLASSES names are enough for every label to have one."""
    names = _read_pickle(path).get("fine_label_names")
    if not isinstance(names, (list, tuple)):
        raise UserError(f"{path} has no list fine_label_names (the class names); expected layout: {CIFAR_LAYOUT}")
    if len(names) < settings.NUM_CLASSES:
        raise UserError(f"{path} names {len(names)} classes in fine_label_names; "
                        f"CIFAR-100 has {settings.NUM_CLASSES}")
    return [name.decode() if isinstance(name, bytes) else name for name in names]


# Folders already reported as unofficial: one line per folder and process, not one per split.
_reported_unofficial = set()


def _warn_unofficial(folder: Path, split: str) -> None:
    """Once per folder and process, a plain line rather than a Python warning with its source line."""
    if folder.resolve() in _reported_unofficial:
        return
    _reported_unofficial.add(folder.resolve())
    if not Distributed.from_environment().main:  # under torchrun, rank 0 alone says it
        return
    print(f"warning: {folder / split} is not the official CIFAR-100 file (MD5 differs): "
          f"using {folder} as a custom dataset", file=sys.stderr)


def ensure_cifar100(root) -> None:
    """Download CIFAR-100 into root unless the folder is already there; a clear error otherwise."""
    folder = Path(root) / CIFAR_FOLDER
    if Path(root).is_file():
        raise UserError(f"--data {root} is a file, not a folder; expected layout: {CIFAR_LAYOUT}")
    if Path(root).name == CIFAR_FOLDER and not folder.exists():
        raise UserError(f"--data {root} is the dataset's own folder: point --data at {Path(root).parent}")
    present = [name for name in ("train", "test", "meta") if (folder / name).is_file()]
    if len(present) == 3:
        return
    if present:  # a folder of the user's own: never overwritten by a download
        missing = sorted({"train", "test", "meta"} - set(present))
        raise UserError(f"{folder} holds {', '.join(present)} but not {', '.join(missing)}; expected layout: "
                        f"{CIFAR_LAYOUT}")
    new_folders = folders_to_make(Path(root))
    try:
        _download_cifar100(Path(root))
    except Exception as e:
        remove_empty(new_folders)  # a failed download leaves no empty --data folder behind
        why = f"timed out: no answer for {DOWNLOAD_TIMEOUT_S} s" if _timed_out(e) else f"{type(e).__name__}: {e}"
        raise UserError(f"CIFAR-100 is not in {Path(root).resolve()} and could not be downloaded "
                        f"({why}). Expected layout: {CIFAR_LAYOUT}. Download it "
                        f"elsewhere and copy it there, or point --data at the folder holding it.") from None


def _download_cifar100(root: Path) -> None:
    """Download and unpack into a scratch folder, then move the checked files into place: an
    interrupted or failed download leaves nothing that looks like a dataset."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-100-download-") as scratch:
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torchvision.datasets.CIFAR100(scratch, train=True, download=True)  # also checks the files' MD5s
        finally:
            socket.setdefaulttimeout(previous_timeout)
        (root / CIFAR_FOLDER).mkdir(exist_ok=True)
        for name in ("meta", "test", "train"):
            os.replace(Path(scratch) / CIFAR_FOLDER / name, root / CIFAR_FOLDER / name)


def _timed_out(error: Exception) -> bool:
    # urllib raises a timeout as it is, or wrapped in a URLError when it happened while connecting.
    return isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)


def train_transform(recipe: dict):
    steps = [transforms.RandomCrop(settings.IMAGE_SIZE, padding=CROP_PADDING), transforms.RandomHorizontalFlip()]
    if recipe["rotation"]:
        steps.append(transforms.RandomRotation(recipe["rotation"]))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(recipe["mean"], recipe["std"])])


def test_transform(recipe: dict):
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(recipe["mean"], recipe["std"])])


def rotation_sources(angles, size: int):
    """For torchvision's rotate (nearest, about the centre) of size x size images by each angle: the
    (column, row) that every output pixel reads, each (B, H, W) float, possibly outside the image.
    Same float operations as torchvision's affine grid (rearranged only where IEEE arithmetic gives
    identical results), rounded half-to-even as grid_sample's nearest mode does."""
    radians = torch.deg2rad(angles.double()).view(-1, 1, 1)
    # torchvision's inverse matrix for rotate(angle) is [[cos, -sin], [sin, cos]], scaled to [-1, 1].
    cos, sin = radians.cos().float() / (0.5 * size), radians.sin().float() / (0.5 * size)
    x = torch.linspace(-size * 0.5 + 0.5, size * 0.5 - 0.5, steps=size, device=angles.device)
    x, y = x.view(1, 1, -1), x.view(1, -1, 1)
    columns = (x * cos - y * sin).add_(1).mul_(size).sub_(1).div_(2).round_()
    rows = (x * sin + y * cos).add_(1).mul_(size).sub_(1).div_(2).round_()
    return columns, rows  # whole numbers, kept as float to avoid conversions


def augment(images, offsets, flips, angles, mean, std):
    """A batch's RandomCrop(32, padding=4), RandomHorizontalFlip, RandomRotation (nearest, zero fill),
    ToTensor and Normalize, with one gather for the three geometric steps: uint8 (B, C, H, W) -> normalized float32.

    offsets: (B, 2) crop top/left in the padded image; flips: (B,) bool; angles: (B,) degrees or None;
    mean, std: (C,) tensors. Per image this computes exactly what torchvision computes with the same
    parameters (tested). Each output pixel's source is traced back through the three steps in
    reverse: rotation, then flip, then crop.
    """
    batch, channels, size, width = images.shape
    assert size == width, "square images"
    device = images.device
    # Source positions in float (exact for these small whole numbers): one conversion at the end.
    if angles is None:
        rows = torch.arange(size, device=device, dtype=torch.float32).view(1, -1, 1)
        columns = rows.view(1, 1, -1)
    else:
        columns, rows = rotation_sources(angles, size)
        inside = (rows == rows.clamp(0, size - 1)) & (columns == columns.clamp(0, size - 1))
    columns = torch.where(flips[:, None, None], (size - 1) - columns, columns)
    offsets = offsets.float()
    source = (rows + offsets[:, :1, None]).mul_(size + 2 * CROP_PADDING) + (columns + offsets[:, 1:, None])
    if angles is not None:
        source = torch.where(inside, source, 0)  # pixel (0, 0) of the padded image: always fill (zero)
    index = source.long().view(batch, 1, -1).expand(batch, channels, -1)
    pixels = nn.functional.pad(images, (CROP_PADDING,) * 4).flatten(2).gather(2, index)
    return normalize(pixels, mean, std).view(batch, channels, size, size)


def normalize(pixels, mean, std):
    """uint8 (B, C, ...) -> float32: ToTensor then Normalize, the same operations in the same order."""
    shape = (1, -1) + (1,) * (pixels.dim() - 2)
    return pixels.float().div_(255).sub_(mean.view(shape)).div_(std.view(shape))


class DeviceLoader:
    """The images kept on the training device as uint8 and augmented there a whole batch at a time.

    Per-image CPU transforms in worker processes cannot feed a modern GPU; this computes the same
    transforms (`augment`) with the same parameter distributions: crop offsets uniform on 0..8, flip
    with probability 1/2, angle uniform on (-r, r). An epoch's order and parameters are drawn from
    `generator` when the epoch starts, so that it can be started at any step (`iterate`).

    Under torchrun every rank draws the same epoch (same generator state) and takes every world-th
    draw; a training epoch is padded by wrapping so that all ranks run the same number of steps, the
    test set is not, so that the shards cover it exactly once.
    """

    def __init__(self, dataset: ImageArray, batch_size: int, recipe: dict, device, generator=None, train=True,
                 processes: Distributed = SINGLE_PROCESS):
        self.dataset = dataset
        self.images = torch.from_numpy(dataset.data).to(device).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        self.labels = torch.as_tensor(dataset.targets, device=device)
        self.batch_size, self.train, self.generator = batch_size, train, generator
        self.rotation = recipe["rotation"]
        self.mean = torch.tensor(recipe["mean"], device=device)
        self.std = torch.tensor(recipe["std"], device=device)
        n = len(self.labels)
        self.draws = math.ceil(n / processes.world) * processes.world if train else n
        self.positions = torch.arange(processes.rank, self.draws, processes.world, device=device)

    def __len__(self):
        return math.ceil(len(self.positions) / self.batch_size)

    def __iter__(self):
        return self.iterate(0)

    def epoch_parameters(self):
        """(order, crop offsets, flips, angles or None) for every draw of one epoch."""
        g, device, n = self.generator, self.images.device, len(self.labels)
        order = torch.randperm(n, generator=g, device=device)
        order = torch.cat([order, order[:self.draws - n]])
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (self.draws, 2), generator=g, device=device)
        flips = torch.rand(self.draws, generator=g, device=device) < 0.5
        angles = (torch.empty(self.draws, device=device).uniform_(-self.rotation, self.rotation, generator=g)
                  if self.rotation else None)
        return order, offsets, flips, angles

    def iterate(self, start_step: int = 0):
        if self.train:
            order, offsets, flips, angles = self.epoch_parameters()
        for step in range(start_step, len(self)):
            mine = self.positions[step * self.batch_size:(step + 1) * self.batch_size]
            if self.train:
                index = order[mine]
                images = augment(self.images[index], offsets[mine], flips[mine],
                                 None if angles is None else angles[mine], self.mean, self.std)
            else:
                index = mine
                images = normalize(self.images[index], self.mean, self.std)
            yield images, self.labels[index]


def batches(loader, start_step: int = 0, epoch: int = 0):
    """(step, (images, labels)) of `epoch` from start_step on. A DeviceLoader jumps there; a DataLoader
    replays the skipped batches, so that the augmentations drawn after them are the same as without."""
    if isinstance(loader, DeviceLoader):
        return enumerate(loader.iterate(start_step), start_step)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    return itertools.islice(enumerate(loader), start_step, None)


def make_loader(kind: str, dataset: ImageArray, batch_size: int, recipe: dict, device, train: bool,
                workers: int = 0, generator=None, processes: Distributed = SINGLE_PROCESS):
    """`kind` "device" (DeviceLoader) or "workers" (torchvision transforms in a DataLoader); under
    torchrun, this rank's shard."""
    if kind == "device":
        return DeviceLoader(dataset, batch_size, recipe, device, generator, train, processes)
    dataset.transform = train_transform(recipe) if train else test_transform(recipe)
    sampler = None
    if processes.enabled and train:
        sampler = DistributedSampler(dataset, processes.world, processes.rank, shuffle=True,
                                     seed=generator.initial_seed())
    elif processes.enabled:
        dataset = Subset(dataset, range(processes.rank, len(dataset), processes.world))
    # The loader's own generator draws the shuffle and the workers' seeds, so seeding it when an
    # epoch starts fixes that epoch. Workers are therefore started anew each epoch (persistent ones
    # would carry their random state from one epoch into the next).
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, pin_memory=device.type == "cuda")


@dataclass
class TrainingData:
    train_set: ImageArray
    train: object  # the training loader: len() steps per epoch
    test: object
    generator: torch.Generator
    gate_images: object  # the first 8 test images (--gate-images), else None


def training_data(args, recipe: dict, device, processes: Distributed = SINGLE_PROCESS,
                  notes: list = None) -> TrainingData:
    """The run's data, downloaded where missing (once per machine; the other ranks wait), its identity
    recorded in args.dataset for table.py; what the log should say appended to `notes`."""
    notes = [] if notes is None else notes
    if processes.local_rank == 0:
        ensure_cifar100(args.data)
    processes.barrier()
    train_set = CIFAR100Folder(args.data, train=True)
    test_set = CIFAR100Folder(args.data, train=False)
    args.dataset = dataset_identity(train_set, test_set)
    if args.subset and args.subset >= len(train_set):  # the whole set: not a subset run in table.py
        notes.append(f"note: --subset {args.subset} covers the whole training set ({len(train_set):,} images): "
                     f"recorded as no subset")
        args.subset = None
    if args.subset:
        train_set.truncate(args.subset)
    # Seeded again at the start of every epoch (training.seed_epoch); every rank draws the same
    # epoch, then takes its shard.
    generator = torch.Generator(device if args.loader == "device" else "cpu")
    generator.manual_seed(args.seed)
    train = make_loader(args.loader, train_set, args.b, recipe, device, True, args.workers, generator, processes)
    test = make_loader(args.loader, test_set, max(args.b, 256), recipe, device, False, args.workers,
                       processes=processes)
    gate_images = next(iter(test))[0][:8] if args.gate_images else None  # the same every time
    return TrainingData(train_set, train, test, generator, gate_images)
