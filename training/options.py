"""Every option of train_cifar100.py in one table, OPTIONS: its flags, type, default (or how it is
derived), help, and what it means to a run's identity, to a resume and to the arithmetic. Also the
values the trainer records in args.json beside them (no flags).

Built from it: the training parser (training/cli.py), the check of a resumed run's recorded values
(training/arguments.py), the lists below that the resume and table.py use, and docs/training.md's
options table (tests/test_run_options.py holds it equal to `markdown_table()`). Torch-free: table.py
reads it.

The fields of an Option, by name:

- flags, type, choices, form, metavar, help: the command line. `type` turns the text into the value
  and raises BadValue saying what is wrong; it also checks a resumed run's recorded value.
- default: a new run's value when the flag is not given. None with `derived`: settle() in
  training/arguments.py fills it (`derived` says how, for --help and the docs).
- identity: part of a run's identity. table.py averages seeds only over runs equal in every identity
  value; an args.json key that this table does not know counts as part of the identity too (the
  safe default: a new option never folds two different runs into one seed).
- paper: its value in the paper's configuration (docs/reference.md section 3). ROW: each row of the
  table names its own (net, att, recipe); ANY: any value is the paper's (not part of the identity).
  A callable takes the run's arguments (a dict) and gives the value, e.g. the recipe's warm-up.
- older: what an args.json written before the key existed stands for; REQUIRED: such a run cannot
  be read. A callable takes the run's arguments. Only identity values need one.
- resume: what a resume does with it.
    KEPT        the checkpoint's value; one given on the command line is ignored, with a note.
    MAY_CHANGE  the resume command's value replaces the checkpoint's, when given (for the values
                that are not options: what this launch measures). An identity value that changes
                so makes a mixed run, which table.py lists apart.
    EXTENDS     may change, and the run is then simply longer (--epochs).
    WHERE       this command's own, never the checkpoint's: where to read and write.
    FOLDER      recorded, but not taken from the checkpoint on resume: the resumed folder decides.
- arithmetic: changing it changes the arithmetic, not the recipe: a resume that changes it says the
  run continues, but not bitwise; a run that differs from the paper only in such identity values
  stays in the paper's rows (with b x world = 128). A callable takes the run's arguments.
- number: table.py computes with it (or averages over it: the seed), so args.json must hold a
  number.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from conf import global_settings as settings

ROW, ANY, REQUIRED = "ROW", "ANY", "REQUIRED"
KEPT, MAY_CHANGE, EXTENDS, WHERE, FOLDER = "kept", "may change", "extends", "where", "folder"
# How a flag takes its value: VALUE `--b 64`; SWITCH `--sync-bn` alone (true); TOGGLE `--compile` or
# `--no-compile`; OPTIONAL_PATH `--resume` alone or `--resume PATH`.
VALUE, SWITCH, TOGGLE, OPTIONAL_PATH = "value", "switch", "toggle", "optional path"

# What a type raises: argparse prints its message after the flag (`argument --seed: ...`), exit 2.
BadValue = argparse.ArgumentTypeError

FLOAT32_MAX = 3.4028234663852886e38
MAX_RUN_NAME = 200  # bytes of a --run-name: file systems take 255, the log folder may add 7


@dataclass(frozen=True, kw_only=True)
class Option:
    help: str
    flags: tuple = ()  # none: a value the trainer records from the run, not an option
    # text -> value, or BadValue saying what is wrong; None: the text
    type: Optional[Callable] = None
    choices: Any = None  # the allowed values, or a callable that gives them
    form: str = VALUE
    metavar: Optional[str] = None
    default: Any = None
    derived: str = ""  # how settle() derives the value when none is given
    identity: bool = False
    paper: Any = ANY
    older: Any = REQUIRED
    resume: str = KEPT
    arithmetic: Any = False
    number: bool = False
    docs: str = ""  # a link to the docs' section on it, for docs/training.md's table

    @property
    def option(self) -> bool:
        return bool(self.flags)

    def allowed(self) -> Optional[list]:
        return list(
            self.choices() if callable(self.choices) else self.choices) if self.choices else None


# ---------------------------------------------------------------- value types


def number(kind, minimum=None, positive=False, maximum=None):
    """A parser of `kind` (int or float) text: finite, above 0 or at least `minimum`, at most
    `maximum`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise BadValue(f"expected {expected}, got {text!r}") from None
        if positive and (not value > 0 or not math.isfinite(value)):
            raise BadValue(f"must be positive, got {text}")
        if minimum is not None and not value >= minimum:
            raise BadValue(f"must be >= {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise BadValue(f"must be at most {maximum:.3g}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def seed(text):
    value = number(int)(text)
    if not 0 <= value < 2 ** 63:
        raise BadValue(f"must be between 0 and 2**63 - 1, got {text}")
    return value


def run_name(text):
    """A plain folder name: what table.py and -resume look for one level below <net>_<att>/."""
    if not text or text in (".", "..") or any(sep in text for sep in "/\\") or text.startswith("~"):
        raise BadValue(f"must be a plain folder name (no /, \\, '.', '..', no ~ first), got "
                       f"{text!r}")
    if len(text.encode()) > MAX_RUN_NAME:
        raise BadValue(f"must be at most {MAX_RUN_NAME} bytes, got {len(text.encode())}")
    return text


RESNET_STAGES = (1, 2, 3, 4)  # models.ALL_STAGES, here without torch (a test holds them equal)


def att_stages(text):
    """"3,4" -> "3,4" (sorted, as recorded); all four stages -> None, the paper's placement."""
    parts = [part.strip() for part in str(text).split(",")]
    known = {str(stage) for stage in RESNET_STAGES}
    if not all(part in known for part in parts) or len(set(parts)) != len(parts):
        raise BadValue(f"expected distinct ResNet stages from 1 to 4 such as 3,4, got {text!r}")
    stages = tuple(sorted(map(int, parts)))
    return None if stages == RESNET_STAGES else ",".join(map(str, stages))


def networks():
    import models  # here, not above: models imports torch, and table.py reads this file without it
    return models.list_models()


def attentions():
    import models  # as in networks
    return models.list_attentions()


def recipe_warm(args: dict) -> int:
    return settings.RECIPES[args["recipe"]]["warm"]


positive_int = number(int, positive=True)
at_least_0 = number(int, minimum=0)


# ---------------------------------------------------------------- the table

OPTIONS = {
    # A run's identity, in the order table.py names what differs from the paper.
    "net": Option(
        flags=("-net",), choices=networks, default="resnet50",
        help="network: resnet18/34/50/101/152 or mobilenetv2 (models/)",
        identity=True, paper=ROW),
    "att": Option(
        flags=("-att",), choices=attentions, default="ema",
        help="attention module, none for the baseline (models/attention/)",
        identity=True, paper=ROW),
    "recipe": Option(
        flags=("--recipe",), choices=list(settings.RECIPES), default="paper",
        help="the training recipe", docs="#recipes",
        identity=True, paper=ROW),
    "att_stages": Option(
        flags=("--att-stages",), type=att_stages, metavar="S,S", derived="all four, the paper's",
        help="the ResNet stages (1-4) whose blocks get the attention module, e.g. 3,4",
        docs="#placement---att-stages",
        identity=True, paper=None, older=None),
    "lr": Option(
        flags=("-lr",), type=number(float, positive=True, maximum=FLOAT32_MAX),
        default=settings.LR, help="initial learning rate",
        identity=True, paper=settings.LR, older=settings.LR, number=True),
    "b": Option(
        flags=("-b", "--b", "--batch-size"), type=positive_int, default=settings.BATCH_SIZE,
        help="batch size, per process under torchrun",
        identity=True, paper=settings.BATCH_SIZE, older=settings.BATCH_SIZE, arithmetic=True,
        number=True),
    "world": Option(  # torchrun's processes: the global batch is b x world
        help="processes of the launch",
        identity=True, paper=1, older=1, resume=MAY_CHANGE, arithmetic=True, number=True),
    "epochs": Option(
        flags=("--epochs",), type=positive_int, default=settings.EPOCHS,
        help="epochs; raise it on --resume to extend a finished run",
        identity=True, paper=settings.EPOCHS, resume=EXTENDS, number=True),
    "warm": Option(
        flags=("-warm",), type=at_least_0, derived="the recipe's",
        help="warm-up epochs (linear, per iteration)",
        identity=True, paper=recipe_warm, older=recipe_warm, number=True),
    "subset": Option(
        flags=("--subset",), type=positive_int, metavar="N", derived="all",
        help="train on N images, every class its share (stratified, the same for every run)",
        identity=True, paper=None, older=None),
    "subset_draw": Option(  # recorded by training/run_data.py with --subset
        help="how --subset drew its images: stratified (every class its share, a fixed seed), or "
             "first (the first N, before the draw was recorded)",
        identity=True, paper=None, older=lambda args: "first" if args.get("subset") else None),
    "val": Option(
        flags=("--val",), type=positive_int, metavar="N", derived="none, the paper's",
        help="hold out N training images (stratified, the same for every run) as a validation "
             "split; best.pth is then the best validation epoch",
        docs="#a-validation-split---val",
        identity=True, paper=None, older=None),
    # "cifar-100" or "custom-<8 hex>" (training/run_data.py); before it was recorded, the path.
    "dataset": Option(
        help="what the data is",
        identity=True, paper="cifar-100", older=lambda args: args.get("data"), resume=MAY_CHANGE),
    "amp": Option(
        flags=("--amp",), choices=("off", "bf16", "fp16"),
        derived="bf16 where the GPU or CPU computes it natively; on GPUs without, fp16 with a "
                "gradient scaler; else off",
        help="autocast dtype",
        identity=True, paper="off", older="off", resume=MAY_CHANGE, arithmetic=True),
    "nam_l1": Option(
        flags=("--nam-l1",), type=number(float, minimum=0), metavar="S", default=0.0,
        help="NAM's L1 strength on its BN weights (NAM's paper: 1e-4)",
        identity=True, paper=0.0, older=0.0, number=True),
    "sync_bn": Option(
        flags=("--sync-bn",), form=SWITCH, default=False,
        help="under torchrun on GPUs: SyncBatchNorm across ranks",
        identity=True, paper=False, older=False, arithmetic=True),
    "init_from": Option(
        flags=("--init-from",), metavar="PATH",
        help="start a new run from these weights: a checkpoint of this repo, or of the NAM "
             "authors' or the classic CIFAR-100 script; optimizer and schedule start fresh",
        docs="data.md#checkpoints-from-other-repos",
        identity=True, paper=None, older=None, resume=FOLDER),
    "changed_on_resume": Option(  # e.g. "amp off -> bf16 at epoch 3 step 0"
        help="what a resume changed: a mixed run",
        identity=True, paper=None, older=None),
    # Not the identity.
    "run_id": Option(help="the run's own name for its TensorBoard folder (training/event_log.py)"),
    "seed": Option(  # table.py averages over seeds
        flags=("--seed",), type=seed, default=0,
        help="seeds the initialisation, the shuffle and the augmentations (0 .. 2**63 - 1)",
        number=True),
    "data": Option(
        flags=("--data",), metavar="DIR", derived=settings.DATA_DIR,
        help="folder holding cifar-100-python/, cifar-10-batches-py/, or train/ and test/ "
             "folders of images per class; recorded as an absolute path",
        docs="data.md",
        resume=MAY_CHANGE),
    "data_format": Option(
        flags=("--dataset",), choices=settings.DATASETS, default="cifar100",
        help="what --data holds: CIFAR-100 or CIFAR-10 in their official format, or a folder of "
             "images per class",
        docs="data.md#cifar-10-and-your-own-images---dataset"),
    # From the data (training/run_data.py).
    "classes": Option(help="the number of classes", resume=MAY_CHANGE),
    "class_names": Option(help="the class names, in label order", resume=MAY_CHANGE),
    "mean": Option(help="the normalization's mean", resume=MAY_CHANGE),
    "std": Option(help="the normalization's standard deviation", resume=MAY_CHANGE),
    "loader": Option(
        flags=("--loader",), choices=("device", "workers"), default="device",
        help="device: data kept and augmented on the training device; workers: torchvision "
             "transforms in DataLoader processes (the classic scripts)",
        resume=MAY_CHANGE, arithmetic=True),
    "workers": Option(
        flags=("--workers",), type=at_least_0, metavar="N", derived="4 on a GPU, 0 on the CPU",
        help="processes of --loader workers",
        resume=MAY_CHANGE, arithmetic=lambda args: args.get("loader") == "workers"),
    "channels_last": Option(
        flags=("--channels-last",), form=TOGGLE, derived="on CUDA, except with -att ema",
        help="NHWC memory format", docs="speed.md",
        resume=MAY_CHANGE, arithmetic=True),
    "compile": Option(
        flags=("--compile",), form=TOGGLE, derived="on CUDA, off on the CPU",
        help="torch.compile the model",
        resume=MAY_CHANGE, arithmetic=True),
    "cuda_graphs": Option(  # replays the compiled kernels: the same arithmetic
        flags=("--cuda-graphs",), form=TOGGLE, derived="on where they apply",
        help="replay the compiled steps as CUDA graphs (with --compile, on one CUDA GPU, not "
             "under torchrun)",
        resume=MAY_CHANGE),
    "deterministic": Option(
        flags=("--deterministic",), form=TOGGLE, derived="off; a resume keeps its own",
        help="on a GPU: deterministic kernels only, so that two runs of one command agree "
             "bitwise (slower); on the CPU runs are deterministic already",
        docs="speed.md#deterministic-runs",
        resume=MAY_CHANGE, arithmetic=True),
    "ema_kernel": Option(
        flags=("--ema-kernel",), choices=("auto", "triton", "pytorch"), default="auto",
        help="how EMA runs on CUDA: auto, its Triton kernels at the shapes where a check on this "
             "GPU finds them correct and faster (measured once, cached); triton, the kernels; "
             "pytorch, the PyTorch path",
        docs="speed.md#emas-triton-kernels",
        resume=MAY_CHANGE, arithmetic=lambda args: args.get("att") == "ema"),
    "gpu": Option(
        flags=("-gpu",), form=SWITCH, default=False,
        help="accepted for the classic CLI; the device is chosen automatically"),
    "gate_images": Option(
        flags=("--gate-images",), type=at_least_0, metavar="K", default=0,
        help="every K epochs, log EMA's spatial gates on fixed test images to TensorBoard (0: off)",
        docs="#pictures"),
    "run": Option(
        flags=("--run-name",), type=run_name, metavar="NAME",
        derived="the start time, the seed and 6 random hex digits",
        help="run folder name; a new run never reuses a folder holding a checkpoint or results",
        resume=FOLDER),
    "resume": Option(
        flags=("-resume", "--resume"), form=OPTIONAL_PATH, metavar="PATH",
        help="continue a run: alone, the newest run of -net/-att; or a last.pth or run folder",
        docs="#resuming",
        resume=WHERE),
    "checkpoint_dir": Option(
        flags=("--checkpoint-dir",), metavar="DIR", default=settings.CHECKPOINT_DIR,
        help="checkpoints root",
        resume=WHERE),
    "log_dir": Option(
        flags=("--log-dir",), metavar="DIR", default=settings.LOG_DIR,
        help="TensorBoard root",
        resume=WHERE),
}


def value(column, args: dict):
    """A column's entry for a run: itself, or the callable's answer for the run's arguments."""
    return column(args) if callable(column) else column


def unclassified(names) -> list[str]:
    """The names that OPTIONS does not classify."""
    return [name for name in names if name not in OPTIONS]


# ---------------------------------------------------------------- the derived lists

IDENTITY = [name for name, o in OPTIONS.items() if o.identity]
NUMBERS = [name for name, o in OPTIONS.items() if o.number]
PAPER_CONFIGURATION = {name: o.paper for name, o in OPTIONS.items() if o.identity
                       and o.paper != ROW}
ARITHMETIC_IDENTITY = [name for name, o in OPTIONS.items() if o.identity and o.arithmetic is True]
FLAGS = [name for name, o in OPTIONS.items() if o.option]
RESUMABLE_OVERRIDES = [name for name in FLAGS if OPTIONS[name].resume in (MAY_CHANGE, EXTENDS)]
IDENTITY_CHANGES_ON_RESUME = [name for name, o in OPTIONS.items()
                              if o.identity and o.resume == MAY_CHANGE]
WHERE_OPTIONS = [name for name, o in OPTIONS.items() if o.resume == WHERE]
GIVEN_ON_RESUME = RESUMABLE_OVERRIDES + WHERE_OPTIONS
NOT_RESUMED = [name for name, o in OPTIONS.items() if o.resume in (WHERE, FOLDER)]
NEW_RUN_DEFAULTS = {name: OPTIONS[name].default for name in FLAGS}


def with_defaults(values: dict) -> dict:
    """`values` with the table's defaults where they are missing or None, and the recipe's
    warm-up: what a command line stands for before anything depends on the device or the data
    (training/arguments.py fills those; reproduce.py plans with this alone)."""
    filled = {**values, **{name: default for name, default in NEW_RUN_DEFAULTS.items()
                           if values.get(name) is None}}
    if filled["warm"] is None:
        filled["warm"] = recipe_warm(filled)
    return filled


def arithmetic_on_resume(args: dict) -> list[str]:
    """The options a resume may change that change the arithmetic, for these arguments."""
    return [name for name in RESUMABLE_OVERRIDES if value(OPTIONS[name].arithmetic, args)]


def flag(name: str) -> str:
    """The flag a person types for option `name`, e.g. --batch-size's '-b'."""
    return OPTIONS[name].flags[-1] if OPTIONS[name].flags else name


def checked(name: str, value, registry: bool = True):
    """A recorded value as option `name` takes it from a command line, or BadValue saying why not.
    registry=False leaves -net and -att's choices (the models' registry, which imports torch)
    unchecked."""
    option = OPTIONS[name]
    if option.form in (SWITCH, TOGGLE):
        if not isinstance(value, bool):
            raise BadValue(f"{name} is {value!r}, not true or false")
        return value
    where = f"argument {'/'.join(option.flags)}"
    try:
        parsed = option.type(str(value)) if option.type else str(value)
    except BadValue as e:
        raise BadValue(f"{where}: {e}") from None
    allowed = option.allowed() if registry or not callable(option.choices) else None
    if allowed and parsed not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise BadValue(f"{where}: invalid choice: {parsed!r} (choose from {choices})")
    return parsed


def shown_default(option: Option) -> str:
    if option.derived:
        return option.derived
    if option.form in (SWITCH, TOGGLE):
        return "on" if option.default else "off"
    return "" if option.default is None else str(option.default)


def markdown_table() -> str:
    """docs/training.md's table of the training options."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name in FLAGS:
        o = OPTIONS[name]
        shown = {VALUE: f" {o.metavar}" if o.metavar else "", OPTIONAL_PATH: f" [{o.metavar}]"}
        flags = ", ".join(f"`{f}{shown.get(o.form, '')}`" for f in o.flags)
        meaning = o.help
        if o.choices and not callable(o.choices):  # the registry's are in models/, and --help
            meaning += f": {', '.join(f'`{c}`' for c in o.allowed())}"
        if o.form == TOGGLE:
            meaning += f" (`--no-{o.flags[-1][2:]}` turns it off)"
        if o.docs:
            meaning += f" ([more]({o.docs}))"
        rows.append(f"| {flags} | {shown_default(o)} | {meaning} |")
    return "\n".join(rows) + "\n"
