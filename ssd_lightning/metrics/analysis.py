"""Why is the mAP what it is? False positives by cause, missed objects by size, precision-recall curves.

In the spirit of Hoiem et al., "Diagnosing Error in Object Detectors" (ECCV 2012) and of the TIDE toolbox
(Bolya et al., ECCV 2020), computed from what :class:`~ssd_lightning.metrics.VOCMeanAveragePrecision`
accumulates (:meth:`~ssd_lightning.metrics.VOCMeanAveragePrecision.accumulated`, gathered over processes)
with the same matching, so that its correct detections are the metric's true positives. Plain PyTorch.

Every detection gets one outcome, the first of these that applies (``correct > duplicate > localisation >
confusion > background``):

1. ``correct``: a true positive (IoU >= 0.5 with an object of its class that no higher-scoring detection
   claimed); ``on_difficult`` if that object is difficult (VOC) or crowd (COCO): ignored by the metric,
   neither correct nor an error;
2. ``duplicate``: IoU >= 0.5 with an object of its class that a higher-scoring detection already claimed;
3. ``localisation``: its class, 0.1 <= IoU < 0.5;
4. ``confusion``: IoU >= 0.1 with an object of another class;
5. ``background``: IoU < 0.1 with every object.

As in the metric, the class-aware IoU is the one with the object of the detection's class it overlaps most
(difficult ones included), and a detection whose best object is taken is a duplicate even if another one
of its class is free (the VOC devkit's rule). A missed object is a non-difficult object that no correct
detection claims; sizes are COCO's area ranges in original image pixels (box area; COCO uses the mask's):
small < 32^2, medium 32^2 to 96^2, large >= 96^2.

Everything is counted twice: over all detections (what AP is computed from, down to the model's
``score_threshold``, 0.01 by default, where false positives are many but cost AP little) and over the
detections scoring >= ``score_threshold`` (0.4 by default, predict.py's display threshold: what a user of
the detector sees). The matching runs from the highest score down, so a detection's outcome does not
depend on lower-scoring ones and the second count is the first restricted to high scores.

``map_gain`` is what removing each kind of false positive from the ranked detections would add to the
VOC2010+ mAP (area under the precision envelope), Hoiem et al.'s "impact of removing" each error type:
per evaluated class, AP recomputed without those detections, averaged over the classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ssd_lightning.metrics.voc import _average_precision, _blocks, match_detections
from ssd_lightning.threads import one_thread

__all__ = ["ERRORS", "OUTCOMES", "Breakdown", "ErrorAnalysis", "PRCurve", "analyze_errors", "plot_pr_curves"]

#: a detection's possible outcomes, in precedence order (the first that applies)
OUTCOMES = ("correct", "on_difficult", "duplicate", "localisation", "confusion", "background")
#: the outcomes that are false positives
ERRORS = ("duplicate", "localisation", "confusion", "background")
SIZES = ("small", "medium", "large")
#: COCO's object-size boundaries, areas in original image pixels
SIZE_AREAS = (32.0**2, 96.0**2)
_CORRECT, _ON_DIFFICULT, _DUPLICATE, _LOCALISATION, _CONFUSION, _BACKGROUND = range(len(OUTCOMES))


@dataclass(frozen=True)
class Breakdown:
    """Outcome counts of a set of detections, and the objects of the same scope missed by size."""

    detections: int
    correct: int
    on_difficult: int
    duplicate: int
    localisation: int
    confusion: int
    background: int
    objects_small: int  # non-difficult objects
    objects_medium: int
    objects_large: int
    missed_small: int
    missed_medium: int
    missed_large: int

    @property
    def false_positives(self) -> int:
        return self.duplicate + self.localisation + self.confusion + self.background

    @property
    def objects(self) -> int:
        return self.objects_small + self.objects_medium + self.objects_large

    @property
    def missed(self) -> int:
        return self.missed_small + self.missed_medium + self.missed_large


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall after each detection of one class, best score first (difficult hits left out)."""

    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    ap: float  # VOC2010+ (area under the precision envelope)
    positives: int  # non-difficult objects of the class

    def points(self, max_points: int = 500) -> tuple[list[float], list[float]]:
        """(recall, precision) to draw, from (0, 1), thinned to about `max_points` (plots need no more)."""
        step = max(1, math.ceil(len(self.recall) / max_points))
        index = np.arange(len(self.recall))
        keep = index[(index % step == 0) | (index == len(index) - 1)]  # the last point: the final recall
        return [0.0, *self.recall[keep].tolist()], [1.0, *self.precision[keep].tolist()]


