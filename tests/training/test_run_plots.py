"""Every run leaves its plots: a tiny training run (resumed once) writes results.csv with one row per
validation, the training curves, the label statistics, and after its test pass the confusion matrix and
precision/recall/F1 against the score threshold, also in its W&B run; eval.py on the tested checkpoint
writes the same matrix and curves; `callbacks=none` writes none of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_helpers import TINY_SHAPES, compose_config

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.train import train
from ssd_lightning.data import SHAPE_CLASSES, VOCDetection
from ssd_lightning.metrics.thresholds import best_f1_threshold

PNGS = ("training_curves.png", "label_statistics.png", "confusion_matrix.png", "pr_f1_curves.png")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200, path


def test_a_run_and_eval_leave_their_tables_and_plots(
    fast: list[str], shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = [*fast, "logger=wandb", "logger.wandb.project=ssd-ci", "callbacks.wandb_images=null"]
    # One epoch (a validation at step 6), then resumed in the same folder for a second (step 12) and the test.
    train(compose_config("train", [*args, "trainer.max_epochs=1", "test=false"], run))
    assert len(read_csv(run / "results.csv")[1]) == 1
    last = run / "checkpoints" / "last.ckpt"
    metrics = train(compose_config("train", [*args, "trainer.max_epochs=2", f"ckpt_path={last}"], run))

    # results.csv: a row per validation, the earlier run's kept, every logged scalar a column.
    columns, rows = read_csv(run / "results.csv")
    assert [(r["step"], r["epoch"]) for r in rows] == [("6", "0"), ("12", "1")]
    expected = {"train/loss", "train/loss_loc", "train/loss_conf", "train/lr", "val/loss", "val/map_voc07"}
    expected |= {"val/map", "val/map_50", "best/val/map_voc07", *(f"val/ap_voc07/{c}" for c in SHAPE_CLASSES)}
    assert columns[:2] == ["step", "epoch"] and expected <= set(columns)
    assert all(rows[0][c] and rows[1][c] for c in expected)
    assert float(rows[1]["val/map_voc07"]) == metrics["val/map_voc07"]  # the last validation's values
    for png in PNGS:
        assert_png(run / png)

    # The confusion matrix of the test pass: rows ground truth, columns prediction, background last; each
    # class's row sums to its test objects, the diagonal to the true positives at the best-F1 threshold.
    confusion = json.loads((run / "confusion_matrix.json").read_text())
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert confusion["labels"] == [*SHAPE_CLASSES, "background"]
    counts = np.array(confusion["counts"])
    test_split = VOCDetection(shapes_root, [("shapes", "test")], SHAPE_CLASSES)
    objects = np.bincount(np.concatenate([r.labels for r in test_split.records]), minlength=6)[1:]
    assert counts[:-1].sum(axis=1).tolist() == objects.tolist() and counts[-1, -1] == 0
    best = thresholds["all_classes"]["best"]
    assert best is not None and best["true_positives"] > 0  # the tiny model finds a few objects
    assert confusion["score_threshold"] == best["threshold"] == metrics["test/best_f1_threshold"]
    assert np.trace(counts) == best["true_positives"]
    assert counts[:, :-1].sum() == best["detections"]  # every detection kept is in a class column
    assert metrics["test/best_f1"] == pytest.approx(best["f1"])
    assert thresholds["all_classes"]["objects"] == objects.sum()

    # The same plots in the W&B run (the resumed run continues it: files of both parts).
    media = [p.relative_to(d).as_posix() for d in run.glob("wandb/offline-run-*") for p in d.rglob("*.png")]
    for key in ("label_statistics", "training_curves", "confusion_matrix", "pr_f1_curves"):
        assert any(f"media/images/plots/{key}_" in name for name in media), (key, media)

    # eval.py on the checkpoint the test pass used writes the same matrix and curves in its folder.
    (tested,) = (run / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "eval"
    result = evaluate(
        compose_config(
            "eval",
            [
                f"ckpt_path={tested}",
                f"dataset.root={shapes_root}",
                *TINY_SHAPES,
                "dataset.num_workers=0",
                "trainer.accelerator=cpu",
                "trainer.devices=1",
                "trainer.enable_progress_bar=false",
            ],
            out,
        )
    )
    assert json.loads((out / "confusion_matrix.json").read_text()) == confusion
    assert json.loads((out / "thresholds.json").read_text()) == thresholds
    assert_png(out / "confusion_matrix.png")
    assert_png(out / "pr_f1_curves.png")
    assert json.loads((out / "metrics_test.json").read_text())["best_f1"]["all_classes"]["best"] == best
    assert result.confusion is not None
    # What predict.py's display_threshold=best_f1 reads: the checkpoint's run folder.
    assert best_f1_threshold(tested) == best["threshold"]


def test_no_callbacks_no_plots(fast: list[str], tmp_path: Path) -> None:
    limits = ["trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    plain = [a for a in fast if not a.startswith("callbacks.")]  # none to switch off
    metrics = train(compose_config("train", [*plain, *limits, "callbacks=none"], tmp_path))
    assert "test/map_voc07" in metrics and "test/best_f1" not in metrics
    left = {"results.csv", "confusion_matrix.json", "thresholds.json", *PNGS}
    assert not left & {p.name for p in tmp_path.iterdir()}
