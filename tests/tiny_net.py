"""The suite's own network, `-net resnet_tiny`: a CIFAR ResNet of one BasicBlock per stage at half
ResNet18's widths (32 to 256), EMA's factor of 32 dividing every one. About a ninth of ResNet18's
FLOPs and a ninth of its parameters (checkpoints of 10 MB, not 90), for the tests whose subject is
how a run behaves (resume, signals, folders, logs, options), not the architecture; the paper's
networks keep their own tests (test_models.py, test_params.py, test_checkpoints.py).

conftest.py registers it in the suite's process. A script run as a subprocess gets it with
`python tests/tiny_net.py SCRIPT ARGS...`, which registers it and then runs SCRIPT as `__main__`.
Not for the start-up tests of a script itself: this imports torch before the script's first line."""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NET = "resnet_tiny"


def register():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models.resnet import RESNETS, BasicBlock, ResNetSpec
    RESNETS.setdefault(NET, ResNetSpec(BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256)))


def command(script: str, *args: str) -> list[str]:
    """The command line that runs ROOT/script with the tiny network registered, its output
    unbuffered."""
    return [sys.executable, "-u", str(Path(__file__).resolve()), str(ROOT / script), *args]


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # as if run directly, not this folder
    register()
    runpy.run_path(script, run_name="__main__")
