"""Precision, recall and F1 against the score threshold, per class and over all classes, and the threshold
of best F1: what to keep of a detector's output when it is used, not ranked.

Computed from what :class:`~ssd_lightning.metrics.VOCMeanAveragePrecision` accumulates
(:meth:`~ssd_lightning.metrics.VOCMeanAveragePrecision.accumulated`) with its matching (IoU >= 0.5 with an
object of the detection's class that no higher-scoring detection claimed; a detection on a difficult/crowd
object is left out, as the metric leaves it out), so that the true positives are the metric's. Because a
detection's outcome depends only on the detections scoring higher, the detections kept at a threshold
``t`` (score >= ``t``) have the same outcomes as in the full ranking: the curves are cumulative counts.

* precision(t) = true positives / detections scoring >= t (NaN when none does);
* recall(t) = true positives / non-difficult objects (NaN for a class without objects);
* F1(t) = 2 TP / (detections + objects) (= 2PR / (P + R); 0 when nothing is kept).

"All classes" pools every class's detections and objects (micro average): of the boxes a user sees, the
share that is right, and of the objects, the share found. The best threshold is searched exactly over the
detections' own scores (keeping every detection scoring at least that score); the highest of equally good
thresholds wins. The curves are sampled on a grid of thresholds for plots and files.

:func:`best_f1_threshold` reads the all-classes best threshold back from a run folder (``thresholds.json``,
written by the run's test pass and by ``eval.py``), e.g. as ``predict.py``'s display threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ssd_lightning.metrics.voc import Matching, match_detections
from ssd_lightning.threads import one_thread

__all__ = [
    "BEST_F1",
    "THRESHOLDS_FILE",
    "BestF1",
    "ScoreCurve",
    "ThresholdCurves",
    "best_f1_threshold",
    "resolve_display_threshold",
    "threshold_curves",
]

#: the file in a run folder that holds the curves and the best thresholds
THRESHOLDS_FILE = "thresholds.json"
#: `display_threshold=best_f1` (predict.py) reads the threshold from the checkpoint's run folder
BEST_F1 = "best_f1"
#: thresholds the curves are sampled at, 0 to 1 by 0.01
GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


@dataclass(frozen=True)
class BestF1:
    """The threshold of best F1 and what it keeps."""

    threshold: float  # keep the detections scoring >= this (one of their scores, as stored: float32)
    f1: float
    precision: float
    recall: float
    true_positives: int
    detections: int  # scoring >= threshold

    def to_dict(self) -> dict[str, float | int]:
        return {
            "threshold": self.threshold,
            "f1": self.f1,
            "precision": self.precision,
            "recall": self.recall,
            "true_positives": self.true_positives,
            "detections": self.detections,
        }


@dataclass(frozen=True)
class ScoreCurve:
    """Precision, recall and F1 at each threshold of the grid, for one class or for all."""

    precision: np.ndarray  # [T], NaN where no detection scores >= the threshold
    recall: np.ndarray  # [T], NaN without objects
    f1: np.ndarray  # [T], NaN with neither objects nor detections
    best: BestF1 | None  # None when no threshold gives a true positive
    objects: int  # non-difficult
    detections: int  # all (those on difficult objects left out)


@dataclass(frozen=True)
class ThresholdCurves:
    """What :func:`threshold_curves` found; :meth:`to_dict` is JSON-ready (NaN as null)."""

    class_names: list[str]
    iou_threshold: float
    thresholds: np.ndarray  # the grid [T]
    overall: ScoreCurve  # all classes pooled
    per_class: dict[str, ScoreCurve]

    def summary(self) -> dict[str, Any]:
        """The best thresholds only (what metrics files hold)."""
        return {
            "iou_threshold": self.iou_threshold,
            "all_classes": _best_dict(self.overall),
            "per_class": {name: _best_dict(curve) for name, curve in self.per_class.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the curves on the grid (``thresholds.json``)."""
        return {
            **self.summary(),
            "note": "at each threshold t, the detections scoring >= t; precision null where none does",
            "curves": {
                "thresholds": self.thresholds.tolist(),
                "all_classes": _curve_dict(self.overall),
                "per_class": {name: _curve_dict(curve) for name, curve in self.per_class.items()},
            },
        }

    def format(self) -> str:
        """One line: the all-classes best F1 and its threshold."""
        best = self.overall.best
        if best is None:
            return "Best F1: no threshold gives a correct detection"
        return (
            f"Best F1 (all classes, IoU {self.iou_threshold:g}): {best.f1:.4f} at score >= "
            f"{best.threshold:.4g} "
            f"(precision {best.precision:.4f}, recall {best.recall:.4f})"
        )


def _best_dict(curve: ScoreCurve) -> dict[str, Any]:
    best = curve.best.to_dict() if curve.best is not None else None
    return {"best": best, "objects": curve.objects, "detections": curve.detections}


def _nulls(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 6) if math.isfinite(v) else None for v in values]


def _curve_dict(curve: ScoreCurve) -> dict[str, list[float | None]]:
    return {"precision": _nulls(curve.precision), "recall": _nulls(curve.recall), "f1": _nulls(curve.f1)}


