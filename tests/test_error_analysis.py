"""Error analysis (ssd_lightning.metrics.analysis) on hand-made cases where each outcome is known."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from PIL import Image

from ssd_lightning.metrics import VOCMeanAveragePrecision
from ssd_lightning.metrics.analysis import ErrorAnalysis, analyze_errors, plot_pr_curves

CLASSES = ["cat", "dog"]
CAT, DOG = 1, 2


def analyse(images: list[tuple[dict, dict]], score_threshold: float = 0.4) -> tuple[ErrorAnalysis, dict]:
    """The analysis of `(prediction, target)` pairs (through the VOC metric's state) and the metric's AP."""
    metric = VOCMeanAveragePrecision(use_07_metric=False, class_names=CLASSES)
    for prediction, target in images:
        metric.update([prediction], [target])
    analysis = analyze_errors(*metric.accumulated(), class_names=CLASSES, score_threshold=score_threshold)
    return analysis, metric.compute()


def detections(*rows: tuple[list[float], float, int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([box for box, _, _ in rows], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([score for _, score, _ in rows]),
        "labels": torch.tensor([label for _, _, label in rows], dtype=torch.int64),
    }


def objects(*rows: tuple[list[float], int, bool]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([box for box, _, _ in rows], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([label for _, label, _ in rows], dtype=torch.int64),
        "difficult": torch.tensor([difficult for _, _, difficult in rows]),
    }


# One 400x400 image (pixels). Objects: A cat and B dog side by side (large: 100x100 and 96x96, COCO's
# boundary), C a difficult cat, D a small cat (31x31), E and F medium dogs (32x32, the boundary, and 50x50).
A, B, C = [0, 0, 100, 100], [100, 0, 196, 96], [0, 200, 100, 300]
D, E, F = [300, 300, 331, 331], [200, 200, 232, 232], [300, 150, 350, 200]
TARGET = objects(
    (A, CAT, False), (B, DOG, False), (C, CAT, True), (D, CAT, False), (E, DOG, False), (F, DOG, False)
)
PREDICTION = detections(
    (A, 0.9, CAT),  # correct
    (C, 0.85, CAT),  # on the difficult cat: ignored
    ([0, 0, 100, 90], 0.8, CAT),  # IoU 0.9 with A, which the 0.9 detection claimed: duplicate
    ([50, 50, 150, 150], 0.7, CAT),  # IoU 0.14 with A: localisation (and 0.14 with the dog B)
    ([70, 0, 200, 100], 0.65, CAT),  # IoU 0.15 with A, 0.71 with the dog B: localisation comes first
    (B, 0.6, CAT),  # exactly on the dog, touching A only: confusion
    ([380, 0, 400, 20], 0.5, DOG),  # nothing there: background
    ([228, 228, 278, 278], 0.45, DOG),  # IoU 0.005 with the dog E: background
    (F, 0.2, DOG),  # correct, below the score threshold
    ([390, 390, 400, 400], 0.1, CAT),  # background, below the score threshold
)


def test_each_detection_gets_the_first_outcome_that_applies_and_misses_are_counted_by_size() -> None:
    analysis, _ = analyse([(PREDICTION, TARGET)])
    expected_all = dict(
        detections=10, correct=2, on_difficult=1, duplicate=1, localisation=2, confusion=1, background=3
    )
    # A and F found; B (large), D (small), E (medium) missed; the difficult C is no object to find
    expected_objects = dict(objects_small=1, objects_medium=2, objects_large=2)
    assert asdict(analysis.overall) == {
        **expected_all,
        **expected_objects,
        "missed_small": 1,
        "missed_medium": 1,
        "missed_large": 1,
    }
    # scoring >= 0.4: the last two detections drop out, and with them the find of F
    assert asdict(analysis.overall_at_threshold) == {
        **expected_all,
        "detections": 8,
        "correct": 1,
        "background": 2,
        **expected_objects,
        "missed_small": 1,
        "missed_medium": 2,
        "missed_large": 1,
    }
    # false positives count for the detection's class, misses for the object's
    cat, dog = analysis.per_class_at_threshold["cat"], analysis.per_class_at_threshold["dog"]
    assert (cat.detections, cat.correct, cat.duplicate, cat.localisation, cat.confusion, cat.background) == (
        6, 1, 1, 2, 1, 0
    )  # fmt: skip
    assert (dog.detections, dog.background, dog.confusion) == (2, 2, 0)
    assert (cat.objects, cat.missed_small, cat.missed_large) == (2, 1, 0)
    assert (dog.objects, dog.missed_medium, dog.missed_large) == (3, 2, 1)

    text = analysis.format()
    assert "correct > duplicate > localisation > confusion > background" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("score >= 0.4"))
    assert row.split()[3:] == ["8", "1", "1", "1", "2", "1", "2", "5", "4", "1/1", "2/2", "1/2"]
    json.dumps(analysis.to_dict())  # JSON-ready


def test_removing_a_kind_of_false_positive_gives_its_map_gain() -> None:
    g1, g2 = [0, 0, 10, 10], [20, 0, 30, 10]
    # cat: a background false positive ranked first (AP 2/3 -> 1); dog: a duplicate ranked second (5/6 -> 1)
    cats = detections(([50, 50, 60, 60], 0.9, CAT), (g1, 0.8, CAT), (g2, 0.7, CAT))
    dogs = detections((g1, 0.95, DOG), (g1, 0.9, DOG), (g2, 0.85, DOG))
    two = objects((g1, CAT, False), (g2, CAT, False))
    analysis, metric = analyse([(cats, two), (dogs, objects((g1, DOG, False), (g2, DOG, False)))])
    assert (
        analysis.map_voc12 == pytest.approx(float(metric["map_voc12"])) == pytest.approx((2 / 3 + 5 / 6) / 2)
    )
    assert analysis.curves["cat"].ap == pytest.approx(2 / 3) and analysis.curves["dog"].ap == pytest.approx(
        5 / 6
    )
    assert analysis.map_gain == pytest.approx(
        {"duplicate": (1 / 6) / 2, "localisation": 0.0, "confusion": 0.0, "background": (1 / 3) / 2}
    )
    curve = analysis.curves["cat"]
    assert curve.recall.tolist() == pytest.approx([0, 0.5, 1]) and curve.precision.tolist() == pytest.approx(
        [0, 1 / 2, 2 / 3]
    )


def random_images(seed: int, count: int = 12) -> list[tuple[dict, dict]]:
    """Images with objects of both classes and detections near them (some of the wrong class), and not."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        n = int(torch.randint(1, 6, (1,), generator=generator))
        corner = torch.rand(n, 2, generator=generator) * 300
        gt_boxes = torch.cat([corner, corner + 10 + torch.rand(n, 2, generator=generator) * 150], dim=1)
        gt_labels = torch.randint(1, 3, (n,), generator=generator)
        near = gt_boxes.repeat(3, 1) + torch.randn(3 * n, 4, generator=generator) * 15
        anywhere = torch.rand(4, 2, generator=generator) * 300
        boxes = torch.cat([near, torch.cat([anywhere, anywhere + 40], dim=1)])
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], dim=1)
        labels = torch.cat([gt_labels.repeat(3), torch.randint(1, 3, (4,), generator=generator)])
        flip = torch.rand(len(labels), generator=generator) < 0.2
        labels = torch.where(flip, 3 - labels, labels)
        prediction = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=generator), "labels": labels}
        difficult = torch.rand(n, generator=generator) < 0.15
        images.append((prediction, {"boxes": gt_boxes, "labels": gt_labels, "difficult": difficult}))
    return images


