"""The dataset folder's validation when loaded, the unofficial-dataset warning, and a download that
cannot hang (a local server stands in for the network)."""
import contextlib
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time

import numpy as np
import pytest
import torchvision

from training import cifar
from utils import UserError

import train_cifar100
from fake_cifar import make_images, write_fake_cifar100, write_meta, write_split
from test_train import TINY, out_args

# Long enough for any working test, short enough that a regression fails instead of hanging.
SERVER_PATIENCE_S = 10


@pytest.fixture
def root(tmp_path):
    return write_fake_cifar100(tmp_path, n_train=8, n_test=8)


def dataset_file(root, name):
    return root / cifar.CIFAR_FOLDER / name


def write_labels(root, split, labels):
    images, _ = make_images(len(labels), 5, seed=0)
    write_split(root, split, images, labels)


def load_error(root, train):
    with pytest.raises(UserError) as error:
        cifar.CIFAR100Folder(root, train=train)
    return str(error.value)


# ---------------------------------------------------------------- validation when loaded

@pytest.mark.parametrize("labels, problem", [
    ([0, 1, 150, 3],
     "fine_labels[2] is 150, outside 0..99 (CIFAR-100 has 100 classes); out-of-range labels: "
     "1 of 4"),
    ([0, -1, 2, -1],
     "fine_labels[1] is -1, outside 0..99 (CIFAR-100 has 100 classes); out-of-range labels: "
     "2 of 4"),
    ([0, 1.5, 2, 3],
     "fine_labels[1] is 1.5, not a whole number (labels must be integers); non-integer labels: 1 "
     "of 4"),
    ([0, 1, float("nan"), 3], "fine_labels[2] is nan, not a whole number"),
    ([b"0", b"1"], "fine_labels must be a list of integers"),
])
def test_bad_train_labels_are_refused(root, labels, problem):
    write_labels(root, "train", labels)
    assert load_error(root, train=True).startswith(f"{dataset_file(root, 'train')}: {problem}")


def test_a_bad_label_only_in_the_test_split_is_refused(root):
    write_labels(root, "test", [3, 150, 4])
    cifar.CIFAR100Folder(root, train=True)
    assert load_error(root, train=False).startswith(
        f"{dataset_file(root, 'test')}: fine_labels[1] is 150, outside")


@pytest.mark.parametrize("labels", [
    np.array([0, 99, 4], dtype=np.int64),
    [np.int64(0), np.int64(99), np.int64(4)],
    [0.0, 99.0, 4.0],
], ids=["numpy array", "numpy ints", "whole floats"])
def test_integer_valued_labels_are_accepted_as_ints(root, labels):
    write_labels(root, "train", labels)
    targets = cifar.CIFAR100Folder(root, train=True).targets
    assert targets == [0, 99, 4] and all(type(t) is int for t in targets)


def test_an_empty_split_is_refused(root):
    write_split(root, "test", np.zeros((0, 3072), np.uint8), [])
    assert load_error(root, train=False) == f"{dataset_file(root, 'test')} holds no images"


def test_data_of_partial_images_is_refused(root):
    write_split(root, "train", np.zeros((4, 3000), np.uint8), [0, 1, 2, 3])
    assert load_error(root, train=True).startswith(
        f"{dataset_file(root, 'train')}: its data holds 12000 values, not a whole number of 3 x 32 "
        "x 32 images")


def test_meta_without_class_names_is_refused(root):
    write_meta(root, None)
    assert load_error(root, train=True).startswith(
        f"{dataset_file(root, 'meta')} has no list fine_label_names")


def test_meta_with_too_few_class_names_is_refused(root):
    write_meta(root, [f"class_{i}".encode() for i in range(50)])
    assert load_error(root, train=False) == (
        f"{dataset_file(root, 'meta')} names 50 classes in fine_label_names; "
        f"CIFAR-100 has 100")


def test_training_stops_before_its_first_epoch_on_a_bad_test_label(tmp_path, capsys):
    data = write_fake_cifar100(tmp_path / "data", n_train=64, n_test=32)
    labels = [1] * 32
    labels[7] = 150
    write_labels(data, "test", labels)
    assert train_cifar100.main(TINY + ["--data", str(data)] + out_args(tmp_path, "bad")) == 2
    err = capsys.readouterr().err
    assert f"error: {dataset_file(data, 'test')}: fine_labels[7] is 150, outside 0..99" in err
    assert not list(tmp_path.rglob("last.pth"))


