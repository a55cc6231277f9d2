"""Everything Weights & Biases: whether a run may go online, continuing a resumed run's W&B run, a panel of
validation images with predicted and true boxes, pictures and the error analysis in the run, closing it.
Each piece does nothing without a W&B logger (`logger=wandb`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger
from torch import Tensor

from ssd_lightning.metrics.analysis import OUTCOMES, ErrorAnalysis
from ssd_lightning.visualize import batch_samples

log = logging.getLogger("ssd_lightning")

WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
#: checkpoint key: the W&B run a checkpoint was written under (`python train.py ckpt_path=...` continues it)
WANDB_RUN_ID_KEY = "wandb_run_id"


def wandb_loggers(loggers: Sequence[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def record_run_id(checkpoint: dict[str, Any], loggers: Sequence[Logger]) -> None:
    """Keep the W&B run id in a checkpoint being saved."""
    for logger in wandb_loggers(loggers):
        checkpoint[WANDB_RUN_ID_KEY] = logger.version


def run_id(checkpoint: Mapping[str, Any]) -> str | None:
    """The W&B run id a checkpoint was written under, if it was trained with the W&B logger."""
    return checkpoint.get(WANDB_RUN_ID_KEY)


def _wants_wandb_online(entry: Mapping[str, Any]) -> bool:
    if not str(entry.get("_target_", "")).endswith("WandbLogger") or entry.get("offline"):
        return False
    mode = entry.get("mode") or os.environ.get("WANDB_MODE", "online")
    return str(mode).lower() not in WANDB_LOCAL_MODES


def wandb_has_credentials() -> bool:
    """Whether W&B finds an API key (environment, settings or netrc) without prompting or going online."""
    import wandb

    return bool(wandb.login(prompt=False, verify=False))


def check_wandb_login(logger_cfg: Mapping[str, Any] | None) -> None:
    """`logger=wandb` online on a machine where W&B has no API key (it would prompt or fail mid-setup)."""
    entries = [entry for entry in (logger_cfg or {}).values() if isinstance(entry, Mapping)]
    if any(_wants_wandb_online(entry) for entry in entries) and not wandb_has_credentials():
        raise ValueError(
            "logger=wandb but W&B has no API key on this machine. Run `wandb login` once (or set "
            "WANDB_API_KEY), or log without an account: WANDB_MODE=offline python train.py logger=wandb, "
            "then upload later with `wandb sync <run folder>/wandb/offline-run-*`."
        )


def continued_run(entry: Mapping[str, Any], resumed: str | None) -> dict[str, Any]:
    """Extra arguments of a logger config `entry`: a W&B logger continues the run `resumed` (a resumed run's,
    read from its checkpoint) unless the config names one."""
    if resumed and str(entry.get("_target_", "")).endswith("WandbLogger") and not entry.get("id"):
        log.info("Continuing W&B run %s", resumed)
        return {"id": resumed, "resume": "allow"}
    return {}


def log_picture(loggers: Sequence[Logger], key: str, picture: np.ndarray) -> None:
    """An HxWx3 picture in each W&B run (`key`, e.g. test/detections)."""
    for logger in wandb_loggers(loggers):
        logger.log_image(key=key, images=[picture])


def log_png_files(loggers: Sequence[Logger], pictures: Mapping[str, str | Path]) -> None:
    """PNG files written into the run folder (`training/run_plots.py`), by key (e.g. plots/confusion_matrix),
    in each W&B run, in one history entry."""
    runs = wandb_loggers(loggers)
    if not runs or not pictures:
        return
    import wandb

    for logger in runs:
        logger.experiment.log({key: wandb.Image(str(path)) for key, path in pictures.items()})


def finish(loggers: Sequence[Logger]) -> None:
    """Close the W&B run, so that the next job of a multirun starts its own."""
    for logger in wandb_loggers(loggers):
        if logger._experiment is not None:
            logger.experiment.finish()


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
        return next(iter(wandb_loggers(trainer.loggers)), None)

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
        hparams: Mapping[str, Any] = pl_module.hparams
        names = pl_module.class_names
        for pixels, target, det in batch_samples(
            batch, outputs, hparams["pixel_mean"], hparams["pixel_std"], missing
        ):
            keep = det["scores"] >= self.min_score
            self._images.append(pixels)
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


def log_error_analysis(analysis: ErrorAnalysis, png: str | Path, title: str, loggers: list[Logger]) -> None:
    """The error analysis for each W&B logger: precision-recall curves (a plot and the PNG `png`) and the
    table of errors by kind."""
    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    names = list(analysis.curves)
    points = [analysis.curves[name].points() for name in names]
    columns = ["class", "scope", "detections", *OUTCOMES, "objects", "missed"]
    rows = []
    for scope, overall, per_class in (
        ("all detections", analysis.overall, analysis.per_class),
        (
            f"score >= {analysis.score_threshold:g}",
            analysis.overall_at_threshold,
            analysis.per_class_at_threshold,
        ),
    ):
        for name, b in {"all classes": overall, **per_class}.items():
            rows.append([name, scope, b.detections, *(getattr(b, o) for o in OUTCOMES), b.objects, b.missed])
    for logger in wandb_loggers:
        logger.experiment.log(
            {
                "analysis/pr_curves": wandb.plot.line_series(
                    xs=[recall for recall, _ in points],
                    ys=[precision for _, precision in points],
                    keys=names,
                    title=f"precision-recall per class, {title}",
                    xname="recall",
                ),
                "analysis/pr_curves_png": wandb.Image(str(png)),
                "analysis/errors": wandb.Table(columns=columns, data=rows),
            }
        )
