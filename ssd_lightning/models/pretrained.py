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
from torchvision.models import WeightsEnum, get_model_weights

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


# What a network trained from scratch (or with weights of unknown convention) gets by default.
DEFAULT_NORMALIZATION = PixelNormalization(
    (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "ImageNet mean/std (no pretrained weights)"
)


def torchvision_weights(model: str, name: str) -> WeightsEnum:
    """torchvision's ImageNet weight set `name` of `model` (e.g. vgg16 IMAGENET1K_FEATURES)."""
    enum = get_model_weights(model)
    member = name.split(".")[-1]  # also accept "VGG16_Weights.IMAGENET1K_V1"
    try:
        return enum[member]
    except KeyError:
        raise ValueError(
            f"model.backbone_weights={name!r} is neither an existing file nor a weight name of torchvision's "
            f"{enum.__name__} (one of {[w.name for w in enum]})"
        ) from None


def download_torchvision_weights(weights: WeightsEnum) -> dict[str, Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise RuntimeError(
            f"could not download torchvision weights {type(weights).__name__}.{weights.name} from "
            f"{weights.url} ({type(error).__name__}: {error}). Offline? Fetch that file on a connected "
            f"machine and either put it at {cache} or pass "
            f"model.backbone_weights=/path/to/{Path(weights.url).name}; "
            "or train from scratch with model.backbone_weights=null"
        ) from error


def torchvision_normalization(weights: WeightsEnum) -> PixelNormalization:
    """torchvision's classification weights use one of two conventions, told apart by their metadata:
    VGG16 IMAGENET1K_FEATURES the Caffe one (mean subtraction, std 1/255 on the [0, 1] scale), all others
    ImageNet mean/std."""
    transform = weights.transforms()
    name = f"torchvision {type(weights).__name__}.{weights.name}"
    if max(transform.std) < 0.01:
        caffe = pixel_normalization("vgg16_imagenet")
        return PixelNormalization(caffe.pixel_mean, caffe.pixel_std, name)
    return PixelNormalization(DEFAULT_NORMALIZATION.pixel_mean, DEFAULT_NORMALIZATION.pixel_std, name)
