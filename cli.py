"""The command line the scripts share, defined once: -net, -att, -weights, --amp and --data mean the
same in train_cifar100.py, test.py, gradcam.py and benchmark.py; train_cifar100.py's parser (what each
of its options means to a run: conf/run_options.py); argument types whose bad values end in argparse's
one-line message and exit code 2.

Imports only what the parsers need: the model registry for -net and -att's choices (and with it
torch), not the data, TensorBoard or training code, so that `--help` skips those imports.
"""
import argparse
import math
import sys

import models
from conf import settings

FLOAT32_MAX = 3.4028234663852886e38
CHECKPOINTS_DEFAULT = "the checkpoint's"
MAX_RUN_NAME = 200  # bytes of a --run-name


def answer_help(make_parser) -> None:
    """Print a script's help and exit, when asked for it, before the script imports the rest."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        make_parser().print_help()
        sys.exit(0)


def add_model(p, net=None, att=None) -> None:
    """-net and -att; without defaults they default to what the checkpoint records."""
    p.add_argument("-net", default=net, choices=models.list_models(),
                   help=f"network (default: {net or CHECKPOINTS_DEFAULT})")
    p.add_argument("-att", default=att, choices=models.list_attentions(),
                   help=f"attention module, none for the baseline (default: {att or CHECKPOINTS_DEFAULT})")


def add_weights(p) -> None:
    p.add_argument("-weights", "--weights", required=True,
                   help="a checkpoint: this repo's (a file, or a run folder for its last.pth), or one written by the "
                        "NAM authors' or the classic CIFAR-100 script (docs/data.md: Checkpoints from other repos)")


def add_amp(p) -> None:
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None,
                   help="autocast dtype (default: bf16 where the GPU or CPU computes it natively; on GPUs "
                        "without, fp16 with a gradient scaler; else off)")


def add_data(p, default=settings.DATA_DIR, whose: str = "") -> None:
    shown = f"{whose}, else {settings.DATA_DIR}" if whose else default or settings.DATA_DIR
    p.add_argument("--data", default=default, help=f"folder holding cifar-100-python/, cifar-10-batches-py/, or "
                                                   f"train/ and test/ folders of images per class (default {shown})")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def run_name(text):
    """A plain folder name: what table.py and -resume look for one level below <net>_<att>/."""
    if not text or text in (".", "..") or any(sep in text for sep in "/\\") or text.startswith("~"):
        raise argparse.ArgumentTypeError(f"must be a plain folder name (no /, \\, '.', '..'), got {text!r}")
    if len(text.encode()) > MAX_RUN_NAME:  # file systems take 255 bytes; the log folder may add 7
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RUN_NAME} bytes, got {len(text.encode())}")
    return text


def seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {text}")
    return value


def att_stages(text):
    """"3,4" -> "3,4" (sorted, as recorded); all four stages -> None, the paper's placement."""
    try:
        stages = models.parse_stages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return None if stages == models.ALL_STAGES else ",".join(map(str, stages))


def learning_rate(text):
    value = positive(float)(text)
    if value > FLOAT32_MAX:  # the optimizer's kernels take the LR as a float32
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.3g}, got {text}")
    return value


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a CIFAR ResNet with an attention module on CIFAR-100.",
                                allow_abbrev=False)
    add_model(p, net="resnet50", att="ema")
    p.add_argument("--att-stages", type=att_stages, default=None, metavar="S,S",
                   help="ResNet stages (1-4) whose blocks get the attention module, e.g. 3,4 (default all four, "
                        "the paper's)")
    p.add_argument("-b", "--b", "--batch-size", dest="b", type=positive(int), default=settings.BATCH_SIZE,
                   help=f"batch size, per process under torchrun (default {settings.BATCH_SIZE})")
    p.add_argument("-lr", type=learning_rate, default=settings.LR, help=f"initial learning rate (default {settings.LR})")
    p.add_argument("-warm", type=int, default=None, help="warm-up epochs (default: the recipe's)")
    p.add_argument("-gpu", action="store_true", help="accepted for the classic CLI; the device is chosen automatically")
    p.add_argument("-resume", "--resume", nargs="?", const="newest", default=None, metavar="PATH",
                   help="continue a run: alone, the newest run of -net/-att; or a last.pth or run folder")
    p.add_argument("--epochs", type=positive(int), default=None, help=f"default {settings.EPOCHS}")
    add_data(p, default=None)  # None: a resumed run keeps its own
    p.add_argument("--dataset", dest="data_format", choices=settings.DATASETS, default="cifar100",
                   help="what --data holds: CIFAR-100 (default) or CIFAR-10 in their official format, or a folder "
                        "of images per class (docs/data.md)")
    p.add_argument("--val", type=positive(int), default=None, metavar="N",
                   help="hold out N training images (stratified, the same for every run) as a validation split; "
                        "best.pth is then the best validation epoch (default: none, the paper's protocol)")
    p.add_argument("--seed", type=seed, default=0, help="seeds initialisation, shuffle, augmentations (default 0)")
    p.add_argument("--workers", type=int, default=None, help="--loader workers: processes (default 4, 0 on CPU)")
    p.add_argument("--loader", choices=("device", "workers"), default=None,
                   help="device: data kept and augmented on the training device (default); "
                        "workers: torchvision transforms in DataLoader processes (the classic scripts)")
    add_amp(p)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default on CUDA, except with -att ema: see docs/speed.md)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default on CUDA, off on the CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay compiled steps as CUDA graphs (default on where they apply: --compile, one CUDA GPU)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU: deterministic kernels only, so that two runs of one command agree bitwise "
                        "(slower: docs/speed.md); on the CPU runs are deterministic already (default off; a "
                        "resumed run keeps its own)")
    p.add_argument("--recipe", default="paper", choices=list(settings.RECIPES), help="default paper (docs/training.md: Recipes)")
    p.add_argument("--subset", type=positive(int), default=None, help="train on the first N images")
    p.add_argument("--nam-l1", type=float, default=0.0,
                   help=f"NAM's L1 strength on its BN weights (NAM's paper: {settings.NAM_L1})")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: SyncBatchNorm across ranks")
    p.add_argument("--gate-images", type=int, default=0, metavar="K",
                   help="every K epochs, log EMA's spatial gates on fixed test images to TensorBoard (0: off)")
    p.add_argument("--run-name", dest="run", type=run_name, default=None,
                   help="run folder name (default: the start time and the seed); a new run never reuses a folder holding "
                        "a checkpoint or results")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from these weights: a checkpoint of this repo, or of the NAM authors' or the classic "
                        "CIFAR-100 script (docs/data.md); optimizer and schedule start fresh")
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR, help=f"default {settings.CHECKPOINT_DIR}/")
    p.add_argument("--log-dir", default=settings.LOG_DIR, help=f"TensorBoard root (default {settings.LOG_DIR}/)")
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    p = train_parser()
    args = p.parse_args(argv)
    if args.warm is not None and args.warm < 0:
        p.error("-warm must be >= 0")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if not args.nam_l1 >= 0:
        p.error("--nam-l1 must be >= 0")
    if args.gate_images < 0:
        p.error("--gate-images must be >= 0")
    if args.gate_images and args.att not in (None, "ema") and not args.resume:
        p.error(f"--gate-images draws EMA's gates, and -att {args.att} has none")
    if args.att_stages and not args.resume and (args.att == "none" or args.net == "mobilenetv2"):
        p.error(f"--att-stages places the attention module in a ResNet's stages: not with "
                f"{'-att none' if args.att == 'none' else '-net mobilenetv2'}")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run; --resume continues one: give one of them")
    return args
