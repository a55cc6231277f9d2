"""SSD networks: VGG16, MobileNetV3 (SSDLite), ResNet-50 and compact backbones, the necks (L2Norm + extras,
SSDLite's separable extras), heads, and the SSD module."""

from ssd_lightning.models.compact import CompactBackbone
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.mobilenet import MobileNetV3Backbone, load_mobilenet_v3_backbone
from ssd_lightning.models.neck import L2Norm, SSDNeck
from ssd_lightning.models.pretrained import PIXEL_NORMALIZATION, PixelNormalization, pixel_normalization
from ssd_lightning.models.resnet import ResNet50Backbone, load_resnet50_backbone
from ssd_lightning.models.ssd import SSD, build_ssd
from ssd_lightning.models.ssdlite import SSDLiteHead, SSDLiteNeck
from ssd_lightning.models.vgg import VGG16Backbone, load_vgg16_backbone

__all__ = [
    "PIXEL_NORMALIZATION",
    "SSD",
    "CompactBackbone",
    "L2Norm",
    "MobileNetV3Backbone",
    "PixelNormalization",
    "ResNet50Backbone",
    "SSDHead",
    "SSDLiteHead",
    "SSDLiteNeck",
    "SSDNeck",
    "VGG16Backbone",
    "build_ssd",
    "load_mobilenet_v3_backbone",
    "load_resnet50_backbone",
    "load_vgg16_backbone",
    "pixel_normalization",
]
