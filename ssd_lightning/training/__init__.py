"""Lightning side of ssd_lightning: the LightningModule, schedules, callbacks and checkpoint helpers."""

from ssd_lightning.training.callbacks import WandbDetectionImages
from ssd_lightning.training.checkpointing import AtomicCheckpointIO, find_last_checkpoint
from ssd_lightning.training.evaluation import DetectionEvaluator, EvaluationResult
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.optim import parameter_groups, warmup_cosine, warmup_multistep
from ssd_lightning.training.weights import load_backbone_weights, load_detector_weights

__all__ = [
    "AtomicCheckpointIO",
    "DetectionEvaluator",
    "EvaluationResult",
    "SSDLitModule",
    "WandbDetectionImages",
    "find_last_checkpoint",
    "load_backbone_weights",
    "load_detector_weights",
    "parameter_groups",
    "warmup_cosine",
    "warmup_multistep",
]
