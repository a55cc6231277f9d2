"""The detection confusion matrix: which class each object was given, and the detections of nothing.

torchmetrics' ``ConfusionMatrix`` is for classification (one prediction per sample); detection needs the
boxes matched first, as mmdetection's ``confusion_matrix.py`` and Ultralytics' ``ConfusionMatrix`` do.
Rows are the ground truth, columns the prediction, the classes in label order and **background last**:

* a detection scoring >= ``score_threshold`` that is a true positive of the metric's matching (IoU >=
  ``iou_threshold`` with an object of its class that no higher-scoring detection claimed; see
  :func:`~ssd_lightning.metrics.voc.match_detections`) counts on the diagonal, so the diagonal at a
  threshold is the true positives of :mod:`ssd_lightning.metrics.thresholds` at that threshold, a class's row
  sums to its objects, its column to its detections;
* the remaining detections and objects of an image are paired across classes, one to one, greedily by
  IoU (highest first) among pairs with IoU >= ``iou_threshold``: an object of class ``a`` detected as ``b``
  counts in row ``a``, column ``b`` (a confusion);
* a detection left over counts in the background row (a false detection of nothing), an object left over in
  the background column (missed). The background-background cell stays 0.

Difficult/crowd objects, and the detections the metric matches to them, count nowhere (the metric ignores
them). The row-normalised matrix divides each row by its sum: a class's row is where its objects went, the
background row which classes the false detections claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ssd_lightning.metrics.voc import Matching, match_detections
from ssd_lightning.threads import one_thread

__all__ = ["BACKGROUND", "ConfusionMatrix", "confusion_matrix"]

BACKGROUND = "background"


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts [C + 1, C + 1]: rows ground truth, columns prediction; background last."""

    class_names: list[str]
    counts: np.ndarray  # int64
    score_threshold: float
    iou_threshold: float

    @property
    def labels(self) -> list[str]:
        """The rows' and columns' names."""
        return [*self.class_names, BACKGROUND]

    def normalised(self) -> np.ndarray:
        """Each row divided by its sum (rows without any entry stay 0)."""
        sums = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, sums, out=np.zeros(self.counts.shape), where=sums > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": "ground truth",
            "columns": "prediction",
            "labels": self.labels,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "counts": self.counts.tolist(),
            "normalised": np.round(self.normalised(), 6).tolist(),
        }


def confusion_matrix(
    detections: Tensor,
    ground_truth: Tensor,
    image_counts: Tensor,
    class_names: Sequence[str],
    score_threshold: float,
    iou_threshold: float = 0.5,
    matching: Matching | None = None,
) -> ConfusionMatrix:
    """The confusion matrix of the detections scoring >= `score_threshold` (module docstring).

    Args:
        detections, ground_truth, image_counts: :meth:`VOCMeanAveragePrecision.accumulated`'s rows.
        class_names: label ``l`` is ``class_names[l - 1]``.
        matching: `match_detections` of these rows, when already computed.
    """
    with one_thread():
        detections, ground_truth, image_counts = detections.float(), ground_truth.float(), image_counts.long()
        if matching is None:
            matching = match_detections(detections, ground_truth, image_counts, iou_threshold)
        counts = _confusion(
            detections, ground_truth, image_counts, len(class_names), matching, score_threshold, iou_threshold
        )
    return ConfusionMatrix(list(class_names), counts, float(score_threshold), float(iou_threshold))


def _confusion(
    det: Tensor,
    gt: Tensor,
    image_counts: Tensor,
    num_classes: int,
    matching: Matching,
    score_threshold: float,
    iou_threshold: float,
) -> np.ndarray:
    background = num_classes  # the last row and column
    labels, gt_labels = det[:, 5].long() - 1, gt[:, 4].long() - 1
    if len(det) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"confusion_matrix: detection labels must lie in 1..{num_classes}")
    if len(gt) and not 0 <= int(gt_labels.min()) <= int(gt_labels.max()) < num_classes:
        raise ValueError(f"confusion_matrix: ground-truth labels must lie in 1..{num_classes}")
    above = (det[:, 4] >= score_threshold) & ~matching.ignored
    correct = above & matching.is_tp
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    np.add.at(matrix, (labels[correct].numpy(), labels[correct].numpy()), 1)
    open_det = above & ~correct
    open_gt = gt[:, 5] == 0
    open_gt[matching.best_gt[correct]] = False

    image = torch.arange(len(image_counts))
    det_image = image.repeat_interleave(image_counts[:, 0])
    gt_image = image.repeat_interleave(image_counts[:, 1])
    det_start = torch.cumsum(image_counts[:, 0], 0) - image_counts[:, 0]
    gt_start = torch.cumsum(image_counts[:, 1], 0) - image_counts[:, 1]
    # Confusions: only images holding both a left-over detection and a left-over object.
    both = set(det_image[open_det].tolist()) & set(gt_image[open_gt].tolist())
    for i in sorted(both):
        dets = (
            int(det_start[i])
            + torch.nonzero(open_det[det_start[i] : det_start[i] + image_counts[i, 0]])[:, 0]
        )
        gts = int(gt_start[i]) + torch.nonzero(open_gt[gt_start[i] : gt_start[i] + image_counts[i, 1]])[:, 0]
        iou = box_iou(det[dets, :4], gt[gts, :4])
        iou[labels[dets, None] == gt_labels[None, gts]] = -1.0  # same class: not a confusion
        pairs = torch.nonzero(iou >= iou_threshold)
        order = torch.sort(iou[pairs[:, 0], pairs[:, 1]], descending=True, stable=True).indices
        used_det, used_gt = set(), set()
        for d, g in pairs[order].tolist():
            if d in used_det or g in used_gt:
                continue
            used_det.add(d)
            used_gt.add(g)
            matrix[int(gt_labels[gts[g]]), int(labels[dets[d]])] += 1
            open_det[dets[d]] = False
            open_gt[gts[g]] = False
    np.add.at(matrix, (background, labels[open_det].numpy()), 1)  # detections of nothing
    np.add.at(matrix, (gt_labels[open_gt].numpy(), background), 1)  # missed objects
    return matrix
