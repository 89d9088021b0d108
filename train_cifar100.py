"""Train a CIFAR ResNet with an attention module on CIFAR-100.

    CUDA_VISIBLE_DEVICES=0 python train_cifar100.py --b 128   # ResNet50 + EMA, the paper's recipe
    python train_cifar100.py -net resnet101 -att ca --seed 1
    python train_cifar100.py -resume                          # continue the newest resnet50_ema run

main() turns errors into exit codes, train() sets up a Trainer, Trainer.run() is the epoch loop:
train_epoch() (a check every CHECK_EVERY steps), end_epoch() (test, log, save), finish() (the way
out). A run's arguments: training/arguments.py (each option: training/options.py). Its folder,
checkpoint/<net>_<att>/<run>/ and runs/<net>_<att>/<run>/: training/run_folder.py. The step and
evaluation: training/engine.py; the model, loss and schedule: training/recipes.py.
"""
import sys

if __name__ == "__main__":
    # torch takes seconds to load: a stop signal meanwhile ends the script with one line.
    from training.stopping import StopSignals
    STOPS = StopSignals().install()

from training import cli

if __name__ == "__main__":
    cli.answer_help(cli.train_parser)  # before the imports below, which take seconds

import math
import signal
import time

import torch
from tqdm import tqdm

import models
from training import (arguments, checkpoints, ema_kernels, engine, loaders, recipes, run_data,
                      run_folder)
from training.stopping import StopSignals
from utils import Distributed, UserError

# Steps between checks for divergence and stop requests: each check waits for the device, so the
# GPU runs ahead of Python in between.
CHECK_EVERY = 50
ESTIMATE_AFTER = 2  # steps timed for the CPU's first time estimate


