"""The table of SSD backbones: one line per built-in architecture (each declares itself in its own module),
and one per family of architectures named `<prefix><model>` (any timm model as `timm:<name>`). Every list of
architectures in the project reads these tables."""

from __future__ import annotations

from collections.abc import Callable

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
# prefix -> the architecture of the model named after it
FAMILIES: dict[str, Callable[[str], Architecture]] = {
    TIMM_PREFIX: timm_architecture,
}


def get_architecture(name: str) -> Architecture:
    """The architecture called `name`: a key of ARCHITECTURES, or `<family prefix><model>` (timm:resnet18)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    for prefix, family in FAMILIES.items():
        if str(name).startswith(prefix):
            return family(str(name)[len(prefix) :])
    families = " or ".join(f"{prefix}<model>" for prefix in FAMILIES)
    raise ValueError(f"unknown arch {name!r}; choose one of {tuple(ARCHITECTURES)} or {families}")
