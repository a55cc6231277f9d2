"""ResNet-50 base of NVIDIA's SSD300 v1.1 (DeepLearningExamples, PyTorch/Detection/SSD), built from
torchvision's `resnet50`.

The network keeps ResNet-50 up to conv4_x (`layer3`) and runs conv4_x's first block at stride 1, so the
single backbone source is 1024 channels at stride 8 (38x38 at 300 px), where VGG's conv4_3 would be;
conv5_x and the classifier are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import resnet50

from ssd_lightning.models.pretrained import read_state_dict

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
