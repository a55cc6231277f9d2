"""The built-in shapes dataset: content, determinism, and a cache that is safe to share."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

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


def test_objects_are_visible_where_their_boxes_say() -> None:
    rng = np.random.default_rng(3)
    image, objects = render_scene(160, 120, rng)
    assert objects
    for _, box in objects:
        x0, y0, x1, y1 = np.round(box).astype(int)
        assert image[y0:y1, x0:x1].std() > 5  # not a blank patch


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
    monkeypatch.setenv("SSD_DATA_CACHE", str(tmp_path))
    assert default_shapes_root() == tmp_path / "shapes"
    monkeypatch.delenv("SSD_DATA_CACHE")
    assert default_shapes_root().name == "shapes"


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need >= 1 image per split"):
        ensure_shapes_dataset(tmp_path, **{**TINY, "num_val": 0})
