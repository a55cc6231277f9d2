"""The entry points end to end: train.py -> checkpoints + metrics, eval.py reproduces them, predict.py draws.
Also SSD300 on real coco128 data through dataset=coco."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import FITTED_EPOCHS, PROJECT_ROOT, FittedRun, check_ok, compose_config, run_script

from ssd_lightning.cli.train import train


def test_train_py_writes_its_run_folder(fitted_run: FittedRun) -> None:
    run = fitted_run.folder
    assert "Final mAP" in fitted_run.stdout and "mAP VOC07" in fitted_run.stdout
    assert "ellipse" in fitted_run.stdout  # the per-class table
    checkpoints = run / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and len(list(checkpoints.glob("best-*.ckpt"))) == 1
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    metrics = fitted_run.metrics
    assert {"val/map", "val/map_50", "val/map_voc07", "test/map_voc07", "train/loss"} <= set(metrics)
    # 24 images / batch 4 = 6 steps per epoch; last.ckpt holds the end of training.
    steps = FITTED_EPOCHS * 6
    assert (
        metrics["step"] == steps == torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    )
    assert metrics["val/map_voc07"] > 0.3  # fitted to the images it is validated on


@pytest.mark.timeout(900)
def test_eval_py_reproduces_the_logged_map(fitted_run: FittedRun, tmp_path: Path) -> None:
    out_json = tmp_path / "eval.json"
    dataset_args = [a for a in fitted_run.overrides if a.startswith(("dataset.", "dataset="))]
    stdout = check_ok(
        run_script(
            "eval.py",
            [
                f"ckpt_path={fitted_run.checkpoint}",
                "split=val",
                f"output_json={out_json}",
                *dataset_args,
                f"hydra.run.dir={tmp_path / 'eval'}",
            ],
            cwd=tmp_path,
        )
    )
    assert "mAP VOC2010+" in stdout and "mAP COCO" in stdout
    evaluated = json.loads(out_json.read_text())
    logged = fitted_run.metrics
    assert evaluated["num_images"] == logged["val/num_images"] == 32  # 24 fitted and 8 held-out images
    assert 0.2 < logged["val/map_voc07"] < 0.95  # a value that moves with what evaluation counts
    for key in ("map_voc07", "map_voc12", "map", "map_50", "map_75"):
        assert evaluated[key] == pytest.approx(logged[f"val/{key}"], rel=1e-5), key
    assert set(evaluated["per_class_ap_voc07"]) <= {"ellipse", "rectangle", "triangle", "star", "cross"}


@pytest.mark.timeout(900)
def test_predict_py_draws_a_folder_of_images(
    fitted_run: FittedRun, shapes_root: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    jpegs = sorted((shapes_root / "VOCshapes" / "JPEGImages").glob("test_*.jpg"))[:2]
    for jpeg in jpegs:
        shutil.copy(jpeg, images / jpeg.name)
    predict_dir = tmp_path / "predict"
    check_ok(
        run_script(
            "predict.py",
            [
                f"ckpt_path={fitted_run.checkpoint}",
                f"input={images}",
                "display_threshold=0.05",
                f"hydra.run.dir={predict_dir}",
            ],
            cwd=tmp_path,
        )
    )
    assert sorted(p.name for p in (predict_dir / "images").glob("*.jpg")) == sorted(j.name for j in jpegs)
    results = json.loads((predict_dir / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3, 4, 5}
    assert all(r["bbox"][0] >= -1 and r["bbox"][2] > 0 and 0 < r["score"] <= 1 for r in results)
    assert set(json.loads((predict_dir / "image_ids.json").read_text())) == {
        str(images / j.name) for j in jpegs
    }


def test_resume_last_finds_the_newest_run(fast: list[str], tmp_path: Path) -> None:
    common = [*fast, "trainer.max_epochs=1", "test=false"]
    first = compose_config(
        "train", common, tmp_path / "outputs" / "train" / "runs" / "compact_shapes" / "first"
    )
    train(first)
    # `ckpt_path=last` continues from it: the fit starts at its step and runs one more epoch.
    second = compose_config("train", [*common, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "second")
    second.paths.log_dir = str(tmp_path / "outputs")
    assert train(second)["step"] == 12


@pytest.mark.timeout(900)
def test_ssd300_on_coco128(coco128_root: Path, tmp_path: Path) -> None:
    """The paper's network through the COCO path (VOC-format data runs through the other training tests)."""
    overrides = [
        "model=ssd300",
        "model.backbone_weights=null",  # no download in CI
        "dataset=coco",
        f"dataset.root={coco128_root / 'coco'}",
        "dataset.val_split=train2017",
        "dataset.batch_size=2",
        "dataset.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "trainer.enable_progress_bar=false",
    ]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert metrics["step"] == 2
    for key in ("train/loss", "val/map_voc07", "val/map", "test/map_voc07"):
        assert key in metrics and metrics[key] == metrics[key], key  # logged and not NaN
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"][
        "category_ids"
    ][:3] == [1, 2, 3]


def test_scripts_are_thin() -> None:
    for script in ("train.py", "eval.py", "predict.py", "export.py"):
        source = (PROJECT_ROOT / script).read_text()
        assert f"from ssd_lightning.cli.{script[:-3]} import main" in source and len(source.splitlines()) < 10
