"""The detector interface every runtime implements: decoded RGB images in, per-image detections out.

Pre-processing is the checkpoint path's (`build_eval_transform(normalize=False)` then the model's
normalisation): a resize to the network's S x S with OpenCV's bilinear interpolation, uint8 RGB pixels, then
`(pixel - pixel_mean) / pixel_std` on the 0-255 scale (inside the exported graph for input_format=uint8
files, in NumPy for float files). Class names, normalisation and thresholds come from the model file's
metadata (`ssd_lightning.export.export_metadata`), so a file alone is enough.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from ssd_lightning.data.transforms import normalize_images
from ssd_lightning.postprocess import DetectionConfig

#: One image's detections: boxes [K,4] float32 xyxy, scores [K] float32 (best first), labels [K] int64
#: in 1..C-1.
Detections = dict[str, np.ndarray]

#: The extra of `pip install "ssd_lightning[<extra>]"` that installs each optional package.
EXTRAS = {
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "openvino": "openvino",
    "nncf": "nncf",
    "tensorrt": "tensorrt",
}


class RuntimeUnavailable(ValueError):
    """A runtime cannot run here (package not installed, no GPU); the message says what to install or pass.

    A ValueError, so that the entry points end with its message, not a traceback.
    """


def require_package(module: str, purpose: str) -> Any:
    """`import module`, or a RuntimeUnavailable saying that `purpose` (e.g. "runtime=openvino") needs it
    and which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeUnavailable(
            f"{purpose} needs the Python package {module}, which is not installed ({error}): "
            f'pip install "ssd_lightning[{EXTRAS.get(module, module)}]"'
        ) from None


@dataclass(frozen=True)
class ModelInfo:
    """What every runtime needs besides the network: input size and format, classes, thresholds."""

    image_size: int
    class_names: list[str]
    pixel_mean: list[float]
    pixel_std: list[float]
    detection: DetectionConfig
    input_format: str = "uint8"  # the graph's input: "uint8" [B,S,S,3] pixels or "float" [B,3,S,S] normalised
    category_ids: list[int] | None = None
    precision: str = "fp32"  # fp32 | fp16 | int8 (what the file computes in)
    batch_size: int | None = None  # fixed batch of the file, None: any
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # everything the file says

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str | Path, raw: bool = False) -> ModelInfo:
        """From `export_metadata`'s JSON (ONNX metadata_props, OpenVINO rt_info, a TensorRT side file).
        A file without post-processing is refused unless `raw` (what the benchmark times the network by)."""
        needed = ("image_size", "class_names", "pixel_mean", "pixel_std")
        missing = [key for key in needed if not metadata.get(key)]
        if missing:
            raise ValueError(
                f"{source} does not say its {', '.join(missing)}: it was not written by ssd_lightning's "
                "export.py (python export.py ckpt_path=<checkpoint> format=onnx|openvino|tensorrt)"
            )
        if not raw and not metadata.get("include_postprocess", True):
            raise ValueError(
                f"{source} was exported without post-processing (include_postprocess=false): the runtimes "
                "run files with NMS in the graph; export again without include_postprocess=false"
            )
        defaults = DetectionConfig()
        detection = DetectionConfig(
            **{f.name: metadata.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}
        )
        return cls(
            image_size=int(metadata["image_size"]),
            class_names=list(metadata["class_names"]),
            pixel_mean=[float(v) for v in metadata["pixel_mean"]],
            pixel_std=[float(v) for v in metadata["pixel_std"]],
            detection=detection,
            input_format=str(metadata.get("input_format", "float")),
            category_ids=metadata.get("category_ids"),
            precision=str(metadata.get("precision", "fp32")),
            batch_size=metadata.get("batch_size"),
            metadata=dict(metadata),
        )


