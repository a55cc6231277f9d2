"""The SSD detector: backbone -> neck -> one head per source, plus its priors and post-processing."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.boxes import DEFAULT_VARIANCES, Variances
from ssd_lightning.models.any_backbone import Backbone, plugin_parts
from ssd_lightning.models.architecture import (
    HEAD_PRIORS,
    HEAD_STYLES,
    HeadFactory,
    NetworkOptions,
    NetworkParts,
)
from ssd_lightning.models.architectures import ARCHITECTURES, get_architecture
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.postprocess import DetectionConfig, detect
from ssd_lightning.priors import PriorSpec, generate_priors, prior_preset, ssdlite_prior_spec

ARCHS = tuple(ARCHITECTURES)  # the built-in ones; any timm model too, as timm:<name>
PLUGIN_ARCH = "custom"  # what a network built on a backbone of the user's own calls its arch


class SSD(nn.Module):
    """Single Shot MultiBox Detector.

    `forward(images)` returns raw predictions `(loc [B,P,4], conf [B,P,C])` against `self.priors`
    ([P,4] cxcywh in [0,1], a non-persistent buffer so checkpoints do not depend on the prior code);
    `detect(loc, conf)` turns them into per-image detections. The neck maps the backbone's sources to the
    heads' inputs and says how many there are (`neck.out_channels`); `head` builds each source's head
    (`SSDHead`, or the separable `SSDLiteHead`), whose outputs are ordered like the priors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        prior_spec: PriorSpec,
        num_classes: int,
        detection: DetectionConfig | None = None,
        variances: Variances = DEFAULT_VARIANCES,
        head: HeadFactory = SSDHead,
    ) -> None:
        super().__init__()
        if len(neck.out_channels) != len(prior_spec.feature_maps):
            raise ValueError(
                f"the network has {len(neck.out_channels)} sources but the prior spec describes "
                f"{len(prior_spec.feature_maps)} feature maps"
            )
        self.backbone = backbone
        self.neck = neck
        self.heads = nn.ModuleList(
            head(channels, boxes, num_classes)
            for channels, boxes in zip(neck.out_channels, prior_spec.boxes_per_location, strict=True)
        )
        self.prior_spec = prior_spec
        self.num_classes = num_classes
        self.detection = detection or DetectionConfig()
        self.variances = tuple(variances)
        self.register_buffer("priors", generate_priors(prior_spec), persistent=False)

    @property
    def image_size(self) -> int:
        return self.prior_spec.image_size

    def features(self, images: Tensor) -> list[Tensor]:
        """The feature maps the heads see, in source order."""
        return self.neck(self.backbone(images))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        sources = self.features(images)
        # Height and width: a non-square input would otherwise be decoded against the wrong priors.
        sizes = tuple(tuple(s.shape[-2:]) for s in sources)
        expected = tuple((side, side) for side in self.prior_spec.feature_maps)
        if sizes != expected:
            raise ValueError(
                f"input of {tuple(images.shape[-2:])} (HxW) gives feature maps {sizes}, but the priors are "
                f"made for {expected}: resize images to {self.image_size}x{self.image_size}"
            )
        predictions = [head(x) for head, x in zip(self.heads, sources, strict=True)]
        loc = torch.cat([p[0] for p in predictions], dim=1)
        conf = torch.cat([p[1] for p in predictions], dim=1)
        return loc, conf

    @torch.no_grad()
    def detect(self, loc: Tensor, conf: Tensor) -> list[dict[str, Tensor]]:
        """Per-image {"boxes" [K,4] xyxy in [0,1], "scores" [K], "labels" [K]}, best first."""
        num_priors = self.priors.shape[0]
        if loc.shape[1] != num_priors or conf.shape[1] != num_priors:
            raise ValueError(
                f"predictions cover {loc.shape[1]} (loc) and {conf.shape[1]} (conf) priors but this model "
                f"has {num_priors}, made for {self.image_size}x{self.image_size} input"
            )
        return detect(loc, conf, self.priors, self.detection, self.variances)


