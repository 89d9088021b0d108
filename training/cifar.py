"""CIFAR-100 and CIFAR-10 in their official on-disk formats (Python pickles, read with a safe
unpickler): the folders `cifar-100-python/` and `cifar-10-batches-py/`, downloaded by torchvision
where missing, into a scratch folder first, with a timeout; a folder of the user's own in that
format is accepted with one warning.
"""
import hashlib
import os
import pickle
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision

from training.loaders import ImageArray
from utils import Distributed, UserError, folders_to_make, remove_empty

# one row of a split's data: the red, then green, then blue 32 x 32 planes
IMAGE_VALUES = 3 * 32 * 32
# urllib waits forever by default: a network that accepts and never answers would hang the run. This
# bounds every wait (connecting, each read), not the whole download.
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class CifarFormat:
    """One of the two official formats: where its files are, what its pickles call things."""
    name: str  # as the log and the recorded dataset say it
    source: type  # the torchvision dataset that knows its files and their MD5s (and downloads it)
    labels: str  # the key of the labels in a split's pickle
    classes: int

    @property
    def folder(self) -> str:
        return self.source.base_folder

    @property
    def splits(self) -> dict:
        return {"train": [name for name, _ in self.source.train_list],
                "test": [name for name, _ in self.source.test_list]}

    @property
    def meta(self) -> str:
        return self.source.meta["filename"]

    @property
    def names(self) -> str:  # the key of the class names in the meta pickle
        return self.source.meta["key"]

    @property
    def files(self) -> list[str]:
        return [*self.splits["train"], *self.splits["test"], self.meta]

    @property
    def layout(self) -> str:
        return (
            f"<root>/{self.folder}/ with the files {', '.join(self.files[:-1])} and "
            f"{self.files[-1]} (Python pickles, as in the official {self.source.filename})")

    @property
    def option(self) -> str:  # its --dataset value
        return self.name.lower().replace("-", "")

    def complete_in(self, root: Path) -> bool:
        return all((root / self.folder / name).is_file() for name in self.files)

    def official_md5(self, split: str) -> str:
        return split_md5(dict(self.source.train_list + self.source.test_list)[name]
                         for name in self.splits[split])


CIFAR100 = CifarFormat("CIFAR-100", torchvision.datasets.CIFAR100, "fine_labels", 100)
CIFAR10 = CifarFormat("CIFAR-10", torchvision.datasets.CIFAR10, "labels", 10)
CIFAR_FORMATS = (CIFAR100, CIFAR10)
CIFAR_FOLDER = CIFAR100.folder
CIFAR_LAYOUT = CIFAR100.layout


def split_md5(file_md5s) -> str:
    """A split's MD5: its one file's, or for several files (CIFAR-10's five batches) that of theirs
    joined."""
    md5s = list(file_md5s)
    return md5s[0] if len(md5s) == 1 else hashlib.md5("".join(md5s).encode()).hexdigest()


class CifarFolder(ImageArray):
    """A split read from `<root>/<format's folder>/`.

    Unlike torchvision's datasets, a folder whose files differ from the official ones (a subset, a
    custom set) is accepted with a warning instead of refused. What training relies on is checked
    when loading: at least one image, whole 3 x 32 x 32 images, whole-number labels within the
    classes, and a class name for each class.
    """

    def __init__(self, root, train: bool, transform=None, form: CifarFormat = CIFAR100):
        folder = Path(root) / form.folder
        split = "train" if train else "test"
        parts = [_read_split(folder / name, form) for name in form.splits[split]]
        super().__init__(np.concatenate([images for images, _ in parts]),
                         sum((labels for _, labels in parts), []),
                         transform)
        self.form = form
        self.classes = _read_class_names(folder / form.meta, form)
        self.md5 = files_md5(Path(root), form, split)
        self.official = self.md5 == form.official_md5(split)
        if not self.official:
            _warn_unofficial(folder, split, form)


class CIFAR100Folder(CifarFolder):
    """CIFAR-100 read from `<root>/cifar-100-python/`."""

    def __init__(self, root, train: bool, transform=None):
        super().__init__(root, train, transform, CIFAR100)


