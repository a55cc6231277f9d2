"""What every run leaves in its folder for a person to look at (and, with ``logger=wandb``, in its W&B run):

* ``label_statistics.png`` when training starts: boxes per class (all training images), box centres and
  widths/heights against the prior sizes (a sample of at most ``label_statistics_images`` images);
* ``results.csv``, one row per validation (``step``, ``epoch`` and every logged scalar), and
  ``training_curves.png`` drawn from it (loss terms, learning rate, mAPs, AP per class), rewritten at each
  validation, so that a run stopped early still has them; a resumed run keeps the rows up to its checkpoint;
* after the test pass: ``confusion_matrix.json``/``.png``, ``thresholds.json`` and ``pr_f1_curves.png``
  (precision, recall and F1 against the score threshold, with the threshold of best F1), the same files as
  ``eval.py`` writes (:func:`write_evaluation_outputs`).

Only global rank 0 writes; values are read from ``trainer.callback_metrics`` after each validation (nothing
is read from the device during training steps).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from ssd_lightning.coverage import normalised_boxes
from ssd_lightning.metrics.evaluation import EvaluationResult
from ssd_lightning.metrics.plots import (
    plot_confusion_matrix,
    plot_label_statistics,
    plot_threshold_curves,
    plot_training_curves,
)
from ssd_lightning.metrics.thresholds import THRESHOLDS_FILE
from ssd_lightning.training.wandb_logging import log_png_files

__all__ = ["RESULTS_FILE", "RunPlots", "read_results", "write_evaluation_outputs"]

log = logging.getLogger("ssd_lightning")

RESULTS_FILE = "results.csv"
TRAINING_CURVES_FILE = "training_curves.png"
LABEL_STATISTICS_FILE = "label_statistics.png"
CONFUSION_JSON_FILE = "confusion_matrix.json"
CONFUSION_PNG_FILE = "confusion_matrix.png"
PR_F1_FILE = "pr_f1_curves.png"
#: the first columns of results.csv; the logged scalars follow in name order
INDEX_COLUMNS = ("step", "epoch")


def write_evaluation_outputs(result: EvaluationResult, folder: str | Path, title: str) -> dict[str, Path]:
    """``confusion_matrix.json``/``.png``, ``thresholds.json`` and ``pr_f1_curves.png`` of an evaluation
    computed with them (`DetectionEvaluator.confusion_and_thresholds`) in `folder`; the pictures by W&B key.
    Call it from one process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {}
    if result.confusion is not None:
        _write_json(folder / CONFUSION_JSON_FILE, result.confusion.to_dict())
        pictures["plots/confusion_matrix"] = plot_confusion_matrix(
            result.confusion, folder / CONFUSION_PNG_FILE, f"confusion matrix, {title}"
        )
    if result.thresholds is not None:
        _write_json(folder / THRESHOLDS_FILE, result.thresholds.to_dict())
        pictures["plots/pr_f1_curves"] = plot_threshold_curves(
            result.thresholds,
            folder / PR_F1_FILE,
            f"precision, recall and F1 against the score threshold, {title}",
        )
    return pictures


def _write_json(path: Path, data: Any) -> None:
    path.write_text(_json(data) + "\n")


