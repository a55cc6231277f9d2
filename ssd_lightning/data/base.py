"""What the VOC and COCO loaders share: records, image decoding and the up-front validation.

A loader parses its annotation files into :class:`ImageRecord` objects and a list of :class:`Problem`;
:class:`DetectionDataset` then checks every image file (existence, decodable header, truncation, size),
validates every box in one vectorised pass, and either raises one :class:`DatasetError` listing all
problems or (``skip_bad_samples=True``) drops the bad images with a counted warning. All of this runs
in the constructor, so bad data fails before training starts, never inside a DataLoader worker.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger("ssd_lightning.data")

#: Boxes may stick out of the image by this many pixels, or this fraction of the image side if larger,
#: before they count as broken; within it they are clipped (annotation tools often overshoot a little).
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.01

_MAX_LISTED = 20
_TAIL_BYTES = 4096
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"

Target = dict[str, Any]
Transform = Callable[[np.ndarray, Target], tuple[Any, Target]]


@dataclass(frozen=True)
class Problem:
    """One problem in a dataset, tied to the file it is in."""

    file: str
    message: str
    severity: str = "error"  # "error" blocks training; "warning" was fixed automatically (clipped/dropped)

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class DatasetError(ValueError):
    """A dataset has problems that must be fixed before training; ``problems`` lists all of them."""

    def __init__(self, context: str, problems: Sequence[Problem] = (), hint: str | None = None):
        self.context = context
        self.problems = list(problems)
        if not self.problems:  # rebuilt from its message alone, e.g. when re-raised from a DataLoader worker
            super().__init__(context)
            return
        lines = [f"  {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - _MAX_LISTED} more")
        if hint is None:
            hint = (
                "List them all with `python -m ssd_lightning.cli.check dataset=... dataset.root=...`,"
                " or set dataset.skip_bad_samples=true to skip these images."
            )
        super().__init__(
            f"{context}: {len(self.problems)} problem(s) in the data:\n" + "\n".join(lines) + "\n" + hint
        )


@dataclass
class ImageRecord:
    """One image and its objects; boxes are xmin, ymin, xmax, ymax in pixels (0-based, continuous)."""

    path: Path
    annotation: Path  # the file to name in messages about the boxes
    name: str  # VOC image id or COCO file name
    image_id: int
    width: int  # 0 when the annotation does not say; then read from the image header
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    #: how messages name each object: its 1-based position in a VOC XML, its id in a COCO JSON
    object_ids: np.ndarray | None = None
    #: prefix naming this image inside an annotation file shared by many images (COCO)
    where: str = ""
    #: what ``object_ids`` are, for messages
    object_kind: str = "object"

    def __post_init__(self) -> None:
        if self.object_ids is None:
            self.object_ids = np.arange(1, len(self.labels) + 1, dtype=np.int64)

    @property
    def num_boxes(self) -> int:
        return len(self.labels)

    def keep_objects(self, mask: np.ndarray) -> None:
        """Keep only the objects where ``mask`` is True."""
        self.boxes, self.labels = self.boxes[mask], self.labels[mask]
        self.difficult, self.object_ids = self.difficult[mask], self.object_ids[mask]


def decode_rgb(path: str | os.PathLike, exif_orientation: bool = False) -> np.ndarray:
    """Decode an image file to an RGB uint8 HxWx3 array (grayscale, RGBA, PNG and 16-bit all end RGB).

    EXIF orientation is ignored by default: VOC/COCO boxes refer to the stored pixel grid.
    ``exif_orientation=True`` applies it, as photo viewers do (for photos to predict on).
    """
    data = np.fromfile(path, dtype=np.uint8)  # fromfile+imdecode also handles non-ASCII paths
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DatasetError("image decoding", [Problem(str(path), "OpenCV cannot decode this image")])
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


_EXIF_ORIENTATION = 0x0112
_ORIENTATION_WORDS = {
    2: "mirrored",
    3: "rotated 180 degrees",
    4: "mirrored upside down",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees",
    8: "rotated 90 degrees counter-clockwise",
}


def exif_orientation_of(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file, 1 (as stored) when it has none or cannot be read."""
    try:
        with Image.open(path) as image:
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return int(value) if value in _ORIENTATION_WORDS else 1


