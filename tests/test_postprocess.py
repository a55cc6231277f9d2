import pytest
import torch

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