def _json(value: Any, indent: int = 0) -> str:
    """Indented JSON with each list of numbers on one line (a matrix row, a curve), not one number a line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_json(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, indent + 2) for v in value) + f"\n{pad}]"
    return json.dumps(value)


class RunPlots(pl.Callback):
    """Writes the run's tables and pictures (module docstring) into `trainer.default_root_dir`.

    Args:
        label_statistics_images: the box centres and sizes are drawn from a sample of at most this many
            training images (fixed seed; the class counts use all of them). 0: no label statistics.
        confusion_score_threshold: the confusion matrix of the test pass counts the detections scoring at
            least this; None: the threshold of best F1 over all classes.
    """

    def __init__(
        self, label_statistics_images: int = 5000, confusion_score_threshold: float | None = None
    ) -> None:
        super().__init__()
        if label_statistics_images < 0:
            raise ValueError(
                f"callbacks.run_plots.label_statistics_images must be >= 0, got {label_statistics_images}"
            )
        if confusion_score_threshold is not None and not 0 <= confusion_score_threshold <= 1:
            raise ValueError(
                "callbacks.run_plots.confusion_score_threshold must be a score in [0, 1] or null (the "
                f"threshold of best F1), got {confusion_score_threshold}"
            )
        self.label_statistics_images = label_statistics_images
        self.confusion_score_threshold = confusion_score_threshold
        self.rows: list[dict[str, float]] = []
        self.written: dict[str, Path] = {}  # what this process wrote, by file name

    def _folder(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    # --- start of training: the label statistics, earlier rows of a resumed run
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.label_statistics_images:
            path = self._label_statistics(trainer, pl_module)
            if path is not None:
                self.written[LABEL_STATISTICS_FILE] = path
                log_png_files(trainer.loggers, {"plots/label_statistics": path})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning restores a resumed run's step between the two.
        if trainer.is_global_zero:
            self.rows = self._earlier_rows(self._folder(trainer) / RESULTS_FILE, trainer.global_step)

    @staticmethod
    def _earlier_rows(path: Path, step: int) -> list[dict[str, float]]:
        """The rows a resumed run had written up to its checkpoint's step (later ones are run again)."""
        if not path.is_file() or step == 0:
            return []
        return [row for row in read_results(path) if row.get("step", math.inf) <= step]

    def _label_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        datasets = getattr(trainer.datamodule, "datasets", None) or {}
        records = getattr(datasets.get("train"), "records", None)
        spec = getattr(getattr(pl_module, "net", None), "prior_spec", None)
        if not records or spec is None:
            log.info("Label statistics: no training records to read (generated online?): not drawn")
            return None
        class_names = list(pl_module.class_names)
        labels = np.concatenate([np.asarray(r.labels, dtype=np.int64).reshape(-1) for r in records])
        counts = np.bincount(labels, minlength=len(class_names) + 1)[1 : len(class_names) + 1]
        sample = records
        if len(records) > self.label_statistics_images:  # a fixed sample: the global generators are untouched
            chosen = np.random.default_rng(0).choice(
                len(records), self.label_statistics_images, replace=False
            )
            sample = [records[i] for i in np.sort(chosen)]
        images = (
            f"{len(sample)} of {len(records)} images"
            if len(sample) < len(records)
            else f"{len(records)} images"
        )
        iou = float(getattr(getattr(pl_module, "criterion", None), "iou_threshold", 0.5))
        path = plot_label_statistics(
            normalised_boxes(sample),
            class_names,
            counts.tolist(),
            spec,
            self._folder(trainer) / LABEL_STATISTICS_FILE,
            iou_threshold=iou,
            title=f"training labels of {getattr(datasets['train'], 'name', 'train')}: classes over all "
            f"{len(records)} images, centres and sizes over {images}",
        )
        log.info("Label statistics: %s", path)
        return path

    # --- each validation: a row of results.csv and the curves
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row: dict[str, float] = {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch)}
        for name, value in trainer.callback_metrics.items():
            if getattr(value, "numel", lambda: 1)() == 1:
                row[name] = float(value)
        self.rows = [r for r in self.rows if r.get("step") != row["step"]] + [row]  # once per step
        folder = self._folder(trainer)
        self.written[RESULTS_FILE] = self._write_csv(folder / RESULTS_FILE)
        self.written[TRAINING_CURVES_FILE] = plot_training_curves(
            self.rows, folder / TRAINING_CURVES_FILE, f"training curves of {folder.name}"
        )

    def _write_csv(self, path: Path) -> Path:
        names = sorted({key for row in self.rows for key in row} - set(INDEX_COLUMNS))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=[*INDEX_COLUMNS, *names], restval="")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _number(v, k in INDEX_COLUMNS) for k, v in row.items()})
        os.replace(partial, path)  # a reader never sees half a file
        return path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        curves = self.written.get(TRAINING_CURVES_FILE)
        if trainer.is_global_zero and curves is not None:
            log_png_files(trainer.loggers, {"plots/training_curves": curves})

    # --- the test pass: confusion matrix and precision/recall/F1 against the threshold
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        evaluator = getattr(pl_module, "test_evaluator", None)
        if evaluator is not None:  # on every rank: computing them gathers the detections
            evaluator.confusion_and_thresholds = True
            evaluator.confusion_score_threshold = self.confusion_score_threshold

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = getattr(pl_module, "last_evaluation", None)
        if not trainer.is_global_zero or result is None:
            return
        pictures = write_evaluation_outputs(result, self._folder(trainer), "test split")
        self.written.update({path.name: path for path in pictures.values()})
        if result.thresholds is not None:
            log.info("%s", result.thresholds.format())
        log.info(
            "Confusion matrix and precision/recall/F1 curves of the test pass: %s", self._folder(trainer)
        )
        log_png_files(trainer.loggers, pictures)


def _number(value: float, integer: bool) -> str:
    if integer and math.isfinite(value):
        return str(int(value))
    return repr(float(value))


def read_results(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``results.csv`` (empty cells left out)."""
    with Path(path).open(newline="") as file:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]
