"""predict.py's outputs in original pixels: COCO results (xywh, the dataset's category ids), drawn boxes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from training_helpers import compose_config

import ssd_lightning.cli.deploy as deploy_cli
import ssd_lightning.cli.predict as predict_cli
from ssd_lightning.cli.predict import coco_results
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.visualize import class_colour


def test_coco_results_are_xywh_pixels_with_the_dataset_category_ids() -> None:
    prediction = {
        "image_id": 139,
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [100.25, 0.5, 300.125, 7.0]]),  # xyxy pixels
        "scores": torch.tensor([0.875, 0.0625]),
        "labels": torch.tensor([2, 3]),
    }
    assert coco_results(prediction, [3, 18, 90]) == [
        {"image_id": 139, "category_id": 18, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.875},
        {"image_id": 139, "category_id": 90, "bbox": [100.25, 0.5, 199.88, 6.5], "score": 0.0625},
    ]
    # Data without COCO ids (VOC, the built-in shapes): the contiguous label is the category.
    assert [r["category_id"] for r in coco_results(prediction, None)] == [2, 3]
    assert coco_results({**prediction, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                         "labels": torch.zeros(0, dtype=torch.int64)}, None) == []  # fmt: skip


def _known_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose detections are known, loaded for any ckpt_path: one at [0.25, 0.25, 0.75, 0.75] of the
    image (dog, 0.9), one at [0.05, 0.8, 0.2, 0.95] (bird, 0.2)."""
    module = SSDLitModule(
        class_names=["cat", "dog", "bird"],
        net={"arch": "compact", "size": 64, "width": 8},
        pixel_mean=[127.0] * 3,
        pixel_std=[64.0] * 3,
        category_ids=[3, 18, 90],
    )
    module.net.detect = lambda loc, conf: [
        {
            "boxes": torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.05, 0.8, 0.2, 0.95]]),
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([2, 3]),
        }
        for _ in range(len(loc))
    ]
    monkeypatch.setattr(deploy_cli, "load_for_inference", lambda cfg: (module, Path(cfg.ckpt_path)))


def _grey_photo(folder: Path) -> Path:
    folder.mkdir()
    assert cv2.imwrite(str(folder / "000000000139.png"), np.full((60, 80, 3), 128, np.uint8))
    return folder


def _predict(tmp_path: Path, *overrides: str) -> Path:
    output = tmp_path / "predict"
    output.mkdir(parents=True)  # Hydra's run folder
    cfg = compose_config(
        "predict",
        [*overrides, "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"],
        output,
    )  # fmt: skip
    return predict_cli.predict(cfg)


def test_predict_writes_and_draws_a_known_detection_at_its_pixels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A 80x60 grey photo named like a COCO file (its id is 139); the bird scores below the display threshold.
    _known_model(monkeypatch)
    _grey_photo(tmp_path / "images")
    images = tmp_path / "images"
    output = tmp_path / "predict"
    results_path = _predict(tmp_path, "ckpt_path=model.ckpt", f"input={images}")

    results = json.loads(results_path.read_text())
    identity = [(r["image_id"], r["category_id"], r["score"]) for r in results]
    assert identity == [(139, 18, 0.9), (139, 90, 0.2)]
    assert results[0]["bbox"] == pytest.approx([20.0, 15.0, 40.0, 30.0])  # x, y, width, height in pixels
    assert results[1]["bbox"] == pytest.approx([4.0, 48.0, 12.0, 9.0])

    drawn = cv2.imread(str(output / "images" / "000000000139.jpg"))[..., ::-1].astype(int)
    assert drawn.shape == (60, 80, 3)
    changed = np.abs(drawn - 128).sum(axis=-1) > 60  # JPEG smears the colour a pixel or two
    # The dog's 2-pixel outline: columns 20 and 60, rows 15 and 45 (the caption sits inside, at the top).
    columns = np.flatnonzero(changed[28:42].mean(axis=0) > 0.9)
    rows = np.flatnonzero(changed[:, 28:52].mean(axis=1) > 0.9)
    assert 19 <= columns.min() <= 21 and 59 <= columns.max() <= 62, columns
    assert 14 <= rows.min() <= 16 and 44 <= rows.max() <= 46, rows
    edge = drawn[28:42, columns.min() : columns.min() + 2].mean(axis=(0, 1))
    assert np.abs(edge - class_colour(2)).max() < 30, edge  # in the dog's colour
    # Nothing else: not the inside, not outside the box, not the bird below the display threshold.
    outside = np.ones_like(changed)
    outside[12:49, 17:64] = False
    assert not changed[32:42, 26:54].any() and not changed[outside].any()


def test_display_threshold_best_f1_is_the_threshold_the_checkpoints_run_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _known_model(monkeypatch)
    images = _grey_photo(tmp_path / "images")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(b"")  # loaded by the stand-in above
    common = [f"ckpt_path={checkpoint}", f"input={images}", "display_threshold=best_f1"]
    with pytest.raises(FileNotFoundError, match="no thresholds.json in the run folder"):
        _predict(tmp_path / "without", *common)
    # The run's best-F1 threshold is 0.1: the bird (0.2) is drawn too, below the default 0.4.
    best = {"threshold": 0.1, "f1": 0.5, "true_positives": 1, "detections": 2}
    (run / "thresholds.json").write_text(json.dumps({"all_classes": {"best": best}, "per_class": {}}))
    _predict(tmp_path, *common)
    drawn = cv2.imread(str(tmp_path / "predict" / "images" / "000000000139.jpg")).astype(int)
    changed = np.abs(drawn - 128).sum(axis=-1) > 60
    assert changed[47:58, 3:17].any()  # the bird's box: x 4..16, y 48..57
