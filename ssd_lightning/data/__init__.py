"""Detection data: VOC, COCO, YOLO and the built-in shapes dataset, SSD augmentation, a LightningDataModule.

Loaders validate everything up front (a :class:`DatasetError` lists every problem, naming its file);
``python -m ssd_lightning.cli.check dataset=<name> dataset.root=<path>`` reports them all without
training.
"""

from .base import DatasetError, DetectionDataset, ImageFolderDataset, ImageRecord, Problem, decode_rgb
from .coco import COCODetection
from .datamodule import DetectionDataModule, collate_detection, seed_worker
from .shapes import SHAPE_CLASSES, default_shapes_root, ensure_shapes_dataset, render_scene
from .sources import DataSource
from .transforms import (
    SSD_MIN_IOUS,
    DetectionTransform,
    Expand,
    ExpandIoUCropResize,
    IoUCrop,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    photometric_distortion,
    to_tensor_steps,
)
from .voc import VOC_CLASSES, VOCDetection
from .yolo import YOLODetection

__all__ = [
    "SHAPE_CLASSES",
    "SSD_MIN_IOUS",
    "VOC_CLASSES",
    "COCODetection",
    "DataSource",
    "DatasetError",
    "DetectionDataModule",
    "DetectionDataset",
    "DetectionTransform",
    "Expand",
    "ExpandIoUCropResize",
    "ImageFolderDataset",
    "ImageRecord",
    "IoUCrop",
    "Problem",
    "VOCDetection",
    "YOLODetection",
    "build_eval_transform",
    "build_train_transform",
    "collate_detection",
    "decode_rgb",
    "default_shapes_root",
    "ensure_shapes_dataset",
    "normalize_images",
    "photometric_distortion",
    "render_scene",
    "seed_worker",
    "to_tensor_steps",
]