@dataclass(frozen=True)
class ErrorAnalysis:
    """What :func:`analyze_errors` found; :meth:`format` renders it, :meth:`to_dict` is JSON-ready."""

    class_names: list[str]
    score_threshold: float
    overall: Breakdown  # all detections
    per_class: dict[str, Breakdown]
    overall_at_threshold: Breakdown  # detections scoring >= score_threshold
    per_class_at_threshold: dict[str, Breakdown]
    curves: dict[str, PRCurve]  # classes with a non-difficult object
    map_voc12: float
    map_gain: dict[str, float]  # per kind of false positive (ERRORS)

    def to_dict(self) -> dict:
        """Counts and gains (not the curves), plain Python types."""
        return {
            "score_threshold": self.score_threshold,
            "overall": asdict(self.overall),
            "overall_at_threshold": asdict(self.overall_at_threshold),
            "per_class": {name: asdict(b) for name, b in self.per_class.items()},
            "per_class_at_threshold": {name: asdict(b) for name, b in self.per_class_at_threshold.items()},
            "map_voc12": self.map_voc12,
            "map_gain": dict(self.map_gain),
        }

    def format(self) -> str:
        """The breakdown as a table: overall at both thresholds, then per class at the score threshold."""
        threshold = f"score >= {self.score_threshold:g}"
        names = [
            n
            for n in self.class_names
            if self.per_class_at_threshold[n].detections or self.per_class[n].objects
        ]
        width = max([len(threshold), len("all detections"), *(len(n) for n in names)])
        header = f"  {'':<{width}}" + "".join(f"{title:>{w}}" for title, w in _COLUMNS)
        lines = [
            "Error analysis: each detection counted once, as the first of correct > duplicate > localisation"
            " > confusion > background; missed objects by COCO size (original pixels)",
            header,
            _row("all detections", self.overall, width),
            _row(threshold, self.overall_at_threshold, width),
            f"  per class, {threshold}:",
            *(_row(name, self.per_class_at_threshold[name], width) for name in names),
        ]
        gains = " / ".join(f"{self.map_gain[kind]:+.4f}" for kind in ERRORS)
        lines.append(
            f"  mAP VOC2010+ {self.map_voc12:.4f}; without the {' / '.join(ERRORS)} false positives: {gains}"
        )
        return "\n".join(lines)


_TITLES = (
    "detections",
    "correct",
    "difficult",
    "duplicate",
    "localisation",
    "confusion",
    "background",
    "objects",
    "missed",
    "small",
    "medium",
    "large",
)
_COLUMNS = tuple((title, max(len(title), 7) + 2) for title in _TITLES)


def _row(label: str, b: Breakdown, width: int) -> str:
    values = [
        b.detections,
        b.correct,
        b.on_difficult,
        b.duplicate,
        b.localisation,
        b.confusion,
        b.background,
        b.objects,
        b.missed,
        f"{b.missed_small}/{b.objects_small}",  # missed of all objects of that size
        f"{b.missed_medium}/{b.objects_medium}",
        f"{b.missed_large}/{b.objects_large}",
    ]
    return f"  {label:<{width}}" + "".join(f"{v:>{w}}" for v, (_, w) in zip(values, _COLUMNS, strict=True))


