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
    """n images whose class is visible (a class-specific colour and stripe), labels 0..num_classes-1."""
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
