import math

import pytest
import torch
from torchvision.ops import box_iou

from ssd_lightning.boxes import (
    cxcywh_to_xyxy,
    decode,
    encode,
    match_priors,
    pad_targets,
    prior_iou,
    xyxy_to_cxcywh,
)


def test_encode_by_hand():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    box = torch.tensor([[0.45, 0.45, 0.65, 0.55]])  # centre (0.55, 0.5), size (0.2, 0.1)
    offsets = encode(box, prior, (0.1, 0.2))
    expected = torch.tensor([[0.05 / (0.1 * 0.2), 0.0, 0.0, math.log(0.5) / 0.2]])
    torch.testing.assert_close(offsets, expected)


def test_encode_decode_round_trip():
    generator = torch.Generator().manual_seed(0)
    priors = torch.rand(50, 4, generator=generator) * 0.5 + 0.1
    centres = torch.rand(3, 50, 2, generator=generator)
    sizes = torch.rand(3, 50, 2, generator=generator) * 0.5 + 0.01
    boxes = cxcywh_to_xyxy(torch.cat([centres, sizes], dim=-1))
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes, atol=1e-6, rtol=1e-5)


def test_format_round_trip():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    torch.testing.assert_close(xyxy_to_cxcywh(boxes), torch.tensor([[0.3, 0.55, 0.4, 0.7]]))
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)


def test_pad_targets_places_boxes_and_marks_padding():
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.zeros(0, 4), torch.rand(3, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64), torch.tensor([1, 4, 3])]
    padded = pad_targets(boxes, labels)
    assert padded.boxes.shape == (3, 3, 4)
    assert padded.valid.tolist() == [[True, False, False], [False, False, False], [True, True, True]]
    assert padded.labels.tolist() == [[2, 0, 0], [0, 0, 0], [1, 4, 3]]
    torch.testing.assert_close(padded.boxes[2], boxes[2])


def _priors_xyxy(*boxes):
    return torch.tensor(boxes, dtype=torch.float32)


def test_threshold_is_inclusive_at_half():
    # gt [0,0,1,1] (area 1); prior [0,0,1,0.5] has IoU exactly 0.5, prior [0,0,1,0.49] has 0.49
    priors = _priors_xyxy([0, 0, 1, 0.5], [0, 0, 1, 0.49], [0, 0, 1, 1.0])
    targets = pad_targets([torch.tensor([[0.0, 0.0, 1.0, 1.0]])], [torch.tensor([7])])
    result = match_priors(targets, priors, 0.5)
    assert result.labels.tolist() == [[7, 0, 7]]


def test_bipartite_step_gives_every_gt_a_prior():
    # gt A = [0,0,1,1]; gt B = [2,0,2.6,1] overlaps only prior 1, and only weakly
    priors = _priors_xyxy([0, 0, 1, 1], [0.5, 0, 2.5, 1], [5, 5, 6, 6])
    targets = pad_targets([torch.tensor([[0.0, 0, 1, 1], [2.0, 0, 2.6, 1]])], [torch.tensor([1, 2])])
    result = match_priors(targets, priors, 0.5)
    # prior 1: IoU with A = 0.5/2.5 = 0.2, with B = 0.5/2.1 = 0.238 -> below 0.5 but it is B's best prior
    assert result.labels.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(result.boxes[0, 1], torch.tensor([2.0, 0, 2.6, 1]))
    assert result.iou[0, 1].item() == 2.0


def test_forced_match_overrides_a_better_threshold_match():
    # prior 0 overlaps A with IoU 0.8 but is B's only overlapping prior: B claims it
    priors = _priors_xyxy([0, 0, 1, 1], [0, 0, 1.25, 1], [9, 9, 10, 10])
    a = [0.0, 0.0, 1.25, 1.0]  # IoU with prior 0: 0.8, with prior 1: 1.0
    b = [0.0, 0.0, 1.0, 0.3]  # IoU with prior 0: 0.3, with prior 1: 0.24
    result = match_priors(pad_targets([torch.tensor([a, b])], [torch.tensor([3, 4])]), priors, 0.5)
    assert result.labels.tolist() == [[4, 3, 0]]


def test_two_gts_with_the_same_best_prior_last_wins():
    priors = _priors_xyxy([0, 0, 1, 1], [4, 4, 5, 5])
    gts = torch.tensor([[0.0, 0.0, 0.9, 1.0], [0.1, 0.0, 1.0, 1.0]])  # both best on prior 0
    result = match_priors(pad_targets([gts], [torch.tensor([5, 6])]), priors, 0.5)
    assert result.labels[0, 0].item() == 6


