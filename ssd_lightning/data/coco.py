"""COCO layout: ``<root>/annotations/instances_<split>.json`` and ``<root>/<split>/`` images."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from .base import DatasetError, DetectionDataset, ImageRecord, Problem, Transform, log
from .layout import root_error


def coco_annotation_file(root: str | os.PathLike, split: str) -> Path:
    """Where the COCO annotations of ``split`` live under ``root``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def check_coco_root(root: str | os.PathLike, splits: Sequence[str], name: str = "coco") -> None:
    """Raise a :class:`DatasetError` suggesting the right folder unless ``root`` holds COCO annotations."""

    def holds_coco(path: Path) -> bool:
        return any(coco_annotation_file(path, split).is_file() for split in splits)

    if not holds_coco(Path(root)):
        files = " or ".join(f"annotations/instances_{split}.json" for split in dict.fromkeys(splits))
        raise root_error(name, root, files, holds_coco, note="annotations/ beside the image folders")


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a COCO annotation file, raising :class:`DatasetError` naming the file if it is unusable."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise DatasetError("coco", [Problem(str(path), "annotation file is missing")]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError("coco", [Problem(str(path), f"JSON does not parse ({error})")]) from None
    if not isinstance(data, dict):
        raise DatasetError("coco", [Problem(str(path), "top level is not a JSON object")])
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError("coco", [Problem(str(path), f"has no {' / '.join(missing)} list")])
    return data


def resolve_coco_classes(
    categories: Sequence[dict[str, Any]], classes: Sequence[str] | None, source: str | os.PathLike
) -> tuple[list[str], dict[int, int]]:
    """Contiguous labels for COCO's sparse category ids.

    With ``classes`` None every category is used, ordered by id; otherwise each name must be a
    category and label ``k`` is ``classes[k - 1]``. Returns (class names, label -> category id).
    """
    by_id = sorted(categories, key=lambda c: c["id"])
    if classes is None:
        return [c["name"] for c in by_id], {label: c["id"] for label, c in enumerate(by_id, start=1)}
    name_to_id: dict[str, int] = {}
    for category in by_id:
        name_to_id.setdefault(category["name"], category["id"])
    unknown = [name for name in classes if name not in name_to_id]
    if unknown:
        problems = [Problem(str(source), f"class {n!r} is not a category of this file") for n in unknown]
        raise DatasetError("coco classes", problems)
    return list(classes), {label: name_to_id[name] for label, name in enumerate(classes, start=1)}


def _size_or_zero(value: Any) -> int:
    """An image side from the JSON; 0 (read it from the image header) when absent or not a number."""
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


