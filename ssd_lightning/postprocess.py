"""Inference post-processing: class scores and decoded boxes -> per-image detections.

Vectorised over the batch: candidates of every image and class go through one `batched_nms` call, with
the (image, class) pair as the NMS group, so the cost does not grow with a Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    boxes: Tensor, scores: Tensor, group: Tensor, group_sizes: Tensor, config: DetectionConfig
) -> Tensor:
    """Per-group NMS of candidates sorted by group; indices of the kept ones.

    `batched_nms` over a whole batch falls back to a Python loop over its groups, each scanning every box,
    above 1000 boxes on CPU (5000 on GPU). Slices of whole groups below that size keep its one-call path;
    group ids are made local to the slice so its coordinate offsets stay small (float32 precision).
    """
    limit = 1000 if boxes.device.type == "cpu" else 5000
    slices, start, end = [], 0, 0
    for size in group_sizes.tolist():
        if end + size - start > limit and end > start:
            slices.append((start, end))
            start = end
        end += size
    slices.append((start, end))
    kept = [
        batched_nms(boxes[a:b], scores[a:b], group[a:b] - group[a], config.nms_iou_threshold) + a
        for a, b in slices
        if b > a
    ]
    return torch.cat(kept) if kept else group.new_zeros(0)


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
    scores = conf.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, P]

    # Threshold first (a trained model leaves a few hundred candidates per class at most), then keep the
    # `pre_nms_top_k` best of each (image, class): cheaper than a top-k over every prior of every class.
    cand_images, cand_classes, cand_priors = (scores > config.score_threshold).nonzero(as_tuple=True)
    cand_scores = scores[cand_images, cand_classes, cand_priors]
    group = cand_images * num_classes + cand_classes + 1  # (image, label); label = class index + 1
    order = cand_scores.argsort(descending=True)
    order = order[group[order].argsort(stable=True)]  # by group, best first within each
    group_sizes = torch.bincount(group, minlength=batch * num_classes)
    group_starts = group_sizes.cumsum(0) - group_sizes
    in_group_rank = torch.arange(len(order), device=conf.device) - group_starts[group[order]]
    order = order[in_group_rank < config.pre_nms_top_k]
    cand_scores, cand_images, group = cand_scores[order], cand_images[order], group[order]
    cand_labels = group - cand_images * num_classes
    cand_priors = cand_priors[order]
    # Decode only the candidates' boxes: a few thousand rows instead of every prior of every image.
    cand_boxes = decode(loc[cand_images, cand_priors].float(), priors[cand_priors].float(), variances)
    cand_boxes = cand_boxes.clamp(0.0, 1.0)

    kept = _nms_by_group(cand_boxes, cand_scores, group, group_sizes.clamp(max=config.pre_nms_top_k), config)
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
