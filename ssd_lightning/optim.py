"""Optimiser parameter groups and learning-rate schedules (linear warmup + multi-step or cosine decay).

The schedules are compositions of torch's own schedulers; only the step arithmetic (milestones given as
fractions of the run) is ours. They step once per optimiser step (Lightning `interval="step"`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)


def parameter_groups(
    model: nn.Module, backbone: nn.Module | None = None, backbone_lr_mult: float = 1.0
) -> list[dict]:
    """Named parameter groups: weights (the optimiser's weight decay) and 1-D parameters with weight decay 0,
    and the same two for `backbone` with `lr_mult = backbone_lr_mult` when it differs from 1.

    The 1-D parameters are the biases, the L2Norm scale and BatchNorm affine parameters: decaying a
    scale towards 0 only fights the normalisation it parametrises. Frozen parameters are left out. Apply
    the multipliers to the optimiser with `apply_lr_mults`.
    """
    in_backbone = (
        {id(p) for p in backbone.parameters()} if backbone is not None and backbone_lr_mult != 1 else set()
    )
    groups: dict[str, dict] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        name = ("backbone_" if id(parameter) in in_backbone else "") + (
            "norm_bias" if parameter.ndim <= 1 else "weight"
        )
        group = groups.setdefault(name, {"name": name, "params": []})
        group["params"].append(parameter)
        if parameter.ndim <= 1:
            group["weight_decay"] = 0.0
        if id(parameter) in in_backbone:
            group["lr_mult"] = backbone_lr_mult
    return list(groups.values())


def apply_lr_mults(optimizer: Optimizer) -> Optimizer:
    """Each group's lr times its `lr_mult` (before any scheduler records the initial lrs)."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_mult", 1.0)
    return optimizer


def resolve_steps(value: float, total_steps: float | None, name: str) -> int:
    """`value` as a number of steps: an int is taken as is, a float in (0, 1) as a fraction of the run."""
    if isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{name}={value!r}: expected a step count (int >= 0) or a fraction of the run in (0, 1)"
        )
    if isinstance(value, int) or float(value).is_integer():
        return int(value)
    if not 0 < value < 1:
        raise ValueError(
            f"{name}={value!r}: a fraction of the run must lie in (0, 1); give steps as an integer"
        )
    if total_steps is None or total_steps == float("inf"):
        raise ValueError(
            f"{name}={value!r} is a fraction of the run, but the run has no finite length: "
            "set trainer.max_steps or trainer.max_epochs, or give the value in steps"
        )
    return max(1, round(value * total_steps))


def _warmup(optimizer: Optimizer, warmup_steps: int, start_factor: float) -> LinearLR | None:
    if warmup_steps == 0:
        return None  # LinearLR with total_iters=0 would leave the lr at start_factor for good
    if not 0 < start_factor <= 1:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {start_factor}")
    return LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: float | None = None,
    *,
    milestones: Sequence[float],
    gamma: float = 0.1,
    warmup_steps: float = 0,
    warmup_start_factor: float = 1 / 3,
) -> LRScheduler:
    """Linear warmup from `warmup_start_factor * lr`, then lr *= gamma at each milestone (as in the paper).

    Milestones and warmup are optimiser steps from the start of training (ints) or fractions of
    `total_steps` (floats in (0, 1)).
    """
    steps = sorted(resolve_steps(m, total_steps, "scheduler.milestones") for m in milestones)
    decay = MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    warmup = _warmup(
        optimizer, resolve_steps(warmup_steps, total_steps, "scheduler.warmup_steps"), warmup_start_factor
    )
    # Both are multiplicative, so chaining them keeps the milestones absolute (SequentialLR would shift them).
    return decay if warmup is None else ChainedScheduler([warmup, decay], optimizer=optimizer)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: float | None = None,
    *,
    warmup_steps: float = 0,
    warmup_start_factor: float = 1 / 3,
    min_lr_factor: float = 0.0,
) -> LRScheduler:
    """Linear warmup, then cosine decay of each group's lr to `min_lr_factor` x its own at the last step."""
    if total_steps is None or total_steps == float("inf"):
        raise ValueError(
            "the cosine schedule needs a finite run: set trainer.max_steps or trainer.max_epochs"
        )
    total = int(total_steps)
    warmup_count = resolve_steps(warmup_steps, total, "scheduler.warmup_steps")
    if not float(warmup_steps).is_integer():  # a fraction never takes the whole run (fast_dev_run: 1 step)
        warmup_count = min(warmup_count, total - 1)
    if warmup_count >= total:
        raise ValueError(
            f"scheduler.warmup_steps ({warmup_count}) must be shorter than the run ({total} steps)"
        )
    decay_steps = total - warmup_count

    def cosine_factor(step: int) -> float:
        # A factor of each group's own lr (CosineAnnealingLR's eta_min is one absolute value for all groups).
        progress = min(step, decay_steps) / decay_steps
        return min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    cosine = LambdaLR(optimizer, cosine_factor)
    warmup = _warmup(optimizer, warmup_count, warmup_start_factor)
    if warmup is None:
        return cosine
    return SequentialLR(optimizer, schedulers=[warmup, cosine], milestones=[warmup_count])
