"""Published weights and what they expect: reading a weight file, and the input normalisation of each set.

Normalisation is on the project's scale: `(pixel - pixel_mean) / pixel_std` with RGB pixels in 0-255 (the
`pixel_mean`/`pixel_std` of the model configs and of `export`). A network only reproduces its published
results when fed the normalisation its weights were trained with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision's (0.485, 0.456, 0.406) * 255
_IMAGENET_STD = (58.395, 57.12, 57.375)  # (0.229, 0.224, 0.225) * 255


@dataclass(frozen=True)
class PixelNormalization:
    """`pixel_mean`/`pixel_std` (0-255 RGB) that a set of weights expects, and where the values come from."""

    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    source: str


_IMAGENET = PixelNormalization(
    _IMAGENET_MEAN, _IMAGENET_STD, "ImageNet mean/std on [0, 1] inputs (torchvision's classification recipe)"
)

PIXEL_NORMALIZATION: dict[str, PixelNormalization] = {
    # VGG16 for SSD300/512: the Caffe convention of the paper's models (mean subtraction, no scaling).
    "vgg16_imagenet": PixelNormalization(
        (123.0, 117.0, 104.0), (1.0, 1.0, 1.0), "torchvision IMAGENET1K_FEATURES, ssd.pytorch vgg16_reducedfc"
    ),
    "ssd300_vgg16_torchvision": PixelNormalization(
        (123.0, 117.0, 104.0), (1.0, 1.0, 1.0), "torchvision ssd300_vgg16: image_mean 0.48235.., std 1/255"
    ),
    "ssd.pytorch": PixelNormalization(
        (123.0, 117.0, 104.0), (1.0, 1.0, 1.0), "ssd.pytorch: mean (104, 117, 123) in BGR, no scaling"
    ),
    # SSDLite's recipe maps pixels to [-1, 1], whatever backbone weights it started from.
    "ssdlite320_mobilenet_v3_large_coco": PixelNormalization(
        (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), "torchvision ssdlite320: image_mean 0.5, image_std 0.5"
    ),
    "mobilenet_v3_large_imagenet": _IMAGENET,
    "resnet50_imagenet": _IMAGENET,
    "nvidia_ssd300_resnet50": PixelNormalization(
        _IMAGENET_MEAN, _IMAGENET_STD, "NVIDIA SSD300 v1.1 training: ImageNet mean/std on [0, 1] inputs"
    ),
}


def pixel_normalization(weights: str) -> PixelNormalization:
    """The normalisation that the weights called `weights` expect (a key of `PIXEL_NORMALIZATION`)."""
    if weights not in PIXEL_NORMALIZATION:
        raise ValueError(f"no normalisation recorded for {weights!r}; known: {sorted(PIXEL_NORMALIZATION)}")
    return PIXEL_NORMALIZATION[weights]


def read_state_dict(weights: Mapping[str, Tensor] | str | Path) -> Mapping[str, Tensor]:
    """`weights` itself if it is a state dict, else the state dict in the file it names."""
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        weights = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(weights, Mapping):
        raise ValueError(f"backbone weights must be a state dict, got {type(weights).__name__}")
    return weights
