"""Train a CIFAR ResNet with an attention module on CIFAR-100.

    CUDA_VISIBLE_DEVICES=0 python train_cifar100.py --b 128          # ResNet50 + EMA, the paper's recipe
    python train_cifar100.py -net resnet101 -att ca --seed 1
    python train_cifar100.py -resume                                 # continue the newest resnet50_ema run

Writes checkpoint/<net>_<att>/<run>/{last.pth,best.pth,metrics.csv,args.json} and TensorBoard logs in
runs/<net>_<att>/<run>/. Recipes: conf/global_settings.py and docs/reference.md.
"""
import os
import signal
import sys

if __name__ == "__main__":
    # Loading torch takes seconds. A Ctrl-C or SIGTERM meanwhile ends the script with one line and
    # 128 + the signal (nothing is written yet), not a traceback or a silent kill; main() takes over.
    # os._exit, not an exception: one raised inside a native module's initialisation can abort.
    def stopped_while_loading(signum, frame):
        print(f"{signal.Signals(signum).name}: stopped while loading; nothing was written", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

    handlers_before_loading = {sig: signal.signal(sig, stopped_while_loading)
                               for sig in (signal.SIGINT, signal.SIGTERM)
                               if signal.getsignal(sig) is not signal.SIG_IGN}  # e.g. a job started with &

import cli

if __name__ == "__main__":
    cli.answer_help(cli.train_parser)  # before the imports below, which take seconds

import argparse
import contextlib
import csv
import gc
import hashlib
import io
import json
import math
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

import cifar
import models
import pictures
import training
import upstream_checkpoints
import utils
from conf import settings
from models.attention import nam_l1_penalty
from utils import UserError

CHECKPOINT_FORMAT = 2  # 2: no RNG states (each epoch's randomness comes from the seed and the epoch)
READABLE_FORMATS = (1, 2)
# Arguments a resumed run may change; every other one is taken from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "data", "workers", "loader", "amp", "channels_last", "compile", "cuda_graphs")
# What changes table.py's run identity among them (and the number of processes): a mixed run.
IDENTITY_CHANGES_ON_RESUME = ("amp", "world", "dataset")
# Steps between checks for divergence and stop requests: each check waits for the device, so the
# GPU runs ahead of Python in between.
CHECK_EVERY = 50
ESTIMATE_AFTER = 6  # steps timed for the CPU's time estimate


def parse_args(argv=None):
    return cli.parse_train_args(argv)


class Interrupted(KeyboardInterrupt):
    """SIGTERM during start-up (Ctrl-C there is Python's own KeyboardInterrupt), or a second Ctrl-C
    or SIGTERM in the loop: stop at once, with no checkpoint saved first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum, frame):
    raise Interrupted(signum)


class StopRequest:
    """Within `with`, Ctrl-C / SIGTERM set a flag that the loop checks (after every step in a single
    process, at the next agreed check under torchrun), so that a checkpoint gets saved; the previous
    handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.announce = announce

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
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
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = utils.checkpoint_file(args.resume)
    if path.name == "best.pth":  # resuming it would roll the run back over a newer last.pth
        raise UserError(f"{path} is the best epoch's weights, for test.py; resume the run with --resume {path.parent}")
    checkpoint = utils.load_checkpoint(path)
    saved = argparse.Namespace(**checked_saved_args(checkpoint["args"], path))
    for name in RESUMABLE_OVERRIDES:
        if getattr(args, name) is not None:
            setattr(saved, name, getattr(args, name))
    saved.resume, saved.run = str(path), path.parent.name
    saved.checkpoint_dir, saved.log_dir = args.checkpoint_dir, args.log_dir
    defaults = vars(parse_args([]))
    kept = set(RESUMABLE_OVERRIDES) | {"resume", "checkpoint_dir", "log_dir"} | (
        {"net", "att"} if args.resume == "newest" else set())  # -net/-att pick the newest run
    ignored = [name for name, value in vars(args).items() if name not in kept and value != defaults[name]]
    if ignored:
        print(f"note: a resumed run keeps its own arguments; ignored: {', '.join(ignored)}", file=sys.stderr)
    return saved, checkpoint


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
    return {**vars(parse_args([])), **saved, **checked}


# Recorded, but replaced on resume: where it was pointed decides where a resumed run writes.
NOT_RESUMED = ("resume", "init_from", "run", "checkpoint_dir", "log_dir")


def as_command_line(saved: dict) -> list[str]:
    """The command line that gives these arguments (flags must be true or false)."""
    argv = []
    for action in cli.train_parser()._actions:
        value = saved.get(action.dest)
        if value is None or not action.option_strings or action.dest in NOT_RESUMED:
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


class RunOutputs:
    """A run's checkpoints, metrics.csv and TensorBoard log. Only rank 0 writes; on the other ranks
    of a torchrun launch every method does nothing."""

    TAGS = (("Train/loss", "train_loss"), ("Train/top1", "train_top1"), ("Train/lr", "lr"),
            ("Test/loss", "test_loss"), ("Test/top1", "test_top1"), ("Test/top5", "test_top5"))

    def __init__(self, args, ckpt_dir: Path, active: bool, resumed_epoch=None):
        self.ckpt_dir = ckpt_dir
        self.log_dir = Path(args.log_dir) / f"{args.net}_{args.att}" / log_name(ckpt_dir, args)
        self.active, self.writer, self.lock = active, None, None
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
        self.lock = utils.RunLock(self.ckpt_dir)
        try:
            self.log_lock = utils.RunLock(self.log_dir)  # a copied run folder could share it
        except UserError:
            self.lock.release()
            raise
        if resumed_epoch is None:
            self._claim_new_run()
        else:
            self._forget_events_after(resumed_epoch)
        for leftover in self.ckpt_dir.glob("*.tmp"):  # a write that a crash interrupted
            leftover.unlink()
        # The arguments in plain text, for table.py and for people; the checkpoints hold them too.
        utils.write_atomic(self.ckpt_dir / "args.json", lambda f: f.write(json.dumps(vars(args), indent=2) + "\n"),
                           text=True)
        self.writer = SummaryWriter(self.log_dir)

    def _claim_new_run(self):
        """A new run never writes over a run that saved a checkpoint. What an earlier attempt logged
        before its first checkpoint (it was killed) would show twice in TensorBoard: it goes."""
        if (self.ckpt_dir / "last.pth").exists():
            self.close()
            raise UserError(f"{self.ckpt_dir} already holds a run: continue it with --resume {self.ckpt_dir}, "
                            f"or choose another --run-name")
        stale = list(self.log_dir.glob("events.out.tfevents.*"))
        for events in stale:
            events.unlink()
        if stale:
            self.print(f"removed {len(stale)} TensorBoard file(s) of an earlier attempt that saved no checkpoint "
                       f"from {self.log_dir}")

    def _forget_events_after(self, epoch: int):
        """Remove from the event files what an interrupted process logged after the checkpoint being
        resumed, and the final metrics of a finished run being extended: TensorBoard's own reader
        (load_fast=false) ignores SummaryWriter's purge_step and would show those steps twice."""
        for path in sorted(self.log_dir.glob("events.out.tfevents.*")):
            records = list(RawEventFileLoader(str(path)).Load())
            kept = [record for record in records if self._still_valid(event_pb2.Event.FromString(record), epoch)]
            if len(kept) < len(records):
                utils.write_atomic(path, lambda f: write_records(f, kept))

    @staticmethod
    def _still_valid(event, epoch: int) -> bool:
        final_metrics = any(value.tag.startswith(("hparam/", "_hparams_/")) for value in event.summary.value)
        return event.step <= epoch and not final_metrics

    def print(self, *lines):
        if self.active:
            print(*lines, flush=True)

    def graph(self, model, images):
        if not self.active:
            return
        # TensorBoard's graph view needs jit.trace, now deprecated, whose tracer warns about shape
        # checks inside GroupNorm: neither concerns training, so both stay quiet here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self.writer.add_graph(model, images)
        # The tracer leaves reference cycles that hold the model and its check-run outputs (device
        # memory on a GPU) until some later collection: free them before training starts.
        gc.collect()

    def log_epoch(self, history):
        if not self.active:
            return
        row = history[-1]
        for tag, key in self.TAGS:
            self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

        def write_csv(f):
            table = csv.DictWriter(f, fieldnames=list(row))
            table.writeheader()
            table.writerows(history)

        utils.write_atomic(self.ckpt_dir / "metrics.csv", write_csv, text=True)

    def gate_images(self, model, images, recipe, speed, epoch):
        if not self.active:
            return
        for name, grid in pictures.ema_gate_grids(model, images, recipe, speed).items():
            self.writer.add_image(f"EMA gates/{name}", grid, epoch)

    def save(self, name, state):
        if self.active:
            utils.save_atomic(state, self.ckpt_dir / name)

    def finish(self, args, final, best):
        if not self.active:
            return
        hparam_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        metrics = {"hparam/final_top1": final["test_top1"], "hparam/final_top5": final["test_top5"],
                   "hparam/best_top1": best["top1"]}
        for summary in hparams(hparam_dict, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, final["epoch"])
        self.close()

    def close(self):
        if self.writer:
            self.writer.close()
        if self.lock:
            self.lock.release()
            self.log_lock.release()


class Diverged(UserError):
    pass


class LossWatch:
    """The step losses since the last check, kept on the device, and at each check the verdict.

    Training has diverged at the first non-finite loss. Under fp16 the gradient scaler skips a step
    whose gradients overflow and lowers its scale, so there only a loss that stays non-finite for
    CHECK_EVERY steps in a row is divergence.
    """

    def __init__(self, tolerated: int):
        self.tolerated = tolerated  # non-finite steps in a row that are not divergence yet
        self.losses, self.first_step, self.streak, self.streak_start = [], 0, 0, 0
        self.last = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)

    def diverged_at(self):
        """The 1-based step at which the non-finite losses began, if training diverged; else None.
        Waits for the device."""
        finite = torch.isfinite(torch.stack(self.losses)).tolist()
        self.last = self.losses[-1].item()
        for step, ok in enumerate(finite, self.first_step + 1):
            self.streak = 0 if ok else self.streak + 1
            self.streak_start = step if self.streak == 1 else self.streak_start
            if self.streak > self.tolerated:
                return self.streak_start
        self.losses = []
        return None


