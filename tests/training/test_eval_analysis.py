"""`python eval.py ... analysis=true`: the error breakdown printed and in the JSON, the precision-recall
curves as a PNG in the run folder and, with logger=wandb, in the W&B run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from training_helpers import TINY_SHAPES, compose_config

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.data import SHAPE_CLASSES, VOCDetection
from ssd_lightning.training import SSDLitModule


def untrained_checkpoint(path: Path) -> Path:
    """A checkpoint as train.py writes it (compact model at 96 px), with its random initial weights: the
    analysis is exercised without a training run (its outcomes are unit-tested on hand-made cases)."""
    torch.manual_seed(0)
    module = SSDLitModule(
        class_names=list(SHAPE_CLASSES),
        net={"arch": "compact", "size": 96, "width": 8},
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.mark.timeout(600)
def test_eval_analysis_prints_the_breakdown_and_saves_the_curves_to_the_run_and_wandb(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    checkpoint = untrained_checkpoint(tmp_path / "untrained.ckpt")
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={checkpoint}",
            f"dataset.root={shapes_root}",
            *TINY_SHAPES,
            "dataset.num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.enable_progress_bar=false",
            "analysis=true",
            "logger=wandb",
            "logger.wandb.project=ssd-ci",
        ],
        tmp_path / "eval",
    )
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        result = evaluate(cfg)

    analysis = result.analysis
    test_split = VOCDetection(shapes_root, [("shapes", "test")], SHAPE_CLASSES)
    assert analysis.overall.objects == sum(r.num_boxes for r in test_split.records) > 0
    assert analysis.overall.detections > 0  # an untrained network scores everything low, but above 0.01
    printed = caplog.text
    assert "Error analysis: each detection counted once" in printed
    assert (
        "  all detections " in printed
        and "  score >= 0.4 " in printed
        and "  per class, score >= 0.4:" in printed
    )

    written = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert written["analysis"]["overall"]["detections"] == analysis.overall.detections
    assert set(written["analysis"]["per_class"]) == set(SHAPE_CLASSES)

    png = tmp_path / "eval" / "pr_curves_test.png"
    assert f"Wrote {png}" in printed
    with Image.open(png) as image:
        assert image.format == "PNG"

    (run,) = (tmp_path / "eval" / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert len(list((media / "images" / "analysis").glob("pr_curves_png_*.png"))) == 1
    (curves,) = (media / "table" / "analysis").glob("pr_curves_table_*.table.json")
    assert {row[1] for row in json.loads(curves.read_text())["data"]} == set(analysis.curves)  # a line each
    (errors,) = (media / "table" / "analysis").glob("errors_*.table.json")
    assert len(json.loads(errors.read_text())["data"]) == 2 * (1 + len(SHAPE_CLASSES))  # both scopes
