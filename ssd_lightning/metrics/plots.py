"""The pictures a run leaves for a person to look at: the confusion matrix, precision/recall/F1 against the
score threshold, the training curves of ``results.csv`` and the statistics of the training labels.

Pure drawing functions of results computed elsewhere (:mod:`ssd_lightning.metrics.confusion`,
:mod:`ssd_lightning.metrics.thresholds`, :mod:`ssd_lightning.coverage`); each writes a PNG and returns its
path. Matplotlib's object API (no pyplot: no GUI backend, no global figure state), imported when drawing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ssd_lightning.coverage import best_priors
from ssd_lightning.priors import PriorSpec, generate_priors

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ssd_lightning.metrics.confusion import ConfusionMatrix
    from ssd_lightning.metrics.thresholds import ScoreCurve, ThresholdCurves

__all__ = [
    "plot_confusion_matrix",
    "plot_label_statistics",
    "plot_threshold_curves",
    "plot_training_curves",
]

#: above this many classes, cells carry no numbers and legends are left out (they would be unreadable)
MAX_ANNOTATED_CLASSES = 25
MAX_LEGEND_ENTRIES = 12


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(matrix: ConfusionMatrix, path: str | Path, title: str = "") -> Path:
    """Counts and row-normalised shares side by side; rows ground truth, columns prediction."""
    labels = matrix.labels
    side = min(max(4.5, 0.32 * len(labels) + 2.0), 13.0)  # inches per panel: 80 classes fit in 13
    figure = _figure(2 * side, side + 0.6)
    annotate = len(labels) <= MAX_ANNOTATED_CLASSES + 1
    tick_size = 8 if annotate else 5
    counts, shares = matrix.counts, matrix.normalised()
    for ax, values, name, cell in (
        (figure.add_subplot(1, 2, 1), counts, "counts", "{:d}"),
        (figure.add_subplot(1, 2, 2), shares, "row-normalised", "{:.2f}"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(float(values.max()), 1e-9))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=tick_size)
        ax.set_yticks(range(len(labels)), labels, fontsize=tick_size)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        ax.set_title(name, fontsize=10)
        figure.colorbar(image, ax=ax, shrink=0.8)
        if annotate:
            top = float(values.max()) or 1.0
            for (row, column), value in np.ndenumerate(values):
                if value:
                    text = cell.format(int(value) if name == "counts" else float(value))
                    colour = "white" if value > 0.6 * top else "black"
                    ax.text(column, row, text, ha="center", va="center", fontsize=7, color=colour)
    legend = (
        f"detections scoring >= {matrix.score_threshold:.3g}, matched at IoU >= {matrix.iou_threshold:g}\n"
        "background row: detections of nothing; background column: missed objects"
    )
    figure.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    return _save(figure, path)


def plot_threshold_curves(curves: ThresholdCurves, path: str | Path, title: str = "") -> Path:
    """Precision, recall and F1 against the score threshold: each class thin, all classes thick, the best
    F1 of all classes marked."""
    figure = _figure(14, 4.4)
    axes = figure.subplots(1, 3)
    named = [(name, c) for name, c in curves.per_class.items() if c.objects or c.detections]
    legend = len(named) <= MAX_LEGEND_ENTRIES
    best = curves.overall.best
    for ax, metric in zip(axes, ("precision", "recall", "f1"), strict=True):
        for name, curve in named:
            ax.plot(
                curves.thresholds, getattr(curve, metric), lw=0.9, alpha=0.7, label=_best_label(name, curve)
            )
        overall = getattr(curves.overall, metric)
        ax.plot(
            curves.thresholds,
            overall,
            lw=2.5,
            color="tab:blue" if not legend else "black",
            label="all classes",
        )
        if best is not None:
            ax.axvline(best.threshold, color="tab:red", lw=0.8, ls="--")
            ax.plot(best.threshold, getattr(best, metric), "o", color="tab:red", ms=5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("score threshold")
        ax.set_title("F1" if metric == "f1" else metric, fontsize=10)
        ax.grid(alpha=0.3)
    if legend:
        axes[2].legend(fontsize=7, loc="lower left")
    if best is not None:
        note = (
            f"all classes: best F1 {best.f1:.3f} at score >= {best.threshold:.3g} (precision "
            f"{best.precision:.3f}, recall {best.recall:.3f})"
        )
    else:
        note = "all classes: no threshold gives a correct detection"
    note += f"; IoU >= {curves.iou_threshold:g}"
    figure.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    return _save(figure, path)


def _best_label(name: str, curve: ScoreCurve) -> str:
    if curve.best is None:
        return f"{name} (no correct detection)"
    return f"{name}: F1 {curve.best.f1:.2f} at {curve.best.threshold:.2f}"


#: the panels of the training curves: title, and which logged names go in it
_MAP_NAMES = ("val/map_voc07", "val/map_voc12", "val/map", "val/map_50", "val/map_75")


def plot_training_curves(rows: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """The rows of ``results.csv`` (one per validation: ``step`` and the logged scalars) against the step:
    loss terms (training: the last step's value; validation: the mean), learning rate, mAPs, AP per class."""
    names = sorted({key for row in rows for key in row})
    panels = {
        "loss": [n for n in names if n.startswith(("train/loss", "val/loss"))],
        "learning rate": [n for n in names if n == "train/lr" or n.startswith("lr-")],
        "mAP": [n for n in _MAP_NAMES if n in names],
        "AP VOC07 per class": [n for n in names if n.startswith("val/ap_voc07/")],
    }
    figure = _figure(12, 7.5)
    axes = figure.subplots(2, 2).flatten()
    steps = np.array([float(row.get("step", math.nan)) for row in rows])
    for ax, (panel, keys) in zip(axes, panels.items(), strict=True):
        for key in keys:
            values = np.array([float(row.get(key, math.nan)) for row in rows])
            style = "--" if key.startswith("val/loss") else "-"
            label = key.removeprefix("val/ap_voc07/")
            ax.plot(steps, values, style, marker="o" if len(rows) < 30 else None, ms=3, lw=1.2, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys and len(keys) <= MAX_LEGEND_ENTRIES:
            ax.legend(fontsize=7)
        elif not keys:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    note = f"{len(rows)} validations"
    figure.suptitle(f"{title}: {note}" if title else note, fontsize=10)
    return _save(figure, path)


def plot_label_statistics(
    boxes: Tensor,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    spec: PriorSpec,
    path: str | Path,
    iou_threshold: float = 0.5,
    title: str = "",
) -> Path:
    """Boxes per class (`class_counts`), where the centres of `boxes` lie, and their widths and heights
    against the priors' (in input pixels), the boxes that no prior reaches at `iou_threshold` in red.

    Args:
        boxes: xyxy in [0, 1] (a sample of the training boxes, as `coverage.normalised_boxes` gives them).
        class_counts: boxes per class, in the order of `class_names`.
        spec: the model's priors (`SSD.prior_spec`).
    """
    many = len(class_names) > 20  # the bars get more room
    figure = _figure(20 if many else 15, 4.6)
    bars, centres, sizes = figure.subplots(1, 3, width_ratios=[2 if many else 1, 1, 1])
    _class_bars(bars, class_names, class_counts)
    boxes = boxes.float().reshape(-1, 4)
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2).numpy()
    centres.hist2d(centre[:, 0], centre[:, 1], bins=40, range=[[0, 1], [0, 1]], cmap="Blues")
    centres.set_xlim(0, 1)
    centres.set_ylim(1, 0)  # image coordinates: y down
    centres.set_aspect("equal")
    centres.set_title(f"box centres ({len(boxes)} boxes)", fontsize=10)
    centres.set_xlabel("x / width")
    centres.set_ylabel("y / height")
    share = _sizes_against_priors(sizes, boxes, spec, iou_threshold)
    note = f"{share} of the boxes reached by a prior at IoU >= {iou_threshold:g} ({spec.image_size} px input)"
    figure.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    return _save(figure, path)


def _class_bars(ax: Axes, class_names: Sequence[str], class_counts: Sequence[int]) -> None:
    positions = np.arange(len(class_names))
    ax.bar(positions, class_counts, color="tab:blue")
    ax.set_xticks(positions, class_names, rotation=90, fontsize=6 if len(class_names) > 20 else 8)
    ax.set_xlim(-0.6, len(class_names) - 0.4)
    ax.set_title(f"boxes per class ({sum(class_counts)} boxes)", fontsize=10)
    ax.set_ylabel("boxes")
    if len(class_counts) and max(class_counts) > 50 * max(1, min(class_counts)):
        ax.set_yscale("log")  # strong imbalance: the rare classes would be invisible


def _sizes_against_priors(ax: Axes, boxes: Tensor, spec: PriorSpec, iou_threshold: float) -> str:
    size = spec.image_size
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6) * size
    if len(boxes):
        reached = (best_priors(boxes, spec)[0] >= iou_threshold).numpy()
        for mask, colour, name in ((reached, "tab:blue", "reached"), (~reached, "tab:red", "not reached")):
            dots = 12 if len(boxes) < 2000 else 3  # many boxes: small dots, or they hide the priors
            ax.scatter(sides[mask, 0], sides[mask, 1], s=dots, alpha=0.4, color=colour, lw=0, label=name)
        share = f"{reached.mean():.1%}"
    else:
        share = "none (no boxes)"
    priors = generate_priors(spec)
    start = 0
    from matplotlib import colormaps

    palette = colormaps["viridis"]
    for k, (cells, per_cell) in enumerate(zip(spec.feature_maps, spec.boxes_per_location, strict=True)):
        shapes = priors[start : start + per_cell, 2:] * size  # the first cell's shapes: every cell's
        start += cells * cells * per_cell
        colour = palette(k / max(1, len(spec.feature_maps) - 1))
        ax.scatter(
            shapes[:, 0], shapes[:, 1], marker="x", s=40, color=colour, label=f"priors {cells}x{cells}"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (input px)")
    ax.set_ylabel("height (input px)")
    ax.set_title("box sizes against the priors'", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", markerscale=1.5)
    ax.grid(alpha=0.3, which="both")
    return share
