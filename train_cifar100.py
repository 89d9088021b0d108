"""Train a CIFAR ResNet with an attention module on CIFAR-100.

    CUDA_VISIBLE_DEVICES=0 python train_cifar100.py --b 128          # ResNet50 + EMA, the paper's recipe
    python train_cifar100.py -net resnet101 -att ca --seed 1
    python train_cifar100.py -resume                                 # continue the newest resnet50_ema run

main() turns errors into exit codes, train() sets up a Trainer, Trainer.run() is the epoch loop:
train_epoch() (a check every CHECK_EVERY steps), end_epoch() (test, log, save), finish() (the way out).
The run's folder, checkpoint/<net>_<att>/<run>/ and runs/<net>_<att>/<run>/: run_folder.py. The step,
evaluation and speed settings: training.py. What each option means to a run: conf/run_options.py.
"""
import os
import signal
import sys

if __name__ == "__main__":
    # Loading torch takes seconds. A Ctrl-C, SIGTERM or SIGHUP meanwhile ends the script with one line and
    # 128 + the signal (nothing is written yet), not a traceback or a silent kill; main() takes over.
    # os._exit, not an exception: one raised inside a native module's initialisation can abort.
    def stopped_while_loading(signum, frame):
        print(f"{signal.Signals(signum).name}: stopped while loading; nothing was written", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

    handlers_before_loading = {sig: signal.signal(sig, stopped_while_loading)
                               for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig
                               and signal.getsignal(sig) is not signal.SIG_IGN}  # e.g. a job started with &

import cli

if __name__ == "__main__":
    cli.answer_help(cli.train_parser)  # before the imports below, which take seconds

import math
import time

import torch
from tqdm import tqdm

import checkpoints
import loaders
import models
import run_data
import run_folder
import training
import utils
from utils import UserError

# Steps between checks for divergence and stop requests: each check waits for the device, so the
# GPU runs ahead of Python in between.
CHECK_EVERY = 50
ESTIMATE_AFTER = 6  # steps timed for the CPU's time estimate


def main(argv=None) -> int:
    args = cli.parse_train_args(argv)
    processes = utils.Distributed.from_environment()
    where = f" (rank {processes.rank} of {processes.world})" if processes.enabled else ""
    # Until the loop's StopRequest takes over, SIGTERM and SIGHUP stop as Ctrl-C does (a message,
    # 128 + the signal), rather than killing the process silently.
    previous = {sig: signal.signal(sig, run_folder.interrupt) for sig in run_folder.handled(run_folder.STOP_SIGNALS[1:])}
    try:
        return train(args, processes)
    except training.Diverged as e:
        print(f"\nerror{where}: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before training started, or a second stop signal
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{signal.Signals(signum).name}{where}: stopped; the newest last.pth (if any) is from "
              f"before it", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        processes.close()


def train(args, processes) -> int:
    args, checkpoint = run_folder.resolve_resume(args)
    run_folder.fill_defaults(args)
    trainer = Trainer(args, processes, checkpoint)
    if run_folder.finished_already(args, trainer.epoch, trainer.step, len(trainer.train_data), processes.main):
        return 0
    trainer.open_outputs()
    with run_folder.StopRequest(announce=processes.main) as stop:
        return trainer.run(stop)


class Trainer:
    """One run: set up from the arguments (and the checkpoint being resumed), then epoch after epoch."""

    def __init__(self, args, processes, checkpoint):
        self.args, self.processes, self.checkpoint, self.out = args, processes, checkpoint, None
        device = processes.start()
        # The notes are printed once the run folder is open.
        self.speed, self.notes = training.resolve_device_options(args, device, processes)
        self.data = run_data.training_data(args, device, processes, self.notes)
        self.train_data, self.test_data, self.recipe = self.data.train, self.data.test, self.data.recipe
        self.model, self.step_model, self.eval_model, self.penalty = training.build_model(
            args, self.recipe, self.speed, processes, self.notes)
        self.optimizer = training.make_optimizer(self.model, args.lr, device)
        self.scaler = self.speed.grad_scaler()
        self.scheduler = training.lr_schedule(self.optimizer, len(self.train_data), args.warm, self.scaler)
        self.epoch, self.step, self.best, self.history = 0, 0, {"top1": 0.0, "top5": 0.0, "epoch": 0}, []
        self.totals = training.RunningTotals(device)
        if checkpoint:
            self.epoch, self.step, self.best, self.history, self.totals = run_folder.restore(
                checkpoint, args, self.model, self.optimizer, self.scheduler, self.scaler, len(self.train_data),
                device, processes.main)
            self.notes += run_folder.resume_notes(checkpoint, args, device.type, processes.world)

    def open_outputs(self):
        """The run folder, once everything given has been validated: nothing is written before."""
        self.out = run_folder.RunFolder(self.args, run_folder.folder_of(self.args), self.processes.main,
                                        self.epoch if self.checkpoint else None)
        for note in self.notes:
            self.out.print(note)
        if self.checkpoint:  # metrics.csv as far as this checkpoint goes (an older file may be resumed)
            run_folder.repair_best(self.out, self.checkpoint, self.best)
            self.out.write_metrics(self.history)
            self.out.log_epoch(self.history)  # the epochs a full log disk kept out, if any
        else:
            self.out.graph(self.model, self.speed.inputs(next(iter(self.test_data))[0][:2]))

    def run(self, stop: run_folder.StopRequest) -> int:
        """Train until the last epoch or a stop request; the exit code."""
        args = self.args
        self.out.announce(args, models.count_parameters(self.model)[0], len(self.data.train_set), self.speed,
                          self.processes, resumed_at=(self.epoch, self.step, len(self.train_data)))
        self.started, stop_signal = time.time(), 0
        self.estimated = self.speed.device.type != "cpu" or not self.processes.main  # the CPU's time estimate
        while self.epoch < args.epochs and not stop_signal:
            stop_signal = self.train_epoch(stop)
            if self.step == len(self.train_data):
                self.end_epoch()
        return self.finish(stop_signal)

    def train_epoch(self, stop: run_folder.StopRequest) -> int:
        """Steps from self.step to the epoch's end, or until a stop is agreed; the stop signal or 0.
        Nothing between two checks waits for the device."""
        args, processes, steps = self.args, self.processes, len(self.train_data)
        training.seed_epoch(args.seed, self.epoch, self.data.generator)
        self.step_model.train()
        # Under fp16 the gradient scaler skips overflowing steps: only a whole check's worth is divergence.
        watch = training.LossWatch(tolerated=CHECK_EVERY - 1 if self.speed.amp == "fp16" else 0)
        bar = tqdm(total=steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{args.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True, disable=not processes.main)
        self.epoch_start, first_step, stop_signal = time.time(), self.step, 0
        for step, (images, labels) in loaders.batches(self.train_data, self.step, self.epoch):
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
                    break
            timed = self.step - first_step
            if (timed == ESTIMATE_AFTER or self.step == steps) and not self.estimated:  # once a run, above the bar
                self.estimated = True
                tqdm.write(training.cpu_estimate((time.time() - self.epoch_start) / timed * steps,
                                                 args.epochs - self.epoch))
        bar.close()
        return stop_signal

    def check(self, watch: training.LossWatch, stop: run_folder.StopRequest, bar, first_step: int) -> int:
        """The periodic check: divergence and stop requests, agreed by every rank; the progress bar's
        numbers. The one place in an epoch that waits for the device."""
        bad_step = watch.diverged_at()
        stop_signal = int(self.processes.max(torch.tensor([stop.signal or 0], device=self.speed.device)).item())
        # One dtype on every rank (an int here and inf there would be a collective mismatch).
        first_bad = self.processes.min(torch.tensor([bad_step or math.inf], dtype=torch.float32,
                                                    device=self.speed.device)).item()
        if math.isfinite(first_bad):
            training.raise_divergence(self.epoch + 1, int(first_bad), self.out.ckpt_dir)
        images_per_s = (self.step - first_step) * self.args.b / (time.time() - self.epoch_start)
        bar.set_postfix(loss=f"{watch.last:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4g}",
                        img_s=f"{images_per_s * self.processes.world:.0f}")
        return stop_signal

    def end_epoch(self):
        """Test (and validate), log, checkpoint."""
        loss_sum, hits, seen = self.totals.read(self.processes)
        self.processes.broadcast_buffers(self.model)
        # The last step's gradients are not needed again: freed, they leave evaluation their memory,
        # and no output of a training graph's replay is alive while evaluation's graphs replay.
        self.optimizer.zero_grad(set_to_none=True)
        test = training.evaluate(self.eval_model, self.test_data, self.speed, self.processes)
        val = (training.evaluate(self.eval_model, self.data.val, self.speed, self.processes)
               if self.data.val is not None else None)
        self.epoch, self.step, self.totals = self.epoch + 1, 0, training.RunningTotals(self.speed.device)
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": self.epoch, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100 * hits / seen,
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               **({"val_loss": val["loss"], "val_top1": val["top1"]} if val else {}),
               "seconds": round(time.time() - self.epoch_start, 2)}
        self.history.append(row)
        picked = row.get("val_top1", test["top1"])  # the best epoch: on the validation split with --val
        is_best = picked > self.best.get("picked", self.best["top1"]) or not self.best["epoch"]  # the first is too
        if is_best:
            self.best = {"top1": test["top1"], "top5": test["top5"], "epoch": self.epoch, "picked": picked}
        self.out.log_epoch(self.history)
        if self.args.gate_images and self.epoch % self.args.gate_images == 0:
            self.out.gate_images(self.model, self.data.gate_images, self.recipe, self.speed, self.epoch)
        state = self.checkpoint_state()
        self.out.save("last.pth", state)
        if is_best:
            self.out.save("best.pth", state)
        self.out.write_metrics(self.history)
        self.out.print_epoch(row, self.args.epochs, is_best)

    def checkpoint_state(self) -> dict:
        """Everything needed to continue at (epoch, step); a collective under torchrun. Randomness
        needs no state: each epoch's is derived from (seed, epoch)."""
        return {"format": checkpoints.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step": self.step, "running": self.totals.read(self.processes), "best": self.best,
                "history": self.history, "args": vars(self.args), "device": self.speed.device.type,
                "world": self.processes.world}

    def finish(self, stop_signal: int) -> int:
        """The one way out of a run that was not cut short by an error: save what an interruption
        would lose, say how to go on, return the exit code."""
        out = self.out
        if self.epoch == self.args.epochs:  # done, even if a stop request came with the last step
            out.finish(self.args, self.history[-1], self.best, minutes=(time.time() - self.started) / 60)
            return 0
        if self.step:  # stopped mid-epoch; an epoch's end has saved already
            out.save("last.pth", self.checkpoint_state())
        out.close()
        out.print(f"saved {out.ckpt_dir / 'last.pth'} (epoch {self.epoch + (self.step > 0)}, step {self.step}); "
                  f"resume with:\n  {run_folder.resume_command(out.ckpt_dir, self.args.log_dir, self.processes)}")
        return 128 + stop_signal


if __name__ == "__main__":
    for loaded_signal, handler in handlers_before_loading.items():  # loaded: main() handles signals now
        signal.signal(loaded_signal, handler)
    sys.exit(main())
