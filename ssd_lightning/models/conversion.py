"""Published SSD weights in our module names: amdegroot/ssd.pytorch SSD300, torchvision `ssd300_vgg16` and
`ssdlite320_mobilenet_v3_large`, NVIDIA DeepLearningExamples SSD300 v1.1 (ResNet-50). Each architecture
declares its published detectors and their conversion (`Architecture.detectors`); this reads that table.

ssd.pytorch and torchvision share our prior order and head channel layout, so their conversion is a pure
renaming. NVIDIA's heads are box-major; `ssd_lightning.models.resnet` permutes their channels so that each
prior gets the prediction NVIDIA's model gives for the same default box. Either way, the converted model
gives the source model's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ssd_lightning.models.architectures import ARCHITECTURES


def published_sources() -> tuple[str, ...]:
    """The sources `convert_state_dict` reads: every published detector of a built-in architecture."""
    return tuple(dict.fromkeys(source for a in ARCHITECTURES.values() for source in a.detectors))


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Convert an SSD state dict from `source` ("ssd.pytorch", "torchvision" or "nvidia") to our key names.

    The result loads with a strict `load_state_dict` into the matching network:
      ssd.pytorch: `build_ssd(300, C)`;
      torchvision `ssd300_vgg16`: `build_ssd(300, C, prior_preset_name="torchvision")` (COCO prior sizes);
      torchvision `ssdlite320_mobilenet_v3_large` (told apart by its keys):
        `build_ssd(320, C, arch="mobilenet_v3_large")` (`reduced_tail=False` if built on ImageNet weights);
      nvidia (SSD300 v1.1): `build_ssd(300, C, arch="resnet50", prior_preset_name="coco")`.
    Training checkpoints that wrap the state dict under "model", and DataParallel's "module." prefixes,
    are accepted.
    """
    sources = published_sources()
    if source not in sources:
        raise ValueError(f"unknown source {source!r}; choose one of {sources}")
    if isinstance(state_dict.get("model"), Mapping):  # training-script checkpoints
        state_dict = state_dict["model"]
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel checkpoints
    detectors = [a.detectors[source] for a in ARCHITECTURES.values() if source in a.detectors]
    detector = next((d for d in detectors if d.recognizes(state)), detectors[0])
    return detector.convert(state)
