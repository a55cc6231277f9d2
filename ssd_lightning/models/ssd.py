"""The SSD detector: backbone -> neck -> one head per source, plus its priors and post-processing."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.boxes import DEFAULT_VARIANCES, Variances
from ssd_lightning.models.compact import CompactBackbone, compact_extras
from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.mobilenet import MobileNetV3Backbone
from ssd_lightning.models.neck import EXTRAS_RESNET50, EXTRAS_SSD300, EXTRAS_SSD512, SSDNeck
from ssd_lightning.models.resnet import ResNet50Backbone
from ssd_lightning.models.ssdlite import SSDLiteHead, SSDLiteNeck
from ssd_lightning.models.vgg import VGG16Backbone
from ssd_lightning.postprocess import DetectionConfig, detect
from ssd_lightning.priors import PriorSpec, generate_priors, prior_preset, ssdlite_prior_spec

_COMPACT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
ARCHS = ("vgg16", "compact", "mobilenet_v3_large", "resnet50")
# The prior sizes each arch's published model was trained with.
_DEFAULT_PRIORS = {"vgg16": "voc", "resnet50": "coco", "mobilenet_v3_large": "ssdlite"}

# (in_channels, boxes_per_location, num_classes) -> the head of one source.
HeadFactory = Callable[[int, int, int], nn.Module]


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
    suggests for a dataset).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    detection = DetectionConfig(score_threshold, nms_iou_threshold, top_k, pre_nms_top_k)
    backbone, neck, head = _network_parts(arch, size, width, reduced_tail)
    spec = _prior_spec(
        arch,
        size,
        prior_preset_name,
        prior_spec,
        min_sizes,
        max_sizes,
        lambda: _feature_map_sizes(backbone, neck, size),
    )
    return SSD(backbone, neck, spec, num_classes, detection, (float(variances[0]), float(variances[1])), head)


def ssd_prior_spec(**build_ssd_arguments: Any) -> PriorSpec:
    """The priors `build_ssd(**build_ssd_arguments)` would give its network (e.g. `**cfg.model.net`).

    The presets need no network; the compact model's and SSDLite's boxes follow the network's feature-map
    sizes, measured on its backbone and neck alone (no heads, no weights loaded).
    """
    arguments = inspect.signature(build_ssd).bind(**build_ssd_arguments)  # unknown names: TypeError
    arguments.apply_defaults()
    a = arguments.arguments
    _check_arch(a["arch"], a["size"])

    def measured() -> tuple[int, ...]:
        backbone, neck, _ = _network_parts(a["arch"], a["size"], a["width"], a["reduced_tail"])
        return _feature_map_sizes(backbone, neck, a["size"])

    return _prior_spec(
        a["arch"],
        a["size"],
        a["prior_preset_name"],
        a["prior_spec"],
        a["min_sizes"],
        a["max_sizes"],
        measured,
    )


def _check_arch(arch: str, size: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if arch == "vgg16" and size not in (300, 512):
        raise ValueError(f"VGG16 SSD comes in sizes 300 and 512, got {size}")
    if arch == "resnet50" and size != 300:
        raise ValueError(f"the ResNet-50 SSD is NVIDIA's SSD300: size must be 300, got {size}")


def _network_parts(
    arch: str, size: int, width: int, reduced_tail: bool
) -> tuple[nn.Module, nn.Module, HeadFactory]:
    """Backbone, neck and head factory of `arch`."""
    _check_arch(arch, size)
    if arch == "vgg16":
        backbone = VGG16Backbone()
        return (
            backbone,
            SSDNeck(backbone.out_channels, EXTRAS_SSD300 if size == 300 else EXTRAS_SSD512),
            SSDHead,
        )
    if arch == "compact":
        backbone = CompactBackbone(width)
        return backbone, SSDNeck(backbone.out_channels, compact_extras(width), l2norm_first=False), SSDHead
    if arch == "mobilenet_v3_large":
        backbone = MobileNetV3Backbone(reduced_tail=reduced_tail)
        return backbone, SSDLiteNeck(backbone.out_channels), SSDLiteHead
    backbone = ResNet50Backbone()
    neck = SSDNeck(backbone.out_channels, EXTRAS_RESNET50, l2norm_first=False, batch_norm=True)
    return backbone, neck, SSDHead


def _prior_spec(
    arch: str,
    size: int,
    prior_preset_name: str | None,
    prior_spec: PriorSpec | None,
    min_sizes: Sequence[float] | None,
    max_sizes: Sequence[float] | None,
    feature_map_sizes: Callable[[], tuple[int, ...]],
) -> PriorSpec:
    """The priors of `arch` at `size`; `feature_map_sizes` is called only for the archs whose boxes follow
    the network (compact, SSDLite)."""
    preset = prior_preset_name or _DEFAULT_PRIORS.get(arch, "voc")
    if prior_spec is not None:
        spec = prior_spec
    elif arch == "compact":
        spec = PriorSpec.from_scales(size, feature_map_sizes(), _COMPACT_RATIOS)
    elif arch == "mobilenet_v3_large" and preset == "ssdlite":
        spec = ssdlite_prior_spec(size, feature_map_sizes())
    else:
        spec = prior_preset(size, preset)
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
