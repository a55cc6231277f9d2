"""The runtimes behind one detector interface give the checkpoint path's detections (ssd_lightning.runtimes).

Model: a seeded compact SSD in a real training checkpoint, its class logits sharpened so that scores spread
from ~0 to ~1 and every cut of the post-processing removes detections (as in tests/test_export.py).

Tolerances against PyTorch eager (the checkpoint path of eval.py / predict.py), on the same images:
- fp32 files (ONNX in ONNX Runtime and OpenVINO, OpenVINO IR, TorchScript): equal detection counts and
  labels; scores and [0, 1] box coordinates within 1e-5 (float32 rounding of other convolution kernels,
  observed <= 3e-7); boxes in an image's pixels within 1e-5 x its side.
- INT8 files: structure only here (which convolutions are quantised, that they run); their accuracy bound
  is measured on a trained checkpoint in tests/training/test_deploy_cli.py.
- TensorRT (`gpu` tests): fp32 engine within 1e-3 (TF32 convolutions), fp16 engine runs and finds the
  PyTorch path's best detection.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inputs import require_module

from ssd_lightning.data import build_eval_transform, collate_detection
from ssd_lightning.export import export_onnx, export_torchscript
from ssd_lightning.metrics.evaluation import to_pixels
from ssd_lightning.runtimes import (
    OnnxRuntimeDetector,
    OpenVINODetector,
    PyTorchDetector,
    RuntimeUnavailable,
    choose_runtime,
    load_detector,
    resize_images,
)
from ssd_lightning.runtimes import loading as runtime_loading
from ssd_lightning.runtimes.conversion import float_convolutions, quantize_onnx, write_openvino

onnx = require_module("onnx")
require_module("onnxruntime")
require_module("onnxscript")
openvino = require_module("openvino")

CLASSES = ["cat", "dog", "bird"]
SIZE = 96
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
NET = {"arch": "compact", "size": SIZE, "width": 8, "score_threshold": 0.05, "nms_iou_threshold": 0.3}
ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _module():
    from ssd_lightning.training.module import SSDLitModule

    torch.manual_seed(0)
    module = SSDLitModule(class_names=CLASSES, net=NET, pixel_mean=MEAN, pixel_std=STD)
    with torch.no_grad():
        for head in module.net.heads:
            head.conf.weight.mul_(8.0)
            head.conf.bias.view(-1, len(CLASSES) + 1)[:, 0] += 6.0
    return module.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as train.py writes it."""
    import pytorch_lightning as pl

    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(_module())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> PyTorchDetector:
    detector = load_detector(checkpoint)
    assert isinstance(detector, PyTorchDetector)
    return detector


def _images(seed: int) -> list[np.ndarray]:
    """Decoded RGB photos of other sizes than the network's (so the resize is exercised): smooth noise, and
    a flat one (the mean colour) with nothing on it."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in ((120, 80), (SIZE, SIZE), (61, 203)):
        small = rng.integers(0, 256, (height // 6 + 1, width // 6 + 1, 3)).astype(np.float32)
        images.append(np.clip(np.kron(small, np.ones((6, 6, 1)))[:height, :width], 0, 255).astype(np.uint8))
    images.append(np.full((70, 90, 3), np.round(MEAN), np.uint8))
    return images


@pytest.fixture(scope="module")
def files(reference: PyTorchDetector, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoint exported as export.py writes it, in every CPU format."""
    folder = tmp_path_factory.mktemp("exported")
    net = reference.module.net
    common = {"pixel_mean": MEAN, "pixel_std": STD, "class_names": CLASSES}
    out = {
        "onnx_uint8": export_onnx(net, folder / "uint8.onnx", input_format="uint8", **common),
        "onnx_float": export_onnx(net, folder / "float.onnx", input_format="float", **common),
        "onnx_batch2": export_onnx(net, folder / "batch2.onnx", batch_size=2, input_format="uint8", **common),
        "torchscript": export_torchscript(net, folder / "model.pt", input_format="uint8", **common),
    }
    out["openvino"] = write_openvino(out["onnx_float"], folder / "model.xml")
    return out


