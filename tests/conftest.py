"""The suite runs on the CPU even where CUDA exists: bitwise resume, the two-process torchrun test
and the tiny datasets assume it. CUDA stays visible only with EMA_TEST_GPU=1, for tests/test_gpu.py
(README "One GPU check")."""
import os

if os.environ.get("EMA_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initialises, after this

import pytest  # noqa: E402  (after CUDA is hidden)

# ResNet18 + EMA, fp32, one step of 16 images per epoch.
SMALL_RUN = ["-net", "resnet18", "-att", "ema", "-b", "16", "-lr", "0.02", "--amp", "off"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """16 training and 16 test images: one step per epoch (fp16 is emulated, slowly, on CPUs)."""
    from fake_cifar import write_fake_cifar100
    return write_fake_cifar100(tmp_path_factory.mktemp("small"), n_train=16, n_test=16)


@pytest.fixture(scope="session")
def finished_small_run(small_data, tmp_path_factory):
    """A one-epoch SMALL_RUN, trained once, in <base>/checkpoint/resnet18_ema/run and
    <base>/runs/resnet18_ema/run: tests continue copies of it (a copied run folder continues as itself)."""
    import train_cifar100
    base = tmp_path_factory.mktemp("finished")
    outputs = ["--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs"), "--run-name", "run"]
    assert train_cifar100.main(SMALL_RUN + ["--data", str(small_data), "--epochs", "1"] + outputs) == 0
    return base
