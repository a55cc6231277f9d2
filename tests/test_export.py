"""Export: ONNX (run in onnxruntime) and TorchScript files give PyTorch's detections on the same images.

Tolerance: onnxruntime's convolutions round differently from PyTorch's, so scores and box coordinates may
differ by float32 rounding (observed <= 1e-6); they are compared with atol 1e-5. Labels and detection
counts must be equal.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from inputs import require_module

import ssd_lightning as sl
from ssd_lightning.boxes import decode
from ssd_lightning.export import (
    DeployableSSD,
    OnnxDetector,
    detect_padded,
    export_onnx,
    export_torchscript,
    read_metadata,
    unpad_detections,
)
from ssd_lightning.postprocess import DetectionConfig, detect

onnx = require_module("onnx")
onnxruntime = require_module("onnxruntime")
require_module("onnxscript")

CLASSES = ["cat", "dog", "bird"]
SIZE = 128
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
ATOL = 1e-5
# Tighter than the defaults so that the pre-NMS cut, NMS and the top-200 cut all remove detections.
NET = {
    "arch": "compact",
    "size": SIZE,
    "width": 8,
    "score_threshold": 0.05,
    "nms_iou_threshold": 0.3,
    "pre_nms_top_k": 100,
}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _perturb(model: sl.SSD) -> sl.SSD:
    """Sharpen the class logits and favour the background, so scores spread from ~0 to ~1 and a flat
    image (all-zero input) scores below every threshold (a seeded random model scores ~1/C everywhere)."""
    with torch.no_grad():
        for head in model.heads:
            head.conf.weight.mul_(8.0)
            head.conf.bias.view(-1, model.num_classes)[:, 0] += 6.0
    return model


@pytest.fixture(scope="module")
def model() -> sl.SSD:
    torch.manual_seed(0)
    return _perturb(sl.build_ssd(num_classes=len(CLASSES) + 1, **NET)).eval()


def _pixels(batch: int, seed: int, flat_last: bool = True) -> torch.Tensor:
    """uint8 [B,S,S,3] RGB noise images; a flat last one (the mean colour) has no detections."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
    if flat_last:
        pixels[-1] = torch.tensor(MEAN).round().to(torch.uint8)
    return pixels


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() - mean) / std


