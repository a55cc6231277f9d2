"""Box formats, SSD offset coding and prior matching.

Conversions come from `torchvision.ops`. Matching is written here because the SSD rule (threshold plus the
bipartite "every ground truth keeps its best prior" step) is not what torchvision's `Matcher` does, and it
is batched over images so that no Python loop runs per image, prior or box; its box-to-prior IoU is
hand-written too, for speed (see `prior_iou`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_convert

Variances = tuple[float, float]
DEFAULT_VARIANCES: Variances = (0.1, 0.2)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (xmin, ymin, xmax, ymax), any leading shape."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(xmin, ymin, xmax, ymax) -> (cx, cy, w, h), any leading shape."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


# encode/decode do their own centre-size arithmetic: box_convert's unbind + stack on [B, P, 4] tensors
# costs more than the rest of the coding together, and these run on every prior of every batch.


def encode(boxes: Tensor, priors: Tensor, variances: Variances = DEFAULT_VARIANCES) -> Tensor:
    """Offsets of xyxy `boxes` [..., P, 4] relative to cxcywh `priors` [P, 4], scaled by the variances.

    Computed and returned in float32 (float64 stays float64) whatever the inputs' dtype: in float16 the
    size clamp below rounds to 0 and its log is -inf.
    """
    dtype = torch.promote_types(torch.promote_types(boxes.dtype, priors.dtype), torch.float32)
    boxes, priors = boxes.to(dtype), priors.to(dtype)
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    prior_centre, prior_size = priors[:, :2], priors[:, 2:]
    centre = ((top_left + bottom_right) * 0.5 - prior_centre) / (prior_size * variances[0])
    # Matched boxes of zero size only occur for background priors, whose offsets the loss ignores.
    size = torch.log((bottom_right - top_left).clamp(min=1e-8) / prior_size) / variances[1]
    return torch.cat([centre, size], dim=-1)


def decode(offsets: Tensor, priors: Tensor, variances: Variances = DEFAULT_VARIANCES) -> Tensor:
    """Inverse of `encode`: offsets [..., P, 4] -> xyxy boxes [..., P, 4] in the priors' units."""
    prior_centre, prior_size = priors[:, :2], priors[:, 2:]
    centre = offsets[..., :2] * (prior_size * variances[0]) + prior_centre
    half_size = torch.exp(offsets[..., 2:] * variances[1]) * (prior_size * 0.5)
    return torch.cat([centre - half_size, centre + half_size], dim=-1)


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
    counts = [len(b) for b in boxes]
    slots = max(max(counts), 1)
    # One scatter for the whole batch instead of a copy per image. Its indices follow from the lengths
    # alone (Python ints, no tensor is read), so building them never waits on the device.
    image_index = [image for image, count in enumerate(counts) for _ in range(count)]
    slot_index = [slot for count in counts for slot in range(count)]
    image_index, slot_index = _host_to_device([image_index, slot_index], device).unbind(0)
    padded_boxes = boxes[0].new_zeros(len(boxes), slots, 4)
    padded_labels = torch.zeros(len(boxes), slots, dtype=torch.int64, device=device)
    valid = torch.zeros(len(boxes), slots, dtype=torch.bool, device=device)
    padded_boxes[image_index, slot_index] = torch.cat([b.reshape(-1, 4) for b in boxes]).to(
        padded_boxes.dtype
    )
    padded_labels[image_index, slot_index] = torch.cat([x.reshape(-1) for x in labels]).to(torch.int64)
    valid[image_index, slot_index] = True
    return PaddedTargets(padded_boxes, padded_labels, valid, image_index, slot_index)


