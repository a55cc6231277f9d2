"""The compact model memorises a handful of real coco128 photos (VOC07 mAP >= 0.9 on them), and eval.py
reproduces the validation mAP of the checkpoint it saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import compose_config

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.train import train

HANDFUL = 6  # images: the first batch of coco128's VOC "val" list, used for training and validation
STEPS = 80


def handful_overrides(coco128: Path) -> list[str]:
    return [
        "dataset=voc",
        f"dataset.root={coco128 / 'voc'}",
        "dataset.train_sets=[[2007,val]]",
        "dataset.val_sets=[[2007,val]]",
        "dataset.test_sets=[[2007,val]]",
        "dataset/augmentation=none",
        f"dataset.batch_size={HANDFUL}",
        "dataset.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


@pytest.mark.timeout(900)
def test_overfit_a_handful_of_coco128_images(coco128_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *handful_overrides(coco128_root),
            "callbacks.progress_bar=null",
            "trainer.overfit_batches=1",  # one fixed, unshuffled batch for training and validation
            f"trainer.max_epochs={STEPS}",
            f"trainer.check_val_every_n_epoch={STEPS}",
            "trainer.num_sanity_val_steps=0",
            "optimizer=adamw",
            "optimizer.weight_decay=0",
            "scheduler.milestones=[0.8]",
            "test=false",
        ],
        tmp_path / "train",
    )
    metrics = train(cfg)
    assert metrics["step"] == STEPS
    assert metrics["val/map_voc07"] >= 0.9, metrics

    best = next((tmp_path / "train" / "checkpoints").glob("best-*.ckpt"))
    eval_cfg = compose_config(
        "eval",
        [*handful_overrides(coco128_root), f"ckpt_path={best}", "split=val", "trainer.limit_val_batches=1"],
        tmp_path / "eval",
    )
    result = evaluate(eval_cfg)
    assert result.map_voc07 == pytest.approx(metrics["val/map_voc07"], abs=1e-3)
    best_score = torch.load(best, weights_only=False)["callbacks"]
    (checkpoint_state,) = [v for k, v in best_score.items() if "val/map" in k]
    assert result.map == pytest.approx(float(checkpoint_state["best_model_score"]), abs=1e-3)
    written = json.loads(Path(eval_cfg.output_json).read_text())
    assert written["map_voc07"] == result.map_voc07 and written["split"] == "val"
    assert set(written["per_class_ap_voc07"]) <= set(cfg.dataset.classes)