class COCODetection(DetectionDataset):
    """A COCO (or COCO-format custom) dataset.

    Category ids are mapped to contiguous labels 1..C-1 (``label_to_category_id`` maps back, for
    evaluation and export). Crowd boxes are flagged ``difficult``: kept for evaluation, never training
    targets. Images without annotations are kept as negatives.

    Args:
        root: folder holding ``annotations/`` and the image folders.
        split: e.g. ``train2017``; reads ``annotations/instances_<split>.json`` and ``<split>/``.
        classes: class names to train on (all categories when None); annotations of other
            categories are left out, with an info log.
        transform, keep_difficult, skip_bad_samples, verify_images: see :class:`DetectionDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train2017",
        classes: Sequence[str] | None = None,
        *,
        transform: Transform | None = None,
        keep_difficult: bool = True,
        skip_bad_samples: bool = False,
        verify_images: bool = True,
    ):
        root = Path(root)
        name = f"coco {split}"
        ann_file = coco_annotation_file(root, split)
        image_dir = root / split
        if not (root / "annotations").is_dir():  # the wrong folder (a missing file is named below)
            check_coco_root(root, [split], name)
        if not image_dir.is_dir():
            raise DatasetError(name, [Problem(str(image_dir), "image folder is missing")])
        data = read_coco_json(ann_file)
        class_names, self.label_to_category_id = resolve_coco_classes(data["categories"], classes, ann_file)
        records, problems = self._records(data, ann_file, image_dir)
        self.annotation_file = ann_file
        self._coco_api: COCO | None = None
        del data  # keep only the records: the raw JSON (segmentations too) would be copied into each worker
        super().__init__(
            records,
            class_names,
            problems=problems,
            name=name,
            transform=transform,
            keep_difficult=keep_difficult,
            skip_bad_samples=skip_bad_samples,
            verify_images=verify_images,
        )

    def coco_api(self) -> COCO:
        """pycocotools' ``COCO`` object of this split's annotation file, for ``COCOeval`` or exporting
        results with the original category ids; loaded on the first call (it holds the whole file)."""
        if self._coco_api is None:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco_api = COCO(str(self.annotation_file))
        return self._coco_api

    def _records(
        self, data: dict[str, Any], ann_file: Path, image_dir: Path
    ) -> tuple[list[ImageRecord], list[Problem]]:
        problems: list[Problem] = []
        images: dict[int, dict[str, Any]] = {}
        by_file: dict[str, int] = {}
        bad_images: set[int] = set()
        for entry in data["images"]:
            valid = isinstance(entry, dict) and isinstance(entry.get("id"), int) and entry.get("file_name")
            if not valid:
                message = f"image entry {str(entry):.80} needs an integer id and a file_name"
                problems.append(Problem(str(ann_file), message))
                continue
            image_id, file_name = entry["id"], str(entry["file_name"])
            if image_id in images:  # which photo its boxes belong to cannot be told
                other = images[image_id]["file_name"]
                problems.append(
                    Problem(str(ann_file), f"image id {image_id} is listed twice ({other}, {file_name})")
                )
                bad_images.add(image_id)
                continue
            if file_name in by_file:
                message = f"file {file_name} is listed twice (image ids {by_file[file_name]} and {image_id})"
                problems.append(Problem(str(ann_file), message))
                bad_images.update((image_id, by_file[file_name]))
            by_file.setdefault(file_name, image_id)
            images[image_id] = entry
        category_to_label = {c: label for label, c in self.label_to_category_id.items()}
        known_categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}

        rows: list[tuple[float, float, float, float, int, int, bool, int]] = []
        seen_boxes: dict[tuple, Any] = {}
        duplicates: list[str] = []
        left_out = 0
        for ann in data["annotations"]:
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
                image_id, category_id = ann["image_id"], ann["category_id"]
            except (KeyError, TypeError, ValueError):
                ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
                message = f"annotation id {ann_id} needs image_id, category_id and a bbox of 4 numbers"
                problems.append(Problem(str(ann_file), message))
                if isinstance(ann, dict) and ann.get("image_id") in images:
                    bad_images.add(ann["image_id"])
                continue
            where = f"annotation id {ann.get('id', '?')} (image id {image_id})"
            if image_id not in images:
                problems.append(Problem(str(ann_file), f"{where} refers to an image that is not listed"))
            elif category_id not in known_categories:
                problems.append(Problem(str(ann_file), f"{where} has unknown category_id {category_id!r}"))
                bad_images.add(image_id)
            elif category_id not in category_to_label:
                left_out += 1
            else:
                crowd = bool(ann.get("iscrowd", 0))
                key = (image_id, category_id, x, y, w, h, crowd)
                if key in seen_boxes:  # the same box twice would count twice in training and evaluation
                    duplicates.append(f"{where} repeats annotation id {seen_boxes[key]}")
                    continue
                seen_boxes[key] = ann.get("id", "?")
                label = category_to_label[category_id]
                rows.append((x, y, x + w, y + h, label, image_id, crowd, ann.get("id", -1)))
        if left_out:
            log.info("%s: left out %d annotation(s) of categories not in dataset.classes", ann_file, left_out)
        if duplicates:
            log.warning(
                "%s: dropped %d duplicate annotation(s); first: %s", ann_file, len(duplicates), duplicates[0]
            )
            problems += [Problem(str(ann_file), f"{d}; dropped", "warning") for d in duplicates]

        table = np.array([row[:4] for row in rows], np.float64).reshape(-1, 4)
        labels = np.array([row[4] for row in rows], np.int64)
        owners = np.array([row[5] for row in rows], np.int64)
        crowd = np.array([row[6] for row in rows], bool)
        ann_ids = np.array([row[7] for row in rows], np.int64)
        order = np.argsort(owners, kind="stable")
        owners_sorted = owners[order]

        records = []
        for image_id, entry in images.items():
            if image_id in bad_images:
                continue
            start, stop = np.searchsorted(owners_sorted, [image_id, image_id + 1])
            mine = order[start:stop]
            records.append(
                ImageRecord(
                    path=image_dir / entry["file_name"],
                    annotation=ann_file,
                    name=entry["file_name"],
                    image_id=int(image_id),
                    width=_size_or_zero(entry.get("width")),
                    height=_size_or_zero(entry.get("height")),
                    boxes=table[mine].astype(np.float32),
                    labels=labels[mine],
                    difficult=crowd[mine],
                    object_ids=ann_ids[mine],
                    where=f"image {entry['file_name']}: ",
                    object_kind="annotation id",
                )
            )
        return records, problems
