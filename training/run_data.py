"""A run's data: the dataset (--dataset: CIFAR-100, CIFAR-10, or a folder of images per class, all
held as 32 x 32 uint8 arrays), its validation split (--val), its normalization and its loaders; and
the test split that a trained model is evaluated on (test.py, gradcam.py).

What is recorded in a run's arguments: `dataset` (what the data is: "cifar-100", "cifar-10",
"custom-<8 hex>" for CIFAR files that are not the official ones, "folder-<8 hex>" for a folder of
images, by content), `classes`, and the `mean` and `std` it was normalized with.
"""
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conf import settings
from training import cifar, image_folder, options, run_records
from training.loaders import ImageArray, make_loader
from utils import SINGLE_PROCESS, Distributed, UserError

# --dataset (conf.settings.DATASETS): the CIFAR formats; "folder" is image_folder.py's.
FORMATS = {"cifar100": cifar.CIFAR100, "cifar10": cifar.CIFAR10}
VAL_SEED = 0  # the validation split's own: the same images for every run with the same N and data
SUBSET_SEED = 0  # --subset's own, likewise


def prepare(kind: str, root, chosen: bool = True):
    """Download a CIFAR set where missing; decode and cache a folder's images, and return its
    (train, test) splits (read once: where the folder is read-only, nothing caches them). chosen: by
    --dataset, not by a resumed run's record."""
    if kind in FORMATS:
        cifar.ensure(root, FORMATS[kind], chosen)
        return None
    return open_split(kind, root, True), open_split(kind, root, False)


def open_split(kind: str, root, train: bool) -> ImageArray:
    """A split as an ImageArray with .classes and .md5 (what the dataset's identity is made of)."""
    if kind in FORMATS:
        return cifar.CifarFolder(root, train, form=FORMATS[kind])
    return image_folder.ImageFolderSplit(root, train)


def identity(kind: str, train_md5: str, test_md5: str) -> str:
    if kind in FORMATS:
        return cifar.identity_of(train_md5, test_md5, FORMATS[kind])
    return "folder-" + hashlib.md5((train_md5 + test_md5).encode()).hexdigest()[:8]


def checked_classes(kind: str, train: ImageArray, test: ImageArray) -> int:
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes)) or ["the same names in another order"]
        raise UserError(
            f"--data {kind}: the training and test splits have different classes "
            f"({', '.join(only[:5])})")
    return len(train.classes)


def check_class_names(found: list, trained, root) -> None:
    """A UserError when the data's class names are not the ones a run recorded, in its label order
    (the same number of other names, or the same names in another order, would score wrongly)."""
    if not trained or list(found) == list(trained):
        return
    if len(found) != len(trained):
        return  # said by the count checks, which name both counts
    i = next(i for i, (a, b) in enumerate(zip(found, trained)) if a != b)
    raise UserError(f"{root} does not hold the classes the run was trained on, in its order: label "
                    f"{i} is {found[i]!a} there, {trained[i]!a} in training (args.json's "
                    f"class_names)")  # !a: names that look alike show their code points


def normalization(kind: str, recipe: str, train: ImageArray) -> tuple[tuple, tuple]:
    """(mean, std) per channel. CIFAR-100: the recipe's (the paper's recipe normalizes it with
    CIFAR-10's statistics, as its authors' script does); CIFAR-10: its own; a folder: its training
    images'."""
    if kind == "cifar100":
        return tuple(settings.RECIPES[recipe]["mean"]), tuple(settings.RECIPES[recipe]["std"])
    if kind == "cifar10":
        return settings.CIFAR10_MEAN, settings.CIFAR10_STD
    pixels = train.data.reshape(-1, 3).astype(np.float64) / 255
    # A channel that never varies (all blue 0, say) would divide by 0: its std is taken as one step.
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1 / 255).tolist())


def recipe_of(saved: dict) -> dict:
    """The run's recipe with the normalization it trained with (older runs: the recipe's own)."""
    recipe = settings.RECIPES[saved["recipe"]]
    mean, std = saved.get("mean") or recipe["mean"], saved.get("std") or recipe["std"]
    return {**recipe, "mean": tuple(mean), "std": tuple(std)}


def normalization_of(saved: dict) -> tuple[tuple, tuple]:
    recipe = recipe_of(saved)
    return recipe["mean"], recipe["std"]


def stratified(targets: list, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the other indices, n drawn indices): n images, stratified by class (each class gives its
    share, rounded by largest remainder so that the shares add up to n), drawn with `seed`; both
    in their original order. The same for every run with the same n, seed and data."""
    targets = np.asarray(targets)
    classes, counts = np.unique(targets, return_counts=True)
    exact = counts * n / len(targets)
    shares = np.floor(exact).astype(int)
    shares[np.argsort(-(exact - shares), kind="stable")[:n - shares.sum()]] += 1
    rng = np.random.default_rng(seed)
    drawn = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:share]
                            for c, share in zip(classes, shares)])
    mask = np.zeros(len(targets), dtype=bool)
    mask[drawn] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def validation_split(targets: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices trained on, indices held out): --val's n images, stratified, drawn with VAL_SEED."""
    return stratified(targets, n, VAL_SEED)


def subset_draw(args) -> str:
    """How --subset draws its images: "stratified" (every class its share, SUBSET_SEED), or for a
    run resumed from before the draw was recorded, "first" (the first N, as it trained)."""
    recorded = getattr(args, "subset_draw", None)
    if recorded is None and getattr(args, "resume", None):  # what such a record stands for
        return options.value(options.OPTIONS["subset_draw"].older, vars(args))
    return recorded or "stratified"


