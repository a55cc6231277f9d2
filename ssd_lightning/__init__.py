"""ssd_lightning: SSD (Single Shot MultiBox Detector) on PyTorch Lightning, Hydra and W&B.

The core modules here are plain PyTorch (no Hydra, no Lightning): models, priors, box coding and matching,
MultiBoxLoss, post-processing and the VOC metric.
"""

from ssd_lightning import metrics
from ssd_lightning.boxes import decode, encode, match_priors
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.models import (
    SSD,
    build_ssd,
    load_mobilenet_v3_backbone,
    load_resnet50_backbone,
    load_vgg16_backbone,
    pixel_normalization,
)
from ssd_lightning.models.conversion import convert_state_dict
from ssd_lightning.postprocess import DetectionConfig, detect
from ssd_lightning.priors import PriorSpec, generate_priors, prior_preset

__version__ = "0.1.0"

__all__ = [
    "SSD",
    "DetectionConfig",
    "MultiBoxLoss",
    "PriorSpec",
    "build_ssd",
    "convert_state_dict",
    "decode",
    "detect",
    "encode",
    "generate_priors",
    "load_mobilenet_v3_backbone",
    "load_resnet50_backbone",
    "load_vgg16_backbone",
    "match_priors",
    "metrics",
    "pixel_normalization",
    "prior_preset",
]
