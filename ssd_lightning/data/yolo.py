"""Ultralytics YOLO layout: a ``data.yaml`` naming the splits and classes, ``images/`` beside ``labels/``.

A split is an image folder, a ``.txt`` list of image paths, or a list of either; each image's labels are
the ``.txt`` of the same name under the matching ``labels/`` folder (the last ``images`` part of its path
becomes ``labels``, as Ultralytics does). A label line is ``class cx cy w h`` in fractions of the image, or
a polygon ``class x1 y1 x2 y2 ...`` (segmentation labels), which becomes its bounding box. An image without
a label file, or with an empty one, is a background image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .base import (
    BOX_TOLERANCE_FRACTION,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Problem,
    Transform,
    image_files,
    map_in_threads,
    read_image_size,
)

log = logging.getLogger("ssd_lightning.data")

_CONFIG_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


def find_data_yaml(root: str | os.PathLike) -> Path:
    """The dataset's YAML: `root` itself, or the one YAML file in the folder `root` (data.yaml first)."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetError(
            "yolo", [Problem(str(root), "no such file or folder (dataset.root: a data.yaml or its folder)")]
        )
    for name in _CONFIG_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if len(found) == 1:
        return found[0]
    what = f"several YAML files ({', '.join(p.name for p in found)})" if found else "no YAML file"
    raise DatasetError(
        "yolo",
        [
            Problem(
                str(root),
                f"holds {what}: pass the dataset's YAML itself as dataset.root=<folder>/<name>.yaml",
            )
        ],
    )


