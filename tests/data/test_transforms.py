"""The SSD augmentation: invariants (hypothesis), the hand-written geometry, and the eval path."""

from __future__ import annotations

import functools
import itertools

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import IN_CI

from ssd_lightning.data.transforms import (
    SSD_MIN_IOUS,
    DetectionTransform,
    Expand,
    ExpandIoUCropResize,
    IoUCrop,
    boxes_into_window,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    photometric_distortion,
)

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIZE = 64


@st.composite
def scenes(draw: st.DrawFn) -> tuple[np.ndarray, dict, int]:
    """A random image with 0-6 valid boxes; label k+1 and difficult (k odd) identify box k."""
    width, height = draw(st.integers(8, 120)), draw(st.integers(8, 120))
    boxes = []
    for _ in range(draw(st.integers(0, 6))):
        x0 = draw(st.floats(0, width - 1))
        y0 = draw(st.floats(0, height - 1))
        x1 = min(width, x0 + draw(st.floats(0.5, width)))
        y1 = min(height, y0 + draw(st.floats(0.5, height)))
        boxes.append([x0, y0, x1, y1])
    count = len(boxes)
    seed = draw(st.integers(0, 2**32 - 1))
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    target = {
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.arange(1, count + 1, dtype=np.int64),
        "difficult": np.arange(count) % 2 == 1,
        "image_id": 3,
        "orig_size": np.array([height, width]),
    }
    return image, target, seed


def _check_target(target: dict, count_in: int) -> None:
    boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and difficult.dtype == torch.bool
    assert boxes.shape == (len(labels), 4) and difficult.shape == labels.shape
    assert bool((boxes >= 0).all() and (boxes <= 1).all()), "boxes stay inside the image"
    assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()), "positive area"
    assert len(set(labels.tolist())) == len(labels) and all(1 <= v <= count_in for v in labels.tolist())
    assert difficult.tolist() == [(v - 1) % 2 == 1 for v in labels.tolist()], "flags stay with their box"


@settings(max_examples=60, deadline=None, database=None)
@given(scenes())
def test_train_transform_invariants(scene) -> None:
    image, target, seed = scene
    transform = build_train_transform(SIZE, MEAN, STD)
    transform.reseed(seed)
    tensor, out = transform(image, target)
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    _check_target(out, len(target["labels"]))
    assert out["image_id"] == 3 and out["orig_size"].tolist() == target["orig_size"].tolist()


