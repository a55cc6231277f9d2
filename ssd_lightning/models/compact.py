"""A compact SSD backbone (BatchNorm, ~3M parameters) that trains on a laptop CPU in minutes.

It keeps SSD's structure (two backbone sources at strides 8 and 16, extras, one head per source) so every
other part of the framework is exercised unchanged; it is for the built-in data, demos and tests, not for
paper results.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssd_lightning.models.architecture import Architecture, NetworkOptions, NetworkParts
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.neck import SSDNeck


def _conv_bn(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CompactBackbone(nn.Module):
    """Plain conv/BN/ReLU stages; returns the stride-8 and stride-16 feature maps."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.to_stride8 = nn.Sequential(
            *_conv_bn(3, width, 2),
            *_conv_bn(width, 2 * width, 2),
            *_conv_bn(2 * width, 2 * width, 1),
            *_conv_bn(2 * width, 4 * width, 2),
            *_conv_bn(4 * width, 4 * width, 1),
        )
        self.to_stride16 = nn.Sequential(
            *_conv_bn(4 * width, 8 * width, 2), *_conv_bn(8 * width, 8 * width, 1)
        )
        self.out_channels = (4 * width, 8 * width)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> list[Tensor]:
        stride8 = self.to_stride8(images)
        return [stride8, self.to_stride16(stride8)]


def compact_extras(width: int = 32, count: int = 4) -> tuple[tuple[int, int, int, int, int], ...]:
    """Stride-2 extra layers, each halving the map (rounding up) down to 1x1."""
    return tuple((4 * width, 8 * width, 3, 2, 1) for _ in range(count))


def _parts(options: NetworkOptions) -> NetworkParts:
    backbone = CompactBackbone(options.width)
    neck = SSDNeck(backbone.out_channels, compact_extras(options.width), l2norm_first=False)
    return NetworkParts(backbone, neck, SSDHead)


ARCHITECTURE = Architecture(
    name="compact",
    parts=_parts,
    priors="scales",
    named_priors="ignored",  # the dataset's preset name (model.net.prior_preset_name) is for SSD300/512
    description="a small BatchNorm network for CPU training at any size (width: first-layer channels)",
)