def analyze_errors(
    detections: Tensor,
    ground_truth: Tensor,
    image_counts: Tensor,
    class_names: Sequence[str],
    score_threshold: float = 0.4,
    iou_threshold: float = 0.5,
    background_iou: float = 0.1,
) -> ErrorAnalysis:
    """Break a pass's detections and misses down as the module docstring says.

    Args:
        detections, ground_truth, image_counts: :meth:`VOCMeanAveragePrecision.accumulated`'s rows: boxes in
            original image pixels (what :class:`~ssd_lightning.metrics.evaluation.DetectionEvaluator` feeds
            it) for the object sizes to be COCO's.
        class_names: label ``l`` is ``class_names[l - 1]``.
        score_threshold: the second count keeps the detections scoring at least this.
        iou_threshold: the matching threshold of the metric (VOC: 0.5).
        background_iou: below this IoU with every object, a false positive is background.
    """
    with one_thread():
        return _analyze(
            detections.float(),
            ground_truth.float(),
            image_counts.long(),
            list(class_names),
            float(score_threshold),
            float(iou_threshold),
            float(background_iou),
        )


def _analyze(
    det: Tensor,
    gt: Tensor,
    counts: Tensor,
    class_names: list[str],
    score_threshold: float,
    iou_threshold: float,
    background_iou: float,
) -> ErrorAnalysis:
    scores, labels = det[:, 4], det[:, 5].long()
    gt_labels, difficult = gt[:, 4].long(), gt[:, 5] > 0
    all_labels = torch.cat([labels, gt_labels])
    if len(all_labels) and not 1 <= int(all_labels.min()) <= int(all_labels.max()) <= len(class_names):
        raise ValueError(f"analyze_errors: labels must lie in 1..{len(class_names)} (one per class name)")
    matching = match_detections(det, gt, counts, iou_threshold)
    same_iou, best_gt, is_tp, ignored, order = (
        matching.best_iou,
        matching.best_gt,
        matching.is_tp,
        matching.ignored,
        matching.order,
    )
    other_iou = _best_other_class_iou(det[:, :4], labels, gt[:, :4], gt_labels, counts)
    # Later assignments win: this is the precedence, lowest first.
    outcome = torch.full((len(det),), _BACKGROUND, dtype=torch.long)
    outcome[other_iou >= background_iou] = _CONFUSION
    outcome[same_iou >= background_iou] = _LOCALISATION
    outcome[same_iou >= iou_threshold] = _DUPLICATE
    outcome[ignored] = _ON_DIFFICULT
    outcome[is_tp] = _CORRECT

    areas = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    size = torch.bucketize(areas, torch.tensor(SIZE_AREAS), right=True)
    num_labels = len(class_names) + 1
    objects = _count(gt_labels[~difficult] * len(SIZES) + size[~difficult], num_labels, len(SIZES))
    above = scores >= score_threshold
    tables = {}
    for scope, in_scope in (("all", torch.ones_like(above)), ("above", above)):
        found = torch.zeros(len(gt), dtype=torch.bool)
        found[best_gt[is_tp & in_scope]] = True
        outcomes = _count(labels[in_scope] * len(OUTCOMES) + outcome[in_scope], num_labels, len(OUTCOMES))
        missed_rows = ~difficult & ~found
        missed = _count(gt_labels[missed_rows] * len(SIZES) + size[missed_rows], num_labels, len(SIZES))
        tables[scope] = [
            _breakdown(outcomes[label], objects[label], missed[label]) for label in range(num_labels)
        ]

    curves, ap12, gains = _curves_and_gains(
        scores, labels, is_tp, ignored, order, outcome, gt_labels[~difficult]
    )
    evaluated = list(curves)
    return ErrorAnalysis(
        class_names=class_names,
        score_threshold=score_threshold,
        overall=_total(tables["all"]),
        per_class={name: tables["all"][label] for label, name in enumerate(class_names, start=1)},
        overall_at_threshold=_total(tables["above"]),
        per_class_at_threshold={
            name: tables["above"][label] for label, name in enumerate(class_names, start=1)
        },
        curves={class_names[label - 1]: curve for label, curve in curves.items()},
        map_voc12=float(np.mean(ap12)) if evaluated else math.nan,
        map_gain={
            kind: float(np.mean(gains[kind]) - np.mean(ap12)) if evaluated else math.nan for kind in ERRORS
        },
    )


