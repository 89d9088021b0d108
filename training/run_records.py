"""A run folder's records read back, torch-free: its arguments (args.json), its metrics.csv, and its
identity, for table.py (the table) and reproduce.py (what is done).

A run's identity is every value that changes its result: the identity options of
training/options.py, older runs' missing keys filled in with what they stood for, and any args.json
key that the options table does not classify (the safe default: such a run is never averaged with
one that lacks the key). Seeds are averaged only within one identity.
"""
import csv
import json
import math
import os
import re
import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

from conf import settings
from training import cli
from training import options as run_options
from training.options import OPTIONS, REQUIRED

# The identity options, then the unclassified keys as sorted (key, value) pairs.
Identity = namedtuple("Identity", [*run_options.IDENTITY, "unclassified"])
# what the trainer writes as "dataset"
RECORDED_DATASET = re.compile(r"cifar-100|cifar-10|(custom|custom-cifar-10|folder)-[0-9a-f]{8}")


def same_dataset(a, b) -> bool:
    """Whether two recorded datasets are the same files: equal, or the same custom CIFAR-10 set
    recorded before and after it was named so ("custom-<h>", "custom-cifar-10-<h>")."""
    custom = lambda value: str(value).startswith("custom-") and str(value)[-8:]
    return a == b or bool(custom(a)) and custom(a) == custom(b)


def paper_configuration(recipe: str) -> dict:
    """The paper's value of every identity key that a row does not name itself (docs/reference.md
    section 3)."""
    return {key: run_options.value(paper, {"recipe": recipe})
            for key, paper in run_options.PAPER_CONFIGURATION.items()} | {"unclassified": ()}


def differences(identity: Identity) -> dict:
    """The identity's values that are not the paper's; the unclassified keys, each by itself."""
    paper = paper_configuration(identity.recipe)
    different = {key: getattr(identity,
                              key) for key in paper if getattr(identity, key) != paper[key]}
    different.pop("unclassified", None)
    return different | dict(identity.unclassified)


def in_paper_rows(identity: Identity) -> bool:
    """Whether runs of this identity belong in the paper's rows. What changes the arithmetic, not
    the recipe (run_options' arithmetic column: precision, synchronised BatchNorm, the split of the
    global batch of 128 over processes) may differ; a run from before the trainer recorded its
    dataset (a --data path instead) is taken for CIFAR-100. An unclassified key never belongs."""
    different = differences(identity)
    if identity.b * identity.world != settings.BATCH_SIZE:
        return False
    if "dataset" in different and RECORDED_DATASET.fullmatch(str(different["dataset"])):
        return False
    return not identity.unclassified and different.keys() <= {
        *run_options.ARITHMETIC_IDENTITY, "dataset"}


def label(identity: Identity) -> str:
    """What differs from the paper, e.g. 'lr=0.001, epochs=1, subset=32'."""
    parts = []
    for key, value in differences(identity).items():
        if key == "dataset" and value is None:
            continue  # neither a dataset nor a --data path recorded: nothing to show
        if key == "subset_draw" and value == "stratified":
            continue  # how --subset draws today; only the older draw (first) is named
        unrecorded = key == "dataset" and not RECORDED_DATASET.fullmatch(str(value))
        parts.append(f"data={value}" if unrecorded else f"{key}={value}")
    return ", ".join(parts)


class UnreadableRun(Exception):
    """A run folder that cannot be used; the message says why."""


@dataclass
class Run:
    folder: Path
    identity: Identity
    seed: int
    rows: list  # metrics.csv, one dict of floats per epoch
    # of metrics.csv: of two finished runs with one identity and seed, the newer one counts
    mtime: float
    classes: int = settings.NUM_CLASSES  # recorded by the trainer since --dataset

    @property
    def finished(self) -> bool:
        return len(self.rows) >= self.identity.epochs

    @property
    def final(self) -> dict:
        return self.rows[-1]

    @property
    def best(self) -> dict:
        """The first epoch with the highest validation top-1 (--val), else test top-1 (the paper's
        way)."""
        return max(self.rows, key=lambda r: r["val_top1" if "val_top1" in r else "test_top1"])


def run_args(folder: Path) -> dict:
    """The run's arguments: args.json, or for runs older than it, those inside last.pth."""
    if os.path.lexists(folder / "args.json") and not (folder / "args.json").is_file():
        raise UnreadableRun("args.json is not a file (a folder, a FIFO, or a link to nothing)")
    if (folder / "args.json").is_file():
        try:
            args = json.loads((folder / "args.json").read_text())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not text
            raise UnreadableRun(f"args.json is not valid JSON ({type(e).__name__})") from None
    elif (folder / "last.pth").is_file():
        from training import checkpoints  # torch is only needed for this fallback
        try:
            args = checkpoints.load_checkpoint(folder / "last.pth")["args"]
        except checkpoints.UserError as e:
            raise UnreadableRun(str(e)) from None
    else:
        raise UnreadableRun("neither args.json nor last.pth")
    if not isinstance(args, dict):
        raise UnreadableRun(f"its arguments are a {type(args).__name__}, not a JSON object")
    return args