class Trainer:
    """One run: set up from the arguments (and the checkpoint being resumed), then epoch after
    epoch, checking every CHECK_EVERY steps for divergence and for a stop request."""

    def __init__(self, args, processes, checkpoint):
        self.args, self.processes = args, processes
        self.notes = []  # printed once the run folder is open
        device = processes.start()
        self.speed = training.SpeedSettings.resolve(device, args.amp, args.channels_last, args.compile, args.att,
                                                    args.cuda_graphs, processes.world)
        amp = self.speed.amp
        if device.type == "cpu" and (amp == "fp16" or amp == "bf16" and not training.native_cpu_bf16()):
            self.notes.append(f"warning: this CPU emulates --amp {amp}, much slower than --amp off")
        if args.cuda_graphs and not self.speed.cuda_graphs:
            obstacle = training.cuda_graphs_obstacle(device, self.speed.compile, processes.world)
            self.notes.append(f"note: CUDA graphs off: {obstacle}")
        # args.cuda_graphs stays as asked (None: wherever they apply): a run that passes through the
        # CPU or torchrun gets them back on one GPU.
        args.amp, args.channels_last, args.compile = self.speed.amp, self.speed.channels_last, self.speed.compile
        args.loader = args.loader or "device"
        if args.workers is None:
            args.workers = 4 if device.type == "cuda" else 0
        if args.sync_bn and processes.enabled and device.type != "cuda":
            raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only")
        args.world = processes.world
        if processes.local_rank == 0:  # one download per machine, the other ranks wait for it
            cifar.ensure_cifar100(args.data)
        processes.barrier()
        self.recipe = settings.RECIPES[args.recipe]
        self._load_data()
        self._build_model()
        self.epoch, self.step, self.best, self.history = 0, 0, {"top1": 0.0, "top5": 0.0, "epoch": 0}, []
        self.totals = training.RunningTotals(device)
        self.checkpoint, self.out = checkpoint, None
        if checkpoint:
            self._restore(checkpoint)

    def open_outputs(self):
        """The run folder, once everything given has been validated: nothing is written before."""
        args = self.args
        folder = (Path(args.resume).parent if self.checkpoint
                  else Path(args.checkpoint_dir) / f"{args.net}_{args.att}" / args.run)
        self.out = RunOutputs(args, folder, self.processes.main, self.epoch if self.checkpoint else None)
        for note in self.notes:
            self.out.print(note)
        if self.checkpoint:
            self._repair_best()
        else:
            self.out.graph(self.model, self.speed.inputs(next(iter(self.test_data))[0][:2]))

    def _repair_best(self):
        """best.pth must hold the epoch the record calls best. A crash while it was written leaves an
        older one; the record's best epoch is then the one last.pth holds, so last.pth rebuilds it."""
        if not self.processes.main or not self.best["epoch"]:
            return
        path = self.out.ckpt_dir / "best.pth"
        try:
            held = utils.load_checkpoint(path)["epoch"] if path.is_file() else None
        except UserError:
            held = None
        if held == self.best["epoch"]:
            return
        if (self.checkpoint["epoch"], self.checkpoint["step"]) == (self.best["epoch"], 0):
            self.out.save("best.pth", self.checkpoint)
            self.out.print(f"rebuilt {path} from last.pth: it held epoch {held}, the best is epoch {self.best['epoch']}")
        else:
            self.out.print(f"warning: {path} holds epoch {held} but the best is epoch {self.best['epoch']}, "
                           f"which no checkpoint holds any more; best.pth is stale")

    def _load_data(self):
        args, device = self.args, self.speed.device
        self.train_set = cifar.CIFAR100Folder(args.data, train=True)
        test_set = cifar.CIFAR100Folder(args.data, train=False)
        args.dataset = cifar.dataset_identity(self.train_set, test_set)  # for table.py's run identity
        if args.subset:
            self.train_set.truncate(args.subset)
        # Seeded again at the start of every epoch (training.seed_epoch); every rank draws the same
        # epoch, then takes its shard.
        self.generator = torch.Generator(device if args.loader == "device" else "cpu")
        self.generator.manual_seed(args.seed)
        self.train_data = cifar.make_loader(args.loader, self.train_set, args.b, self.recipe, device, True,
                                            args.workers, self.generator, self.processes)
        self.test_data = cifar.make_loader(args.loader, test_set, max(args.b, 256), self.recipe, device, False,
                                           args.workers, processes=self.processes)
        self.gate_images = next(iter(self.test_data))[0][:8] if args.gate_images else None  # the same every time

    def _build_model(self):
        args, speed, device = self.args, self.speed, self.speed.device
        torch.manual_seed(args.seed)
        model = models.create_model(args.net, args.att, settings.NUM_CLASSES)
        training.initialise(model, self.recipe)
        if args.init_from and not args.resume:  # a resumed run loads its own weights
            this_run = f"this run's {args.net} + {args.att}"
            layout = upstream_checkpoints.load_weights_into(model, args.init_from, this_run)
            self.notes.append(f"weights from {args.init_from} ({layout}); optimizer and schedule start fresh")
        if args.sync_bn and self.processes.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameter names: checkpoints load anywhere
        self.model = model.to(device, memory_format=speed.memory_format)
        self.optimizer = training.make_optimizer(model, args.lr, device)
        steps_per_epoch = len(self.train_data)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: training.lr_factor(step, steps_per_epoch, args.warm))
        self.scaler = speed.grad_scaler()
        if self.scaler.is_enabled():  # fp16 skips the optimizer step on overflow; the LR schedule still advances
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        speed.enable_fast_kernels()
        # `model` stays the plain module: checkpoints, the graph and the pictures use it. Steps go
        # through DDP (gradients averaged over ranks) and torch.compile; evaluation through the
        # compiled plain module (DDP adds nothing there).
        self.eval_model = speed.compiled(model)
        if self.processes.enabled:
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            self.step_model = speed.compiled(ddp)
        else:
            self.step_model = self.eval_model
        self.penalty = (lambda: nam_l1_penalty(model, args.nam_l1)) if args.nam_l1 else None

    def _restore(self, checkpoint):
        args = self.args
        if checkpoint.get("format") not in READABLE_FORMATS:
            raise UserError(f"{args.resume} has checkpoint format {checkpoint.get('format')}, "
                            f"this script reads formats {', '.join(map(str, READABLE_FORMATS))}")
        kernels = [{key: group[key] for key in ("fused", "foreach")} for group in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run did not use fp16
                self.scaler.load_state_dict(checkpoint["scaler"])
            self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
            self.best, self.history = checkpoint["best"], checkpoint["history"]
            check_training_state(checkpoint)
            if self.processes.main:  # the saved sums cover every rank of the interrupted epoch
                self.totals = training.RunningTotals(self.speed.device, *checkpoint["running"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{args.resume} is incomplete or does not fit {args.net} + {args.att}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if self.step >= len(self.train_data):
            raise UserError(f"{args.resume} stopped at step {self.step} of its epoch, but this data gives "
                            f"{len(self.train_data)} steps per epoch: resume with the data it was trained on")
        for group, kernel in zip(self.optimizer.param_groups, kernels):
            group.update(kernel)  # which SGD kernel runs is this device's choice, not the checkpoint's
        self._record_identity_changes(checkpoint["args"])
        changes = self._arithmetic_changes(checkpoint)
        if changes:
            self.notes.append(f"note: {'; '.join(changes)}: the run continues, but not bitwise as it would have "
                              f"without the interruption")

    def _record_identity_changes(self, saved: dict):
        """A resume that changes what table.py counts as a run's identity (precision, processes, data)
        makes a mixed run: args.changed_on_resume says so, and table.py lists it apart from both kinds."""
        args = self.args
        changes = changed_arguments(saved, args, [name for name in IDENTITY_CHANGES_ON_RESUME if name in saved])
        if changes:
            now = f"{', '.join(changes)} at epoch {self.epoch + 1} step {self.step}"
            args.changed_on_resume = "; ".join(filter(None, [saved.get("changed_on_resume"), now]))
            self.notes.append(f"note: {now}: a mixed run, which table.py lists apart")

    def _arithmetic_changes(self, checkpoint) -> list[str]:
        """What differs from the interrupted process in a way that changes the arithmetic."""
        saved, args = checkpoint["args"], self.args
        names = ["loader", "amp", "channels_last", "compile"] + (["workers"] if args.loader == "workers" else [])
        changes = changed_arguments(saved, args, names)
        if checkpoint["format"] == 1:
            changes.append("a format-1 checkpoint (the remaining epochs draw their randomness anew)")
        for what, then, now in (("device", checkpoint.get("device"), self.speed.device.type),
                                ("processes", checkpoint.get("world"), self.processes.world)):
            if checkpoint["format"] > 1 and then != now:
                changes.append(f"{what} {then} -> {now}")
        return changes

    def run(self, stop: StopRequest) -> int:
        """Train until the last epoch or a stop request; the exit code."""
        self._announce()
        stop_signal = 0
        while self.epoch < self.args.epochs and not stop_signal:
            stop_signal = self.train_epoch(stop)
            if self.step == len(self.train_data):
                self.end_epoch()
        return self.finish(stop_signal)

    def _announce(self):
        args, processes = self.args, self.processes
        n_params = models.count_parameters(self.model)[0]
        launch = (f"{processes.world} processes, global batch {processes.world * args.b}" if processes.enabled
                  else f"batch {args.b}")
        speed = self.speed
        self.out.print(f"{args.net} + {args.att} ({n_params:,} parameters), recipe {args.recipe}, {args.epochs} "
                       f"epochs, {launch}, {len(self.train_set):,} training images, on {speed.device} "
                       f"({speed.describe()}); checkpoints in {self.out.ckpt_dir}, "
                       f"logs in {self.out.log_dir}")
        if self.epoch or self.step:
            self.out.print(f"resuming {args.resume}: epoch {self.epoch + 1}/{args.epochs}, "
                           f"step {self.step}/{len(self.train_data)}")
        self.started = time.time()

    def train_epoch(self, stop: StopRequest) -> int:
        """Steps from self.step to the epoch's end, or until a stop is agreed; the stop signal or 0.
        Nothing between two checks waits for the device."""
        args, processes, steps = self.args, self.processes, len(self.train_data)
        training.seed_epoch(args.seed, self.epoch, self.generator)
        self.step_model.train()
        watch = LossWatch(tolerated=CHECK_EVERY - 1 if self.speed.amp == "fp16" else 0)
        bar = tqdm(total=steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{args.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True, disable=not processes.main)
        self.epoch_start, first_step, stop_signal = time.time(), self.step, 0
        for step, (images, labels) in cifar.batches(self.train_data, self.step, self.epoch):
            images, labels = self.speed.inputs(images), labels.to(self.speed.device, non_blocking=True)
            loss, hits = training.train_step(self.step_model, images, labels, self.optimizer, self.scaler,
                                             self.speed, self.penalty)
            self.scheduler.step()
            self.totals.add(loss, hits, len(labels))
            watch.add(loss, step)
            self.step = step + 1
            bar.update()
            if len(watch.losses) == CHECK_EVERY or self.step == steps or (stop.signal and not processes.enabled):
                stop_signal = self.check(watch, stop, bar, first_step)
                if stop_signal and self.step < steps:
                    bar.close()
                    return stop_signal
            if self.step - first_step == ESTIMATE_AFTER and self.speed.device.type == "cpu" and processes.main:
                self._estimate_cpu_time(first_step)
        bar.close()
        return stop_signal

    def check(self, watch: LossWatch, stop: StopRequest, bar, first_step: int) -> int:
        """The periodic check: divergence and stop requests, agreed by every rank; the progress bar's
        numbers. The one place in an epoch that waits for the device."""
        bad_step = watch.diverged_at()
        stop_signal = int(self.processes.max(torch.tensor([stop.signal or 0], device=self.speed.device)).item())
        # One dtype on every rank (an int here and inf there would be a collective mismatch).
        first_bad = self.processes.min(torch.tensor([bad_step or math.inf], dtype=torch.float32,
                                                    device=self.speed.device)).item()
        if math.isfinite(first_bad):
            raise_divergence(self.epoch + 1, int(first_bad), self.out.ckpt_dir)
        images_per_s = (self.step - first_step) * self.args.b / (time.time() - self.epoch_start)
        bar.set_postfix(loss=f"{watch.last:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4g}",
                        img_s=f"{images_per_s * self.processes.world:.0f}")
        return stop_signal

    def _estimate_cpu_time(self, first_step):
        # Measured over the steps after the first (which is slower).
        minutes = (time.time() - self.epoch_start) / (self.step - first_step) * len(self.train_data) / 60
        tqdm.write(f"warning: no GPU; about {minutes:.1f} min per epoch, "
                   f"{minutes * (self.args.epochs - self.epoch) / 60:.1f} h for the remaining "
                   f"{self.args.epochs - self.epoch} epochs")

    def end_epoch(self):
        """Test, log, checkpoint."""
        args = self.args
        loss_sum, hits, seen = self.totals.read(self.processes)
        self.processes.broadcast_buffers(self.model)
        # The last step's gradients are not needed again: freed, they leave evaluation their memory,
        # and no output of a training graph's replay is alive while evaluation's graphs replay.
        self.optimizer.zero_grad(set_to_none=True)
        test = training.evaluate(self.eval_model, self.test_data, self.speed, self.processes)
        self.epoch, self.step = self.epoch + 1, 0
        self.totals = training.RunningTotals(self.speed.device)
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": self.epoch, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100 * hits / seen,
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               "seconds": round(time.time() - self.epoch_start, 2)}
        self.history.append(row)
        is_best = test["top1"] > self.best["top1"] or not self.best["epoch"]  # the first epoch is a best too
        if is_best:
            self.best = {"top1": test["top1"], "top5": test["top5"], "epoch": self.epoch}
        self.out.log_epoch(self.history)
        if args.gate_images and self.epoch % args.gate_images == 0:
            self.out.gate_images(self.model, self.gate_images, self.recipe, self.speed, self.epoch)
        state = self.checkpoint_state()
        self.out.save("last.pth", state)
        if is_best:
            self.out.save("best.pth", state)
        self.out.print(f"epoch {self.epoch}/{args.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
                       f"top-1 {row['train_top1']:.2f}  test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f} "
                       f"top-5 {row['test_top5']:.2f}  {row['seconds']:.0f}s" + ("  *best" if is_best else ""))

    def checkpoint_state(self) -> dict:
        """Everything needed to continue at (epoch, step); a collective under torchrun. Randomness
        needs no state: each epoch's is derived from (seed, epoch)."""
        return {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
            "step": self.step, "running": self.totals.read(self.processes), "best": self.best,
            "history": self.history, "args": vars(self.args), "device": self.speed.device.type,
            "world": self.processes.world,
        }

    def finish(self, stop_signal: int) -> int:
        """The one way out of a run that was not cut short by an error: save what an interruption
        would lose, say how to go on, return the exit code."""
        out = self.out
        if self.epoch == self.args.epochs:  # done, even if a stop request came with the last step
            final = self.history[-1]
            out.finish(self.args, final, self.best)
            out.print(f"done in {(time.time() - self.started) / 60:.1f} min. final (epoch {final['epoch']}): top-1 "
                      f"{final['test_top1']:.2f} top-5 {final['test_top5']:.2f}; best (epoch {self.best['epoch']}, "
                      f"picked on the test set): top-1 {self.best['top1']:.2f} top-5 {self.best['top5']:.2f}")
            return 0
        if self.step:  # stopped mid-epoch; an epoch's end has saved already
            out.save("last.pth", self.checkpoint_state())
        out.close()
        out.print(f"saved {out.ckpt_dir / 'last.pth'} (epoch {self.epoch + (self.step > 0)}, step {self.step}); "
                  f"resume with:\n  {resume_command(out.ckpt_dir, self.args.log_dir, self.processes)}")
        return 128 + stop_signal


def main(argv=None):
    args = parse_args(argv)
    processes = utils.Distributed.from_environment()
    where = f" (rank {processes.rank} of {processes.world})" if processes.enabled else ""
    # Until the loop's StopRequest takes over, SIGTERM stops as Ctrl-C does (a message, 128 + 15),
    # rather than killing the process silently.
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    try:
        return train(args, processes)
    except Diverged as e:
        print(f"\nerror{where}: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before training started, or a second Ctrl-C / SIGTERM
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{signal.Signals(signum).name}{where}: stopped; the newest last.pth (if any) is from "
              f"before it", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        processes.close()


def train(args, processes) -> int:
    args, checkpoint = resolve_resume(args)
    args.epochs = args.epochs or settings.EPOCHS
    args.data = args.data or settings.DATA_DIR
    args.warm = settings.RECIPES[args.recipe]["warm"] if args.warm is None else args.warm
    args.run = args.run or datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    trainer = Trainer(args, processes, checkpoint)
    if trainer.epoch >= args.epochs:
        if processes.main:
            print(f"{args.resume} already finished {trainer.epoch}/{args.epochs} epochs; raise --epochs to continue")
        return 0
    trainer.open_outputs()
    with StopRequest(announce=processes.main) as stop:
        return trainer.run(stop)


def check_training_state(checkpoint) -> None:
    """A ValueError unless epoch, step, best and history have the shapes this script writes."""
    counts = [checkpoint["epoch"], checkpoint["step"], checkpoint["best"].get("epoch")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(f"epoch, step and best epoch must be whole numbers >= 0, got {counts}")
    numbers = [checkpoint["best"].get(key) for key in ("top1", "top5")]
    numbers += [row.get(key) for row in checkpoint["history"] for key in ("train_loss", "test_top1")]
    if not all(isinstance(x, (int, float)) for x in numbers) or len(checkpoint["history"]) != checkpoint["epoch"]:
        raise ValueError("best and history are not what this script records")


def write_records(file, records):
    writer = RecordWriter(file)
    for record in records:
        writer.write(record)


def log_name(ckpt_dir: Path, args) -> str:
    """The TensorBoard folder's name: the run folder's, made unique (a hash of its path) when the run
    folder is not in a <net>_<att>/ folder, e.g. a copy elsewhere that kept the original's name."""
    if ckpt_dir.parent.name == f"{args.net}_{args.att}":
        return ckpt_dir.name
    return f"{ckpt_dir.name}-{hashlib.sha1(str(ckpt_dir.resolve()).encode()).hexdigest()[:6]}"


def resume_command(ckpt_dir, log_root, processes) -> str:
    launcher = f"torchrun --nproc_per_node={processes.world}" if processes.enabled else "python"
    logs = "" if log_root == settings.LOG_DIR else f" --log-dir {log_root}"
    return f"{launcher} train_cifar100.py --resume {ckpt_dir}{logs}"


def raise_divergence(epoch, step, ckpt_dir):
    last = ckpt_dir / "last.pth"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {step}; training stopped, "
                   f"{kept}. Try a lower -lr or a warm-up (-warm 1).")


if __name__ == "__main__":
    for loaded_signal, handler in handlers_before_loading.items():  # loaded: main() handles signals now
        signal.signal(loaded_signal, handler)
    sys.exit(main())
