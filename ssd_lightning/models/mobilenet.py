"""MobileNetV3-Large base of SSDLite (torchvision's `ssdlite320_mobilenet_v3_large`), built from
torchvision's own `mobilenet_v3_large` blocks.

The two sources follow the MobileNetV3 paper (section 6.3): the expansion conv of the first stride-32 block
(672 channels at stride 16, the "C4" source) and the last conv (stride 32). With `reduced_tail` the blocks
after C4 have half the channels (paper's Table 6), so the last source has 480 channels instead of 960.
torchvision uses the reduced tail whenever it gets no ImageNet backbone weights (`weights_backbone=None`,
as for its COCO weights `SSDLite320_MobileNet_V3_Large_Weights.COCO_V1`) and the full tail when it starts
from ImageNet weights, which only exist for the full tail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large

from ssd_lightning.models.architecture import (
    Architecture,
    NetworkOptions,
    NetworkParts,
    PublishedDetector,
    torchvision_start,
)
from ssd_lightning.models.pretrained import read_state_dict
from ssd_lightning.models.renaming import names_by_pattern, rename
from ssd_lightning.models.ssdlite import SSDLiteHead, SSDLiteNeck, normal_init, ssdlite_batch_norm


def _is_strided(block: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in block.modules())


class MobileNetV3Backbone(nn.Module):
    """Returns the two MobileNetV3-Large sources of SSDLite: C4's expansion (stride 16, 672 channels) and the
    last conv (stride 32; 480 channels with the reduced tail, 960 without)."""

    def __init__(
        self,
        reduced_tail: bool = True,
        norm_layer: Callable[[int], nn.Module] = ssdlite_batch_norm,
    ) -> None:
        super().__init__()
        features = mobilenet_v3_large(weights=None, reduced_tail=reduced_tail, norm_layer=norm_layer).features
        # The C4 block is the last strided one; torchvision's weights index blocks as features.N.
        self.c4_index = max(i for i, block in enumerate(features) if i > 0 and _is_strided(block))
        c4 = features[self.c4_index]
        if c4.use_res_connect:
            raise ValueError("the C4 block of MobileNetV3 must not be residual")
        self.to_stride16 = nn.Sequential(*features[: self.c4_index], c4.block[0])
        self.to_stride32 = nn.Sequential(c4.block[1:], *features[self.c4_index + 1 :])
        self.reduced_tail = reduced_tail
        self.out_channels = (c4.block[0].out_channels, features[-1].out_channels)
        normal_init(self)  # torchvision's SSDLite init of a backbone without ImageNet weights

    def forward(self, images: Tensor) -> list[Tensor]:
        c4 = self.to_stride16(images)
        return [c4, self.to_stride32(c4)]

    def our_key(self, torchvision_key: str) -> str | None:
        """Our name for a key of torchvision's `mobilenet_v3_large().state_dict()` (None: not ours, such as
        the classifier)."""
        match = re.fullmatch(r"features\.(\d+)\.(.+)", torchvision_key)
        if match is None:
            return None
        index, rest = int(match[1]), match[2]
        if index < self.c4_index:
            return f"to_stride16.{index}.{rest}"
        if index > self.c4_index:
            return f"to_stride32.{index - self.c4_index}.{rest}"
        layer = re.fullmatch(r"block\.(\d+)\.(.+)", rest)
        if layer is None:
            return None
        if layer[1] == "0":  # the expansion conv ends the first stage
            return f"to_stride16.{index}.{layer[2]}"
        return f"to_stride32.0.{layer[1]}.{layer[2]}"  # a slice of the block keeps its indices


def load_mobilenet_v3_backbone(
    backbone: MobileNetV3Backbone, weights: Mapping[str, Tensor] | str | Path
) -> list[str]:
    """Load ImageNet MobileNetV3-Large weights (torchvision's `mobilenet_v3_large` state dict, or a file
    holding one) into `backbone`; returns the torchvision block names loaded (features.0 .. features.16).

    Every backbone tensor must come from the file. torchvision's ImageNet weights have the full tail: build
    the model with `reduced_tail=False` for them. The classifier is not used.
    """
    state = read_state_dict(weights)
    mapped: dict[str, Tensor] = {}
    blocks: set[str] = set()
    for key, tensor in state.items():
        ours = backbone.our_key(key)
        if ours is not None:
            mapped[ours] = tensor
            blocks.add(".".join(key.split(".")[:2]))
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    if not mapped or missing:
        raise ValueError(
            f"not MobileNetV3-Large weights: no tensors for {missing[:6]}; expected torchvision "
            "`mobilenet_v3_large().state_dict()` keys (features.N.*)"
        )
    wrong = [k for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if wrong:
        tail = "full (960-channel)" if not backbone.reduced_tail else "reduced (480-channel)"
        raise ValueError(
            f"MobileNetV3 weights do not fit this backbone's {tail} tail: shapes differ for {wrong[:4]}; "
            "torchvision's ImageNet weights need build_ssd(..., reduced_tail=False)"
        )
    backbone.load_state_dict({k: v for k, v in mapped.items() if k in own})
    return sorted(blocks, key=lambda name: int(name.split(".")[1]))


# torchvision's SSDLite: its backbone's two stages are ours in the same order (torchvision's `features.0`
# ends with C4's expansion conv, as our `to_stride16` does); extras and heads keep their inner layout.
_TORCHVISION_NAMES = (
    (r"backbone\.features\.0\.(.+)", r"backbone.to_stride16.\1"),
    (r"backbone\.features\.1\.(.+)", r"backbone.to_stride32.\1"),
    (r"backbone\.extra\.(.+)", r"neck.extras.\1"),
    (r"head\.regression_head\.module_list\.(\d+)\.(.+)", r"heads.\1.loc.\2"),
    (r"head\.classification_head\.module_list\.(\d+)\.(.+)", r"heads.\1.conf.\2"),
)


def _from_torchvision(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's `ssdlite320_mobilenet_v3_large` in our names."""
    return rename(state, names_by_pattern(state, _TORCHVISION_NAMES), "torchvision SSDLite")


def _is_ssdlite(state: Mapping[str, Tensor]) -> bool:
    return "head.regression_head.module_list.0.1.weight" in state  # the separable head


def _parts(options: NetworkOptions) -> NetworkParts:
    backbone = MobileNetV3Backbone(reduced_tail=options.reduced_tail)
    return NetworkParts(backbone, SSDLiteNeck(backbone.out_channels), SSDLiteHead)


ARCHITECTURE = Architecture(
    name="mobilenet_v3_large",
    parts=_parts,
    default_size=320,
    heads=("ssdlite",),
    priors="ssdlite",  # torchvision's SSDLite boxes: 3,234 at 320 px
    imagenet=torchvision_start("mobilenet_v3_large", load_mobilenet_v3_backbone, "IMAGENET1K_V1"),
    detectors={
        "torchvision": PublishedDetector("ssdlite320_mobilenet_v3_large_coco", _from_torchvision, _is_ssdlite)
    },
    description="torchvision's SSDLite320: MobileNetV3-Large, separable extras and heads",
)