def files_md5(root: Path, form: CifarFormat, split: str) -> str:
    """The MD5 of a split's files in <root>/<format's folder>/ (split_md5), read without loading
    them."""
    return split_md5(file_md5(root / form.folder / name) for name in form.splits[split])


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def dataset_identity(train: CifarFolder, test: CifarFolder) -> str:
    """"cifar-100" or "cifar-10" for the official files, else "custom-" (CIFAR-10's format:
    "custom-cifar-10-") and 8 hex digits of the two splits' MD5s: what table.py groups runs by,
    whatever folder the data sits in."""
    return identity_of(train.md5, test.md5, train.form)


def identity_of(train_md5: str, test_md5: str, form: CifarFormat = CIFAR100) -> str:
    if (train_md5, test_md5) == (form.official_md5("train"), form.official_md5("test")):
        return form.name.lower()
    # Runs before CIFAR-10 was named here recorded "custom-<8 hex>" for both formats; the hex
    # digits tell the files apart (run_records.same_dataset).
    named = "" if form is CIFAR100 else f"{form.name.lower()}-"
    return f"custom-{named}" + hashlib.md5((train_md5 + test_md5).encode()).hexdigest()[:8]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a dataset file cannot run code either."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"),
               # numpy scalars, such as labels written as a list of numpy ints
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: not plain data or a numpy array")
        return super().find_class(module, name)


