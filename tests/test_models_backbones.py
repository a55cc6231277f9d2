"""SSDLite320 MobileNetV3-Large and SSD300 ResNet-50: structure, parameter counts and default boxes against
torchvision's SSDLite (random init, offline), and the ImageNet backbone loaders."""

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import ssdlite
from torchvision.models.detection.image_list import ImageList

import ssd_lightning as sl
from ssd_lightning.boxes import cxcywh_to_xyxy
from ssd_lightning.models import MobileNetV3Backbone, ResNet50Backbone, SSDLiteHead


def _count(model):
    return sum(p.numel() for p in model.parameters())


def torchvision_ssdlite(num_classes, reduced_tail=True):
    """torchvision's ssdlite320_mobilenet_v3_large with random weights. Its full tail is what it builds
    from ImageNet backbone weights, which are not downloadable here: the builder's `mobilenet_v3_large` is
    swapped for one that builds the full tail without weights (torchvision's other steps unchanged)."""
    real = ssdlite.mobilenet_v3_large

    def full_tail(*, weights, progress, norm_layer, reduced_tail, **kwargs):
        return real(weights=None, progress=progress, norm_layer=norm_layer, reduced_tail=False, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if not reduced_tail:
            patch.setattr(ssdlite, "mobilenet_v3_large", full_tail)
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )


@pytest.fixture(scope="module")
def theirs():
    torch.manual_seed(0)
    return torchvision_ssdlite(21).eval()


@pytest.fixture(scope="module")
def ours():
    return sl.build_ssd(320, 21, arch="mobilenet_v3_large").eval()


@pytest.mark.parametrize(("classes", "reduced_tail"), [(21, True), (91, True), (21, False), (91, False)])
def test_ssdlite_parameter_count_equals_torchvisions(classes, reduced_tail):
    theirs = torchvision_ssdlite(classes, reduced_tail)
    ours = sl.build_ssd(320, classes, arch="mobilenet_v3_large", reduced_tail=reduced_tail)
    assert _count(ours) == _count(theirs)
    assert sorted(p.numel() for p in ours.parameters()) == sorted(p.numel() for p in theirs.parameters())
    if classes == 91 and reduced_tail:
        assert _count(ours) == 3_440_060  # torchvision's COCO_V1 meta["num_params"]


def test_ssdlite_default_boxes_equal_torchvisions_anchors(theirs, ours):
    assert ours.prior_spec == sl.prior_preset(320, "ssdlite")
    assert ours.priors.shape == (3234, 4)
    images = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        features = list(theirs.backbone(images).values())
    anchors = theirs.anchor_generator(ImageList(images, [(320, 320)]), features)[0]
    torch.testing.assert_close(cxcywh_to_xyxy(ours.priors) * 320, anchors, rtol=0, atol=1e-4)
    # In (cx, cy, w, h), before torchvision's conversion to pixels, the boxes are bit-identical.
    grid = theirs.anchor_generator._grid_default_boxes([f.shape[-2:] for f in features], [320, 320])
    assert torch.equal(ours.priors, grid)


def test_ssdlite_structure_and_torchvision_settings(ours):
    model = ours
    with torch.no_grad():
        loc, conf = model(torch.randn(1, 3, 320, 320))  # checks the maps against the priors' sizes
    assert model.prior_spec.feature_maps == (20, 10, 5, 3, 2, 1)
    assert model.neck.out_channels == (672, 480, 512, 256, 256, 128)
    assert loc.shape == (1, 3234, 4) and conf.shape == (1, 3234, 21)
    assert not hasattr(model.neck, "l2norm") and all(isinstance(h, SSDLiteHead) for h in model.heads)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.eps, m.momentum) == (0.001, 0.03) for m in norms)
    depthwise = model.heads[0].conf[0][0]
    assert depthwise.groups == depthwise.in_channels == 672 and depthwise.kernel_size == (3, 3)
    full = sl.build_ssd(320, 21, arch="mobilenet_v3_large", reduced_tail=False)
    assert full.neck.out_channels[:2] == (672, 960)


def test_ssdlite_initialisation_is_torchvisions(theirs, ours):
    """torchvision draws every conv of SSDLite from N(0, 0.03) with zero biases: so do we, tensor by tensor
    (the draw order differs, so compare statistics)."""
    converted = sl.convert_state_dict(theirs.state_dict(), source="torchvision")
    own = ours.state_dict()
    assert converted.keys() == own.keys()
    for key, value in own.items():
        reference = converted[key]
        if value.dim() <= 1:  # biases, BatchNorm affine and statistics: constants
            assert torch.equal(value, reference), key
        elif value.numel() >= 2000:
            assert abs(float(value.std()) - float(reference.std())) < 0.004, key
            assert abs(float(value.mean())) < 0.004, key


def test_ssdlite_at_another_size_gets_boxes_by_torchvisions_rule():
    model = sl.build_ssd(256, 4, arch="mobilenet_v3_large")
    assert model.prior_spec.feature_maps == (16, 8, 4, 2, 1, 1)
    assert model.prior_spec == sl.priors.ssdlite_prior_spec(256, (16, 8, 4, 2, 1, 1))


