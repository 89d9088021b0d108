"""Tiny datasets in CIFAR-100's real on-disk format (SPEC.md section 6), for tests.

The official files were pickled by Python 2, whose `str` keys and buffers load as bytes with
encoding='bytes' and as str with encoding='latin1'. Python 3 pickles bytes differently, so this
writer emits Python 2 string opcodes for them: the files load exactly like the official ones.
"""
import pickle
import struct
from pathlib import Path

import numpy as np


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def make_images(n, num_classes, seed):
    """n images whose class is visible (a class-specific colour and stripe), labels
    0..num_classes-1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    palette = rng.integers(30, 226, (num_classes, 3))
    images = rng.normal(0, 25, (n, 3, 32, 32)) + palette[labels][:, :, None, None]
    for i, label in enumerate(labels):
        images[i, :, 4 * (label % 8):4 * (label % 8) + 4, :] += 60
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels


def write_fake_cifar100(root, n_train=256, n_test=128, num_classes=5, seed=0):
    """Write root/cifar-100-python/{train,test,meta}; return root."""
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        data, labels = make_images(n, num_classes, split_seed)
        write_split(root, split, data, [int(x) for x in labels])
    write_meta(root, [f"class_{i}".encode() for i in range(100)])
    return Path(root)


def write_split(root, split, data, labels):
    """Write root/cifar-100-python/<split> holding `data` and `labels` as given, valid or not. The
    coarse labels are all 0: nothing reads them."""
    folder = _folder(root)
    _dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels),
           b"filenames": [f"img_{i}.png".encode() for i in range(len(data))],
           b"batch_label": f"fake {split} batch".encode()}, folder / split)


def write_meta(root, fine_label_names):
    """Write root/cifar-100-python/meta; fine_label_names None leaves that key out."""
    entry = {b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    if fine_label_names is not None:
        entry = {b"fine_label_names": fine_label_names, **entry}
    _dump(entry, _folder(root) / "meta")


def _folder(root):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_fake_cifar10(root, n_train=50, n_test=20, seed=0):
    """Write root/cifar-10-batches-py/ in CIFAR-10's format: five data batches, test_batch and
    batches.meta (keys labels, label_names); return root."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data, labels = make_images(n_train, 10, seed)
    for batch, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
        _dump({b"data": data[part], b"labels": [int(x) for x in labels[part]],
               b"batch_label": f"training batch {batch} of 5".encode(),
               b"filenames": [f"img_{i}.png".encode() for i in part]},
               folder / f"data_batch_{batch}")
    data, labels = make_images(n_test, 10, seed + 1)
    _dump({b"data": data, b"labels": [int(x) for x in labels],
           b"batch_label": b"testing batch 1 of 1"},
          folder / "test_batch")
    _dump({b"label_names": [f"class_{i}".encode() for i in range(10)],
           b"num_cases_per_batch": n_train // 5,
           b"num_vis": 3072}, folder / "batches.meta")
    return Path(root)


def write_image_folder(root, n_train=24, n_test=12, classes=("cat", "dog", "emu"), seed=0,
                       test_name="test",
                       size=(40, 28)):
    """Write root/train/<class>/*.png and root/<test_name>/<class>/*.png (`size`: not 32 x 32, so
    that the resize is exercised; some JPEG and greyscale among them); return root."""
    from PIL import Image
    for split, n, split_seed in (("train", n_train, seed), (test_name, n_test, seed + 1)):
        data, labels = make_images(n, len(classes), split_seed)
        for i, (row, label) in enumerate(zip(data, labels)):
            image = Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).resize(size)
            folder = Path(root) / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            if i % 5 == 3:
                image.convert("L").save(folder / f"{i}.jpg")
            else:
                image.save(folder / f"{i}.png")
        for name in classes:  # every class in both splits, whatever the draw
            folder = Path(root) / split / name
            if not folder.is_dir():
                folder.mkdir(parents=True)
                Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "extra.png")
    return Path(root)
