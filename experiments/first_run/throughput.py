"""A Lightning callback that records where a run's time goes, for the first-run recipe search.

Add it to a run with ``+callbacks.throughput._target_=experiments.first_run.throughput.Throughput``
(``python train.py`` puts the repository root on ``sys.path``). It writes ``throughput.json`` next to
``metrics.json``: training time (batches and the data wait between them, validation excluded), images
trained per second, validation and test time, and the load average, so runs on a busy shared machine
can be compared by work done rather than by wall time alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Accumulates train / validation / test seconds and the number of training images."""

    def __init__(self, filename: str = "throughput.json") -> None:
        self.filename = filename
        self.train_s = 0.0
        self.val_s = 0.0
        self.test_s = 0.0
        self.images = 0
        self.steps = 0
        self._epoch_start = 0.0
        self._last_batch_end = 0.0
        self._stage_start = 0.0
        self._fit_start = 0.0
        self._load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._epochs: list[dict[str, float]] = []
        self._clock: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._load_start = os.getloadavg()
        self._clock["fit_start"] = time.time()  # wall-clock times: the caller times what lies around them

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_images = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        # time since the previous batch ended: waiting for data + forward/backward/step
        self.train_s += now - self._last_batch_end
        self._last_batch_end = now
        count = len(batch[0])
        self.images += count
        self._epoch_images += count
        self.steps += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs.append(
            {"seconds": round(self._last_batch_end - self._epoch_start, 2), "images": self._epoch_images}
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_s += time.perf_counter() - self._stage_start

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start = time.perf_counter()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.test_s += time.perf_counter() - self._stage_start
        self._clock["test_end"] = time.time()
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock["fit_end"] = time.time()
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        record = {
            "fit_s": round(time.perf_counter() - self._fit_start, 2),
            "train_s": round(self.train_s, 2),
            "val_s": round(self.val_s, 2),
            "test_s": round(self.test_s, 2),
            "train_images": self.images,
            "steps": self.steps,
            "images_per_s": round(self.images / max(self.train_s, 1e-9), 1),
            "load_at_fit_start": [round(v, 2) for v in self._load_start],
            "load_now": [round(v, 2) for v in os.getloadavg()],
            "epochs": self._epochs,
            "clock": self._clock,
        }
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.filename).write_text(json.dumps(record, indent=2))
