import math

import pytest
import torch

from ssd_lightning.priors import PriorSpec, generate_priors, prior_preset


@pytest.mark.parametrize(
    ("size", "sizes", "count"),
    [(300, "voc", 8732), (300, "coco", 8732), (512, "voc", 24564), (512, "coco", 24564)],
)
def test_prior_counts(size, sizes, count):
    spec = prior_preset(size, sizes)
    priors = generate_priors(spec)
    assert spec.num_priors == count
    assert priors.shape == (count, 4)
    assert priors.min() >= 0 and priors.max() <= 1


def test_boxes_per_location():
    assert prior_preset(300).boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert prior_preset(512).boxes_per_location == (4, 6, 6, 6, 6, 4, 4)


def test_ssd300_voc_first_cell_by_hand():
    priors = generate_priors(prior_preset(300, "voc"))
    c = 0.5 / (300 / 8)  # centre of cell (0, 0) of the 38x38 map
    s, s_next = 30 / 300, 60 / 300
    r = math.sqrt(2)
    expected = torch.tensor(
        [
            [c, c, s, s],
            [c, c, math.sqrt(s * s_next), math.sqrt(s * s_next)],
            [c, c, s * r, s / r],
            [c, c, s / r, s * r],
        ]
    )
    torch.testing.assert_close(priors[:4], expected)


def test_cells_are_row_major():
    priors = generate_priors(prior_preset(300, "voc"))
    step = 8 / 300
    # second cell of the first row: x moves, y stays
    torch.testing.assert_close(priors[4, :2], torch.tensor([1.5 * step, 0.5 * step]))
    # first cell of the second row starts after 38 cells of 4 priors
    torch.testing.assert_close(priors[38 * 4, :2], torch.tensor([0.5 * step, 1.5 * step]))


def test_second_source_and_ratio_three():
    priors = generate_priors(prior_preset(300, "voc"))
    start = 38 * 38 * 4
    c = 0.5 * 16 / 300
    s = 60 / 300
    torch.testing.assert_close(priors[start, :], torch.tensor([c, c, s, s]))
    torch.testing.assert_close(priors[start + 1, 2], torch.tensor(math.sqrt(s * 111 / 300)))
    r3 = math.sqrt(3)
    torch.testing.assert_close(priors[start + 4, 2:], torch.tensor([s * r3, s / r3]))
    torch.testing.assert_close(priors[start + 5, 2:], torch.tensor([s / r3, s * r3]))


def test_clip_modes_on_the_last_prior():
    spec = prior_preset(300, "voc")
    tall_height = 264 / 300 * math.sqrt(2)  # 1.2445: taller than the image
    assert generate_priors(spec)[-1, 3].item() == pytest.approx(1.0)
    unclipped = PriorSpec(**{**spec.__dict__, "clip": "none"})
    assert generate_priors(unclipped)[-1, 3].item() == pytest.approx(tall_height, rel=1e-6)


def test_clip_size_keeps_centres_outside_the_image():
    # step 32 does not divide 300: the last column of the 10x10 map has its centre at 9.5 * 32 / 300 > 1
    spec = prior_preset(300, "torchvision")
    priors = generate_priors(spec)
    assert priors[:, 0].max().item() == pytest.approx(9.5 * 32 / 300)
    assert priors[:, 2:].max() <= 1.0
    assert generate_priors(prior_preset(300, "coco"))[:, 0].max().item() == pytest.approx(1.0)


def test_coco_and_512_sizes():
    assert generate_priors(prior_preset(300, "coco"))[0, 2].item() == pytest.approx(21 / 300)
    assert generate_priors(prior_preset(512, "coco"))[0, 2].item() == pytest.approx(20.48 / 512)
    assert generate_priors(prior_preset(512, "voc"))[0, 2].item() == pytest.approx(35.84 / 512)


def test_from_scales_is_linear():
    spec = PriorSpec.from_scales(200, (25, 13, 7), ((2,), (2,), (2,)), min_scale=0.2, max_scale=0.8)
    assert spec.min_sizes == pytest.approx((40, 80, 120))
    assert spec.max_sizes == pytest.approx((80, 120, 160))
    assert spec.steps == pytest.approx((8, 200 / 13, 200 / 7))


def test_spec_validation():
    with pytest.raises(ValueError, match="one entry per source"):
        PriorSpec(300, (38, 19), (8,), (30, 60), (60, 111), ((2,), (2,)))
    with pytest.raises(ValueError, match="clip"):
        PriorSpec(300, (38,), (8,), (30,), (60,), ((2,),), clip="sometimes")
    with pytest.raises(ValueError, match="no prior preset"):
        prior_preset(400)
