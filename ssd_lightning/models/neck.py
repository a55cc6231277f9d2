"""The SSD neck: L2 normalisation of the conv4_3 source and the extra feature layers (SSDLite's separable
extras are in `ssdlite`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class L2Norm(nn.Module):
    """Per-position L2 normalisation across channels with a learned per-channel scale (ParseNet).

    conv4_3's activations are much larger than the deeper sources'; normalising them keeps the heads'
    inputs on one scale. The scale starts at 20 as in the paper.
    """

    def __init__(self, channels: int, initial_scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(initial_scale)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


def extra_block(
    in_channels: int,
    mid_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    batch_norm: bool = False,
) -> nn.Sequential:
    """One extra source: a 1x1 bottleneck then a 3x3 (or 4x4) conv that shrinks the map; with `batch_norm`
    each conv (then without bias) is followed by BatchNorm, as in NVIDIA's SSD300 v1.1."""

    def conv(cin: int, cout: int, kernel: int, **options: int) -> list[nn.Module]:
        if batch_norm:
            return [nn.Conv2d(cin, cout, kernel, bias=False, **options), nn.BatchNorm2d(cout)]
        return [nn.Conv2d(cin, cout, kernel, **options)]

    return nn.Sequential(
        *conv(in_channels, mid_channels, 1),
        nn.ReLU(inplace=True),
        *conv(mid_channels, out_channels, kernel_size, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


# (mid, out, kernel, stride, padding) of conv8..conv11 (SSD300) and conv8..conv12 (SSD512).
EXTRAS_SSD300 = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
EXTRAS_SSD512 = (
    (256, 512, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 4, 1, 1),
)
# NVIDIA's SSD300 v1.1 on ResNet-50's 1024-channel conv4_x: maps 19, 10, 5, 3, 1 (with BatchNorm).
EXTRAS_RESNET50 = (
    (256, 512, 3, 2, 1),
    (256, 512, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 1, 0),
    (128, 256, 3, 1, 0),
)


class SSDNeck(nn.Module):
    """Takes the backbone sources, L2-normalises the first (optional), appends the extra layers' outputs
    (with BatchNorm after each conv if `batch_norm`)."""

    def __init__(
        self,
        backbone_channels: Sequence[int],
        extras: Sequence[tuple[int, int, int, int, int]],
        l2norm_first: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.l2norm = L2Norm(backbone_channels[0]) if l2norm_first else None
        blocks = []
        in_channels = backbone_channels[-1]
        for mid, out, kernel, stride, padding in extras:
            blocks.append(extra_block(in_channels, mid, out, kernel, stride, padding, batch_norm))
            in_channels = out
        self.extras = nn.ModuleList(blocks)
        self.out_channels = tuple(backbone_channels) + tuple(e[1] for e in extras)
        for module in self.extras.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        sources = list(features)
        if self.l2norm is not None:
            sources[0] = self.l2norm(sources[0])
        x = features[-1]
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources
