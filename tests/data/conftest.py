"""Fixtures for the data tests: Hydra composition, a small shapes cache, tiny VOC/COCO trees to break."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import ssd_lightning.cli  # noqa: F401  (registers the config resolvers)
from ssd_lightning.conf_dir import config_dir
from ssd_lightning.data.shapes import ensure_shapes_dataset

CONF_DIR = config_dir()
#: A shapes cache small enough for tests: (ensure_shapes_dataset keyword, value)
SMALL_SHAPES = {"num_train": 16, "num_val": 6, "num_test": 6, "min_side": 96, "max_side": 160}

VocObject = tuple[str, Sequence[float], int]  # class name, (xmin, ymin, xmax, ymax) 1-based, difficult


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, exactly as train.py and the checker do."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated shapes dataset (VOC layout under <root>/VOCshapes)."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), **SMALL_SHAPES)


@pytest.fixture(scope="session")
def shapes_overrides(shapes_root: Path) -> list[str]:
    """Hydra overrides that point dataset=shapes at the small cache."""
    return [
        "dataset=shapes",
        f"dataset.root={shapes_root}",
        *(f"dataset.shapes.{key}={value}" for key, value in SMALL_SHAPES.items()),
    ]


@pytest.fixture(scope="session")
def coco128_voc(coco128_root: Path) -> Path:
    return coco128_root / "voc"


@pytest.fixture(scope="session")
def coco128_coco(coco128_root: Path) -> Path:
    return coco128_root / "coco"


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_voc_xml(
    path: Path, filename: str, size: tuple[int, int] | None, objects: Sequence[VocObject]
) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    if size is not None:
        size_node = ET.SubElement(root, "size")
        ET.SubElement(size_node, "width").text = str(size[0])
        ET.SubElement(size_node, "height").text = str(size[1])
        ET.SubElement(size_node, "depth").text = "3"
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, tag).text = str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


DEFAULT_VOC_IMAGES: dict[str, list[VocObject]] = {
    "a": [("dog", (5, 6, 30, 40), 0), ("cat", (31, 2, 60, 20), 1)],
    "b": [("cat", (1, 1, 64, 48), 0)],
    "c": [],
}


@pytest.fixture
def make_voc(tmp_path: Path) -> Callable[..., Path]:
    """Build a tiny VOCdevkit: 64x48 JPEGs, one XML each, one image-set file. Returns the root."""

    def _make(
        images: dict[str, list[VocObject]] | None = None,
        *,
        year: int | str = 2007,
        image_set: str = "train",
        size: tuple[int, int] = (64, 48),
    ) -> Path:
        root = tmp_path / "VOCdevkit"
        folder = root / f"VOC{year}"
        images = DEFAULT_VOC_IMAGES if images is None else images
        for seed, (name, objects) in enumerate(images.items()):
            write_image(folder / "JPEGImages" / f"{name}.jpg", *size, seed=seed)
            write_voc_xml(folder / "Annotations" / f"{name}.xml", f"{name}.jpg", size, objects)
        split = folder / "ImageSets" / "Main" / f"{image_set}.txt"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{name}\n" for name in images))
        return root

    return _make


@pytest.fixture
def make_coco(tmp_path: Path) -> Callable[..., Path]:
    """Build a tiny COCO tree (annotations/instances_<split>.json + <split>/*.jpg). Returns the root.

    ``annotations`` entries need ``image_id``, ``category_id``, ``bbox``; ids are filled in.
    """

    def _make(
        annotations: list[dict[str, Any]] | None = None,
        *,
        split: str = "train",
        num_images: int = 2,
        categories: list[dict[str, Any]] | None = None,
    ) -> Path:
        root = tmp_path / "coco"
        images = []
        for index in range(num_images):
            name = f"{index + 1:012d}.jpg"
            write_image(root / split / name, seed=index)
            images.append({"id": index + 1, "file_name": name, "width": 64, "height": 48})
        categories = categories or [
            {"id": 3, "name": "car"},
            {"id": 18, "name": "dog"},
            {"id": 90, "name": "toothbrush"},
        ]
        if annotations is None:
            annotations = [
                {"image_id": 1, "category_id": 18, "bbox": [4, 5, 20, 30]},
                {"image_id": 1, "category_id": 90, "bbox": [30, 2, 10, 10], "iscrowd": 1},
                {"image_id": 2, "category_id": 3, "bbox": [0, 0, 64, 48]},
            ]
        annotations = [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)]
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        return root

    return _make
