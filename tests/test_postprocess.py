import pytest
import torch
from torchvision.ops import box_iou

from ssd_lightning.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from ssd_lightning.postprocess import DetectionConfig, detect, select_candidates

# Priors (cx, cy, w, h): 0 and 1 overlap heavily (IoU 0.82), 2 is apart, 3 is far away.
PRIORS = torch.tensor(
    [[0.30, 0.30, 0.2, 0.2], [0.31, 0.30, 0.2, 0.2], [0.70, 0.70, 0.2, 0.2], [0.10, 0.90, 0.1, 0.1]]
)


def _logits(probabilities):
    """Logits whose softmax is `probabilities` (rows sum to 1)."""
    return torch.tensor(probabilities).log()


def _run(conf, config=None):
    loc = torch.zeros(conf.shape[0], conf.shape[1], 4)  # boxes = priors
    return detect(loc, conf, PRIORS, config)


def test_nms_suppresses_same_class_only():
    conf = _logits(
        [
            [
                [0.1, 0.9, 0.0],  # prior 0: class 1, 0.9
                [0.2, 0.8, 0.0],  # prior 1: class 1, 0.8 -> suppressed by prior 0
                [0.3, 0.0, 0.7],  # prior 2: class 2
                [0.995, 0.005, 0.0],  # prior 3: below the 0.01 threshold
            ]
        ]
    ).clamp(min=-30)
    (result,) = _run(conf)
    assert result["labels"].tolist() == [1, 2]
    torch.testing.assert_close(result["scores"], torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.2, 0.2, 0.4, 0.4]))


def test_overlapping_boxes_of_different_classes_both_survive():
    conf = _logits([[[0.1, 0.9, 0.0], [0.2, 0.0, 0.8], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]).clamp(min=-30)
    (result,) = _run(conf)
    assert sorted(result["labels"].tolist()) == [1, 2]


def test_top_k_keeps_the_best_in_score_order():
    conf = _logits([[[0.5, 0.5, 0.0], [0.4, 0.0, 0.6], [0.3, 0.7, 0.0], [0.2, 0.0, 0.8]]]).clamp(min=-30)
    (result,) = _run(conf, DetectionConfig(top_k=2))
    torch.testing.assert_close(result["scores"], torch.tensor([0.8, 0.7]))
    assert result["labels"].tolist() == [2, 1]


def test_images_are_independent_and_empty_images_give_empty_results():
    one = [[0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    nothing = [[1.0, 0.0, 0.0]] * 4
    conf = _logits([one, nothing, one]).clamp(min=-30)
    results = _run(conf)
    assert [len(r["scores"]) for r in results] == [1, 0, 1]
    assert results[1]["boxes"].shape == (0, 4)
    torch.testing.assert_close(results[0]["boxes"], results[2]["boxes"])


def test_threshold_and_decoding_are_applied():
    conf = _logits([[[0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]).clamp(min=-30)
    loc = torch.zeros(1, 4, 4)
    loc[0, 0, 0] = 1.0  # shift prior 0 right by 0.1 * w = 0.02
    (result,) = detect(loc, conf, PRIORS, DetectionConfig(score_threshold=0.95))
    assert len(result["scores"]) == 0
    (result,) = detect(loc, conf, PRIORS)
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.22, 0.2, 0.42, 0.4]))


@pytest.mark.parametrize("scale", [1.0, 6.0])  # flat: every prior passes the threshold; peaked: few do
def test_threshold_first_and_top_k_first_select_the_same_candidates(scale):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, 5, generator=generator) * scale
    logits[..., 0] += scale  # background usually wins when peaked
    scores = logits.softmax(dim=-1)[..., 1:]
    config = DetectionConfig(score_threshold=0.05, pre_nms_top_k=40)
    by_threshold = select_candidates(scores, config, method="threshold")
    by_top_k = select_candidates(scores, config, method="top_k")
    assert 0 < len(by_threshold.scores) <= 3 * 4 * 40
    torch.testing.assert_close(by_threshold.group_sizes, by_top_k.group_sizes)
    for a, b in zip(by_threshold, by_top_k, strict=True):
        torch.testing.assert_close(a, b)
    if scale == 1.0:  # every class of every image is full: the cap applies
        assert by_top_k.group_sizes.eq(40).all()
    with pytest.raises(ValueError, match="method"):
        select_candidates(scores, config, method="sort")


def _two_close_boxes_in_a_big_batch():
    """64 images, 81 classes; images 0-62 have one class-1 detection each, image 63 two class-80 boxes of
    IoU 0.444 (< 0.45, so NMS keeps both) small enough for float32 offsets of ~10^4 to round their IoU."""
    a, b = [0.1, 0.5, 0.11, 0.51], [0.1038, 0.5, 0.1138, 0.51]
    priors = xyxy_to_cxcywh(torch.tensor([a, b, [0.0, 0.0, 1.0, 1.0]]))
    conf = torch.full((64, 3, 81), -30.0)
    conf[:, :, 0] = 0.0  # background everywhere...
    conf[:-1, 2, 0], conf[:-1, 2, 1] = -30.0, 0.0  # ...but one class-1 box in each of images 0-62
    conf[-1, 0, 0], conf[-1, 0, 80] = -30.0, 0.0  # image 63: class 80 at 1.0 and at 0.62
    conf[-1, 1, 80] = 0.5
    return torch.zeros(64, 3, 4), conf, priors


def test_detections_of_an_image_do_not_depend_on_the_batch():
    loc, conf, priors = _two_close_boxes_in_a_big_batch()
    boxes = cxcywh_to_xyxy(priors[:2])
    assert 0.44 < box_iou(boxes, boxes)[0, 1] < 0.45
    in_batch = detect(loc, conf, priors)[-1]
    (alone,) = detect(loc[-1:], conf[-1:], priors)
    assert len(alone["scores"]) == 2  # per-class NMS of that image keeps both
    for key in ("boxes", "scores", "labels"):
        assert in_batch[key].equal(alone[key])


@pytest.mark.parametrize("flat", [True, False])
def test_every_image_alone_gives_its_batch_detections(flat):
    generator = torch.Generator().manual_seed(int(flat))
    priors = torch.cat(
        [torch.rand(500, 2, generator=generator), torch.rand(500, 2, generator=generator) * 0.1 + 0.01], 1
    )
    conf = torch.randn(6, 500, 21, generator=generator) * (1.0 if flat else 4.0)
    loc = torch.randn(6, 500, 4, generator=generator) * 0.5
    batch = detect(loc, conf, priors)
    assert sum(len(d["scores"]) for d in batch) > 100
    for image, in_batch in enumerate(batch):
        (alone,) = detect(loc[image : image + 1], conf[image : image + 1], priors)
        for key in ("boxes", "scores", "labels"):
            assert in_batch[key].equal(alone[key])


def test_predictions_must_cover_the_priors():
    conf = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="4 priors"):
        detect(torch.zeros(1, 3, 4), conf, PRIORS)
    with pytest.raises(ValueError, match="4 priors"):
        detect(torch.zeros(1, 4, 4), conf, PRIORS)
