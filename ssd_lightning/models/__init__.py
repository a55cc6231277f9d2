"""SSD networks: VGG16 and compact backbones, the neck (L2Norm + extras), heads, and the SSD module."""

from ssd_lightning.models.compact import CompactBackbone
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.neck import L2Norm, SSDNeck
from ssd_lightning.models.ssd import SSD, build_ssd
from ssd_lightning.models.vgg import VGG16Backbone, load_vgg16_backbone

__all__ = [
    "SSD",
    "CompactBackbone",
    "L2Norm",
    "SSDHead",
    "SSDNeck",
    "VGG16Backbone",
    "build_ssd",
    "load_vgg16_backbone",
]