def test_resnet50_ssd300_structure():
    model = sl.build_ssd(300, 81, arch="resnet50", prior_preset_name="coco").eval()
    assert model.prior_spec == sl.prior_preset(300, "coco")
    with torch.no_grad():
        loc, conf = model(torch.randn(1, 3, 300, 300))  # checks the maps against the priors' sizes
    assert model.prior_spec.feature_maps == (38, 19, 10, 5, 3, 1)
    assert model.neck.out_channels == (1024, 512, 512, 256, 256, 256)
    assert loc.shape == (1, 8732, 4) and conf.shape == (1, 8732, 81)
    assert model.neck.l2norm is None
    first_extra = model.neck.extras[0]
    assert [type(m).__name__ for m in first_extra] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    assert first_extra[0].bias is None and first_extra[3].stride == (2, 2)
    assert model.neck.extras[3][3].padding == (0, 0)
    assert [h.loc.out_channels // 4 for h in model.heads] == [4, 6, 6, 6, 4, 4]
    assert model.backbone.layer3[0].conv2.stride == (1, 1)


def test_bad_sizes_for_the_new_archs():
    with pytest.raises(ValueError, match="NVIDIA's SSD300"):
        sl.build_ssd(512, 21, arch="resnet50")
    with pytest.raises(ValueError, match="no prior preset"):
        sl.build_ssd(320, 21, arch="mobilenet_v3_large", prior_preset_name="voc")


def _randomise(module, seed, gain=1.0):
    """Deterministic weights and BatchNorm statistics; variance `gain / fan_in` keeps activations O(1)
    (vanishing ones turn into denormals, which are slow on CPUs). MobileNetV3 needs gain ~1.6."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.dim() > 1:
                std = math.sqrt(gain / tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return module


def test_mobilenet_v3_imagenet_weights_load_into_the_backbone(tmp_path):
    imagenet = _randomise(torchvision.models.mobilenet_v3_large(weights=None), seed=3, gain=1.6).eval()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(imagenet.state_dict(), path)
    backbone = MobileNetV3Backbone(reduced_tail=False).eval()
    loaded = sl.load_mobilenet_v3_backbone(backbone, path)
    assert loaded == [f"features.{i}" for i in range(17)]
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c4, last = backbone(images)
        x = imagenet.features[:13](images)
        torch.testing.assert_close(c4, imagenet.features[13].block[0](x))
        torch.testing.assert_close(last, imagenet.features(images))

    with pytest.raises(ValueError, match="reduced_tail=False"):
        sl.load_mobilenet_v3_backbone(MobileNetV3Backbone(reduced_tail=True), imagenet.state_dict())
    with pytest.raises(ValueError, match="not MobileNetV3-Large weights"):
        sl.load_mobilenet_v3_backbone(backbone, torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(FileNotFoundError, match="not found"):
        sl.load_mobilenet_v3_backbone(backbone, "/nonexistent/mobilenet_v3_large.pth")


def test_resnet50_imagenet_weights_load_into_the_backbone():
    imagenet = _randomise(torchvision.models.resnet50(weights=None), seed=4).eval()
    backbone = ResNet50Backbone().eval()
    loaded = sl.load_resnet50_backbone(backbone, imagenet.state_dict())
    assert loaded == ["conv1", "bn1", "layer1", "layer2", "layer3"]
    # NVIDIA's conv4_x runs at stride 1: the same change on torchvision's network gives the same features.
    for conv in (imagenet.layer3[0].conv2, imagenet.layer3[0].downsample[0]):
        conv.stride = (1, 1)
    images = torch.randn(1, 3, 64, 64)
    reference = nn.Sequential(*list(imagenet.children())[:7])
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)[0], reference(images))
    with pytest.raises(ValueError, match="not ResNet-50 weights"):
        sl.load_resnet50_backbone(backbone, torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(ValueError, match="not ResNet-50 weights"):
        sl.load_resnet50_backbone(backbone, torchvision.models.mobilenet_v3_large(weights=None).state_dict())


def test_pixel_normalisation_table():
    assert sl.pixel_normalization("ssdlite320_mobilenet_v3_large_coco").pixel_mean == (127.5,) * 3
    assert sl.pixel_normalization("ssdlite320_mobilenet_v3_large_coco").pixel_std == (127.5,) * 3
    imagenet = sl.pixel_normalization("resnet50_imagenet")
    assert imagenet.pixel_mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    assert imagenet.pixel_std == pytest.approx((0.229 * 255, 0.224 * 255, 0.225 * 255))
    for name in ("mobilenet_v3_large_imagenet", "nvidia_ssd300_resnet50"):
        other = sl.pixel_normalization(name)
        assert (other.pixel_mean, other.pixel_std) == (imagenet.pixel_mean, imagenet.pixel_std)
    with pytest.raises(ValueError, match="no normalisation recorded"):
        sl.pixel_normalization("yolo")