def _host_to_device(rows: list[list[int]], device: torch.device) -> Tensor:
    """An int64 tensor of `rows` on `device`, copied without synchronising the device with the host."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return torch.tensor(rows, dtype=torch.int64, device=device)  # a compiled graph holds it as a constant
    host = torch.tensor(rows, dtype=torch.int64)
    # A copy from pageable memory blocks until the stream is idle; one from pinned memory does not.
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def has_area(boxes: Tensor) -> Tensor:
    """[...] bool: which xyxy `boxes` [..., 4] have xmax > xmin and ymax > ymin (False for NaN too)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


class MatchResult(NamedTuple):
    """Per prior: the assigned class (0 = background) and the xyxy box of the assigned ground truth."""

    labels: Tensor  # [B, P] int64
    boxes: Tensor  # [B, P, 4]
    iou: Tensor  # [B, P] IoU with the assigned ground truth (2.0 for the bipartite matches)


def prior_iou(boxes: Tensor, priors_xyxy: Tensor) -> Tensor:
    """IoU [M, P] of xyxy `boxes` [M, 4] with xyxy `priors` [P, 4]; equal to `torchvision.ops.box_iou`.

    Hand-written for the loss's hot path: box_iou materialises [M, P, 2] corner tensors and six full-size
    temporaries, while 1-D broadcasting with in-place updates does the same sums about 3x faster on a CPU.
    """
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    px1, py1, px2, py2 = priors_xyxy.unbind(dim=1)
    inter = (torch.minimum(x2, px2) - torch.maximum(x1, px1)).clamp_(min=0)
    inter.mul_((torch.minimum(y2, py2) - torch.maximum(y1, py1)).clamp_(min=0))
    union = ((x2 - x1) * (y2 - y1)) + ((px2 - px1) * (py2 - py1))
    return inter.div_(union.sub_(inter))


def match_priors(targets: PaddedTargets, priors_xyxy: Tensor, iou_threshold: float = 0.5) -> MatchResult:
    """SSD matching for a batch.

    Each prior takes the ground truth it overlaps most if that IoU is >= `iou_threshold` (> 0); then every
    ground truth claims its own best prior regardless of IoU (when two claim the same prior, the later box
    wins, as in the reference implementation). A box without area (see `has_area`) is left out: it would
    claim prior 0 with an unbounded size offset.
    """
    batch, slots = targets.labels.shape
    num_priors = priors_xyxy.shape[0]
    real_boxes = targets.boxes[targets.image_index, targets.slot_index]  # [M, 4]
    usable = has_area(real_boxes)
    # An empty box at the origin overlaps no prior (IoU 0, no NaN from an inverted box's negative area).
    real_boxes = torch.where(usable[:, None], real_boxes, 0.0)
    # IoU of the real boxes only (padding can double the work), written into a -1 filled padded tensor.
    real_iou = prior_iou(real_boxes, priors_xyxy)  # [M, P]
    iou = priors_xyxy.new_full((batch, slots, num_priors), -1.0)
    iou[targets.image_index, targets.slot_index] = real_iou
    best_gt_iou, best_gt = iou.max(dim=1)  # [B, P]

    # Each real box claims its best prior; for a prior claimed twice the highest slot wins (amax).
    best_prior = real_iou.argmax(dim=1)  # [M]
    claimed_by = torch.full((batch * num_priors,), -1, dtype=torch.int64, device=iou.device)
    flat_prior = targets.image_index * num_priors + best_prior
    claimant = targets.slot_index.masked_fill(~usable, -1)  # -1: claims nothing
    claimed_by = claimed_by.scatter_reduce(0, flat_prior, claimant, reduce="amax")
    claimed_by = claimed_by.view(batch, num_priors)
    forced = claimed_by >= 0
    best_gt = torch.where(forced, claimed_by, best_gt)
    best_gt_iou = best_gt_iou.masked_fill(forced, 2.0)

    labels = targets.labels.gather(1, best_gt)
    labels = labels.masked_fill(best_gt_iou < iou_threshold, 0)
    boxes = targets.boxes.gather(1, best_gt[..., None].expand(-1, -1, 4))
    return MatchResult(labels, boxes, best_gt_iou)
