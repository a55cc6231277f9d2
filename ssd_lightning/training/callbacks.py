"""Lightning callbacks: `last.ckpt` that always holds the end of training, a W&B panel of validation images
with predicted and true boxes, and a picture of the final model's detections on test images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor
from torchvision.io import write_png

from ssd_lightning.visualize import DISPLAY_THRESHOLD, draw_detections, image_grid, upscale


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


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised [3,H,W] image back to uint8 HxWx3 RGB (mean/std on the 0-255 scale); uint8 pixels
    (the data module's images before `SSDLitModule` normalises them) are only transposed."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).cpu().numpy()
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    pixels = (image.float() * std_t + mean_t).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def wandb_boxes(
    boxes: Tensor, labels: Tensor, class_names: Sequence[str], scores: Tensor | None = None
) -> dict[str, Any]:
    """W&B `boxes` entry for one layer; boxes xyxy normalised to [0, 1] (W&B's default relative domain)."""
    box_data = []
    for index, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        entry: dict[str, Any] = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "class_id": int(label),
            "box_caption": class_names[label - 1],
        }
        if scores is not None:
            score = float(scores[index])
            entry["scores"] = {"score": score}
            entry["box_caption"] = f"{class_names[label - 1]} {score:.2f}"
        box_data.append(entry)
    return {"box_data": box_data, "class_labels": {i + 1: name for i, name in enumerate(class_names)}}


class WandbDetectionImages(pl.Callback):
    """Every `every_n_epochs` validations, log the first `num_images` validation images to W&B with two box
    layers, "predictions" (score >= `min_score`) and "ground_truth". Does nothing without a WandbLogger."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, min_score: float = 0.3) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("every_n_epochs and num_images must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.min_score = min_score
        self._images: list[np.ndarray] = []
        self._boxes: list[dict[str, Any]] = []

    @staticmethod
    def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _active(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and self._wandb_logger(trainer) is not None
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._boxes = [], []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        missing = self.num_images - len(self._images)
        if missing <= 0 or outputs is None or not self._active(trainer):
            return
        images, targets = batch
        hparams: Mapping[str, Any] = pl_module.hparams
        names = pl_module.class_names
        for image, target, det in list(zip(images, targets, outputs, strict=True))[:missing]:
            keep = det["scores"] >= self.min_score
            self._images.append(denormalize(image, hparams["pixel_mean"], hparams["pixel_std"]))
            self._boxes.append(
                {
                    "predictions": wandb_boxes(
                        det["boxes"][keep], det["labels"][keep], names, det["scores"][keep]
                    ),
                    "ground_truth": wandb_boxes(target["boxes"], target["labels"], names),
                }
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._wandb_logger(trainer)
        if self._images and logger is not None and self._active(trainer):
            logger.log_image(
                key="val/examples", images=self._images, boxes=self._boxes, step=trainer.global_step
            )
        self._images, self._boxes = [], []


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
        images, targets = batch
        hparams: Mapping[str, Any] = pl_module.hparams
        for image, target, det in list(zip(images, targets, outputs, strict=True))[:missing]:
            pixels = torch.from_numpy(denormalize(image, hparams["pixel_mean"], hparams["pixel_std"]))
            pixels = pixels.permute(2, 0, 1).cpu()
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
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/detections", images=[grid.permute(1, 2, 0).numpy()])
        self._tiles = []