def resize_images(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Decoded uint8 RGB images (H x W x 3, any sizes) -> uint8 [B,S,S,3], resized as the evaluation
    transform does (`A.Resize(S, S, cv2.INTER_LINEAR)`, which is this OpenCV call)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image {index}: expected decoded uint8 RGB pixels H x W x 3, got {image.dtype} {image.shape}"
            )
        if image.shape[:2] == (size, size):
            out[index] = image
        else:
            out[index] = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return out


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [B,S,S,3] -> float32 [B,3,S,S] for a float-input file: the training path's `normalize_images`."""
    channels_first = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return normalize_images(channels_first, mean, std).contiguous().numpy()


def unpad(boxes: Any, scores: Any, labels: Any, num_detections: Any) -> list[Detections]:
    """The exported graph's padded outputs -> per image {"boxes", "scores", "labels"} (NumPy)."""
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    return [
        {
            "boxes": boxes[i, :count].astype(np.float32, copy=False),
            "scores": scores[i, :count].astype(np.float32, copy=False),
            "labels": labels[i, :count].astype(np.int64, copy=False),
        }
        for i, count in enumerate(int(n) for n in np.asarray(num_detections).reshape(-1))
    ]


class Detector(ABC):
    """A detector on one runtime. `detector(images)` takes decoded uint8 RGB images (H x W x 3, any sizes,
    e.g. `ssd_lightning.data.decode_rgb(path)`) and returns per image {"boxes" [K,4] xyxy in the image's
    pixels, "scores" [K], "labels" [K] in 1..C-1 (class_names[label - 1])}, best first.

    `infer(pixels)` is the step after the resize: uint8 [B,S,S,3] at the network's size in, boxes
    normalised to [0, 1] out (what eval.py and predict.py feed from their data pipeline).
    """

    runtime: ClassVar[str]

    def __init__(self, info: ModelInfo, source: str | Path, device: str = "cpu") -> None:
        self.info = info
        self.source = Path(source)
        self.device = device

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def describe(self) -> str:
        """One line: file, runtime, device, precision."""
        return f"{self.source} on {self.runtime} ({self.device}, {self.info.precision})"

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B,S,S,3] -> the graph's input (normalised float32 [B,3,S,S] for input_format=float)."""
        pixels = np.ascontiguousarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (self.image_size,) * 2 + (3,):
            raise ValueError(
                f"{self.source} takes uint8 RGB pixels [B,{self.image_size},{self.image_size},3], "
                f"got {pixels.dtype} {tuple(pixels.shape)}"
            )
        if self.info.input_format == "float":
            return normalise(pixels, self.info.pixel_mean, self.info.pixel_std)
        return pixels

    def outputs(self, prepared: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs on `prepare`'s output, in the order of `info.metadata["outputs"]`."""
        raise NotImplementedError(f"{type(self).__name__} runs no exported graph")

    def run(self, prepared: np.ndarray) -> list[Detections]:
        """The network and post-processing on `prepare`'s output; boxes normalised to [0, 1]."""
        if not self.info.metadata.get("include_postprocess", True):
            raise ValueError(f"{self.source} was exported without post-processing: only .outputs() runs it")
        return unpad(*self.outputs(prepared))

    def infer(self, pixels: np.ndarray) -> list[Detections]:
        """uint8 [B,S,S,3] RGB at the network's size -> per image detections, boxes normalised to [0, 1]."""
        batch = self.info.batch_size
        if batch and len(pixels) != batch:  # a file of fixed batch: run it in slices, the last one padded
            out: list[Detections] = []
            for start in range(0, len(pixels), batch):
                part = pixels[start : start + batch]
                padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
                out += self.run(self.prepare(padded))[: len(part)]
            return out
        return self.run(self.prepare(pixels))

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Decoded uint8 RGB images of any sizes -> detections with boxes in each image's pixels."""
        if not len(images):
            return []
        detections = self.infer(resize_images(images, self.image_size))
        for detection, image in zip(detections, images, strict=True):
            height, width = np.asarray(image).shape[:2]
            detection["boxes"] = detection["boxes"] * np.asarray([width, height, width, height], np.float32)
        return detections
