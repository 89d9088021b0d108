"""A dataset of one's own (--dataset folder): a folder of images per class, in the layout of
torchvision's ImageFolder.

    <root>/train/<class>/<images>      <root>/test/<class>/<images>   (or val/ for test/)

Class names are sorted as ImageFolder sorts them. Each image (PNG, JPEG, or another format of
torchvision's list) is converted to RGB and resized to 32 x 32 once (PIL's bilinear resize, which
antialiases; the aspect ratio is not kept), then cached beside the folders as uint8 arrays
(<root>/.cache-32x32-<split>.npz, plain arrays, no pickle), so that both loaders and the
device-resident augmentation work as they do on CIFAR. A cache is used while the split's file names,
sizes and modification times are those it was made from.
"""
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import utils
from conf import settings
from training.loaders import ImageArray
from utils import UserError

# torchvision's
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = ("<root>/train/<class>/<images> and <root>/test/<class>/<images> "
          "(or val/ in place of test/)")


def split_folder(root, train: bool) -> Path:
    """<root>/train, or <root>/test (else <root>/val); a clear error when it is not there."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root} is not a folder; expected layout: {LAYOUT}")
    names = ("train",) if train else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserError(
        f"{root} has no {' or '.join(f'{name}/' for name in names)} folder; expected layout: "
        f"{LAYOUT}")


def check_utf8(path: Path, what: str, why: str = "") -> None:
    """A UserError when the file system gave `path`'s name as bytes that are not UTF-8."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{path!r}: {what} whose name is not valid UTF-8{why}: rename it") from None


def listing(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, sorted; every image file with its class index). Hidden files are left out; an
    empty class folder or a file that is not an image by its name is an error."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()
                     and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} holds no class folders; expected layout: {LAYOUT}")
    for name in classes:
        check_utf8(folder / name, "a class folder", " (the run records class names as text)")
    files = []
    for index, name in enumerate(classes):
        found = []
        # as ImageFolder walks
        for parent, folders, names in os.walk(folder / name, followlinks=True):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for file in sorted(n for n in names if not n.startswith(".")):
                path = Path(parent) / file
                check_utf8(path, "a file")
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise UserError(
                        f"{path} is not an image (expected one of {' '.join(IMAGE_EXTENSIONS)})")
                # Reading a FIFO would wait for a writer for ever. (A dangling link is said when
                # it is read.)
                if path.exists() and not path.is_file():
                    raise UserError(f"{path} is not a regular file (a FIFO, a socket or a "
                                    f"device): remove it")
                found.append((path, index))
        if not found:
            raise UserError(
                f"{folder / name} holds no images: every class folder needs at least one")
        files += found
    return classes, files


class ImageFolderSplit(ImageArray):
    """One split, as 32 x 32 RGB uint8 arrays (from the cache, or decoded and cached)."""

    def __init__(self, root, train: bool, transform=None):
        folder = split_folder(root, train)
        self.classes, files = listing(folder)
        cache = Path(root) / f".cache-{settings.IMAGE_SIZE}x{settings.IMAGE_SIZE}-{folder.name}.npz"
        key = listing_key(folder, files)
        data = read_cache(cache, key, self.classes)
        if data is None:
            data = decode(files, folder)
            write_cache(cache, key, self.classes, data)
        super().__init__(data, [index for _, index in files], transform)
        content = hashlib.md5(data.tobytes())
        content.update(np.asarray(self.targets, dtype=np.int64).tobytes())
        content.update("\n".join(self.classes).encode())
        self.md5 = content.hexdigest()


def listing_key(folder: Path, files) -> str:
    """What a cache was made from: every file's path below the split, size and modification time."""
    key = hashlib.md5()
    for path, index in files:
        try:
            stat = path.stat()
        except OSError as e:  # a dangling link, say
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        key.update(
            f"{path.relative_to(folder)}\0{index}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return key.hexdigest()


def decode(files, folder: Path) -> np.ndarray:
    size = (settings.IMAGE_SIZE, settings.IMAGE_SIZE)
    data = np.empty((len(files), *size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc=f"decoding {folder}", unit="image", leave=False,
                                       disable=len(files) < 1000)):
        try:
            with Image.open(path) as image:
                data[i] = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(
                f"{path} is not an image PIL can read ({type(e).__name__}: {e})") from None
    return data


def read_cache(cache: Path, key: str, classes: list):
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["key"]) == key and saved["classes"].tolist() == classes:
                return saved["data"]
    # none yet, or damaged: decoded again
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    return None


_not_cached = set()  # the folders already reported as not cached: one note each


def write_cache(cache: Path, key: str, classes: list, data: np.ndarray) -> None:
    try:
        utils.write_atomic(cache, lambda f: np.savez(f, key=np.array(key),
                                                     classes=np.array(classes), data=data))
    except (OSError, UserError) as e:
        if cache.parent not in _not_cached:
            _not_cached.add(cache.parent)
            print(f"note: no cache of the decoded images ({e}); they are decoded again next time",
                  file=sys.stderr)
