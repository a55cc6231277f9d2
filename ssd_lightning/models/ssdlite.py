"""SSDLite's depthwise-separable layers (MobileNetV2 paper, section 6.2): the extra feature blocks (the
neck) and the prediction heads, laid out as in torchvision's `ssdlite320_mobilenet_v3_large`.

Every regular conv of SSDLite is replaced by a 3x3 depthwise conv and 1x1 pointwise convs, which cuts the
heads' and extras' cost by an order of magnitude compared with SSD's 3x3 convs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from ssd_lightning.models.heads import SSDHead

# torchvision's SSDLite BatchNorm: eps of the TensorFlow models, and a faster running-statistics update
# than PyTorch's default for its long, small-batch-per-GPU training.
BN_EPS = 0.001
BN_MOMENTUM = 0.03
# Output channels of the four extra blocks (maps 5, 3, 2, 1 at 320 px).
SSDLITE_EXTRAS = (512, 256, 256, 128)


def ssdlite_batch_norm(channels: int) -> nn.BatchNorm2d:
    """The BatchNorm of every SSDLite layer, backbone included."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """torchvision's SSDLite initialisation of every conv under `module`: N(0, 0.03) weights, zero bias."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> Conv2dNormActivation:
    return Conv2dNormActivation(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        groups=groups,
        norm_layer=ssdlite_batch_norm,
        activation_layer=nn.ReLU6,
    )


def ssdlite_extra_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 to half the output channels, 3x3 depthwise stride 2, 1x1 to the output; each with BN + ReLU6."""
    middle = out_channels // 2
    return nn.Sequential(
        _conv_bn_relu6(in_channels, middle, 1),
        _conv_bn_relu6(middle, middle, 3, stride=2, groups=middle),
        _conv_bn_relu6(middle, out_channels, 1),
    )


class SSDLiteNeck(nn.Module):
    """Passes the backbone sources through and appends the separable extra blocks' outputs (no L2Norm)."""

    def __init__(self, backbone_channels: Sequence[int], extras: Sequence[int] = SSDLITE_EXTRAS) -> None:
        super().__init__()
        blocks = []
        in_channels = backbone_channels[-1]
        for out_channels in extras:
            blocks.append(ssdlite_extra_block(in_channels, out_channels))
            in_channels = out_channels
        self.extras = nn.ModuleList(blocks)
        self.out_channels = tuple(backbone_channels) + tuple(extras)
        normal_init(self.extras)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        sources = list(features)
        x = features[-1]
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources


def separable_predictor(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 depthwise conv with BN + ReLU6, then a 1x1 conv (with bias) to the predictions."""
    return nn.Sequential(
        _conv_bn_relu6(in_channels, in_channels, 3, groups=in_channels),
        nn.Conv2d(in_channels, out_channels, 1),
    )


class SSDLiteHead(nn.Module):
    """The loc and conf branches of one source, depthwise-separable; channels are (box, value) per position
    as in `SSDHead`, so the outputs and the prior order are the same."""

    def __init__(self, in_channels: int, boxes_per_location: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loc = separable_predictor(in_channels, boxes_per_location * 4)
        self.conf = separable_predictor(in_channels, boxes_per_location * num_classes)
        normal_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return SSDHead._flatten(self.loc(x), 4), SSDHead._flatten(self.conf(x), self.num_classes)
