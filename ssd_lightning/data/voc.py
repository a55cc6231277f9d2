"""PASCAL VOC layout: ``<root>/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}``, any class list."""

from __future__ import annotations

import difflib
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from .base import DatasetError, DetectionDataset, ImageRecord, Problem, Transform, log
from .layout import root_error

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")

ImageSet = tuple[str | int, str]


def voc_folder(root: str | os.PathLike, year: str | int) -> Path:
    """The folder of one VOC year (or any named VOC-layout part, e.g. ``shapes``) under ``root``."""
    return Path(root) / f"VOC{year}"


def check_voc_root(root: str | os.PathLike, years: Sequence[str | int], name: str = "voc") -> None:
    """Raise a :class:`DatasetError` suggesting the right folder unless ``root`` holds a VOC<year> folder."""

    def holds_voc(path: Path) -> bool:
        return any((voc_folder(path, year) / "Annotations").is_dir() for year in years)

    if not holds_voc(Path(root)):
        folders = " or ".join(f"VOC{year}/" for year in sorted({str(y) for y in years}))
        raise root_error(name, root, folders, holds_voc, note="VOCdevkit/ of the official tarballs")


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one a line (blank lines ignored)."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError("classes", [Problem(str(path), "class file lists no classes")])
    return names


def _text(element: ET.Element, tag: str) -> str | None:
    child = element.find(tag)
    return child.text.strip() if child is not None and child.text else None


def _number(element: ET.Element | None, tag: str) -> float:
    """A numeric child's value; NaN when missing or not a number (reported by the box validation)."""
    value = _text(element, tag) if element is not None else None
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


