"""The compact model memorises a handful of real coco128 photos (VOC07 mAP >= 0.9 on them), eval.py
reproduces the validation mAP of the checkpoint it saved, and the bf16-mixed fast path detects the same
objects as fp32 (the tolerances README's Performance section states)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torchvision.ops import box_iou
from training_helpers import compose_config

from ssd_lightning.cli.build import instantiate_datamodule, load_for_inference
from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.train import train
from ssd_lightning.metrics import VOCMeanAveragePrecision
from ssd_lightning.metrics.evaluation import detections_in_pixels
from ssd_lightning.training.module import SSDLitModule

HANDFUL = 6  # images: the first batch of coco128's VOC "val" list, used for training and validation
STEPS = 80
# bf16-mixed vs fp32 on the same trained weights: mAP within this, and every confident fp32 detection
# found again by bf16 (same class, IoU >= BF16_MIN_IOU).
BF16_MAP_TOLERANCE = 0.02
BF16_MIN_IOU = 0.9
CONFIDENT = 0.5


def handful_overrides(coco128: Path) -> list[str]:
    return [
        "model=compact",  # dataset=voc alone selects SSD300
        "dataset=voc",
        "schedule=quick",  # and the paper's 120k iterations: this run counts epochs
        f"dataset.root={coco128 / 'voc'}",
        "dataset.train_sets=[[2007,val]]",
        "dataset.val_sets=[[2007,val]]",
        "dataset.test_sets=[[2007,test]]",  # not the validation images: a best checkpoint is kept
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
            # The recipe this was calibrated with (not the built-in run's): width 32, AdamW 1e-3, step at 80%
            "model.net.width=32",
            "model.channels_last=false",
            "optimizer=adamw",
            "optimizer.weight_decay=0",
            "scheduler=warmup_multistep",
            "scheduler.milestones=[0.8]",
            "test=false",
        ],
        tmp_path / "train",
    )
    metrics = train(cfg)
    assert metrics["step"] == STEPS
    # seed=42 gives 0.909 on CPU; a broken matching, loss or metric lands far below this.
    assert metrics["val/map_voc07"] >= 0.8, metrics

    best = next((tmp_path / "train" / "checkpoints").glob("best-*.ckpt"))
    eval_cfg = compose_config(
        "eval",
        [*handful_overrides(coco128_root), f"ckpt_path={best}", "split=val", "trainer.limit_val_batches=1"],
        tmp_path / "eval",
    )
    result = evaluate(eval_cfg)
    assert result.map_voc07 == pytest.approx(metrics["val/map_voc07"], abs=1e-3)
    best_score = torch.load(best, weights_only=False)["callbacks"]
    (checkpoint_state,) = [v for k, v in best_score.items() if "val/map_voc07" in k]  # the VOC monitor
    assert result.map_voc07 == pytest.approx(float(checkpoint_state["best_model_score"]), abs=1e-3)
    written = json.loads(Path(eval_cfg.output_json).read_text())
    assert written["map_voc07"] == result.map_voc07 and written["split"] == "val"
    assert set(written["per_class_ap_voc07"]) <= set(cfg.dataset.classes)

    assert_bf16_detections_match(load_for_inference(eval_cfg)[0], eval_cfg, result.map_voc07)


def assert_bf16_detections_match(module: SSDLitModule, cfg: DictConfig, fp32_map: float) -> None:
    """One pass over the validation batch in fp32 and in bf16-mixed: the same mAP within the tolerance,
    and every confident fp32 detection found again."""
    datamodule = instantiate_datamodule(cfg)
    datamodule.setup("validate")
    images, targets = next(iter(datamodule.val_dataloader()))
    module.eval()
    with torch.inference_mode():
        fp32 = module.net.detect(*module._predict(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = module.net.detect(*module._predict(images))
    maps = []
    for detections in (fp32, bf16):
        metric = VOCMeanAveragePrecision(iou_threshold=0.5, use_07_metric=True)
        metric.update(*detections_in_pixels(detections, targets))
        maps.append(float(metric.compute()["map"]))
    assert maps[0] == pytest.approx(fp32_map, abs=1e-4)  # the batch is the whole validation split
    assert maps[1] == pytest.approx(maps[0], abs=BF16_MAP_TOLERANCE)
    confident = 0
    for ours, fast in zip(fp32, bf16, strict=True):
        for box, label, score in zip(ours["boxes"], ours["labels"], ours["scores"], strict=True):
            if score < CONFIDENT:
                continue
            confident += 1
            same_class = fast["boxes"][fast["labels"] == label]
            assert len(same_class), f"bf16 lost a class-{int(label)} detection (score {score:.2f})"
            assert box_iou(box[None], same_class).max() >= BF16_MIN_IOU
    assert confident >= HANDFUL  # the trained model is confident about most objects
