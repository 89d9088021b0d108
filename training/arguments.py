"""A run's arguments, settled once. settle() takes what the command line gave (training/cli.py: None
where nothing was given) and, for a resume, what the run recorded, and returns the complete, checked
arguments that the run trains with and records in args.json: every default filled, what the data
is (opened here: dataset, classes, normalization) and, on a resume, what changed. What each option
means: training/options.py.

A resume takes the run's recorded values, each checked by its option's own type, then the values
the command line may change (options.RESUMABLE_OVERRIDES) and where to read and write
(options.WHERE_OPTIONS); anything else given is ignored, with a note.
"""
import json
import os
import sys
import uuid
from argparse import Namespace
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from conf import settings
from training import checkpoints, cli, options, run_data, run_records
from training.options import OPTIONS, BadValue
from training.speed import SpeedSettings, cuda_graphs_obstacle, native_cpu_bf16
from utils import Distributed, UserError


@dataclass
class Settled:
    args: Namespace  # what the run trains with and records in args.json
    speed: SpeedSettings  # how it runs on this device
    checkpoint: Optional[dict]  # the checkpoint being resumed, or None
    splits: run_data.Splits  # its data, opened and split
    notes: list  # for the log, printed once the run folder is open


def settle(given: Namespace, device, processes: Distributed) -> Settled:
    """The complete arguments of the run that `given` (a parsed command line) starts or resumes, on
    `device` with `processes`: every default filled, the data's facts (dataset, classes,
    normalization) and, on a resume, what changed."""
    if given.resume is None:
        values, checkpoint = typed(given), None
    else:
        checkpoint, path, fallback = readable_checkpoint(checkpoint_to_resume(given))
        if fallback:  # at once: also before "already finished"
            print(fallback, file=sys.stderr)
        if given.resume == "newest":
            check_picked(given, checkpoint["args"], path)
        values = resumed_values(given, checkpoint["args"], path)
    fill_run_defaults(values)
    speed, notes = fill_device_defaults(values, device, processes.world)
    splits = run_data.open_splits(Namespace(**values), processes, notes)
    values.update(splits.facts)
    if checkpoint:
        changed, resumed = resume_notes(checkpoint, values, device.type, processes.world)
        if changed:
            values["changed_on_resume"] = changed
        notes += resumed
    return Settled(Namespace(**values), speed, checkpoint, splits, notes)


def typed(given: Namespace) -> dict:
    """The options given on the command line."""
    return {name: value for name, value in vars(given).items() if value is not None}


# ---------------------------------------------------------------- resuming

def checkpoint_to_resume(given: Namespace) -> Path:
    """The last.pth that --resume names: a file, a run folder's, or (alone) the newest of
    -net/-att."""
    if given.resume == "newest":
        net = given.net or OPTIONS["net"].default
        att = given.att or OPTIONS["att"].default
        runs = Path(given.checkpoint_dir or settings.CHECKPOINT_DIR) / f"{net}_{att}"
        candidates = list(runs.glob("*/last.pth"))
        if not candidates:
            raise UserError(f"nothing to resume: no */last.pth under {runs}")
        # A copy (cp -r run run.bak) is newer on disk, but its args.json names the original's
        # folder, which is still there (a renamed run's is not).
        names = {path.parent.name for path in candidates}
        copies = [path for path in candidates if recorded_name(path.parent) not in
                  (path.parent.name, None) and recorded_name(path.parent) in names]
        originals = [p for p in candidates if p not in copies] or candidates
        path = max(originals, key=lambda p: p.stat().st_mtime)
    elif lost_last_pth(Path(given.resume)):
        path = Path(given.resume) / "best.pth"
    else:
        path = checkpoints.checkpoint_file(given.resume)
    return path


def lost_last_pth(folder: Path) -> bool:
    """A run folder whose last.pth is gone (deleted, lost) but whose best.pth is there."""
    last, best = folder / "last.pth", folder / "best.pth"
    return folder.is_dir() and not last.exists() and best.is_file()


