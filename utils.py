"""The plumbing that every script shares: problems reported as messages (UserError), this process's
place in a torchrun launch (Distributed), and files written atomically (a temporary file, then a
rename), checkpoints included. Reading checkpoints: checkpoints.py."""
import contextlib
import errno
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


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
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_RANK", 0)))

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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=10),
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
        """Rank 0's BatchNorm statistics everywhere, so every rank evaluates the weights it
        saves."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)


SINGLE_PROCESS = Distributed()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- files

def write_atomic(path: Path, write, text: bool = False, tmp: Path = None,
                 rename: bool = True) -> Path:
    """write(file) into a temporary file beside `path` (`tmp`, or path.tmp), then rename: a crash
    never leaves half a file, and a failed write (a full disk) leaves no temporary file behind.
    rename=False leaves the renaming to the caller; the temporary file is returned."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if rename:
            os.replace(tmp, path)
        return tmp
    except BaseException as e:
        # Measured while the temporary file still fills the disk.
        why = why_not_written(e, path, tmp) if isinstance(e, (OSError, RuntimeError)) else None
        tmp.unlink(missing_ok=True)
        # torch.save wraps a Ctrl-C inside its writes
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        if why:  # torch.save reports a failed write as RuntimeError
            raise UserError(f"cannot write {path}: {why}; the previous {path.name}, if any, is "
                            f"unchanged") from None
        raise


def why_not_written(error: Exception, path: Path, tmp: Path) -> str:
    """A failed write in words: a full disk as such (torch.save says "unexpected pos"), with how
    much was needed where that is known (the previous file of that name) and how much is free."""
    written = tmp.stat().st_size if tmp.exists() else 0
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno",
                   None) == errno.ENOSPC or free is not None and free < max(written, 2 ** 20)
    if not full:
        return getattr(error, "strerror", None) or str(error).splitlines()[0]
    megabytes = lambda n: f"{n / 2 ** 20:.1f} MB"
    # What is needed is known only from an earlier file of the name; else what was written before
    # the disk filled, which is less.
    if path.is_file():
        size = f"about {megabytes(path.stat().st_size)} needed, "
    else:
        size = f"{megabytes(written)} written before it filled, " if written else ""
    return (f"no space left on device ({size}{megabytes(free) if free is not None else 'unknown'} "
            f"free in {path.parent})")


def folders_to_make(path: Path) -> list[Path]:
    """The folders that making `path` would create, deepest first."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_empty(folders) -> None:
    """Remove those of these folders (deepest first) that are empty: what a failed start made."""
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def save_atomic(obj, path: Path) -> None:
    """torch.save, atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))
