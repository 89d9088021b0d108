"""The loaders a run trains and tests with, for images held as a uint8 array (ImageArray): the
device-resident loader that augments a whole batch with one gather (`augment`, equal per image to
torchvision's transforms), and torchvision's transforms in DataLoader processes (the classic
path)."""
import itertools
import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

from conf import settings
from utils import SINGLE_PROCESS, Distributed

CROP_PADDING = 4


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


def train_transform(recipe: dict):
    steps = [transforms.RandomCrop(settings.IMAGE_SIZE, padding=CROP_PADDING),
             transforms.RandomHorizontalFlip()]
    if recipe["rotation"]:
        steps.append(transforms.RandomRotation(recipe["rotation"]))
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize(recipe["mean"], recipe["std"])])


def test_transform(recipe: dict):
    return transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize(recipe["mean"], recipe["std"])])


def rotation_sources(angles, size: int):
    """For torchvision's rotate (nearest, about the centre) of size x size images by each angle: the
    (column, row) that every output pixel reads, each (B, H, W) float, possibly outside the image.
    Same float operations as torchvision's affine grid (rearranged only where IEEE arithmetic gives
    identical results), rounded half-to-even as grid_sample's nearest mode does."""
    radians = torch.deg2rad(angles.double()).view(-1, 1, 1)
    # torchvision's inverse matrix for rotate(angle) is [[cos, -sin], [sin, cos]], scaled to [-1,
    # 1].
    cos, sin = radians.cos().float() / (0.5 * size), radians.sin().float() / (0.5 * size)
    x = torch.linspace(-size * 0.5 + 0.5, size * 0.5 - 0.5, steps=size, device=angles.device)
    x, y = x.view(1, 1, -1), x.view(1, -1, 1)
    columns = (x * cos - y * sin).add_(1).mul_(size).sub_(1).div_(2).round_()
    rows = (x * sin + y * cos).add_(1).mul_(size).sub_(1).div_(2).round_()
    return columns, rows  # whole numbers, kept as float to avoid conversions


def augment(images, offsets, flips, angles, mean, std):
    """A batch's RandomCrop(32, padding=4), RandomHorizontalFlip, RandomRotation (nearest, zero
    fill), ToTensor and Normalize, with one gather for the three geometric steps: uint8 (B, C, H, W)
    -> normalized float32.

    offsets: (B, 2) crop top/left in the padded image; flips: (B,) bool; angles: (B,) degrees or
    None; mean, std: (C,) tensors. Per image this computes exactly what torchvision computes with
    the same parameters (tested). Each output pixel's source is traced back through the three steps
    in reverse: rotation, then flip, then crop.
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
    source = (rows + offsets[:, :1,
                             None]).mul_(size + 2 * CROP_PADDING) + (columns + offsets[:, 1:, None])
    if angles is not None:
        # pixel (0, 0) of the padded image: always fill (zero)
        source = torch.where(inside, source, 0)
    index = source.long().view(batch, 1, -1).expand(batch, channels, -1)
    pixels = nn.functional.pad(images, (CROP_PADDING,) * 4).flatten(2).gather(2, index)
    return normalize(pixels, mean, std).view(batch, channels, size, size)


def normalize(pixels, mean, std):
    """uint8 (B, C, ...) -> float32: ToTensor then Normalize, the same operations in the same
    order."""
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

    def __init__(self, dataset: ImageArray, batch_size: int, recipe: dict, device, generator=None,
                 train=True,
                 processes: Distributed = SINGLE_PROCESS):
        self.dataset = dataset
        # uint8 NCHW
        self.images = torch.from_numpy(dataset.data).to(device).permute(0, 3, 1, 2).contiguous()
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
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (self.draws, 2), generator=g,
                                device=device)
        flips = torch.rand(self.draws, generator=g, device=device) < 0.5
        angles = (torch.empty(self.draws,
                              device=device).uniform_(-self.rotation, self.rotation, generator=g)
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
    """(step, (images, labels)) of `epoch` from start_step on. A DeviceLoader jumps there; a
    DataLoader replays the skipped batches, so that the augmentations drawn after them are the same
    as without."""
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
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler,
                      generator=generator, num_workers=workers, pin_memory=device.type == "cuda")
