"""Any timm model as the SSD backbone: `arch="timm:<name>"` (`timm:resnet18`, `timm:convnext_atto`,
`timm:efficientnet_b0`, ...), on timm's `features_only` model.

SSD heads (`head="ssd"`) read the stride-8 and stride-16 maps, where the paper reads VGG16's conv4_3 and
conv7, followed by the paper's extra layers at 300 and 512 px (so the paper's prior sizes fit: 38, 19, 10, 5,
3, 1 maps at 300) and by halving extras at other sizes. SSDLite heads (`head="ssdlite"`) read the stride-16
and stride-32 maps, as torchvision's SSDLite reads MobileNetV3's, followed by its separable extras (20, 10,
5, 3, 2, 1 at 320 px). The extras have BatchNorm, as the backbones do. ImageNet weights (`backbone_weights:
timm`, or a file of the model's state dict) come from timm, with the input normalisation of timm's
pretrained config.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd_lightning.models.any_backbone import halving_extras, parts_around
from ssd_lightning.models.architecture import (
    HEAD_STYLES,
    Architecture,
    ImageNetStart,
    NetworkOptions,
    NetworkParts,
    is_file_like,
)
from ssd_lightning.models.neck import EXTRAS_SSD300, EXTRAS_SSD512
from ssd_lightning.models.pretrained import PixelNormalization

TIMM_PREFIX = "timm:"
TIMM_WEIGHTS = "timm"  # model.backbone_weights: timm's own pretrained weights of the model
_STRIDES = {"ssd": (8, 16), "ssdlite": (16, 32)}


class TimmBackbone(nn.Module):
    """timm's `features_only` model `name`: its feature maps at `strides`, with their `out_channels`."""

    def __init__(self, name: str, strides: tuple[int, ...] = (8, 16), pretrained: bool = False) -> None:
        super().__init__()
        import timm

        self.name, self.strides = name, tuple(strides)
        reductions = timm.create_model(name, features_only=True, pretrained=False).feature_info.reduction()
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f"timm:{name} has no feature map at stride {missing} (it has {reductions})")
        indices = tuple(reductions.index(s) for s in strides)
        self.body = timm.create_model(name, features_only=True, out_indices=indices, pretrained=pretrained)
        self.out_channels = tuple(self.body.feature_info.channels())

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))


def _normalization(name: str) -> PixelNormalization:
    import timm

    config = timm.get_pretrained_cfg(name)
    mean, std = (tuple(255.0 * v for v in values) for values in (config.mean, config.std))
    return PixelNormalization(mean, std, f"timm {name} pretrained cfg")


def load_timm_backbone(backbone: TimmBackbone, weights: str | Path) -> list[str]:
    """timm's pretrained weights of the model (`weights="timm"`, downloaded from timm's hub on first use) or
    a file holding its state dict, into `backbone`; returns the layers loaded."""
    if is_file_like(weights):
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
    else:
        try:
            state = TimmBackbone(backbone.name, backbone.strides, pretrained=True).state_dict()
        except Exception as error:  # no network, no such pretrained tag
            raise RuntimeError(
                f"could not download timm's pretrained weights of {backbone.name} ({type(error).__name__}: "
                f"{error}). Offline? Save `timm.create_model('{backbone.name}', pretrained=True)"
                ".state_dict()` on a connected machine and pass model.backbone_weights=/path/to/that.pth, "
                "or train from scratch with model.backbone_weights=null"
            ) from error
        state = {key.removeprefix("body."): value for key, value in state.items()}
    own = backbone.body.state_dict()
    loaded = sorted({key.split(".")[0] for key in state if key in own})
    if not loaded:
        raise ValueError(
            f"model.backbone_weights={weights}: none of its tensors is a weight of timm's {backbone.name} "
            "(expected the state dict of timm.create_model(name) or of its features_only model)"
        )
    # A full model's layers past the last map read (its classifier too) have no place here.
    backbone.body.load_state_dict({key: value for key, value in state.items() if key in own}, strict=False)
    return loaded


def timm_architecture(name: str) -> Architecture:
    """The architecture `timm:<name>` (see the module docstring)."""

    def parts(options: NetworkOptions) -> NetworkParts:
        head = options.head or "ssd"
        backbone = TimmBackbone(name, _STRIDES[head])
        extras = {300: EXTRAS_SSD300, 512: EXTRAS_SSD512}.get(options.size)
        if extras is None:
            extras = halving_extras(backbone.out_channels[-1], math.ceil(options.size / _STRIDES[head][-1]))
        return parts_around(backbone, head, extras)

    def normalization(weights: str | Path) -> PixelNormalization | None:
        if not is_file_like(weights) and weights != TIMM_WEIGHTS:
            raise ValueError(
                f"model.backbone_weights={weights}: timm:{name} starts from timm's own ImageNet weights "
                f"(model.backbone_weights={TIMM_WEIGHTS}), a file of its state dict, or null (from scratch)"
            )
        return _normalization(name)  # a file of the model's own weights: the same convention

    return Architecture(
        name=f"{TIMM_PREFIX}{name}",
        parts=parts,
        priors="scales",
        heads=HEAD_STYLES,  # SSD's first
        named_priors="sizes",
        imagenet=ImageNetStart(normalization, load_timm_backbone, TIMM_WEIGHTS),
        description=f"timm's {name} (features_only)",
    )
