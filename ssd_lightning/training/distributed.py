"""Agreement between DDP ranks on a per-rank flag, on the device (no host synchronisation of its own)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_ranks_max(value: Tensor) -> Tensor:
    """`value` replaced by its maximum over the processes of the default group (a no-op outside DDP). NCCL
    queues the reduction on the device's stream: reading the result is what waits for it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_ranks_values(value: Tensor) -> Tensor:
    """Every rank's `value` (a 0-d tensor), indexed by rank: `[value]` outside DDP."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value.reshape(1)
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    return torch.stack(gathered)
