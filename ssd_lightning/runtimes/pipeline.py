"""A `Detector` in the project's data pipeline: evaluation (the checkpoint path's metrics), prediction (the
checkpoint path's per-image results), calibration images for INT8, and `DetectorModel`, which stands in for
the Lightning module where eval.py and predict.py take `model_path=` instead of `ckpt_path=`."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd_lightning.data import DetectionDataModule, DetectionDataset, DetectionTransform
from ssd_lightning.metrics.evaluation import (
    DetectionEvaluator,
    EvaluationResult,
    detections_in_pixels,
    to_pixels,
)
from ssd_lightning.runtimes.base import Detections, Detector

Batch = tuple[Tensor, list[dict[str, Any]]]


def as_tensors(detections: Iterable[Detections]) -> list[dict[str, Tensor]]:
    """NumPy detections -> torch tensors (what the metrics and the drawing take)."""
    return [
        {
            "boxes": torch.from_numpy(np.asarray(d["boxes"], np.float32)).reshape(-1, 4),
            "scores": torch.from_numpy(np.asarray(d["scores"], np.float32)),
            "labels": torch.from_numpy(np.asarray(d["labels"], np.int64)),
        }
        for d in detections
    ]


def batch_pixels(images: Tensor) -> np.ndarray:
    """A data module batch (uint8 [B,3,S,S]) -> the detectors' input, uint8 [B,S,S,3]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected the data module's uint8 batches, got {images.dtype} (normalize=False)")
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())


def evaluate_detector(
    detector: Detector, batches: Iterable[Batch], evaluator: DetectionEvaluator
) -> EvaluationResult:
    """The evaluation of the checkpoint path (`SSDLitModule` test/validation step) with `detector`: its
    detections against the targets, both in each image's original pixels."""
    evaluator.reset()
    for images, targets in batches:
        detections = as_tensors(detector.infer(batch_pixels(images)))
        evaluator.update(*detections_in_pixels(detections, targets))
    result = evaluator.compute()
    evaluator.reset()
    return result


def predict_batch(detector: Detector, batch: Batch) -> list[dict[str, Any]]:
    """`SSDLitModule.predict_step` with `detector`: per image, boxes in original pixels (xyxy), scores,
    labels, class names and the input's metadata."""
    images, metas = batch
    results = []
    for det, meta in zip(as_tensors(detector.infer(batch_pixels(images))), metas, strict=True):
        labels = det["labels"]
        results.append(
            {
                **{k: v for k, v in meta.items() if k not in ("boxes", "labels", "difficult")},
                "boxes": to_pixels(det["boxes"], meta["orig_size"]),
                "scores": det["scores"],
                "labels": labels,
                "names": [detector.class_names[label - 1] for label in labels.tolist()],
            }
        )
    return results


def data_split(arguments: Mapping[str, Any], split: str, transform: DetectionTransform) -> DetectionDataset:
    """A split of the data a checkpoint was trained on (its DataModule's recorded arguments), with
    `transform`. Options a DataModule no longer takes are dropped (older checkpoints)."""
    known = inspect.signature(DetectionDataModule).parameters
    return DetectionDataModule(**{k: v for k, v in arguments.items() if k in known}).build_dataset(
        split, transform=transform
    )


def calibration_pixels(dataset: DetectionDataset, count: int, seed: int = 0) -> np.ndarray:
    """`count` images of `dataset` (uint8 [3,S,S] items, e.g. the evaluation transform's), chosen at random
    with `seed` so that they spread over the split: uint8 [N,S,S,3], what the quantisers calibrate on."""
    if count < 1:
        raise ValueError(f"calibration_images={count}: INT8 calibration needs at least 1 image")
    size = len(dataset)
    if size == 0:
        raise ValueError(f"{getattr(dataset, 'name', 'the dataset')} has no images to calibrate on")
    chosen = np.random.default_rng(seed).choice(size, size=min(count, size), replace=False)
    return np.stack([batch_pixels(dataset[int(i)][0][None])[0] for i in sorted(chosen)])


class _Hparams(dict):
    """Attribute access to the values the entry points read from a module's `hparams`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DetectorModel:
    """What eval.py and predict.py read from a checkpoint's Lightning module (image size, normalisation,
    classes, category ids, training data, evaluators), for an exported model on a runtime."""

    def __init__(self, detector: Detector) -> None:
        info = detector.info
        self.detector = detector
        self.class_names = list(info.class_names)
        self.image_size = info.image_size
        self.hparams = _Hparams(
            pixel_mean=list(info.pixel_mean),
            pixel_std=list(info.pixel_std),
            category_ids=info.category_ids,
            net=info.metadata.get("net"),
        )
        self.datamodule_arguments: dict[str, Any] | None = info.metadata.get("datamodule_arguments")
        self.val_evaluator = DetectionEvaluator(self.class_names)
        self.test_evaluator = DetectionEvaluator(self.class_names)
        self.last_evaluation: EvaluationResult | None = None

    def predict_step(self, batch: Batch, batch_idx: int = 0) -> list[dict[str, Any]]:
        return predict_batch(self.detector, batch)

    def evaluate(self, batches: Iterable[Batch], split: str) -> EvaluationResult:
        """Evaluate on `batches` with the evaluator of `split` (val | test, as the Lightning path)."""
        evaluator = self.val_evaluator if split == "val" else self.test_evaluator
        self.last_evaluation = evaluate_detector(self.detector, batches, evaluator)
        return self.last_evaluation
