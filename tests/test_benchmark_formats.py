"""`python -m ssd_lightning.benchmark formats`: a smoke run on a tiny checkpoint (the table and JSON hold
every figure, the formats agree with PyTorch), and torchvision's twin of our SSDLite320 computing what ours
does. No timing assertions: the figures are judged by reading the record (README: Deploy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from inputs import require_module

from ssd_lightning.benchmark import main
from ssd_lightning.benchmark.formats import TorchvisionDetector, torchvision_twin
from ssd_lightning.benchmark.suites import calibrate_batch_norm
from ssd_lightning.models.heads import class_logit_conv
from ssd_lightning.runtimes import PyTorchDetector
from ssd_lightning.training.module import SSDLitModule

require_module("onnx")
require_module("onnxruntime")
require_module("onnxscript")
require_module("openvino")

CLASSES = ["ellipse", "rectangle", "triangle", "star", "cross"]  # the built-in data's
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
SHAPES = ["num_train=6", "num_val=2", "num_test=4", "min_side=96", "max_side=128"]


def _module(net: dict, classes: list[str] = CLASSES) -> SSDLitModule:
    torch.manual_seed(0)
    module = SSDLitModule(class_names=classes, net=net, pixel_mean=MEAN, pixel_std=STD)
    size = net["size"]
    calibrate_batch_norm(module.net, torch.randn(2, 3, size, size))  # activations of a trained scale
    with torch.no_grad():  # a trained network's confident background: a few hundred NMS candidates
        for head in module.net.heads:
            class_logit_conv(head).bias.view(-1, len(classes) + 1)[:, 0] += 4.0
    return module.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pytorch_lightning as pl

    path = tmp_path_factory.mktemp("ckpt") / "compact.ckpt"
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(_module({"arch": "compact", "size": 96, "width": 8}))
    trainer.save_checkpoint(path)
    return path


def test_formats_table_of_a_tiny_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    data = [f"dataset.root={tmp_path / 'shapes'}", *(f"dataset.shapes.{s}" for s in SHAPES)]
    argv = ["formats", f"ckpt_path={checkpoint}", *data, "--device", "cpu", "--warmup", "0", "--repeats", "2"]
    argv += [
        "--throughput-repeats",
        "1",
        "--batch",
        "2",
        "--calibration-images",
        "4",
        "--out-dir",
        str(tmp_path),
    ]
    argv += ["--rows", "pytorch", "onnxruntime", "openvino-int8"]
    assert main(argv) == 0
    (record,) = tmp_path.glob("*_formats_cpu.json")
    document = json.loads(record.read_text())
    assert document["calibration_images"] == 4 and document["split"] == "test"
    rows = {row["name"]: row for row in document["rows"]}
    assert list(rows) == ["pytorch", "onnxruntime", "openvino-int8"]
    for row in rows.values():
        for key in (
            "latency_ms_median",
            "latency_ms_p95",
            "network_ms",
            "graph_ms",
            "throughput_images_per_s",
        ):
            assert row[key] > 0, (row["name"], key)
        assert row["latency_ms_p95"] >= row["latency_ms_median"] and row["nms_ms"] >= 0
        assert row["eval_images"] == 4 and row["throughput_batch"] == 2
    assert rows["openvino-int8"]["precision"] == "int8"
    # int8 weights (4x smaller; the IR's graph text, a large part of a model this small, is not)
    assert rows["openvino-int8"]["file_mib"] < 0.75 * rows["onnxruntime"]["file_mib"]
    # The fp32 export gives PyTorch's detections, hence its mAP.
    assert rows["onnxruntime"]["vs_pytorch_same_count_fraction"] == 1.0
    assert rows["onnxruntime"]["vs_pytorch_max_score_difference"] < 1e-5
    assert rows["onnxruntime"]["map_coco"] == pytest.approx(rows["pytorch"]["map_coco"], abs=1e-6)
    table = record.with_suffix(".md").read_text().splitlines()
    assert table[2].startswith("| format | precision | file MiB | batch-1 ms median / p95 |")
    assert [line.split("|")[1].strip() for line in table[4:]] == list(rows)


def test_torchvisions_ssdlite_twin_computes_what_ours_does() -> None:
    net = {"arch": "mobilenet_v3_large", "size": 320, "head": "ssdlite", "prior_preset_name": "ssdlite"}
    module = _module(net, ["a", "b", "c"])
    reference, note = torchvision_twin(module)
    assert reference is not None and note == "our trained weights"
    ours = PyTorchDetector(module, "ours")
    theirs = TorchvisionDetector(reference, ours.info)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 320, 320, 3), dtype=np.uint8)
    expected, actual = ours.infer(pixels), theirs.infer(pixels)
    for exp, act in zip(expected, actual, strict=True):
        assert len(exp["scores"]) == len(act["scores"]) > 50
        np.testing.assert_allclose(np.sort(act["scores"]), np.sort(exp["scores"]), atol=1e-5)
    _, note = torchvision_twin(_module({"arch": "compact", "size": 96, "width": 8}))
    assert note == "torchvision has no compact SSD96"


def test_the_issues_goals_are_judged_from_the_rows() -> None:
    from types import SimpleNamespace

    from ssd_lightning.benchmark.formats import Row, goals

    def row(name: str, precision: str, ms: float, map_voc07: float) -> Row:
        detector = SimpleNamespace(info=SimpleNamespace(precision=precision))
        return Row(name, detector, None, 1.0, figures={"latency_ms_median": ms, "map_voc07": map_voc07})  # type: ignore[arg-type]

    lite = [
        row("pytorch", "fp32", 45.0, 0.5),
        row("torchvision", "fp32", 35.0, 0.5),
        row("openvino", "fp32", 9.0, 0.5),
    ]
    assert [(g["goal"], g["row"], g["met"]) for g in goals(lite, "mobilenet_v3_large")] == [
        ("best runtime <= 10 ms batch 1", "openvino", True),
        (">= 3x faster than PyTorch eager", "openvino", True),
        ("faster than torchvision eager", "openvino", True),
    ]
    vgg = [row("pytorch", "fp32", 490.0, 0.700), row("openvino-int8", "int8", 150.0, 0.685)]
    assert [g["met"] for g in goals(vgg, "vgg16")] == [True, False]  # fast enough, 1.5 points below fp32
