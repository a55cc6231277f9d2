"""torchvision's SSDLite and NVIDIA's SSD300 (ResNet-50) weights load into our modules and give the same
outputs, prior for prior."""

import math

import pytest
import torch
import torchvision
from test_models_backbones import _randomise, torchvision_ssdlite
from torch import nn

import ssd_lightning as sl

NVIDIA_CHANNELS = (1024, 512, 512, 256, 256, 256)
NVIDIA_BOXES = (4, 6, 6, 6, 4, 4)


@pytest.mark.parametrize("reduced_tail", [True, False])
def test_torchvision_ssdlite_outputs_match(reduced_tail):
    theirs = _randomise(torchvision_ssdlite(21, reduced_tail), seed=0, gain=1.6).eval()
    ours = sl.build_ssd(320, 21, arch="mobilenet_v3_large", reduced_tail=reduced_tail).eval()
    ours.load_state_dict(sl.convert_state_dict(theirs.state_dict(), source="torchvision"))  # strict
    # torchvision normalises and resizes outside the network: both get the same normalised tensor.
    images = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        head = theirs.head(list(theirs.backbone(images).values()))
        loc, conf = ours(images)
    assert head["cls_logits"].abs().max() > 0.1  # the comparison is not between vanishing numbers
    torch.testing.assert_close(loc, head["bbox_regression"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conf, head["cls_logits"], rtol=1e-4, atol=1e-5)


class _NvidiaSSD300(nn.Module):
    """NVIDIA DeepLearningExamples SSD300 v1.1 as a test oracle, rebuilt from its checkpoints' key names
    and shapes (feature_extractor.feature_extractor.N, additional_blocks.I.J, loc.K, conf.K) and its
    forward: each head's output is viewed as [B, values, A*H*W], so its channel is value * A + box and its
    priors run box by box over each map."""

    def __init__(self, num_classes):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.feature_extractor = nn.Module()
        self.feature_extractor.feature_extractor = nn.Sequential(*list(resnet.children())[:7])
        conv4_1 = resnet.layer3[0]
        conv4_1.conv1.stride = conv4_1.conv2.stride = conv4_1.downsample[0].stride = (1, 1)
        blocks = []
        middles = (256, 256, 128, 128, 128)
        pairs = zip(NVIDIA_CHANNELS[:-1], NVIDIA_CHANNELS[1:], middles, strict=True)
        for i, (cin, cout, mid) in enumerate(pairs):
            stride, padding = (2, 1) if i < 3 else (1, 0)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(cin, mid, 1, bias=False),
                    nn.BatchNorm2d(mid),
                    nn.ReLU(),
                    nn.Conv2d(mid, cout, 3, stride=stride, padding=padding, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                )
            )
        self.additional_blocks = nn.ModuleList(blocks)
        self.loc = nn.ModuleList(
            nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(NVIDIA_CHANNELS, NVIDIA_BOXES, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, a * num_classes, 3, padding=1)
            for c, a in zip(NVIDIA_CHANNELS, NVIDIA_BOXES, strict=True)
        )
        self.num_classes = num_classes

    def forward(self, x):
        x = self.feature_extractor.feature_extractor(x)
        sources = [x]
        for block in self.additional_blocks:
            x = block(x)
            sources.append(x)
        batch = x.shape[0]
        loc = torch.cat([h(s).reshape(batch, 4, -1) for h, s in zip(self.loc, sources, strict=True)], 2)
        conf = torch.cat(
            [h(s).reshape(batch, self.num_classes, -1) for h, s in zip(self.conf, sources, strict=True)], 2
        )
        return loc, conf  # [B, 4, 8732], [B, C, 8732]


def _nvidia_default_boxes():
    """dboxes300_coco in NVIDIA's order: per map, box shape by box shape, then cells row-major; (cx, cy, w,
    h) clamped to [0, 1]."""
    image, maps, steps = 300, (38, 19, 10, 5, 3, 1), (8, 16, 32, 64, 100, 300)
    scales, ratios = (21, 45, 99, 153, 207, 261, 315), ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    boxes = []
    for k, size in enumerate(maps):
        cells = image / steps[k]
        s, s_next = scales[k] / image, scales[k + 1] / image
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in ratios[k]:
            shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        for w, h in shapes:
            for i in range(size):
                for j in range(size):
                    boxes.append(((j + 0.5) / cells, (i + 0.5) / cells, w, h))
    return torch.tensor(boxes, dtype=torch.float32).clamp(0, 1)


def _nvidia_index_of_our_priors():
    """For each of our priors (map, cell row-major, box), the index of NVIDIA's prior (map, box, cell)."""
    index, start = [], 0
    for size, boxes in zip((38, 19, 10, 5, 3, 1), NVIDIA_BOXES, strict=True):
        for cell in range(size * size):
            index += [start + box * size * size + cell for box in range(boxes)]
        start += boxes * size * size
    return torch.tensor(index)


@pytest.mark.parametrize("classes", [21, 81])
def test_nvidia_parameter_count_equals_ours(classes):
    ours = sl.build_ssd(300, classes, arch="resnet50", prior_preset_name="coco")
    theirs = _NvidiaSSD300(classes)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in sl.convert_state_dict(theirs.state_dict(), "nvidia").items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_nvidia_checkpoint_outputs_match_prior_for_prior():
    classes = 5
    theirs = _randomise(_NvidiaSSD300(classes), seed=1).eval()
    # A DDP training checkpoint: the state dict under "model", keys prefixed with "module.".
    checkpoint = {"epoch": 64, "model": {f"module.{k}": v for k, v in theirs.state_dict().items()}}
    ours = sl.build_ssd(300, classes, arch="resnet50", prior_preset_name="coco").eval()
    ours.load_state_dict(sl.convert_state_dict(checkpoint, source="nvidia"))  # strict

    order = _nvidia_index_of_our_priors()
    assert sorted(order.tolist()) == list(range(8732))
    torch.testing.assert_close(ours.priors, _nvidia_default_boxes()[order], rtol=0, atol=1e-6)

    images = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        their_loc, their_conf = theirs(images)
        loc, conf = ours(images)
    assert their_conf.abs().max() > 0.1
    torch.testing.assert_close(loc, their_loc.transpose(1, 2)[:, order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conf, their_conf.transpose(1, 2)[:, order], rtol=1e-4, atol=1e-5)


def test_nvidia_hub_prefix_and_bad_keys():
    theirs = _NvidiaSSD300(3)
    nested = {f"module.1.{k}": v for k, v in theirs.state_dict().items()}  # DDP around an AMP wrapper
    converted = sl.convert_state_dict(nested, source="nvidia")
    sl.build_ssd(300, 3, arch="resnet50", prior_preset_name="coco").load_state_dict(converted)
    with pytest.raises(ValueError, match="no place"):
        sl.convert_state_dict({"feature_extractor.fc.weight": torch.zeros(1)}, source="nvidia")
    with pytest.raises(ValueError, match="no place"):
        sl.convert_state_dict({"backbone.features.1.0.weight": torch.zeros(1)}, source="nvidia")
