"""VOCMeanAveragePrecision: hand-computed cases, a devkit-style numpy reference, state merge, DDP sync."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd_lightning.metrics import VOCMeanAveragePrecision

Image = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def square(x: float, y: float = 0.0, size: float = 10.0) -> list[float]:
    """An xyxy square; squares 20 apart never overlap."""
    return [x, y, x + size, y + size]


def image(
    dets: list[tuple[list[float], float, int]],
    gts: list[tuple[list[float], int]],
    difficult: list[bool] | None = None,
) -> Image:
    """(pred, target) dicts from (box, score, label) detections and (box, label) ground truths."""
    pred = {
        "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
        "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64),
    }
    target = {
        "boxes": torch.tensor([g[0] for g in gts], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([g[1] for g in gts], dtype=torch.int64),
    }
    if difficult is not None:
        target["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return pred, target


def evaluate(images: list[Image], **kwargs: object) -> dict[str, torch.Tensor]:
    metric = VOCMeanAveragePrecision(**kwargs)
    metric.update([p for p, _ in images], [t for _, t in images])
    return metric.compute()


def assert_map(result: dict[str, torch.Tensor], voc07: float, voc12: float) -> None:
    assert result["map_voc07"].item() == pytest.approx(voc07, abs=1e-6)
    assert result["map_voc12"].item() == pytest.approx(voc12, abs=1e-6)


A, B, C = square(0), square(20), square(40)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_perfect_detections_score_one(use_07_metric: bool) -> None:
    images = [
        image([(A, 0.9, 1), (B, 0.8, 1), (C, 0.3, 2)], [(A, 1), (B, 1), (C, 2)]),
        image([(A, 0.6, 2), (B, 0.7, 1)], [(A, 2), (B, 1)]),
    ]
    result = evaluate(images, use_07_metric=use_07_metric)
    assert result["map"].item() == 1.0
    assert result["map_per_class"].tolist() == [1.0, 1.0]
    assert result["classes"].tolist() == [1, 2]


def test_duplicate_detection_is_a_false_positive() -> None:
    # GTs A, B. Ranked: A (TP), A again (duplicate -> FP), B (TP).
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3; envelope 1, 2/3, 2/3.
    # area: 1/2 * 1 + 1/2 * 2/3 = 5/6.  11-point: t=0..0.5 -> 1 (6 points), t=0.6..1 -> 2/3 (5 points)
    # -> (6 + 10/3) / 11 = 28/33.  Without the duplicate both are 1.
    with_duplicate = image([(A, 0.9, 1), (A, 0.8, 1), (B, 0.7, 1)], [(A, 1), (B, 1)])
    assert_map(evaluate([with_duplicate]), voc07=28 / 33, voc12=5 / 6)
    without = image([(A, 0.9, 1), (B, 0.7, 1)], [(A, 1), (B, 1)])
    assert_map(evaluate([without]), voc07=1.0, voc12=1.0)


def test_a_near_duplicate_lower_ranked_than_the_match_is_the_false_positive() -> None:
    # The higher score takes the box whatever the order given: shifted A (IoU 90/110 = 0.82) at 0.95 is
    # the TP, exact A at 0.5 the duplicate. Ranked TP, FP -> precision 1, 1/2, recall 1, 1 -> AP 1 both ways.
    # Had the best-IoU detection won, the ranking would be FP, TP -> AP 1/2.
    shifted = [1.0, 0.0, 11.0, 10.0]
    assert_map(evaluate([image([(A, 0.5, 1), (shifted, 0.95, 1)], [(A, 1)])]), voc07=1.0, voc12=1.0)


def test_detection_of_a_difficult_object_is_ignored_and_difficult_is_no_miss() -> None:
    # GTs: A normal, D difficult -> 1 positive. Ranked: FP (0.95), [D-hit (0.9) ignored], A (TP, 0.8).
    # recall 0, 1; precision 0, 1/2 -> AP 1/2 both ways. Were the D-hit an FP: 1/3; were D a positive
    # (a miss when not detected): recall tops at 1/2 and AP falls below 1/2.
    gts = [(A, 1), (C, 1)]
    fp, d_hit, a_hit = (square(100), 0.95, 1), (C, 0.9, 1), (A, 0.8, 1)
    with_hit = image([fp, d_hit, a_hit], gts, difficult=[False, True])
    without_hit = image([fp, a_hit], gts, difficult=[False, True])
    assert_map(evaluate([with_hit]), voc07=0.5, voc12=0.5)
    assert_map(evaluate([without_hit]), voc07=0.5, voc12=0.5)
    # The same image with D not difficult: the hit is a TP -> precision 0, 1/2, 2/3, recall 0, 1/2, 1;
    # area 1/2 * 2/3 + 1/2 * 2/3 = 2/3; 11-point every threshold 2/3. Shows the flag is what changed it.
    assert_map(evaluate([image([fp, d_hit, a_hit], gts, difficult=[False, False])]), voc07=2 / 3, voc12=2 / 3)


def test_detection_whose_best_box_is_difficult_is_ignored_not_reassigned() -> None:
    # Devkit rule: only the best-overlapping GT counts. det [1.5,0,11.5,10]: IoU with normal A
    # = 85/115 = 0.74, with difficult [2,0,12,10] = 95/105 = 0.90 -> ignored, A stays unmatched
    # -> recall 0 -> AP 0 (re-assigning it to A would give 1).
    det = ([1.5, 0.0, 11.5, 10.0], 0.9, 1)
    result = evaluate([image([det], [(A, 1), ([2.0, 0.0, 12.0, 10.0], 1)], difficult=[False, True])])
    assert_map(result, voc07=0.0, voc12=0.0)
    assert result["classes"].reshape(-1).tolist() == [1]  # torchmetrics squeezes one-element results


def test_missed_object_caps_recall_and_the_two_aps_differ() -> None:
    # GTs A, B, C; C never detected. Ranked: A (TP), FP, B (TP).
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3; envelope 1, 2/3, 2/3.
    # area: 1/3 * 1 + 1/3 * 2/3 = 5/9.
    # 11-point: t=0,.1,.2,.3 -> 1 (4); t=.4,.5,.6 -> 2/3 (3); t=.7..1 unreachable -> 0 (4):
    # (4 + 2) / 11 = 6/11.
    one = image([(A, 0.9, 1), (square(100), 0.8, 1), (B, 0.7, 1)], [(A, 1), (B, 1), (C, 1)])
    result07 = evaluate([one], use_07_metric=True)
    result12 = evaluate([one], use_07_metric=False)
    assert_map(result07, voc07=6 / 11, voc12=5 / 9)
    assert result07["map"].item() == pytest.approx(6 / 11, abs=1e-6)
    assert result12["map"].item() == pytest.approx(5 / 9, abs=1e-6)
    assert result12["map_per_class"].item() == pytest.approx(5 / 9, abs=1e-6)


def test_recall_of_exactly_three_tenths_reaches_the_0_3_point() -> None:
    # 10 GTs, 3 found, no FP: recall 0.1, 0.2, 0.3 at precision 1. 11-point: t = 0, .1, .2, .3 -> 1, the rest
    # 0 -> 4/11 (thresholds from np.arange(0, 1.1, 0.1) put 0.30000000000000004 there and give 3/11).
    # area: 3 * 0.1 * 1 = 0.3.
    gts = [(square(20 * i), 1) for i in range(10)]
    found = image([(square(20 * i), 0.9 - 0.1 * i, 1) for i in range(3)], gts)
    assert_map(evaluate([found]), voc07=4 / 11, voc12=0.3)


def test_iou_threshold_is_inclusive() -> None:
    # det [0,0,1,1] inside GT [0,0,2,1]: intersection 1, union 2 -> IoU exactly 0.5.
    boundary = image([([0.0, 0.0, 1.0, 1.0], 0.9, 1)], [([0.0, 0.0, 2.0, 1.0], 1)])
    assert evaluate([boundary], iou_threshold=0.5)["map"].item() == 1.0
    assert evaluate([boundary], iou_threshold=0.51)["map"].item() == 0.0


def test_classes_without_non_difficult_ground_truth_are_left_out_of_the_mean() -> None:
    # class 1: perfect (AP 1); class 2: detections but no GT -> excluded; class 3: only a difficult GT,
    # detected -> excluded; class 4: a GT never detected -> AP 0, included. mean = (1 + 0) / 2.
    one = image(
        [(A, 0.9, 1), (B, 0.99, 2), (C, 0.8, 3)],
        [(A, 1), (C, 3), (square(60), 4)],
        difficult=[False, True, False],
    )
    result = evaluate([one])
    assert result["classes"].tolist() == [1, 4]
    assert result["map_per_class"].tolist() == [1.0, 0.0]
    assert_map(result, voc07=0.5, voc12=0.5)


def test_empty_predictions_give_zero_and_detections_on_empty_images_are_false_positives() -> None:
    no_dets = [image([], [(A, 1), (B, 2)]), image([], [])]
    result = evaluate(no_dets)
    assert result["classes"].tolist() == [1, 2]
    assert result["map_per_class"].tolist() == [0.0, 0.0]
    assert_map(result, voc07=0.0, voc12=0.0)
    # An image without GT holds the top detection (FP), then A is found: precision 0, 1/2, recall 0, 1 -> 1/2.
    fp_on_empty = [image([(A, 0.5, 1)], [(A, 1)]), image([(A, 0.9, 1)], [])]
    assert_map(evaluate(fp_on_empty), voc07=0.5, voc12=0.5)


def test_no_ground_truth_at_all_gives_nan_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="no non-difficult ground truth"):
        result = evaluate([image([(A, 0.9, 1)], [])])
    assert math.isnan(result["map"].item())
    assert result["classes"].numel() == 0


def test_scores_interleave_across_images_and_updates() -> None:
    # image 1: GTs A1, B1; image 2: GT A2. Ranked over both images:
    # .9 A1 TP, .85 img2 FP, .8 img1 FP, .7 A2 TP, .6 B1 TP; 3 positives.
    # recall 1/3,1/3,1/3,2/3,1; precision 1, 1/2, 1/3, 1/2, 3/5; envelope 1, 3/5, 3/5, 3/5, 3/5.
    # area: 1/3 + 1/3 * 3/5 + 1/3 * 3/5 = 11/15. 11-point: t<=.3 -> 1 (4), t>=.4 -> 3/5 (7): 8.2/11 = 41/55.
    # Ranking each image on its own would give other values (image 1 alone: 1, 1/2, 2/3 ...).
    first = image([(A, 0.9, 1), (square(100), 0.8, 1), (B, 0.6, 1)], [(A, 1), (B, 1)])
    second = image([(square(100), 0.85, 1), (A, 0.7, 1)], [(A, 1)])
    assert_map(evaluate([first, second]), voc07=41 / 55, voc12=11 / 15)
    metric = VOCMeanAveragePrecision()
    metric.update([first[0]], [first[1]])
    metric.update([second[0]], [second[1]])
    assert_map(metric.compute(), voc07=41 / 55, voc12=11 / 15)


# ---------------------------------------------------------------------------------------------------------
# Independent reference: the devkit's algorithm written plainly with numpy, one class and one detection at a
# time. Like the metric it uses IoU without "+1", ">=" and recall thresholds k/10 (see the metric docstring).


def reference_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def reference_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    if use_07_metric:
        total = 0.0
        for t in np.arange(11) / 10:
            total += precision[recall >= t].max() / 11 if (recall >= t).any() else 0.0
        return total
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def reference_voc(images: list[Image], iou_threshold: float, use_07_metric: bool) -> dict[int, float]:
    aps = {}
    labels = sorted({int(label) for pred, target in images for label in [*pred["labels"], *target["labels"]]})
    for cls in labels:
        gt_boxes, gt_difficult, matched = [], [], []
        positives = 0
        detections = []  # (score, image index, box)
        for index, (pred, target) in enumerate(images):
            mask = (target["labels"] == cls).numpy()
            difficult = target.get("difficult", torch.zeros(len(mask), dtype=torch.bool)).numpy()[mask]
            gt_boxes.append(target["boxes"].numpy().astype(np.float64)[mask])
            gt_difficult.append(difficult)
            matched.append(np.zeros(mask.sum(), dtype=bool))
            positives += int((~difficult).sum())
            boxes, scores, labels = pred["boxes"].numpy(), pred["scores"].numpy(), pred["labels"].numpy()
            for box, score, label in zip(boxes, scores, labels, strict=True):
                if label == cls:
                    detections.append((float(score), index, box.astype(np.float64)))
        if positives == 0:
            continue
        detections.sort(key=lambda d: -d[0])
        tp = np.zeros(len(detections))
        fp = np.zeros(len(detections))
        for d, (_, index, box) in enumerate(detections):
            boxes = gt_boxes[index]
            overlap = reference_iou(box, boxes) if len(boxes) else np.array([])
            best = int(np.argmax(overlap)) if len(overlap) else -1
            if best >= 0 and overlap[best] >= iou_threshold:
                if not gt_difficult[index][best]:
                    if not matched[index][best]:
                        tp[d] = 1
                        matched[index][best] = True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[cls] = reference_ap(recall, precision, use_07_metric) if len(detections) else 0.0
    return aps


def random_images(seed: int, count: int, num_classes: int = 5) -> list[Image]:
    """Jittered copies of GTs (hits, duplicates, near misses), random boxes and labels, difficult flags."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(20, 120, (n, 2))
        gt_boxes = np.concatenate([xy, xy + wh], 1)
        gt_labels = rng.integers(1, num_classes + 1, n)
        difficult = rng.random(n) < 0.2
        det_boxes, det_labels = [], []
        for box, label in zip(gt_boxes, gt_labels, strict=True):
            for _ in range(int(rng.integers(0, 3))):  # 0: miss, 2: a duplicate or near miss
                det_boxes.append(box + rng.normal(0, 0.15, 4) * np.tile(box[2:] - box[:2], 2))
                det_labels.append(label if rng.random() < 0.85 else rng.integers(1, num_classes + 1))
        for _ in range(int(rng.integers(0, 4))):
            start = rng.uniform(0, 400, 2)
            det_boxes.append(np.concatenate([start, start + rng.uniform(20, 120, 2)]))
            det_labels.append(rng.integers(1, num_classes + 1))
        k = len(det_boxes)
        pred = {
            "boxes": torch.tensor(np.array(det_boxes).reshape(k, 4), dtype=torch.float32),
            "scores": torch.tensor(rng.random(k), dtype=torch.float32),
            "labels": torch.tensor(np.array(det_labels, dtype=np.int64)),
        }
        target = {
            "boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(gt_labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult),
        }
        images.append((pred, target))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_matches_devkit_style_numpy_reference_on_random_data(seed: int, iou_threshold: float) -> None:
    images = random_images(seed, count=80)
    result = evaluate(images, iou_threshold=iou_threshold)
    for use_07_metric, key in ((True, "map_voc07"), (False, "map_voc12")):
        expected = reference_voc(images, iou_threshold, use_07_metric)
        per_class = evaluate(images, iou_threshold=iou_threshold, use_07_metric=use_07_metric)
        assert per_class["classes"].tolist() == sorted(expected)
        expected_per_class = [expected[c] for c in sorted(expected)]
        assert per_class["map_per_class"].tolist() == pytest.approx(expected_per_class, abs=1e-6)
        assert result[key].item() == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
        assert 0.0 < result[key].item() < 1.0  # a non-trivial case