def _read_pickle(path: Path, layout: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    except Exception as e:
        raise UserError(f"cannot read {path} as a CIFAR pickle ({type(e).__name__}: {e}); "
                        f"expected layout: {layout}") from None


def _read_split(path: Path, form: CifarFormat):
    entry = _read_pickle(path, form.layout)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[form.labels])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} is not in {form.name}'s format ({type(e).__name__}: {e}); "
                        f"expected keys data (N x 3072 uint8) and {form.labels}") from None
    if data.size % IMAGE_VALUES:
        raise UserError(f"{path}: its data holds {data.size} values, not a whole number of "
                        f"3 x 32 x 32 images ({IMAGE_VALUES} values each)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if len(images) == 0:
        raise UserError(f"{path} holds no images")
    targets = _checked_labels(path, labels, form)
    if len(targets) != len(images):
        raise UserError(f"{path} holds {len(images)} images but {len(targets)} labels")
    return np.ascontiguousarray(images), targets


def _checked_labels(path: Path, labels: np.ndarray, form: CifarFormat) -> list:
    """The labels as ints, once each is known to be a whole number naming one of the classes (int()
    alone would turn 2.7 into 2, and an index past the classes would fail only inside the loss)."""
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise UserError(
            f"{path}: {form.labels} must be a list of integers, not {labels.dtype} values "
            f"of shape {labels.shape}")
    if labels.dtype.kind == "f":
        fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if fractional.any():
            first = int(np.argmax(fractional))
            raise UserError(
                f"{path}: {form.labels}[{first}] is {labels[first].item()}, not a whole number "
                f"(labels must be integers); non-integer labels: {fractional.sum()} of "
                f"{len(labels)}")
    outside = (labels < 0) | (labels >= form.classes)
    if outside.any():
        first, last_class = int(np.argmax(outside)), form.classes - 1
        raise UserError(
            f"{path}: {form.labels}[{first}] is {labels[first].item()}, outside 0..{last_class} "
            f"({form.name} has {form.classes} classes); out-of-range labels: "
            f"{outside.sum()} of {len(labels)}")
    return labels.astype(np.int64).tolist()


def _read_class_names(path: Path, form: CifarFormat) -> list:
    """The class names, one per class. Every label is below the format's class count (checked when
    reading the split), so that many names are enough for every label to have one."""
    names = _read_pickle(path, form.layout).get(form.names)
    if not isinstance(names, (list, tuple)):
        raise UserError(
            f"{path} has no list {form.names} (the class names); expected layout: {form.layout}")
    if len(names) < form.classes:
        raise UserError(
            f"{path} names {len(names)} classes in {form.names}; {form.name} has {form.classes}")
    return [name.decode() if isinstance(name, bytes) else name for name in names[:form.classes]]


# Folders already reported as unofficial: one line per folder and process, not one per split.
_reported_unofficial = set()


def _warn_unofficial(folder: Path, split: str, form: CifarFormat) -> None:
    """Once per folder and process, a plain line rather than a Python warning with its source
    line."""
    if folder.resolve() in _reported_unofficial:
        return
    _reported_unofficial.add(folder.resolve())
    if not Distributed.from_environment().main:  # under torchrun, rank 0 alone says it
        return
    files = form.splits[split]
    which = f"{folder / files[0]} is not the official {form.name} file" if len(files) == 1 else \
        f"{folder}'s {split} files ({', '.join(files)}) are not the official {form.name} files"
    print(f"warning: {which} (MD5 differs): "
          f"using {folder} as a custom dataset", file=sys.stderr)


def ensure_cifar100(root) -> None:
    ensure(root, CIFAR100)


def ensure(root, form: CifarFormat, chosen: bool = True) -> None:
    """Download the dataset into root unless its folder is already there; a clear error otherwise.
    chosen: by this command's --dataset (so another value can be suggested), not by a run's record
    (a resume, test.py, gradcam.py)."""
    folder = Path(root) / form.folder
    if Path(root).is_file():
        raise UserError(f"--data {root} is a file, not a folder; expected layout: {form.layout}")
    for own in CIFAR_FORMATS:
        if Path(root).name == own.folder and not folder.exists():
            hint = ""
            if own is not form and chosen:
                hint = f" and pass --dataset {own.option}"
            elif own is not form:
                hint = f" (the run is {form.name}'s)"
            whose = "the dataset's" if own is form else f"{own.name}'s"
            raise UserError(
                f"--data {root} is {whose} own folder: point --data at {Path(root).parent}{hint}")
    if form.complete_in(Path(root)):
        return
    present = [name for name in form.files if (folder / name).is_file()]
    if present:  # a folder of the user's own: never overwritten by a download
        missing = [name for name in form.files if name not in present]
        raise UserError(
            f"{folder} holds {', '.join(present)} but not {', '.join(missing)}; expected layout: "
            f"{form.layout}")
    hint = "".join(f" {root} holds {other.name}: "
                   + (f"for it, pass --dataset {other.option}." if chosen else
                      f"the run is {form.name}'s.")
                   for other in CIFAR_FORMATS if other is not form
                   and other.complete_in(Path(root)))
    new_folders = folders_to_make(Path(root))
    try:
        _download(Path(root), form)
    except Exception as e:
        remove_empty(new_folders)  # a failed download leaves no empty --data folder behind
        why = f"{type(e).__name__}: {e}"
        if _timed_out(e):
            why = f"timed out: no answer for {DOWNLOAD_TIMEOUT_S} s"
        raise UserError(f"{form.name} is not in {Path(root).resolve()} and could not be downloaded "
                        f"({why}).{hint} Expected layout: {form.layout}. Download it elsewhere and "
                        f"copy it there, or point --data at the folder holding it.") from None
    if hint:
        print(f"note: {form.name} was not in {root}, so it was downloaded there.{hint}",
              file=sys.stderr)


def _download(root: Path, form: CifarFormat) -> None:
    """Download and unpack into a scratch folder, then move the checked files into place: an
    interrupted or failed download leaves nothing that looks like a dataset."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{form.name.lower()}-download-") as scratch:
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            # Looked up now, not at import: the tests replace it. It also checks the files' MD5s.
            getattr(torchvision.datasets, form.source.__name__)(scratch, train=True, download=True)
        finally:
            socket.setdefaulttimeout(previous_timeout)
        (root / form.folder).mkdir(exist_ok=True)
        # the meta file first: a folder with train alone is not taken for whole
        for name in reversed(form.files):
            os.replace(Path(scratch) / form.folder / name, root / form.folder / name)


def _timed_out(error: Exception) -> bool:
    # urllib raises a timeout as it is, or wrapped in a URLError when it happened while connecting.
    return isinstance(error,
                      TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)

