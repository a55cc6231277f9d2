"""Published SSD300 weights load into our module and give identical outputs."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

import ssd_lightning as sl
from ssd_lightning.boxes import cxcywh_to_xyxy
from ssd_lightning.models.vgg import VGG16_CONV_NAMES, VGG16Backbone


def _randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return module


def test_torchvision_ssd300_outputs_match():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
    theirs = _randomise(theirs).eval()
    ours = sl.build_ssd(300, 21, prior_preset_name="torchvision").eval()
    ours.load_state_dict(sl.convert_state_dict(theirs.state_dict(), source="torchvision"))  # strict
    images = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        features = list(theirs.backbone(images).values())
        head = theirs.head(features)
        loc, conf = ours(images)
        anchors = theirs.anchor_generator(ImageList(images, [(300, 300)] * 2), features)[0]
    torch.testing.assert_close(loc, head["bbox_regression"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conf, head["cls_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cxcywh_to_xyxy(ours.priors), anchors / 300, rtol=0, atol=1e-6)


class _FlatSSD300(nn.Module):
    """The flat, index-addressed layout of amdegroot/ssd.pytorch's SSD300, as a test oracle."""

    def __init__(self, num_classes):
        super().__init__()
        layers, channels = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]:
            if v in ("M", "C"):
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=v == "C"))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU()]
                channels = v
        layers += [
            nn.MaxPool2d(3, 1, 1),
            nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
            nn.ReLU(),
            nn.Conv2d(1024, 1024, 1),
            nn.ReLU(),
        ]
        self.vgg = nn.ModuleList(layers)
        self.L2Norm = nn.Module()
        self.L2Norm.weight = nn.Parameter(torch.full((512,), 20.0))
        self.extras = nn.ModuleList(
            [
                nn.Conv2d(1024, 256, 1),
                nn.Conv2d(256, 512, 3, stride=2, padding=1),
                nn.Conv2d(512, 128, 1),
                nn.Conv2d(128, 256, 3, stride=2, padding=1),
                nn.Conv2d(256, 128, 1),
                nn.Conv2d(128, 256, 3),
                nn.Conv2d(256, 128, 1),
                nn.Conv2d(128, 256, 3),
            ]
        )
        source_channels, boxes = [512, 1024, 512, 256, 256, 256], [4, 6, 6, 6, 4, 4]
        self.loc = nn.ModuleList(
            nn.Conv2d(c, b * 4, 3, padding=1) for c, b in zip(source_channels, boxes, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, b * num_classes, 3, padding=1) for c, b in zip(source_channels, boxes, strict=True)
        )
        self.num_classes = num_classes

    def forward(self, x):
        sources = []
        for layer in self.vgg[:23]:
            x = layer(x)
        norm = x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10
        sources.append(x / norm * self.L2Norm.weight.view(1, -1, 1, 1))
        for layer in self.vgg[23:]:
            x = layer(x)
        sources.append(x)
        for i, layer in enumerate(self.extras):
            x = torch.relu(layer(x))
            if i % 2 == 1:
                sources.append(x)
        loc = torch.cat(
            [h(s).permute(0, 2, 3, 1).flatten(1) for h, s in zip(self.loc, sources, strict=True)], 1
        )
        conf = torch.cat(
            [h(s).permute(0, 2, 3, 1).flatten(1) for h, s in zip(self.conf, sources, strict=True)], 1
        )
        return loc.view(x.shape[0], -1, 4), conf.view(x.shape[0], -1, self.num_classes)


def test_ssd_pytorch_checkpoint_outputs_match():
    theirs = _randomise(_FlatSSD300(21), seed=1).eval()
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # saved from DataParallel
    ours = sl.build_ssd(300, 21).eval()
    ours.load_state_dict(sl.convert_state_dict(state, source="ssd.pytorch"))
    images = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        expected_loc, expected_conf = theirs(images)
        loc, conf = ours(images)
    torch.testing.assert_close(loc, expected_loc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conf, expected_conf, rtol=1e-4, atol=1e-5)


def test_unknown_keys_and_sources_are_rejected():
    with pytest.raises(ValueError, match="no place"):
        sl.convert_state_dict({"rpn.head.weight": torch.zeros(1)}, source="torchvision")
    with pytest.raises(ValueError, match="unknown source"):
        sl.convert_state_dict({}, source="caffe")


