"""VGG16 base of SSD: conv1_1..conv5_3, pool5 3x3/1, dilated conv6 and 1x1 conv7 (the reduced fc6/fc7)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd_lightning.models.architecture import (
    Architecture,
    NetworkOptions,
    NetworkParts,
    PublishedDetector,
    torchvision_start,
)
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.neck import EXTRAS_SSD300, EXTRAS_SSD512, SSDNeck
from ssd_lightning.models.pretrained import (
    PixelNormalization,
    pixel_normalization,
    torchvision_normalization,
    torchvision_weights,
)
from ssd_lightning.models.renaming import count_numbered, rename

# (stage, convs in the stage, output channels); every stage but the last ends in a 2x2 max pool.
_VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# Conv layer names in the order of torchvision's `vgg16().features` and ssd.pytorch's `vgg` list.
VGG16_CONV_NAMES = tuple(f"conv{stage}_{i}" for stage, n, _ in _VGG16_STAGES for i in range(1, n + 1)) + (
    "conv6",
    "conv7",
)


def _stage_layers(stage: int, convs: int, in_channels: int, out_channels: int) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    for i in range(1, convs + 1):
        layers.append((f"conv{stage}_{i}", nn.Conv2d(in_channels, out_channels, 3, padding=1)))
        layers.append((f"relu{stage}_{i}", nn.ReLU(inplace=True)))
        in_channels = out_channels
    return layers


class VGG16Backbone(nn.Module):
    """Returns the two VGG sources of SSD: conv4_3 (stride 8, 512 ch) and conv7 (stride 16, 1024 ch)."""

    out_channels = (512, 1024)

    def __init__(self) -> None:
        super().__init__()
        to_conv4_3: list[tuple[str, nn.Module]] = []
        in_channels = 3
        for stage, convs, channels in _VGG16_STAGES[:4]:
            if stage > 1:
                # ceil_mode on pool3 turns 75 into 38 (not 37) for SSD300, as in the paper's Caffe model.
                to_conv4_3.append((f"pool{stage - 1}", nn.MaxPool2d(2, 2, ceil_mode=stage == 4)))
            to_conv4_3 += _stage_layers(stage, convs, in_channels, channels)
            in_channels = channels
        self.to_conv4_3 = nn.Sequential(OrderedDict(to_conv4_3))
        self.to_conv7 = nn.Sequential(
            OrderedDict(
                [("pool4", nn.MaxPool2d(2, 2))]
                + _stage_layers(5, 3, 512, 512)
                + [
                    ("pool5", nn.MaxPool2d(3, stride=1, padding=1)),
                    ("conv6", nn.Conv2d(512, 1024, 3, padding=6, dilation=6)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("conv7", nn.Conv2d(1024, 1024, 1)),
                    ("relu7", nn.ReLU(inplace=True)),
                ]
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def conv(self, name: str) -> nn.Conv2d:
        """The conv layer called `name` (conv1_1 .. conv5_3, conv6, conv7)."""
        stage = self.to_conv4_3 if hasattr(self.to_conv4_3, name) else self.to_conv7
        return getattr(stage, name)

    def forward(self, images: Tensor) -> list[Tensor]:
        conv4_3 = self.to_conv4_3(images)
        return [conv4_3, self.to_conv7(conv4_3)]


def _reduce_fc_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Paper section 3: subsample ImageNet fc6/fc7 into the dilated 3x3 conv6 and 1x1 conv7 (every 4th
    unit, every 3rd tap of fc6's 7x7 window)."""
    fc6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    fc7 = state["classifier.3.weight"]
    return {
        "conv6.weight": fc6[::4, :, ::3, ::3].contiguous(),
        "conv6.bias": state["classifier.0.bias"][::4].contiguous(),
        "conv7.weight": fc7[::4, ::4].reshape(1024, 1024, 1, 1).contiguous(),
        "conv7.bias": state["classifier.3.bias"][::4].contiguous(),
    }


