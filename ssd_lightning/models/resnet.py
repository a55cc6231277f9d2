"""ResNet-50 base of NVIDIA's SSD300 v1.1 (DeepLearningExamples, PyTorch/Detection/SSD), built from
torchvision's `resnet50`.

The network keeps ResNet-50 up to conv4_x (`layer3`) and runs conv4_x's first block at stride 1, so the
single backbone source is 1024 channels at stride 8 (38x38 at 300 px), where VGG's conv4_3 would be;
conv5_x and the classifier are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import resnet50

from ssd_lightning.models.architecture import (
    Architecture,
    NetworkOptions,
    NetworkParts,
    PublishedDetector,
    torchvision_start,
)
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.neck import EXTRAS_RESNET50, SSDNeck
from ssd_lightning.models.pretrained import read_state_dict
from ssd_lightning.models.renaming import names_by_pattern, rename

# torchvision's module names, kept so that ImageNet weights load by name.
RESNET50_LAYERS = ("conv1", "bn1", "layer1", "layer2", "layer3")


class ResNet50Backbone(nn.Module):
    """conv1 .. conv4_x of ResNet-50 with conv4_x at stride 1; returns one source (stride 8, 1024 ch)."""

    out_channels = (1024,)

    def __init__(self) -> None:
        super().__init__()
        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        # Stride 1 in conv4_x: a 38x38 first source (torchvision's v1.5 blocks stride in conv2).
        first = self.layer3[0]
        first.conv1.stride = (1, 1)
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return [self.layer3(self.layer2(self.layer1(x)))]


def load_resnet50_backbone(
    backbone: ResNet50Backbone, weights: Mapping[str, Tensor] | str | Path
) -> list[str]:
    """Load ImageNet ResNet-50 weights (torchvision's `resnet50` state dict, or a file holding one) into
    `backbone`; returns the layers loaded (conv1, bn1, layer1, layer2, layer3). layer4 and fc are not used.
    """
    state = read_state_dict(weights)
    own = backbone.state_dict()
    mapped = {k: v for k, v in state.items() if k.split(".", 1)[0] in RESNET50_LAYERS}
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(
            f"not ResNet-50 weights: no tensors for {missing[:6]}; expected torchvision "
            "`resnet50().state_dict()` keys (conv1.*, bn1.*, layer1.* ...)"
        )
    wrong = sorted(k for k, v in mapped.items() if k not in own or v.shape != own[k].shape)
    if wrong:
        raise ValueError(f"not ResNet-50 weights: unknown keys or other shapes for {wrong[:6]}")
    backbone.load_state_dict(mapped)
    return list(RESNET50_LAYERS)


# NVIDIA's SSD300: `feature_extractor.feature_extractor` is `nn.Sequential(*resnet50().children()[:7])`
# (conv1, bn1, relu, maxpool, layer1..3); its extras have our BatchNorm block layout.
_NVIDIA_NAMES = (
    (r"feature_extractor\.feature_extractor\.0", "backbone.conv1"),
    (r"feature_extractor\.feature_extractor\.1", "backbone.bn1"),
    (r"feature_extractor\.feature_extractor\.4\.(.+)", r"backbone.layer1.\1"),
    (r"feature_extractor\.feature_extractor\.5\.(.+)", r"backbone.layer2.\1"),
    (r"feature_extractor\.feature_extractor\.6\.(.+)", r"backbone.layer3.\1"),
    (r"additional_blocks\.(\d+)\.(\d+)", r"neck.extras.\1.\2"),
    (r"loc\.(\d+)", r"heads.\1.loc"),
    (r"conf\.(\d+)", r"heads.\1.conf"),
)


def _box_major_to_ours(tensor: Tensor, boxes: int) -> Tensor:
    """Head weights/biases with output channels value * A + box (NVIDIA) -> box * V + value (ours)."""
    values = tensor.shape[0] // boxes
    return tensor.reshape(values, boxes, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _from_nvidia(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """NVIDIA's SSD300 v1.1 in our names. Its heads are box-major (loc viewed as [B, 4, A*H*W]: channel =
    value * A + box, priors box by box over each map), ours position-major (channel = box * 4 + value,
    priors cell by cell, then box): head channels are permuted so that each prior gets the prediction
    NVIDIA's model gives for the same default box."""
    # NVIDIA's DDP + AMP checkpoints may nest the model as "module.1." (as its torch.hub loader expects).
    state = {k.removeprefix("1."): v for k, v in state.items()}
    converted = rename(state, names_by_pattern(state, _NVIDIA_NAMES), "nvidia")
    for key, tensor in list(converted.items()):
        match = re.fullmatch(r"heads\.(\d+)\.(loc|conf)\.(weight|bias)", key)
        if match:
            boxes = converted[f"heads.{match[1]}.loc.bias"].shape[0] // 4
            converted[key] = _box_major_to_ours(tensor, boxes).contiguous()
    return converted


def _parts(options: NetworkOptions) -> NetworkParts:
    backbone = ResNet50Backbone()
    neck = SSDNeck(backbone.out_channels, EXTRAS_RESNET50, l2norm_first=False, batch_norm=True)
    return NetworkParts(backbone, neck, SSDHead)


ARCHITECTURE = Architecture(
    name="resnet50",
    parts=_parts,
    sizes=(300,),
    priors="coco",  # NVIDIA's default boxes (dboxes300_coco)
    imagenet=torchvision_start("resnet50", load_resnet50_backbone, "IMAGENET1K_V2"),
    detectors={"nvidia": PublishedDetector("nvidia_ssd300_resnet50", _from_nvidia)},
    description="NVIDIA's SSD300 v1.1: ResNet-50 to conv4_x at stride 8, BatchNorm extras",
)
