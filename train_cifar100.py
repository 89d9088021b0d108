"""Train a CIFAR ResNet with an attention module on CIFAR-100.

    CUDA_VISIBLE_DEVICES=0 python train_cifar100.py --b 128          # ResNet50 + EMA, the paper's recipe
    python train_cifar100.py -net resnet101 -att ca --seed 1
    python train_cifar100.py -resume                                 # continue the newest resnet50_ema run

Writes checkpoint/<net>_<att>/<run>/{last.pth,best.pth,metrics.csv,args.json} and TensorBoard logs in
runs/<net>_<att>/<run>/. Recipes: ../shared/SPEC.md section 5 and conf/global_settings.py.
"""
import argparse
import csv
import json
import math
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

import models
import utils
from conf import settings
from models.attention import nam_l1_penalty
from utils import UserError

CHECKPOINT_FORMAT = 1
# Arguments a resumed run may change; every other one is taken from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "data", "workers", "loader", "amp", "channels_last", "compile")
NAN_CHECK_EVERY = 50  # steps between finiteness checks of the loss (each one waits for the GPU)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("-net", default="resnet50", choices=models.list_models(), help="default resnet50")
    p.add_argument("-att", default="ema", choices=models.list_attentions(), help="default ema; 'none': the baseline")
    p.add_argument("-b", "--b", "--batch-size", dest="b", type=positive(int), default=settings.BATCH_SIZE,
                   help=f"batch size, per process under torchrun (default {settings.BATCH_SIZE})")
    p.add_argument("-lr", type=positive(float), default=settings.LR, help=f"initial learning rate (default {settings.LR})")
    p.add_argument("-warm", type=int, default=None, help="warm-up epochs (default: the recipe's)")
    p.add_argument("-gpu", action="store_true", help="accepted for the classic CLI; the device is chosen automatically")
    p.add_argument("-resume", "--resume", nargs="?", const="newest", default=None, metavar="PATH",
                   help="continue a run: alone, the newest run of -net/-att; or a last.pth or run folder")
    p.add_argument("--epochs", type=positive(int), default=None, help=f"default {settings.EPOCHS}")
    p.add_argument("--data", default=None, help=f"dataset root (default {settings.DATA_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, shuffle, augmentations (default 0)")
    p.add_argument("--workers", type=int, default=None, help="--loader workers: processes (default 4, 0 on CPU)")
    p.add_argument("--loader", choices=("device", "workers"), default=None,
                   help="device: data kept and augmented on the training device (default); "
                        "workers: torchvision transforms in DataLoader processes (the classic scripts)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None,
                   help="autocast dtype (default bf16 on GPUs and CPUs that compute it natively, else off)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default off)")
    p.add_argument("--recipe", default="paper", choices=list(settings.RECIPES), help="default paper (see README)")
    p.add_argument("--subset", type=positive(int), default=None, help="train on the first N images")
    p.add_argument("--nam-l1", type=float, default=0.0,
                   help=f"NAM's L1 strength on its BN weights (NAM's paper: {settings.NAM_L1})")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: SyncBatchNorm across ranks")
    p.add_argument("--gate-images", type=int, default=0, metavar="K",
                   help="every K epochs, log EMA's spatial gates on fixed test images to TensorBoard (0: off)")
    p.add_argument("--run-name", dest="run", default=None, help="run folder name (default: the start time)")
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR, help=f"default {settings.CHECKPOINT_DIR}/")
    p.add_argument("--log-dir", default=settings.LOG_DIR, help=f"TensorBoard root (default {settings.LOG_DIR}/)")
    args = p.parse_args(argv)
    if args.warm is not None and args.warm < 0:
        p.error("-warm must be >= 0")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if not args.nam_l1 >= 0:
        p.error("--nam-l1 must be >= 0")
    if args.gate_images < 0:
        p.error("--gate-images must be >= 0")
    return args


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
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            tqdm.write(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next check...")


def resolve_resume(args):
    """(args to run with, checkpoint or None). A resumed run takes its arguments from its checkpoint."""
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
    checkpoint = utils.load_checkpoint(path)
    saved = argparse.Namespace(**checkpoint["args"])
    for name in RESUMABLE_OVERRIDES:
        if getattr(args, name) is not None:
            setattr(saved, name, getattr(args, name))
    saved.resume = str(path)
    return saved, checkpoint


def rng_state(generator):
    return {"torch": torch.get_rng_state(), "loader": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class RunOutputs:
    """A run's checkpoints, metrics.csv and TensorBoard log. Only rank 0 writes; on the other ranks
    of a torchrun launch every method does nothing."""

    TAGS = (("Train/loss", "train_loss"), ("Train/top1", "train_top1"), ("Train/lr", "lr"),
            ("Test/loss", "test_loss"), ("Test/top1", "test_top1"), ("Test/top5", "test_top5"))

    def __init__(self, args, active: bool, purge_step):
        run_id = f"{args.net}_{args.att}"
        self.ckpt_dir = Path(args.checkpoint_dir) / run_id / args.run
        self.log_dir = Path(args.log_dir) / run_id / args.run
        self.active = active
        self.writer = None
        if not active:
            return
        for folder in (self.ckpt_dir, self.log_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None
        # The arguments in plain text, for table.py and for people; the checkpoints hold them too.
        utils.write_atomic(self.ckpt_dir / "args.json", lambda f: f.write(json.dumps(vars(args), indent=2) + "\n"),
                           text=True)
        # purge_step drops anything an earlier, interrupted process logged past the checkpoint.
        self.writer = SummaryWriter(self.log_dir, purge_step=purge_step)

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
        for name, grid in utils.ema_gate_grids(model, images, recipe, speed).items():
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


class Diverged(UserError):
    pass


def main(argv=None):
    args = parse_args(argv)
    processes = utils.Distributed.from_environment()
    where = f" (rank {processes.rank} of {processes.world})" if processes.enabled else ""
    try:
        return train(args, processes)
    except Diverged as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("\ninterrupted; the newest last.pth (if any) is from before this interruption", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        processes.close()


def train(args, processes):
    args, checkpoint = resolve_resume(args)
    args.epochs = args.epochs or settings.EPOCHS
    args.data = args.data or settings.DATA_DIR
    recipe = settings.RECIPES[args.recipe]
    args.warm = recipe["warm"] if args.warm is None else args.warm
    args.run = args.run or datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    device = processes.start()
    speed = utils.SpeedSettings.resolve(device, args.amp, args.channels_last, args.compile)
    args.amp, args.channels_last, args.compile = speed.amp, speed.channels_last, speed.compile
    args.loader = args.loader or "device"
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else 0
    sync_bn = args.sync_bn and processes.enabled
    if sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only")

    if processes.local_rank == 0:  # one download per machine, the other ranks wait for it
        utils.ensure_cifar100(args.data)
    processes.barrier()
    out = RunOutputs(args, processes.main, purge_step=checkpoint["epoch"] + 1 if checkpoint else None)
    train_set, test_set = utils.CIFAR100Folder(args.data, train=True), utils.CIFAR100Folder(args.data, train=False)
    if args.subset:
        train_set.truncate(args.subset)
    # Every rank holds the same generator state: the same epoch is drawn everywhere, then sharded.
    generator = torch.Generator(device if args.loader == "device" else "cpu")
    generator.manual_seed(args.seed)
    train_data = utils.make_loader(args.loader, train_set, args.b, recipe, device, True, args.workers, generator,
                                   processes)
    test_data = utils.make_loader(args.loader, test_set, max(args.b, 256), recipe, device, False, args.workers,
                                  processes=processes)
    steps_per_epoch = len(train_data)
    gate_batch = next(iter(test_data))[0][:8] if args.gate_images else None  # the same images every time

    torch.manual_seed(args.seed)
    model = models.create_model(args.net, args.att, settings.NUM_CLASSES)
    utils.initialise(model, recipe)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameter names: checkpoints load anywhere
    model.to(device, memory_format=speed.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=settings.MOMENTUM,
                                weight_decay=settings.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: utils.lr_factor(step, steps_per_epoch, args.warm))
    scaler = speed.grad_scaler()
    if scaler.is_enabled():  # fp16 skips the optimizer step when gradients overflow; the LR schedule still advances
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    criterion = nn.CrossEntropyLoss()
    # `model` stays the plain module: checkpoints, the graph and evaluation use it. Training steps
    # go through DDP (gradients averaged over ranks) and torch.compile when asked.
    if processes.enabled:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        step_model = model
    step_model = torch.compile(step_model) if speed.compile else step_model

    # Where to start: (epoch, step within it), with the RNG state as it was when that epoch began.
    epoch, start_step, best, history = 0, 0, {"top1": 0.0, "top5": 0.0, "epoch": 0}, []
    running = torch.zeros(3, dtype=torch.float64, device=device)  # this rank's loss sum, top-1 hits, images
    if checkpoint:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{args.resume} has checkpoint format {checkpoint.get('format')}, "
                            f"this script reads format {CHECKPOINT_FORMAT}")
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            set_rng_state(checkpoint["rng"], generator)
            epoch, start_step = checkpoint["epoch"], checkpoint["step"]
            best, history = checkpoint["best"], checkpoint["history"]
            if processes.main:  # the saved sums cover every rank of the interrupted epoch
                running = torch.tensor(checkpoint["running"], dtype=torch.float64, device=device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{args.resume} is incomplete or does not fit {args.net} + {args.att}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if epoch >= args.epochs:
            out.close()
            out.print(f"{args.resume} already finished {epoch}/{args.epochs} epochs; raise --epochs to continue")
            return 0
        out.print(f"resuming {args.resume}: epoch {epoch + 1}/{args.epochs}, step {start_step}/{steps_per_epoch}")
    else:
        out.graph(model, speed.inputs(next(iter(test_data))[0][:2]))

    def checkpoint_state(next_epoch, step, epoch_rng):
        """Everything needed to continue at (next_epoch, step); a collective under torchrun."""
        return {
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": next_epoch,
            "step": step, "rng": epoch_rng, "running": processes.sum(running.clone()).tolist(),
            "best": best, "history": history, "args": vars(args),
        }

    with StopRequest(announce=processes.main) as stop:
        n_params = utils.count_parameters(model)[0]
        launch = f"{processes.world} processes, global batch {processes.world * args.b}" if processes.enabled \
            else f"batch {args.b}"
        out.print(f"{args.net} + {args.att} ({n_params:,} parameters), recipe {args.recipe}, {args.epochs} epochs, "
                  f"{launch}, {len(train_set):,} training images, on {device}; "
                  f"checkpoints in {out.ckpt_dir}, logs in {out.log_dir}")
        started = time.time()
        steps_here, estimate_pending = 0, device.type == "cpu" and processes.main
        while epoch < args.epochs:
            epoch_rng = rng_state(generator)
            model.train()
            recent_losses, stop_signal = [], 0
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="batch", leave=False, dynamic_ncols=True, disable=not processes.main)
            epoch_start = time.time()
            for step, (images, labels) in utils.batches(train_data, start_step, epoch):
                images, labels = speed.inputs(images), labels.to(device, non_blocking=True)
                with speed.autocast():
                    logits = step_model(images)
                    loss = criterion(logits, labels)
                if args.nam_l1:
                    loss = loss + nam_l1_penalty(model, args.nam_l1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # a no-op scale unless --amp fp16
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                loss = loss.detach()
                top1 = utils.topk_correct(logits, labels, ks=(1,))[0]
                running += torch.stack([loss.double() * len(labels), top1.double(),
                                        torch.tensor(len(labels), dtype=torch.float64, device=device)])
                recent_losses.append(loss)
                bar.update()
                last_step = step + 1 == steps_per_epoch
                # Checks wait for the device, so they come every NAN_CHECK_EVERY steps; under torchrun
                # the ranks agree there on whether to stop, so that none is left waiting for the others.
                if len(recent_losses) == NAN_CHECK_EVERY or last_step or (stop.signal and not processes.enabled):
                    finite = torch.isfinite(torch.stack(recent_losses))
                    first_bad = step + 2 - len(recent_losses) + int((~finite).int().argmax()) if not finite.all() else 0
                    # One all-reduce (max) for both: the stop signal, and the earliest bad step (negated).
                    flags = torch.tensor([stop.signal or 0, -(first_bad or 2 ** 40)], device=device)
                    stop_signal, first_bad = processes.max(flags).tolist()
                    if -first_bad != 2 ** 40:
                        raise_divergence(epoch + 1, -first_bad, out.ckpt_dir)
                    recent_losses = []
                    images_per_s = (step + 1 - start_step) * args.b / (time.time() - epoch_start)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.4g}",
                                    img_s=f"{images_per_s * processes.world:.0f}")
                    if stop_signal and not last_step:
                        bar.close()
                        out.save("last.pth", checkpoint_state(epoch, step + 1, epoch_rng))
                        out.close()
                        out.print(f"saved {out.ckpt_dir / 'last.pth'} (epoch {epoch + 1}, step {step + 1}); "
                                  f"resume with:\n  {resume_command(out.ckpt_dir, processes)}")
                        return 128 + stop_signal
                steps_here += 1
                if estimate_pending and steps_here == 1:
                    first_step_done = time.time()  # the first step is slower: time the next five
                elif estimate_pending and steps_here == 6:
                    estimate_pending = False
                    epoch_min = (time.time() - first_step_done) / 5 * steps_per_epoch / 60
                    tqdm.write(f"warning: no GPU; about {epoch_min:.1f} min per epoch, "
                               f"{epoch_min * (args.epochs - epoch) / 60:.1f} h for the remaining "
                               f"{args.epochs - epoch} epochs")
            bar.close()

            loss_sum, hits, seen = processes.sum(running.clone()).tolist()
            processes.broadcast_buffers(model)
            test_stats = utils.evaluate(model, test_data, speed, processes)
            epoch += 1
            lr = optimizer.param_groups[0]["lr"]
            history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100 * hits / seen,
                            "test_loss": test_stats["loss"], "test_top1": test_stats["top1"],
                            "test_top5": test_stats["top5"], "seconds": round(time.time() - epoch_start, 2)})
            is_best = test_stats["top1"] > best["top1"]
            if is_best:
                best = {"top1": test_stats["top1"], "top5": test_stats["top5"], "epoch": epoch}
            running.zero_()
            start_step = 0
            out.log_epoch(history)
            if args.gate_images and epoch % args.gate_images == 0:
                out.gate_images(model, gate_batch, recipe, speed, epoch)
            state = checkpoint_state(epoch, 0, rng_state(generator))
            out.save("last.pth", state)
            if is_best:
                out.save("best.pth", state)
            row = history[-1]
            out.print(f"epoch {epoch}/{args.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
                      f"top-1 {row['train_top1']:.2f}  test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f} "
                      f"top-5 {row['test_top5']:.2f}  {row['seconds']:.0f}s" + ("  *best" if is_best else ""))
            if stop_signal:
                out.close()
                out.print(f"stopped after epoch {epoch}; resume with:\n  {resume_command(out.ckpt_dir, processes)}")
                return 128 + stop_signal

    final = history[-1]
    out.finish(args, final, best)
    out.print(f"done in {(time.time() - started) / 60:.1f} min. final (epoch {final['epoch']}): top-1 "
              f"{final['test_top1']:.2f} top-5 {final['test_top5']:.2f}; best (epoch {best['epoch']}, picked "
              f"on the test set): top-1 {best['top1']:.2f} top-5 {best['top5']:.2f}")
    return 0


def resume_command(ckpt_dir, processes) -> str:
    launcher = f"torchrun --nproc_per_node={processes.world}" if processes.enabled else "python"
    return f"{launcher} train_cifar100.py --resume {ckpt_dir}"


def raise_divergence(epoch, step, ckpt_dir):
    last = ckpt_dir / "last.pth"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {step}; training stopped, "
                   f"{kept}. Try a lower -lr or a warm-up (-warm 1).")


if __name__ == "__main__":
    sys.exit(main())
