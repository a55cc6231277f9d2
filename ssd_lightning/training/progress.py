"""Progress on the console: a bar in a terminal, a line every few seconds in a log file (CI, nohup, SLURM).

tqdm writes one line per refresh when its output is not a terminal, which floods log files; Lightning's
progress-bar API lets a plain logging callback take the bar's place there.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("ssd_lightning.progress")


class ProgressLog(ProgressBar):
    """One log line at most every `interval_s` seconds: stage, epoch, step of the epoch, rate, metrics. The
    first step of a run always has its line. `clock` gives seconds (tests pass their own)."""

    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._enabled = True
        self._last = -math.inf
        self._start = 0.0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step = self.clock(), 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self.clock()
        if not self._enabled or now - self._last < self.interval_s:
            return
        self._last = now
        batch_size = getattr(trainer.datamodule, "batch_size", 0) or 0
        images = (batch_idx + 1 - self._start_step) * batch_size
        rate = f", {images / max(now - self._start, 1e-9):.1f} img/s" if images else ""
        metrics = ", ".join(
            f"{k} {v:.3f}" for k, v in self.get_metrics(trainer, pl_module).items() if isinstance(v, float)
        )
        log.info(
            "epoch %d/%s step %d/%s%s%s",
            trainer.current_epoch + 1,
            trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "-",
            batch_idx + 1,
            int(self.total_train_batches) if self.total_train_batches != float("inf") else "?",
            rate,
            f" | {metrics}" if metrics else "",
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            log.info("epoch %d: validating", trainer.current_epoch + 1)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            log.info("testing")


def progress_bar(
    refresh_rate: int = 10, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic
) -> ProgressBar:
    """tqdm's bar when the console is a terminal, else a `ProgressLog` line every `interval_s` seconds."""
    if sys.stderr.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return ProgressLog(interval_s, clock)