@settings(max_examples=40, deadline=None, database=None)
@given(scenes())
def test_fused_geometry_equals_expand_then_crop_then_resize(scene) -> None:
    image, target, seed = scene
    image = cv2.GaussianBlur(image, (0, 0), 3)  # smooth, so differences measure geometry, not rounding
    expand, crop = Expand(fill=MEAN, p=1.0), IoUCrop()
    fused = ExpandIoUCropResize(SIZE, SIZE, expand, crop)
    fused.set_random_seed(seed)
    shape = image.shape
    height, width = shape[:2]
    rows = np.concatenate(
        [target["boxes"] / [width, height, width, height], target["labels"][:, None]], axis=1
    ).astype(np.float64)
    params = fused.get_params_dependent_on_data({"shape": shape}, {"bboxes": rows})
    canvas, window = params["canvas"], params["window"]

    # The three steps written out here, not with the library's Expand/IoUCrop/boxes_into_window.
    canvas_h, canvas_w, top, left = canvas
    x0, y0, x1, y1 = window
    assert 0 <= top <= canvas_h - height and 0 <= left <= canvas_w - width
    assert 0 <= x0 < x1 <= canvas_w and 0 <= y0 < y1 <= canvas_h
    expanded = np.empty((canvas_h, canvas_w, 3), np.uint8)
    expanded[...] = np.round(MEAN)
    expanded[top : top + height, left : left + width] = image
    reference = cv2.resize(expanded[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    fast = fused.apply(image, **params)
    assert fast.shape == reference.shape and fast.dtype == np.uint8
    # same pixels up to interpolation rounding (OpenCV's warp works in 1/32 pixel steps)
    assert np.abs(fast.astype(int) - reference.astype(int)).mean() < 1.5

    kept, expected = crop_boxes(target["boxes"] + [left, top, left, top], window)
    out_rows = fused.apply_to_bboxes(rows, **params, shape=shape)
    assert out_rows[:, 4].tolist() == target["labels"][kept].tolist()  # centre rule, labels follow
    np.testing.assert_allclose(out_rows[:, :4], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("canvas", "window"),
    [
        ((40, 40, 0, 0), (10, 10, 26, 26)),
        ((80, 80, 20, 30), (25, 15, 57, 47)),
        ((60, 90, 5, 40), (0, 0, 90, 60)),
    ],
)
def test_fused_warp_is_pixel_exact_on_a_ramp(canvas, window) -> None:
    # bilinear interpolation reproduces a linear ramp exactly, so any offset error shows
    ys, xs = np.mgrid[0:40, 0:40]
    image = np.stack([5 * xs, 5 * ys, 2 * (xs + ys)], axis=-1).astype(np.uint8)
    expand, crop = Expand(fill=MEAN), IoUCrop()
    fused = ExpandIoUCropResize(SIZE, SIZE, expand, crop)
    x0, y0, x1, y1 = window
    reference = cv2.resize(
        expand.apply(image, canvas)[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR
    )
    difference = np.abs(fused.apply(image, canvas=canvas, window=window).astype(int) - reference)
    assert difference.mean() < 0.3 and np.percentile(difference, 99) <= 2


# Each threshold gets its own examples: drawn from a list, most examples took its first (0.0), which any
# window meets.
@pytest.mark.parametrize("min_iou", [0.1, 0.3, 0.5, 0.7, 0.9])
@settings(max_examples=20, deadline=None, database=None)
@given(scene=scenes())
def test_iou_crop_window_obeys_the_ssd_constraints(scene, min_iou: float) -> None:
    image, target, seed = scene
    height, width = image.shape[:2]
    crop = IoUCrop(min_ious=[min_iou])
    window = crop.sample_window(
        target["boxes"].astype(np.float64), height, width, np.random.default_rng(seed)
    )
    if window is None:  # 50 trials failed: the image stays whole
        return
    x0, y0, x1, y1 = window
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert x1 - x0 >= np.floor(0.3 * width) and y1 - y0 >= np.floor(0.3 * height)
    assert 0.5 <= (y1 - y0) / (x1 - x0) <= 2.0
    boxes = target["boxes"]
    if len(boxes):
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        inter_w = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
        inter_h = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
        inter = inter_w * inter_h
        union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (x1 - x0) * (y1 - y0) - inter
        assert (inside & (inter / union >= min_iou - 1e-6)).any()


# The SSD crop rule, stated here in numpy (the paper, section 2.2, as ssd.pytorch and Caffe implement it):
# a trial patch has each side a uniform 0.3..1 fraction of the image side and height/width in [0.5, 2];
# it is accepted for min IoU t when some object whose centre lies inside it overlaps it with IoU >= t.
# Each numeric mode keeps its first accepted patch out of 50 trials; the result is drawn uniformly among
# the modes that found one and "the whole image", which is always a choice.
CROP_SCENE = np.array(  # xyxy pixels of a 200x150 image; centres are never on a whole pixel
    [
        [20.25, 30.25, 90.75, 120.75],
        [110.5, 10.5, 190.25, 60.25],
        [60.25, 70.5, 170.75, 145.25],
        [15.25, 12.5, 185.75, 139.25],
    ]
)
CROP_HEIGHT, CROP_WIDTH = 150, 200


def centres_inside(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """[W, N]: is the centre of box n strictly inside window w."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = (windows[:, k, None] for k in range(4))
    return (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)


def overlaps(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """[W, N]: IoU of window w and box n."""
    width = np.minimum(windows[:, None, 2], boxes[:, 2]) - np.maximum(windows[:, None, 0], boxes[:, 0])
    height = np.minimum(windows[:, None, 3], boxes[:, 3]) - np.maximum(windows[:, None, 1], boxes[:, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    window_area = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (window_area[:, None] + box_area - inter)


def accepted(boxes: np.ndarray, windows: np.ndarray, min_iou: float) -> np.ndarray:
    """[W]: does patch w meet the rule for min IoU `min_iou` (any patch of an image without objects)."""
    ratio = (windows[:, 3] - windows[:, 1]) / (windows[:, 2] - windows[:, 0])
    good = (centres_inside(boxes, windows) & (overlaps(boxes, windows) >= min_iou)).any(axis=1)
    return (ratio >= 0.5) & (ratio <= 2.0) & (good if len(boxes) else True)


@functools.lru_cache
def chance_a_mode_finds_a_patch(min_iou: float, with_objects: bool = True) -> float:
    """P(one of 50 trials is accepted) on CROP_SCENE (or the same image without objects), the trial
    acceptance rate estimated by simulating the rule."""
    rng = np.random.default_rng(0)
    sides = rng.uniform(0.3, 1.0, (50_000, 2)) * [CROP_WIDTH, CROP_HEIGHT]
    corners = rng.uniform(0.0, 1.0, (50_000, 2)) * ([CROP_WIDTH, CROP_HEIGHT] - sides)
    boxes = CROP_SCENE if with_objects else np.zeros((0, 4))
    rate = accepted(boxes, np.concatenate([corners, corners + sides], axis=1), min_iou).mean()
    return float(1 - (1 - rate) ** 50)


def chance_of_the_whole_image(found: list[float]) -> float:
    """P(the whole image is drawn) when numeric mode k finds a patch with probability found[k]."""
    total = 0.0
    for outcome in itertools.product([False, True], repeat=len(found)):
        chance = np.prod([f if hit else 1 - f for f, hit in zip(found, outcome, strict=True)])
        total += chance / (1 + sum(outcome))
    return total


def crop_boxes(boxes: np.ndarray, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The boxes kept by a crop to `window` (centre inside) and their xyxy in [0, 1] of the window."""
    x0, y0, x1, y1 = window
    kept = centres_inside(boxes, np.array([window], np.float64))[0]
    clipped = np.clip(boxes[kept], [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
    return kept, clipped / [x1 - x0, y1 - y0, x1 - x0, y1 - y0]


@pytest.mark.parametrize("min_iou", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_each_crop_mode_samples_windows_by_the_ssd_rule(min_iou: float) -> None:
    crop = IoUCrop(min_ious=[min_iou])
    rng = np.random.default_rng(int(min_iou * 10))
    draws = [crop.sample_window(CROP_SCENE, CROP_HEIGHT, CROP_WIDTH, rng) for _ in range(400)]
    windows = np.array([w for w in draws if w is not None], np.float64).reshape(-1, 4)
    # A mode crops as often as the rule says it finds a patch (0.2 for 0.9 here, 1 for the others) ...
    found = chance_a_mode_finds_a_patch(min_iou)
    assert len(windows) / len(draws) == pytest.approx(found, abs=0.06)
    # ... and every window it returns meets the rule: inside the image, sides >= 0.3 of the image's,
    # aspect in [0.5, 2], some object with its centre inside at IoU >= min_iou.
    assert (windows[:, :2] >= 0).all() and (windows[:, 2:] <= [CROP_WIDTH, CROP_HEIGHT]).all()
    sides = windows[:, 2:] - windows[:, :2]
    assert (sides >= np.floor(0.3 * np.array([CROP_WIDTH, CROP_HEIGHT]))).all()
    assert accepted(CROP_SCENE, windows, min_iou).all()


def _default_train_geometry() -> tuple[DetectionTransform, ExpandIoUCropResize]:
    """The training transform with the default crop modes (None, 0.0 .. 0.9) and no other augmentation."""
    transform = build_train_transform(
        SIZE, MEAN, STD, photometric=False, expand_p=0.0, hflip_p=0.0, normalize=False
    )
    transform.reseed(0)
    return transform, transform.pipeline.transforms[0]


@pytest.mark.parametrize("with_objects", [True, False])
def test_default_crop_modes_keep_the_whole_image_as_often_as_the_rule_says(with_objects: bool) -> None:
    _, geometry = _default_train_geometry()
    boxes = CROP_SCENE if with_objects else np.zeros((0, 4))
    rng = np.random.default_rng(1)
    draws = 1000
    whole = sum(
        geometry.crop.sample_window(boxes, CROP_HEIGHT, CROP_WIDTH, rng) is None for _ in range(draws)
    )
    # Without objects every mode finds a patch: the whole image 1 time in 7. With these objects the 0.9
    # mode finds one only 1 time in 5, and the whole image is then 1 choice in 6.
    found = [chance_a_mode_finds_a_patch(t, with_objects) for t in SSD_MIN_IOUS[1:]]
    expected = chance_of_the_whole_image(found)
    assert expected == (pytest.approx(0.162, abs=0.005) if with_objects else pytest.approx(1 / 7))
    assert whole / draws == pytest.approx(expected, abs=0.035)


def test_train_transform_crops_by_the_ssd_rule() -> None:
    # Pixels that hold their own coordinates (red = x, green = y), so a wrong crop shows.
    ys, xs = np.mgrid[0:CROP_HEIGHT, 0:CROP_WIDTH]
    image = np.stack([xs, ys, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    target = {
        "boxes": CROP_SCENE.astype(np.float32),
        "labels": np.arange(1, len(CROP_SCENE) + 1),
        "difficult": np.zeros(len(CROP_SCENE), bool),
        "image_id": 0,
        "orig_size": [CROP_HEIGHT, CROP_WIDTH],
    }
    transform, geometry = _default_train_geometry()
    crops = 0
    for _ in range(120):
        tensor, out = transform(image, target)
        window = geometry.params["window"]  # what the step says it did ...
        x0, y0, x1, y1 = window
        crops += window != (0, 0, CROP_WIDTH, CROP_HEIGHT)
        # ... is what the pixels show: the window's pixels resized to the output
        expected = cv2.resize(image[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        assert np.abs(tensor.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 0.5, window
        # the objects whose centre is inside stay (clipped, renormalised), the others go
        kept, boxes = crop_boxes(CROP_SCENE, window)
        assert out["labels"].tolist() == target["labels"][kept].tolist(), window
        np.testing.assert_allclose(out["boxes"].numpy(), boxes, atol=1e-5)
        assert accepted(CROP_SCENE, np.array([window], np.float64), 0.0).all()  # any mode's rule
    assert 90 < crops < 110  # 1 - 0.162 of the draws crop


def test_iou_crop_none_choice_keeps_the_image_and_trials_can_fail() -> None:
    boxes = np.array([[0.0, 0.0, 100.0, 100.0]])
    rng = np.random.default_rng(0)
    assert IoUCrop(min_ious=[None]).sample_window(boxes, 100, 100, rng) is None
    # a patch of at most half the side cannot reach IoU 0.9 with a box covering the whole image
    assert IoUCrop(min_ious=[0.9], scale=(0.3, 0.5)).sample_window(boxes, 100, 100, rng) is None


def test_expand_places_the_image_on_a_mean_filled_canvas() -> None:
    image = np.full((10, 20, 3), 7, np.uint8)
    expand = Expand(max_ratio=3.0, fill=(100.4, 50.6, 0.0), p=1.0)
    canvas_h, canvas_w, top, left = canvas = expand.sample_canvas(10, 20, np.random.default_rng(1))
    assert 10 <= canvas_h <= 30 and 20 <= canvas_w <= 60
    out = expand.apply(image, canvas)
    assert out.shape == (canvas_h, canvas_w, 3)
    assert (out[top : top + 10, left : left + 20] == 7).all()
    mask = np.ones((canvas_h, canvas_w), bool)
    mask[top : top + 10, left : left + 20] = False
    assert (out[mask] == [100, 51, 0]).all()
    rows = np.array([[0.0, 0.0, 1.0, 1.0, 5.0]])
    moved = expand.apply_to_bboxes(rows, canvas, shape=image.shape)
    np.testing.assert_allclose(
        moved[0], [left / canvas_w, top / canvas_h, (left + 20) / canvas_w, (top + 10) / canvas_h, 5]
    )


def test_boxes_into_window_keeps_centres_inside_and_their_labels() -> None:
    rows = np.array([[0.0, 0.0, 0.2, 0.2, 1.0], [0.4, 0.4, 0.9, 0.6, 2.0], [0.5, 0.0, 1.0, 0.3, 3.0]])
    kept = boxes_into_window(rows, (100, 100), (30, 30, 80, 80))
    assert kept[:, 4].tolist() == [2.0]
    np.testing.assert_allclose(kept[0, :4], [(40 - 30) / 50, (40 - 30) / 50, 1.0, (60 - 30) / 50])
    assert boxes_into_window(rows, (100, 100), (60, 60, 99, 99)).shape == (0, 5)


def test_image_without_boxes_and_image_losing_all_boxes_are_valid_samples() -> None:
    image = np.zeros((40, 50, 3), np.uint8)
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "difficult": np.zeros(0, bool),
    }
    tensor, out = build_train_transform(SIZE, MEAN, STD)(
        image, {**empty, "image_id": 1, "orig_size": [40, 50]}
    )
    assert tensor.shape == (3, SIZE, SIZE)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["difficult"].shape == (0,)

    # a crop that leaves every box out
    losing = DetectionTransform(
        [A.Crop(0, 0, 10, 10), A.Resize(SIZE, SIZE), A.Normalize(MEAN, STD, 1.0), ToTensorV2()]
    )
    target = {
        "boxes": np.array([[30, 20, 45, 35]], np.float32),
        "labels": np.array([4]),
        "difficult": np.array([False]),
        "image_id": 1,
        "orig_size": [40, 50],
    }
    tensor, out = losing(image, target)
    assert (
        tensor.shape == (3, SIZE, SIZE)
        and out["boxes"].shape == (0, 4)
        and out["labels"].dtype == torch.int64
    )


def test_eval_transform_only_rescales_and_normalises() -> None:
    image = np.empty((30, 60, 3), np.uint8)
    image[...] = (200, 100, 50)
    target = {
        "boxes": np.array([[0, 0, 60, 30], [10, 5, 10.3, 5.2]], np.float32),  # a sub-pixel box too
        "labels": np.array([1, 2]),
        "difficult": np.array([False, True]),
        "image_id": 4,
        "orig_size": [30, 60],
    }
    tensor, out = build_eval_transform(32, MEAN, STD)(image, target)
    np.testing.assert_allclose(out["boxes"].numpy(), target["boxes"] / [60, 30, 60, 30], rtol=1e-5)
    assert out["labels"].tolist() == [1, 2] and out["difficult"].tolist() == [False, True]
    expected = (np.array([200, 100, 50]) - MEAN) / STD
    np.testing.assert_allclose(tensor[:, 5, 5].numpy(), expected, rtol=1e-5)


def test_reseed_makes_the_pipeline_reproducible_and_seeds_differ() -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    target = {
        "boxes": np.array([[5, 5, 40, 30]], np.float32),
        "labels": np.array([1]),
        "difficult": np.array([False]),
        "image_id": 0,
        "orig_size": [50, 70],
    }

    def run(seed: int) -> list[torch.Tensor]:
        transform = build_train_transform(SIZE, MEAN, STD)
        transform.reseed(seed)
        return [transform(image, target)[0] for _ in range(4)]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_reseed_gives_the_steps_independent_streams() -> None:
    # albumentations' own set_random_seed hands every step the same seed, which locks e.g. the flip
    # decision to the expand decision; reseed must give them one shared stream instead
    transform = build_train_transform(SIZE, MEAN, STD, photometric=False, crop_min_ious=[None])
    transform.reseed(3)
    geometry, flip = transform.pipeline.transforms[:2]
    image = np.zeros((20, 20, 3), np.uint8)
    empty = {"boxes": np.zeros((0, 4)), "labels": [], "difficult": [], "image_id": 0, "orig_size": [20, 20]}
    decisions = set()
    for _ in range(40):
        transform(image, empty)
        decisions.add((geometry.params["canvas"][:2] != (20, 20), bool(flip.params)))
    assert decisions == {(False, False), (False, True), (True, False), (True, True)}


def test_photometric_distortion_follows_the_paper_order() -> None:
    sequence = photometric_distortion()
    assert sequence.p == 1.0  # the steps draw their own probabilities
    brightness, either, channel_swap = sequence.transforms
    assert isinstance(brightness, A.RandomBrightnessContrast) and brightness.p == 0.5
    assert brightness.brightness_limit == pytest.approx(
        (-32 / 255, 32 / 255)
    ) and brightness.contrast_limit == (0, 0)
    assert isinstance(either, A.OneOf)
    contrast_first, contrast_last = (branch.transforms for branch in either.transforms)
    assert isinstance(contrast_first[0], A.RandomBrightnessContrast) and contrast_first[0].contrast_limit == (
        -0.5,
        0.5,
    )
    assert contrast_last[2] is contrast_first[0]
    assert all(step.p == 0.5 for step in contrast_first)
    assert isinstance(channel_swap, A.ChannelShuffle) and channel_swap.p == 0.5


def test_uint8_output_normalised_by_normalize_images_is_the_float_output() -> None:
    # Every byte value in every channel, at the output size so the resize keeps them as they are.
    values = np.arange(256, dtype=np.uint8)
    image = np.stack(
        [values.reshape(16, 16), values[::-1].reshape(16, 16), np.roll(values, 7).reshape(16, 16)], -1
    )
    target = {"boxes": np.zeros((0, 4)), "labels": [], "difficult": [], "image_id": 0, "orig_size": [16, 16]}
    floats, _ = build_eval_transform(16, MEAN, STD)(image, target)
    pixels, _ = build_eval_transform(16, MEAN, STD, normalize=False)(image, target)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    assert torch.equal(normalize_images(pixels[None], MEAN, STD)[0], floats)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(floats, MEAN, STD)


def test_hypothesis_is_derandomised_in_ci() -> None:
    # tests/conftest.py loads the "ci" profile when CI is set (as .ci/run does); the property tests of this
    # file inherit it.
    assert settings.get_profile("ci").derandomize
    for test in (test_train_transform_invariants, test_iou_crop_window_obeys_the_ssd_constraints):
        assert test._hypothesis_internal_use_settings.derandomize is IN_CI