def _orientation_note(path: str | os.PathLike) -> str:
    """Why a file's size may disagree with its annotation, when its EXIF orientation says it is turned."""
    tag = exif_orientation_of(path)
    if tag == 1:
        return ""
    return (
        f"; the file has an EXIF orientation tag ({tag}: shown {_ORIENTATION_WORDS[tag]}), which is "
        "ignored because boxes refer to the stored pixels: if the annotation was drawn on the turned "
        "view, save the image turned (e.g. PIL.ImageOps.exif_transpose) without the tag"
    )


def read_image_size(path: Path, exif_orientation: bool = False) -> tuple[int, int] | str:
    """Cheap header check: (width, height), or a message saying why the file is unusable.

    Reads the header and the last few KiB only; a JPEG/PNG whose end marker is missing there is
    decoded in full to tell a truncated file from one with trailing bytes. ``exif_orientation=True``
    gives the size after the EXIF orientation is applied (see :func:`decode_rgb`).
    """
    try:
        with Image.open(path) as image:
            size = image.size
            if exif_orientation and image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                size = (size[1], size[0])
            kind = image.format
            end_marker = {"JPEG": _JPEG_END, "PNG": _PNG_END}.get(kind)
            if end_marker is not None and not _has_end_marker(path, end_marker):
                image.load()  # raises OSError for a truncated file
    except FileNotFoundError:
        return "image file is missing"
    except UnidentifiedImageError:
        return "not a readable image (unknown or corrupt format)"
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable or truncated image ({error})"
    if size[0] <= 0 or size[1] <= 0:
        return f"image has an empty size {size[0]}x{size[1]}"
    return size


def _has_end_marker(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - _TAIL_BYTES))
        return marker in handle.read()


def map_in_threads(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """File checks are I/O bound and release the GIL, so threads overlap them."""
    if len(items) < 64:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(function, items, chunksize=32))


def _check_image_files(
    records: Sequence[ImageRecord], read_headers: bool, exif_orientation: bool = False
) -> dict[int, Problem]:
    """Fill unknown sizes from the headers; report missing, undecodable or mis-sized images by record index.

    Without ``read_headers`` only existence is checked (plus headers of images whose size is unknown).
    """
    problems: dict[int, Problem] = {}
    header_rows = [i for i, r in enumerate(records) if read_headers or r.width <= 0 or r.height <= 0]
    read_size = functools.partial(read_image_size, exif_orientation=exif_orientation)
    sizes = map_in_threads(read_size, [records[i].path for i in header_rows])
    for row, result in zip(header_rows, sizes, strict=True):
        record = records[row]
        if isinstance(result, str):
            problems[row] = Problem(str(record.path), result)
        elif record.width <= 0 or record.height <= 0:
            record.width, record.height = result
        elif result != (record.width, record.height):
            problems[row] = Problem(
                str(record.path),
                f"image is {result[0]}x{result[1]} but {record.where}{record.annotation.name} says "
                f"{record.width}x{record.height}"
                + ("" if exif_orientation else _orientation_note(record.path)),
            )
    other_rows = sorted(set(range(len(records))) - set(header_rows))
    exists = map_in_threads(os.path.isfile, [records[i].path for i in other_rows])
    for row, found in zip(other_rows, exists, strict=True):
        if not found:
            problems[row] = Problem(str(records[row].path), "image file is missing")
    return problems


