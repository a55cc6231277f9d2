"""What an SSD backbone declares about itself, once, in its own module (its `ARCHITECTURE`): how its network
parts are built, the input sizes it comes in, its default prior boxes, the ImageNet weights it starts from
and the published detectors of it. `ssd_lightning.models.architectures.ARCHITECTURES` lists them; every list
of architectures in the project reads that table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.models.pretrained import (
    PixelNormalization,
    download_torchvision_weights,
    torchvision_normalization,
    torchvision_weights,
)

# (in_channels, boxes_per_location, num_classes) -> the head of one source.
HeadFactory = Callable[[int, int, int], nn.Module]
HEAD_STYLES = ("ssd", "ssdlite")
HEAD_PRIORS = {"ssd": "scales", "ssdlite": "ssdlite"}  # the priors each style gets on a generic backbone


@dataclass(frozen=True)
class NetworkOptions:
    """What `build_ssd` passes to an architecture's `parts`."""

    size: int
    width: int = 32  # compact: channels of the first layer
    reduced_tail: bool = True  # SSDLite's MobileNetV3: the reduced (480-channel) tail
    head: str | None = None  # "ssd" | "ssdlite" where the architecture lets the model config choose


@dataclass(frozen=True)
class NetworkParts:
    """Backbone (its feature maps), neck (sources for the heads, with `out_channels`) and the head factory."""

    backbone: nn.Module
    neck: nn.Module
    head: HeadFactory


@dataclass(frozen=True)
class ImageNetStart:
    """How the backbone starts from ImageNet classification weights (`model.backbone_weights`: a weight name
    or a file). `normalization(weights)`: the input normalisation they were trained with (None: a file that
    does not tell); `load(backbone, weights)`: load them, returning the names of the layers loaded."""

    normalization: Callable[[str | Path], PixelNormalization | None]
    load: Callable[[nn.Module, str | Path], list[str]]
    default_weights: str = "IMAGENET1K_V1"


def is_file_like(weights: str | Path) -> bool:
    """Whether `model.backbone_weights` names a file rather than a weight set."""
    path = Path(weights).expanduser()
    suffixes = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
    return path.is_file() or path.suffix in suffixes or len(path.parts) > 1


def _existing_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
    return path


def torchvision_start(
    model: str,
    load_state: Callable[[nn.Module, Mapping[str, Any]], list[str]],
    default_weights: str = "IMAGENET1K_V1",
    file_normalization: Callable[[Path], PixelNormalization | None] | None = None,
) -> ImageNetStart:
    """An `ImageNetStart` from torchvision's ImageNet weights of `model` (a weight name, downloaded into the
    torch hub cache on first use, or a file holding its state dict); `load_state(backbone, state_dict)`.
    A file's normalisation is `file_normalization(path)` when the file can tell, else the model's."""

    def normalization(weights: str | Path) -> PixelNormalization | None:
        if not is_file_like(weights):
            return torchvision_normalization(torchvision_weights(model, str(weights)))
        path = _existing_file(weights)
        if file_normalization is not None:
            return file_normalization(path)
        # Every torchvision ImageNet weight set of these models uses the ImageNet mean/std.
        return torchvision_normalization(torchvision_weights(model, default_weights))

    def load(backbone: nn.Module, weights: str | Path) -> list[str]:
        if is_file_like(weights):
            state = torch.load(_existing_file(weights), map_location="cpu", weights_only=True)
        else:
            state = download_torchvision_weights(torchvision_weights(model, str(weights)))
        return load_state(backbone, state)

    return ImageNetStart(normalization, load, default_weights)


def _any_state(state: Mapping[str, Tensor]) -> bool:
    return True


@dataclass(frozen=True)
class PublishedDetector:
    """A published detector of this architecture (`model.weights_source`): the input normalisation it was
    trained with (a key of `PIXEL_NORMALIZATION`), and `convert(state_dict)`, its weights in our names (what
    `ssd_lightning.convert_state_dict` calls). Where two architectures share a source name, `recognizes`
    tells their state dicts apart."""

    normalization: str
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    recognizes: Callable[[Mapping[str, Tensor]], bool] = _any_state


@dataclass(frozen=True)
class Architecture:
    """One backbone's declaration (see the module docstring).

    `priors`: the default prior boxes: a preset of `prior_preset` ("voc", "coco"), "ssdlite" (torchvision's
    SSDLite rule on the feature maps) or "scales" (the paper's linear scale rule on the feature maps).
    `sizes`: the input sizes it comes in (None: any), `default_size` the usual one.
    `named_priors`: what a named preset (`model.net.prior_preset_name`) does: "exact": its feature maps are
    this network's; "sizes": its box sizes and ratios go on the maps the network has (37 where a stride
    rounds 300/8 down); "ignored": the network's own rule (`priors`) whatever the name.
    `heads`: the head styles `model.net.head` may choose, its own first
    (empty: the architecture has its own); SSDLite heads get SSDLite's priors."""

    name: str
    parts: Callable[[NetworkOptions], NetworkParts]
    sizes: tuple[int, ...] | None = None
    default_size: int = 300
    priors: str = "scales"
    heads: tuple[str, ...] = ("ssd",)
    named_priors: str = "exact"
    imagenet: ImageNetStart | None = None
    detectors: Mapping[str, PublishedDetector] = field(default_factory=dict)
    description: str = ""

    def default_priors(self, options: NetworkOptions) -> str:
        """The priors of the network `options` describe, after checking its size and head style."""
        if self.sizes is not None and options.size not in self.sizes:
            *others, last = map(str, self.sizes)
            sizes = f"{', '.join(others)} and {last}" if others else last
            raise ValueError(
                f"arch {self.name!r} ({self.description}) comes in sizes {sizes}, got {options.size}"
            )
        style = options.head or self.heads[0]
        if style not in self.heads:
            raise ValueError(
                f"arch {self.name!r} has {' or '.join(self.heads)} heads, not model.net.head={style!r}"
            )
        return self.priors if style == self.heads[0] else HEAD_PRIORS[style]

    def priors_for(self, options: NetworkOptions, named: str | None) -> str:
        """The priors of the network `options` describe when the config names the preset `named`."""
        own = self.default_priors(options)
        return own if named is None or self.named_priors == "ignored" else named
