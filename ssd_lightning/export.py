"""Export a trained SSD for deployment: ONNX (onnxruntime and other ONNX runtimes) and TorchScript.

Both formats hold `DeployableSSD`: the network, optionally the input normalisation, and the detection
post-processing of `ssd_lightning.postprocess.detect` rewritten with fixed-size outputs, so that the
file alone turns an image batch into boxes, scores and labels.

Input (`input_format`), always at the network's size S (resize outside the graph, e.g. with
`cv2.resize(..., interpolation=cv2.INTER_LINEAR)` as the evaluation transform does: the square input
is what the priors are made for, and an in-graph resize would differ from training's interpolation):
  "float": float32 [B, 3, S, S] RGB, normalised as in training: (pixel - pixel_mean) / pixel_std on the
           0-255 scale (the same tensor `model(images)` takes);
  "uint8": uint8 [B, S, S, 3] RGB pixels (the layout image libraries give); normalised in the graph.

Outputs with post-processing (K = min(top_k, (C-1) * min(pre_nms_top_k, P)), 200 for the defaults):
  boxes [B, K, 4] float32 xyxy in [0, 1] of the input (multiply by the original width/height),
  scores [B, K] float32, labels [B, K] int64 in 1..C-1, num_detections [B] int64.
  Rows of image b are best first; rows >= num_detections[b] are padding (zeros, label 0).
Outputs without post-processing: boxes [B, P, 4] decoded xyxy per prior, scores [B, P, C] class
probabilities (column 0 is the background), for a runtime that brings its own NMS.

The files carry `export_metadata` (class names, normalisation, thresholds...): ONNX as metadata_props
(JSON values), TorchScript as the extra file `ssd_lightning.json`; `read_metadata` reads either.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import nms

import ssd_lightning
from ssd_lightning.boxes import DEFAULT_VARIANCES, Variances, decode
from ssd_lightning.models import SSD
from ssd_lightning.postprocess import DetectionConfig

INPUT_FORMATS = ("float", "uint8")
DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("boxes", "scores")
INPUT_NAME = "images"
TORCHSCRIPT_METADATA_FILE = "ssd_lightning.json"
DEFAULT_OPSET = 18


def nms_each_group(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """Greedy NMS inside each group: boxes [G,N,4] xyxy, scores [G,N] -> kept (group, index) pairs [M,2].

    Boxes scoring <= `score_threshold` never compete; a box is dropped when its IoU with a better kept
    box of its group is > `iou_threshold`. These are the semantics of ONNX's NonMaxSuppression with the
    groups as its batch, which is what `grouped_nms` becomes in an ONNX file. One `torchvision.ops.nms`
    per group rather than one offset-box `batched_nms` call: NMS cost grows with the square of the boxes
    in a call, and COCO models have 80 classes of up to 400 candidates per image.
    """
    kept: list[Tensor] = []
    for group in range(scores.shape[0]):
        index = torch.nonzero(scores[group] > score_threshold).squeeze(1)
        keep = index[nms(boxes[group, index], scores[group, index], iou_threshold)]
        kept.append(torch.stack([torch.full_like(keep, group), keep], dim=1))
    if not kept:
        return torch.zeros((0, 2), dtype=torch.int64, device=scores.device)
    return torch.cat(kept)


# A custom op, so that `torch.export` keeps the data-dependent NMS as one node for the ONNX translation.
grouped_nms = torch.library.custom_op("ssd_lightning::grouped_nms", nms_each_group, mutates_args=())


@grouped_nms.register_fake
def _grouped_nms_shape(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((count, 2), dtype=torch.int64)


def _grouped_nms_onnx(boxes: Any, scores: Any, iou_threshold: float, score_threshold: float) -> Any:
    from onnxscript import opset18 as op  # an optional dependency, needed for ONNX export only

    per_group = op.Shape(boxes, start=1, end=2)
    selected = op.NonMaxSuppression(  # -> [M, 3] (batch = group, class = 0, box index)
        boxes, op.Unsqueeze(scores, [1]), per_group, [iou_threshold], [score_threshold]
    )
    return op.Gather(selected, [0, 2], axis=1)


@functools.cache
def _scripted_nms_each_group() -> Callable[[Tensor, Tensor, float, float], Tensor]:
    # Traced graphs record a call to a scripted function with its loop intact, so that TorchScript files
    # need torchvision's NMS op only (not this package's custom op) to load.
    return torch.jit.script(nms_each_group)


def detect_padded(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    config: DetectionConfig | None = None,
    variances: Variances = DEFAULT_VARIANCES,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`ssd_lightning.detect` with fixed-size outputs, written with ops that ONNX and TorchScript capture.

    Returns boxes [B,K,4], scores [B,K], labels [B,K], num_detections [B], padded with zeros (see the
    module docstring); the first num_detections[b] rows of image b are `detect(...)[b]`.
    """
    config = config or DetectionConfig()
    num_priors = conf.shape[1]
    boxes = decode(loc.float(), priors.float(), variances).clamp(0.0, 1.0)  # [B, P, 4]
    scores = conf.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, P]

    per_class = min(config.pre_nms_top_k, num_priors)
    top_scores, top_priors = scores.topk(per_class, dim=2)  # [B, C-1, k]
    # Slot s of an image holds rank s % k of class index s // k (label - 1).
    slot_scores = top_scores.flatten(1)  # [B, (C-1) k]
    slot_boxes = boxes.gather(1, top_priors.flatten(1).unsqueeze(-1).expand(-1, -1, 4))  # [B, (C-1) k, 4]

    # NMS per (image, class): the groups are the rows of the [B (C-1), k] view.
    group_scores = slot_scores.reshape(-1, per_class)
    group_boxes = slot_boxes.reshape(-1, per_class, 4)
    nms_args = (group_boxes, group_scores, config.nms_iou_threshold, config.score_threshold)
    if torch.jit.is_tracing():
        kept = _scripted_nms_each_group()(*nms_args)
    else:
        kept = grouped_nms(*nms_args)
    group, rank = kept.unbind(1)

    # Survivors keep their score in their slot (-1 elsewhere); each image takes its best top_k slots.
    kept_scores = torch.full_like(group_scores, -1.0).index_put((group, rank), group_scores[group, rank])
    out_scores, out_slots = kept_scores.reshape_as(slot_scores).topk(
        min(config.top_k, slot_scores.shape[1]), dim=1
    )
    valid = out_scores >= 0.0
    out_boxes = slot_boxes.gather(1, out_slots.unsqueeze(-1).expand(-1, -1, 4))
    out_labels = torch.div(out_slots, per_class, rounding_mode="floor") + 1
    zero = torch.zeros((), dtype=out_boxes.dtype, device=out_boxes.device)
    return (
        torch.where(valid.unsqueeze(-1), out_boxes, zero),
        torch.where(valid, out_scores, zero),
        torch.where(valid, out_labels, torch.zeros_like(out_labels)),
        valid.sum(dim=1),
    )


