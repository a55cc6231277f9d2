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
    batch, num_priors, num_classes = conf.shape
    boxes = decode(loc.float(), priors.float(), variances).clamp(0.0, 1.0)  # [B, P, 4]
    scores = conf.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, P]

    per_class = min(config.pre_nms_top_k, num_priors)
    top_scores, top_priors = scores.topk(per_class, dim=2)  # [B, C-1, k]
    image_index = torch.arange(batch, device=conf.device)[:, None, None].expand_as(top_priors)
    class_index = torch.arange(1, num_classes, device=conf.device)[None, :, None].expand_as(top_priors)

    keep = top_scores > config.score_threshold
    cand_scores = top_scores[keep]
    cand_images = image_index[keep]
    cand_labels = class_index[keep]
    cand_boxes = boxes[cand_images, top_priors[keep]]

    group = cand_images * num_classes + cand_labels
    kept = batched_nms(cand_boxes, cand_scores, group, config.nms_iou_threshold)  # sorted by score
    # Stable sort by image keeps each image's detections in score order; rank them to cut at top_k.
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