def assert_same(expected: list[dict], actual: list[dict], atol: float | list[float] = ATOL) -> None:
    tolerances = atol if isinstance(atol, list) else [atol] * len(expected)
    assert len(actual) == len(expected)
    for index, (exp, act, tol) in enumerate(zip(expected, actual, tolerances, strict=True)):
        assert len(act["scores"]) == len(exp["scores"]), f"image {index}: detection counts differ"
        exp_order = np.lexsort((exp["scores"], exp["labels"]))
        act_order = np.lexsort((act["scores"], act["labels"]))
        np.testing.assert_array_equal(act["labels"][act_order], exp["labels"][exp_order])
        np.testing.assert_allclose(act["scores"][act_order], exp["scores"][exp_order], rtol=0, atol=ATOL)
        np.testing.assert_allclose(act["boxes"][act_order], exp["boxes"][exp_order], rtol=0, atol=tol)


def test_the_pytorch_detector_is_the_checkpoint_path(reference: PyTorchDetector, checkpoint: Path) -> None:
    """Decoded photos in, boxes in their pixels out: what predict.py's data pipeline (albumentations resize,
    uint8 batch, the module's normalisation, `detect`, `to_pixels`) gives, bit for bit."""
    images = _images(1)
    transform = build_eval_transform(SIZE, MEAN, STD, normalize=False)
    batch, targets = collate_detection([transform(image, _no_objects(image)) for image in images])
    module = reference.module
    with torch.no_grad():
        expected = module.net.detect(*module(batch))
    actual = reference(images)
    counts = [len(d["scores"]) for d in actual]
    assert min(counts[:-1]) > 0 and counts[-1] == 0  # the flat image has nothing
    for exp, act, target in zip(expected, actual, targets, strict=True):
        np.testing.assert_array_equal(act["scores"], exp["scores"].numpy())
        np.testing.assert_array_equal(act["boxes"], to_pixels(exp["boxes"], target["orig_size"]).numpy())
    assert reference.class_names == CLASSES and reference.info.detection.score_threshold == 0.05


def _no_objects(image: np.ndarray) -> dict:
    """The target of a photo without annotations, as the data sets make it."""
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "difficult": np.zeros(0, bool),
        "orig_size": np.asarray(image.shape[:2]),
        "image_id": 0,
    }