def _named_vgg_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights keyed conv{X}.{weight,bias} from a torchvision VGG16 or an ssd.pytorch reduced-fc file."""
    torchvision_layout = any(k.startswith("features.") for k in state)
    prefix = "features." if torchvision_layout else ""
    # Both layouts index the convs by their position in the flat layer list (convs, ReLUs and pools).
    positions = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]
    named: dict[str, Tensor] = {}
    for name, position in zip(VGG16_CONV_NAMES, positions, strict=True):
        for kind in ("weight", "bias"):
            key = f"{prefix}{position}.{kind}"
            if key in state:
                named[f"{name}.{kind}"] = state[key]
    if torchvision_layout and "classifier.0.weight" in state:
        named.update(_reduce_fc_weights(state))
    missing = [n for n in VGG16_CONV_NAMES[:13] if f"{n}.weight" not in named]
    if missing:
        raise ValueError(
            f"not VGG16 weights: no tensors for {missing}; expected torchvision `vgg16` keys (features.N.*) "
            "or ssd.pytorch's vgg16_reducedfc.pth keys (N.weight)"
        )
    return named


def load_vgg16_backbone(backbone: VGG16Backbone, weights: Mapping[str, Tensor] | str | Path) -> list[str]:
    """Load ImageNet VGG16 weights into `backbone`; returns the names of the layers that were loaded.

    `weights` is a state dict or a file holding one: torchvision's `vgg16` (fc6/fc7 are subsampled into
    conv6/conv7) or ssd.pytorch's `vgg16_reducedfc.pth`.
    """
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        weights = torch.load(path, map_location="cpu", weights_only=True)
    # torchvision's IMAGENET1K_FEATURES ships NaN classifier weights (features only): never use those.
    weights = {
        k: v for k, v in weights.items() if not (k.startswith("classifier.") and not torch.isfinite(v).all())
    }
    named = _named_vgg_weights(weights)
    loaded = []
    for name in VGG16_CONV_NAMES:
        if f"{name}.weight" not in named:
            continue
        conv = backbone.conv(name)
        for kind in ("weight", "bias"):
            tensor = named[f"{name}.{kind}"]
            target = getattr(conv, kind)
            if tensor.shape != target.shape:
                raise ValueError(
                    f"{name}.{kind}: weights have shape {tuple(tensor.shape)}, layer {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
        loaded.append(name)
    return loaded


def file_normalization(path: Path) -> PixelNormalization | None:
    """The convention of a VGG16 weight file: ssd.pytorch's reduced-fc file is Caffe's; a torchvision file
    with a real classifier is IMAGENET1K_V1's, with NaN classifier weights IMAGENET1K_FEATURES' (Caffe);
    None for a features-only file (either)."""
    # mmap: reading a few tensors of a large file costs nothing more than its header.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "0.weight" in state:
        return pixel_normalization("vgg16_imagenet")
    if "classifier.0.weight" in state:
        with_classifier = bool(torch.isfinite(state["classifier.0.weight"]).all())
        name = "IMAGENET1K_V1" if with_classifier else "IMAGENET1K_FEATURES"
        return torchvision_normalization(torchvision_weights("vgg16", name))
    return None


# Position of each VGG conv in the flat layer lists of torchvision's `vgg16().features` / ssd.pytorch `vgg`.
_VGG_POSITIONS = dict(
    zip(VGG16_CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33), strict=True)
)


def _our_vgg_key(name: str) -> str:
    stage = "to_conv4_3" if name < "conv5" else "to_conv7"
    return f"backbone.{stage}.{name}"


def _from_ssd_pytorch(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """amdegroot/ssd.pytorch's SSD300/SSD512 in our names."""
    names = {f"vgg.{pos}": _our_vgg_key(conv) for conv, pos in _VGG_POSITIONS.items()}
    names["L2Norm.weight"] = "neck.l2norm.weight"
    for i in range(count_numbered(state, "extras.")):  # the extras list alternates 1x1 and 3x3 convs
        names[f"extras.{i}"] = f"neck.extras.{i // 2}.{0 if i % 2 == 0 else 2}"
    for k in range(count_numbered(state, "loc.")):
        names[f"loc.{k}"] = f"heads.{k}.loc"
        names[f"conf.{k}"] = f"heads.{k}.conf"
    return rename(state, names, "ssd.pytorch")


def _from_torchvision(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's `ssd300_vgg16` in our names."""
    names = {f"backbone.features.{_VGG_POSITIONS[c]}": _our_vgg_key(c) for c in VGG16_CONV_NAMES[:10]}
    names.update(
        {
            "backbone.extra.0.1": _our_vgg_key("conv5_1"),
            "backbone.extra.0.3": _our_vgg_key("conv5_2"),
            "backbone.extra.0.5": _our_vgg_key("conv5_3"),
            "backbone.extra.0.7.1": _our_vgg_key("conv6"),
            "backbone.extra.0.7.3": _our_vgg_key("conv7"),
            "backbone.scale_weight": "neck.l2norm.weight",
        }
    )
    for i in range(1, count_numbered(state, "backbone.extra.")):  # extra.0 is conv5..conv7
        names[f"backbone.extra.{i}.0"] = f"neck.extras.{i - 1}.0"
        names[f"backbone.extra.{i}.2"] = f"neck.extras.{i - 1}.2"
    for k in range(count_numbered(state, "head.regression_head.module_list.")):
        names[f"head.regression_head.module_list.{k}"] = f"heads.{k}.loc"
        names[f"head.classification_head.module_list.{k}"] = f"heads.{k}.conf"
    return rename(state, names, "torchvision")


def _parts(options: NetworkOptions) -> NetworkParts:
    backbone = VGG16Backbone()
    extras = EXTRAS_SSD300 if options.size == 300 else EXTRAS_SSD512
    return NetworkParts(backbone, SSDNeck(backbone.out_channels, extras), SSDHead)


ARCHITECTURE = Architecture(
    name="vgg16",
    parts=_parts,
    sizes=(300, 512),
    priors="voc",
    imagenet=torchvision_start("vgg16", load_vgg16_backbone, "IMAGENET1K_V1", file_normalization),
    detectors={
        "ssd.pytorch": PublishedDetector("ssd.pytorch", _from_ssd_pytorch),
        "torchvision": PublishedDetector(
            "ssd300_vgg16_torchvision", _from_torchvision, lambda state: "backbone.scale_weight" in state
        ),
    },
    description="the paper's SSD300/SSD512: VGG16 with fc6/fc7 as dilated conv6/conv7, L2Norm on conv4_3",
)