def _image_path(folder: Path, image_id: str, filename: str | None) -> Path:
    images = folder / "JPEGImages"
    named = [images / filename] if filename else []
    candidates = named + [images / (image_id + suffix) for suffix in _IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


def parse_voc_annotation(
    xml_path: Path,
    folder: Path,
    image_id: str,
    class_to_label: dict[str, int],
    index: int,
    left_out: Collection[str] = (),
    left_out_counts: Counter[str] | None = None,
) -> ImageRecord | Problem:
    """One VOC XML file to an :class:`ImageRecord`, or the :class:`Problem` that prevents it.

    VOC boxes are 1-based inclusive pixel indices: pixel ``i`` covers ``[i-1, i]``, so the box
    ``xmin..xmax`` spans ``[xmin - 1, xmax]`` in 0-based continuous coordinates. Objects of a class in
    ``left_out`` are skipped (counted in ``left_out_counts``); any other name not in ``class_to_label``
    is a problem.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        return Problem(str(xml_path), "annotation file is missing")
    except ET.ParseError as error:
        return Problem(str(xml_path), f"XML does not parse ({error})")
    size = root.find("size")
    width = _number(size, "width")
    height = _number(size, "height")
    boxes, labels, difficult, numbers = [], [], [], []
    for number, obj in enumerate(root.iter("object"), start=1):
        name = _text(obj, "name")
        if name not in class_to_label:
            if name in left_out:
                if left_out_counts is not None:
                    left_out_counts[name] += 1
                continue
            known = ", ".join(class_to_label)
            return Problem(str(xml_path), f"object {number} has unknown class name {name!r} (known: {known})")
        numbers.append(number)  # messages name objects by their place in the XML
        box = obj.find("bndbox")
        boxes.append(
            [_number(box, "xmin") - 1, _number(box, "ymin") - 1, _number(box, "xmax"), _number(box, "ymax")]
        )
        labels.append(class_to_label[name])
        difficult.append(_text(obj, "difficult") == "1")
    return ImageRecord(
        path=_image_path(folder, image_id, _text(root, "filename")),
        annotation=xml_path,
        name=image_id,
        image_id=index,
        width=int(width) if np.isfinite(width) else 0,
        height=int(height) if np.isfinite(height) else 0,
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=np.array(labels, np.int64),
        difficult=np.array(difficult, bool),
        object_ids=np.array(numbers, np.int64),
    )


def _read_split(split_file: Path) -> list[str] | Problem:
    if not split_file.is_file():
        return Problem(str(split_file), "image set file is missing")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    return ids if ids else Problem(str(split_file), "image set file lists no images")


class VOCDetection(DetectionDataset):
    """A PASCAL VOC (or VOC-layout custom) dataset.

    Args:
        root: folder holding ``VOC2007/``, ``VOC2012/``... (a ``VOCdevkit`` folder).
        image_sets: ``(year, set)`` pairs, e.g. ``[(2007, "trainval"), (2012, "trainval")]``; a year whose
            folder is absent is skipped with a warning, none present is an error.
        classes: class names to train on (VOC's 20 by default), possibly a subset of the data's.
        data_classes: every class the data may hold; objects of these that are not in ``classes`` are
            left out (as COCO leaves out other categories), any other class name is an error. None: a
            year folder's ``classes.txt`` if it has one, else VOC's 20 classes.
        check_classes: a class of ``classes`` that no object of these image sets has and ``data_classes``
            does not name either (``dataset.classes=[cat,dgo]``) is an error naming the closest real names;
            on for training data, where a class without examples is a typo more often than not.
        transform, keep_difficult, skip_bad_samples, verify_images: see :class:`DetectionDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_sets: Sequence[ImageSet] = ((2007, "trainval"), (2012, "trainval")),
        classes: Sequence[str] = VOC_CLASSES,
        *,
        data_classes: Sequence[str] | None = None,
        check_classes: bool = False,
        transform: Transform | None = None,
        keep_difficult: bool = True,
        skip_bad_samples: bool = False,
        verify_images: bool = True,
    ):
        root = Path(root)
        image_sets = [(year, str(image_set)) for year, image_set in image_sets]
        name = "voc " + " + ".join(f"{year}/{image_set}" for year, image_set in image_sets)
        check_voc_root(root, [year for year, _ in image_sets], name)
        class_to_label = {c: i for i, c in enumerate(classes, start=1)}
        present = [(year, image_set) for year, image_set in image_sets if voc_folder(root, year).is_dir()]
        for year, _ in sorted(set(image_sets) - set(present), key=str):
            log.warning("%s: %s not found, skipping year %s", name, voc_folder(root, year), year)

        records: list[ImageRecord] = []
        problems: list[Problem] = []
        left_out_counts: Counter[str] = Counter()
        vocabulary: dict[str, str] = {}  # class name -> where the data names it
        for year, image_set in present:
            folder = voc_folder(root, year)
            ids = _read_split(folder / "ImageSets" / "Main" / f"{image_set}.txt")
            if isinstance(ids, Problem):
                problems.append(ids)
                continue
            known = _data_classes(folder, data_classes)
            source = str(folder / "classes.txt") if (folder / "classes.txt").is_file() else "VOC's 20 classes"
            vocabulary.update({c: source for c in known if c not in vocabulary})
            left_out = set(known) - set(class_to_label)
            for image_id in ids:
                xml_path = folder / "Annotations" / f"{image_id}.xml"
                parsed = parse_voc_annotation(
                    xml_path, folder, image_id, class_to_label, len(records), left_out, left_out_counts
                )
                if isinstance(parsed, Problem):
                    problems.append(parsed)
                else:
                    records.append(parsed)
        if check_classes and records:
            problems += _classes_without_objects(classes, records, vocabulary, left_out_counts, name)
        if left_out_counts:
            counts = ", ".join(f"{n} {c}" for c, n in left_out_counts.most_common())
            log.info(
                "%s: left out %d object(s) of classes not trained on: %s",
                name,
                left_out_counts.total(),
                counts,
            )
        super().__init__(
            records,
            classes,
            problems=problems,
            name=name,
            transform=transform,
            keep_difficult=keep_difficult,
            skip_bad_samples=skip_bad_samples,
            verify_images=verify_images,
        )


def _classes_without_objects(
    classes: Sequence[str],
    records: Sequence[ImageRecord],
    vocabulary: dict[str, str],
    seen_elsewhere: Counter[str],
    name: str,
) -> list[Problem]:
    """A problem for each class that no object has and the data's class list does not name (a typo)."""
    counts = np.bincount(np.concatenate([r.labels for r in records]), minlength=len(classes) + 1)[1:]
    real = sorted({*vocabulary, *seen_elsewhere})
    problems = []
    for label, class_name in enumerate(classes):
        if counts[label] or class_name in vocabulary:
            continue
        close = difflib.get_close_matches(class_name, real, n=3, cutoff=0.6)
        where = ", ".join(sorted(set(vocabulary.values()))) or "the data"
        problems.append(
            Problem(
                name,
                f"dataset.classes has {class_name!r}, but no object here has that class and {where} does not "
                "name it" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""),
            )
        )
    return problems


def _data_classes(folder: Path, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        return list(given)
    class_file = folder / "classes.txt"
    return read_class_file(class_file) if class_file.is_file() else list(VOC_CLASSES)
