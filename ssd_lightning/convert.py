"""Map published SSD300 weights (amdegroot/ssd.pytorch, torchvision `ssd300_vgg16`) onto our module names.

Both sources share our prior order and head channel layout, so conversion is a pure renaming: the
converted model gives the same loc/conf outputs for the same input.
"""

from __future__ import annotations

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


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Convert an SSD state dict from `source` ("ssd.pytorch" or "torchvision") to our key names.

    The result loads with a strict `load_state_dict` into `build_ssd(300, C)` (use `prior_preset_name="coco"`
    for torchvision's weights, which were trained with the COCO prior sizes).
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel checkpoints
    if source == "ssd.pytorch":
        return _rename(state, _ssd_pytorch_names(state), source)
    if source == "torchvision":
        return _rename(state, _torchvision_names(state), source)
    raise ValueError(f"unknown source {source!r}; choose 'ssd.pytorch' or 'torchvision'")
