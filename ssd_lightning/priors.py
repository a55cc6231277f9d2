"""Default boxes (priors) of SSD: one set of anchors per feature-map cell, in (cx, cy, w, h) in [0, 1].

The ordering (feature maps in source order, cells row-major, then per cell: s_k, sqrt(s_k * s_k+1), then
each aspect ratio as a (wide, tall) pair) is the one the paper's released models use, which is what makes
ssd.pytorch and torchvision weights drop into our heads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorSpec:
    """Everything that defines a prior set; sizes are in input pixels, as in the paper's tables."""

    image_size: int
    feature_maps: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    # "all": clamp (cx, cy, w, h) to [0, 1] (ssd.pytorch); "size": clamp only w, h (torchvision); "none".
    clip: str = "all"

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool):  # accept the boolean of the reference configs
            object.__setattr__(self, "clip", "all" if self.clip else "none")
        if self.clip not in ("all", "size", "none"):
            raise ValueError(f"PriorSpec.clip must be 'all', 'size' or 'none', got {self.clip!r}")
        lengths = {
            len(self.feature_maps),
            len(self.steps),
            len(self.min_sizes),
            len(self.max_sizes),
            len(self.aspect_ratios),
        }
        if len(lengths) != 1:
            raise ValueError(
                "PriorSpec: feature_maps, steps, min_sizes, max_sizes and aspect_ratios must have one entry "
                f"per source layer, got lengths {sorted(lengths)}"
            )

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Priors per cell for each source: 2 square boxes plus a wide and a tall box per aspect ratio."""
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        return sum(f * f * a for f, a in zip(self.feature_maps, self.boxes_per_location, strict=True))

    @classmethod
    def from_scales(
        cls,
        image_size: int,
        feature_maps: Sequence[int],
        aspect_ratios: Sequence[Sequence[float]],
        min_scale: float = 0.1,
        max_scale: float = 0.95,
        clip: str = "all",
    ) -> PriorSpec:
        """The paper's linear scale rule (eq. 4) for a network whose feature-map sizes are known."""
        count = len(feature_maps)
        scales = [min_scale + (max_scale - min_scale) * k / count for k in range(count + 1)]
        sizes = [s * image_size for s in scales]
        return cls(
            image_size=image_size,
            feature_maps=tuple(int(f) for f in feature_maps),
            steps=tuple(image_size / f for f in feature_maps),
            min_sizes=tuple(sizes[:-1]),
            max_sizes=tuple(sizes[1:]),
            aspect_ratios=tuple(tuple(r) for r in aspect_ratios),
            clip=clip,
        )


_SSD300_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
_SSD512_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))

PRIOR_PRESETS: dict[str, PriorSpec] = {
    "ssd300_voc": PriorSpec(
        image_size=300,
        feature_maps=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=_SSD300_RATIOS,
    ),
    "ssd300_coco": PriorSpec(
        image_size=300,
        feature_maps=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(21, 45, 99, 153, 207, 261),
        max_sizes=(45, 99, 153, 207, 261, 315),
        aspect_ratios=_SSD300_RATIOS,
    ),
    "ssd512_voc": PriorSpec(
        image_size=512,
        feature_maps=(64, 32, 16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128, 256, 512),
        min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
        max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.65),
        aspect_ratios=_SSD512_RATIOS,
    ),
    "ssd512_coco": PriorSpec(
        image_size=512,
        feature_maps=(64, 32, 16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128, 256, 512),
        min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
        max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72),
        aspect_ratios=_SSD512_RATIOS,
    ),
}


# torchvision's ssd300_vgg16 uses the COCO sizes but clamps only the box sizes, not the centres.
PRIOR_PRESETS["ssd300_torchvision"] = replace(PRIOR_PRESETS["ssd300_coco"], clip="size")


def ssdlite_prior_spec(image_size: int, feature_maps: Sequence[int]) -> PriorSpec:
    """The default boxes of torchvision's SSDLite (`DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2,
    max_ratio=0.95)`) for a network whose feature-map sizes are known.

    Unlike the paper's rule (`PriorSpec.from_scales`), the scales run from 0.2 on the first map to 0.95 on
    the last one, and the last map's second square box uses 1.0 as the next scale; the cells tile the image
    exactly (step = image / map), and only widths/heights are clipped.
    """
    count = len(feature_maps)
    scales = [0.2 + (0.95 - 0.2) * k / (count - 1) for k in range(count)] + [1.0]
    sizes = [s * image_size for s in scales]
    return PriorSpec(
        image_size=image_size,
        feature_maps=tuple(int(f) for f in feature_maps),
        steps=tuple(image_size / f for f in feature_maps),
        min_sizes=tuple(sizes[:-1]),
        max_sizes=tuple(sizes[1:]),
        aspect_ratios=((2, 3),) * count,
        clip="size",
    )


# torchvision's ssdlite320_mobilenet_v3_large: 3,234 boxes.
PRIOR_PRESETS["ssd320_ssdlite"] = ssdlite_prior_spec(320, (20, 10, 5, 3, 2, 1))


def prior_preset(size: int, sizes: str = "voc") -> PriorSpec:
    """The paper's prior set for SSD300/SSD512 with "voc" or "coco" box sizes (or SSD300 "torchvision"),
    or torchvision's SSDLite boxes at 320 ("ssdlite")."""
    key = f"ssd{size}_{sizes}"
    if key not in PRIOR_PRESETS:
        raise ValueError(f"no prior preset {key!r}; available: {sorted(PRIOR_PRESETS)}")
    return PRIOR_PRESETS[key]


def _cell_shapes(spec: PriorSpec, k: int) -> Tensor:
    """(w, h) of the priors of one cell of source k, in the canonical order."""
    s_k = spec.min_sizes[k] / spec.image_size
    s_next = spec.max_sizes[k] / spec.image_size
    shapes = [(s_k, s_k), (math.sqrt(s_k * s_next),) * 2]
    for ratio in spec.aspect_ratios[k]:
        root = math.sqrt(ratio)
        shapes += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
    return torch.tensor(shapes, dtype=torch.float64)


def generate_priors(spec: PriorSpec) -> Tensor:
    """All priors of `spec` as a float32 Tensor[P, 4] of (cx, cy, w, h), optionally clipped to [0, 1]."""
    per_source = []
    for k, size in enumerate(spec.feature_maps):
        cells_per_side = spec.image_size / spec.steps[k]
        offsets = (torch.arange(size, dtype=torch.float64) + 0.5) / cells_per_side
        cy, cx = torch.meshgrid(offsets, offsets, indexing="ij")  # row-major: i (y) outer, j (x) inner
        centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # [F*F, 2]
        shapes = _cell_shapes(spec, k)  # [A, 2]
        boxes = torch.cat(
            [
                centres[:, None, :].expand(-1, len(shapes), -1),
                shapes[None, :, :].expand(len(centres), -1, -1),
            ],
            dim=2,
        )
        per_source.append(boxes.reshape(-1, 4))
    priors = torch.cat(per_source)
    if spec.clip == "all":
        priors = priors.clamp(0.0, 1.0)
    elif spec.clip == "size":
        priors = torch.cat([priors[:, :2], priors[:, 2:].clamp(0.0, 1.0)], dim=1)
    return priors.float()
