"""Deploy from the command line (issue 25): `export.py format=openvino int8=true`, then `predict.py
model_path=<that file> input=<folder>` and `eval.py model_path=<that file>`, from the fitted checkpoint; an
fp32 export gives the checkpoint's results through the same entry points.

INT8 accuracy bound (stated in README, Deploy): on the fitted run's validation images (its 24 training and 8
test images, where fp32 VOC07 mAP is ~0.76), INT8 (ONNX Runtime's quantiser, 16 calibration images, run by
OpenVINO) keeps VOC07 mAP within 1.0 point and COCO mAP@[.5:.95] within 2.0 points of the checkpoint's.
Measured: VOC07 equal, COCO -0.8 points.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from inputs import require_module
from training_helpers import FittedRun, check_ok, compose_config, run_script, shapes_as_voc

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.export import export
from ssd_lightning.cli.predict import predict

require_module("onnx")
require_module("onnxruntime")
require_module("openvino")

VOC07_BOUND, COCO_BOUND = 0.01, 0.02


def _validation(shapes_root: Path) -> list[str]:
    """eval.py on the images the fitted run validated on (its training and test images)."""
    data = shapes_as_voc(shapes_root, val_sets="[[shapes,train],[shapes,test]]")
    return [*data, "split=val", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def test_images(fitted_run: FittedRun, shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the 8 test images of the fitted run's data (what a user predicts on)."""
    voc = shapes_root / "VOCshapes"
    folder = tmp_path_factory.mktemp("photos")
    for name in (voc / "ImageSets" / "Main" / "test.txt").read_text().split():
        shutil.copy(voc / "JPEGImages" / f"{name}.jpg", folder)
    return folder


@pytest.mark.timeout(900)
def test_openvino_int8_export_predict_and_eval_from_the_command_line(
    fitted_run: FittedRun, shapes_root: Path, test_images: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "export"
    stdout = check_ok(
        run_script(
            "export.py",
            [f"ckpt_path={fitted_run.checkpoint}", "format=openvino", "int8=true", "calibration_images=16",
             f"hydra.run.dir={exported}"],
            cwd=tmp_path,
        )
    )  # fmt: skip
    xml = exported / "model_int8.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert "INT8 calibration on 16 images of voc shapes/train" in stdout and f"model_path={xml}" in stdout
    assert "INT8 quantiser: nncf (int8_quantizer=auto)" in stdout  # OpenVINO's own, installed with [dev]

    predicted = tmp_path / "predict"
    stdout = check_ok(
        run_script(
            "predict.py",
            [f"model_path={xml}", f"input={test_images}", f"hydra.run.dir={predicted}"],
            cwd=tmp_path,
        )
    )
    assert f"model_path: {xml} on openvino (cpu, int8" in stdout
    results = json.loads((predicted / "detections.json").read_text())
    names = sorted(p.stem for p in test_images.iterdir())
    assert sorted(p.stem for p in (predicted / "images").glob("*.jpg")) == names
    assert {r["file_name"] for r in results} == {f"{name}.jpg" for name in names}

    evaluated = tmp_path / "eval"
    overrides = [f"model_path={xml}", *_validation(shapes_root), f"hydra.run.dir={evaluated}"]
    stdout = check_ok(run_script("eval.py", overrides, cwd=tmp_path))
    metrics = json.loads((evaluated / "metrics_val.json").read_text())
    assert (metrics["runtime"], metrics["precision"], metrics["num_images"]) == ("openvino", "int8", 32)
    assert metrics["checkpoint"] == str(fitted_run.checkpoint)  # from the file's metadata
    assert (evaluated / "confusion_matrix.json").is_file() and (evaluated / "thresholds.json").is_file()
    # The INT8 accuracy bound against the checkpoint on the same images (its last validation: these weights).
    fp32 = fitted_run.metrics
    assert fp32["val/num_images"] == 32 and fp32["val/map_voc07"] > 0.5
    assert abs(metrics["map_voc07"] - fp32["val/map_voc07"]) <= VOC07_BOUND
    assert abs(metrics["map"] - fp32["val/map"]) <= COCO_BOUND


def test_an_fp32_export_gives_the_checkpoints_results_through_eval_and_predict(
    fitted_run: FittedRun, shapes_root: Path, test_images: Path, tmp_path: Path
) -> None:
    onnx_path = export(
        compose_config(
            "export", [f"ckpt_path={fitted_run.checkpoint}", "input_format=uint8"], tmp_path / "onnx"
        )
    )
    assert onnx_path.name == "model.onnx"
    results = {}
    for key, source in (("ckpt", f"ckpt_path={fitted_run.checkpoint}"), ("onnx", f"model_path={onnx_path}")):
        cfg = compose_config("eval", [source, *_validation(shapes_root)], tmp_path / f"eval_{key}")
        results[key] = evaluate(cfg)
        output = tmp_path / f"predict_{key}"
        output.mkdir()  # Hydra makes the run folder of a command line
        cfg = compose_config(
            "predict",
            [source, f"input={test_images}", "trainer.accelerator=cpu", "save_images=false"],
            output,
        )
        results[f"{key}_detections"] = json.loads(predict(cfg).read_text())
    for name in ("map_voc07", "map", "mar_100"):
        assert getattr(results["onnx"], name) == pytest.approx(getattr(results["ckpt"], name), abs=1e-4), name
    ckpt, onnx = results["ckpt_detections"], results["onnx_detections"]
    assert len(onnx) == len(ckpt) > 50
    key = lambda r: (r["file_name"], r["category_id"], -r["score"])  # noqa: E731
    for expected, actual in zip(sorted(ckpt, key=key), sorted(onnx, key=key), strict=True):
        assert (actual["file_name"], actual["category_id"]) == (
            expected["file_name"],
            expected["category_id"],
        )
        assert actual["score"] == pytest.approx(expected["score"], abs=2e-5)
        assert actual["bbox"] == pytest.approx(expected["bbox"], abs=0.02)  # rounded to 0.01 px


def test_model_path_mistakes_are_one_line(
    fitted_run: FittedRun, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssd_lightning.cli import eval as eval_cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    weights = tmp_path / "model.tflite"
    weights.write_bytes(b"\0")
    cases = {
        f"ckpt_path={fitted_run.checkpoint} model_path={weights}": "pass one",
        f"model_path={weights}": "model_path=",
        f"model_path={weights.with_suffix('.onnx')}": "no such file",
        f"model_path={fitted_run.checkpoint} runtime=openvino": "runtime=openvino cannot read",
    }
    for overrides, message in cases.items():
        cfg = compose_config("eval", [*overrides.split(), "trainer.accelerator=cpu"], tmp_path / "eval")
        caplog.clear()
        with pytest.raises(SystemExit), caplog.at_level(logging.ERROR, logger="ssd_lightning"):
            eval_cli.main.__wrapped__(cfg)
        (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert message in error, (overrides, error)