def _describe_box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _validate_boxes(records: Sequence[ImageRecord]) -> tuple[dict[int, list[Problem]], list[Problem]]:
    """Clip boxes slightly outside the image, drop zero-area ones, report broken ones.

    One vectorised pass over every box of the dataset. Returns (errors by record index, warnings);
    records keep only their valid boxes.
    """
    counts = np.array([r.num_boxes for r in records], dtype=np.int64)
    if counts.sum() == 0:
        return {}, []
    boxes = np.concatenate([r.boxes for r in records]).astype(np.float64)
    widths = np.repeat(np.array([r.width for r in records], np.float64), counts)
    heights = np.repeat(np.array([r.height for r in records], np.float64), counts)
    tol_x = np.maximum(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * widths)
    tol_y = np.maximum(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * heights)

    non_finite = ~np.isfinite(boxes).all(axis=1)
    with np.errstate(invalid="ignore"):
        inverted = ~non_finite & ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
        outside = (
            ~non_finite
            & ~inverted
            & (
                (boxes[:, 0] < -tol_x)
                | (boxes[:, 1] < -tol_y)
                | (boxes[:, 2] > widths + tol_x)
                | (boxes[:, 3] > heights + tol_y)
            )
        )
    broken = non_finite | inverted | outside
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0.0, widths[:, None])
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0.0, heights[:, None])
    degenerate = ~broken & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))

    errors: dict[int, list[Problem]] = {}
    warnings: list[Problem] = []
    owner = np.repeat(np.arange(len(records)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for index in np.flatnonzero(broken | degenerate):  # loops over bad boxes only, to word the messages
        row = int(owner[index])
        record = records[row]
        object_id = record.object_ids[index - first[row]]
        where = f"{record.where}{record.object_kind} {object_id} box {_describe_box(boxes[index])}"
        if non_finite[index]:
            message = f"{where} has a missing or non-numeric coordinate"
        elif inverted[index]:
            message = f"{where} has xmax < xmin or ymax < ymin"
        elif outside[index]:
            message = f"{where} lies outside the {record.width}x{record.height} image"
        else:
            message = f"{where} has zero area in the image; dropped"
            warnings.append(Problem(str(record.annotation), message, "warning"))
            continue
        errors.setdefault(row, []).append(Problem(str(record.annotation), message))

    keep = ~(broken | degenerate)
    for record, start, count in zip(records, first, counts, strict=True):
        if count:
            record.boxes = clipped[start : start + count].astype(np.float32)
            record.keep_objects(keep[start : start + count])
    return errors, warnings


class DetectionDataset(Dataset):
    """A validated list of :class:`ImageRecord`; item ``i`` is ``(image, target)``.

    Without a transform the image is an RGB uint8 HxWx3 array and the target holds numpy arrays with
    boxes in absolute pixels; with one, whatever the transform returns (see
    :class:`ssd_lightning.data.transforms.DetectionTransform`). Target keys: ``boxes`` float32 [N,4]
    xyxy, ``labels`` int64 [N] in 1..C-1, ``difficult`` bool [N], ``image_id`` int, ``orig_size``
    int64 [2] = (height, width).

    Args:
        records: parsed images; their boxes are validated, clipped and filtered here.
        classes: class names without background; label ``k`` is ``classes[k - 1]``.
        problems: problems the loader already found while parsing.
        name: what to call this dataset in messages, e.g. ``"voc 2007/test"``.
        transform: callable ``(image, target) -> (image, target)``.
        keep_difficult: keep objects flagged difficult (VOC) or crowd (COCO); False for training.
        skip_bad_samples: drop images with problems (counted in a warning) instead of raising.
        verify_images: read every image header up front (existence is always checked).
        exif_orientation: show images as their EXIF orientation tag says (sizes and boxes then refer to
            the turned view); off for annotated data, whose boxes refer to the stored pixels.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        classes: Sequence[str],
        *,
        problems: Sequence[Problem] = (),
        name: str = "dataset",
        transform: Transform | None = None,
        keep_difficult: bool = True,
        skip_bad_samples: bool = False,
        verify_images: bool = True,
        exif_orientation: bool = False,
    ):
        self.name = name
        self.classes = list(classes)
        self.transform = transform
        self.exif_orientation = exif_orientation
        file_problems = _check_image_files(records, verify_images, exif_orientation)
        usable = [r for i, r in enumerate(records) if i not in file_problems]
        box_errors, box_warnings = _validate_boxes(usable)
        loader_errors = [p for p in problems if p.severity == "error"]
        errors = loader_errors + list(file_problems.values()) + [p for ps in box_errors.values() for p in ps]
        self.problems: list[Problem] = errors + [p for p in problems if p.severity != "error"] + box_warnings
        self.records = [r for i, r in enumerate(usable) if i not in box_errors]

        if errors and not skip_bad_samples:
            raise DatasetError(name, errors)
        if errors:
            log.warning(
                "%s: skipped %d problem(s) (skip_bad_samples=true), kept %d image(s); first: %s",
                name,
                len(errors),
                len(self.records),
                errors[0],
            )
        if box_warnings:
            log.warning(
                "%s: dropped %d degenerate box(es) with zero area after clipping to the image; first: %s",
                name,
                len(box_warnings),
                box_warnings[0],
            )
        if not keep_difficult:
            for record in self.records:
                if record.difficult.any():
                    record.keep_objects(~record.difficult)
        if not self.records:
            raise DatasetError(name, errors or [Problem(name, "no usable images")])

    def subset(self, keep: Callable[[ImageRecord], bool], name: str) -> DetectionDataset:
        """A copy holding the images `keep` accepts (already validated: nothing is read again)."""
        chosen = copy.copy(self)
        chosen.records = [record for record in self.records if keep(record)]
        chosen.name = name
        if not chosen.records:
            raise DatasetError(name, [Problem(self.name, "no images left in this part of the data")])
        return chosen

    @property
    def errors(self) -> list[Problem]:
        """Problems that block training (empty unless ``skip_bad_samples`` let them through)."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.records)

    def target(self, index: int) -> Target:
        """The target of item ``index`` before any transform (numpy arrays, absolute pixels)."""
        record = self.records[index]
        return {
            "boxes": record.boxes.copy(),
            "labels": record.labels.copy(),
            "difficult": record.difficult.copy(),
            "image_id": record.image_id,
            "orig_size": np.array([record.height, record.width], dtype=np.int64),
        }

    def load_image(self, index: int) -> np.ndarray:
        """Decode image ``index`` as RGB uint8, checking it matches the size its boxes refer to."""
        record = self.records[index]
        image = decode_rgb(record.path, self.exif_orientation)
        if image.shape[:2] != (record.height, record.width):
            note = "" if self.exif_orientation else _orientation_note(record.path)
            raise DatasetError(
                self.name,
                [
                    Problem(
                        str(record.path),
                        f"decoded image is {image.shape[1]}x{image.shape[0]}, "
                        f"annotation says {record.width}x{record.height}{note}",
                    )
                ],
            )
        return image

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        image, target = self.load_image(index), self.target(index)
        if self.transform is not None:
            return self.transform(image, target)
        return image, target


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively, by suffix), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFolderDataset(DetectionDataset):
    """Every image under ``root`` (recursively, sorted), without annotations: for prediction.

    Targets have no boxes; ``image_id`` is the position in :attr:`records`, whose ``path`` names the file.
    Photos are shown as their EXIF orientation says unless ``exif_orientation=False``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str],
        *,
        transform: Transform | None = None,
        skip_bad_samples: bool = False,
        verify_images: bool = True,
        exif_orientation: bool = True,
    ):
        root = Path(root)
        name = f"images in {root}"
        if not root.is_dir():
            raise DatasetError(name, [Problem(str(root), "folder does not exist")])
        paths = image_files(root)
        if not paths:
            raise DatasetError(name, [Problem(str(root), f"holds no images ({', '.join(IMAGE_SUFFIXES)})")])
        records = [
            ImageRecord(path=p, annotation=p, name=p.name, image_id=i, width=0, height=0)
            for i, p in enumerate(paths)
        ]
        super().__init__(
            records,
            classes,
            name=name,
            transform=transform,
            skip_bad_samples=skip_bad_samples,
            verify_images=verify_images,
            exif_orientation=exif_orientation,
        )
