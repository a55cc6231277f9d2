"""torchvision's `ssd300_vgg16` and `ssdlite320_mobilenet_v3_large` driven the way our model is: on resized,
normalised batches.

Its `forward` also runs `GeneralizedRCNNTransform` (normalise + resize of a list of images), which in our
framework is data-pipeline work, so the steps of its forward are called here one by one instead: backbone,
head, default boxes, `proposal_matcher` on `box_iou`, `compute_loss`, `postprocess_detections`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from ssd_lightning.benchmark.workloads import Targets

REFERENCE_IMAGE_SIZE = 300
# Our arch -> the input size of torchvision's model of that arch (both are fixed-size models).
REFERENCE_IMAGE_SIZES = {"vgg16": 300, "mobilenet_v3_large": 320}


class TorchvisionNetwork(nn.Module):
    """Backbone + head of a torchvision SSD as one module (what `torch.compile` gets on their side)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        features = list(self.backbone(images).values())
        return self.head(features), features


class TorchvisionSSD:
    """A randomly initialised torchvision SSD300-VGG16 or SSDLite320-MobileNetV3 (`arch` as our build_ssd
    names it; all layers trainable) and its loss/detection steps."""

    def __init__(self, num_classes: int, arch: str = "vgg16") -> None:
        builders = {"vgg16": ssd300_vgg16, "mobilenet_v3_large": ssdlite320_mobilenet_v3_large}
        if arch not in builders:
            raise ValueError(f"torchvision has no SSD of arch {arch!r}; one of {sorted(builders)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no pretrained weights: all layers trainable" notices
            self.model = builders[arch](weights=None, weights_backbone=None, num_classes=num_classes)
        self.arch = arch
        self.image_size = REFERENCE_IMAGE_SIZES[arch]
        self.network = TorchvisionNetwork(self.model.backbone, self.model.head)

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.model.to(device=device, memory_format=memory_format)

    def default_boxes(self, images: Tensor, features: list[Tensor]) -> list[Tensor]:
        """Their anchors for the batch, generated per call as their forward does."""
        sizes = [(images.shape[-2], images.shape[-1])] * images.shape[0]
        return self.model.anchor_generator(ImageList(images, sizes), features)

    def match(self, targets: Targets, anchors: list[Tensor]) -> list[Tensor]:
        """Per image: index of the matched ground truth per anchor (-1 background), as in their forward."""
        matched = []
        for target, image_anchors in zip(targets, anchors, strict=True):
            if target["boxes"].numel() == 0:
                matched.append(torch.full((image_anchors.shape[0],), -1, device=image_anchors.device))
            else:
                matched.append(self.model.proposal_matcher(box_iou(target["boxes"], image_anchors)))
        return matched

    def loss(self, loc: Tensor, conf: Tensor, anchors: list[Tensor], targets: Targets) -> dict[str, Tensor]:
        """Matching + `compute_loss` on pixel-space targets; {"bbox_regression", "classification"}."""
        head_outputs = {"bbox_regression": loc, "cls_logits": conf}
        return self.model.compute_loss(targets, head_outputs, anchors, self.match(targets, anchors))

    def training_loss(self, network: nn.Module, images: Tensor, targets: Targets) -> Tensor:
        """Their training forward (minus the input transform): network, anchors, matching, loss."""
        head_outputs, features = network(images)
        anchors = self.default_boxes(images, features)
        losses = self.model.compute_loss(targets, head_outputs, anchors, self.match(targets, anchors))
        return losses["bbox_regression"] + losses["classification"]

    def detections(
        self, loc: Tensor, conf: Tensor, anchors: list[Tensor], image_size: int
    ) -> list[dict[str, Tensor]]:
        """`postprocess_detections` on raw head outputs; boxes in pixels."""
        head_outputs = {"bbox_regression": loc, "cls_logits": conf}
        return self.model.postprocess_detections(
            head_outputs, anchors, [(image_size, image_size)] * len(anchors)
        )

    def infer(self, network: nn.Module, images: Tensor) -> list[dict[str, Tensor]]:
        """Their inference forward (minus the input/output transforms): network, anchors, post-processing."""
        head_outputs, features = network(images)
        anchors = self.default_boxes(images, features)
        return self.model.postprocess_detections(
            head_outputs, anchors, [(images.shape[-2], images.shape[-1])] * images.shape[0]
        )
