"""Lightning callbacks: `last.ckpt` that always holds the end of training, and a picture of the final model's
detections on test images (the W&B panel of validation images is in `wandb_logging`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor
from torchvision.io import write_png

from ssd_lightning.training.wandb_logging import log_picture
from ssd_lightning.visualize import DISPLAY_THRESHOLD, batch_samples, draw_detections, image_grid, upscale


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimiser steps (what a crashed run resumes from) and once more
    when training ends: Lightning's own `save_last` skips the end when it falls between two saves.

    Saving from the callback, inside the training processes, keeps the full loop state under DDP spawn too.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 100) -> None:
        super().__init__(
            dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)


class TestDetectionsPicture(pl.Callback):
    """After each test pass, one picture of the first `num_images` test images with the model's detections
    (class and score, >= `display_threshold`) over the faint ground truth, saved as `filename` in the run
    folder (`trainer.default_root_dir`) and, with a W&B logger, logged as `test/detections`.

    `path` holds the written file (None before a test pass, and on other ranks than 0).
    """

    def __init__(
        self,
        num_images: int = 8,
        columns: int = 4,
        display_threshold: float = DISPLAY_THRESHOLD,
        min_side: int = 320,
        filename: str = "test_detections.png",
    ) -> None:
        super().__init__()
        if num_images < 1 or columns < 1:
            raise ValueError("num_images and columns must be >= 1")
        self.num_images = num_images
        self.columns = columns
        self.display_threshold = display_threshold
        self.min_side = min_side
        self.filename = filename
        self.path: Path | None = None
        self._tiles: list[Tensor] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tiles = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        missing = self.num_images - len(self._tiles)
        if missing <= 0 or outputs is None or not trainer.is_global_zero:
            return
        hparams: Mapping[str, Any] = pl_module.hparams
        for image, target, det in batch_samples(
            batch, outputs, hparams["pixel_mean"], hparams["pixel_std"], missing
        ):
            pixels = torch.from_numpy(image).permute(2, 0, 1)
            size = torch.tensor(pixels.shape[-2:][::-1] * 2, dtype=torch.float32)  # (W, H, W, H)
            tile, (boxes, truth) = upscale(
                pixels,
                [det["boxes"].float().cpu() * size, target["boxes"].float().cpu() * size],
                self.min_side,
            )
            self._tiles.append(
                draw_detections(
                    tile,
                    boxes,
                    det["scores"].cpu(),
                    det["labels"].cpu(),
                    pl_module.class_names,
                    self.display_threshold,
                    truth_boxes=truth,
                )
            )

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._tiles or not trainer.is_global_zero:
            return
        grid = image_grid(self._tiles, self.columns)
        self.path = Path(trainer.default_root_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_png(grid, str(self.path))
        log_picture(trainer.loggers, "test/detections", grid.permute(1, 2, 0).numpy())
        self._tiles = []
