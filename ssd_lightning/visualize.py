"""Detections drawn on images (torchvision's drawing utilities): each class in its own colour with its
name and score above a display threshold, the ground truth, when given, drawn faintly underneath."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

#: Scores below this are not drawn (files of detections keep everything above the model's threshold).
DISPLAY_THRESHOLD = 0.4
TRUTH_COLOUR = (215, 215, 215)
# Distinct, saturated colours for the first classes; further classes reuse them.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)  # fmt: skip


def class_colour(label: int) -> tuple[int, int, int]:
    """The colour of label `label` (1..C-1)."""
    return _PALETTE[(label - 1) % len(_PALETTE)]


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    display_threshold: float = DISPLAY_THRESHOLD,
    truth_boxes: Tensor | None = None,
) -> Tensor:
    """`image` (uint8 [3,H,W]) with the detections scoring >= `display_threshold`; boxes are xyxy pixels.

    The ground truth (`truth_boxes`) is drawn first, thin and pale, so detections stay readable on top.
    """
    drawn = image
    if truth_boxes is not None and len(truth_boxes):
        drawn = draw_bounding_boxes(drawn, truth_boxes.float(), colors=TRUTH_COLOUR, width=1)
    keep = scores >= display_threshold
    if keep.any():
        kept_labels = labels[keep].tolist()
        captions = [
            f"{class_names[label - 1]} {score:.2f}"
            for label, score in zip(kept_labels, scores[keep].tolist(), strict=True)
        ]
        drawn = draw_bounding_boxes(
            drawn,
            boxes[keep].float(),
            labels=captions,
            colors=[class_colour(label) for label in kept_labels],
            width=2,
        )
    return drawn


def upscale(image: Tensor, boxes: Sequence[Tensor], min_side: int) -> tuple[Tensor, list[Tensor]]:
    """`image` (uint8 [3,H,W]) enlarged so its shorter side is at least `min_side`, and `boxes` (xyxy
    pixels) with it: drawn captions stay legible on the small inputs of a compact model."""
    factor = max(1, -(-min_side // min(image.shape[-2:])))
    if factor == 1:
        return image, list(boxes)
    large = torch.nn.functional.interpolate(image[None].float(), scale_factor=factor, mode="bilinear")
    return large[0].round().clamp(0, 255).to(torch.uint8), [b * factor for b in boxes]


def image_grid(images: Sequence[Tensor], columns: int = 4) -> Tensor:
    """Equal-sized uint8 [3,H,W] images in a grid (white gaps), for one picture of a batch of results."""
    return make_grid(list(images), nrow=columns, padding=6, pad_value=255)


def batch_samples(
    batch: tuple[Tensor, Sequence[Mapping[str, Any]]],
    detections: Sequence[Mapping[str, Any]],
    mean: Sequence[float],
    std: Sequence[float],
    count: int,
) -> list[tuple[np.ndarray, Mapping[str, Any], Mapping[str, Any]]]:
    """Up to `count` (uint8 HxWx3 RGB image, target, detections) of a batch and its detections: what the
    pictures of a validation or test pass are drawn from."""
    images, targets = batch
    samples = list(zip(images, targets, detections, strict=True))[: max(count, 0)]
    return [(denormalize(image, mean, std), target, found) for image, target, found in samples]


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised [3,H,W] image back to uint8 HxWx3 RGB (mean/std on the 0-255 scale); uint8 pixels
    (the data module's images before `SSDLitModule` normalises them) are only transposed."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).cpu().numpy()
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    pixels = (image.float() * std_t + mean_t).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()
