"""dataset=yolo through the scripts: train, then eval on the YOLO copy of coco128 and on its COCO original
(the same mAP), predict on its test split, and the checker with its prior-coverage report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from training_helpers import check_ok, run_script

from ssd_lightning.cli.check import main as check_main

# Classes without crowd boxes in coco128 (YOLO leaves crowd boxes out, COCO keeps them as "ignore"
# regions): the ground truth is then the same in both formats, and so must be every figure.
CLASSES = "[cup,bowl,bottle,elephant,bird,carrot,spoon,knife]"
TINY = [
    "model.image_size=96",
    "model.net.width=16",
    "dataset.batch_size=8",
    "dataset.num_workers=0",
    "dataset/augmentation=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.timeout(900)
def test_train_eval_predict_and_check_on_yolo_data(coco128_root: Path, tmp_path: Path) -> None:
    yolo = ["dataset=yolo", f"dataset.root={coco128_root / 'yolo'}", f"dataset.classes={CLASSES}"]
    run = tmp_path / "train"
    check_ok(
        run_script(
            "train.py",
            [
                *yolo,
                *TINY,
                "trainer.max_steps=6",
                "trainer.limit_val_batches=1",
                "trainer.num_sanity_val_steps=0",
                f"hydra.run.dir={run}",
            ],
            cwd=tmp_path,
        )
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 6 and "test/map" in metrics
    checkpoint = run / "checkpoints" / "last.ckpt"

    def evaluate(name: str, data: list[str]) -> dict:
        out = tmp_path / f"{name}.json"
        args = [f"ckpt_path={checkpoint}", *data, f"output_json={out}", "trainer.accelerator=cpu"]
        check_ok(run_script("eval.py", [*args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path))
        return json.loads(out.read_text())

    from_yolo = evaluate("eval_yolo", yolo)
    coco = [
        "dataset=coco",
        f"dataset.root={coco128_root / 'coco'}",
        "dataset.val_split=train2017",
        f"dataset.classes={CLASSES}",
    ]
    from_coco = evaluate("eval_coco", coco)
    assert from_yolo["num_images"] == from_coco["num_images"] == 128
    for key in ("map_voc07", "map_voc12", "map", "map_50", "map_75"):
        assert from_yolo[key] == pytest.approx(from_coco[key], abs=1e-9), key
    assert from_yolo["per_class_ap_voc07"] == pytest.approx(from_coco["per_class_ap_voc07"], abs=1e-9)

    predicted = tmp_path / "predict"
    check_ok(
        run_script(
            "predict.py",
            # without input=: the test split of the checkpoint's own data (coco128's YOLO copy)
            [f"ckpt_path={checkpoint}", "display_threshold=0.0", f"hydra.run.dir={predicted}"],
            cwd=tmp_path,
        )
    )
    assert len(list((predicted / "images").glob("*.jpg"))) == 128

    out = io.StringIO()
    assert check_main([*yolo, "model=ssd300"], out=out) == 0
    text = out.getvalue()
    assert "yolo train: 0 error(s)" in text.replace("train (yolo train)", "yolo train")
    assert "prior coverage of yolo train for model=ssd300" in text
