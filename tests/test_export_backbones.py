"""Export of the SSDLite320 MobileNetV3, SSD300 ResNet-50 and timm-backbone networks: the ONNX file (in
onnxruntime) and the TorchScript file give PyTorch's detections on the same images (tolerances as in
test_export).

TorchScript is checked on SSDLite only, whose Hardswish, Hardsigmoid, ReLU6 and squeeze-excitation layers
are new to export; ResNet-50's conv/BatchNorm/ReLU/max-pool layers trace like the other networks', and its
traced file costs ~15 s of CPU to check.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from inputs import require_module
from test_export import ATOL, MEAN, STD, assert_same_detections

import ssd_lightning as sl
from ssd_lightning.export import OnnxDetector, export_onnx, export_torchscript, unpad_detections
from ssd_lightning.models.heads import class_logit_conv

require_module("onnx")
require_module("onnxruntime")
require_module("onnxscript")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

CLASSES = ["cat", "dog", "bird"]
ARCHS = {
    "mobilenet_v3_large": {"arch": "mobilenet_v3_large", "size": 320},
    "resnet50": {"arch": "resnet50", "size": 300, "prior_preset_name": "coco"},
    # timm backbones with SSD heads at 300 and SSDLite heads at 320
    "timm:resnet18": {"arch": "timm:resnet18", "size": 300},
    "timm:convnext_atto": {"arch": "timm:convnext_atto", "size": 320, "head": "ssdlite"},
}
# (weight variance gain, scale of the class-logit weights) that give logits of std ~2.5 on noise images.
SCALES = {
    "mobilenet_v3_large": (1.6, 0.5),
    "resnet50": (1.0, 0.5),
    "timm:resnet18": (0.5, 1.0),
    "timm:convnext_atto": (1.0, 1.0),
}


def _trained_like(model: sl.SSD, gain: float, conf_scale: float, seed: int = 0) -> sl.SSD:
    """Weights that keep activations O(1) (a random-init SSDLite's vanish), then class logits scaled and
    biased to the background, so that scores spread below ~0.8 without ties and NMS removes boxes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.dim() > 1:
                std = math.sqrt(gain / tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        for head in model.heads:
            conv = class_logit_conv(head)
            conv.weight.mul_(conf_scale)
            conv.bias.view(-1, model.num_classes)[:, 0] += 4.0
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request: pytest.FixtureRequest) -> sl.SSD:
    net = {**ARCHS[request.param], "score_threshold": 0.05, "nms_iou_threshold": 0.3, "pre_nms_top_k": 100}
    ssd = sl.build_ssd(num_classes=len(CLASSES) + 1, **net)
    return _trained_like(ssd, *SCALES[request.param]).eval()


def _pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() - mean) / std


def _reference(model: sl.SSD, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        detections = model.detect(*model(_normalise(pixels)))
    assert all(0 < len(d["scores"]) for d in detections)
    return detections


def test_onnx_detections_match_pytorch(model: sl.SSD, tmp_path: Path) -> None:
    # A fixed batch of 2: what is new here is the layers. A dynamic batch (test_export.py's networks, and
    # export.py's default) costs torch.export ~3x the CPU on these deep networks: ~20 s for SSDLite.
    path = export_onnx(
        model, tmp_path / "ssd.onnx", batch_size=2, class_names=CLASSES, pixel_mean=MEAN, pixel_std=STD
    )
    detector = OnnxDetector(path)
    assert detector.image_size == model.image_size
    pixels = _pixels(2, model.image_size, seed=1)
    assert_same_detections(_reference(model, pixels), detector(_normalise(pixels).numpy()), atol=ATOL)


@pytest.mark.parametrize("model", ["mobilenet_v3_large"], indirect=True)
def test_torchscript_detections_match_pytorch(model: sl.SSD, tmp_path: Path) -> None:
    path = export_torchscript(
        model, tmp_path / "ssd.pt", input_format="uint8", pixel_mean=MEAN, pixel_std=STD, class_names=CLASSES
    )
    scripted = torch.jit.load(str(path))
    pixels = _pixels(2, model.image_size, seed=2)
    with torch.no_grad():
        actual = unpad_detections(*scripted(pixels))
    assert_same_detections(_reference(model, pixels), actual, atol=ATOL)