def test_merged_halves_equal_one_metric_on_all() -> None:
    images = random_images(seed=3, count=40)
    whole = evaluate(images)
    first, second = VOCMeanAveragePrecision(), VOCMeanAveragePrecision()
    for metric, part in ((first, images[:25]), (second, images[25:])):
        for start in range(0, len(part), 8):  # several updates per instance
            batch = part[start : start + 8]
            metric.update([p for p, _ in batch], [t for _, t in batch])
    first.merge_state(second)
    merged = first.compute()
    for key in ("map", "map_voc07", "map_voc12", "map_per_class", "classes"):
        assert torch.equal(merged[key], whole[key]), key


def test_per_class_ap_uses_class_names_and_labels_are_checked() -> None:
    metric = VOCMeanAveragePrecision(class_names=["cat", "dog"])
    pred, target = image([(A, 0.9, 2)], [(A, 2), (B, 1)])
    metric.update([pred], [target])
    assert metric.per_class_ap() == {"cat": 0.0, "dog": 1.0}
    bad_pred, bad_target = image([(A, 0.9, 3)], [(A, 1)])
    with pytest.raises(ValueError, match=r"preds\[0\] holds .* label outside \[1, 2\]"):
        metric.update([bad_pred], [bad_target])


@pytest.mark.parametrize(
    ("pred_change", "target_change", "message"),
    [
        ({"boxes": torch.zeros(1, 5)}, {}, r"preds\[1\]\['boxes'\] must be \[N, 4\]"),
        ({"scores": torch.zeros(2)}, {}, r"preds\[1\]\['scores'\] must be a vector of length 1"),
        ({"labels": torch.ones(1)}, {}, r"preds\[1\]\['labels'\] must be integer"),
        ({"scores": torch.tensor([math.nan])}, {}, r"preds\[1\] holds a non-finite box or score"),
        ({}, {"difficult": torch.zeros(3, dtype=torch.bool)}, r"targets\[1\]\['difficult'\] must be a bool"),
        ({}, {"labels": None}, r"targets\[1\] has no 'labels'"),
    ],
)
def test_bad_input_names_the_image_and_the_problem(
    pred_change: dict[str, torch.Tensor], target_change: dict[str, torch.Tensor | None], message: str
) -> None:
    good = image([(A, 0.9, 1)], [(A, 1)])
    pred, target = image([(A, 0.9, 1)], [(A, 1)])
    pred.update(pred_change)
    target.update(target_change)
    target = {k: v for k, v in target.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        VOCMeanAveragePrecision().update([good[0], pred], [good[1], target])
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        VOCMeanAveragePrecision().update([good[0], good[0]], [good[1]])


# ---------------------------------------------------------------------------------------------------------
# Real torch.distributed sync (gloo, 2 processes on CPU): torchmetrics gathers the list states with "cat".


def _ddp_worker(rank: int, init_file: str, images: list[Image], shards: list[list[int]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = []
        for shard in shards:  # one scenario per shard split; shard[rank] lists this rank's images
            metric = VOCMeanAveragePrecision()
            mine = [images[i] for i in shard[rank]]
            if mine:
                metric.update([p for p, _ in mine], [t for _, t in mine])
            results.append({k: v.clone() for k, v in metric.compute().items()})
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_sync_over_two_processes_equals_single_process(tmp_path: Path) -> None:
    images = random_images(seed=4, count=30)
    whole = evaluate(images)
    scenarios = [
        [list(range(0, 30, 2)), list(range(1, 30, 2))],  # interleaved, uneven numbers of boxes per rank
        [list(range(30)), []],  # rank 1 saw no image at all
    ]
    out = str(tmp_path / "result")
    # forkserver: the ranks start from the test session's server, whose imports are done (a new interpreter
    # per rank costs seconds of torch imports), and never fork a process whose torch threads run.
    args = (str(tmp_path / "init"), images, scenarios, out)
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="forkserver")
    for rank in range(2):
        for synced in torch.load(f"{out}.{rank}"):
            for key in ("map_voc07", "map_voc12", "map_per_class", "classes"):
                assert torch.equal(synced[key], whole[key]), (rank, key)
