"""Synthetic but realistic inputs: ground truth like a detection batch, and predictions like a trained SSD's.

Both sides of every comparison get the very same tensors (torchvision's in pixels, ours in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssd_lightning.boxes import cxcywh_to_xyxy, encode, match_priors, pad_targets

Targets = list[dict[str, Tensor]]


def random_targets(
    batch: int,
    num_classes: int,
    generator: torch.Generator,
    min_objects: int = 1,
    max_objects: int = 10,
) -> Targets:
    """Per image `min_objects..max_objects` boxes (xyxy in [0, 1], 5-50% of the side) with labels 1..C-1."""
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    targets = []
    for _ in range(batch):
        count = int(torch.randint(min_objects, max_objects + 1, (), generator=generator))
        centre = 0.1 + 0.8 * torch.rand(count, 2, generator=generator)
        size = 0.05 + 0.45 * torch.rand(count, 2, generator=generator)
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1).clamp(0.0, 1.0)
        labels = torch.randint(1, num_classes, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def to_pixels(targets: Targets, image_size: int) -> Targets:
    """The same targets in torchvision's convention: xyxy pixel coordinates."""
    return [{"boxes": t["boxes"] * image_size, "labels": t["labels"]} for t in targets]


def to_device(targets: Targets, device: torch.device) -> Targets:
    return [{key: value.to(device) for key, value in t.items()} for t in targets]


def priors_as_anchors(priors: Tensor, image_size: int) -> Tensor:
    """Our cxcywh [0, 1] priors as torchvision anchors (xyxy pixels), so both sides match the same boxes."""
    return cxcywh_to_xyxy(priors) * image_size


@dataclass(frozen=True)
class ScoreModel:
    """How the synthetic class logits are drawn.

    "peaked" imitates a trained detector: every prior is confident it shows either background or the object
    it overlaps (those two logits share `margin` above the other classes' N(0, `noise`)), with the object's
    probability equal to the prior's IoU with it (0 below 0.3 IoU). With the defaults (20 classes,
    1-10 objects) about 1,200 (prior, class) pairs per image clear a 0.01 score threshold and NMS keeps
    the full 200 detections, as a trained SSD300 does on VOC. "flat" (all logits N(0, 1)) is the worst
    case: every class keeps its full pre-NMS top-k.
    """

    kind: str = "peaked"
    margin: float = 8.5
    noise: float = 1.5
    loc_noise: float = 0.1


def predictions(
    targets: Targets,
    priors: Tensor,
    num_classes: int,
    generator: torch.Generator,
    scores: ScoreModel | None = None,
) -> tuple[Tensor, Tensor]:
    """Box offsets [B, P, 4] and class logits [B, P, C] for `targets` under the given score model."""
    scores = scores or ScoreModel()
    batch, num_priors = len(targets), priors.shape[0]
    if scores.kind == "flat":
        loc = torch.randn(batch, num_priors, 4, generator=generator)
        conf = torch.randn(batch, num_priors, num_classes, generator=generator)
        return loc, conf
    if scores.kind != "peaked":
        raise ValueError(f"unknown score model {scores.kind!r}; choose 'peaked' or 'flat'")
    padded = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets])
    matched = match_priors(padded, cxcywh_to_xyxy(priors), iou_threshold=0.3)
    is_object = matched.labels > 0
    object_probability = torch.where(is_object, matched.iou.clamp(1e-3, 1 - 1e-3), 0.0)

    conf = scores.noise * torch.randn(batch, num_priors, num_classes, generator=generator)
    conf[..., 0] = scores.margin + torch.log1p(-object_probability)
    object_logit = scores.margin + torch.log(object_probability.clamp(min=1e-3))
    labels = matched.labels[..., None]
    conf.scatter_(
        2, labels, torch.where(is_object[..., None], object_logit[..., None], conf.gather(2, labels))
    )

    # Matched priors regress towards their object, others towards their own prior, both with noise.
    exact = encode(matched.boxes, priors)
    loc = torch.where(is_object[..., None], exact, torch.zeros_like(exact))
    loc = loc + scores.loc_noise * torch.randn(batch, num_priors, 4, generator=generator)
    return loc, conf


def candidates_per_image(conf: Tensor, score_threshold: float, per_class: int) -> float:
    """Mean number of (prior, class) candidates per image entering NMS: above threshold, capped per class."""
    scores = conf.float().softmax(dim=-1)[..., 1:]
    kept = (scores > score_threshold).sum(dim=1).clamp(max=per_class)
    return float(kept.sum()) / conf.shape[0]
