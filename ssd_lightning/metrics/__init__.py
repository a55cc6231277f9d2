"""Detection metrics; COCO-style mAP comes from ``torchmetrics.detection.MeanAveragePrecision``."""

from ssd_lightning.metrics.voc import VOCMeanAveragePrecision

__all__ = ["VOCMeanAveragePrecision"]
