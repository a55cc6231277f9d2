"""What follows the global batch when a run moves to more (or fewer) devices: the learning rate and the
schedule's step counts (`scale_lr=true`), and BatchNorm statistics synchronised over devices that each see
only a few images.

A schedule counted in optimiser steps (the paper's 120k iterations) is written for one global batch
(`schedule.global_batch_size`, 32); at 64 images per step the same steps are twice the epochs. With
`scale_lr=true` the lr follows the batch linearly (Goyal et al. 2017) and every step count follows it
inversely, so the run sees the recipe's number of epochs; fractions of the run and epoch counts need nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

#: Schedule keys that count optimiser steps (conf/schedule/).
STEP_KEYS = ("max_steps", "lr_steps", "warmup_steps", "val_every_n_steps", "checkpoint_every_n_steps")
#: Below this many images per device, BatchNorm statistics are synchronised over the devices
#: (`trainer.sync_batchnorm: auto`): Wu & He, "Group Normalization" (2018), fig. 1, show BatchNorm's error
#: growing once each device normalises fewer than 16 images.
SYNC_BATCHNORM_BELOW = 16


def _scaled(value: Any, factor: float) -> Any:
    """A step count times `factor` (at least 1); fractions of the run (floats < 1), -1, 0 and None stay."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_scaled(v, factor) for v in value]
    if isinstance(value, int) or (isinstance(value, float) and value >= 1 and value.is_integer()):
        return max(1, round(value * factor)) if value > 0 else value
    return value


def scale_schedule(schedule: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """The step counts of `schedule` (STEP_KEYS) times `factor`; other keys as they are."""
    return {key: _scaled(value, factor) if key in STEP_KEYS else value for key, value in schedule.items()}


def describe_scaling(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """`max_steps 120000 -> 60000, lr_steps [80000, 100000] -> [40000, 50000], ...`: the changed keys."""
    return ", ".join(
        f"{key} {before[key]} -> {after[key]}" for key in STEP_KEYS if before.get(key) != after.get(key)
    )


def has_batchnorm(network: nn.Module) -> bool:
    """Whether `network` has BatchNorm layers that train (a frozen backbone's do not)."""
    return any(
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(p.requires_grad for p in module.parameters())
        for module in network.modules()
    )


def wants_sync_batchnorm(
    network: nn.Module, processes: int, per_device: int, on_gpu: bool
) -> tuple[bool, str]:
    """`trainer.sync_batchnorm: auto`: synchronise BatchNorm over the devices when the network has BatchNorm,
    runs on several GPUs (torch's SyncBatchNorm has no CPU kernels) and each sees fewer than
    SYNC_BATCHNORM_BELOW images. Returns the decision and why."""
    if processes < 2 or not on_gpu:
        return False, "one process" if processes < 2 else "not on GPUs, which SyncBatchNorm needs"
    if not has_batchnorm(network):
        return False, "the network has no BatchNorm that trains"
    if per_device >= SYNC_BATCHNORM_BELOW:
        return False, f"{per_device} images per device (>= {SYNC_BATCHNORM_BELOW})"
    return (
        True,
        f"BatchNorm network, {per_device} images per device (< {SYNC_BATCHNORM_BELOW}) on {processes} GPUs",
    )
