"""A run's folder: where it is, whether a resumed run is finished already, the training state read
back from its checkpoint, and the folder itself (the lock, args.json, metrics.csv, last.pth and
best.pth written atomically, the TensorBoard log: its folder's name and repair are event_log.py's).
Which checkpoint a resume reads, and with which arguments: training/arguments.py.

    checkpoint/<net>_<att>/<run>/{last.pth, best.pth, metrics.csv, args.json, .lock}
    runs/<net>_<att>/<run>/events.out.tfevents.*

Only rank 0 of a torchrun launch writes.
"""
import contextlib
import csv
import gc
import json
import os
import shlex
import warnings
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

import utils
from conf import settings
from training import checkpoints, engine, event_log, pictures, stopping
from utils import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def folder_of(args) -> Path:
    """The run's folder: a resumed run's own (wherever it was copied), a new one's under
    --checkpoint-dir."""
    if args.resume:
        return Path(args.resume).parent
    return Path(args.checkpoint_dir) / f"{args.net}_{args.att}" / args.run


def finished_already(args, epoch: int, step: int, steps: int, main: bool) -> bool:
    """Whether a resumed run has done its --epochs (then says so); a UserError when it stopped
    inside an epoch beyond them."""
    if step and epoch >= args.epochs:
        raise UserError(
            f"{args.resume} stopped in epoch {epoch + 1} (step {step} of {steps}): give --epochs "
            f"{epoch + 1} or more")
    if epoch >= args.epochs and main:
        done = f"{epoch}/{args.epochs} epochs"
        if epoch > args.epochs:  # a run extended before, resumed with a smaller --epochs
            done = f"{epoch} epochs, more than --epochs {args.epochs}"
        print(f"{args.resume} already finished {done}; raise --epochs to continue")
    return epoch >= args.epochs


def restore(checkpoint, args, model, optimizer, scheduler, scaler, steps_per_epoch: int,
            totals_device, main: bool):
    """Load a checkpoint of this repo into the run's objects; (epoch, step, best, history, running
    totals). A UserError when it cannot have come from this script for this model."""
    if checkpoint.get("format") not in checkpoints.READABLE_FORMATS:
        raise UserError(f"{args.resume} has checkpoint format {checkpoint.get('format')}, "
                        "this script reads formats "
                        f"{', '.join(map(str, checkpoints.READABLE_FORMATS))}")
    kernels = [{key: group[key] for key in ("fused", "foreach")}
               for group in optimizer.param_groups]
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run did not use fp16
            scaler.load_state_dict(checkpoint["scaler"])
        checkpoints.check_training_state(checkpoint)
        # The saved sums cover every rank of the interrupted epoch: rank 0 carries them on.
        totals = engine.RunningTotals(totals_device, *(checkpoint["running"] if main else ()))
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{args.resume} is incomplete or does not fit {args.net} + {args.att}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if checkpoint["step"] >= steps_per_epoch:
        raise UserError(
            f"{args.resume} stopped at step {checkpoint['step']} of its epoch, but this data gives "
            f"{steps_per_epoch} steps per epoch: resume with the data it was trained on")
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)  # which SGD kernel runs is this device's choice, not the checkpoint's
    state = checkpoint["epoch"], checkpoint["step"], checkpoint["best"], checkpoint["history"]
    return (*state, totals)


# ---------------------------------------------------------------- the folder

