"""The confusion matrix and precision/recall/F1 against the score threshold on hand-made cases whose counts
and F1 are worked out in the comments; the best-F1 threshold read back from a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_lightning.metrics.confusion import confusion_matrix
from ssd_lightning.metrics.evaluation import DetectionEvaluator
from ssd_lightning.metrics.plots import plot_confusion_matrix, plot_threshold_curves
from ssd_lightning.metrics.thresholds import (
    THRESHOLDS_FILE,
    best_f1_threshold,
    resolve_display_threshold,
    threshold_curves,
)

CLASSES = ["cat", "dog"]  # labels 1 and 2; matrix index 0 cat, 1 dog, 2 background
A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]  # cat, dog, cat


def one_image() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three objects and six detections in one image, as `VOCMeanAveragePrecision.accumulated()` rows.
    Scores are binary fractions (exact in float32, so grid thresholds compare exactly)."""
    ground_truth = torch.tensor([[*A, 1, 0], [*B, 2, 0], [*C, 1, 0]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [*A, 0.875, 1],  # d1 cat on A (IoU 1): true positive
            [0, 0, 10, 9, 0.75, 1],  # d2 cat on A (IoU 0.9), A already claimed by d1: duplicate, false
            [*C, 0.625, 1],  # d3 cat on C: true positive
            [*B, 0.5625, 1],  # d4 cat on the dog B: false for cat (no cat there)
            [20, 0, 30, 9, 0.5, 2],  # d5 dog on B (IoU 0.9): true positive
            [80, 80, 90, 90, 0.25, 2],  # d6 dog on nothing: false
        ],
        dtype=torch.float32,
    )
    return detections, ground_truth, torch.tensor([[6, 3]])


def test_precision_recall_f1_and_best_threshold_by_hand() -> None:
    curves = threshold_curves(*one_image(), CLASSES)
    # All classes, by score: d1 T, d2 F, d3 T, d4 F, d5 T, d6 F; 3 objects. F1 = 2 TP / (kept + 3):
    #   >= .875: 2/4 = .5   >= .75: 2/5 = .4   >= .625: 4/6 = .667   >= .5625: 4/7 = .571
    #   >= .5: 6/8 = .75 (best)   >= .25: 6/9 = .667
    best = curves.overall.best
    assert best.threshold == 0.5 and best.f1 == pytest.approx(0.75)
    assert (best.precision, best.recall, best.true_positives, best.detections) == (0.6, 1.0, 3, 5)
    # cat: d1 T, d2 F, d3 T, d4 F, 2 objects: 2/3, 2/4, 4/5 (best, >= .625), 4/6
    cat = curves.per_class["cat"].best
    assert cat.threshold == 0.625 and cat.f1 == pytest.approx(0.8)
    assert cat.precision == pytest.approx(2 / 3) and cat.recall == 1.0
    # dog: d5 T, d6 F, 1 object: 2/2 = 1 (best, >= .5), 2/3
    dog = curves.per_class["dog"].best
    assert (dog.threshold, dog.f1, dog.precision, dog.recall) == (0.5, 1.0, 1.0, 1.0)
    # The curves on the 0.01 grid: at t the detections scoring >= t.
    grid = list(np.round(curves.thresholds, 2))
    at = {t: grid.index(t) for t in (0.0, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9)}
    overall = curves.overall
    assert overall.precision[at[0.0]] == pytest.approx(3 / 6) and overall.recall[at[0.0]] == 1.0
    assert overall.precision[at[0.5]] == pytest.approx(3 / 5) and overall.f1[at[0.5]] == pytest.approx(0.75)
    assert overall.precision[at[0.55]] == pytest.approx(2 / 4) and overall.recall[at[0.55]] == pytest.approx(
        2 / 3
    )
    assert overall.precision[at[0.6]] == pytest.approx(2 / 3)  # d1, d2, d3
    assert overall.precision[at[0.8]] == 1.0 and overall.recall[at[0.8]] == pytest.approx(1 / 3)
    assert np.isnan(overall.precision[at[0.9]]) and overall.recall[at[0.9]] == 0  # nothing kept
    assert overall.f1[at[0.9]] == 0