def test_empty_targets_are_background_and_batches_do_not_mix():
    priors = _priors_xyxy([0, 0, 1, 1], [1, 1, 2, 2])
    targets = pad_targets(
        [torch.zeros(0, 4), torch.tensor([[1.0, 1.0, 2.0, 2.0]])],
        [torch.zeros(0, dtype=torch.int64), torch.tensor([3])],
    )
    result = match_priors(targets, priors, 0.5)
    assert result.labels.tolist() == [[0, 0], [0, 3]]


def test_pad_targets_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="label tensors"):
        pad_targets([torch.zeros(0, 4)], [])


def _random_xyxy(count: int, generator: torch.Generator) -> torch.Tensor:
    centres = torch.rand(count, 2, generator=generator)
    sizes = torch.rand(count, 2, generator=generator) * 0.6 + 0.01
    return cxcywh_to_xyxy(torch.cat([centres, sizes], dim=1))


def test_prior_iou_equals_torchvision_box_iou():
    generator = torch.Generator().manual_seed(1)
    boxes, priors = _random_xyxy(37, generator), _random_xyxy(500, generator)
    disjoint = torch.tensor([[2.0, 2.0, 3.0, 3.0]])  # overlaps nothing: IoU exactly 0
    boxes = torch.cat([boxes, disjoint])
    torch.testing.assert_close(prior_iou(boxes, priors), box_iou(boxes, priors), atol=1e-7, rtol=0)
    assert prior_iou(boxes, priors)[-1].eq(0).all()


def _match_one_image(boxes: torch.Tensor, labels: torch.Tensor, priors: torch.Tensor, threshold: float):
    """The SSD rule for one image, written plainly: threshold match, then each box forces its best prior."""
    iou = box_iou(boxes, priors)
    best_iou, best_gt = iou.max(dim=0)
    for gt in range(len(boxes)):  # in order, so a later box wins a prior two boxes claim
        prior = int(iou[gt].argmax())
        best_gt[prior], best_iou[prior] = gt, 2.0
    matched_labels = torch.where(best_iou >= threshold, labels[best_gt], torch.zeros_like(best_gt))
    return matched_labels, boxes[best_gt]


@pytest.mark.parametrize("seed", range(5))
def test_batched_matching_equals_the_per_image_rule(seed: int):
    generator = torch.Generator().manual_seed(seed)
    priors = _random_xyxy(300, generator)
    counts = [int(n) for n in torch.randint(1, 12, (6,), generator=generator)]
    boxes = [_random_xyxy(n, generator) for n in counts]
    boxes[2] = torch.cat([boxes[2], boxes[2][:1]])  # two boxes with the same best prior
    labels = [torch.randint(1, 21, (len(b),), generator=generator) for b in boxes]
    result = match_priors(pad_targets(boxes, labels), priors, 0.5)
    for image, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        expected_labels, expected_boxes = _match_one_image(image_boxes, image_labels, priors, 0.5)
        torch.testing.assert_close(result.labels[image], expected_labels)
        torch.testing.assert_close(result.boxes[image], expected_boxes)


def test_boxes_without_area_match_nothing():
    # Given through the API (the datasets drop them): a zero-width, an inverted and a NaN box would
    # otherwise claim prior 0 (or poison the IoU maximum with NaN).
    generator = torch.Generator().manual_seed(7)
    priors = _random_xyxy(200, generator)
    good = _random_xyxy(3, generator)
    bad = torch.tensor([[0.3, 0.2, 0.3, 0.6], [0.6, 0.6, 0.2, 0.7], [float("nan"), 0.1, 0.5, 0.5]])
    labels = torch.tensor([1, 2, 3])
    expected = match_priors(pad_targets([good], [labels]), priors, 0.5)
    mixed = torch.cat([good[:1], bad[:2], good[1:], bad[2:]])
    mixed_labels = torch.tensor([1, 4, 4, 2, 3, 4])
    result = match_priors(pad_targets([mixed], [mixed_labels]), priors, 0.5)
    assert result.labels.equal(expected.labels)
    positives = expected.labels > 0
    torch.testing.assert_close(result.boxes[positives], expected.boxes[positives])
    alone = match_priors(pad_targets([bad], [torch.tensor([4, 4, 4])]), priors, 0.5)
    assert alone.labels.eq(0).all()


def test_encode_computes_in_float32_for_float16_boxes():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.4, 0.4, 0.6, 0.7]])  # padding (no size), a real box
    offsets = encode(boxes.half(), priors)
    assert offsets.dtype == torch.float32 and torch.isfinite(offsets).all()
    torch.testing.assert_close(offsets, encode(boxes.half().float(), priors))