@pytest.mark.parametrize("shape", [(120, 80), (96, 96), (61, 203), (400, 301)])
def test_resize_is_the_evaluation_transforms(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    transform = build_eval_transform(SIZE, MEAN, STD, normalize=False)
    pixels, _ = transform(image, _no_objects(image))
    np.testing.assert_array_equal(resize_images([image], SIZE)[0], pixels.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="uint8 RGB pixels"):
        resize_images([image.astype(np.float32)], SIZE)


@pytest.mark.parametrize(
    ("name", "runtime"),
    [
        ("onnx_uint8", "onnxruntime"),
        ("onnx_float", "onnxruntime"),
        ("onnx_uint8", "openvino"),
        ("openvino", "openvino"),
        ("torchscript", "torchscript"),
        ("onnx_batch2", "onnxruntime"),  # a fixed batch of 2 runs 4 images in two calls
    ],
)
def test_every_runtime_gives_the_checkpoints_detections(
    name: str, runtime: str, reference: PyTorchDetector, files: dict[str, Path]
) -> None:
    detector = load_detector(files[name], runtime, "cpu")
    assert detector.runtime == runtime and detector.class_names == CLASSES
    images = _images(2)
    expected, actual = reference(images), detector(images)
    assert sum(len(d["scores"]) for d in expected) > 20
    sides = [ATOL * max(image.shape[:2]) for image in images]
    assert_same(expected, actual, atol=sides)
    pixels = resize_images(images, SIZE)  # the [0, 1] boxes of the step eval.py runs
    assert_same(reference.infer(pixels), detector.infer(pixels))


def test_runtime_auto_rule(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_runtime("m.xml", "cpu") == "openvino"
    assert choose_runtime("m.engine", "cuda") == "tensorrt"
    assert choose_runtime("m.pt", "cpu") == "torchscript"
    assert choose_runtime("last.ckpt", "cpu") == "pytorch"
    assert choose_runtime("m.onnx", "cpu") == "openvino"  # as fast on fp32 files, 4x on INT8 ones here
    assert choose_runtime("m.onnx", "cuda") == "onnxruntime"
    assert load_detector(files["onnx_float"]).runtime == "openvino"
    monkeypatch.setattr(runtime_loading, "installed", lambda runtime: runtime != "openvino")
    assert choose_runtime("m.onnx", "cpu") == "onnxruntime"
    with pytest.raises(ValueError, match=r"model_path=m.tflite: not a model file.*\.onnx"):
        choose_runtime("m.tflite", "cpu")
    with pytest.raises(ValueError, match=r"runtime=openvino cannot read .*model.pt"):
        load_detector(files["torchscript"], "openvino")


def test_a_missing_package_names_the_extra(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(
        RuntimeUnavailable, match=r'runtime=openvino needs .*pip install "ssd_lightning\[openvino\]"'
    ):
        load_detector(files["openvino"])
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not read: the package is missing first")
    with pytest.raises(
        RuntimeUnavailable, match=r'runtime=tensorrt needs .*pip install "ssd_lightning\[tensorrt\]"'
    ):
        load_detector(engine, device="cuda")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_detector(tmp_path / "missing.onnx")


def test_files_not_from_export_or_without_nms_are_refused(reference: PyTorchDetector, tmp_path: Path) -> None:
    raw = export_onnx(reference.module.net, tmp_path / "raw.onnx", include_postprocess=False, pixel_mean=MEAN,
                      pixel_std=STD, class_names=CLASSES)  # fmt: skip
    with pytest.raises(ValueError, match="without post-processing"):
        OnnxRuntimeDetector(raw)
    assert (
        OnnxRuntimeDetector(raw, raw=True).outputs(np.zeros((1, 3, SIZE, SIZE), np.float32))[1].shape[-1] == 4
    )
    bare = onnx.load(raw)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="not written by ssd_lightning's export.py"):
        OnnxRuntimeDetector(tmp_path / "bare.onnx")
    (tmp_path / "lonely.xml").write_text("<net/>")
    with pytest.raises(FileNotFoundError, match=r"lonely.bin"):
        OpenVINODetector(tmp_path / "lonely.xml")


def _quantised_convolutions(path: Path) -> tuple[set[str], set[str]]:
    """Conv nodes of a QDQ file whose weight comes through DequantizeLinear, and the other Conv nodes."""
    graph = onnx.load(path).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    quantised = {node.name for node in convs if node.input[1] in dequantized}
    return quantised, {node.name for node in convs} - quantised


def test_int8_quantises_the_convolutions_only(
    reference: PyTorchDetector, files: dict[str, Path], tmp_path: Path
) -> None:
    calibration = resize_images(_images(3) + _images(4), SIZE)
    path = quantize_onnx(files["onnx_uint8"], tmp_path / "int8.onnx", calibration)
    quantised, kept = _quantised_convolutions(path)
    assert quantised and not kept
    graph = onnx.load(path).graph
    assert "NonMaxSuppression" in {node.op_type for node in graph.node}
    # Quantised values feed the network's layers only (convolutions, their activations, the heads' own
    # reshaping): the post-processing (softmax, decode, top-k, NMS, gathers) computes in float.
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dequantized = [node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"]
    assert len(dequantized) >= 2 * len(quantised)  # weights and activations
    fed = set().union(*(consumers[name] for name in dequantized))
    assert "Conv" in fed and not fed & {"Softmax", "TopK", "NonMaxSuppression", "Gather", "Exp", "ScatterND"}
    detector = load_detector(path, "onnxruntime")
    assert detector.info.precision == "int8" and detector.info.metadata["calibration_images"] == 8
    assert detector.info.metadata["quantizer"] == "onnxruntime"
    xml = write_openvino(path, tmp_path / "int8.xml")
    for runner in (detector, load_detector(xml)):
        counts = [len(d["scores"]) for d in runner(_images(2))]
        assert counts[-1] == 0 and min(counts[:-1]) > 0  # runs; its accuracy is test_deploy_cli's

    heads = tmp_path / "heads_float.onnx"
    quantize_onnx(files["onnx_uint8"], heads, calibration, keep_float=["heads"])
    quantised, kept = _quantised_convolutions(heads)
    assert kept == set(float_convolutions(onnx.load(files["onnx_uint8"]), ["heads"])) and len(kept) == 12
    with pytest.raises(ValueError, match="int8_keep_float"):
        quantize_onnx(files["onnx_uint8"], tmp_path / "x.onnx", calibration, keep_float=["all"])


def test_int8_by_nncf(reference: PyTorchDetector, files: dict[str, Path], tmp_path: Path) -> None:
    """int8_quantizer=nncf: OpenVINO's quantiser (with its ONNX backend) writes a QDQ file too."""
    require_module("nncf")
    calibration = resize_images(_images(3) + _images(4), SIZE)
    path = quantize_onnx(files["onnx_uint8"], tmp_path / "nncf.onnx", calibration, quantizer="nncf")
    quantised, _ = _quantised_convolutions(path)
    assert len(quantised) >= 12  # at least every head (NNCF decides which other layers gain from INT8)
    detector = load_detector(write_openvino(path, tmp_path / "nncf.xml"))
    assert (detector.info.precision, detector.info.metadata["quantizer"]) == ("int8", "nncf")
    counts = [len(d["scores"]) for d in detector(_images(2))]
    assert counts[-1] == 0 and min(counts[:-1]) > 0
    with pytest.raises(ValueError, match="int8_quantizer=tflite"):
        quantize_onnx(files["onnx_uint8"], tmp_path / "x.onnx", calibration, quantizer="tflite")


@pytest.mark.gpu
def test_tensorrt_engines_give_the_checkpoints_detections(
    reference: PyTorchDetector, files: dict[str, Path], tmp_path: Path
) -> None:
    """On a CUDA GPU with TensorRT: engines built from the ONNX file (NMS as TensorRT's layer)."""
    from ssd_lightning.runtimes.conversion import build_tensorrt_engine

    require_module("tensorrt")
    assert torch.cuda.is_available(), "a gpu test: run it on a machine with a CUDA GPU"
    images = _images(2)
    expected = reference(images)
    fp32 = build_tensorrt_engine(files["onnx_uint8"], tmp_path / "fp32.engine", precision="fp32")
    detector = load_detector(fp32, "auto", "cuda")
    assert detector.runtime == "tensorrt" and detector.info.metadata["tensorrt"]
    actual = detector(images)
    for exp, act in zip(expected, actual, strict=True):  # TF32 convolutions: 1e-3
        assert abs(len(act["scores"]) - len(exp["scores"])) <= max(2, len(exp["scores"]) // 20)
        if len(exp["scores"]):
            assert act["labels"][0] == exp["labels"][0]
            np.testing.assert_allclose(act["scores"][:5], exp["scores"][:5], atol=1e-3)
    fp16 = load_detector(build_tensorrt_engine(files["onnx_uint8"], tmp_path / "fp16.engine"), device="cuda")
    best = [d["labels"][0] if len(d["labels"]) else 0 for d in fp16(images)]
    assert best == [d["labels"][0] if len(d["labels"]) else 0 for d in expected]
