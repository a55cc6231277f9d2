"""Benchmark results: targets, JSON files under experiments/benchmarks/, and a printed table."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssd_lightning.benchmark.timing import Stats

TARGET_KINDS = ("max_ratio", "min_speedup", "min_images_per_s", "max_latency_ms")


@dataclass(frozen=True)
class Target:
    """A goal of the performance issue; `applies=False` records it without judging (a GPU goal on CPU)."""

    description: str
    kind: str
    value: float
    applies: bool = True

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; one of {TARGET_KINDS}")


@dataclass
class Result:
    """One measured figure: our time per call, torchvision's for the same work (if any), and context.

    `images_per_call` turns times into images/s. `metrics` holds figures measured outside our timer (the
    data pipeline's and the end-to-end run's own reports); `skipped` says why nothing was measured.
    """

    benchmark: str
    config: dict[str, Any]
    ours: Stats | None = None
    theirs: Stats | None = None
    images_per_call: int | None = None
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        """Our median time / torchvision's (below 1: we are faster)."""
        if self.ours is None or self.theirs is None:
            return None
        return self.ours.median_s / self.theirs.median_s

    def target_met(self, target: Target) -> bool | None:
        if not target.applies or self.ours is None:
            return None
        ratio = self.ratio
        if target.kind == "max_ratio":
            return None if ratio is None else ratio <= target.value
        if target.kind == "min_speedup":
            return None if ratio is None else 1.0 / ratio >= target.value
        if target.kind == "min_images_per_s":
            return (
                self.images_per_call is not None and self.images_per_call / self.ours.median_s >= target.value
            )
        return self.ours.median_s * 1e3 <= target.value  # max_latency_ms

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "benchmark": self.benchmark,
            "config": self.config,
            "images_per_call": self.images_per_call,
            "ours": self.ours.to_json(self.images_per_call) if self.ours else None,
            "theirs": self.theirs.to_json(self.images_per_call) if self.theirs else None,
            "ratio": ratio,
            "speedup": None if ratio is None else 1.0 / ratio,
            # Fastest sample over fastest sample: the least disturbed estimate on a busy machine.
            "ratio_of_min": None if ratio is None else self.ours.min_s / self.theirs.min_s,
            "targets": [
                {
                    "description": t.description,
                    "kind": t.kind,
                    "value": t.value,
                    "applies": t.applies,
                    "met": self.target_met(t),
                }
                for t in self.targets
            ],
            "metrics": self.metrics,
            "extra": self.extra,
            "skipped": self.skipped,
        }


def write_report(
    out_dir: Path, command: str, argv: list[str], machine: dict[str, Any], results: list[Result], tag: str
) -> Path:
    """One JSON file per run: <UTC time>_<command>_<device tag>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"{stamp}_{command}_{tag}.json"
    counter = 1
    while path.exists():  # two runs within a second
        path = out_dir / f"{stamp}_{command}_{tag}_{counter}.json"
        counter += 1
    document = {
        "suite": "ssd_lightning.benchmark",
        "command": command,
        "argv": argv,
        "created_utc": stamp,
        "machine": machine,
        "results": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(_finite(document), indent=2, allow_nan=False, default=str) + "\n")
    return path


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged loss, say) become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


_CONFIG_KEYS = (
    "arch",
    "size",
    "batch",
    "precision",
    "channels_last",
    "cudnn_benchmark",
    "optimizer",
    "compile",
    "scores",
    "reference",
    "passes",
    "workers",
    "steps",
)
# Values not worth a column: the defaults.
_QUIET = {("arch", "vgg16"), ("optimizer", "default"), ("reference", "same")}
_THROUGHPUT_BENCHMARKS = ("train-step", "inference-throughput")


def _config_text(config: dict[str, Any]) -> str:
    parts = []
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if value is None or value is False or (key, value) in _QUIET:
            continue
        parts.append(key.replace("_", "-") if value is True else f"{key}={value}")
    return " ".join(parts)


def _figure(result: Result, stats: Stats | None) -> str:
    if stats is None:
        return "-"
    if result.benchmark in _THROUGHPUT_BENCHMARKS and result.images_per_call:
        return f"{result.images_per_call / stats.median_s:,.1f} img/s"
    return f"{stats.median_s * 1e3:,.2f} ms"


def format_table(results: list[Result]) -> str:
    """A plain-text table: benchmark, config, ours, theirs, time ratio, targets."""
    rows = [("benchmark", "config", "ours", "torchvision", "ours/theirs time", "target")]
    for result in results:
        if result.skipped:
            reason = " ".join(result.skipped.split())  # full text in the JSON
            reason = reason if len(reason) <= 100 else reason[:97] + "..."
            rows.append((result.benchmark, _config_text(result.config), "skipped", "", "", reason))
            continue
        if result.ours is None and result.metrics:
            headline, notes = _metrics_text(result.metrics)
            rows.append((result.benchmark, _config_text(result.config), headline, "-", "-", notes))
            continue
        ratio = result.ratio
        verdicts = []
        for target in result.targets:
            met = result.target_met(target)
            mark = "n/a" if met is None else ("MET" if met else "MISSED")
            verdicts.append(f"{target.description}: {mark}")
        rows.append(
            (
                result.benchmark,
                _config_text(result.config),
                _figure(result, result.ours),
                _figure(result, result.theirs),
                "-" if ratio is None else f"{ratio:.2f}x",
                "; ".join(verdicts),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _metrics_text(metrics: dict[str, Any]) -> tuple[str, str]:
    """Figures measured outside our timer (data pipeline, end-to-end run): headline and notes."""
    notes = []
    if "images_per_s_per_worker_cpu_time" in metrics:
        headline = f"{metrics['images_per_s_per_worker_cpu_time']:,.1f} img/s/worker"
        if "loader_images_per_s" in metrics:
            notes.append(
                f"DataLoader x{metrics['loader_workers']}: {metrics['loader_images_per_s']:,.1f} img/s"
            )
    else:
        headline = f"{metrics.get('images_per_s', 0.0):,.1f} img/s"
    if "data_wait_fraction" in metrics:
        notes.append(f"waiting for data {100 * metrics['data_wait_fraction']:.1f}% of the time")
    if "gpu_util_mean" in metrics:
        notes.append(f"GPU util {metrics['gpu_util_mean']:.0f}%")
    return headline, "; ".join(notes)
