"""How the images of one optimiser step split over processes: the global batch, the batch of each device.

A run states its global batch (`dataset.global_batch_size`, the paper's 32) or its per-device batch
(`dataset.batch_size`); the other follows from devices x nodes x accumulated batches. A global batch that
does not divide over them is rounded to the nearest one that does (at least one image per device), and the
plan says so: the caller warns with what that means for the learning rate and the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """`per_device` images on each of `processes` (devices x nodes) for `accumulate` batches per optimiser
    step: `global_batch` images per step. `requested` is the global batch the config asked for (None when it
    gave the per-device batch)."""

    per_device: int
    devices: int
    nodes: int
    accumulate: int
    requested: int | None

    @property
    def processes(self) -> int:
        return self.devices * self.nodes

    @property
    def global_batch(self) -> int:
        return self.per_device * self.processes * self.accumulate

    @property
    def rounded(self) -> bool:
        """The requested global batch did not divide over the processes and was changed."""
        return self.requested is not None and self.requested != self.global_batch

    def describe(self) -> str:
        """`global batch 32 = 4 devices x 8 images (dataset.global_batch_size)`, as logged at start."""
        parts = [f"{self.nodes} nodes"] if self.nodes > 1 else []
        parts.append(f"{self.devices} device{'s' if self.devices > 1 else ''}")
        parts += [f"{self.accumulate} accumulated batches"] if self.accumulate > 1 else []
        source = "dataset.batch_size per device" if self.requested is None else "dataset.global_batch_size"
        if self.rounded:
            source = f"dataset.global_batch_size={self.requested} rounded to divide over the processes"
        images = f"{self.per_device} image{'s' if self.per_device > 1 else ''}"
        return f"global batch {self.global_batch} = {' x '.join(parts)} x {images} ({source})"


def plan_batch(
    global_batch: int | None,
    per_device: int | None,
    devices: int = 1,
    nodes: int = 1,
    accumulate: int = 1,
    round_up: bool = False,
) -> BatchPlan:
    """The batch plan for `devices` x `nodes` processes accumulating `accumulate` batches per step.

    `per_device` wins when given. A `global_batch` that does not divide over devices x nodes x accumulate
    becomes the nearest multiple that does (ties and anything below one image per device: the larger), or,
    with `round_up` (evaluation, where only the batch's size matters), the next larger one."""
    if per_device is not None:
        return BatchPlan(int(per_device), devices, nodes, accumulate, None)
    if global_batch is None:
        raise ValueError("set dataset.global_batch_size (all devices) or dataset.batch_size (per device)")
    parts = devices * nodes * accumulate
    lower, upper = global_batch // parts, -(-global_batch // parts)
    nearest_is_lower = lower >= 1 and global_batch - lower * parts < upper * parts - global_batch
    chosen = lower if nearest_is_lower and not round_up else upper
    return BatchPlan(chosen, devices, nodes, accumulate, int(global_batch))
