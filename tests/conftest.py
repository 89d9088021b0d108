"""The suite runs on the CPU even where CUDA exists: bitwise resume, the two-process torchrun test
and the tiny datasets assume it, and the fused EMA's kernels run in Triton's interpreter
(tests/test_ema_fused.py). CUDA stays visible only with EMA_TEST_GPU=1, for tests/test_gpu.py
(docs/speed.md, "The GPU check")."""
import os

if os.environ.get("EMA_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initialises, after this
    # The fused EMA's Triton kernels run on the CPU in Triton's interpreter, read when they are
    # defined (on import), so before any test imports the models.
    os.environ["TRITON_INTERPRET"] = "1"

import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402  (after CUDA is hidden)
import torch  # noqa: E402

import tiny_net  # noqa: E402

tiny_net.register()  # -net resnet_tiny, the suite's own small network

# glibc's, on Linux: hands memory that was freed back to the system.
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None

# The suite's tiny ResNet + EMA, fp32, one step of 16 images per epoch.
SMALL_RUN = ["-net", tiny_net.NET, "-att", "ema", "-b", "16", "-lr", "0.02", "--amp", "off"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """16 training and 16 test images: one step per epoch of SMALL_RUN."""
    from fake_cifar import write_fake_cifar100
    return write_fake_cifar100(tmp_path_factory.mktemp("small"), n_train=16, n_test=16)


@pytest.fixture(scope="session")
def finished_small_run(small_data, tmp_path_factory):
    """A one-epoch SMALL_RUN, trained once, in <base>/checkpoint/resnet_tiny_ema/run and
    <base>/runs/resnet_tiny_ema/run: tests continue copies of it (a copied run folder continues as
    itself)."""
    import train_cifar100
    base = tmp_path_factory.mktemp("finished")
    outputs = ["--checkpoint-dir", str(base / "checkpoint"), "--log-dir", str(base / "runs"),
               "--run-name", "run"]
    assert train_cifar100.main(SMALL_RUN + ["--data", str(small_data), "--epochs", "1"]
                               + outputs) == 0
    return base


@pytest.fixture(autouse=True, scope="session")
def skip_tensorboard_graphs():
    """TensorBoard's graph comes from torch.jit.trace, whose trace check keeps memory for good
    (about 30 MB for ResNet18 + EMA, each time, with torch 2.14). The suite's in-process trainings
    skip the graph; tests/test_train.py's reference run restores this, the real one, and checks the
    graph."""
    from training import run_folder
    real = run_folder.RunFolder.graph
    run_folder.RunFolder.graph = lambda self, model, images: None
    yield real
    run_folder.RunFolder.graph = real


@pytest.fixture(autouse=True, scope="module")
def free_memory_after_each_module():
    """Compiled graphs and reference cycles outlive the tests that made them: drop them between test
    files."""
    yield
    torch._dynamo.reset()
    gc.collect()


@pytest.fixture(autouse=True)
def return_freed_memory():
    """Dozens of trainings run in this one process. glibc keeps what they free for reuse, in pieces
    that later allocations rarely fit, so the process grows with each (peak 2.0 GB without the trim,
    1.7 GB with it, on the 2-core development box, when the suite trained ResNet18)."""
    yield
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