def main(argv=None, stops: StopSignals = None) -> int:
    given = cli.parse_train_args(argv)
    processes = Distributed.from_environment()
    where = f" (rank {processes.rank} of {processes.world})" if processes.enabled else ""
    with stops or StopSignals() as stops:
        try:
            return train(given, processes, stops)
        except engine.Diverged as e:
            print(f"\nerror{where}: {e}", file=sys.stderr)
            return 1
        except UserError as e:
            print(f"error{where}: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # before training started, or a second stop signal
            signum = getattr(e, "signum", signal.SIGINT)
            print(f"\n{signal.Signals(signum).name}{where}: stopped; the newest last.pth (if any) "
                  f"is from before it", file=sys.stderr)
            return 128 + signum
        finally:
            processes.close()


def train(given, processes, stops: StopSignals) -> int:
    trainer = Trainer(given, processes)
    at = (trainer.epoch, trainer.step, len(trainer.train_data))
    if run_folder.finished_already(trainer.args, *at, processes.main):
        return 0
    trainer.open_outputs()
    with stops.training(announce=processes.main) as stop:
        return trainer.run(stop)


class Trainer:
    """One run: set up from the arguments (and the checkpoint it resumes), then epoch by epoch."""

    def __init__(self, given, processes):
        self.processes, self.out = processes, None
        device = processes.start()
        settled = arguments.settle(given, device, processes)
        args = self.args = settled.args
        self.speed, self.checkpoint = settled.speed, settled.checkpoint
        self.notes = settled.notes  # printed once the run folder is open
        self.data = run_data.training_data(args, settled.splits, device, processes)
        self.train_data, self.test_data = self.data.train, self.data.test
        self.recipe = self.data.recipe  # with this data's normalization
        self.model = recipes.build_model(args, self.recipe, device, self.speed.memory_format,
                                         processes.enabled, self.notes)
        # EMA's Triton kernels or its PyTorch path (--ema-kernel), chosen before compiling
        self.notes += ema_kernels.choose(self.model, lambda: self.speed.inputs(
            next(iter(self.test_data))[0][:1]), args.ema_kernel, self.speed, args.b, processes)
        self.step_model, self.eval_model = self.speed.wrapped(self.model, processes)
        self.loss = recipes.loss_function(self.model, vars(args))
        self.optimizer = recipes.make_optimizer(self.model, args.lr, device)
        self.scaler = self.speed.grad_scaler()
        self.scheduler = recipes.lr_schedule(self.optimizer, len(self.train_data), args.warm,
                                             self.scaler)
        self.epoch, self.step, self.history = 0, 0, []
        self.best = {"top1": 0.0, "top5": 0.0, "epoch": 0}
        self.totals = engine.RunningTotals(device)
        if self.checkpoint:
            self.epoch, self.step, self.best, self.history, self.totals = run_folder.restore(
                self.checkpoint, args, self.model, self.optimizer, self.scheduler, self.scaler,
                len(self.train_data), device, processes.main)

    def open_outputs(self):
        """The run folder, once everything given has been validated: nothing is written before."""
        resumed_epoch, recorded = None, None
        if self.checkpoint:
            resumed_epoch, recorded = self.epoch, self.checkpoint["args"]
        self.out = run_folder.RunFolder(self.args, run_folder.folder_of(self.args),
                                        self.processes.main, resumed_epoch, recorded)
        for note in self.notes:
            self.out.print(note)
        if self.checkpoint:  # metrics.csv up to the checkpoint (an older one may be resumed)
            run_folder.repair_best(self.out, self.checkpoint, self.best)
            self.out.write_metrics(self.history)
            self.out.log_epoch(self.history)  # the epochs a full log disk kept out, if any
        else:
            self.out.graph(self.model, self.speed.inputs(next(iter(self.test_data))[0][:2]))

    def run(self, stop: StopSignals) -> int:
        """Train until the last epoch or a stop request; the exit code."""
        args, parameters = self.args, models.count_parameters(self.model)[0]
        self.out.announce(args, parameters, len(self.data.train_set), self.speed, self.processes,
                          resumed_at=(self.epoch, self.step, len(self.train_data)))
        self.started, stop_signal = time.time(), 0
        # The CPU's time estimate, printed once a run.
        self.estimated = self.speed.device.type != "cpu" or not self.processes.main
        while self.epoch < args.epochs and not stop_signal:
            stop_signal = self.train_epoch(stop)
            if self.step == len(self.train_data):
                self.end_epoch()
        return self.finish(stop_signal)

    def train_epoch(self, stop: StopSignals) -> int:
        """Steps from self.step to the epoch's end, or until a stop is agreed; the stop signal or 0.
        Nothing between two checks waits for the device."""
        args, processes, steps = self.args, self.processes, len(self.train_data)
        recipes.seed_epoch(args.seed, self.epoch, self.data.generator)
        self.step_model.train()
        # Under fp16 the gradient scaler skips overflowing steps: only a whole check's worth of
        # them is divergence.
        watch = engine.LossWatch(tolerated=CHECK_EVERY - 1 if self.speed.amp == "fp16" else 0)
        bar = tqdm(total=steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                   unit="batch", leave=False, dynamic_ncols=True, disable=not processes.main)
        self.epoch_start, first_step, stop_signal = time.time(), self.step, 0
        for step, (images, labels) in loaders.batches(self.train_data, self.step, self.epoch):
            images = self.speed.inputs(images)
            labels = labels.to(self.speed.device, non_blocking=True)
            loss, hits = engine.train_step(self.step_model, images, labels, self.loss,
                                           self.optimizer, self.scaler, self.speed)
            self.scheduler.step()
            self.totals.add(loss, hits, len(labels))
            watch.add(loss, step)
            self.step = step + 1
            bar.update()
            alone_and_asked = stop.signal and not processes.enabled
            if len(watch.losses) == CHECK_EVERY or self.step == steps or alone_and_asked:
                stop_signal = self.check(watch, stop, bar, first_step)
                if stop_signal and self.step < steps:
                    break
            timed = self.step - first_step
            if (timed == ESTIMATE_AFTER or self.step == steps) and not self.estimated:
                self.estimated = True  # above the bar
                image_seconds = (time.time() - self.epoch_start) / (timed * args.b)
                seconds = image_seconds * (steps * args.b + self.data.evaluated_images / 3)
                tqdm.write(engine.cpu_estimate(seconds, args.epochs - self.epoch)
                           + " (a first estimate, from the first steps; evaluation included)")
        bar.close()
        return stop_signal

    def check(self, watch: engine.LossWatch, stop: StopSignals, bar, first_step: int) -> int:
        """The periodic check: divergence and stop requests, agreed by every rank; the progress
        bar's numbers. The one place in an epoch that waits for the device."""
        bad_step, device = watch.diverged_at(), self.speed.device
        asked = torch.tensor([stop.signal or 0], device=device)
        stop_signal = int(self.processes.max(asked).item())
        # One dtype on every rank (an int here and inf there would be a collective mismatch).
        bad = torch.tensor([bad_step or math.inf], dtype=torch.float32, device=device)
        first_bad = self.processes.min(bad).item()
        if math.isfinite(first_bad):
            engine.raise_divergence(self.epoch + 1, int(first_bad), self.out.ckpt_dir)
        images_per_s = (self.step - first_step) * self.args.b / (time.time() - self.epoch_start)
        bar.set_postfix(loss=f"{watch.last:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4g}",
                        img_s=f"{images_per_s * self.processes.world:.0f}")
        return stop_signal

    def end_epoch(self):
        """Test (and validate), log, checkpoint."""
        loss_sum, hits, seen = self.totals.read(self.processes)
        self.processes.broadcast_buffers(self.model)
        # The last step's gradients are not needed again: freed, they leave evaluation their
        # memory, and no output of a training graph's replay is alive while evaluation's replay.
        self.optimizer.zero_grad(set_to_none=True)
        test = engine.evaluate(self.eval_model, self.test_data, self.speed, self.processes)
        val = None
        if self.data.val is not None:
            val = engine.evaluate(self.eval_model, self.data.val, self.speed, self.processes)
        self.epoch, self.step = self.epoch + 1, 0
        self.totals = engine.RunningTotals(self.speed.device)
        row = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / seen, "train_top1": 100 * hits / seen,
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               **({"val_loss": val["loss"], "val_top1": val["top1"]} if val else {}),
               "seconds": round(time.time() - self.epoch_start, 2)}
        self.history.append(row)
        self.best, is_best = engine.best_after(self.best, row)
        self.out.log_epoch(self.history)
        if self.args.gate_images and self.epoch % self.args.gate_images == 0:
            self.out.gate_images(self.model, self.data.gate_images, self.recipe, self.speed,
                                 self.epoch)
        state = self.checkpoint_state()
        self.out.save("last.pth", state)
        if is_best:
            self.out.save("best.pth", state)
        self.out.write_metrics(self.history)
        self.out.print_epoch(row, self.args.epochs, is_best)

    def checkpoint_state(self) -> dict:
        """Everything needed to continue at (epoch, step); a collective under torchrun. Randomness
        needs no state: each epoch's is derived from (seed, epoch)."""
        return {"format": checkpoints.FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "running": self.totals.read(self.processes), "best": self.best,
                "history": self.history, "args": vars(self.args),
                "device": self.speed.device.type, "world": self.processes.world}

    def finish(self, stop_signal: int) -> int:
        """The one way out of a run that was not cut short by an error: save what an interruption
        would lose, say how to go on, return the exit code."""
        out = self.out
        if self.epoch == self.args.epochs:  # done, even if a stop request came with the last step
            minutes = (time.time() - self.started) / 60
            out.finish(self.args, self.history[-1], self.best, minutes)
            return 0
        if self.step:  # stopped mid-epoch; an epoch's end has saved already
            out.save("last.pth", self.checkpoint_state())
        out.close()
        again = run_folder.resume_command(out.ckpt_dir, self.args.log_dir, self.processes)
        out.print(f"saved {out.ckpt_dir / 'last.pth'} (epoch {self.epoch + (self.step > 0)}, step "
                  f"{self.step}); resume with:\n  {again}")
        return 128 + stop_signal


if __name__ == "__main__":
    sys.exit(main(stops=STOPS))
