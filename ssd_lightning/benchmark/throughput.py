"""A Lightning callback that measures a real training run: images/s, and how each step's wall time splits
between waiting for the next batch and everything else (forward, loss, backward, optimiser).

The end-to-end benchmark adds it to `train.py` through a Hydra override. No device synchronisation is
added: the host-side wait for data is what shows whether a run is input-bound (a GPU-bound run spends its
host time queueing and waiting on the GPU, not on the DataLoader).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Times training steps after the first `skip_steps`; writes a JSON summary to `output` at the end."""

    def __init__(self, output: str, skip_steps: int = 20) -> None:
        super().__init__()
        self.output = Path(output)
        self.skip_steps = skip_steps
        self._step = 0
        self._last_end: float | None = None
        self._start = 0.0
        self._first_timed_start: float | None = None
        self._waits: list[float] = []
        self._computes: list[float] = []
        self._images = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._step >= self.skip_steps and self._last_end is not None:
            self._waits.append(now - self._last_end)
            if self._first_timed_start is None:
                self._first_timed_start = self._last_end
        self._start = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._step >= self.skip_steps and self._first_timed_start is not None:
            self._computes.append(now - self._start)
            self._images += len(batch[0])
        self._last_end = now
        self._step += 1

    def summary(self) -> dict[str, Any]:
        """The figures so far (empty when no step was timed)."""
        if not self._computes or self._first_timed_start is None or self._last_end is None:
            return {"steps": self._step, "timed_steps": 0}
        wall = self._last_end - self._first_timed_start
        waits, computes = self._waits[: len(self._computes)], self._computes
        return {
            "steps": self._step,
            "timed_steps": len(computes),
            "images": self._images,
            "images_per_s": self._images / wall,
            "step_ms_median": statistics.median(w + c for w, c in zip(waits, computes, strict=True)) * 1e3,
            "data_wait_ms_median": statistics.median(waits) * 1e3,
            "data_wait_ms_mean": statistics.fmean(waits) * 1e3,
            "compute_ms_median": statistics.median(computes) * 1e3,
            "data_wait_fraction": sum(waits) / wall,
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(self.summary(), indent=2) + "\n")