def readable_checkpoint(path: Path) -> tuple[dict, Path, Optional[str]]:
    """(the checkpoint to resume, its path, a warning or None). A last.pth that cannot be read
    (truncated, damaged) falls back to the run's best.pth, a full training state of its best
    epoch: the epochs after that one are trained again, and the warning says so."""
    last, best = path.parent / "last.pth", path.parent / "best.pth"
    if path not in (last, best):
        return checkpoints.load_checkpoint(path), path, None
    try:  # each file is read once: a checkpoint can be hundreds of MB
        if not last.exists():
            raise UserError(f"{last} is missing")
        checkpoint = checkpoints.load_checkpoint(last)
    except UserError as e:
        if path == last and not best.is_file():
            raise
        lost = e
    else:
        if path == best:  # resuming it would roll the run back over a newer last.pth
            raise UserError(f"{path} is the best epoch's weights, for test.py; resume the run "
                            f"with --resume {path.parent}")
        return checkpoint, last, None
    try:
        checkpoint = checkpoints.load_checkpoint(best)
    except UserError:
        if path == last:
            raise lost from None  # what was asked for is what cannot be read
        raise
    return checkpoint, best, (f"warning: {lost}; resuming from {best} instead, the run's best "
                              f"epoch ({checkpoint['epoch']}): the epochs after it are trained "
                              f"again")


def check_picked(given: Namespace, recorded, path: Path) -> None:
    """-resume alone picks the newest run of <net>_<att>/: a UserError when the run there records
    another network or module (a folder moved between them)."""
    wanted = (given.net or OPTIONS["net"].default, given.att or OPTIONS["att"].default)
    if isinstance(recorded, dict) and (recorded.get("net"), recorded.get("att")) != wanted:
        raise UserError(f"the newest run of {wanted[0]} + {wanted[1]}, {path.parent}, records "
                        f"{recorded.get('net')} + {recorded.get('att')}: resume it by its folder "
                        f"(--resume {path.parent}) if it is the one")