def _best_other_class_iou(
    det_boxes: Tensor, det_labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor, counts: Tensor
) -> Tensor:
    """Per detection, its largest IoU with an object of another class in its image (0 without one)."""
    best = torch.zeros(len(det_boxes))
    image = torch.arange(len(counts))
    det_image, gt_image = image.repeat_interleave(counts[:, 0]), image.repeat_interleave(counts[:, 1])
    for dets, gts in _blocks(counts.tolist()):  # runs of whole images, as the metric groups them
        other = (det_image[dets, None] == gt_image[None, gts]) & (
            det_labels[dets, None] != gt_labels[None, gts]
        )
        best[dets] = box_iou(det_boxes[dets], gt_boxes[gts]).masked_fill(~other, 0.0).max(dim=1).values
    return best


def _curves_and_gains(
    scores: Tensor,
    labels: Tensor,
    is_tp: Tensor,
    ignored: Tensor,
    order: Tensor,
    outcome: Tensor,
    positive_labels: Tensor,
) -> tuple[dict[int, PRCurve], list[float], dict[str, list[float]]]:
    """Per class with a positive: its PR curve and VOC2010+ AP, and that AP without each kind of error."""
    kept = order[~ignored[order]]  # by label, then score descending; difficult hits move nothing
    sorted_labels, sorted_tp, sorted_outcome = labels[kept], is_tp[kept], outcome[kept]
    positives = torch.bincount(positive_labels, minlength=1)
    curves, ap12, gains = {}, [], {kind: [] for kind in ERRORS}
    for label in torch.nonzero(positives).flatten().tolist():
        start = int(torch.searchsorted(sorted_labels, label))
        end = int(torch.searchsorted(sorted_labels, label, right=True))
        count = int(positives[label])
        tp = sorted_tp[start:end]
        true_pos = tp.double().cumsum(0)
        _, ap = _average_precision(tp, count)
        curves[label] = PRCurve(
            recall=(true_pos / count).numpy(),
            precision=(true_pos / torch.arange(1, len(tp) + 1)).numpy(),
            scores=scores[kept[start:end]].numpy(),
            ap=ap,
            positives=count,
        )
        ap12.append(ap)
        for kind in ERRORS:
            without = tp[sorted_outcome[start:end] != OUTCOMES.index(kind)]
            gains[kind].append(_average_precision(without, count)[1])
    return curves, ap12, gains


def _count(keys: Tensor, rows: int, columns: int) -> list[list[int]]:
    return torch.bincount(keys, minlength=rows * columns).reshape(rows, columns).tolist()


def _breakdown(outcomes: list[int], objects: list[int], missed: list[int]) -> Breakdown:
    return Breakdown(sum(outcomes), *outcomes, *objects, *missed)


def _total(breakdowns: Sequence[Breakdown]) -> Breakdown:
    return Breakdown(*(sum(getattr(b, f.name) for b in breakdowns) for f in fields(Breakdown)))


def plot_pr_curves(analysis: ErrorAnalysis, path: str | Path, title: str = "") -> Path:
    """Precision-recall curves, one panel per class with objects, as a PNG; the dot is where the detections
    scoring >= the analysis's score threshold end. Needs matplotlib (imported here only)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    names = list(analysis.curves)
    columns = max(1, min(6, math.ceil(math.sqrt(len(names)))))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(2.6 * columns, 2.4 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, name in zip(axes, names, strict=False):
        curve = analysis.curves[name]
        ax.plot(*curve.points(max_points=len(curve.recall) + 1), drawstyle="steps-post", lw=1.2)
        shown = int((curve.scores >= analysis.score_threshold).sum())
        if shown:
            ax.plot(curve.recall[shown - 1], curve.precision[shown - 1], "o", ms=4, color="tab:red")
        ax.set_title(f"{name}: AP {curve.ap:.2f} ({curve.positives})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    figure.supxlabel("recall", fontsize=9)
    figure.supylabel("precision", fontsize=9)
    legend = (
        f"mAP VOC2010+ {analysis.map_voc12:.3f}; per class: AP (objects), "
        f"dot: the last detection scoring >= {analysis.score_threshold:g}"
    )
    figure.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