def threshold_curves(
    detections: Tensor,
    ground_truth: Tensor,
    image_counts: Tensor,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    matching: Matching | None = None,
) -> ThresholdCurves:
    """Precision, recall and F1 against the score threshold (module docstring).

    Args:
        detections, ground_truth, image_counts: :meth:`VOCMeanAveragePrecision.accumulated`'s rows.
        class_names: label ``l`` is ``class_names[l - 1]``.
        iou_threshold: the matching threshold (VOC: 0.5).
        matching: `match_detections` of these rows, when already computed.
    """
    with one_thread():
        detections, ground_truth = detections.float(), ground_truth.float()
        if matching is None:
            matching = match_detections(detections, ground_truth, image_counts.long(), iou_threshold)
        kept = ~matching.ignored
        scores = detections[kept, 4].double().numpy()
        labels = detections[kept, 5].long().numpy()
        is_tp = matching.is_tp[kept].numpy()
        gt_labels = ground_truth[ground_truth[:, 5] == 0, 4].long().numpy()
        per_class = {
            name: _curve(scores[labels == label], is_tp[labels == label], int((gt_labels == label).sum()))
            for label, name in enumerate(class_names, start=1)
        }
        return ThresholdCurves(
            class_names=list(class_names),
            iou_threshold=float(iou_threshold),
            thresholds=GRID.copy(),
            overall=_curve(scores, is_tp, len(gt_labels)),
            per_class=per_class,
        )


def _curve(scores: np.ndarray, is_tp: np.ndarray, objects: int) -> ScoreCurve:
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    true_pos = np.cumsum(is_tp)
    # Kept at the grid's thresholds: the detections scoring >= t (scores are in descending order).
    kept = np.searchsorted(-scores, -GRID, side="right")
    tp_kept = np.where(kept > 0, true_pos[np.maximum(kept - 1, 0)] if len(scores) else 0, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(kept > 0, tp_kept / np.maximum(kept, 1), np.nan)
        recall = tp_kept / objects if objects else np.full(len(GRID), np.nan)
        f1 = np.where(kept + objects > 0, 2 * tp_kept / np.maximum(kept + objects, 1), np.nan)
    return ScoreCurve(precision, recall, f1, _best(scores, true_pos, objects), objects, len(scores))


def _best(scores: np.ndarray, true_pos: np.ndarray, objects: int) -> BestF1 | None:
    """The exact best: thresholds at the detections' own scores, the last of each run of equal scores."""
    if not len(scores) or not objects or not true_pos[-1]:
        return None
    last_of_score = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    kept = last_of_score + 1
    f1 = 2 * true_pos[last_of_score] / (kept + objects)
    index = int(np.argmax(f1))  # the first maximum: the highest threshold
    tp, count = int(true_pos[last_of_score[index]]), int(kept[index])
    return BestF1(
        threshold=float(scores[last_of_score[index]]),
        f1=float(f1[index]),
        precision=tp / count,
        recall=tp / objects,
        true_positives=tp,
        detections=count,
    )


def _thresholds_file(path: Path) -> Path | None:
    """`path` itself (a thresholds.json), in it (a run folder), or beside/above it (a checkpoint in
    <run>/checkpoints/)."""
    if path.is_file() and path.suffix == ".json":
        return path
    for folder in (path,) if path.is_dir() else (path.parent, path.parent.parent):
        if (folder / THRESHOLDS_FILE).is_file():
            return folder / THRESHOLDS_FILE
    return None


def best_f1_threshold(path: str | Path, class_name: str | None = None) -> float:
    """The score threshold of best F1 from a run: `path` is its folder, its ``thresholds.json``, or a
    checkpoint in it (``<run>/checkpoints/last.ckpt``); over all classes, or of `class_name`.

    Raises FileNotFoundError (no ``thresholds.json`` there) or ValueError (no best threshold: the evaluation
    found no correct detection), each saying what to do.
    """
    path = Path(path)
    found = _thresholds_file(path)
    if found is None:
        raise FileNotFoundError(
            f"no {THRESHOLDS_FILE} in the run folder of {path}: train.py's test pass writes it (with the "
            "default callbacks), and eval.py ckpt_path=<checkpoint> writes one in its output folder (pass "
            "that file); or give the threshold as a number"
        )
    data = json.loads(found.read_text())
    entry = data["all_classes"] if class_name is None else data["per_class"].get(class_name)
    if entry is None:
        raise ValueError(f"{found} has no class {class_name!r}; it has {sorted(data['per_class'])}")
    if entry["best"] is None:
        raise ValueError(
            f"{found}: the evaluation found no correct detection"
            f"{'' if class_name is None else ' of ' + class_name}, so there is no best-F1 threshold; give "
            "the threshold as a number"
        )
    return float(entry["best"]["threshold"])


def resolve_display_threshold(setting: float | str, checkpoint: str | Path) -> float:
    """A display threshold as configured: a number, or ``best_f1`` (the best-F1 threshold of the run that
    wrote `checkpoint`, :func:`best_f1_threshold`)."""
    if str(setting).strip().lower() == BEST_F1:
        return best_f1_threshold(checkpoint)
    try:
        return float(setting)
    except (TypeError, ValueError):
        raise ValueError(
            f"display_threshold={setting!r}: give a score in [0, 1] or {BEST_F1} (the threshold of best F1 "
            "of the checkpoint's run)"
        ) from None
