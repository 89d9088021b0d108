"""The steps of training that train_cifar100.py, test.py and benchmark.py share: one training step,
the watch for a diverged loss, the running totals, evaluation, and the CPU's time estimate.

Nothing in a training step or an evaluation batch reads a value back from the device: losses and
hit counts stay there, and are read only where the caller chooses to wait (every few dozen steps).
"""
import torch
from torch import nn

from training.speed import SpeedSettings
from utils import SINGLE_PROCESS, Distributed, UserError


def train_step(step_model: nn.Module, images, labels, loss_function, optimizer, scaler,
               speed: SpeedSettings):
    """One optimizer step on a batch: (loss, top-1 hits), left on the device: nothing here waits
    for it. `loss_function(logits, labels)`: the recipe's (training/recipes.py)."""
    # Gradients freed before the forward: no memory held through it, and no CUDA-graph output of
    # the last step alive when the next one replays.
    optimizer.zero_grad(set_to_none=True)
    with speed.autocast():
        logits = step_model(images)
        loss = loss_function(logits, labels)
    scaler.scale(loss).backward()  # a no-op scale unless --amp fp16
    scaler.step(optimizer)  # skipped by an enabled scaler when fp16 gradients overflowed
    scaler.update()
    return loss.detach(), topk_correct(logits.detach(), labels, ks=(1,))[0]


class Diverged(UserError):
    pass


class LossWatch:
    """The step losses since the last check, kept on the device, and at each check the verdict.

    Training has diverged at the first non-finite loss. Under fp16 the gradient scaler skips a step
    whose gradients overflow and lowers its scale, so there only a loss that stays non-finite for
    `tolerated` + 1 steps in a row is divergence.
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


def raise_divergence(epoch, step, ckpt_dir):
    last = ckpt_dir / "last.pth"
    kept = (f"the last good checkpoint is {last}" if last.exists()
            else "no checkpoint was written yet")
    raise Diverged(
        f"the loss became NaN or infinite at epoch {epoch}, step {step}; training stopped, "
        f"{kept}. Try a lower -lr or a warm-up (-warm 1).")


def best_after(best: dict, row: dict) -> tuple[dict, bool]:
    """(the best epoch after this epoch's `row`, whether it is this one). The best is picked on the
    validation split with --val, else on the test set; the first epoch is the best so far."""
    picked = row.get("val_top1", row["test_top1"])
    if picked > best.get("picked", best["top1"]) or not best["epoch"]:
        return {"top1": row["test_top1"], "top5": row["test_top5"], "epoch": row["epoch"],
                "picked": picked}, True
    return best, False


class RunningTotals:
    """An epoch's loss sum and top-1 hits, kept on the device, and its image count, kept in
    Python."""

    def __init__(self, device, loss_sum: float = 0.0, hits: float = 0.0, images: int = 0):
        self.sums = torch.tensor([loss_sum, hits], dtype=torch.float64, device=device)
        self.images = images

    def add(self, loss: torch.Tensor, hits: torch.Tensor, images: int) -> None:
        self.sums[0].add_(loss, alpha=images)
        self.sums[1].add_(hits)
        self.images += images

    def read(self, processes: Distributed = SINGLE_PROCESS) -> list[float]:
        """[loss sum, hits, images] over every rank; waits for the device."""
        device = self.sums.device
        return processes.sum(torch.cat([self.sums, torch.tensor([self.images], dtype=torch.float64,
                                                                device=device)])).tolist()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of images whose label is among the top-k predictions, for each k (as tensors); with
    fewer than k classes (a small --dataset folder), every image's."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, speed: SpeedSettings,
             processes: Distributed = SINGLE_PROCESS) -> dict:
    """Mean loss per image and top-1/top-5 accuracy (%) over the loader; under torchrun, over every
    rank's shard (the shards cover the test set once). Reads the device once, at the end."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=speed.device)  # loss, top-1, top-5
    images = 0
    for batch, labels in loader:
        batch, labels = speed.inputs(batch), labels.to(speed.device, non_blocking=True)
        with speed.autocast():
            logits = model(batch)
        top1, top5 = topk_correct(logits, labels)
        sums[0].add_(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        sums[1].add_(top1)
        sums[2].add_(top5)
        images += len(labels)
    totals = torch.cat([sums, torch.tensor([images], dtype=torch.float64, device=speed.device)])
    loss_sum, top1, top5, n = processes.sum(totals).tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def cpu_estimate(epoch_seconds: float, epochs: int) -> str:
    """The warning a CPU run prints once: how long an epoch and the rest of the run take."""
    def span(seconds):
        if seconds >= 2 * 86400:
            return f"{seconds / 86400:.1f} days"
        if seconds >= 3600:
            return f"{seconds / 3600:.1f} h"
        if seconds >= 60:
            return f"{seconds / 60:.1f} min"
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    plural = "s" if epochs != 1 else ""
    rest = f"{span(epoch_seconds * epochs)} for the remaining {epochs} epoch{plural}"
    return f"warning: no GPU; about {span(epoch_seconds)} per epoch, {rest}"
