"""The two data-parallel facts the math needs: how many ranks there are, and a sum over them.

Both fall back to the single-process answer when no process group is initialised, so every
function taking `distributed=True` also works in a notebook.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the input is left as it was)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
