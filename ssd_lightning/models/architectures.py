"""The table of SSD backbones: one line per built-in architecture (each declares itself in its own module),
and any timm model as `timm:<name>`. Every list of architectures in the project reads `ARCHITECTURES`."""

from __future__ import annotations

from ssd_lightning.models import compact, mobilenet, resnet, vgg
from ssd_lightning.models.architecture import Architecture
from ssd_lightning.models.timm_backbone import TIMM_PREFIX, timm_architecture

ARCHITECTURES: dict[str, Architecture] = {
    architecture.name: architecture
    for architecture in (
        vgg.ARCHITECTURE,
        compact.ARCHITECTURE,
        mobilenet.ARCHITECTURE,
        resnet.ARCHITECTURE,
    )
}


def get_architecture(name: str) -> Architecture:
    """The architecture called `name` (a key of ARCHITECTURES, or `timm:<timm model name>`)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if str(name).startswith(TIMM_PREFIX):
        return timm_architecture(str(name)[len(TIMM_PREFIX) :])
    raise ValueError(f"unknown arch {name!r}; choose one of {tuple(ARCHITECTURES)} or timm:<timm model name>")