class RunFolder:
    """A run's checkpoints, metrics.csv and TensorBoard log. Only rank 0 writes; on the other ranks
    of a torchrun launch every method does nothing."""

    TAGS = (("Train/loss", "train_loss"), ("Train/top1", "train_top1"), ("Train/lr", "lr"),
            ("Test/loss", "test_loss"), ("Test/top1", "test_top1"), ("Test/top5", "test_top5"),
            ("Val/loss", "val_loss"), ("Val/top1", "val_top1"))  # Val: with --val only

    def __init__(self, args, ckpt_dir: Path, active: bool, resumed_epoch=None, recorded=None):
        """Open the run's folders; `resumed_epoch`: the epoch a resumed run's checkpoint holds, None
        for a new run; `recorded`: the arguments that checkpoint holds."""
        self.ckpt_dir = ckpt_dir
        log_name = event_log.log_name(ckpt_dir, args)
        self.log_dir = Path(args.log_dir) / f"{args.net}_{args.att}" / log_name
        self.active, self.writer, self.lock, self.log_lock = active, None, None, None
        self.logged = set()  # (tag, epoch) of the scalars in the event files
        if not active:
            return
        self._make_writable()
        self._lock(resuming=resumed_epoch is not None)
        if resumed_epoch is None:
            self._claim_new_run()
        else:
            self.logged = event_log.forget_events_after(self.log_dir, resumed_epoch)
        self._write_owner(args)
        for leftover in self.ckpt_dir.glob("*.tmp"):  # a write that a crash interrupted
            leftover.unlink()
        # A resumed run's args.json stays what its last.pth holds until it saves a new one: an
        # extension (--epochs) killed before that leaves the finished run as it was.
        self._write_args(vars(args) if resumed_epoch is None else recorded)
        self._open_log()

    def _write_args(self, values: dict, rename: bool = True) -> Path:
        """args.json: the arguments in plain text, for table.py and for people (the checkpoints
        hold them too)."""
        return utils.write_atomic(self.ckpt_dir / "args.json",
                                  lambda f: f.write(json.dumps(values, indent=2) + "\n"),
                                  text=True, rename=rename)

    def _make_writable(self) -> None:
        """Both folders made, and written to once: a read-only or full disk is said now."""
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

    def _lock(self, resuming: bool) -> None:
        """The run folder's lock, and the log folder's, which a copied run folder could share."""
        self.lock = RunLock(self.ckpt_dir, resuming)
        # --log-dir the same as --checkpoint-dir
        if self.log_dir.resolve() == self.ckpt_dir.resolve():
            return
        try:
            self.log_lock = RunLock(self.log_dir, resuming)
        except UserError:
            self.lock.release()
            raise

    def _write_owner(self, args) -> None:
        """The log folder's .owner: which run writes there (training/event_log.py)."""
        owner = {"run_id": args.run_id, "folder": str(self.ckpt_dir.resolve()),
                 "logs": str(self.log_dir.resolve())}
        utils.write_atomic(self.log_dir / event_log.OWNER,
                           lambda f: f.write(json.dumps(owner) + "\n"),
                           text=True)

    def _open_log(self) -> None:
        event_log.quiet_log_thread_errors()
        try:
            self.writer = SummaryWriter(self.log_dir)
        except OSError as e:  # it closed its file itself
            self._stop_logging(e)

    def _log(self, write) -> None:
        """A TensorBoard write. A log that cannot be written (a full disk) stops the logging with
        one warning, not the run: checkpoints and metrics.csv go on, and a resume logs the missing
        epochs."""
        if not self.writer:
            return
        try:
            write(self.writer)
        except OSError as e:
            writer, self.writer = self.writer, None
            self._stop_logging(e)
            with contextlib.suppress(OSError, AttributeError):
                writer.close()

    def _stop_logging(self, error: OSError) -> None:
        why = utils.why_not_written(error, self.log_dir / "events", self.log_dir / "events")
        self.print(
            f"warning: the TensorBoard log cannot be written: {why}. Training goes on without it "
            f"(checkpoints and metrics.csv are written); a resume logs the missing epochs")

    def _claim_new_run(self):
        """A new run never writes over a run that saved a checkpoint. What an earlier attempt logged
        before its first checkpoint (it was killed) would show twice in TensorBoard: it goes."""
        if (self.ckpt_dir / "last.pth").exists():
            self.close()
            raise UserError(
                f"{self.ckpt_dir} already holds a run: continue it with --resume {self.ckpt_dir}, "
                f"or choose another --run-name")
        results = sorted(name for name in ("best.pth", "metrics.csv")
                         if (self.ckpt_dir / name).exists())
        if results:  # its last.pth deleted (to save disk, say), its results kept
            self.close()
            raise UserError(
                f"{self.ckpt_dir} already holds a run's results ({', '.join(results)}): choose "
                f"another --run-name")
        stale = event_log.event_files(self.log_dir)
        for events in stale:
            events.unlink()
        if stale:
            self.print(
                f"removed {len(stale)} TensorBoard file(s) of an earlier attempt that saved no "
                f"checkpoint from {self.log_dir}")

    def print(self, *lines):
        if self.active:
            print(*lines, flush=True)

    def announce(self, args, n_params: int, n_images: int, speed, processes, resumed_at) -> None:
        """What is trained where, and (resumed_at: epoch, step, steps per epoch) from where."""
        launch = f"batch {args.b}"
        if processes.enabled:
            launch = f"{processes.world} processes, global batch {processes.world * args.b}"
        stages = f" in stages {args.att_stages}" if args.att_stages else ""
        self.print(
            f"{args.net} + {args.att}{stages} ({n_params:,} parameters), recipe {args.recipe}, "
            f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, {launch}, {n_images:,} "
            f"training image{'s' if n_images != 1 else ''}, on {speed.device} "
            f"({speed.describe()}); checkpoints in {self.ckpt_dir}, logs in {self.log_dir}")
        epoch, step, steps = resumed_at
        if epoch or step:
            self.print(
                f"resuming {args.resume}: epoch {epoch + 1}/{args.epochs}, step {step}/{steps}")

    def graph(self, model, images):
        if not self.active:
            return
        # TensorBoard's graph view needs jit.trace, now deprecated, whose tracer warns about shape
        # checks inside GroupNorm: neither concerns training, so both stay quiet here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace",
                                    category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self._log(lambda writer: writer.add_graph(model, images))
        # The tracer leaves reference cycles that hold the model and its check-run outputs (device
        # memory on a GPU) until some later collection: free them before training starts.
        gc.collect()

    def log_epoch(self, history):
        """The epochs' scalars not yet in the log to TensorBoard (the newest epoch's; on resume,
        those a full disk kept out): before the epoch's checkpoint (a resume from the one before
        forgets them, and logs them again)."""
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
        """metrics.csv: after the epoch's checkpoint, so that it never lists an epoch no checkpoint
        holds."""
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
        if not self.active:
            return
        path = self.ckpt_dir / name
        if name != "last.pth":
            utils.save_atomic(state, path)
            return
        # last.pth and args.json land together: both written first, then both renamed with stop
        # signals held back, so that table.py never reads one run's epochs beside another's state.
        checkpoint = utils.write_atomic(path, lambda f: torch.save(state, f), rename=False)
        try:
            args = self._write_args(state["args"], rename=False)
        except BaseException:
            checkpoint.unlink(missing_ok=True)
            raise
        with stopping.held():
            os.replace(args, self.ckpt_dir / "args.json")
            os.replace(checkpoint, path)

    def print_epoch(self, row: dict, epochs: int, is_best: bool) -> None:
        val = ""
        if "val_top1" in row:
            val = f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}"
        self.print(
            f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train loss "
            f"{row['train_loss']:.4f} top-1 {row['train_top1']:.2f}  test loss "
            f"{row['test_loss']:.4f} top-1 {row['test_top1']:.2f} top-5 "
            f"{row['test_top5']:.2f}{val}  {row['seconds']:.0f}s" + ("  *best" if is_best else ""))

    def finish(self, args, final, best, minutes: float):
        """The run's final numbers: printed, and to TensorBoard (its hyper-parameters view)."""
        picked = "on the validation split" if args.val else "on the test set"
        self.print(
            f"done in {minutes:.1f} min. final (epoch {final['epoch']}): top-1 "
            f"{final['test_top1']:.2f} top-5 {final['test_top5']:.2f}; best (epoch "
            f"{best['epoch']}, picked {picked}): test top-1 {best['top1']:.2f} top-5 "
            f"{best['top5']:.2f}")
        if not self.active:
            return
        hparam_dict = {k: v for k, v in vars(args).items()
                       if isinstance(v, (int, float, str, bool))}
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

    def __init__(self, folder: Path, resuming: bool = False):
        lock = folder / ".lock"
        if os.path.lexists(lock) and not lock.is_file():  # a folder, a FIFO: open fails or waits
            raise UserError(f"{lock} is not a file (a folder, a FIFO, or a link to nothing): "
                            f"remove it")
        self.file = open(lock, "a+")
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "?"
            self.file.close()
            other = "" if resuming else ", or use another --run-name"  # a resume has no other
            raise UserError(f"{folder} is in use by another training (process {owner}); wait for "
                            f"it to end{other}") from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
        except OSError as e:  # a full disk
            self.file.close()
            raise UserError(
                f"cannot write {folder / '.lock'}: "
                f"{utils.why_not_written(e, folder / '.lock', folder / '.lock')}") from None

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
        folder.print(f"rebuilt {path} from last.pth: it held epoch {held}, the best is epoch "
                     f"{best['epoch']}")
    else:
        folder.print(f"warning: {path} holds epoch {held} but the best is epoch {best['epoch']}, "
                     f"which no checkpoint holds any more; best.pth is stale")


def resume_command(ckpt_dir, log_root, processes) -> str:
    """The command that resumes the run, quoted for a shell: paths with spaces paste as they are."""
    launcher = ["python"]
    if processes.enabled:
        launcher = ["torchrun", f"--nproc_per_node={processes.world}"]
    logs = [] if log_root == settings.LOG_DIR else ["--log-dir", str(log_root)]
    return shlex.join([*launcher, "train_cifar100.py", "--resume", str(ckpt_dir), *logs])