def test_confusion_matrix_by_hand() -> None:
    rows = one_image()
    # rows ground truth [cat, dog, background], columns prediction [cat, dog, background].
    # >= 0.5 (the best-F1 threshold): d1, d3 cat-cat, d5 dog-dog on the diagonal; d2 (duplicate) and d4
    # (cat on B, which d5 claimed) have no object left: background row, cat column.
    at_best = confusion_matrix(*rows, CLASSES, score_threshold=0.5)
    assert at_best.counts.tolist() == [[2, 0, 0], [0, 1, 0], [2, 0, 0]]
    # >= 0.55: d5 is out, so the dog B is left over and d4 (cat, IoU 1 with B) claims it: a confusion in
    # row dog, column cat; d2 stays a detection of nothing.
    confused = confusion_matrix(*rows, CLASSES, score_threshold=0.55)
    assert confused.counts.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert confused.normalised().tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    # >= 0.95: nothing kept, every object missed (background column).
    assert confusion_matrix(*rows, CLASSES, 0.95).counts.tolist() == [[0, 0, 2], [0, 0, 1], [0, 0, 0]]
    # The diagonal is the true positives at the threshold, a class's row sums to its objects.
    curves = threshold_curves(*rows, CLASSES)
    assert np.trace(at_best.counts) == curves.overall.best.true_positives
    assert at_best.counts[:2].sum(axis=1).tolist() == [2, 1]


def test_confusions_pair_one_to_one_by_iou_and_difficult_objects_count_nowhere() -> None:
    dog, difficult_cat = [0, 0, 10, 10], [50, 50, 60, 60]
    ground_truth = torch.tensor([[*dog, 2, 0], [*difficult_cat, 1, 1]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [0, 0, 10, 6, 0.95, 1],  # e1 cat, IoU .6 with the dog, the higher score
            [0, 0, 10, 8, 0.9, 1],  # e2 cat, IoU .8 with the dog: the highest IoU takes it
            [*difficult_cat, 0.7, 1],  # e3 on the difficult cat: ignored, as by the mAP
        ],
        dtype=torch.float32,
    )
    counts = torch.tensor([[3, 2]])
    matrix = confusion_matrix(detections, ground_truth, counts, CLASSES, score_threshold=0.5)
    # e2 -> (dog, cat); e1 -> (background, cat); e3 and the difficult cat nowhere.
    assert matrix.counts.tolist() == [[0, 0, 0], [1, 0, 0], [1, 0, 0]]
    curves = threshold_curves(detections, ground_truth, counts, CLASSES)
    assert curves.per_class["cat"].objects == 0 and curves.per_class["cat"].detections == 2
    assert curves.overall.best is None  # no true positive at any threshold
    assert curves.overall.f1[50] == 0 and np.isnan(curves.per_class["cat"].recall[50])


def test_the_evaluator_computes_them_when_asked(tmp_path: Path) -> None:
    detections, ground_truth, _ = one_image()
    evaluator = DetectionEvaluator(CLASSES)
    pred = {"boxes": detections[:, :4], "scores": detections[:, 4], "labels": detections[:, 5].long()}
    truth = {
        "boxes": ground_truth[:, :4],
        "labels": ground_truth[:, 4].long(),
        "difficult": ground_truth[:, 5] > 0,
    }
    evaluator.update([pred], [truth])
    assert evaluator.compute().confusion is None  # off by default
    evaluator.confusion_and_thresholds = True
    result = evaluator.compute()
    assert result.confusion.score_threshold == 0.5  # None: the best-F1 threshold
    assert result.confusion.counts.tolist() == [[2, 0, 0], [0, 1, 0], [2, 0, 0]]
    assert result.to_dict()["best_f1"]["all_classes"]["best"]["threshold"] == 0.5
    evaluator.confusion_score_threshold = 0.55
    assert evaluator.compute().confusion.counts.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    for png in (
        plot_confusion_matrix(result.confusion, tmp_path / "confusion.png", "hand-made"),
        plot_threshold_curves(result.thresholds, tmp_path / "curves.png", "hand-made"),
    ):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 400


def test_best_f1_threshold_is_read_from_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no thresholds.json in the run folder.*eval.py"):
        best_f1_threshold(checkpoint)
    written = threshold_curves(*one_image(), CLASSES).to_dict()
    (run / THRESHOLDS_FILE).write_text(json.dumps(written))
    assert best_f1_threshold(run) == best_f1_threshold(checkpoint) == 0.5
    assert best_f1_threshold(run / THRESHOLDS_FILE, "cat") == 0.625
    assert resolve_display_threshold("best_f1", checkpoint) == 0.5
    assert resolve_display_threshold(0.3, checkpoint) == 0.3
    with pytest.raises(ValueError, match="display_threshold='high'"):
        resolve_display_threshold("high", checkpoint)
    written["all_classes"]["best"] = None
    (run / THRESHOLDS_FILE).write_text(json.dumps(written))
    with pytest.raises(ValueError, match="no correct detection"):
        best_f1_threshold(run)
    # JSON without NaN (null where precision is undefined), curves on the grid.
    assert written["curves"]["all_classes"]["precision"][-1] is None
    assert len(written["curves"]["thresholds"]) == len(written["curves"]["per_class"]["cat"]["f1"]) == 101
