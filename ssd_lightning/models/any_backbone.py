"""SSD around a backbone that is not one of ours: timm's models and a backbone of the user's own.

Such a backbone returns its feature maps (channels in `out_channels`). SSD heads get the BatchNorm extra
layers of `SSDNeck` after its last map; SSDLite heads get SSDLite's separable extras.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssd_lightning.models.architecture import NetworkOptions, NetworkParts
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.neck import SSDNeck
from ssd_lightning.models.ssdlite import SSDLiteHead, SSDLiteNeck
from ssd_lightning.plugins import build_plugin, is_spec

# A backbone of the user's own: the module, or its spec {"_target_": "package.module.Class", **arguments}.
Backbone = nn.Module | Mapping[str, Any]
Extras = tuple[tuple[int, int, int, int, int], ...]  # SSDNeck's (mid, out, kernel, stride, padding)


def halving_extras(channels: int, side: int) -> Extras:
    """Stride-2 extras from a map of `side` x `side` down to 1x1 (the compact model's rule)."""
    count = 0
    while side > 1:
        side, count = math.ceil(side / 2), count + 1
    return tuple((channels // 2, channels, 3, 2, 1) for _ in range(count))


def parts_around(backbone: nn.Module, head: str, extras: Extras) -> NetworkParts:
    """The neck and heads of `head` ("ssd": `extras` after the last map; "ssdlite": SSDLite's own)."""
    if head == "ssdlite":
        return NetworkParts(backbone, SSDLiteNeck(backbone.out_channels), SSDLiteHead)
    neck = SSDNeck(backbone.out_channels, extras, l2norm_first=False, batch_norm=True)
    return NetworkParts(backbone, neck, SSDHead)


def plugin_parts(backbone: Backbone, options: NetworkOptions) -> NetworkParts:
    """The network around a backbone of the user's own (built from its spec), extras halving to 1x1."""
    if is_spec(backbone):
        backbone = build_plugin(backbone, nn.Module, "model.net.backbone")
    if not isinstance(getattr(backbone, "out_channels", None), Sequence):
        raise ValueError(
            f"model.net.backbone {type(backbone).__qualname__} needs `out_channels`: the channels of the "
            "feature maps its forward returns, in order (the SSD heads read them)"
        )
    head = options.head or "ssd"
    if head == "ssdlite":
        return parts_around(backbone, head, ())
    with torch.no_grad():  # the last map's side decides how many extras halve it to 1x1
        side = backbone.eval()(torch.zeros(1, 3, options.size, options.size))[-1].shape[-1]
    backbone.train()
    return parts_around(backbone, head, halving_extras(backbone.out_channels[-1], side))