def recorded_name(folder: Path):
    """The run name that a run folder's args.json records, or None."""
    try:
        return json.loads((folder / "args.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def resumed_values(given: Namespace, recorded, path: Path) -> dict:
    """The resumed run's arguments: its recorded ones (today's defaults for keys an older run
    lacks), what this command may change, and where it reads and writes."""
    values = {**options.NEW_RUN_DEFAULTS, **checked_recorded(recorded, path)}
    given_now = typed(given)
    kept = set(options.GIVEN_ON_RESUME)
    if given.resume == "newest":
        kept |= {"net", "att"}  # they picked the newest run
    # A value given as the run recorded it changes nothing: only the others are worth a note.
    ignored = [options.flag(name) for name, value in given_now.items()
               if name not in kept and value != values.get(name)]
    for name in options.RESUMABLE_OVERRIDES:
        if name in given_now:
            values[name] = given_now[name]
    for name in options.WHERE_OPTIONS:  # where this command reads and writes, not the run once did
        values[name] = given_now.get(name, options.NEW_RUN_DEFAULTS[name])
    values["resume"], values["run"] = str(path), path.parent.name
    if ignored:
        print(f"note: a resumed run keeps its own arguments; ignored: {', '.join(ignored)}",
              file=sys.stderr)
    return values


def checked_recorded(recorded, path: Path) -> dict:
    """The arguments a checkpoint recorded, each option's value checked by its own type: refused
    with a message when it could not have come from this script."""
    if not isinstance(recorded, dict):
        raise UserError(
            f"{path}: its recorded arguments are a {type(recorded).__name__}, not a dict")
    missing = [key for key in ("net", "att") if key not in recorded]
    if missing:
        raise UserError(f"{path}: its recorded arguments lack {', '.join(missing)}")
    values = dict(recorded)
    for name, value in recorded.items():
        option = OPTIONS.get(name)
        if value is None or option is None or not option.option or name in options.NOT_RESUMED:
            continue
        try:
            values[name] = options.checked(name, value)
        except BadValue as e:
            raise UserError(f"{path}: its recorded arguments cannot be resumed ({e})") from None
    # Checked as the run's own command line was: without where it was resumed from or started.
    problem = cli.conflict({**values, "resume": None, "init_from": None})
    if problem:
        raise UserError(f"{path}: its recorded arguments cannot be resumed ({problem})")
    return values


# ---------------------------------------------------------------- derived defaults

def fill_run_defaults(values: dict) -> None:
    """The defaults of what is unset (a resumed run has its own): the table's and the warm-up,
    then the derived ones: data path, run name and id."""
    values.update(options.with_defaults(values))
    # Recorded as an absolute path: test.py, gradcam.py and a resume find it from any folder.
    values["data"] = os.path.abspath(values["data"] or settings.DATA_DIR)
    values["run_id"] = values.get("run_id") or uuid.uuid4().hex  # its TensorBoard folder's name
    # The start time, the seed and the run id's first digits: runs started in the same second (a
    # sweep launched at once) get folders of their own.
    started = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    values["run"] = values["run"] or f"{started}-seed{values['seed']}-{values['run_id'][:6]}"


def fill_device_defaults(values: dict, device, world: int) -> tuple[SpeedSettings, list[str]]:
    """The run's SpeedSettings and the other values whose defaults depend on the device, filled in
    `values` (with the number of processes); the notes for the log."""
    cuda = device.type == "cuda"
    if values["sync_bn"] and world > 1 and not cuda:
        raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only")
    # None: not given (off for a new run, as it was for an old one).
    values["deterministic"] = bool(values["deterministic"])
    speed = SpeedSettings.resolve(device, values["amp"], values["channels_last"], values["compile"],
                                  values["att"], values["cuda_graphs"], world,
                                  values["deterministic"] and cuda)
    notes = []
    if values["deterministic"] and not cuda:
        notes.append(
            "note: --deterministic changes nothing here: runs on the CPU are deterministic "
            "already")
    emulated = speed.amp == "fp16" or speed.amp == "bf16" and not native_cpu_bf16()
    if device.type == "cpu" and emulated:
        notes.append(f"warning: this CPU emulates --amp {speed.amp}, much slower than --amp off")
    if values["cuda_graphs"] and not speed.cuda_graphs:
        why = cuda_graphs_obstacle(device, speed.compile, world)
        notes.append(f"note: CUDA graphs off: {why}")
    # cuda_graphs stays as asked (None: wherever they apply): a run that passes through the CPU or
    # torchrun gets them back on one GPU.
    values.update(amp=speed.amp, channels_last=speed.channels_last, compile=speed.compile)
    if values["workers"] is None:
        values["workers"] = 4 if cuda else 0
    values["world"] = world
    return speed, notes


# ---------------------------------------------------------------- what a resume changed

def changed_arguments(saved: dict, now: dict, names) -> list[str]:
    """'name then -> now' for each of `names` whose recorded value is not this run's."""
    return [f"{name} {saved.get(name)} -> {now.get(name)}" for name in names
            if saved.get(name) != now.get(name)
            and not (name == "dataset" and run_records.same_dataset(saved[name], now[name]))]


def resume_notes(checkpoint, values: dict, device_type: str, world: int) -> tuple:
    """(changed_on_resume or None, the notes for the log) of a resume to these values. One that
    changes what table.py counts as a run's identity (precision, processes, data) makes a mixed
    run: changed_on_resume says so, and table.py lists it apart. One that changes the arithmetic
    continues, but not bitwise."""
    notes, saved, changed = [], checkpoint["args"], None
    names = [name for name in options.IDENTITY_CHANGES_ON_RESUME if name in saved]
    changes = changed_arguments(saved, values, names)
    if changes:
        now = f"{', '.join(changes)} at epoch {checkpoint['epoch'] + 1} step {checkpoint['step']}"
        changed = "; ".join(filter(None, [saved.get("changed_on_resume"), now]))
        notes.append(f"note: {now}: a mixed run, which table.py lists apart")
    # --deterministic and --ema-kernel pick other kernels on CUDA only.
    arithmetic = [name for name in options.arithmetic_on_resume(values)
                  if name not in ("deterministic", "ema_kernel") or device_type == "cuda"]
    changes = changed_arguments(saved, values, arithmetic)
    if checkpoint["format"] == 1:
        changes.append("a format-1 checkpoint (the remaining epochs draw their randomness anew)")
    for what, then, now in (("device", checkpoint.get("device"), device_type),
                            ("processes", checkpoint.get("world"), world)):
        if checkpoint["format"] > 1 and then != now:
            changes.append(f"{what} {then} -> {now}")
    if changes:
        notes.append(f"note: {'; '.join(changes)}: the run continues, but not bitwise as it would "
                     f"have without the interruption")
    return changed, notes