def _encoded_classifier(encode_rows: bool) -> dict:
    """A torchvision-layout VGG16 state dict at full shapes whose fc6/fc7 entries hold their own row index
    (`encode_rows`) or column index, as broadcast views: no memory for 100M values. Conv layers: zeros."""
    vgg_convs = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                 (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
                 (26, 512, 512), (28, 512, 512)]  # fmt: skip
    state = {}
    for position, cin, cout in vgg_convs:
        state[f"features.{position}.weight"] = torch.zeros(1).expand(cout, cin, 3, 3)
        state[f"features.{position}.bias"] = torch.zeros(1).expand(cout)

    def indices(rows: int, columns: int) -> torch.Tensor:
        if encode_rows:
            return torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, columns)
        return torch.arange(columns, dtype=torch.float32)[None, :].expand(rows, columns)

    state["classifier.0.weight"] = indices(4096, 512 * 7 * 7)
    state["classifier.0.bias"] = torch.arange(4096, dtype=torch.float32) + 0.5
    state["classifier.3.weight"] = indices(4096, 4096)
    state["classifier.3.bias"] = torch.arange(4096, dtype=torch.float32) + 0.25
    return state


def test_fc6_fc7_are_subsampled_into_conv6_conv7_as_in_the_paper():
    # The paper (section 3): conv6 takes every 4th of fc6's 4096 units and every 3rd tap of its 7x7
    # window over conv5_3's 512 channels (then dilated by 6), conv7 every 4th unit of fc7 and every 4th
    # of its inputs, biases likewise. fc6 input (c, y, x) is column 49c + 7y + x of the flattened pool5.
    backbone = VGG16Backbone()
    assert backbone.conv("conv6").dilation == (6, 6) and backbone.conv("conv6").padding == (6, 6)
    unit = torch.arange(1024)[:, None, None, None]
    channel = torch.arange(512)[None, :, None, None]
    tap_y, tap_x = torch.arange(3)[None, None, :, None], torch.arange(3)[None, None, None, :]
    expected = {
        True: {"conv6": (4 * unit).expand(1024, 512, 3, 3), "conv7": (4 * unit).expand(1024, 1024, 1, 1)},
        False: {
            "conv6": 49 * channel + 7 * (3 * tap_y) + 3 * tap_x,
            "conv7": (4 * torch.arange(1024)[None, :, None, None]).expand(1024, 1024, 1, 1),
        },
    }
    for encode_rows in (True, False):
        loaded = sl.load_vgg16_backbone(backbone, _encoded_classifier(encode_rows))
        assert loaded == list(VGG16_CONV_NAMES)
        for name in ("conv6", "conv7"):
            weight = backbone.conv(name).weight.detach()
            assert torch.equal(weight, expected[encode_rows][name].expand_as(weight).float()), name
    assert torch.equal(backbone.conv("conv6").bias.detach(), 4 * torch.arange(1024.0) + 0.5)
    assert torch.equal(backbone.conv("conv7").bias.detach(), 4 * torch.arange(1024.0) + 0.25)


def test_vgg16_imagenet_weights_load_into_the_backbone():
    vgg = _randomise(torchvision.models.vgg16(weights=None), seed=2).eval()
    model = sl.build_ssd(300, 21).eval()
    loaded = sl.load_vgg16_backbone(model.backbone, vgg.state_dict())
    assert loaded[-2:] == ["conv6", "conv7"] and len(loaded) == 15
    images = torch.randn(1, 3, 64, 64)  # divisible by 8: the ceil-mode pool3 changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.to_conv4_3(images), vgg.features[:23](images))
    fc6 = vgg.classifier[0].weight.view(4096, 512, 7, 7)
    torch.testing.assert_close(model.backbone.conv("conv6").weight, fc6[::4, :, ::3, ::3])
    with pytest.raises(ValueError, match="not VGG16 weights"):
        sl.load_vgg16_backbone(model.backbone, {"foo.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="not found"):
        sl.load_vgg16_backbone(model.backbone, "/nonexistent/vgg16_reducedfc.pth")
