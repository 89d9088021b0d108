"""What manages a run's folder: resume resolution (which checkpoint, which arguments), the training
state read back from a checkpoint, the folder itself (the lock, args.json, metrics.csv, last.pth and
best.pth written atomically, the TensorBoard log: its folder's name and repair are event_log.py's), and
stop requests (Ctrl-C, SIGTERM, SIGHUP) that save before stopping.

    checkpoint/<net>_<att>/<run>/{last.pth, best.pth, metrics.csv, args.json, .lock}
    runs/<net>_<att>/<run>/events.out.tfevents.*

Only rank 0 of a torchrun launch writes. What each option means on resume: conf/run_options.py.
"""
import argparse
import contextlib
import csv
import gc
import io
import json
import os
import signal
import sys
import uuid
import warnings
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

import checkpoints
import cli
import event_log
import pictures
import training
import utils
from conf import run_options, settings
from utils import STOP_SIGNALS, UserError, handled

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


# ---------------------------------------------------------------- stop requests


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during start-up (Ctrl-C there is Python's own KeyboardInterrupt), or a second
    stop signal in the loop: stop at once, with no checkpoint saved first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum, frame):
    raise Interrupted(signum)


class StopRequest:
    """Within `with`, Ctrl-C / SIGTERM / SIGHUP set a flag that the loop checks (after every step in a
    single process, at the next agreed check under torchrun), so that a checkpoint gets saved; the
    previous handlers come back on exit."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, announce: bool = True):
        self.announce = announce

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in handled(self.SIGNALS)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop at once
            raise Interrupted(signum)
        self.signal = signum
        if self.announce:
            tqdm.write(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next check...")


# ---------------------------------------------------------------- resuming

def resolve_resume(args):
    """(args to run with, checkpoint or None). A resumed run takes its arguments from its checkpoint,
    except the allowed overrides, and writes where it was pointed: into the checkpoint's folder, and
    TensorBoard into this command's --log-dir, whatever paths the checkpoint recorded."""
    if args.resume is None:
        return args, None
    if args.resume == "newest":
        runs = Path(args.checkpoint_dir) / f"{args.net}_{args.att}"
        candidates = list(runs.glob("*/last.pth"))
        if not candidates:
            raise UserError(f"nothing to resume: no */last.pth under {runs}")
        # A copy (cp -r run run.bak) is newer on disk, but its args.json names the original's folder,
        # which is still there (a renamed run's is not).
        names = {path.parent.name for path in candidates}
        copies = [path for path in candidates if recorded_name(path.parent) not in (path.parent.name, None)
                  and recorded_name(path.parent) in names]
        path = max([p for p in candidates if p not in copies] or candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = checkpoints.checkpoint_file(args.resume)
    if path.name == "best.pth":  # resuming it would roll the run back over a newer last.pth
        raise UserError(f"{path} is the best epoch's weights, for test.py; resume the run with --resume {path.parent}")
    checkpoint = checkpoints.load_checkpoint(path)
    saved = argparse.Namespace(**checked_saved_args(checkpoint["args"], path))
    for name in run_options.RESUMABLE_OVERRIDES:
        if getattr(args, name) is not None:
            setattr(saved, name, getattr(args, name))
    for name in run_options.WHERE_OPTIONS:  # where this command reads and writes, not where the run once did
        setattr(saved, name, getattr(args, name))
    saved.resume, saved.run = str(path), path.parent.name
    defaults = vars(cli.parse_train_args([]))
    kept = set(run_options.GIVEN_ON_RESUME) | ({"net", "att"} if args.resume == "newest" else set())  # -net/-att pick the newest run
    ignored = [name for name, value in vars(args).items() if name not in kept and value != defaults[name]]
    if ignored:
        flags = {action.dest: action.option_strings[-1] for action in cli.train_parser()._actions}
        print(f"note: a resumed run keeps its own arguments; ignored: {', '.join(flags.get(n, n) for n in ignored)}",
              file=sys.stderr)
    return saved, checkpoint


def recorded_name(folder: Path):
    """The run name that a run folder's args.json records, or None."""
    try:
        return json.loads((folder / "args.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def checked_saved_args(saved, path) -> dict:
    """The arguments a checkpoint recorded, on top of today's defaults (for keys older runs lack),
    checked by the same parser as a command line: refused with a message when they could not have
    come from this script."""
    if not isinstance(saved, dict):
        raise UserError(f"{path}: its recorded arguments are a {type(saved).__name__}, not a dict")
    missing = [key for key in ("net", "att") if key not in saved]
    if missing:
        raise UserError(f"{path}: its recorded arguments lack {', '.join(missing)}")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            parsed = vars(cli.parse_train_args(as_command_line(saved)))
    except (SystemExit, TypeError) as e:
        reason = errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1] if errors.getvalue() else str(e)
        raise UserError(f"{path}: its recorded arguments cannot be resumed ({reason})") from None
    checked = {key: parsed[key] for key in saved if key in parsed and saved[key] is not None}
    return {**vars(cli.parse_train_args([])), **saved, **checked}


def as_command_line(saved: dict) -> list[str]:
    """The command line that gives these arguments (flags must be true or false)."""
    argv = []
    for action in cli.train_parser()._actions:
        value = saved.get(action.dest)
        if value is None or not action.option_strings or action.dest in run_options.NOT_RESUMED:
            continue
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise TypeError(f"{action.dest} is {value!r}, not true or false")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                argv.append(action.option_strings[0] if value else action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], str(value)]
    return argv


def changed_arguments(saved: dict, args, names) -> list[str]:
    """'name then -> now' for each of `names` whose recorded value is not this run's."""
    return [f"{name} {saved.get(name)} -> {getattr(args, name)}" for name in names
            if saved.get(name) != getattr(args, name)]


def fill_defaults(args) -> None:
    """What a new run leaves unset (a resumed one has its own): epochs, data, warm-up, run name and id."""
    args.epochs = args.epochs or settings.EPOCHS
    # Recorded as an absolute path: test.py, gradcam.py and a resume find it from any folder.
    args.data = os.path.abspath(args.data or settings.DATA_DIR)
    args.warm = settings.RECIPES[args.recipe]["warm"] if args.warm is None else args.warm
    args.run_id = getattr(args, "run_id", None) or uuid.uuid4().hex  # what its TensorBoard folder knows it by
    # The start time and the seed: two seeds started in the same second get two folders.
    args.run = args.run or f"{datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}-seed{args.seed}"


def folder_of(args) -> Path:
    """The run's folder: a resumed run's own (wherever it was copied), a new one's under --checkpoint-dir."""
    if args.resume:
        return Path(args.resume).parent
    return Path(args.checkpoint_dir) / f"{args.net}_{args.att}" / args.run


def finished_already(args, epoch: int, step: int, steps: int, main: bool) -> bool:
    """Whether a resumed run has done its --epochs (then says so); a UserError when it stopped inside
    an epoch beyond them."""
    if step and epoch >= args.epochs:
        raise UserError(f"{args.resume} stopped in epoch {epoch + 1} (step {step} of {steps}): give --epochs "
                        f"{epoch + 1} or more")
    if epoch >= args.epochs and main:
        print(f"{args.resume} already finished {epoch}/{args.epochs} epochs; raise --epochs to continue")
    return epoch >= args.epochs


def restore(checkpoint, args, model, optimizer, scheduler, scaler, steps_per_epoch: int, totals_device, main: bool):
    """Load a checkpoint of this repo into the run's objects; (epoch, step, best, history, running
    totals). A UserError when it cannot have come from this script for this model."""
    if checkpoint.get("format") not in checkpoints.READABLE_FORMATS:
        raise UserError(f"{args.resume} has checkpoint format {checkpoint.get('format')}, "
                        f"this script reads formats {', '.join(map(str, checkpoints.READABLE_FORMATS))}")
    kernels = [{key: group[key] for key in ("fused", "foreach")} for group in optimizer.param_groups]
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run did not use fp16
            scaler.load_state_dict(checkpoint["scaler"])
        checkpoints.check_training_state(checkpoint)
        # The saved sums cover every rank of the interrupted epoch: rank 0 carries them on.
        totals = training.RunningTotals(totals_device, *(checkpoint["running"] if main else ()))
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{args.resume} is incomplete or does not fit {args.net} + {args.att}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if checkpoint["step"] >= steps_per_epoch:
        raise UserError(f"{args.resume} stopped at step {checkpoint['step']} of its epoch, but this data gives "
                        f"{steps_per_epoch} steps per epoch: resume with the data it was trained on")
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)  # which SGD kernel runs is this device's choice, not the checkpoint's
    return checkpoint["epoch"], checkpoint["step"], checkpoint["best"], checkpoint["history"], totals


