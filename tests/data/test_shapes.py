"""The built-in shapes dataset: content, determinism, and a cache that is safe to share."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

import ssd_lightning.data.shapes as shapes
from ssd_lightning.data import SHAPE_CLASSES, VOCDetection
from ssd_lightning.data.shapes import (
    MANIFEST,
    SHAPES_FOLDER,
    default_shapes_root,
    ensure_shapes_dataset,
    render_scene,
)

TINY = {"num_train": 3, "num_val": 2, "num_test": 2, "min_side": 64, "max_side": 96}


def test_scenes_cover_classes_scales_borders_overlaps_and_empty_images() -> None:
    classes, sides, aspects, empty, at_border, overlapping = set(), [], [], 0, 0, 0
    for index in range(150):
        rng = np.random.default_rng([7, index])
        image, objects = render_scene(128, 96, rng)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        empty += not objects
        boxes = np.array([box for _, box in objects]).reshape(-1, 4)
        classes |= {kind for kind, _ in objects}
        assert ((boxes >= 0) & (boxes <= [128, 96, 128, 96])).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()
        sides += (boxes[:, 2:] - boxes[:, :2]).max(axis=1).tolist()
        aspects += ((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])).tolist()
        at_border += int(((boxes[:, :2] == 0) | (boxes[:, 2:] == [128, 96])).any(axis=1).sum())
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                low, high = np.maximum(boxes[i, :2], boxes[j, :2]), np.minimum(boxes[i, 2:], boxes[j, 2:])
                overlapping += bool((high > low).all())
    assert classes == set(range(len(SHAPE_CLASSES)))
    assert empty > 0 and at_border > 10 and overlapping > 10
    assert min(sides) < 12 and max(sides) > 70  # small to large objects
    assert min(aspects) < 0.5 and max(aspects) > 2  # elongated both ways


def test_objects_are_visible_where_their_boxes_say(monkeypatch: pytest.MonkeyPatch) -> None:
    # The generator's own record of each object: the pixels its _paint call changed, in painting order,
    # which is the order render_scene returns the objects in.
    painted: list[np.ndarray] = []
    paint = shapes._paint

    def recording_paint(image: np.ndarray, outline: np.ndarray, rng: np.random.Generator) -> None:
        before = image.copy()
        paint(image, outline, rng)
        painted.append(np.abs(image - before).sum(axis=-1) > 3)

    monkeypatch.setattr(shapes, "_paint", recording_paint)
    width, height, contrasts, tight = 160, 120, [], 0
    for index in range(30):
        painted.clear()
        image, objects = render_scene(width, height, np.random.default_rng([3, index]))
        assert len(painted) == len(objects)
        pixels = image.astype(np.float64)
        for number, ((_, box), mask) in enumerate(zip(objects, painted, strict=True)):
            assert mask.any(), f"scene {index}: object {number} painted nothing"
            ys, xs = np.nonzero(mask)
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
            # Where the shape was painted is inside its box (up to the anti-aliased edge and outline) ...
            inside = (extent[:2] >= box[:2] - 2).all() and (extent[2:] <= box[2:] + 2).all()
            assert inside, f"scene {index}, object {number}: painted at {extent}, box {box}"
            # ... and fills it: tight on every side unless the border cuts the shape (then the box is the
            # clipped box of the whole shape).
            if (box[:2] > 0).all() and box[2] < width and box[3] < height:
                np.testing.assert_allclose(extent, box, atol=2, err_msg=f"scene {index}, object {number}")
                tight += 1
            # In the final image (noise, blur, objects painted later on top), the shape's visible pixels
            # stand out from a 3-pixel ring just outside its box.
            visible = mask & ~np.any(painted[number + 1 :], axis=0) if number + 1 < len(painted) else mask
            x0, y0 = np.floor(box[:2]).astype(int)
            x1, y1 = np.ceil(box[2:]).astype(int)
            ring = np.zeros_like(mask)
            ring[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = True
            ring[y0:y1, x0:x1] = False
            assert visible.any() and ring.any()
            colour, surroundings = np.median(pixels[visible], axis=0), np.median(pixels[ring], axis=0)
            contrasts.append(np.abs(colour - surroundings).sum())
    contrasts = np.array(contrasts)
    assert len(contrasts) > 60 and tight > 30
    # The fill colour is drawn to differ from what it covers (L1 > 150 before shading and noise).
    assert (contrasts > 60).mean() >= 0.95 and contrasts.min() > 10, np.sort(contrasts)[:5]


def test_generation_is_deterministic_and_loads_as_voc(tmp_path: Path) -> None:
    first = ensure_shapes_dataset(tmp_path / "one", **TINY)
    second = ensure_shapes_dataset(tmp_path / "two", **TINY)
    for relative in (
        "Annotations/train_000001.xml",
        "JPEGImages/val_000001.jpg",
        "ImageSets/Main/trainval.txt",
    ):
        assert (first / SHAPES_FOLDER / relative).read_bytes() == (
            second / SHAPES_FOLDER / relative
        ).read_bytes()
    dataset = VOCDetection(first, [("shapes", "train"), ("shapes", "val")], SHAPE_CLASSES)
    assert len(dataset) == 5 and not dataset.problems
    assert json.loads((first / SHAPES_FOLDER / MANIFEST).read_text())["num_train"] == 3


def test_cache_is_reused_and_regenerated_when_settings_change_or_incomplete(tmp_path: Path) -> None:
    root = ensure_shapes_dataset(tmp_path, **TINY)
    folder = root / SHAPES_FOLDER
    marker = folder / "JPEGImages" / "marker.txt"
    marker.write_text("kept while the cache is valid")
    ensure_shapes_dataset(tmp_path, **TINY)
    assert marker.exists()

    ensure_shapes_dataset(tmp_path, **{**TINY, "num_train": 4})
    assert not marker.exists() and (folder / "Annotations" / "train_000003.xml").exists()

    (folder / MANIFEST).unlink()  # as if a run died before finishing
    (folder / "Annotations" / "train_000000.xml").unlink()
    ensure_shapes_dataset(tmp_path, **{**TINY, "num_train": 4})
    assert (folder / "Annotations" / "train_000000.xml").exists() and (folder / MANIFEST).exists()
    assert not list(tmp_path.glob(".tmp-shapes-*"))


def _generate(root: str) -> str:
    return str(ensure_shapes_dataset(root, **TINY))


def test_processes_starting_together_share_one_cache(tmp_path: Path) -> None:
    # forkserver, not fork: forking this process, whose torch threads are running, can deadlock them.
    with multiprocessing.get_context("forkserver").Pool(3) as pool:
        results = pool.map(_generate, [str(tmp_path)] * 3)
    assert results == [str(tmp_path)] * 3
    dataset = VOCDetection(tmp_path, [("shapes", "train")], SHAPE_CLASSES)
    assert len(dataset) == 3 and not dataset.problems


def test_default_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # $SSD_DATA_CACHE/shapes wins, even in a source checkout (this one).
    monkeypatch.setenv("SSD_DATA_CACHE", str(tmp_path / "cache"))
    assert default_shapes_root() == tmp_path / "cache" / "shapes"
    monkeypatch.delenv("SSD_DATA_CACHE")
    # A source checkout: data_cache/shapes beside pyproject.toml, here and in another checkout.
    assert default_shapes_root() == Path(__file__).resolve().parents[2] / "data_cache" / "shapes"
    checkout = tmp_path / "checkout"
    (checkout / "ssd_lightning" / "data").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(shapes, "__file__", str(checkout / "ssd_lightning" / "data" / "shapes.py"))
    assert default_shapes_root() == checkout / "data_cache" / "shapes"
    # Installed (no pyproject.toml above the package): the user's cache folder.
    installed = tmp_path / "site-packages" / "ssd_lightning" / "data" / "shapes.py"
    monkeypatch.setattr(shapes, "__file__", str(installed))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_shapes_root() == tmp_path / "home" / ".cache" / "ssd_lightning" / "shapes"
    monkeypatch.setenv("SSD_DATA_CACHE", str(tmp_path / "cache"))
    assert default_shapes_root() == tmp_path / "cache" / "shapes"


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need >= 1 image per split"):
        ensure_shapes_dataset(tmp_path, **{**TINY, "num_val": 0})