class DeployableSSD(nn.Module):
    """An `SSD` as one graph: (normalisation) -> network -> post-processing (see the module docstring).

    The wrapped model is used as is (its weights, priors, variances and `model.detection` thresholds);
    put it in eval mode first.
    """

    def __init__(
        self,
        model: SSD,
        include_postprocess: bool = True,
        input_format: str = "float",
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format={input_format!r}: choose one of {INPUT_FORMATS}")
        self.model = model
        self.include_postprocess = include_postprocess
        self.input_format = input_format
        self.detection = dataclasses.replace(model.detection)
        if input_format == "uint8" or pixel_mean is not None or pixel_std is not None:
            mean, std = _check_normalisation(pixel_mean, pixel_std)
        if input_format == "uint8":
            self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.input_format == "uint8":
            images = (images.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std
        loc, conf = self.model(images)
        if self.include_postprocess:
            return detect_padded(loc, conf, self.model.priors, self.detection, self.model.variances)
        boxes = decode(loc.float(), self.model.priors.float(), self.model.variances)
        return boxes, conf.float().softmax(dim=-1)

    @property
    def output_names(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS if self.include_postprocess else RAW_OUTPUTS

    def example_input(self, batch_size: int) -> Tensor:
        """A random input of the graph's dtype and layout, for tracing."""
        size = self.model.image_size
        if self.input_format == "uint8":
            return torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
        return torch.randn(batch_size, 3, size, size)


def _check_normalisation(
    pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    if pixel_mean is None or pixel_std is None:
        raise ValueError(
            "pixel_mean and pixel_std go together (input_format='uint8' needs both): the 0-255 RGB values "
            "the model was trained with, e.g. a checkpoint's hparams.pixel_mean / hparams.pixel_std"
        )
    mean, std = [float(v) for v in pixel_mean], [float(v) for v in pixel_std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"pixel_mean/pixel_std must be 3 values each (std > 0), got {mean} / {std}")
    return mean, std


def export_metadata(
    deployable: DeployableSSD,
    class_names: Sequence[str] | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    extra: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """What a consumer of the exported file needs to know, as JSON-serialisable values."""
    model = deployable.model
    if class_names is not None and len(class_names) != model.num_classes - 1:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.num_classes - 1} object classes"
        )
    size, batch = model.image_size, batch_size or "B"
    if deployable.input_format == "uint8":
        input_text = f"uint8 [{batch},{size},{size},3] RGB pixels, resized to {size}x{size}"
    else:
        input_text = (
            f"float32 [{batch},3,{size},{size}] RGB, (pixel - pixel_mean) / pixel_std on the 0-255 scale"
        )
    metadata: dict[str, Any] = {
        "producer": f"ssd_lightning {ssd_lightning.__version__}",
        "image_size": size,
        "batch_size": batch_size,
        "input_format": deployable.input_format,
        "input": input_text,
        "pixel_mean": None if pixel_mean is None else [float(v) for v in pixel_mean],
        "pixel_std": None if pixel_std is None else [float(v) for v in pixel_std],
        "outputs": list(deployable.output_names),
        "box_format": "xyxy, normalised to [0, 1] of the input image",
        "num_classes": model.num_classes,
        "class_names": None if class_names is None else list(class_names),
        "include_postprocess": deployable.include_postprocess,
        **dataclasses.asdict(deployable.detection),
        "variances": list(model.variances),
    }
    return {**metadata, **(extra or {})}


def _deployable(
    model: SSD,
    include_postprocess: bool,
    input_format: str,
    pixel_mean: Sequence[float] | None,
    pixel_std: Sequence[float] | None,
) -> DeployableSSD:
    if not isinstance(model, SSD):
        raise TypeError(
            f"expected an ssd_lightning SSD, got {type(model).__name__} (a LightningModule? its .net)"
        )
    # A copy: exporting must not move the caller's model off its device or out of training mode.
    model = copy.deepcopy(model).cpu().eval()
    return DeployableSSD(model, include_postprocess, input_format, pixel_mean, pixel_std).eval()


def export_onnx(
    model: SSD,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    include_postprocess: bool = True,
    input_format: str = "float",
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as one ONNX file (weights inside) with the `torch.export`-based exporter.

    `batch_size=None` makes the batch dimension dynamic, an int fixes it. `opset` >= 18 (the default;
    onnxruntime runs it from 1.14). Post-processing (NMS included) is in the graph
    unless `include_postprocess=False`. `pixel_mean`/`pixel_std` (0-255 RGB) are required for
    input_format="uint8" and recorded in the metadata either way, with `class_names` and `metadata`.
    Needs the `onnx` and `onnxscript` packages. Returns the path written.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None (dynamic) or >= 1, got {batch_size}")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset={opset}: the exporter supports opset {DEFAULT_OPSET} and newer")
    deployable = _deployable(model, include_postprocess, input_format, pixel_mean, pixel_std)
    info = export_metadata(deployable, class_names, pixel_mean, pixel_std, metadata, batch_size)
    # Trace with 2 images when the batch is dynamic: torch.export would specialise a batch of 1.
    example = deployable.example_input(batch_size or 2)
    dynamic_shapes = None if batch_size else {"images": {0: torch.export.Dim("batch")}}
    with torch.no_grad():
        program = torch.onnx.export(
            deployable,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(deployable.output_names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.ssd_lightning.grouped_nms.default: _grouped_nms_onnx},
            verbose=False,
        )
    program.model.metadata_props.update({key: json.dumps(value) for key, value in info.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=False)
    return path


def export_torchscript(
    model: SSD,
    path: str | os.PathLike,
    *,
    include_postprocess: bool = True,
    input_format: str = "float",
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as a traced TorchScript file (any batch size); arguments as in `export_onnx`.

    Load it with `import torchvision; torch.jit.load(path)` (the NMS op is torchvision's). PyTorch has
    deprecated TorchScript in favour of `torch.export`; prefer ONNX for new deployments.
    """
    deployable = _deployable(model, include_postprocess, input_format, pixel_mean, pixel_std)
    info = export_metadata(deployable, class_names, pixel_mean, pixel_std, metadata)
    with torch.no_grad(), warnings.catch_warnings():
        # Python ints read from shapes (sizes, top-k counts) are constants of the model, not of the
        # batch; check_inputs below re-runs the trace on another batch size to prove it.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(
            deployable,
            (deployable.example_input(2),),
            check_inputs=[(deployable.example_input(3),)],
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(info)})
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `export_metadata` of an exported ONNX (.onnx) or TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    if path.suffix == ".onnx":
        import onnx  # an optional dependency, needed for ONNX only

        props = onnx.load(path, load_external_data=False).metadata_props
        return {prop.key: json.loads(prop.value) for prop in props}
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_METADATA_FILE]:
        raise ValueError(f"{path} is a TorchScript file without {TORCHSCRIPT_METADATA_FILE}: not from export")
    return json.loads(extra[TORCHSCRIPT_METADATA_FILE])


def unpad_detections(boxes: Any, scores: Any, labels: Any, num_detections: Any) -> list[dict[str, Any]]:
    """Padded outputs (numpy arrays or tensors) -> per image {"boxes", "scores", "labels"}, like `detect`."""
    return [
        {"boxes": boxes[i, :count], "scores": scores[i, :count], "labels": labels[i, :count]}
        for i, count in enumerate(int(n) for n in num_detections)
    ]


class OnnxDetector:
    """An exported ONNX file in onnxruntime: `detector(images)` -> per-image detections (numpy).

    `images` must be in the file's input format (`detector.metadata["input_format"]`); for files with
    post-processing the result is a list of {"boxes" [K,4] xyxy in [0,1], "scores" [K], "labels" [K]}.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime  # an optional dependency, needed for ONNX only

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.session = onnxruntime.InferenceSession(
            str(self.path), providers=list(providers or ["CPUExecutionProvider"])
        )

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    def run(self, images: Any) -> list[Any]:
        """The graph's raw outputs (numpy), in the order of `metadata["outputs"]`."""
        images = np.asarray(images)
        if self.metadata.get("input_format") == "uint8":
            if images.dtype != np.uint8:
                raise ValueError(f"{self.path} takes uint8 RGB pixels [B,S,S,3], got {images.dtype} images")
        else:
            images = images.astype(np.float32, copy=False)
        return self.session.run(None, {INPUT_NAME: images})

    def __call__(self, images: Any) -> list[dict[str, Any]]:
        if not self.metadata.get("include_postprocess", True):
            raise ValueError(f"{self.path} was exported without post-processing: use .run() for raw outputs")
        return unpad_detections(*self.run(images))