def resume_notes(checkpoint, args, device_type: str, world: int) -> list[str]:
    """What a resume changed, for the log. One that changes what table.py counts as a run's identity
    (precision, processes, data) makes a mixed run: args.changed_on_resume says so, and table.py
    lists it apart. One that changes the arithmetic continues, but not bitwise."""
    notes, saved = [], checkpoint["args"]
    names = [name for name in run_options.IDENTITY_CHANGES_ON_RESUME if name in saved]
    changes = changed_arguments(saved, args, names)
    if changes:
        now = f"{', '.join(changes)} at epoch {checkpoint['epoch'] + 1} step {checkpoint['step']}"
        args.changed_on_resume = "; ".join(filter(None, [saved.get("changed_on_resume"), now]))
        notes.append(f"note: {now}: a mixed run, which table.py lists apart")
    arithmetic = [name for name in run_options.arithmetic_on_resume(vars(args))
                  if name != "deterministic" or device_type == "cuda"]  # it picks other kernels on CUDA only
    changes = changed_arguments(saved, args, arithmetic)
    if checkpoint["format"] == 1:
        changes.append("a format-1 checkpoint (the remaining epochs draw their randomness anew)")
    for what, then, now in (("device", checkpoint.get("device"), device_type), ("processes", checkpoint.get("world"), world)):
        if checkpoint["format"] > 1 and then != now:
            changes.append(f"{what} {then} -> {now}")
    if changes:
        notes.append(f"note: {'; '.join(changes)}: the run continues, but not bitwise as it would have "
                     f"without the interruption")
    return notes


