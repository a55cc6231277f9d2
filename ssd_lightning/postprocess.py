"""Inference post-processing: class scores and decoded boxes -> per-image detections.

Vectorised over the batch: candidates of every image and class go through one `batched_nms` call, with
the (image, class) pair as the NMS group, so the cost does not grow with a Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ssd_lightning.boxes import DEFAULT_VARIANCES, Variances, decode


@dataclass
class DetectionConfig:
    """Thresholds of the paper's evaluation protocol; `pre_nms_top_k` bounds NMS work per class."""

    score_threshold: float = 0.01
    nms_iou_threshold: float = 0.45
    top_k: int = 200
    pre_nms_top_k: int = 400


def _nms_by_group(
    boxes: Tensor,
    scores: Tensor,
    group: Tensor,
    group_sizes: Tensor,
    groups_per_image: int,
    config: DetectionConfig,
) -> Tensor:
    """Per-group NMS of candidates sorted by group; indices of the kept ones.

    `batched_nms` over a whole batch falls back to a Python loop over its groups, each scanning every box,
    above 1000 boxes on CPU (5000 on GPU). Slices of whole groups below that size keep its one-call path.
    `batched_nms` separates groups by shifting their boxes by a multiple of the group id, which costs
    float32 precision (an IoU of 0.444 can round past 0.45): slices never span two images and number
    only the groups they hold (0, 1, ...), so an image's detections are the same in any batch.
    """
    limit = 1000 if boxes.device.type == "cpu" else 5000
    slices, start, end = [], 0, 0
    for image_sizes in group_sizes.view(-1, groups_per_image).tolist():
        for size in image_sizes:
            if end + size - start > limit and end > start:
                slices.append((start, end))
                start = end
            end += size
        if end > start:
            slices.append((start, end))
            start = end
    # Dense group numbers: 0, 1, ... in order of the non-empty groups.
    dense = torch.cat([group.new_zeros(min(len(group), 1)), (group[1:] != group[:-1]).cumsum(0)])
    kept = [
        batched_nms(boxes[a:b], scores[a:b], dense[a:b] - dense[a], config.nms_iou_threshold) + a
        for a, b in slices
    ]
    return torch.cat(kept) if kept else group.new_zeros(0)


class Candidates(NamedTuple):
    """Per-class candidates before NMS, grouped by (image, class) in row-major order, best first in each."""

    images: Tensor  # [K]
    classes: Tensor  # [K] class index (label - 1)
    priors: Tensor  # [K]
    scores: Tensor  # [K]
    group_sizes: Tensor  # [B * (C-1)] candidates per (image, class), in the same order


def select_candidates(scores: Tensor, config: DetectionConfig, method: str = "auto") -> Candidates:
    """Of `scores` [B, P, C-1], per (image, class) the `pre_nms_top_k` best above `score_threshold`.

    "threshold" thresholds first and sorts the survivors (cheap for a trained model, which leaves a few
    hundred per class); "top_k" takes each class's top-k first (bounded cost when an untrained model lets
    every prior through); "auto" picks by the number of survivors. Both select the same candidates.
    """
    if method not in ("auto", "threshold", "top_k"):
        raise ValueError(f"method must be auto, threshold or top_k, got {method!r}")
    batch, num_priors, num_foreground = scores.shape
    if method != "top_k":
        images, priors, classes = (scores > config.score_threshold).nonzero(as_tuple=True)
        if method == "auto" and len(images) > batch * num_foreground * config.pre_nms_top_k // 4:
            method = "top_k"  # sorting that many would cost more than a top-k of every class
    if method == "top_k":
        top_scores, top_priors = scores.topk(min(config.pre_nms_top_k, num_priors), dim=1)  # [B, k, C-1]
        top_scores, top_priors = top_scores.transpose(1, 2), top_priors.transpose(1, 2)  # [B, C-1, k]
        keep = top_scores > config.score_threshold
        images, classes, _ = keep.nonzero(as_tuple=True)
        return Candidates(images, classes, top_priors[keep], top_scores[keep], keep.sum(dim=2).flatten())
    group = images * num_foreground + classes
    candidate_scores = scores[images, priors, classes]
    order = candidate_scores.argsort(descending=True)
    order = order[group[order].argsort(stable=True)]  # by group, best first within each
    group_sizes = torch.bincount(group, minlength=batch * num_foreground)
    group_starts = group_sizes.cumsum(0) - group_sizes
    in_group_rank = torch.arange(len(order), device=scores.device) - group_starts[group[order]]
    order = order[in_group_rank < config.pre_nms_top_k]
    return Candidates(
        images[order],
        classes[order],
        priors[order],
        candidate_scores[order],
        group_sizes.clamp(max=config.pre_nms_top_k),
    )


def detect(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    config: DetectionConfig | None = None,
    variances: Variances = DEFAULT_VARIANCES,
) -> list[dict[str, Tensor]]:
    """Detections for each image: {"boxes" [K,4] xyxy in [0,1], "scores" [K], "labels" [K] in 1..C-1}.

    Softmax over classes, decode, keep per class the `pre_nms_top_k` best priors scoring above
    `score_threshold`, per-class NMS, then the `top_k` best of each image sorted by score.
    """
    config = config or DetectionConfig()
    batch, _, num_classes = conf.shape
    if loc.shape[:2] != conf.shape[:2] or loc.shape[1] != priors.shape[0]:
        raise ValueError(
            f"loc {tuple(loc.shape)} and conf {tuple(conf.shape)} must both cover the {priors.shape[0]} "
            "priors of each image"
        )
    scores = conf.float().softmax(dim=-1)[..., 1:]  # [B, P, C-1]
    candidates = select_candidates(scores, config)
    cand_images, cand_scores = candidates.images, candidates.scores
    cand_labels = candidates.classes + 1
    group = cand_images * (num_classes - 1) + candidates.classes
    # Decode only the candidates' boxes: a few thousand rows instead of every prior of every image.
    cand_boxes = decode(
        loc[cand_images, candidates.priors].float(), priors[candidates.priors].float(), variances
    )
    cand_boxes = cand_boxes.clamp(0.0, 1.0)

    kept = _nms_by_group(cand_boxes, cand_scores, group, candidates.group_sizes, num_classes - 1, config)
    # Each image's detections best first, cut at top_k.
    kept = kept[torch.sort(cand_scores[kept], descending=True, stable=True).indices]
    kept = kept[torch.sort(cand_images[kept], stable=True).indices]
    kept_images = cand_images[kept]
    counts = torch.bincount(kept_images, minlength=batch)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(kept), device=conf.device) - starts[kept_images]
    kept = kept[rank < config.top_k]
    counts = counts.clamp(max=config.top_k).tolist()

    results = []
    for image_boxes, image_scores, image_labels in zip(
        cand_boxes[kept].split(counts),
        cand_scores[kept].split(counts),
        cand_labels[kept].split(counts),
        strict=True,
    ):
        results.append({"boxes": image_boxes, "scores": image_scores, "labels": image_labels})
    return results
