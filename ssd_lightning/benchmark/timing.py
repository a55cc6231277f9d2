"""Interleaved wall-clock timing of several callables, with device synchronisation.

Hand-written rather than `torch.utils.benchmark.Timer` because the Timer measures one statement at a time:
here ours and torchvision's alternate sample by sample (in rotating order), so background load on a shared
machine, clock boost or thermal drift lands on both sides alike instead of biasing the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median and spread over `repeats` samples, each the mean of `number` calls."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int
    warmup: int

    def to_json(self, images_per_call: int | None = None) -> dict[str, float | int]:
        """Milliseconds (and images/s when a call processes `images_per_call` images)."""
        out: dict[str, float | int] = {
            "median_ms": self.median_s * 1e3,
            "q1_ms": self.q1_s * 1e3,
            "q3_ms": self.q3_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "max_ms": self.max_s * 1e3,
            "repeats": self.repeats,
            "number": self.number,
            "warmup": self.warmup,
        }
        if images_per_call:
            out["images_per_s"] = images_per_call / self.median_s
        return out


def summarise(samples: list[float], number: int, warmup: int) -> Stats:
    """Median/quartiles of per-call times (`samples` already divided by `number`)."""
    if not samples:
        raise ValueError("no timing samples: repeats must be >= 1")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Stats(
        median_s=statistics.median(ordered),
        q1_s=q1,
        q3_s=q3,
        min_s=ordered[0],
        max_s=ordered[-1],
        repeats=len(ordered),
        number=number,
        warmup=warmup,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    functions: Mapping[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    number: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each callable: `warmup` untimed calls each, then `repeats` samples of `number`
    calls. Samples are interleaved and the order rotates every repeat (A B, B A, ...), so slow phases of a
    busy machine are shared."""
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, number >= 1, warmup >= 0; got {repeats}, {number}, {warmup}")
    names = list(functions)
    for name in names:
        for _ in range(warmup):
            functions[name]()
        synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            function = functions[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(number):
                function()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def measure(
    functions: Mapping[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    number: int = 1,
) -> dict[str, Stats]:
    """`interleaved_samples` summarised: median and spread of the seconds per call of each name."""
    samples = interleaved_samples(functions, device, warmup, repeats, number)
    return {name: summarise(samples[name], number, warmup) for name in functions}
