"""What each option of train_cifar100.py means to a run, in one table: OPTIONS. Torch-free (table.py
reads it); the lists that the trainer, the resume and table.py use are derived from it below, and
tests/test_run_options.py fails while an option of the training parser is missing from it.

The columns of an Option:

- identity: part of a run's identity. table.py averages seeds only over runs equal in every identity
  value; an args.json key that this table does not know counts as part of the identity too (the safe
  default: a new option never folds two different runs into one seed).
- paper: its value in the paper's configuration (docs/reference.md section 3). ROW: each row of the
  table names its own (net, att, recipe); ANY: any value is the paper's (not part of the identity).
  A callable takes the run's arguments (a dict) and gives the value, e.g. the recipe's warm-up.
- older: what an args.json written before the key existed stands for; REQUIRED: such a run cannot be
  read. A callable takes the run's arguments. Only identity values need one.
- resume: what a resume does with it.
    KEPT        the checkpoint's value; one given on the command line is ignored, with a note.
    MAY_CHANGE  the resume command's value replaces the checkpoint's, when given (for the values
                that are not options: what this launch measures). An identity value that changes so
                makes a mixed run, which table.py lists apart.
    EXTENDS     may change, and the run is then simply longer (--epochs).
    WHERE       this command's own, never the checkpoint's: where to read and write.
    FOLDER      recorded, but not given back to the parser on resume: the resumed folder decides.
- arithmetic: changing it changes the arithmetic, not the recipe: a resume that changes it says the
  run continues, but not bitwise; a run that differs from the paper only in such identity values
  stays in the paper's rows (with b x world = 128). A callable takes the run's arguments.
- number: table.py computes with it (or averages over it: the seed), so an args.json must hold a
  number there.
- option: False for what the trainer records in args.json beside the parser's options.
"""
from dataclasses import dataclass
from typing import Any

from conf import global_settings as settings

ROW, ANY, REQUIRED = "ROW", "ANY", "REQUIRED"
KEPT, MAY_CHANGE, EXTENDS, WHERE, FOLDER = "kept", "may change", "extends", "where", "folder"


@dataclass(frozen=True)
class Option:
    identity: bool
    paper: Any = ANY
    older: Any = REQUIRED
    resume: str = KEPT
    arithmetic: Any = False
    number: bool = False
    option: bool = True


def recipe_warm(args: dict) -> int:
    return settings.RECIPES[args["recipe"]]["warm"]


OPTIONS = {
    # A run's identity, in the order table.py names what differs from the paper.
    "net": Option(True, paper=ROW),
    "att": Option(True, paper=ROW),
    "recipe": Option(True, paper=ROW),
    "att_stages": Option(True, None, None),  # None: every stage, the paper's placement
    "lr": Option(True, settings.LR, settings.LR, number=True),
    "b": Option(True, settings.BATCH_SIZE, settings.BATCH_SIZE, arithmetic=True, number=True),  # per process
    # Recorded by the trainer: torchrun processes, so the global batch is b x world.
    "world": Option(True, 1, 1, resume=MAY_CHANGE, arithmetic=True, number=True, option=False),
    "epochs": Option(True, settings.EPOCHS, resume=EXTENDS, number=True),
    "warm": Option(True, recipe_warm, recipe_warm, number=True),
    "subset": Option(True, None, None),
    "val": Option(True, None, None),  # held-out training images: the best epoch is picked on them
    # Recorded by the trainer: "cifar-100" or "custom-<8 hex>" (cifar.dataset_identity); before it was
    # recorded, the --data path.
    "dataset": Option(True, "cifar-100", lambda args: args.get("data"), resume=MAY_CHANGE, option=False),
    "amp": Option(True, "off", "off", resume=MAY_CHANGE, arithmetic=True),  # runs from before --amp trained in fp32
    "nam_l1": Option(True, 0.0, 0.0, number=True),
    "sync_bn": Option(True, False, False, arithmetic=True),
    "init_from": Option(True, None, None, resume=FOLDER),  # weights a run started from instead of a fresh init
    # Recorded by the trainer after a resume that changed an identity value, e.g. "amp off -> bf16 at
    # epoch 3 step 0": a mixed run.
    "changed_on_resume": Option(True, None, None, option=False),
    # Recorded by the trainer: the run's own name for its TensorBoard folder (event_log.log_name).
    "run_id": Option(False, option=False),
    # Not the identity. table.py averages over seeds (and needs one in every run).
    "seed": Option(False),
    "data": Option(False, resume=MAY_CHANGE),  # where the data is; "dataset" is what it is
    "data_format": Option(False),  # --dataset: how --data holds it ("dataset" tells the runs apart)
    # Recorded by the trainer from the data: the classes, the normalization (run_data.py).
    "classes": Option(False, resume=MAY_CHANGE, option=False),
    "mean": Option(False, resume=MAY_CHANGE, option=False),
    "std": Option(False, resume=MAY_CHANGE, option=False),
    "loader": Option(False, resume=MAY_CHANGE, arithmetic=True),
    "workers": Option(False, resume=MAY_CHANGE, arithmetic=lambda args: args.get("loader") == "workers"),
    "channels_last": Option(False, resume=MAY_CHANGE, arithmetic=True),
    "compile": Option(False, resume=MAY_CHANGE, arithmetic=True),
    "cuda_graphs": Option(False, resume=MAY_CHANGE),  # replays the compiled kernels: the same arithmetic
    "deterministic": Option(False, resume=MAY_CHANGE, arithmetic=True),  # other kernels: not bitwise on resume
    "gpu": Option(False),  # accepted for the classic CLI; changes nothing
    "gate_images": Option(False),
    "run": Option(False, resume=FOLDER),
    "resume": Option(False, resume=WHERE),
    "checkpoint_dir": Option(False, resume=WHERE),
    "log_dir": Option(False, resume=WHERE),
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
PAPER_CONFIGURATION = {name: o.paper for name, o in OPTIONS.items() if o.identity and o.paper != ROW}
ARITHMETIC_IDENTITY = [name for name, o in OPTIONS.items() if o.identity and o.arithmetic is True]
RESUMABLE_OVERRIDES = [name for name, o in OPTIONS.items() if o.option and o.resume in (MAY_CHANGE, EXTENDS)]
IDENTITY_CHANGES_ON_RESUME = [name for name, o in OPTIONS.items() if o.identity and o.resume == MAY_CHANGE]
WHERE_OPTIONS = [name for name, o in OPTIONS.items() if o.resume == WHERE]
GIVEN_ON_RESUME = RESUMABLE_OVERRIDES + WHERE_OPTIONS
NOT_RESUMED = [name for name, o in OPTIONS.items() if o.resume in (WHERE, FOLDER)]


def arithmetic_on_resume(args: dict) -> list[str]:
    """The options a resume may change that change the arithmetic, for these arguments."""
    return [name for name in RESUMABLE_OVERRIDES if value(OPTIONS[name].arithmetic, args)]
