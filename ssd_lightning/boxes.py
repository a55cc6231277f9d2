"""Box formats, SSD offset coding and prior matching.

Conversions and IoU come from `torchvision.ops`. Matching is written here because the SSD rule (threshold
plus the bipartite "every ground truth keeps its best prior" step) is not what torchvision's `Matcher`
does, and it is batched over images so that no Python loop runs per image, prior or box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

Variances = tuple[float, float]
DEFAULT_VARIANCES: Variances = (0.1, 0.2)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (xmin, ymin, xmax, ymax), any leading shape."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(xmin, ymin, xmax, ymax) -> (cx, cy, w, h), any leading shape."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def encode(boxes: Tensor, priors: Tensor, variances: Variances = DEFAULT_VARIANCES) -> Tensor:
    """Offsets of xyxy `boxes` [..., P, 4] relative to cxcywh `priors` [P, 4], scaled by the variances."""
    centre_size = xyxy_to_cxcywh(boxes)
    centre = (centre_size[..., :2] - priors[:, :2]) / (variances[0] * priors[:, 2:])
    # Matched boxes of zero size only occur for background priors, whose offsets the loss ignores.
    size = torch.log(centre_size[..., 2:].clamp(min=1e-8) / priors[:, 2:]) / variances[1]
    return torch.cat([centre, size], dim=-1)


def decode(offsets: Tensor, priors: Tensor, variances: Variances = DEFAULT_VARIANCES) -> Tensor:
    """Inverse of `encode`: offsets [..., P, 4] -> xyxy boxes [..., P, 4] in the priors' units."""
    centre = priors[:, :2] + offsets[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return cxcywh_to_xyxy(torch.cat([centre, size], dim=-1))


class PaddedTargets(NamedTuple):
    """Ground truth of a batch padded to the largest box count; `valid` marks the real boxes, which sit at
    `[image_index, slot_index]` (indices built on the host, so using them never waits on the device)."""

    boxes: Tensor  # [B, N, 4] xyxy
    labels: Tensor  # [B, N] int64
    valid: Tensor  # [B, N] bool
    image_index: Tensor  # [M] int64, M real boxes in the batch
    slot_index: Tensor  # [M] int64


def pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> PaddedTargets:
    """Stack per-image boxes/labels into padded tensors (at least one slot, so empty batches still work)."""
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box tensors but {len(labels)} label tensors")
    if len(boxes) == 0:
        raise ValueError("pad_targets needs at least one image")
    device = boxes[0].device
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    slots = max(int(counts.max()), 1)
    # One scatter for the whole batch instead of a copy per image: indices are built on the host from
    # the known lengths, so nothing waits on the device.
    image_index = torch.repeat_interleave(torch.arange(len(boxes)), counts)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    slot_index = torch.arange(int(counts.sum())) - starts
    image_index, slot_index = image_index.to(device), slot_index.to(device)
    padded_boxes = boxes[0].new_zeros(len(boxes), slots, 4)
    padded_labels = torch.zeros(len(boxes), slots, dtype=torch.int64, device=device)
    valid = torch.zeros(len(boxes), slots, dtype=torch.bool, device=device)
    padded_boxes[image_index, slot_index] = torch.cat([b.reshape(-1, 4) for b in boxes]).to(
        padded_boxes.dtype
    )
    padded_labels[image_index, slot_index] = torch.cat([x.reshape(-1) for x in labels]).to(torch.int64)
    valid[image_index, slot_index] = True
    return PaddedTargets(padded_boxes, padded_labels, valid, image_index, slot_index)


class MatchResult(NamedTuple):
    """Per prior: the assigned class (0 = background) and the xyxy box of the assigned ground truth."""

    labels: Tensor  # [B, P] int64
    boxes: Tensor  # [B, P, 4]
    iou: Tensor  # [B, P] IoU with the assigned ground truth (2.0 for the bipartite matches)


def match_priors(targets: PaddedTargets, priors_xyxy: Tensor, iou_threshold: float = 0.5) -> MatchResult:
    """SSD matching for a batch.

    Each prior takes the ground truth it overlaps most if that IoU is >= `iou_threshold`; then every ground
    truth claims its own best prior regardless of IoU (when two claim the same prior, the later box wins,
    as in the reference implementation).
    """
    batch, slots = targets.labels.shape
    num_priors = priors_xyxy.shape[0]
    # IoU of the real boxes only (padding can double the work), written into a -1 filled padded tensor.
    real = (targets.image_index, targets.slot_index)
    iou = priors_xyxy.new_full((batch, slots, num_priors), -1.0)
    iou[real] = box_iou(targets.boxes[real], priors_xyxy)

    best_gt_iou, best_gt = iou.max(dim=1)  # [B, P]
    best_prior = iou.argmax(dim=2)  # [B, N]

    slot_index = torch.arange(slots, device=iou.device).expand(batch, slots)
    claim = torch.where(targets.valid, slot_index, torch.full_like(slot_index, -1))
    claimed_by = torch.full((batch, num_priors), -1, dtype=torch.int64, device=iou.device)
    claimed_by = claimed_by.scatter_reduce(1, best_prior, claim, reduce="amax", include_self=True)
    forced = claimed_by >= 0
    best_gt = torch.where(forced, claimed_by, best_gt)
    best_gt_iou = torch.where(forced, torch.full_like(best_gt_iou, 2.0), best_gt_iou)

    labels = targets.labels.gather(1, best_gt)
    labels = labels.masked_fill(best_gt_iou < iou_threshold, 0)
    boxes = targets.boxes.gather(1, best_gt[..., None].expand(-1, -1, 4))
    return MatchResult(labels, boxes, best_gt_iou)