def read_data_yaml(path: Path) -> dict[str, Any]:
    """The parsed dataset YAML with `names` as a list (index i = class i) and `path` resolved."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DatasetError("yolo", [Problem(str(path), f"cannot be read as YAML ({error})")]) from None
    if not isinstance(data, dict):
        raise DatasetError("yolo", [Problem(str(path), "is not a mapping of train/val/names")])
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            message = f"names must be indexed 0..{len(keys) - 1} without gaps, got indices {keys[:10]}"
            raise DatasetError("yolo", [Problem(str(path), message)])
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DatasetError(
            "yolo", [Problem(str(path), "needs `names`: a list of class names or {index: name}")]
        )
    names = [str(name) for name in names]
    if "nc" in data and data["nc"] != len(names):
        message = f"nc is {data['nc']} but names has {len(names)} entries"
        raise DatasetError("yolo", [Problem(str(path), message)])
    if not data.get("train") or not data.get("val"):
        raise DatasetError(
            "yolo", [Problem(str(path), "needs `train` and `val` (a folder, a .txt list or a list)")]
        )
    base = Path(str(data.get("path") or "."))
    data["path"] = base if base.is_absolute() else (path.parent / base)
    data["names"] = names
    return data


def label_file(image: Path) -> Path:
    """Where Ultralytics keeps an image's labels: its last `images` folder becomes `labels`, suffix `.txt`."""
    parts = list(image.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def split_images(entry: Any, root: Path, config: Path) -> tuple[list[Path], list[Problem]]:
    """The image files of one split entry: a folder (searched recursively), a `.txt` list of image paths
    (`./x` relative to the list's folder, other relative paths to the dataset root), or a list of those."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    problems: list[Problem] = []
    for item in entries:
        where = Path(str(item))
        where = where if where.is_absolute() else root / where
        if where.is_dir():
            images += image_files(where)
        elif where.suffix == ".txt" and where.is_file():
            for line in where.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    listed = Path(line)
                    if line.startswith("./"):
                        listed = where.parent / line[2:]
                    elif not listed.is_absolute():
                        listed = root / listed
                    images.append(listed)
        else:
            problems.append(
                Problem(str(config), f"split entry {item!r}: {where} is neither a folder nor a .txt list")
            )
    return list(dict.fromkeys(images)), problems


def _parse_label_file(path: Path, num_names: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Problem]]:
    """(fraction boxes xyxy [N,4] float64, class indices [N], line numbers [N], problems) of one file."""
    boxes, classes, lines, problems = [], [], [], []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""  # no label file: a background image
    except (OSError, UnicodeDecodeError) as error:
        text = ""
        problems.append(Problem(str(path), f"unreadable ({error})"))
    seen: dict[tuple, int] = {}
    tolerance = BOX_TOLERANCE_FRACTION
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(token) for token in tokens]
        except ValueError:
            values = []
        is_box = len(values) == 5
        is_polygon = len(values) >= 7 and len(values) % 2 == 1
        if not (is_box or is_polygon) or not np.isfinite(values).all() or values[0] != int(values[0]):
            problems.append(
                Problem(
                    str(path),
                    f"line {number}: expected `class cx cy w h` or a polygon `class x1 y1 x2 y2 ...`"
                    f" of numbers, got {line.strip()[:60]!r}",
                )
            )
            continue
        index, coords = int(values[0]), np.array(values[1:], np.float64)
        if not 0 <= index < num_names:
            problems.append(
                Problem(str(path), f"line {number}: class index {index} is not in names (0-{num_names - 1})")
            )
            continue
        if (coords < -tolerance).any() or (coords > 1 + tolerance).any():
            problems.append(
                Problem(
                    str(path),
                    f"line {number}: coordinates must be fractions of the image in [0, 1], "
                    f"got {line.strip()[:60]!r}",
                )
            )
            continue
        if is_box:
            cx, cy, w, h = coords
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        else:
            xs, ys = coords[0::2], coords[1::2]
            box = (xs.min(), ys.min(), xs.max(), ys.max())
        key = (index, *box)
        # Ultralytics drops repeated lines too; counted twice they would bias training and mAP
        if key in seen:
            problems.append(Problem(str(path), f"line {number} repeats line {seen[key]}; dropped", "warning"))
            continue
        seen[key] = number
        boxes.append(box)
        classes.append(index)
        lines.append(number)
    return (
        np.array(boxes, np.float64).reshape(-1, 4),
        np.array(classes, np.int64),
        np.array(lines, np.int64),
        problems,
    )


class YOLODetection(DetectionDataset):
    """One split of a YOLO-layout dataset (see the module docstring).

    Args:
        images: the split's image files (:func:`split_images`).
        names: every class name of the dataset's YAML, by index.
        classes: the class names to train on (a subset of `names`, in any order); lines of other classes are
            left out. Label ``k`` is ``classes[k - 1]``.
        name: what to call this split in messages.
        problems: problems already found reading the split (e.g. a split entry that does not exist).
        transform, keep_difficult, skip_bad_samples, verify_images: see :class:`DetectionDataset`.
    """

    def __init__(
        self,
        images: Sequence[Path],
        names: Sequence[str],
        classes: Sequence[str],
        *,
        name: str = "yolo",
        problems: Sequence[Problem] = (),
        transform: Transform | None = None,
        keep_difficult: bool = True,
        skip_bad_samples: bool = False,
        verify_images: bool = True,  # noqa: ARG002 (always: the boxes need each image's size)
    ):
        problems = list(problems)
        index_to_label = np.zeros(len(names), np.int64)  # 0: a class not trained on, left out
        for label, class_name in enumerate(classes, start=1):
            index_to_label[list(names).index(class_name)] = label
        label_files = [label_file(image) for image in images]
        if images and not any(map_in_threads(os.path.isfile, label_files)):
            message = (
                f"none of its {len(images)} images has a label file (the first would be {label_files[0]})"
            )
            raise DatasetError(
                name,
                [Problem(str(images[0].parent), message)],
                hint="Labels live in a `labels/` folder beside `images/`.",
            )
        sizes = map_in_threads(read_image_size, list(images))
        parsed = map_in_threads(lambda path: _parse_label_file(path, len(names)), label_files)
        records = []
        left_out = 0
        for image_id, (image, labels_path, size, (boxes, indices, lines, found)) in enumerate(
            zip(images, label_files, sizes, parsed, strict=True)
        ):
            problems += found
            if isinstance(size, str):
                problems.append(Problem(str(image), size))
                continue
            if any(p.severity == "error" for p in found):
                continue  # the image's boxes cannot be trusted: it is skipped or the split fails
            width, height = size
            labels = index_to_label[indices]
            left_out += int((labels == 0).sum())
            keep = labels > 0
            pixels = boxes[keep] * np.array([width, height, width, height], np.float64)
            records.append(
                ImageRecord(
                    path=image,
                    annotation=labels_path,
                    name=image.name,
                    image_id=image_id,
                    width=width,
                    height=height,
                    boxes=pixels.astype(np.float32),
                    labels=labels[keep],
                    difficult=np.zeros(int(keep.sum()), bool),
                    object_ids=lines[keep],
                    object_kind="line",
                )
            )
        if left_out:
            log.info("%s: left out %d box(es) of classes not in dataset.classes", name, left_out)
        super().__init__(
            records,
            classes,
            problems=problems,
            name=name,
            transform=transform,
            keep_difficult=keep_difficult,
            skip_bad_samples=skip_bad_samples,
            verify_images=False,  # every header was read above (boxes are fractions of the size)
        )
