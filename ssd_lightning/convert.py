"""Map published SSD weights onto our module names: amdegroot/ssd.pytorch SSD300, torchvision
`ssd300_vgg16` and `ssdlite320_mobilenet_v3_large`, NVIDIA DeepLearningExamples SSD300 v1.1 (ResNet-50).

ssd.pytorch and torchvision share our prior order and head channel layout, so their conversion is a pure
renaming. NVIDIA's heads are box-major (loc viewed as [B, 4, A*H*W]: channel = value * A + box, priors
ordered box by box over each map), ours position-major (channel = box * 4 + value, priors cell by cell,
then box): its head channels are permuted so that each prior gets the prediction NVIDIA's model gives
for the same default box. Either way, the converted model gives the source model's outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ssd_lightning.models.vgg import VGG16_CONV_NAMES

# Position of each VGG conv in the flat layer lists of torchvision's `vgg16().features` / ssd.pytorch `vgg`.
_VGG_POSITIONS = dict(
    zip(VGG16_CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33), strict=True)
)


def _our_vgg_key(name: str) -> str:
    stage = "to_conv4_3" if name < "conv5" else "to_conv7"
    return f"backbone.{stage}.{name}"


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered submodules `prefix<N>.` the state dict holds."""
    heads = (k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix))
    return len({h for h in heads if h.isdigit()})


def _ssd_pytorch_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    names = {f"vgg.{pos}": _our_vgg_key(conv) for conv, pos in _VGG_POSITIONS.items()}
    names["L2Norm.weight"] = "neck.l2norm.weight"
    for i in range(_count(state, "extras.")):  # the extras list alternates 1x1 and 3x3 convs
        names[f"extras.{i}"] = f"neck.extras.{i // 2}.{0 if i % 2 == 0 else 2}"
    for k in range(_count(state, "loc.")):
        names[f"loc.{k}"] = f"heads.{k}.loc"
        names[f"conf.{k}"] = f"heads.{k}.conf"
    return names


def _torchvision_names(state: Mapping[str, Tensor]) -> dict[str, str]:
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
    for i in range(1, _count(state, "backbone.extra.")):  # extra.0 is conv5..conv7
        names[f"backbone.extra.{i}.0"] = f"neck.extras.{i - 1}.0"
        names[f"backbone.extra.{i}.2"] = f"neck.extras.{i - 1}.2"
    for k in range(_count(state, "head.regression_head.module_list.")):
        names[f"head.regression_head.module_list.{k}"] = f"heads.{k}.loc"
        names[f"head.classification_head.module_list.{k}"] = f"heads.{k}.conf"
    return names


def _names_by_pattern(state: Mapping[str, Tensor], patterns: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Module renames for every key whose module path matches one of the (regex, replacement) patterns."""
    names = {}
    for key in state:
        module = key.rpartition(".")[0]
        for pattern, replacement in patterns:
            if re.fullmatch(pattern, module):
                names[module] = re.sub(pattern, replacement, module)
                break
    return names


# torchvision's SSDLite: its backbone's two stages are ours in the same order (torchvision's `features.0`
# ends with C4's expansion conv, as our `to_stride16` does); extras and heads keep their inner layout.
_TORCHVISION_SSDLITE = (
    (r"backbone\.features\.0\.(.+)", r"backbone.to_stride16.\1"),
    (r"backbone\.features\.1\.(.+)", r"backbone.to_stride32.\1"),
    (r"backbone\.extra\.(.+)", r"neck.extras.\1"),
    (r"head\.regression_head\.module_list\.(\d+)\.(.+)", r"heads.\1.loc.\2"),
    (r"head\.classification_head\.module_list\.(\d+)\.(.+)", r"heads.\1.conf.\2"),
)

# NVIDIA's SSD300: `feature_extractor.feature_extractor` is `nn.Sequential(*resnet50().children()[:7])`
# (conv1, bn1, relu, maxpool, layer1..3); its extras have our BatchNorm block layout.
_NVIDIA = (
    (r"feature_extractor\.feature_extractor\.0", "backbone.conv1"),
    (r"feature_extractor\.feature_extractor\.1", "backbone.bn1"),
    (r"feature_extractor\.feature_extractor\.4\.(.+)", r"backbone.layer1.\1"),
    (r"feature_extractor\.feature_extractor\.5\.(.+)", r"backbone.layer2.\1"),
    (r"feature_extractor\.feature_extractor\.6\.(.+)", r"backbone.layer3.\1"),
    (r"additional_blocks\.(\d+)\.(\d+)", r"neck.extras.\1.\2"),
    (r"loc\.(\d+)", r"heads.\1.loc"),
    (r"conf\.(\d+)", r"heads.\1.conf"),
)


def _box_major_to_ours(tensor: Tensor, boxes: int) -> Tensor:
    """Head weights/biases with output channels value * A + box (NVIDIA) -> box * V + value (ours)."""
    values = tensor.shape[0] // boxes
    return tensor.reshape(values, boxes, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _nvidia_heads_to_ours(converted: dict[str, Tensor]) -> dict[str, Tensor]:
    for key, tensor in list(converted.items()):
        match = re.fullmatch(r"heads\.(\d+)\.(loc|conf)\.(weight|bias)", key)
        if match:
            boxes = converted[f"heads.{match[1]}.loc.bias"].shape[0] // 4
            converted[key] = _box_major_to_ours(tensor, boxes).contiguous()
    return converted


def _rename(state: Mapping[str, Tensor], names: Mapping[str, str], source: str) -> dict[str, Tensor]:
    converted: dict[str, Tensor] = {}
    unused = []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if key in names:  # whole-key entries such as L2Norm.weight
            converted[names[key]] = tensor
        elif module in names:
            converted[f"{names[module]}.{param}"] = tensor
        else:
            unused.append(key)
    if unused:
        raise ValueError(f"{source} state dict has keys with no place in our SSD: {unused[:8]}")
    return converted


SOURCES = ("ssd.pytorch", "torchvision", "nvidia")


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Convert an SSD state dict from `source` ("ssd.pytorch", "torchvision" or "nvidia") to our key names.

    The result loads with a strict `load_state_dict` into the matching network:
      ssd.pytorch: `build_ssd(300, C)`;
      torchvision `ssd300_vgg16`: `build_ssd(300, C, prior_preset_name="torchvision")` (COCO prior sizes);
      torchvision `ssdlite320_mobilenet_v3_large` (told apart by its keys):
        `build_ssd(320, C, arch="mobilenet_v3_large")` (`reduced_tail=False` if built on ImageNet weights);
      nvidia (SSD300 v1.1): `build_ssd(300, C, arch="resnet50", prior_preset_name="coco")`.
    Training checkpoints that wrap the state dict under "model", and DataParallel's "module." prefixes,
    are accepted.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    if isinstance(state_dict.get("model"), Mapping):  # training-script checkpoints
        state_dict = state_dict["model"]
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel checkpoints
    if source == "ssd.pytorch":
        return _rename(state, _ssd_pytorch_names(state), source)
    if source == "torchvision":
        if "head.regression_head.module_list.0.1.weight" in state:  # SSDLite's separable head
            return _rename(state, _names_by_pattern(state, _TORCHVISION_SSDLITE), "torchvision SSDLite")
        return _rename(state, _torchvision_names(state), source)
    # NVIDIA's DDP + AMP checkpoints may nest the model as "module.1." (as its torch.hub loader expects).
    state = {k.removeprefix("1."): v for k, v in state.items()}
    return _nvidia_heads_to_ours(_rename(state, _names_by_pattern(state, _NVIDIA), source))
