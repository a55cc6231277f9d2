"""Prior coverage (ssd_lightning.coverage): which ground-truth boxes the priors reach, and sizes that fit."""

from __future__ import annotations

import pytest
import torch

import ssd_lightning as sl
from ssd_lightning.boxes import cxcywh_to_xyxy, prior_iou
from ssd_lightning.coverage import best_priors, prior_coverage, share_reached
from ssd_lightning.models.ssd import ssd_prior_spec
from ssd_lightning.priors import PriorSpec, generate_priors, prior_preset, ssdlite_prior_spec


def square_boxes(count: int, low_px: float, high_px: float, image_size: int, seed: int = 0) -> torch.Tensor:
    """`count` square xyxy boxes in [0, 1] with sides uniform in [low_px, high_px] input pixels."""
    generator = torch.Generator().manual_seed(seed)
    side = (low_px + (high_px - low_px) * torch.rand(count, generator=generator)) / image_size
    centre = 0.1 + 0.8 * torch.rand(count, 2, generator=generator)
    return torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], dim=1)


def random_boxes(count: int, seed: int = 0) -> torch.Tensor:
    """Boxes of every size and shape, some cut by the image border."""
    generator = torch.Generator().manual_seed(seed)
    sides = torch.rand(count, 2, generator=generator) ** 2 * 0.9 + 0.005
    centre = torch.rand(count, 2, generator=generator)
    return torch.cat([centre - sides / 2, centre + sides / 2], dim=1).clamp(0, 1)


@pytest.mark.parametrize(
    "spec",
    [
        prior_preset(300, "voc"),  # centres and sizes clipped, maps that overhang the input (38 x 8 > 300)
        prior_preset(300, "torchvision"),  # sizes clipped only
        ssdlite_prior_spec(320, (20, 10, 5, 3, 2, 1)),
    ],
    ids=["ssd300_voc", "ssd300_torchvision", "ssdlite320"],
)
def test_best_priors_equal_the_full_iou_matrix(spec: PriorSpec) -> None:
    boxes = random_boxes(400)
    full = prior_iou(boxes, cxcywh_to_xyxy(generate_priors(spec)))
    best_iou, index = best_priors(boxes, spec)
    torch.testing.assert_close(best_iou, full.max(dim=1).values, atol=1e-6, rtol=0)
    # the index names a prior with that IoU (ties may name another prior than argmax would)
    torch.testing.assert_close(full.gather(1, index[:, None])[:, 0], best_iou, atol=1e-6, rtol=0)


def test_boxes_far_smaller_than_the_priors_are_reported_and_the_suggestion_reaches_them() -> None:
    spec = prior_preset(300, "voc")  # smallest prior 30 px
    boxes = square_boxes(200, 10, 16, 300)
    report = prior_coverage(boxes, spec)
    assert report.num_boxes == 200 and report.coverage == 0.0
    assert "reached by a prior: 0 of 200 (0.0%)" in report.format()
    # all unreached, all in the 8-16 px bin, all near-square
    assert [(b.label, b.boxes, b.unreached) for b in report.by_size if b.boxes] == [("8-16", 200, 200)]
    assert [(b.label, b.unreached) for b in report.by_ratio if b.boxes] == [("1:2-2:1", 200)]

    suggestion = report.suggestion
    assert suggestion is not None and suggestion.min_sizes[0] < 16
    # the printed overrides, applied the way train.py applies them (model.net -> build_ssd's priors)
    overrides = dict(item.split("=") for item in suggestion.overrides().split())
    net = {
        key.removeprefix("model.net."): [float(v) for v in value.strip("[]").split(",")]
        for key, value in overrides.items()
    }
    suggested_spec = ssd_prior_spec(arch="vgg16", size=300, **net)
    assert (
        suggested_spec.feature_maps == spec.feature_maps
        and suggested_spec.aspect_ratios == spec.aspect_ratios
    )
    measured = share_reached(boxes, suggested_spec)
    assert measured == pytest.approx(suggestion.coverage) and measured > 0.5
    assert f"suggested prior sizes reach {measured:.1%} (now 0.0%)" in report.format()
    assert prior_coverage(boxes, suggested_spec, suggest=False).coverage == pytest.approx(measured)


def test_per_map_shares_add_up_to_the_overall_share() -> None:
    spec = prior_preset(300, "coco")
    boxes = random_boxes(500, seed=1)
    report = prior_coverage(boxes, spec, suggest=False)
    assert 0.2 < report.coverage < 1.0  # a mix of reached and unreached boxes
    assert sum(m.share for m in report.per_map) == pytest.approx(report.coverage)
    assert sum(m.reached for m in report.per_map) == report.reached
    assert sum(m.boxes for m in report.per_map) == report.num_boxes == 500
    # each box is counted on the map of its best prior
    full = prior_iou(boxes, cxcywh_to_xyxy(generate_priors(spec))).max(dim=1)
    per_map = [f * f * a for f, a in zip(spec.feature_maps, spec.boxes_per_location, strict=True)]
    first_map_boxes = int((full.indices < per_map[0]).sum())
    assert report.per_map[0].boxes == first_map_boxes
    assert sum(b.boxes for b in report.by_size) == sum(b.boxes for b in report.by_ratio) == 500
    assert sum(b.unreached for b in report.by_size) == 500 - report.reached


def test_boxes_that_are_priors_are_all_reached_and_nothing_is_suggested() -> None:
    spec = prior_preset(300, "voc")
    priors = cxcywh_to_xyxy(generate_priors(spec))
    boxes = priors[torch.randperm(len(priors), generator=torch.Generator().manual_seed(0))[:300]]
    report = prior_coverage(boxes, spec)
    assert report.coverage == 1.0 and report.mean_best_iou == pytest.approx(1.0)
    assert report.suggestion is None and "suggested" not in report.format()


def test_min_and_max_sizes_replace_the_sizes_of_any_arch() -> None:
    sizes = {"min_sizes": [8, 16, 24, 32, 48, 64], "max_sizes": [16, 24, 32, 48, 64, 96]}
    compact = sl.build_ssd(size=96, num_classes=3, arch="compact", width=8, **sizes)
    default = sl.build_ssd(size=96, num_classes=3, arch="compact", width=8)
    assert compact.prior_spec.min_sizes == (8, 16, 24, 32, 48, 64)
    assert compact.prior_spec.feature_maps == default.prior_spec.feature_maps
    assert compact.prior_spec != default.prior_spec
    assert ssd_prior_spec(size=96, arch="compact", width=8, **sizes) == compact.prior_spec
    assert ssd_prior_spec(arch="vgg16", size=300, prior_preset_name="coco") == prior_preset(300, "coco")
    with pytest.raises(ValueError, match=r"min_sizes needs one positive size .* per feature map"):
        ssd_prior_spec(arch="vgg16", size=300, min_sizes=[10, 20])