def run_identity(args: dict) -> Identity:
    """The run's identity, older runs' missing keys filled in with what they stood for."""
    for key in [key for key in run_options.IDENTITY if OPTIONS[key].older == REQUIRED] + ["seed"]:
        if key not in args:
            raise UnreadableRun(f"its arguments lack '{key}'")
    if not isinstance(args["recipe"], str) or args["recipe"] not in settings.RECIPES:
        raise UnreadableRun(f"unknown recipe {args['recipe']!r}")
    values = {key: args[key] if key in args else run_options.value(OPTIONS[key].older, args)
              for key in run_options.IDENTITY}
    numbers = {key: values[key] if key in values else args[key] for key in run_options.NUMBERS
               if key in values or key in args}  # the seed among them: required above
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnreadableRun(f"'{key}' is {value!r}, not a number")
    for key, value in values.items():
        # a row is found by its identity, so every value must be hashable
        if isinstance(value, (list, dict)):
            raise UnreadableRun(f"'{key}' is {value!r}, not a single value")
    world = values["world"]
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise UnreadableRun(f"'world' is {world!r}, not a number of processes")
    problem = cli.conflict({**args, "resume": None, "init_from": None})
    if problem:  # options together that no command line could have given
        raise UnreadableRun(problem)
    for key in [key for key in [*run_options.IDENTITY, "seed"] if key in run_options.FLAGS]:
        value = values[key] if key in values else args[key]
        try:  # a value that no command line could have given
            None if value is None else run_options.checked(key, value, registry=False)
        except run_options.BadValue as e:
            raise UnreadableRun(f"'{key}' is {value!r} ({e})") from None
    # A list or a dict (an option with several values) as its JSON text: a row is found by its
    # identity.
    unclassified = tuple((key, json.dumps(args[key],
                                          sort_keys=True) if isinstance(args[key], (list, dict))
                          else args[key]) for key in sorted(run_options.unclassified(args)))
    return Identity(**values, unclassified=unclassified)


def number(text, where: str) -> float:
    """A finite float, or UnreadableRun naming `where` (a NaN or an infinity has no place in a
    mean)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UnreadableRun(f"{where} is {text!r}, not a number")
    return value


NEEDED_COLUMNS = ("epoch", "test_top1", "test_top5")  # every version of the trainer wrote them
MAX_CLASSES = 100_000  # table.py builds each row's network to count its parameters


def in_range(key: str, value: float) -> bool:
    """Whether a metrics.csv value could have been written: accuracies are percentages, losses,
    learning rates and times are not negative."""
    if key.endswith(("top1", "top5")):
        return 0 <= value <= 100
    return value >= 0 or not key.endswith(("loss", "lr", "seconds"))


def read_metrics(path: Path) -> list:
    """metrics.csv as one dict of floats per epoch."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # as Excel saves it, too
            reader = csv.DictReader(f)
            # fieldnames reads the header: not after closing
            columns, lines = reader.fieldnames, list(reader)
    except (OSError, ValueError, csv.Error) as e:  # ValueError: not text
        raise UnreadableRun(f"cannot read metrics.csv ({e})") from None
    if columns is None:
        raise UnreadableRun("metrics.csv is empty")
    missing = [column for column in NEEDED_COLUMNS if column not in columns]
    if missing:
        raise UnreadableRun(f"metrics.csv has no {' or '.join(missing)} column")
    if not lines:
        raise UnreadableRun("metrics.csv has no epochs")
    rows = []
    for n, line in enumerate(lines, 1):
        if None in line or None in line.values():  # more or fewer values than columns
            raise UnreadableRun(
                f"metrics.csv row {n} does not have {len(columns)} values (half-written?)")
        rows.append({key: number(text, f"metrics.csv row {n}: {key}")
                     for key, text in line.items()})
        wrong = [key for key, value in rows[-1].items() if not in_range(key, value)]
        if wrong:
            raise UnreadableRun(f"metrics.csv row {n}: {wrong[0]} is {rows[-1][wrong[0]]:g}, which "
                                f"no run writes")
    epochs = [row.get("epoch") for row in rows]
    if epochs != list(range(1, len(rows) + 1)):  # each row read by its epoch number
        shown = ", ".join(f"{e:g}" for e in epochs)
        raise UnreadableRun(f"metrics.csv lists epochs {shown}, not 1 to {len(rows)} in order")
    return rows


def data_format(args: dict) -> str:
    """The run's --dataset value: runs from before --dataset trained on CIFAR-100."""
    return args.get("data_format") or "cifar100"


def read_run(folder: Path, args: dict = None) -> Run:
    """The run in `folder` (whose args.json, `args`, the caller may have read); UnreadableRun says
    why it cannot be used."""
    args = run_args(folder) if args is None else args
    identity = run_identity(args)
    metrics = folder / "metrics.csv"
    classes = args["classes"] if args.get("classes") is not None else settings.NUM_CLASSES
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_CLASSES:
        raise UnreadableRun(f"'classes' is {classes!r}, not a number of classes (1 to "
                            f"{MAX_CLASSES:,})")
    if os.path.lexists(metrics) and not metrics.is_file():
        raise UnreadableRun("metrics.csv is not a file (a folder, a FIFO, or a link to nothing)")
    if not metrics.exists():  # stopped inside its first epoch: no epoch to read yet
        started = folder / "args.json" if (folder / "args.json").exists() else folder / "last.pth"
        return Run(folder, identity, args["seed"], [], started.stat().st_mtime, classes)
    rows = read_metrics(metrics)
    if len(rows) > identity.epochs:  # an args.json that is not this metrics.csv's run
        raise UnreadableRun(f"metrics.csv lists {len(rows)} epochs, more than its args.json's "
                            f"epochs ({identity.epochs})")
    return Run(folder, identity, args["seed"], rows, metrics.stat().st_mtime, classes)


def read_runs(checkpoint_dir: Path) -> list[Run]:
    """Every usable run; a folder that is not is skipped with one line saying why."""
    runs = []
    # Run folders: those with epochs, and those stopped inside their first (Unfinished 0/N).
    folders = {path.parent for name in ("metrics.csv", "args.json", "last.pth")
               for path in checkpoint_dir.glob(f"*/*/{name}")}
    for folder in sorted(folders):
        try:
            runs.append(read_run(folder))
        except UnreadableRun as e:
            print(f"skipped {folder}: {e}", file=sys.stderr)
    return runs


