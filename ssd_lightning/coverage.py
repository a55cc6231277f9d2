"""Do the default boxes fit the data? How many ground-truth boxes a prior reaches, and sizes that fit better.

Training gives a ground-truth box the priors it overlaps with IoU >= the matching threshold (0.5); a box
that no prior reaches that well trains only its single best prior (the bipartite match), with a large
offset to regress. Data whose objects are much smaller, larger or more elongated than the priors therefore
trains poorly, which shows up as a low mAP with nothing obviously wrong. :func:`prior_coverage` measures it:

* the share of boxes whose best prior has IoU >= the threshold, overall and per feature map (the map that
  holds each box's best prior; the per-map shares add up to the overall one);
* the boxes no prior reaches, by size (``sqrt(w * h)`` in input pixels) and aspect ratio (``w:h``);
* prior sizes (``min_sizes``/``max_sizes``, one per feature map) that reach more of them
  (:func:`suggest_prior_sizes`), as the ``model.net.*`` overrides that apply them
  (:meth:`Suggestion.overrides`).

Boxes are xyxy normalised to [0, 1], as the loaders give them: images are resized to the model's square
input, so these are the boxes' positions in the input, the priors' coordinates. Boxes are counted as they
are annotated; SSD's crop/zoom augmentation changes their sizes during training (zoom-out shrinks them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ssd_lightning.boxes import cxcywh_to_xyxy
from ssd_lightning.priors import PriorSpec, generate_priors
from ssd_lightning.threads import one_thread

__all__ = [
    "BinCount",
    "CoverageReport",
    "MapCoverage",
    "Suggestion",
    "best_priors",
    "normalised_boxes",
    "prior_coverage",
    "share_reached",
    "suggest_prior_sizes",
]

#: sqrt(w * h) bin edges in input pixels for the boxes no prior reaches
SIZE_EDGES = (8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
#: w:h bin edges (the priors' ratios are 1, 2, 3 and their inverses)
RATIO_EDGES = (1 / 4, 1 / 2, 2.0, 4.0)
#: a suggestion must reach this much larger a share of the boxes to be worth changing the model
MIN_GAIN = 0.005
#: what each map's sizes are multiplied by when refining a suggestion
REFINE_FACTORS = (0.7, 0.85, 1.2, 1.4)
#: suggestions are searched on a random sample of at most this many boxes
SEARCH_BOXES = 20_000


class _Record(Protocol):
    boxes: np.ndarray
    difficult: np.ndarray
    width: int
    height: int


@dataclass(frozen=True)
class MapCoverage:
    """One feature map: how many boxes have their best prior here and how many of those it reaches."""

    feature_map: int  # cells per side
    step: float
    min_size: float
    max_size: float
    boxes: int  # boxes whose best prior is on this map
    reached: int  # of those, best IoU >= the threshold
    share: float  # reached / all boxes of the report


@dataclass(frozen=True)
class BinCount:
    """Boxes of one size or aspect-ratio bin, and how many of them no prior reaches."""

    label: str
    boxes: int
    unreached: int


@dataclass(frozen=True)
class Suggestion:
    """Prior sizes (input pixels, one per feature map) and the share of the boxes they reach."""

    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    coverage: float

    def overrides(self) -> str:
        """The command-line overrides of train.py that apply the sizes."""
        low, high = _hydra_list(self.min_sizes), _hydra_list(self.max_sizes)
        return f"model.net.min_sizes={low} model.net.max_sizes={high}"

    def apply(self, spec: PriorSpec) -> PriorSpec:
        """`spec` with these sizes (what `build_ssd(..., min_sizes=, max_sizes=)` builds)."""
        return _with_sizes(spec, self.min_sizes, self.max_sizes)


@dataclass(frozen=True)
class CoverageReport:
    """What :func:`prior_coverage` found; :meth:`format` renders it as text."""

    spec: PriorSpec
    iou_threshold: float
    num_boxes: int
    reached: int
    mean_best_iou: float
    per_map: tuple[MapCoverage, ...]
    by_size: tuple[BinCount, ...]
    by_ratio: tuple[BinCount, ...]
    suggestion: Suggestion | None  # None: no sizes tried reach more boxes (or none were asked for)

    @property
    def coverage(self) -> float:
        """Share of the boxes whose best prior has IoU >= the threshold (NaN without boxes)."""
        return self.reached / self.num_boxes if self.num_boxes else math.nan

    def format(self, title: str = "prior coverage") -> str:
        """A few lines for a console: overall, per map, the unreached boxes by bin, the suggestion."""
        spec = self.spec
        head = (
            f"{title}: {self.num_boxes} boxes at {spec.image_size}x{spec.image_size} input, "
            f"{spec.num_priors} priors, matching IoU >= {self.iou_threshold:g}"
        )
        if not self.num_boxes:
            return head + "\n  no boxes to measure"
        lines = [
            head,
            f"  reached by a prior: {self.reached} of {self.num_boxes} ({self.coverage:.1%}), "
            f"mean best IoU {self.mean_best_iou:.2f}",
            "  map      step  sizes (px)     best prior of  reached  share of all",
        ]
        for m in self.per_map:
            grid, sizes = f"{m.feature_map}x{m.feature_map}", f"{m.min_size:.4g}-{m.max_size:.4g}"
            lines.append(f"  {grid:<7}{m.step:6.1f}  {sizes:<13}{m.boxes:>14}{m.reached:>9}{m.share:>13.1%}")
        unreached = self.num_boxes - self.reached
        lines.append(f"  not reached: {unreached} boxes")
        if unreached:
            for name, bins in (("size sqrt(w*h) px", self.by_size), ("aspect w:h", self.by_ratio)):
                cells = ", ".join(f"{b.label} {b.unreached}/{b.boxes}" for b in bins if b.boxes)
                lines.append(f"    by {name} (unreached/all): {cells}")
        if self.suggestion is not None:
            lines.append(
                f"  suggested prior sizes reach {self.suggestion.coverage:.1%} (now {self.coverage:.1%}):"
            )
            lines.append(f"    {self.suggestion.overrides()}")
        elif unreached:
            lines.append("  suggested prior sizes: none of the sizes tried reaches more boxes")
        return "\n".join(lines)


def normalised_boxes(records: Iterable[_Record], keep_difficult: bool = True) -> Tensor:
    """The xyxy boxes of image records (pixels, with their image's width and height) in [0, 1], [M, 4];
    without those flagged difficult/crowd unless `keep_difficult` (training leaves them out by default)."""
    parts = [
        torch.as_tensor(r.boxes[keep_difficult | ~r.difficult], dtype=torch.float32).reshape(-1, 4)
        / torch.tensor([r.width, r.height, r.width, r.height], dtype=torch.float32)
        for r in records
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 4)


def best_priors(boxes: Tensor, spec: PriorSpec) -> tuple[Tensor, Tensor]:
    """Per xyxy box [M, 4] in [0, 1]: the best IoU with any prior of `spec` [M] and that prior's index [M].

    Equal to the row-wise maximum of the full IoU matrix with `generate_priors(spec)`, at a fraction of
    its cost: along each axis the overlap of a box with a prior of given width only falls as the prior's
    centre moves away from the box's, so on each map the best prior of each shape is in the cell whose
    centre is nearest to the box's centre, and only those (boxes per cell) candidates are measured.
    """
    per_map = _best_per_map(boxes.float(), spec, range(len(spec.feature_maps)))
    best_iou, best_map = torch.stack([iou for iou, _ in per_map], dim=1).max(dim=1)
    index = torch.stack([i for _, i in per_map], dim=1).gather(1, best_map[:, None])[:, 0]
    return best_iou, index


def share_reached(boxes: Tensor, spec: PriorSpec, iou_threshold: float = 0.5) -> float:
    """Share of xyxy `boxes` [M, 4] in [0, 1] whose best prior of `spec` has IoU >= `iou_threshold`."""
    return float((best_priors(boxes, spec)[0] >= iou_threshold).float().mean()) if len(boxes) else math.nan


def prior_coverage(
    boxes: Tensor, spec: PriorSpec, iou_threshold: float = 0.5, suggest: bool = True
) -> CoverageReport:
    """How well the priors of `spec` reach xyxy `boxes` [M, 4] in [0, 1] (see the module docstring).

    Args:
        iou_threshold: the loss's matching threshold (`model.loss.iou_threshold`).
        suggest: also search for prior sizes that reach more boxes (:func:`suggest_prior_sizes`).
    """
    with one_thread():
        return _prior_coverage(boxes.float(), spec, iou_threshold, suggest)


def _prior_coverage(boxes: Tensor, spec: PriorSpec, iou_threshold: float, suggest: bool) -> CoverageReport:
    num_boxes = len(boxes)
    best_iou, best_index = best_priors(boxes, spec)
    reached = best_iou >= iou_threshold
    maps = len(spec.feature_maps)
    map_of_box = torch.bucketize(best_index, torch.tensor(np.cumsum(_priors_per_map(spec))), right=True)
    boxes_per_map = torch.bincount(map_of_box, minlength=maps).tolist()
    reached_per_map = torch.bincount(map_of_box[reached], minlength=maps).tolist()
    per_map = tuple(
        MapCoverage(
            feature_map=spec.feature_maps[k],
            step=float(spec.steps[k]),
            min_size=float(spec.min_sizes[k]),
            max_size=float(spec.max_sizes[k]),
            boxes=boxes_per_map[k],
            reached=reached_per_map[k],
            share=reached_per_map[k] / num_boxes if num_boxes else math.nan,
        )
        for k in range(maps)
    )
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    size_px = (sides[:, 0] * sides[:, 1]).sqrt() * spec.image_size
    ratio = sides[:, 0] / sides[:, 1].clamp(min=1e-12)
    return CoverageReport(
        spec=spec,
        iou_threshold=float(iou_threshold),
        num_boxes=num_boxes,
        reached=int(reached.sum()),
        mean_best_iou=float(best_iou.mean()) if num_boxes else math.nan,
        per_map=per_map,
        by_size=_bins(size_px, ~reached, SIZE_EDGES, _size_labels()),
        by_ratio=_bins(ratio, ~reached, RATIO_EDGES, _ratio_labels()),
        suggestion=_suggest_prior_sizes(boxes, spec, iou_threshold, SEARCH_BOXES, 0) if suggest else None,
    )


def suggest_prior_sizes(
    boxes: Tensor, spec: PriorSpec, iou_threshold: float = 0.5, max_boxes: int = SEARCH_BOXES, seed: int = 0
) -> Suggestion | None:
    """Prior sizes that reach more of `boxes` than `spec`'s, or None when none of those tried does.

    The candidates keep the network (feature maps, steps, aspect ratios) and change only the sizes. First,
    ladders of `len(feature_maps) + 1` sizes from a low to a high percentile of the boxes' ``sqrt(w * h)``
    (2nd to 98th, 10th to 90th), spaced geometrically or linearly, map k taking rungs k and k + 1 as its
    min and max size (the paper's scale rule over the data's range instead of 0.2-0.9 of the input); then,
    from the best of those and the current sizes, each map's two sizes scaled by `REFINE_FACTORS` in turn,
    kept when that reaches more boxes and the min sizes still grow from map to map (two passes at most).
    Candidates are scored on a random sample of at most `max_boxes` boxes (`seed`); the best is returned
    if it beats the current sizes by at least `MIN_GAIN`, with the share of all `boxes` it reaches. Sizes
    are rounded to 0.1 px, as printed.
    """
    with one_thread():
        return _suggest_prior_sizes(boxes.float(), spec, iou_threshold, max_boxes, seed)


def _suggest_prior_sizes(
    boxes: Tensor, spec: PriorSpec, iou_threshold: float, max_boxes: int, seed: int
) -> Suggestion | None:
    if not len(boxes):
        return None
    sample = boxes
    if len(boxes) > max_boxes:
        sample = boxes[torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:max_boxes]]
    sides = (sample[:, 2:] - sample[:, :2]).clamp(min=0)
    size_px = ((sides[:, 0] * sides[:, 1]).sqrt() * spec.image_size).numpy()
    maps = range(len(spec.feature_maps))

    def best_iou_per_map(candidate: PriorSpec, which: Iterable[int]) -> Tensor:
        return torch.stack([iou for iou, _ in _best_per_map(sample, candidate, which)], dim=1)

    def score(per_map: Tensor) -> float:
        return float((per_map.max(dim=1).values >= iou_threshold).float().mean())

    # Best IoU per (box, map): changing one map's sizes then re-measures that map alone.
    best_per_map = best_iou_per_map(spec, maps)
    current = best_share = score(best_per_map)
    best_sizes = (spec.min_sizes, spec.max_sizes)
    for low_q, high_q in ((0.02, 0.98), (0.10, 0.90)):
        low, high = (float(v) for v in np.quantile(size_px, [low_q, high_q]))
        low, high = max(low, 1.0), max(high, low + 1.0)
        for ladder in (np.geomspace(low, high, len(maps) + 1), np.linspace(low, high, len(maps) + 1)):
            rungs = tuple(_round(s) for s in ladder)
            per_map = best_iou_per_map(_with_sizes(spec, rungs[:-1], rungs[1:]), maps)
            if score(per_map) > best_share:
                best_sizes, best_per_map, best_share = (rungs[:-1], rungs[1:]), per_map, score(per_map)
    for _ in range(2):
        improved = False
        for k in maps:
            for factor in REFINE_FACTORS:
                low, high = list(best_sizes[0]), list(best_sizes[1])
                low[k], high[k] = _round(low[k] * factor), _round(high[k] * factor)
                if any(a > b for a, b in zip(low, low[1:], strict=False)):
                    continue  # sizes grow with the maps' strides, as in every SSD
                per_map = best_per_map.clone()
                per_map[:, k] = best_iou_per_map(_with_sizes(spec, low, high), [k])[:, 0]
                if score(per_map) > best_share:
                    best_sizes, best_per_map, best_share = (tuple(low), tuple(high)), per_map, score(per_map)
                    improved = True
        if not improved:
            break
    if best_share < current + MIN_GAIN:
        return None
    suggestion = Suggestion(tuple(best_sizes[0]), tuple(best_sizes[1]), best_share)
    if len(sample) < len(boxes):
        suggestion = replace(suggestion, coverage=share_reached(boxes, suggestion.apply(spec), iou_threshold))
    return suggestion


def _best_per_map(boxes: Tensor, spec: PriorSpec, maps: Iterable[int]) -> list[tuple[Tensor, Tensor]]:
    """For each map k in `maps`: each box's best IoU with the priors of map k, and that prior's global index.

    Only the priors of the cell nearest to the box's centre are measured (see `best_priors`).
    """
    ends = np.cumsum(_priors_per_map(spec)).tolist()
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    results = []
    for k in maps:
        size, per_cell = spec.feature_maps[k], spec.boxes_per_location[k]
        priors = generate_priors(_one_map(spec, k))  # [F*F*A, 4] cxcywh, as in the whole set: row-major cells
        centres_x = priors[: size * per_cell : per_cell, 0]  # the cells of the first row
        centres_y = priors[:: size * per_cell, 1]  # the first cell of each row
        axes = (centres_x.contiguous(), centres_y.contiguous())
        nearest = [_nearest(axis, centre[:, d].contiguous()) for d, axis in enumerate(axes)]
        first = (nearest[1] * size + nearest[0]) * per_cell  # [M] first prior of the cell
        candidates = first[:, None] + torch.arange(per_cell)  # [M, A]
        iou = _paired_iou(boxes[:, None, :], cxcywh_to_xyxy(priors[candidates]))  # [M, A]
        best_iou, shape = iou.max(dim=1)
        start = ends[k] - len(priors)
        results.append((best_iou, start + candidates.gather(1, shape[:, None])[:, 0]))
    return results


def _one_map(spec: PriorSpec, k: int) -> PriorSpec:
    return replace(
        spec,
        feature_maps=spec.feature_maps[k : k + 1],
        steps=spec.steps[k : k + 1],
        min_sizes=spec.min_sizes[k : k + 1],
        max_sizes=spec.max_sizes[k : k + 1],
        aspect_ratios=spec.aspect_ratios[k : k + 1],
    )


def _nearest(centres: Tensor, values: Tensor) -> Tensor:
    """Index of the element of sorted `centres` nearest to each of `values`."""
    after = torch.searchsorted(centres, values).clamp(max=len(centres) - 1)
    before = (after - 1).clamp(min=0)
    closer_before = (values - centres[before]).abs() <= (centres[after] - values).abs()
    return torch.where(closer_before, before, after)


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes `a` and `b` paired by broadcasting (torchvision computes only all-pairs matrices)."""
    inter = (
        (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    )
    area_a = (a[..., 2:] - a[..., :2]).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area_a + area_b - inter)


def _priors_per_map(spec: PriorSpec) -> list[int]:
    return [f * f * a for f, a in zip(spec.feature_maps, spec.boxes_per_location, strict=True)]


def _with_sizes(spec: PriorSpec, min_sizes: Sequence[float], max_sizes: Sequence[float]) -> PriorSpec:
    return replace(spec, min_sizes=tuple(min_sizes), max_sizes=tuple(max_sizes))


def _round(size: float) -> float:
    return round(float(size), 1)


def _bins(
    values: Tensor, unreached: Tensor, edges: Sequence[float], labels: Sequence[str]
) -> tuple[BinCount, ...]:
    index = torch.bucketize(values, torch.tensor(edges, dtype=values.dtype), right=True)
    counts = torch.bincount(index, minlength=len(labels)).tolist()
    missed = torch.bincount(index[unreached], minlength=len(labels)).tolist()
    return tuple(BinCount(label, n, m) for label, n, m in zip(labels, counts, missed, strict=True))


def _size_labels() -> list[str]:
    edges = [f"{e:g}" for e in SIZE_EDGES]
    return [f"<{edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)), f">={edges[-1]}"]


def _ratio_labels() -> list[str]:
    def name(ratio: float) -> str:
        return f"{ratio:g}:1" if ratio >= 1 else f"1:{1 / ratio:g}"

    edges = [name(e) for e in RATIO_EDGES]
    return [f"<{edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)), f">={edges[-1]}"]


def _hydra_list(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:g}" for v in values) + "]"
