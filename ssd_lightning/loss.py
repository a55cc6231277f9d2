"""MultiBoxLoss: Smooth L1 localisation + softmax confidence with 3:1 hard negative mining.

Hard negative mining is written here since no library provides SSD's per-image ranking; it is one sort
(or top-k) over the whole batch. With static shapes (see `MultiBoxLoss`) it selects with masks instead of
boolean indexing, so the loss never synchronises with the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd_lightning.boxes import (
    DEFAULT_VARIANCES,
    Variances,
    cxcywh_to_xyxy,
    encode,
    has_area,
    match_priors,
    pad_targets,
)


def _static_shapes(static_shapes: bool | None, tensor: Tensor) -> bool:
    """None means: static shapes on accelerators (no host sync), data-dependent ones on the CPU (faster)."""
    return tensor.device.type != "cpu" if static_shapes is None else static_shapes


def hard_negative_mask(
    background_loss: Tensor,
    positives: Tensor,
    neg_pos_ratio: float,
    min_negatives: int,
    static_shapes: bool | None = None,
) -> Tensor:
    """Per image, the `neg_pos_ratio * num_positives` (at least `min_negatives`) negatives of highest loss.

    background_loss: [B, P] cross-entropy of each prior against the background class (positives ignored).
    positives: [B, P] bool. Returns a [B, P] bool mask of the chosen negatives; among negatives of equal
    loss the lower prior indices are chosen, so both `static_shapes` modes (see `MultiBoxLoss`) choose the
    same ones on any device.
    """
    num_priors = positives.shape[1]
    num_pos = positives.sum(dim=1, keepdim=True)
    num_neg = (num_pos * neg_pos_ratio).long().clamp(min=min_negatives).clamp(max=num_priors - num_pos)
    candidate_loss = background_loss.masked_fill(positives, float("-inf"))
    static = _static_shapes(static_shapes, candidate_loss)
    # Reading the largest count on the host allows a top-k instead of a full sort, several times faster
    # on a CPU.
    if not static:
        # One more than the largest count: the loss after each row's last choice tells about ties.
        ranked, order = candidate_loss.topk(min(int(num_neg.max()) + 1, num_priors), dim=1)
    else:
        ranked = candidate_loss.sort(dim=1, descending=True).values
    kth = ranked.gather(1, (num_neg - 1).clamp(min=0))  # each row's num_neg-th largest loss
    if not static:
        # topk's choice is the rule's unless the next loss equals the last chosen one (a tie across the
        # boundary, which topk breaks arbitrarily): then the general rule below.
        following = ranked.gather(1, num_neg.clamp(max=ranked.shape[1] - 1))
        if not ((num_neg > 0) & (num_neg < ranked.shape[1]) & (following == kth)).any():
            chosen = torch.arange(order.shape[1], device=order.device) < num_neg
            return torch.zeros_like(positives).scatter_(1, order, chosen)
    # Everything above the k-th largest loss, then the lowest-index ties at it: topk and an unstable
    # sort order equal values arbitrarily (and differently), so their indices are not used.
    above = candidate_loss > kth
    tied = candidate_loss == kth
    tied_wanted = num_neg - above.sum(dim=1, keepdim=True)
    return (above | (tied & (tied.cumsum(dim=1) <= tied_wanted))) & (num_neg > 0)


class MultiBoxLoss(nn.Module):
    """The SSD training objective.

    Returns `(loss_loc, loss_conf)` in float32, each summed over the batch and divided by the number of
    matched (positive) priors in the batch; their sum is the paper's L (alpha = 1). An image without
    objects adds only its `min_negatives` hardest negatives. A batch without any positive is divided by
    its number of images instead: each of its images brings `min_negatives` negatives, by default as many
    as one object would, so its loss is about the negative part of a normal batch's whatever the batch
    size.

    Ground-truth boxes without area are left out (they would claim a prior with an unbounded offset),
    with a warning when the boxes are on the CPU (checking device tensors would wait on the device).

    `static_shapes`: True computes with masks and fixed shapes only (no host synchronisation, what an
    accelerator and CUDA graphs want); False selects the positive priors and the top-k negatives by their
    counts (data-dependent shapes, about 1.7x faster on a CPU); None (default) picks by the device.
    Both give the same losses and gradients, in float32 whatever the dtype of the predictions and boxes.

    `class_weights`: one weight per object class (labels 1..C-1, in order) multiplying the classification
    loss of the priors matched to that class, for rare classes; background priors keep weight 1 and the
    normaliser stays the number of positives, so all-ones weights are the paper's loss exactly.
    """

    def __init__(
        self,
        num_classes: int,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        variances: Variances = DEFAULT_VARIANCES,
        min_negatives: int | None = None,
        static_shapes: bool | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        weights = None
        if class_weights is not None:
            weights = torch.tensor([1.0, *(float(w) for w in class_weights)], dtype=torch.float32)
            if len(weights) != num_classes or not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(
                    f"model.loss.class_weights needs {num_classes - 1} finite weights >= 0 (one per class of "
                    f"dataset.classes, in order), got {list(class_weights)}"
                )
        self.register_buffer("class_weights", weights, persistent=False)
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.variances = tuple(variances)
        # Negatives for an image with no positive: as many as one object would bring.
        self.min_negatives = int(neg_pos_ratio) if min_negatives is None else min_negatives
        self.static_shapes = static_shapes

    def forward(
        self, loc: Tensor, conf: Tensor, priors: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """loc [B,P,4], conf [B,P,C] logits, priors [P,4] cxcywh, targets: list of {"boxes","labels"}."""
        if conf.shape[-1] != self.num_classes:
            raise ValueError(
                f"conf has {conf.shape[-1]} classes but the loss was built for {self.num_classes}"
            )
        if loc.shape[1] != priors.shape[0] or conf.shape[1] != priors.shape[0]:
            raise ValueError(
                f"predictions cover {loc.shape[1]} priors but {priors.shape[0]} priors were given"
            )
        if len(targets) != loc.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {loc.shape[0]} images")

        padded = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets])
        if padded.boxes.device.type == "cpu" and not torch.compiler.is_compiling():
            _warn_about_empty_boxes(padded.boxes[padded.image_index, padded.slot_index])
        with torch.no_grad():
            matched = match_priors(padded, cxcywh_to_xyxy(priors), self.iou_threshold)
        positives = matched.labels > 0
        num_pos = positives.sum()
        # No positive: per image instead (see the class docstring); torch.where keeps it on the device.
        normaliser = torch.where(num_pos > 0, num_pos, loc.shape[0]).float()
        loss_loc = self._localisation_loss(loc, priors, matched.boxes, positives) / normaliser

        batch, num_priors, num_classes = conf.shape
        ce = F.cross_entropy(
            conf.reshape(-1, num_classes).float(), matched.labels.reshape(-1), reduction="none"
        ).reshape(batch, num_priors)
        # Unmatched priors have label 0, so their cross-entropy is already the background loss to rank by.
        negatives = hard_negative_mask(
            ce.detach(), positives, self.neg_pos_ratio, self.min_negatives, self.static_shapes
        )
        if self.class_weights is not None:  # background's weight is 1: the mined negatives are unchanged
            ce = ce * self.class_weights[matched.labels]
        # torch.where, not a product with the mask: a non-finite loss of an unchosen prior times 0 is NaN.
        loss_conf = torch.where(positives | negatives, ce, 0.0).sum() / normaliser
        return loss_loc, loss_conf

    def _localisation_loss(self, loc: Tensor, priors: Tensor, boxes: Tensor, positives: Tensor) -> Tensor:
        """Smooth L1 between predicted and encoded matched boxes, summed over the positive priors."""
        if not _static_shapes(self.static_shapes, loc):
            # Encode and compare the ~1% positive priors only (on the CPU `nonzero` waits for nothing).
            image, prior = positives.nonzero(as_tuple=True)
            with torch.no_grad():
                target = encode(boxes[image, prior], priors[prior], self.variances)
            return F.smooth_l1_loss(loc[image, prior].float(), target, reduction="sum")
        # Masks keep the shapes static: no host synchronisation. Background priors' targets are
        # meaningless (encoded padding) and their predictions may overflow in float16: torch.where, not a
        # product with the mask (inf * 0 is NaN).
        with torch.no_grad():
            target = encode(boxes, priors, self.variances)
        loss = F.smooth_l1_loss(loc.float(), target, reduction="none").sum(dim=-1)
        return torch.where(positives, loss, 0.0).sum()


def _warn_about_empty_boxes(boxes: Tensor) -> None:
    empty = ~has_area(boxes)
    if empty.any():
        first = [round(v, 4) for v in boxes[empty][0].tolist()]
        warnings.warn(
            f"MultiBoxLoss: left out {int(empty.sum())} ground-truth box(es) without area "
            f"(xmax <= xmin or ymax <= ymin), e.g. {first}",
            stacklevel=3,
        )
