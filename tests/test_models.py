import pytest
import torch

import ssd_lightning as sl
from ssd_lightning.models import L2Norm


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("size", "classes", "params", "priors"),
    [(300, 21, 26_285_486, 8732), (300, 81, 34_305_206, 8732), (512, 21, 27_188_676, 24564)],
)
def test_parameter_and_prior_counts(size, classes, params, priors):
    model = sl.build_ssd(size=size, num_classes=classes)
    assert _count(model) == params
    assert model.priors.shape == (priors, 4)
    assert model.image_size == size


def test_ssd300_forward_shapes_and_sources():
    model = sl.build_ssd(300, 21).eval()
    images = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        sources = model.features(images)
        loc, conf = model(images)
    assert [s.shape[-1] for s in sources] == [38, 19, 10, 5, 3, 1]
    assert [s.shape[1] for s in sources] == [512, 1024, 512, 256, 256, 256]
    assert loc.shape == (2, 8732, 4) and conf.shape == (2, 8732, 21)


def test_ssd512_feature_maps():
    model = sl.build_ssd(512, 21).eval()
    with torch.no_grad():
        sources = model.features(torch.randn(1, 3, 512, 512))
    assert [s.shape[-1] for s in sources] == [64, 32, 16, 8, 4, 2, 1]


def test_structure_is_named_not_indexed():
    model = sl.build_ssd(300, 21)
    assert model.backbone.conv("conv4_3").out_channels == 512
    assert model.backbone.conv("conv6").dilation == (6, 6)
    assert model.backbone.to_conv4_3.pool3.ceil_mode
    assert len(model.neck.extras) == 4 and len(model.heads) == 6
    assert model.heads[0].loc.out_channels == 16 and model.heads[1].conf.out_channels == 6 * 21
    torch.testing.assert_close(model.neck.l2norm.weight, torch.full((512,), 20.0))


def test_l2norm_scales_unit_vectors():
    layer = L2Norm(3, initial_scale=5.0)
    x = torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x).flatten(), torch.tensor([3.0, 0.0, 4.0]), rtol=1e-6, atol=1e-6)


def test_wrong_input_size_is_a_clear_error():
    model = sl.build_ssd(300, 21)
    with pytest.raises(ValueError, match="resize images to 300x300"):
        model(torch.randn(1, 3, 320, 320))


def test_compact_model_any_size_trains():
    torch.manual_seed(0)  # the mined negatives depend on the initial weights
    model = sl.build_ssd(size=128, num_classes=4, arch="compact", width=8)
    assert model.prior_spec.feature_maps == (16, 8, 4, 2, 1, 1)
    images = torch.randn(2, 3, 128, 128)
    loc, conf = model(images)
    assert loc.shape == (2, model.priors.shape[0], 4) and conf.shape[-1] == 4
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.7]]), "labels": torch.tensor([2])}] * 2
    loss_loc, loss_conf = sl.MultiBoxLoss(4)(loc, conf, model.priors, targets)
    (loss_loc + loss_conf).backward()
    # Every parameter the loss reaches learns: both head kinds, and the first layer through all maps.
    assert sum(head.conf.weight.grad.abs().sum() for head in model.heads) > 0
    assert sum(head.loc.weight.grad.abs().sum() for head in model.heads) > 0
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_detect_returns_one_dict_per_image():
    model = sl.build_ssd(size=128, num_classes=3, arch="compact", width=8).eval()
    with torch.no_grad():
        detections = model.detect(*model(torch.randn(3, 3, 128, 128)))
    assert len(detections) == 3
    for d in detections:
        assert set(d) == {"boxes", "scores", "labels"}
        assert len(d["boxes"]) <= 200
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert d["labels"].min() >= 1 and d["labels"].max() <= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes 300 and 512"):
        sl.build_ssd(size=400)
    with pytest.raises(ValueError, match="unknown arch"):
        sl.build_ssd(arch="resnet")
    with pytest.raises(ValueError, match="background"):
        sl.build_ssd(num_classes=1)


def test_non_square_input_is_a_clear_error():
    # 280x300 (HxW): the feature maps have the right widths but not the right heights.
    model = sl.build_ssd(300, 21).eval()
    with pytest.raises(ValueError, match="resize images to 300x300"):
        model(torch.randn(1, 3, 280, 300))
    with pytest.raises(ValueError, match="resize images to 300x300"):
        model(torch.randn(1, 3, 300, 280))


def test_detect_checks_the_prediction_count():
    model = sl.build_ssd(size=128, num_classes=3, arch="compact", width=8).eval()
    num_priors = model.priors.shape[0]
    with pytest.raises(ValueError, match="made for 128x128 input"):
        model.detect(torch.zeros(1, num_priors - 8, 4), torch.zeros(1, num_priors - 8, 3))