# ---------------------------------------------------------------- the unofficial-dataset warning

def test_an_unofficial_folder_is_reported_once_in_one_line(root, monkeypatch, capsys, recwarn):
    monkeypatch.setattr(cifar, "_reported_unofficial", set())
    for train in (True, False, True):
        cifar.CIFAR100Folder(root, train=train)
    folder = root / cifar.CIFAR_FOLDER
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {folder / 'train'} is not the official CIFAR-100 file (MD5 differs): "
        f"using {folder} as a custom dataset"]
    assert not recwarn.list


# ---------------------------------------------------------------- the download

def fake_archive(tmp_path):
    """A tar.gz of a tiny dataset laid out as the official one, and the MD5 of each of its files."""
    source = write_fake_cifar100(tmp_path / "source", n_train=8, n_test=8) / cifar.CIFAR_FOLDER
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(source, arcname=cifar.CIFAR_FOLDER)
    md5 = {name: hashlib.md5((source / name).read_bytes()).hexdigest() for name in (
        "train", "test", "meta")}
    return buffer.getvalue(), md5


@contextlib.contextmanager
def silent_server():
    """The URL of a server that accepts connections and never answers: the kernel accepts them into
    the listening socket's backlog. Closing it after SERVER_PATIENCE_S resets them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        patience = threading.Timer(SERVER_PATIENCE_S, server.close)
        patience.start()
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}/cifar-100-python.tar.gz"
        finally:
            patience.cancel()


@contextlib.contextmanager
def http_server(body: bytes, stall: bool):
    """The URL of an HTTP server sending `body`, or with stall only its first half and then
    nothing."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if stall else body)
            if stall:
                release.wait(SERVER_PATIENCE_S)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/cifar-100-python.tar.gz"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def download_error(root):
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        cifar.ensure_cifar100(root)
    assert time.monotonic() - started < 5
    return str(error.value)


def test_a_silent_network_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 0.5)
    with silent_server() as url:
        monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", url)
        message = download_error(tmp_path / "data")
    assert f"CIFAR-100 is not in {tmp_path / 'data'} and could not be downloaded" in message
    assert "timed out: no answer for 0.5 s" in message and cifar.CIFAR_LAYOUT in message
    assert socket.getdefaulttimeout() is None  # restored


def test_a_stalled_download_times_out_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 0.5)
    archive, _ = fake_archive(tmp_path)
    with http_server(archive, stall=True) as url:
        monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", url)
        (tmp_path / "data").mkdir()
        message = download_error(tmp_path / "data")
        assert "timed out" in download_error(tmp_path / "new" / "data")
    assert "timed out" in message
    assert not list((tmp_path / "data").iterdir())  # neither the half archive nor a dataset folder
    assert not (tmp_path / "new").exists()  # nor the folders it made for --data


def test_a_download_puts_the_checked_files_in_place(tmp_path, monkeypatch, capsys):
    archive, md5 = fake_archive(tmp_path)
    # This archive stands in for the official one, and its files for the official files.
    for name, value in (("tgz_md5", hashlib.md5(archive).hexdigest()),
                        ("train_list", [["train", md5["train"]]]),
                        ("test_list", [["test", md5["test"]]]),
                        ("meta",
                         {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})):
        monkeypatch.setattr(torchvision.datasets.CIFAR100, name, value)
    root = tmp_path / "data"
    with http_server(archive, stall=False) as url:
        monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", url)
        cifar.ensure_cifar100(root)
    assert list(root.iterdir()) == [root / cifar.CIFAR_FOLDER]  # no scratch folder, no archive
    for name in ("train", "test", "meta"):
        assert hashlib.md5(dataset_file(root, name).read_bytes()).hexdigest() == md5[name]
    capsys.readouterr()
    assert len(cifar.CIFAR100Folder(root, train=True)) == 8
    assert "warning" not in capsys.readouterr().err  # the files count as official now
