"""Initial weights for training: an ImageNet backbone, or a whole published / earlier SSD, and the input
normalisation those weights were trained with (which the data must then use). What each backbone takes is
its own declaration (`Architecture.imagenet`, `.detectors` in `ssd_lightning.models.architectures`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd_lightning.checkpoint_files import read_checkpoint
from ssd_lightning.models.architectures import ARCHITECTURES, get_architecture
from ssd_lightning.models.conversion import convert_state_dict
from ssd_lightning.models.pretrained import DEFAULT_NORMALIZATION, PixelNormalization, pixel_normalization
from ssd_lightning.models.ssd import SSD

log = logging.getLogger(__name__)

OWN_CHECKPOINTS = "ssd_lightning"  # model.weights_source of this project's own checkpoints
__all__ = ["DEFAULT_NORMALIZATION"]  # re-exported: the normalisation of weights that do not tell


def detector_sources(arch: str | None = None) -> tuple[str, ...]:
    """`model.weights_source` values: ours, and the published detectors of `arch` (of any arch when None)."""
    architectures = [get_architecture(arch)] if arch else list(ARCHITECTURES.values())
    return (OWN_CHECKPOINTS, *dict.fromkeys(s for a in architectures for s in a.detectors))


def _imagenet_start(arch: str, weights: str | Path):  # noqa: ANN202 (models.architecture.ImageNetStart)
    architecture = get_architecture(arch)
    if architecture.imagenet is None:
        with_weights = [name for name, a in ARCHITECTURES.items() if a.imagenet is not None]
        raise ValueError(
            f"model.backbone_weights={weights!r}: arch {arch!r} has no ImageNet backbone; set "
            f"model.backbone_weights=null (archs with one: {with_weights}, and timm:<name>)"
        )
    return architecture.imagenet


def backbone_normalization(arch: str, weights: str | Path) -> PixelNormalization | None:
    """The normalisation the ImageNet backbone weights `weights` (a weight name or a file) expect; None when
    the file does not tell."""
    return _imagenet_start(arch, weights).normalization(weights)


def detector_normalization(
    arch: str, path: str | Path, source: str, trust: bool = False
) -> PixelNormalization | None:
    """The normalisation a whole detector's weights (`model.weights`) were trained with: a published
    detector's (its architecture's declaration), or the one recorded in a checkpoint of ours (`trust`: see
    `read_checkpoint`); None for a bare state dict."""
    if source != OWN_CHECKPOINTS:
        detector = get_architecture(arch).detectors.get(source)
        if detector is None:
            raise ValueError(
                f"model.weights_source={source!r} is no published detector of arch {arch!r}: choose one of "
                f"{detector_sources(arch)}"
            )
        return pixel_normalization(detector.normalization)
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
    weights_source: str = OWN_CHECKPOINTS,
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
    weights_source: str = OWN_CHECKPOINTS,
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


def load_backbone_weights(net: SSD, weights: str | Path) -> list[str]:
    """Load ImageNet weights into `net.backbone` (a weight name of its architecture, downloaded on first use,
    or a file); returns the names of the layers loaded."""
    return _imagenet_start(getattr(net, "arch", ""), weights).load(net.backbone, weights)


def _read_detector_state(path: Path, source: str, trust: bool = False) -> dict[str, Tensor]:
    checkpoint = read_checkpoint(path, "model.weights", trust)
    if source == OWN_CHECKPOINTS:
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
    net: SSD, path: str | Path, source: str = OWN_CHECKPOINTS, trust: bool = False
) -> list[str]:
    """Initialise the whole detector from a checkpoint; returns the keys skipped for a shape mismatch.

    `source`: "ssd_lightning" (a checkpoint of this project), "ssd.pytorch", "torchvision" or "nvidia"
    (converted with `convert_state_dict`). Tensors whose shape differs (the class-score layers when
    fine-tuning on another class set) keep their fresh initialisation; any other difference is an error.
    """
    if source not in detector_sources():
        raise ValueError(f"model.weights_source={source!r}: choose one of {detector_sources()}")
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
