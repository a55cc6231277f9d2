"""Run a trained SSD on a deployment runtime behind one interface: PyTorch (a checkpoint), TorchScript,
ONNX Runtime, OpenVINO and TensorRT, plus the conversions between their formats (OpenVINO IR, INT8,
TensorRT engines).

    detector = load_detector("model.xml")              # runtime=auto: the fastest installed for the file
    detections = detector([decode_rgb("photo.jpg")])   # boxes in the photo's pixels, scores, labels

Every runtime gets the checkpoint path's pre-processing, class names and thresholds from the file's
metadata. Optional packages: `pip install "ssd_lightning[export]"` (ONNX, ONNX Runtime),
`"ssd_lightning[openvino]"`, `"ssd_lightning[tensorrt]"` (on a machine with an NVIDIA GPU).
"""

from ssd_lightning.runtimes.backends import (
    OnnxRuntimeDetector,
    OpenVINODetector,
    PyTorchDetector,
    TensorRTDetector,
    TorchScriptDetector,
)
from ssd_lightning.runtimes.base import Detections, Detector, ModelInfo, RuntimeUnavailable, resize_images
from ssd_lightning.runtimes.loading import RUNTIMES, choose_runtime, installed, load_detector, resolve_device
from ssd_lightning.runtimes.pipeline import (
    DetectorModel,
    calibration_pixels,
    data_split,
    evaluate_detector,
    predict_batch,
)

__all__ = [
    "RUNTIMES",
    "Detections",
    "Detector",
    "DetectorModel",
    "ModelInfo",
    "OnnxRuntimeDetector",
    "OpenVINODetector",
    "PyTorchDetector",
    "RuntimeUnavailable",
    "TensorRTDetector",
    "TorchScriptDetector",
    "calibration_pixels",
    "choose_runtime",
    "data_split",
    "evaluate_detector",
    "installed",
    "load_detector",
    "predict_batch",
    "resize_images",
    "resolve_device",
]