def select(split: ImageArray, indices) -> ImageArray:
    """The images of `indices`, as a split of their own."""
    subset = ImageArray(split.data[indices], [split.targets[i] for i in indices])
    subset.classes = split.classes
    return subset


@dataclass
class Splits:
    """The run's images, opened and split, and what the run records of them (`facts`: dataset,
    classes, mean, std, subset)."""
    train: ImageArray  # the images trained on (without --val's, cut to --subset)
    val: object  # the held-out images (--val), else None
    test: ImageArray
    facts: dict


def open_splits(args, processes: Distributed = SINGLE_PROCESS, notes: list = None) -> Splits:
    """The run's data, downloaded or cached where missing (once per machine; the other ranks
    wait), checked, split; what the log should say appended to `notes`."""
    notes = [] if notes is None else notes
    kind = args.data_format
    prepared = None
    if processes.local_rank == 0:
        prepared = prepare(kind, args.data, chosen=not getattr(args, "resume", None))
    processes.barrier()
    train_set, test_set = prepared or (open_split(kind, args.data, True),
                                       open_split(kind, args.data, False))
    classes = checked_classes(kind, train_set, test_set)
    if getattr(args, "classes", None) not in (None, classes):  # a resume on other data
        raise UserError(f"--data {args.data} has {classes} classes; the run being resumed was "
                        f"trained on {args.classes}")
    check_class_names(train_set.classes, getattr(args, "class_names", None), args.data)
    mean, std = map(list, normalization(kind, args.recipe, train_set))
    facts = {"dataset": identity(kind, train_set.md5, test_set.md5), "classes": classes,
             "class_names": list(train_set.classes), "mean": mean, "std": std,
             "subset": args.subset, "subset_draw": None}
    val_set = None
    if args.val:
        if args.val >= len(train_set):
            raise UserError(f"--val {args.val} holds out every training image (there are "
                            f"{len(train_set):,})")
        kept, held = validation_split(train_set.targets, args.val)
        train_set, val_set = select(train_set, kept), select(train_set, held)
    if args.subset and args.subset >= len(train_set):  # the whole set: not a subset run in table.py
        notes.append(f"note: --subset {args.subset} covers the whole training set "
                     f"({len(train_set):,} images): recorded as no subset")
        facts["subset"] = None
    if facts["subset"]:
        facts["subset_draw"] = subset_draw(args)
        if facts["subset_draw"] == "first":
            train_set.truncate(args.subset)
        else:  # every class, not the first one or two of a folder listed class by class
            train_set = select(train_set, stratified(train_set.targets, args.subset,
                                                     SUBSET_SEED)[1])
    return Splits(train_set, val_set, test_set, facts)


@dataclass
class TrainingData:
    train_set: ImageArray  # the images trained on
    train: object  # the training loader: len() steps per epoch
    test: object
    val: object  # the validation loader (--val), else None
    generator: torch.Generator
    gate_images: object  # the first 8 test images (--gate-images), else None
    recipe: dict  # the recipe, with this data's normalization

    @property
    def evaluated_images(self) -> int:
        """The images each epoch's evaluation runs on: the test split, and --val's."""
        return len(self.test.dataset) + (len(self.val.dataset) if self.val is not None else 0)


def training_data(args, splits: Splits, device,
                  processes: Distributed = SINGLE_PROCESS) -> TrainingData:
    """The run's loaders over its opened splits."""
    recipe = recipe_of(vars(args))
    # Seeded again at the start of every epoch (recipes.seed_epoch); every rank draws the same
    # epoch, then takes its shard.
    generator = torch.Generator(device if args.loader == "device" else "cpu")
    generator.manual_seed(args.seed)
    train = make_loader(args.loader, splits.train, args.b, recipe, device, True, args.workers,
                        generator, processes)

    def evaluation(split):
        return make_loader(args.loader, split, max(args.b, 256), recipe, device, False,
                           args.workers, processes=processes)

    test = evaluation(splits.test)
    val = evaluation(splits.val) if splits.val is not None else None
    gate_images = next(iter(test))[0][:8] if args.gate_images else None  # the same every time
    return TrainingData(splits.train, train, test, val, generator, gate_images, recipe)


def trained_on(saved: dict, data=None) -> ImageArray:
    """The test split to evaluate a trained model on: --data, else the folder its run recorded, else
    ./data; a warning when that data is not what it was trained on (its recorded dataset)."""
    kind, root = run_records.data_format(saved), data or saved.get("data") or settings.DATA_DIR
    if kind in FORMATS:  # a folder's test split is decoded (or read from its cache) below
        cifar.ensure(root, FORMATS[kind], chosen=False)
    test_set = open_split(kind, root, train=False)
    trained = saved.get("classes") or settings.NUM_CLASSES
    if len(test_set.classes) != trained:  # the model could not even score its labels
        raise UserError(f"{root} holds {len(test_set.classes)} classes; the checkpoint was trained "
                        f"on {trained}")
    check_class_names(test_set.classes, saved.get("class_names"), root)
    recorded = saved.get("dataset")
    if recorded:
        if kind in FORMATS:
            train_md5 = cifar.files_md5(Path(root), FORMATS[kind], "train")
        else:  # a folder holding test/ alone is evaluated without this check
            train_md5 = open_split(kind, root,
                                   train=True).md5 if (Path(root) / "train").is_dir() else None
        found = train_md5 and identity(kind, train_md5, test_set.md5)
        if found and found != recorded:
            print(f"warning: {root} holds {found}, but the checkpoint was trained on {recorded}",
                  file=sys.stderr)
    return test_set
