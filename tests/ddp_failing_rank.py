"""train_cifar100.py with rank 1 failing at its third loss: it raises (FAIL=raise) or returns NaN
(FAIL=nan). For the torchrun failure tests."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cifar100  # noqa: E402

real_cross_entropy, calls = torch.nn.functional.cross_entropy, []


def failing_cross_entropy(*args, **kwargs):
    calls.append(1)
    loss = real_cross_entropy(*args, **kwargs)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        if os.environ["FAIL"] == "raise":
            raise RuntimeError("injected failure on rank 1")
        return loss * float("nan")
    return loss


torch.nn.functional.cross_entropy = failing_cross_entropy
sys.exit(train_cifar100.main())
