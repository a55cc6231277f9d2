"""Lightning side of ssd_lightning: the LightningModule, its callbacks and the run's checkpoints."""

from ssd_lightning.training.checkpointing import AtomicCheckpointIO, find_last_checkpoint
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.wandb_logging import WandbDetectionImages

__all__ = ["AtomicCheckpointIO", "SSDLitModule", "WandbDetectionImages", "find_last_checkpoint"]
