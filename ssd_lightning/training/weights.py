"""Initial weights for training: an ImageNet backbone, or a whole published / earlier SSD, and the input
normalisation those weights were trained with (which the data must then use)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model_weights

from ssd_lightning.convert import convert_state_dict
from ssd_lightning.models import (
    SSD,
    MobileNetV3Backbone,
    PixelNormalization,
    ResNet50Backbone,
    VGG16Backbone,
    load_mobilenet_v3_backbone,
    load_resnet50_backbone,
    load_vgg16_backbone,
    pixel_normalization,
)
from ssd_lightning.training.checkpointing import read_checkpoint

log = logging.getLogger(__name__)

DETECTOR_SOURCES = ("ssd_lightning", "ssd.pytorch", "torchvision", "nvidia")

# backbone class -> (torchvision model whose ImageNet weights it takes, loader)
_BACKBONES: dict[type[nn.Module], tuple[str, Callable[..., list[str]]]] = {
    VGG16Backbone: ("vgg16", load_vgg16_backbone),
    MobileNetV3Backbone: ("mobilenet_v3_large", load_mobilenet_v3_backbone),
    ResNet50Backbone: ("resnet50", load_resnet50_backbone),
}
_ARCH_BACKBONE_MODEL = {"vgg16": "vgg16", "mobilenet_v3_large": "mobilenet_v3_large", "resnet50": "resnet50"}
# What a network trained from scratch (or with weights of unknown convention) gets by default.
DEFAULT_NORMALIZATION = PixelNormalization(
    (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "ImageNet mean/std (no pretrained weights)"
)


def _is_file_like(source: str | Path) -> bool:
    path = Path(source).expanduser()
    return path.is_file() or path.suffix in (".pth", ".pt", ".ckpt", ".bin") or len(path.parts) > 1


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


def _download(weights: WeightsEnum) -> dict[str, Tensor]:
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


def _torchvision_normalization(weights: WeightsEnum) -> PixelNormalization:
    """torchvision's classification weights use one of two conventions, told apart by their metadata:
    VGG16 IMAGENET1K_FEATURES the Caffe one (mean subtraction, std 1/255 on the [0, 1] scale), all others
    ImageNet mean/std."""
    transform = weights.transforms()
    name = f"torchvision {type(weights).__name__}.{weights.name}"
    if max(transform.std) < 0.01:
        caffe = pixel_normalization("vgg16_imagenet")
        return PixelNormalization(caffe.pixel_mean, caffe.pixel_std, name)
    return PixelNormalization(DEFAULT_NORMALIZATION.pixel_mean, DEFAULT_NORMALIZATION.pixel_std, name)


def _peek_state(path: Path) -> Mapping[str, Tensor]:
    # mmap: reading a few tensors of a large file costs nothing more than its header.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _vgg_file_normalization(path: Path) -> PixelNormalization | None:
    state = _peek_state(path)
    if "0.weight" in state:  # ssd.pytorch's vgg16_reducedfc.pth: converted from the Caffe model
        return pixel_normalization("vgg16_imagenet")
    if "classifier.0.weight" in state:
        if torch.isfinite(state["classifier.0.weight"]).all():  # IMAGENET1K_V1 ships a real classifier
            return _torchvision_normalization(torchvision_weights("vgg16", "IMAGENET1K_V1"))
        return _torchvision_normalization(torchvision_weights("vgg16", "IMAGENET1K_FEATURES"))
    return None  # a features-only torchvision layout: either convention


def backbone_normalization(arch: str, source: str | Path) -> PixelNormalization | None:
    """The normalisation the ImageNet backbone weights `source` (a torchvision name or a file) expect;
    None when the file does not tell."""
    model = _ARCH_BACKBONE_MODEL.get(arch)
    if model is None:
        raise ValueError(
            f"model.backbone_weights={source!r}: arch {arch!r} has no ImageNet backbone; "
            f"set model.backbone_weights=null (backbones: {sorted(_ARCH_BACKBONE_MODEL)})"
        )
    if not _is_file_like(source):
        return _torchvision_normalization(torchvision_weights(model, str(source)))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
    if model == "vgg16":
        return _vgg_file_normalization(path)
    # Every torchvision ImageNet weight set of these models uses the ImageNet mean/std.
    return _torchvision_normalization(torchvision_weights(model, "IMAGENET1K_V1"))


def detector_normalization(
    arch: str, path: str | Path, source: str, trust: bool = False
) -> PixelNormalization | None:
    """The normalisation a whole detector's weights (`model.weights`) were trained with (`trust`: see
    `read_checkpoint`)."""
    if source not in DETECTOR_SOURCES:
        raise ValueError(f"model.weights_source={source!r}: choose one of {DETECTOR_SOURCES}")
    if source == "ssd.pytorch":
        return pixel_normalization("ssd.pytorch")
    if source == "nvidia":
        return pixel_normalization("nvidia_ssd300_resnet50")
    if source == "torchvision":
        key = (
            "ssdlite320_mobilenet_v3_large_coco"
            if arch == "mobilenet_v3_large"
            else "ssd300_vgg16_torchvision"
        )
        return pixel_normalization(key)
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {file}")
    checkpoint = read_checkpoint(file, "model.weights", trust)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, Mapping) else {}
    if "pixel_mean" in hparams and "pixel_std" in hparams:
        return PixelNormalization(
            tuple(float(v) for v in hparams["pixel_mean"]),
            tuple(float(v) for v in hparams["pixel_std"]),
            str(file),
        )
    return None  # a bare state dict: no record of its normalisation


def initial_normalization(
    arch: str,
    backbone_weights: str | Path | None = None,
    weights: str | Path | None = None,
    weights_source: str = "ssd_lightning",
    trust: bool = False,
) -> PixelNormalization | None:
    """The normalisation of the weights a fresh run starts from (`model.weights` wins over
    `model.backbone_weights`); None from scratch or when the weights do not tell."""
    if weights:
        return detector_normalization(arch, weights, weights_source, trust)
    if backbone_weights:
        return backbone_normalization(arch, backbone_weights)
    return None


# The depthwise conv of SSDLite's head on the last MobileNetV3 source: 480 channels with the reduced tail, 960
# with the full one.
_SSDLITE_LAST_SOURCE_KEY = "heads.1.loc.0.0.weight"


def mobilenet_reduced_tail(
    backbone_weights: str | Path | None = None,
    weights: str | Path | None = None,
    weights_source: str = "ssd_lightning",
    trust: bool = False,
) -> bool:
    """Whether SSDLite needs MobileNetV3's reduced tail for its initial weights (torchvision's rule): the tail
    the detector weights `weights` have when given (torchvision's COCO weights: reduced), else the full tail
    for ImageNet backbone weights (they exist for it only) and the reduced one from scratch."""
    if not weights:
        return not backbone_weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    state = _read_detector_state(path, weights_source, trust)
    if _SSDLITE_LAST_SOURCE_KEY not in state:
        raise ValueError(
            f"model.weights={path} (source {weights_source}) holds no SSDLite MobileNetV3 detector "
            f"({_SSDLITE_LAST_SOURCE_KEY} is missing); check model= and model.weights_source"
        )
    return state[_SSDLITE_LAST_SOURCE_KEY].shape[0] < 960


def check_normalization(
    expected: PixelNormalization | None, pixel_mean: Sequence[float], pixel_std: Sequence[float], what: str
) -> None:
    """A configured normalisation other than the one the loaded weights were trained with is an error."""
    if expected is None:
        return
    same = all(
        math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
        for a, b in zip((*pixel_mean, *pixel_std), (*expected.pixel_mean, *expected.pixel_std), strict=True)
    )
    if not same:
        raise ValueError(
            f"{what} was trained with pixel_mean={list(expected.pixel_mean)} "
            f"pixel_std={list(expected.pixel_std)} "
            f"({expected.source}), but the run normalises with model.pixel_mean={list(pixel_mean)} "
            f"model.pixel_std={list(pixel_std)}. Drop those overrides (the weights set them), or start from "
            "other weights."
        )


def _backbone_entry(net: SSD) -> tuple[str, Callable[..., list[str]]]:
    for kind, entry in _BACKBONES.items():
        if isinstance(net.backbone, kind):
            return entry
    raise ValueError(
        f"model.backbone_weights applies to backbones with ImageNet weights "
        f"({', '.join(_ARCH_BACKBONE_MODEL)}); "
        f"this model's backbone is {type(net.backbone).__name__}: set model.backbone_weights=null"
    )


def load_backbone_weights(net: SSD, source: str | Path) -> list[str]:
    """Load ImageNet weights into `net.backbone`; returns the names of the layers loaded.

    `source`: a file (for VGG16 also ssd.pytorch's `vgg16_reducedfc.pth`) or the name of a torchvision
    weight set of the backbone's model (`IMAGENET1K_FEATURES`, `IMAGENET1K_V1`, ...), downloaded into the
    torch hub cache on first use.
    """
    model, loader = _backbone_entry(net)
    if _is_file_like(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = _download(torchvision_weights(model, str(source)))
    if model == "vgg16":
        # torchvision's IMAGENET1K_FEATURES ships NaN classifier weights (features only): never use those.
        state = {
            k: v
            for k, v in state.items()
            if not (k.startswith("classifier.") and not torch.isfinite(v).all())
        }
    return loader(net.backbone, state)


def _read_detector_state(path: Path, source: str, trust: bool = False) -> dict[str, Tensor]:
    checkpoint = read_checkpoint(path, "model.weights", trust)
    if source == "ssd_lightning":
        if "state_dict" in checkpoint:  # a Lightning checkpoint: the network's tensors are under "net."
            return {
                k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")
            }
        return checkpoint  # a bare `SSD.state_dict()`
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        checkpoint = checkpoint["model"]  # training-script checkpoints that wrap the state dict
    return convert_state_dict(checkpoint, source)


def _is_class_score_layer(key: str) -> bool:
    return key.startswith("heads.") and ".conf." in key


def load_detector_weights(
    net: SSD, path: str | Path, source: str = "ssd_lightning", trust: bool = False
) -> list[str]:
    """Initialise the whole detector from a checkpoint; returns the keys skipped for a shape mismatch.

    `source`: "ssd_lightning" (a checkpoint of this project), "ssd.pytorch", "torchvision" or "nvidia"
    (converted with `convert_state_dict`). Tensors whose shape differs (the class-score layers when
    fine-tuning on another class set) keep their fresh initialisation; any other difference is an error.
    """
    if source not in DETECTOR_SOURCES:
        raise ValueError(f"model.weights_source={source!r}: choose one of {DETECTOR_SOURCES}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    state = _read_detector_state(path, source, trust)
    own = net.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"model.weights={path} (source {source}) does not fit this network: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}; check model= and model.weights_source"
        )
    mismatched = sorted(k for k, v in state.items() if v.shape != own[k].shape)
    other = [k for k in mismatched if not _is_class_score_layer(k)]
    if other:
        raise ValueError(
            f"model.weights={path} does not fit this network: shapes differ for {other[:10]} "
            "(only the class-score layers may differ, when the class list changes); check model="
        )
    if mismatched:
        log.warning("model.weights: class-score layers of another class count stay fresh: %s", mismatched)
    net.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    return mismatched


def snapshot(net: nn.Module) -> dict[str, Tensor]:
    """A copy of every tensor of `net`, to tell afterwards which ones a loader replaced."""
    return {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}


def describe_initialisation(net: nn.Module, before: Mapping[str, Tensor], source: str) -> str:
    """Which modules of `net` now hold weights from `source` and which start random (two levels deep where
    a whole part shares one fate, e.g. `heads.0`, else module by module, e.g. `backbone.to_conv7.conv6`)."""
    status: dict[str, bool] = {}  # module path -> loaded
    for name, tensor in net.state_dict().items():
        if not tensor.is_floating_point():  # integer buffers (BatchNorm counters) say nothing
            continue
        module = name.rpartition(".")[0]
        status[module] = status.get(module, False) or not torch.equal(tensor, before[name])
    by_part: dict[str, dict[str, bool]] = {}
    for module, loaded in status.items():
        by_part.setdefault(".".join(module.split(".")[:2]), {})[module] = loaded
    groups: dict[bool, list[str]] = {True: [], False: []}
    for part, modules in by_part.items():
        fates = set(modules.values())
        if len(fates) == 1:
            groups[fates.pop()].append(part)
        else:
            for module, loaded in modules.items():
                groups[loaded].append(module)
    return (
        f"from {source}: {', '.join(groups[True]) or 'nothing'}\n"
        f"random initialisation: {', '.join(groups[False]) or 'nothing'}"
    )
