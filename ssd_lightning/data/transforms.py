"""The SSD augmentation recipe as albumentations pipelines.

Train: photometric distortion -> zoom-out (expand) -> IoU-constrained crop -> resize -> horizontal
flip -> normalise -> tensor. Eval: resize -> normalise -> tensor. Flipping after the resize is
equivalent to the paper's flip-then-resize and touches 4x fewer pixels.

Every step before the normalisation keeps the pixels uint8, so ``normalize=False`` returns them as a
uint8 tensor (4x less to copy to an accelerator) and :func:`normalize_images` gives, on any device,
exactly the numbers the normalising pipeline would have. The data module and the CLI use uint8;
:class:`~ssd_lightning.training.module.SSDLitModule` normalises uint8 batches on the device.

albumentations has neither the SSD zoom-out nor the SSD crop, so :class:`Expand` and :class:`IoUCrop`
are written here as albumentations transforms. The train pipeline uses :class:`ExpandIoUCropResize`,
which samples the geometry of both first and then computes the output pixels with a single affine
warp of the original image, so the up-to-4x canvas is never materialised.

Boxes enter and leave :class:`DetectionTransform` as xmin, ymin, xmax, ymax; in absolute pixels of
the original image on the way in, normalised to [0, 1] of the output image on the way out.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torchvision.ops import box_iou

from .base import Target

#: The SSD paper's crop choices: None keeps the whole image, 0.0 is an unconstrained patch, the rest
#: are the minimum IoU some kept object must have with the patch.
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the frame being cropped
Canvas = tuple[int, int, int, int]  # canvas height, canvas width, top, left of the image on it


def sample_expand(height: int, width: int, max_ratio: float, rng: np.random.Generator) -> Canvas:
    """A zoom-out canvas: side ratio uniform in [1, max_ratio], image at a uniform random position."""
    ratio = rng.uniform(1.0, max_ratio)
    canvas_h, canvas_w = int(height * ratio), int(width * ratio)
    top = int(rng.integers(0, canvas_h - height + 1))
    left = int(rng.integers(0, canvas_w - width + 1))
    return canvas_h, canvas_w, top, left


def boxes_into_window(bboxes: np.ndarray, frame: tuple[int, int], window: Window) -> np.ndarray:
    """Keep the boxes whose centre lies inside ``window``, clip them to it, renormalise to it.

    ``bboxes`` are albumentations rows (normalised xyxy of a ``frame`` = (height, width) image,
    then label columns, which stay with their box).
    """
    height, width = frame
    x0, y0, x1, y1 = window
    pixels = bboxes[:, :4] * np.array([width, height, width, height], np.float64)
    centre_x = (pixels[:, 0] + pixels[:, 2]) / 2
    centre_y = (pixels[:, 1] + pixels[:, 3]) / 2
    inside = (centre_x > x0) & (centre_x < x1) & (centre_y > y0) & (centre_y < y1)
    kept = bboxes[inside].copy()
    kept[:, [0, 2]] = (np.clip(pixels[inside][:, [0, 2]], x0, x1) - x0) / (x1 - x0)
    kept[:, [1, 3]] = (np.clip(pixels[inside][:, [1, 3]], y0, y1) - y0) / (y1 - y0)
    return kept


def _pixel_boxes(bboxes: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    height, width = frame
    return bboxes[:, :4] * np.array([width, height, width, height], np.float64)


class Expand(A.DualTransform):
    """SSD zoom-out: put the image on a canvas up to ``max_ratio`` times larger per side, filled with
    ``fill`` (the pixel mean, so the filled area normalises to zero).

    Args:
        max_ratio: largest canvas side / image side.
        fill: canvas colour, one value per channel on the image's scale.
        p: probability of expanding.
    """

    def __init__(
        self, max_ratio: float = 4.0, fill: Sequence[float] = (123.675, 116.28, 103.53), p: float = 0.5
    ):
        super().__init__(p=p)
        if max_ratio < 1:
            raise ValueError(f"Expand max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio = float(max_ratio)
        self.fill = tuple(float(v) for v in fill)

    def sample_canvas(self, height: int, width: int, rng: np.random.Generator) -> Canvas:
        """Draw a canvas for a ``height`` x ``width`` image: (canvas height, canvas width, top, left)."""
        return sample_expand(height, width, self.max_ratio, rng)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"canvas": self.sample_canvas(height, width, self.random_generator)}

    def apply(self, img: np.ndarray, canvas: Canvas, **params: Any) -> np.ndarray:
        canvas_h, canvas_w, top, left = canvas
        out = np.empty((canvas_h, canvas_w, *img.shape[2:]), img.dtype)
        fill = np.asarray(self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[0])
        out[...] = np.round(fill) if np.issubdtype(img.dtype, np.integer) else fill
        out[top : top + img.shape[0], left : left + img.shape[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: Canvas, **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        canvas_h, canvas_w, top, left = canvas
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / canvas_w
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / canvas_h
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class IoUCrop(A.DualTransform):
    """The SSD random crop, choosing as the original (Caffe) SSD does.

    Each numeric choice ``t`` in ``min_ious`` draws up to ``max_trials`` patches (each side a uniform
    fraction in ``scale`` of the image side, height/width ratio in ``aspect``) and keeps the first one
    where some object with its centre inside has IoU >= t with the patch (any patch when the image
    has no objects); 0.0 is an unconstrained patch. One result is then drawn uniformly among the
    choices that found a patch, None (the whole image) always being one. Objects whose centre falls
    outside the patch are removed, the rest clipped.
    """

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        scale: tuple[float, float] = (0.3, 1.0),
        aspect: tuple[float, float] = (0.5, 2.0),
        max_trials: int = 50,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if not min_ious:
            raise ValueError("IoUCrop needs at least one min_ious choice")
        self.min_ious = tuple(None if t is None else float(t) for t in min_ious)
        self.scale = (float(scale[0]), float(scale[1]))
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.max_trials = int(max_trials)

    def sample_window(
        self, boxes: np.ndarray, height: int, width: int, rng: np.random.Generator
    ) -> Window | None:
        """A crop window for an image of ``height`` x ``width`` with ``boxes`` [N,4] in pixels, or None.

        The trials of every choice are drawn at once and judged with one IoU matrix.
        """
        thresholds = np.array([t for t in self.min_ious if t is not None], np.float64)
        keep_whole = len(thresholds) < len(self.min_ious)
        if not len(thresholds):
            return None
        trials = self.max_trials * len(thresholds)
        crop_w = np.floor(rng.uniform(*self.scale, trials) * width)
        crop_h = np.floor(rng.uniform(*self.scale, trials) * height)
        x0 = np.floor(rng.uniform(0.0, 1.0, trials) * (width - crop_w + 1))
        y0 = np.floor(rng.uniform(0.0, 1.0, trials) * (height - crop_h + 1))
        windows = np.stack([x0, y0, x0 + crop_w, y0 + crop_h], axis=1)
        ratio = crop_h / np.maximum(crop_w, 1.0)
        valid = (crop_w >= 1) & (crop_h >= 1) & (ratio >= self.aspect[0]) & (ratio <= self.aspect[1])
        if len(boxes):
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = (
                (centres[None, :, 0] > windows[:, None, 0])
                & (centres[None, :, 0] < windows[:, None, 2])
                & (centres[None, :, 1] > windows[:, None, 1])
                & (centres[None, :, 1] < windows[:, None, 3])
            )
            ious = box_iou(torch.from_numpy(windows), torch.from_numpy(np.asarray(boxes, np.float64))).numpy()
            needed = np.repeat(thresholds, self.max_trials)[:, None]
            valid &= (inside & (ious >= needed)).any(axis=1)
        valid = valid.reshape(len(thresholds), self.max_trials)
        found = np.flatnonzero(valid.any(axis=1))  # choices that found a patch
        candidates = len(found) + int(keep_whole)
        if candidates == 0:
            return None
        pick = int(rng.integers(candidates))
        if pick == len(found):  # the whole image
            return None
        row = found[pick] * self.max_trials + int(np.argmax(valid[found[pick]]))
        x0_, y0_, x1_, y1_ = windows[row].astype(int)
        return int(x0_), int(y0_), int(x1_), int(y1_)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        frame = params["shape"][:2]
        boxes = _pixel_boxes(np.asarray(data.get("bboxes", np.zeros((0, 4)))), frame)
        return {"window": self.sample_window(boxes, frame[0], frame[1], self.random_generator)}

    def apply(self, img: np.ndarray, window: Window | None, **params: Any) -> np.ndarray:
        if window is None:
            return img
        x0, y0, x1, y1 = window
        return img[y0:y1, x0:x1]

    def apply_to_bboxes(self, bboxes: np.ndarray, window: Window | None, **params: Any) -> np.ndarray:
        return bboxes if window is None else boxes_into_window(bboxes, params["shape"][:2], window)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "scale", "aspect", "max_trials")


class ExpandIoUCropResize(A.DualTransform):
    """``Expand`` then ``IoUCrop`` then resize to ``height`` x ``width``, computed as one affine warp.

    Both geometries are sampled from box coordinates alone; then every output pixel is interpolated
    straight from the original image (or takes the fill colour where the zoom-out canvas would be), so
    the cost depends on the output size only. Same result as the three steps in sequence, up to
    interpolation rounding.
    """

    def __init__(
        self,
        height: int,
        width: int,
        expand: Expand,
        crop: IoUCrop,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.expand, self.crop = expand, crop
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        canvas: Canvas = (height, width, 0, 0)
        if self.py_random.random() < self.expand.p:
            canvas = self.expand.sample_canvas(height, width, self.random_generator)
        canvas_h, canvas_w, top, left = canvas
        boxes = _pixel_boxes(np.asarray(data.get("bboxes", np.zeros((0, 4)))), (height, width))
        boxes += np.array([left, top, left, top], np.float64)
        window = None
        if self.py_random.random() < self.crop.p:
            window = self.crop.sample_window(boxes, canvas_h, canvas_w, self.random_generator)
        return {"canvas": canvas, "window": window or (0, 0, canvas_w, canvas_h)}

    def apply(self, img: np.ndarray, canvas: Canvas, window: Window, **params: Any) -> np.ndarray:
        _, _, top, left = canvas
        x0, y0, x1, y1 = window
        scale_x, scale_y = self.width / (x1 - x0), self.height / (y1 - y0)
        # source pixel centre u + 0.5 lands at (u + 0.5 + left - x0) * scale in the output
        matrix = np.array(
            [
                [scale_x, 0.0, (left - x0 + 0.5) * scale_x - 0.5],
                [0.0, scale_y, (top - y0 + 0.5) * scale_y - 0.5],
            ]
        )
        return cv2.warpAffine(
            img,
            matrix,
            (self.width, self.height),
            flags=self.interpolation,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.expand.fill,
        )

    def apply_to_bboxes(
        self, bboxes: np.ndarray, canvas: Canvas, window: Window, **params: Any
    ) -> np.ndarray:
        on_canvas = self.expand.apply_to_bboxes(bboxes, canvas, **params)
        return boxes_into_window(on_canvas, canvas[:2], window)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "expand", "crop", "interpolation")


def photometric_distortion() -> A.Sequential:
    """The SSD photometric distortion, each step with probability 0.5: brightness (+-32), then
    contrast (x0.5..1.5) either before or after saturation (x0.5..1.5) and hue (+-18 degrees),
    then a random channel permutation."""
    brightness = A.RandomBrightnessContrast(
        brightness_limit=(-32 / 255, 32 / 255), contrast_limit=(0, 0), p=0.5
    )
    contrast = A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.5, 0.5), p=0.5)
    saturation = A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(0.5, 1.5), hue=(0, 0), p=0.5)
    hue = A.ColorJitter(
        brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(-18 / 360, 18 / 360), p=0.5
    )
    contrast_first = A.Sequential([contrast, saturation, hue], p=1.0)
    contrast_last = A.Sequential([saturation, hue, contrast], p=1.0)
    return A.Sequential(
        [brightness, A.OneOf([contrast_first, contrast_last], p=1.0), A.ChannelShuffle(p=0.5)], p=1.0
    )


class DetectionTransform:
    """``(image, target) -> (tensor [3,S,S], target)`` around an albumentations pipeline.

    The image is RGB uint8 HxWx3 and ``target["boxes"]`` xyxy pixels; the output target holds torch
    tensors: ``boxes`` float32 [N,4] in [0,1] of the output image with positive area, ``labels``
    int64 and ``difficult`` bool aligned with them, ``image_id`` and ``orig_size`` passed through.

    In a process other than the one that built or last reseeded it (a DataLoader worker), the first
    call reseeds the pipeline from :meth:`reseed`'s seed and ``torch.initial_seed()``, which differs per
    worker and, with non-persistent workers, per epoch: workers never repeat each other or an earlier
    epoch, whatever wraps the dataset (``Subset``, ``ConcatDataset``...), and a seeded run is
    reproducible.
    """

    def __init__(self, steps: Sequence[A.BasicTransform | A.BaseCompose]):
        self.pipeline = A.Compose(
            list(steps),
            # boxes are re-clipped and filtered after every geometric step, so any albumentations
            # transform can be mixed in
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True),
        )
        self._seed: int | None = None
        self._pid = os.getpid()
        self._streams: tuple[np.random.Generator, random.Random] | None = None

    def reseed(self, seed: int) -> None:
        """Give the whole pipeline one random stream seeded with ``seed`` (e.g. per split and rank); a
        DataLoader worker derives its own stream from it (see the class docstring).

        One shared stream: albumentations' own ``set_random_seed`` gives every step the same seed.
        """
        self._seed, self._pid = int(seed), os.getpid()
        self._set_stream(self._seed)

    def _set_stream(self, seed: int) -> None:
        self._streams = (np.random.default_rng(seed), random.Random(seed))
        self.pipeline.set_random_state(*self._streams)

    def random_state(self) -> dict[str, Any]:
        """Where this process's random stream stands (plain types: a checkpoint keeps it); None before any
        `reseed`."""
        if self._streams is None:
            return {}
        numpy, python = self._streams
        return {"numpy": numpy.bit_generator.state, "python": python.getstate()}

    def set_random_state(self, state: dict[str, Any]) -> None:
        """Continue the stream where `random_state` left it (a resumed run draws what it would have drawn)."""
        if not state or self._streams is None:
            return
        numpy, python = self._streams
        numpy.bit_generator.state = state["numpy"]
        version, internal, gauss = state["python"]
        python.setstate((version, tuple(internal), gauss))

    def __call__(self, image: np.ndarray, target: Target) -> tuple[torch.Tensor, Target]:
        # First call in a new (worker) process: its copy of the stream is the parent's, the same in every
        # worker and, with non-persistent workers, in every epoch.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            entropy = [torch.initial_seed()] + ([] if self._seed is None else [self._seed % 2**63])
            self._set_stream(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        out = self.pipeline(
            image=image,
            bboxes=np.asarray(target["boxes"], np.float32).reshape(-1, 4),
            labels=np.asarray(target["labels"], np.int64),
            difficult=np.asarray(target["difficult"], bool),
        )
        tensor = out["image"]
        height, width = tensor.shape[-2:]
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4) / np.array(
            [width, height, width, height], np.float32
        )
        boxes = boxes.clip(0.0, 1.0)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return tensor, {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(np.asarray(out["labels"], np.int64).reshape(-1)[keep]),
            "difficult": torch.from_numpy(np.asarray(out["difficult"], bool).reshape(-1)[keep]),
            "image_id": target["image_id"],
            "orig_size": torch.as_tensor(target["orig_size"], dtype=torch.int64),
        }


def to_tensor_steps(
    mean: Sequence[float], std: Sequence[float], normalize: bool = False
) -> list[A.BasicTransform]:
    """The last steps of a transform: the image as a [3,S,S] tensor, uint8 (what the DataModule's batches
    hold: the model normalises them on its device) or, `normalize=True`, float32 `(pixel - mean) / std`."""
    if not normalize:
        return [ToTensorV2()]  # keeps the dtype: uint8 [3,S,S]
    # mean/std are on the 0-255 scale, hence max_pixel_value=1
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0), ToTensorV2()]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB images [..., 3, H, W] -> float32 ``(pixel - mean) / std`` on their device (mean/std on
    the 0-255 scale), bit for bit what the ``normalize=True`` transforms give.

    Computed as albumentations does: ``(pixel - mean) * (1 / std)`` with the reciprocal in float32.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 pixels, got {images.dtype}")
    mean_t, inv_std_t = _normalization_constants(
        tuple(float(v) for v in mean), tuple(float(v) for v in std), images.device
    )
    return (images.float() - mean_t) * inv_std_t


@functools.lru_cache(maxsize=16)
def _normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: copied to an accelerator once, not in every training step.
    mean_t = torch.from_numpy(np.asarray(mean, np.float32).reshape(3, 1, 1)).to(device)
    inv_std_t = torch.from_numpy(np.reciprocal(np.asarray(std, np.float32)).reshape(3, 1, 1)).to(device)
    return mean_t, inv_std_t


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    photometric: bool = True,
    expand_p: float = 0.5,
    max_expand_ratio: float = 4.0,
    crop_min_ious: Sequence[float | None] = SSD_MIN_IOUS,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    crop_aspect: tuple[float, float] = (0.5, 2.0),
    crop_max_trials: int = 50,
    hflip_p: float = 0.5,
    normalize: bool = True,
) -> DetectionTransform:
    """The SSD training augmentation for ``image_size`` square outputs; mean/std on the 0-255 scale.

    ``normalize=True`` returns float32 ``(pixel - mean) / std`` images, what ``SSD.forward`` takes;
    ``False`` returns the uint8 pixels, for :func:`normalize_images` on the device (what the data
    module does). ``mean`` also fills the zoom-out canvas either way.
    """
    steps: list[Any] = [photometric_distortion()] if photometric else []
    steps += [
        ExpandIoUCropResize(
            image_size,
            image_size,
            expand=Expand(max_ratio=max_expand_ratio, fill=mean, p=expand_p),
            crop=IoUCrop(
                min_ious=crop_min_ious, scale=crop_scale, aspect=crop_aspect, max_trials=crop_max_trials
            ),
        ),
        A.HorizontalFlip(p=hflip_p),
        *to_tensor_steps(mean, std, normalize),
    ]
    return DetectionTransform(steps)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], *, normalize: bool = True
) -> DetectionTransform:
    """Resize to ``image_size`` square, normalise, to tensor; boxes are only rescaled, never dropped.

    ``normalize=False`` returns uint8 pixels instead (see :func:`build_train_transform`).
    """
    resize = A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR)
    return DetectionTransform([resize, *to_tensor_steps(mean, std, normalize)])
