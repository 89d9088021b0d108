"""The plumbing of a run that every script shares: problems reported as messages (UserError), this
process's place in a torchrun launch (Distributed), and checkpoint files (atomic writes, safe loading)."""
import contextlib
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from conf import settings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class UserError(Exception):
    """A problem with the user's input or environment: reported as a message, never a traceback."""


# ---------------------------------------------------------------- processes

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch; rank 0 of 1 without one."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self) -> torch.device:
        """Join the process group (NCCL on GPUs, gloo on CPUs); return this process's device."""
        device = default_device()
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        # device_id binds NCCL's communicator to this GPU now, not at the first collective.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
        return device

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum over all ranks."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise maximum over all ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise minimum over all ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere, so every rank evaluates the weights it saves."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)


SINGLE_PROCESS = Distributed()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- checkpoints

def write_atomic(path: Path, write, text: bool = False) -> None:
    """write(file) into a temporary file beside `path`, then rename: a crash never leaves half a file,
    and a failed write (a full disk) leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, KeyboardInterrupt):  # torch.save wraps a Ctrl-C inside its writes
            raise e.__context__ from None
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}; "
                            f"the previous {path.name}, if any, is unchanged") from None
        raise


def folders_to_make(path: Path) -> list[Path]:
    """The folders that making `path` would create, deepest first."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_empty(folders) -> None:
    """Remove those of these folders (deepest first) that are empty: what a failed start made."""
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


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
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def save_atomic(obj, path: Path) -> None:
    """torch.save, atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run folder's last.pth."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return path


def load_trained_model(weights, net=None, att=None):
    """(model on the CPU with the checkpoint's weights, checkpoint, path). `net`/`att` default to the
    checkpoint's own; given, they must match it. A checkpoint of another repo's script (see
    upstream_checkpoints.py) records no net/att: both are then required, and the returned checkpoint
    only describes it (args net/att/recipe, epoch or None, layout). Every checkpoint has "layout", the
    detected layout in words."""
    import models  # here, not at the top: models does not need utils, utils only needs models for this
    import upstream_checkpoints  # here too: it builds on this module

    path = checkpoint_file(weights)
    checkpoint = load_checkpoint(path, ours_only=False)
    if not upstream_checkpoints.is_ours(checkpoint):
        model, description = upstream_checkpoints.trained_model(checkpoint, path, net, att)
        return model, description, path
    saved = checkpoint["args"]
    if (not isinstance(saved, dict) or saved.get("net") not in models.list_models()
            or saved.get("att") not in models.list_attentions() or saved.get("recipe") not in settings.RECIPES):
        shown = {key: saved.get(key) for key in ("net", "att", "recipe")} if isinstance(saved, dict) else saved
        raise UserError(f"{path}: its recorded arguments name no known network, attention and recipe ({shown})")
    net, att = net or saved["net"], att or saved["att"]
    if (net, att) != (saved["net"], saved["att"]):
        raise UserError(f"{path} holds {saved['net']} + {saved['att']}, not the requested {net} + {att}")
    model = models.create_model(net, att, settings.NUM_CLASSES)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit {net} + {att}: {str(e).splitlines()[0]}") from None
    checkpoint["layout"] = upstream_checkpoints.describe_ours(checkpoint)
    return model, checkpoint, path


def load_checkpoint(path, ours_only: bool = True):
    """Read a checkpoint with weights_only=True: a file that needs arbitrary code to unpickle is
    refused, never executed. With ours_only=False, whatever the file holds is returned, for
    upstream_checkpoints.py to recognise; otherwise anything but one of this repo's is refused."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs_code = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not needs_code:
            raise UserError(f"cannot read checkpoint {path}: not a valid checkpoint file (corrupt?)") from None
        raise UserError(f"refused to load {path}: it holds objects that only arbitrary code could rebuild "
                        f"({needs_code[0]}); checkpoints are read with weights_only=True") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    import upstream_checkpoints  # here, not at the top: it builds on this module

    if ours_only and not upstream_checkpoints.is_ours(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this repo (no model weights and arguments)")
    return checkpoint