# ---------------------------------------------------------------- the folder

class RunFolder:
    """A run's checkpoints, metrics.csv and TensorBoard log. Only rank 0 writes; on the other ranks
    of a torchrun launch every method does nothing."""

    TAGS = (("Train/loss", "train_loss"), ("Train/top1", "train_top1"), ("Train/lr", "lr"),
            ("Test/loss", "test_loss"), ("Test/top1", "test_top1"), ("Test/top5", "test_top5"),
            ("Val/loss", "val_loss"), ("Val/top1", "val_top1"))  # Val: with --val only

    def __init__(self, args, ckpt_dir: Path, active: bool, resumed_epoch=None):
        self.ckpt_dir = ckpt_dir
        self.log_dir = Path(args.log_dir) / f"{args.net}_{args.att}" / event_log.log_name(ckpt_dir, args)
        self.active, self.writer, self.lock = active, None, None
        self.logged = set()  # (tag, epoch) of the scalars in the event files
        if not active:
            return
        made = []
        for folder in (self.ckpt_dir, self.log_dir):
            made += utils.folders_to_make(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                utils.remove_empty(made)
                raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None
        self.lock, self.log_lock = RunLock(self.ckpt_dir), None
        if self.log_dir.resolve() != self.ckpt_dir.resolve():  # --log-dir the same as --checkpoint-dir
            try:
                self.log_lock = RunLock(self.log_dir)  # a copied run folder could share it
            except UserError:
                self.lock.release()
                raise
        if resumed_epoch is None:
            self._claim_new_run()
        else:
            self.logged = event_log.forget_events_after(self.log_dir, resumed_epoch)
        utils.write_atomic(self.log_dir / event_log.OWNER, lambda f: f.write(json.dumps(
            {"run_id": args.run_id, "folder": str(self.ckpt_dir.resolve()), "logs": str(self.log_dir.resolve())})
            + "\n"), text=True)
        for leftover in self.ckpt_dir.glob("*.tmp"):  # a write that a crash interrupted
            leftover.unlink()
        # The arguments in plain text, for table.py and for people; the checkpoints hold them too.
        utils.write_atomic(self.ckpt_dir / "args.json", lambda f: f.write(json.dumps(vars(args), indent=2) + "\n"),
                           text=True)
        event_log.quiet_log_thread_errors()
        self.writer = True  # for _log, which makes it
        self._log(lambda _: setattr(self, "writer", SummaryWriter(self.log_dir)))

    def _log(self, write) -> None:
        """A TensorBoard write. A log that cannot be written (a full disk) stops the logging with one
        warning, not the run: checkpoints and metrics.csv go on, and a resume logs the missing epochs."""
        if not self.writer:
            return
        try:
            write(self.writer)
        except OSError as e:
            writer, self.writer = self.writer, None
            if writer is True:  # failed as it was made: it closed its file itself
                writer = None
            why = utils.why_not_written(e, self.log_dir / "events", self.log_dir / "events")
            self.print(f"warning: the TensorBoard log cannot be written: {why}. Training goes on without it "
                       f"(checkpoints and metrics.csv are written); a resume logs the missing epochs")
            with contextlib.suppress(OSError, AttributeError):
                writer.close()

    def _claim_new_run(self):
        """A new run never writes over a run that saved a checkpoint. What an earlier attempt logged
        before its first checkpoint (it was killed) would show twice in TensorBoard: it goes."""
        if (self.ckpt_dir / "last.pth").exists():
            self.close()
            raise UserError(f"{self.ckpt_dir} already holds a run: continue it with --resume {self.ckpt_dir}, "
                            f"or choose another --run-name")
        results = sorted(name for name in ("best.pth", "metrics.csv") if (self.ckpt_dir / name).exists())
        if results:  # its last.pth deleted (to save disk, say), its results kept
            self.close()
            raise UserError(f"{self.ckpt_dir} already holds a run's results ({', '.join(results)}): choose "
                            f"another --run-name")
        stale = list(self.log_dir.glob("events.out.tfevents.*"))
        for events in stale:
            events.unlink()
        if stale:
            self.print(f"removed {len(stale)} TensorBoard file(s) of an earlier attempt that saved no checkpoint "
                       f"from {self.log_dir}")

    def print(self, *lines):
        if self.active:
            print(*lines, flush=True)

    def announce(self, args, n_params: int, n_images: int, speed, processes, resumed_at) -> None:
        """What is trained where, and (resumed_at: epoch, step, steps per epoch) from where."""
        launch = f"{processes.world} processes, global batch {processes.world * args.b}" if processes.enabled else f"batch {args.b}"
        stages = f" in stages {args.att_stages}" if args.att_stages else ""
        self.print(f"{args.net} + {args.att}{stages} ({n_params:,} parameters), recipe {args.recipe}, {args.epochs} "
                   f"epoch{'s' if args.epochs != 1 else ''}, {launch}, {n_images:,} training "
                   f"image{'s' if n_images != 1 else ''}, on {speed.device} ({speed.describe()}); "
                   f"checkpoints in {self.ckpt_dir}, logs in {self.log_dir}")
        epoch, step, steps = resumed_at
        if epoch or step:
            self.print(f"resuming {args.resume}: epoch {epoch + 1}/{args.epochs}, step {step}/{steps}")

    def graph(self, model, images):
        if not self.active:
            return
        # TensorBoard's graph view needs jit.trace, now deprecated, whose tracer warns about shape
        # checks inside GroupNorm: neither concerns training, so both stay quiet here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self._log(lambda writer: writer.add_graph(model, images))
        # The tracer leaves reference cycles that hold the model and its check-run outputs (device
        # memory on a GPU) until some later collection: free them before training starts.
        gc.collect()

    def log_epoch(self, history):
        """The epochs' scalars not yet in the log to TensorBoard (the newest epoch's; on resume, those
        a full disk kept out): before the epoch's checkpoint (a resume from the one before forgets
        them, and logs them again)."""
        missing = [(tag, row[key], row["epoch"]) for row in history for tag, key in self.TAGS
                   if key in row and (tag, row["epoch"]) not in self.logged]
        if not self.active or not missing:
            return

        def write(writer):
            for tag, value, epoch in missing:
                writer.add_scalar(tag, value, epoch)
            writer.flush()
            self.logged.update((tag, epoch) for tag, _, epoch in missing)

        self._log(write)

    def write_metrics(self, history):
        """metrics.csv: after the epoch's checkpoint, so that it never lists an epoch no checkpoint holds."""
        if not self.active or not history:
            return
        row = history[-1]

        def write_csv(f):
            table = csv.DictWriter(f, fieldnames=list(row))
            table.writeheader()
            table.writerows(history)

        utils.write_atomic(self.ckpt_dir / "metrics.csv", write_csv, text=True)

    def gate_images(self, model, images, recipe, speed, epoch):
        if not self.active:
            return
        for name, grid in pictures.ema_gate_grids(model, images, recipe, speed).items():
            self._log(lambda writer: writer.add_image(f"EMA gates/{name}", grid, epoch))

    def save(self, name, state):
        if self.active:
            utils.save_atomic(state, self.ckpt_dir / name)

    def print_epoch(self, row: dict, epochs: int, is_best: bool) -> None:
        val = f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}" if "val_top1" in row else ""
        self.print(f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
                   f"top-1 {row['train_top1']:.2f}  test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f} "
                   f"top-5 {row['test_top5']:.2f}{val}  {row['seconds']:.0f}s" + ("  *best" if is_best else ""))

    def finish(self, args, final, best, minutes: float):
        """The run's final numbers: printed, and to TensorBoard (its hyper-parameters view)."""
        picked = "on the validation split" if args.val else "on the test set"
        self.print(f"done in {minutes:.1f} min. final (epoch {final['epoch']}): top-1 {final['test_top1']:.2f} top-5 "
                   f"{final['test_top5']:.2f}; best (epoch {best['epoch']}, picked {picked}): test top-1 "
                   f"{best['top1']:.2f} top-5 {best['top5']:.2f}")
        if not self.active:
            return
        hparam_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        metrics = {"hparam/final_top1": final["test_top1"], "hparam/final_top5": final["test_top5"],
                   "hparam/best_top1": best["top1"]}

        def write(writer):
            for summary in hparams(hparam_dict, metrics):
                writer.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, final["epoch"])
            writer.flush()

        self._log(write)
        self.close()

    def close(self):
        self._log(lambda writer: writer.close())
        if self.lock:
            self.lock.release()
            if self.log_lock:
                self.log_lock.release()