def test_the_breakdown_agrees_with_the_metric_and_the_threshold_only_drops_low_scores() -> None:
    images = random_images(seed=3)
    analysis, metric = analyse(images, score_threshold=0.5)
    overall = analysis.overall
    outcomes = (overall.correct, overall.on_difficult, overall.duplicate, overall.localisation)
    assert min(*outcomes, overall.confusion, overall.background) > 0  # every outcome occurs
    assert sum(outcomes) + overall.confusion + overall.background == overall.detections
    assert overall.detections == sum(len(p["scores"]) for p, _ in images)
    assert overall.objects == sum(int((~t["difficult"]).sum()) for _, t in images)
    assert overall.objects - overall.missed == overall.correct  # each correct detection finds one object
    assert analysis.map_voc12 == pytest.approx(float(metric["map_voc12"]))
    # the detections scoring >= 0.5 are classified as they would be on their own
    high = [({k: v[p["scores"] >= 0.5] for k, v in p.items()}, t) for p, t in images]
    alone, _ = analyse(high, score_threshold=0.5)
    assert analysis.overall_at_threshold == alone.overall == alone.overall_at_threshold
    assert analysis.per_class_at_threshold == alone.per_class


def test_precision_recall_curves_are_drawn_one_panel_per_class(tmp_path) -> None:
    analysis, _ = analyse(random_images(seed=4, count=4))
    path = plot_pr_curves(analysis, tmp_path / "curves" / "pr.png", title="random")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 2 * 250  # two panels side by side
    assert set(analysis.curves) == {"cat", "dog"}
