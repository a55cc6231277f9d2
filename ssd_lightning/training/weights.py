"""Initial weights for training: an ImageNet VGG16 backbone, or a whole published / earlier SSD."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models import VGG16_Weights

from ssd_lightning.convert import convert_state_dict
from ssd_lightning.models import SSD, VGG16Backbone, load_vgg16_backbone

log = logging.getLogger(__name__)

DETECTOR_SOURCES = ("ssd_lightning", "ssd.pytorch", "torchvision")


def _torchvision_vgg16_weights(name: str) -> VGG16_Weights:
    member = name.removeprefix("VGG16_Weights.")
    try:
        return VGG16_Weights[member]
    except KeyError:
        raise ValueError(
            f"model.backbone_weights={name!r} is neither an existing file nor a torchvision VGG16 weight "
            f"name (one of {[w.name for w in VGG16_Weights]})"
        ) from None


def _download(weights: VGG16_Weights) -> dict[str, Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise RuntimeError(
            f"could not download torchvision weights VGG16_Weights.{weights.name} from {weights.url} "
            f"({type(error).__name__}: {error}). Offline? Fetch that file on a connected machine and "
            f"either put it at {cache} or pass model.backbone_weights=/path/to/{Path(weights.url).name}; "
            "or train from scratch with model.backbone_weights=null"
        ) from error


def load_backbone_weights(net: SSD, source: str | Path) -> list[str]:
    """Load ImageNet VGG16 weights into `net.backbone`; returns the names of the layers loaded.

    `source`: a file (ssd.pytorch's `vgg16_reducedfc.pth` or a torchvision `vgg16` state dict) or the
    name of a torchvision weight set (`IMAGENET1K_FEATURES`, `VGG16_Weights.IMAGENET1K_V1`), downloaded
    into the torch hub cache on first use.
    """
    if not isinstance(net.backbone, VGG16Backbone):
        raise ValueError(
            f"model.backbone_weights={source!r} applies to the VGG16 models (model=ssd300|ssd512); "
            f"this model's backbone is {type(net.backbone).__name__}: set model.backbone_weights=null"
        )
    path = Path(source).expanduser()
    if path.is_file():
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix in (".pth", ".pt", ".ckpt") or len(path.parts) > 1:
        raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
    else:
        state = _download(_torchvision_vgg16_weights(str(source)))
    # torchvision's IMAGENET1K_FEATURES ships NaN classifier weights (features only): never subsample those.
    state = {
        k: v for k, v in state.items() if not (k.startswith("classifier.") and not torch.isfinite(v).all())
    }
    loaded = load_vgg16_backbone(net.backbone, state)
    log.info("Loaded ImageNet backbone weights from %s into %s", source, ", ".join(loaded))
    return loaded


def _read_detector_state(path: Path, source: str) -> dict[str, Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=source != "ssd_lightning")
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


def load_detector_weights(net: SSD, path: str | Path, source: str = "ssd_lightning") -> list[str]:
    """Initialise the whole detector from a checkpoint; returns the keys skipped for a shape mismatch.

    `source`: "ssd_lightning" (a checkpoint of this project), "ssd.pytorch" or "torchvision" (converted
    with `convert_state_dict`). Tensors whose shape differs (the class-score layers when fine-tuning on
    another class set) keep their fresh initialisation; any other difference is an error.
    """
    if source not in DETECTOR_SOURCES:
        raise ValueError(f"model.weights_source={source!r}: choose one of {DETECTOR_SOURCES}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    state = _read_detector_state(path, source)
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