class RunLock:
    """An exclusive lock on a run folder for as long as this process lives: a second training that
    targets the folder is refused, and the kernel drops the lock however the process ends. (No
    locking where fcntl does not exist, i.e. on Windows.)"""

    def __init__(self, folder: Path):
        self.file = open(folder / ".lock", "a+")
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "?"
            self.file.close()
            raise UserError(f"{folder} is in use by another training (process {owner}); wait for it to end, "
                            f"or use another --run-name") from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
        except OSError as e:  # a full disk
            self.file.close()
            raise UserError(f"cannot write {folder / '.lock'}: {utils.why_not_written(e, folder / '.lock', folder / '.lock')}") from None

    def release(self) -> None:
        self.file.close()


def repair_best(folder: RunFolder, checkpoint, best: dict) -> None:
    """best.pth must hold the epoch the record calls best. A crash while it was written leaves an
    older one; the record's best epoch is then the one last.pth holds, so last.pth rebuilds it."""
    if not folder.active or not best["epoch"]:
        return
    path = folder.ckpt_dir / "best.pth"
    try:
        held = checkpoints.load_checkpoint(path)["epoch"] if path.is_file() else None
    except UserError:
        held = None
    if held == best["epoch"]:
        return
    if (checkpoint["epoch"], checkpoint["step"]) == (best["epoch"], 0):
        folder.save("best.pth", checkpoint)
        folder.print(f"rebuilt {path} from last.pth: it held epoch {held}, the best is epoch {best['epoch']}")
    else:
        folder.print(f"warning: {path} holds epoch {held} but the best is epoch {best['epoch']}, "
                     f"which no checkpoint holds any more; best.pth is stale")


def resume_command(ckpt_dir, log_root, processes) -> str:
    launcher = f"torchrun --nproc_per_node={processes.world}" if processes.enabled else "python"
    logs = "" if log_root == settings.LOG_DIR else f" --log-dir {log_root}"
    return f"{launcher} train_cifar100.py --resume {ckpt_dir}{logs}"