def _feature_map_sizes(backbone: nn.Module, neck: nn.Module, image_size: int) -> tuple[int, ...]:
    probe = nn.Sequential(backbone, neck)
    was_training = probe.training
    probe.eval()
    with torch.no_grad():
        sizes = tuple(s.shape[-1] for s in neck(backbone(torch.zeros(1, 3, image_size, image_size))))
    probe.train(was_training)
    return sizes


def build_ssd(
    size: int = 300,
    num_classes: int = 21,
    arch: str = "vgg16",
    prior_preset_name: str | None = None,
    score_threshold: float = 0.01,
    nms_iou_threshold: float = 0.45,
    top_k: int = 200,
    pre_nms_top_k: int = 400,
    width: int = 32,
    variances: Sequence[float] = DEFAULT_VARIANCES,
    prior_spec: PriorSpec | None = None,
    reduced_tail: bool = True,
    min_sizes: Sequence[float] | None = None,
    max_sizes: Sequence[float] | None = None,
    head: str | None = None,
    backbone: Backbone | None = None,
) -> SSD:
    """Build an SSD detector.

    arch="vgg16": the paper's SSD300 (size=300) or SSD512 (size=512), with the paper's VOC or COCO prior
    sizes (`prior_preset_name` "voc" (default) | "coco"). arch="compact": a small BatchNorm network for CPU
    training at any `size` (128-320 works well), `width` channels in its first layer, priors from the
    paper's linear scale rule. arch="mobilenet_v3_large": torchvision's SSDLite320 (MobileNetV3-Large,
    separable extras and heads, its default boxes: 3,234 at size=320; other sizes get boxes by the same
    rule); `reduced_tail=True` is the tail of torchvision's COCO model and of training from scratch,
    `False` the one ImageNet backbone weights need. arch="resnet50": NVIDIA's SSD300 v1.1 (size=300;
    ResNet-50 to conv4_x, BatchNorm extras; `prior_preset_name` "coco" (default, NVIDIA's) | "voc").
    `num_classes` counts the background (VOC: 21, COCO: 81; torchvision's COCO models: 91). A
    `prior_spec` overrides the priors of any arch; `min_sizes`/`max_sizes` (input pixels, one per feature
    map) replace only the box sizes of whichever priors the arch uses (what `ssd_lightning.coverage`
    suggests for a dataset). Any timm model is an arch too: `arch="timm:resnet18"` (`head` "ssd" at 300/512
    or "ssdlite" at 320, see `ssd_lightning.models.timm_backbone`). A `backbone` of your own (an `nn.Module`
    whose forward returns its feature maps, with their channels as `out_channels`; or its spec,
    `{"_target_": "package.module.Class", **arguments}`) takes the place of the arch's: the extras
    (halving to 1x1) and heads of `head` follow, with priors from the feature maps.
    Architectures are listed in `ssd_lightning.models.architectures.ARCHITECTURES`.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    detection = DetectionConfig(score_threshold, nms_iou_threshold, top_k, pre_nms_top_k)
    options = NetworkOptions(size, width, reduced_tail, head)
    preset, exact_maps = _priors(arch, options, backbone, prior_preset_name)  # checks size and head first
    parts = _network_parts(arch, options, backbone)
    spec = _prior_spec(
        size,
        preset,
        prior_spec,
        min_sizes,
        max_sizes,
        lambda: _feature_map_sizes(parts.backbone, parts.neck, size),
        exact_maps,
    )
    net = SSD(
        parts.backbone,
        parts.neck,
        spec,
        num_classes,
        detection,
        (float(variances[0]), float(variances[1])),
        parts.head,
    )
    net.arch = PLUGIN_ARCH if backbone is not None else arch
    return net


def ssd_prior_spec(**build_ssd_arguments: Any) -> PriorSpec:
    """The priors `build_ssd(**build_ssd_arguments)` would give its network (e.g. `**cfg.model.net`).

    The presets need no network; the compact model's and SSDLite's boxes follow the network's feature-map
    sizes, measured on its backbone and neck alone (no heads, no weights loaded).
    """
    arguments = inspect.signature(build_ssd).bind(**build_ssd_arguments)  # unknown names: TypeError
    arguments.apply_defaults()
    a = arguments.arguments
    options = NetworkOptions(a["size"], a["width"], a["reduced_tail"], a["head"])
    preset, exact_maps = _priors(a["arch"], options, a["backbone"], a["prior_preset_name"])

    def measured() -> tuple[int, ...]:
        parts = _network_parts(a["arch"], options, a["backbone"])
        return _feature_map_sizes(parts.backbone, parts.neck, a["size"])

    spec, min_sizes, max_sizes = a["prior_spec"], a["min_sizes"], a["max_sizes"]
    return _prior_spec(a["size"], preset, spec, min_sizes, max_sizes, measured, exact_maps)


def _priors(
    arch: str, options: NetworkOptions, backbone: Backbone | None, named: str | None
) -> tuple[str, bool]:
    """The priors of the network (a preset name, "scales" or "ssdlite") and whether a preset's feature maps
    are exactly the network's (else its box sizes go on the network's own maps)."""
    if options.head is not None and options.head not in HEAD_STYLES:
        raise ValueError(f"model.net.head={options.head!r}: choose one of {HEAD_STYLES}")
    if backbone is not None:
        return named or HEAD_PRIORS[options.head or "ssd"], False
    architecture = get_architecture(arch)
    return architecture.priors_for(options, named), architecture.named_priors != "sizes"


def _network_parts(arch: str, options: NetworkOptions, backbone: Backbone | None = None) -> NetworkParts:
    """The network parts of `arch`, or around a `backbone` of the user's own."""
    if backbone is None:
        return get_architecture(arch).parts(options)
    return plugin_parts(backbone, options)