def _reference(model: sl.SSD, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model.detect(*model(images))


def assert_same_detections(expected: list[dict], actual: list[dict], atol: float = ATOL) -> None:
    assert len(actual) == len(expected)
    for index, (exp, act) in enumerate(zip(expected, actual, strict=True)):
        exp = {k: np.asarray(v) for k, v in exp.items()}
        act = {k: np.asarray(v) for k, v in act.items()}
        assert len(act["scores"]) == len(exp["scores"]), f"image {index}: detection counts differ"
        # Same set, whatever the order of equal scores: sort both by (label, score).
        exp_order = np.lexsort((exp["scores"], exp["labels"]))
        act_order = np.lexsort((act["scores"], act["labels"]))
        np.testing.assert_array_equal(act["labels"][act_order], exp["labels"][exp_order])
        np.testing.assert_allclose(act["scores"][act_order], exp["scores"][exp_order], rtol=0, atol=atol)
        np.testing.assert_allclose(act["boxes"][act_order], exp["boxes"][exp_order], rtol=0, atol=atol)
        assert np.all(np.diff(act["scores"]) <= atol), f"image {index}: detections not sorted by score"


@pytest.mark.parametrize(
    "config",
    [
        DetectionConfig(0.05, 0.3, 200, 100),  # every cut removes something
        DetectionConfig(0.01, 0.45, 7, 400),  # tiny top_k
        DetectionConfig(0.2, 0.6, 100_000, 100_000),  # pre_nms_top_k > priors, top_k > candidates
    ],
)
def test_detect_padded_matches_detect(model: sl.SSD, config: DetectionConfig) -> None:
    images = _normalise(_pixels(3, seed=1))
    with torch.no_grad():
        loc, conf = model(images)
    expected = detect(loc, conf, model.priors, config)
    boxes, scores, labels, counts = detect_padded(loc, conf, model.priors, config)

    num_priors = model.priors.shape[0]
    slots = min(config.top_k, len(CLASSES) * min(config.pre_nms_top_k, num_priors))
    assert boxes.shape == (3, slots, 4) and scores.shape == labels.shape == (3, slots)
    assert counts.tolist() == [len(e["scores"]) for e in expected]
    assert counts[0] > 0 and counts[-1] == 0  # the flat image has nothing
    assert_same_detections(expected, unpad_detections(boxes, scores, labels, counts), atol=1e-6)
    padding = torch.arange(slots)[None, :] >= counts[:, None]
    assert not boxes[padding].any() and not scores[padding].any() and not labels[padding].any()


@pytest.fixture(scope="module")
def onnx_file(model: sl.SSD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "ssd.onnx"
    return export_onnx(model, path, class_names=CLASSES, pixel_mean=MEAN, pixel_std=STD)


def test_the_test_model_exercises_every_cut(model: sl.SSD) -> None:
    """With the test thresholds, each step of post-processing removes detections, so the comparisons
    below would catch a step missing from the exported graph."""
    images = _normalise(_pixels(2, seed=4, flat_last=False))
    with torch.no_grad():
        loc, conf = model(images)
    config = model.detection
    top_scores = conf.softmax(-1)[..., 1:].topk(config.pre_nms_top_k, dim=1).values  # [B, k, C-1]
    above_threshold = (conf.softmax(-1)[..., 1:] > config.score_threshold).sum(dim=(1, 2))
    candidates = (top_scores > config.score_threshold).sum(dim=(1, 2))
    unlimited = dataclasses.replace(config, top_k=10**6)
    after_nms = torch.tensor([len(d["scores"]) for d in detect(loc, conf, model.priors, unlimited)])
    assert (above_threshold > candidates).all()  # the per-class pre-NMS cut
    assert (candidates > after_nms).all()  # NMS
    assert (after_nms > config.top_k).all()  # the per-image top_k cut


def test_onnx_detections_match_pytorch(model: sl.SSD, onnx_file: Path) -> None:
    detector = OnnxDetector(onnx_file)
    for batch, flat_last in ((4, True), (1, False)):  # the batch dimension is dynamic; traced with 2
        images = _normalise(_pixels(batch, seed=batch, flat_last=flat_last))
        expected = _reference(model, images)
        counts = [len(e["scores"]) for e in expected]
        assert counts[0] > 0 and (counts[-1] == 0) == flat_last
        assert_same_detections(expected, detector(images.numpy()))


def test_onnx_file_describes_itself(model: sl.SSD, onnx_file: Path) -> None:
    metadata = read_metadata(onnx_file)
    assert metadata["class_names"] == CLASSES
    assert metadata["image_size"] == SIZE and metadata["input_format"] == "float"
    assert metadata["batch_size"] is None  # dynamic
    assert metadata["pixel_mean"] == MEAN and metadata["pixel_std"] == STD
    assert (metadata["score_threshold"], metadata["nms_iou_threshold"], metadata["top_k"]) == (0.05, 0.3, 200)

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and images.type == "tensor(float)"
    assert isinstance(images.shape[0], str) and images.shape[1:] == [3, SIZE, SIZE]
    operators = {node.op_type for node in onnx.load(onnx_file).graph.node}
    assert "NonMaxSuppression" in operators  # post-processing is in the graph
    outputs = {o.name: o for o in session.get_outputs()}
    assert list(outputs) == metadata["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert outputs["boxes"].shape[1:] == [200, 4] and outputs["labels"].type == "tensor(int64)"


def test_onnx_uint8_input_and_raw_outputs(model: sl.SSD, tmp_path: Path) -> None:
    training_model = copy.deepcopy(model).train()
    path = export_onnx(
        training_model,
        tmp_path / "raw.onnx",
        batch_size=2,
        include_postprocess=False,
        input_format="uint8",
        pixel_mean=MEAN,
        pixel_std=STD,
    )
    assert training_model.training  # exported in eval mode without touching the caller's model

    pixels = _pixels(2, seed=5)
    with torch.no_grad():
        loc, conf = model(_normalise(pixels))
    detector = OnnxDetector(path)
    assert detector.metadata["batch_size"] == 2 and detector.metadata["input"].startswith("uint8 [2,")
    boxes, scores = detector.run(pixels.numpy())
    np.testing.assert_allclose(boxes, decode(loc, model.priors, model.variances).numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(scores, conf.softmax(-1).numpy(), rtol=0, atol=ATOL)

    assert detector.session.get_inputs()[0].shape == [2, SIZE, SIZE, 3]
    with pytest.raises(ValueError, match="takes uint8 RGB pixels"):
        detector.run(_normalise(pixels).numpy())
    with pytest.raises(ValueError, match="without post-processing"):
        detector(pixels.numpy())


def test_export_arguments_are_checked(model: sl.SSD, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pixel_mean and pixel_std"):
        DeployableSSD(model, input_format="uint8")
    with pytest.raises(ValueError, match="3 values"):
        DeployableSSD(model, input_format="uint8", pixel_mean=[0, 0], pixel_std=[1, 1])
    with pytest.raises(ValueError, match="input_format='bgr'"):
        DeployableSSD(model, input_format="bgr")
    with pytest.raises(ValueError, match="2 class names for a model with 3 object classes"):
        export_torchscript(model, tmp_path / "m.pt", class_names=["cat", "dog"])
    with pytest.raises(TypeError, match="expected an ssd_lightning SSD"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        read_metadata(tmp_path / "missing.onnx")


def _checkpoint(model: sl.SSD, path: Path) -> Path:
    """A checkpoint as `python train.py` writes it, holding `model`'s weights."""
    import pytorch_lightning as pl

    from ssd_lightning.training.module import SSDLitModule

    module = SSDLitModule(class_names=CLASSES, net=NET, pixel_mean=MEAN, pixel_std=STD)
    module.net.load_state_dict(model.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _compose(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=HYDRA_VERSION_BASE):
        return compose(
            "export", overrides=[f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}", *overrides]
        )


def test_cli_exports_a_training_checkpoint_to_torchscript(model: sl.SSD, tmp_path: Path) -> None:
    from ssd_lightning.cli.export import export

    ckpt = _checkpoint(model, tmp_path / "last.ckpt")
    cfg = _compose(
        tmp_path, f"ckpt_path={ckpt}", "format=torchscript", "input_format=uint8", "detection.top_k=50"
    )
    path = export(cfg)
    assert path == tmp_path / "model.pt"

    metadata = read_metadata(path)
    assert metadata["class_names"] == CLASSES and metadata["pixel_mean"] == MEAN
    assert metadata["top_k"] == 50 and metadata["net"] == NET

    pixels = _pixels(3, seed=7)
    expected_model = copy.deepcopy(model)
    expected_model.detection = DetectionConfig(0.05, 0.3, 50, 100)
    expected = _reference(expected_model, _normalise(pixels))
    assert [len(e["scores"]) for e in expected] == [50, 50, 0]
    scripted = torch.jit.load(str(path))
    # Loadable with torch + torchvision alone: no op of this package is recorded.
    assert "ssd_lightning::" not in str(scripted.inlined_graph)
    with torch.no_grad():
        actual = unpad_detections(*scripted(pixels))
    assert_same_detections(expected, actual)


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    from ssd_lightning.cli.export import export

    missing = f"ckpt_path={tmp_path / 'none.ckpt'}"
    with pytest.raises(ValueError, match="format='tflite'"):
        export(_compose(tmp_path, missing, "format=tflite"))
    with pytest.raises(ValueError, match="batch_size is an ONNX option"):
        export(_compose(tmp_path, missing, "format=torchscript", "batch_size=1"))
    with pytest.raises(FileNotFoundError, match="none.ckpt"):
        export(_compose(tmp_path, missing))