def _on_maps(spec: PriorSpec, maps: tuple[int, ...], preset: str) -> PriorSpec:
    if len(maps) != len(spec.feature_maps):
        raise ValueError(
            f"model.net.prior_preset_name={preset} describes {len(spec.feature_maps)} feature maps but the "
            f"network has {len(maps)} ({list(maps)}): use model.net.prior_preset_name=scales"
        )
    return replace(spec, feature_maps=maps, steps=tuple(spec.image_size / side for side in maps))


def ssd_aspect_ratios(maps: int) -> tuple[tuple[int, ...], ...]:
    """The paper's aspect ratios for `maps` feature maps: 2 on the first and last two, 2 and 3 between."""
    return tuple((2,) if i == 0 or i >= maps - 2 else (2, 3) for i in range(maps))


def _prior_spec(
    size: int,
    preset: str,
    prior_spec: PriorSpec | None,
    min_sizes: Sequence[float] | None,
    max_sizes: Sequence[float] | None,
    feature_map_sizes: Callable[[], tuple[int, ...]],
    exact_maps: bool = True,
) -> PriorSpec:
    """The priors at `size`: `prior_spec`, else the `preset` (a `prior_preset` name, or "scales" / "ssdlite":
    from the network's feature maps, `feature_map_sizes()`, by the paper's or torchvision's SSDLite rule).
    `exact_maps=False`: a named preset keeps its box sizes and ratios on the network's own maps."""
    if prior_spec is not None:
        spec = prior_spec
    elif preset == "scales":
        maps = feature_map_sizes()
        spec = PriorSpec.from_scales(size, maps, ssd_aspect_ratios(len(maps)))
    elif preset == "ssdlite":
        spec = ssdlite_prior_spec(size, feature_map_sizes())
    else:
        try:
            spec = prior_preset(size, preset)
        except ValueError as error:
            raise ValueError(
                f"{error}. model.net.prior_preset_name={preset} names the paper's box sizes, which exist for "
                "those sizes only; model.net.prior_preset_name=null gives priors from the network's own "
                "feature maps at any size"
            ) from None
        if not exact_maps:
            spec = _on_maps(spec, feature_map_sizes(), preset)
    if spec.image_size != size:
        raise ValueError(f"prior spec is for {spec.image_size}px input but size={size}")
    for name, sizes in (("min_sizes", min_sizes), ("max_sizes", max_sizes)):
        if sizes is None:
            continue
        if len(sizes) != len(spec.feature_maps) or min(float(s) for s in sizes) <= 0:
            raise ValueError(
                f"model.net.{name} needs one positive size (input pixels) per feature map: the network has "
                f"{len(spec.feature_maps)} ({list(spec.feature_maps)}), got {list(sizes)}"
            )
        spec = replace(spec, **{name: tuple(float(s) for s in sizes)})
    return spec
