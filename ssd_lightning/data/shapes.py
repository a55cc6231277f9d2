"""The built-in ``shapes`` dataset: synthetic scenes generated once into a cache, in VOC layout.

Five classes of filled shapes (ellipse, rectangle, triangle, star, cross) at many scales and aspect
ratios, some overlapping, some cut by the border, on textured, shaded, noisy backgrounds with
distractor clutter; a few images hold no object. Everything derives from one seed, so every machine
generates the same images. The cache is written under a file lock into a temporary folder that is
renamed into place with its manifest already inside, so a half-written cache is never used and
several processes (DDP) starting at once generate it only once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from .base import log

SHAPE_CLASSES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross")
SHAPES_FOLDER = "VOCshapes"  # loaded by VOCDetection with image sets [("shapes", split)]
MANIFEST = "manifest.json"
GENERATOR_VERSION = 2  # bump whenever the images change, so old caches are regenerated
SPLITS = ("train", "val", "test")

_EMPTY_IMAGE_P = 0.08
_MIN_VISIBLE = 0.5  # an object cut by the border keeps at least this fraction of its box
_MAX_OVERLAP_IOU = 0.45


def default_shapes_root() -> Path:
    """``$SSD_DATA_CACHE/shapes`` if set, else ``data_cache/shapes`` in a source checkout, else
    ``~/.cache/ssd_lightning/shapes``."""
    if os.environ.get("SSD_DATA_CACHE"):
        return Path(os.environ["SSD_DATA_CACHE"]) / "shapes"
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data_cache" / "shapes"
    return Path.home() / ".cache" / "ssd_lightning" / "shapes"


def _unit_outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon of a shape of radius about 1 around the origin, [K, 2]."""
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if kind == "triangle":
        t = np.deg2rad(-90 + np.array([0, 120, 240]) + rng.uniform(-25, 25, 3))
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "star":
        points = int(rng.integers(5, 7))
        t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) - np.pi / 2
        radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    arm = rng.uniform(0.25, 0.4)  # cross
    return np.array(
        [[-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
         [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm]],
        np.float64,
    )  # fmt: skip


def _place(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Outline of one object in image coordinates: log-uniform size, varied aspect, rotated."""
    size = np.exp(rng.uniform(np.log(0.08), np.log(0.65))) * min(width, height) / 2
    aspect = (
        np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
        if kind in ("ellipse", "rectangle")
        else rng.uniform(0.75, 1.33)
    )
    max_turn = {"rectangle": 12.0, "ellipse": 180.0}.get(kind, 180.0)
    turn = np.deg2rad(rng.uniform(-max_turn, max_turn))
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    outline = _unit_outline(kind, rng) * size * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    centre = rng.uniform([-0.1 * width, -0.1 * height], [1.1 * width, 1.1 * height])
    return outline @ rotation.T + centre


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour field + gradient + texture + clutter, float32 RGB 0-255."""
    grid = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
    # muted colours: a grey level per cell plus a smaller tint
    coarse = (rng.uniform(40, 215, (*grid, 1)) + rng.uniform(-45, 45, (*grid, 3))).astype(np.float32)
    # cubic upsampling from a tiny grid is slow in OpenCV; go via an intermediate size
    image = cv2.resize(coarse, (max(width // 8, 8), max(height // 8, 8)), interpolation=cv2.INTER_CUBIC)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    angle = float(rng.uniform(0, 2 * np.pi))  # python floats keep the arrays float32
    ramp = (np.cos(angle) / width * xs + np.sin(angle) / height * ys)[..., None]
    image += ramp * rng.uniform(-60, 60, 3).astype(np.float32)
    texture = rng.integers(3)
    if texture == 0:  # stripes
        phase = (math.cos(3 * angle) * xs + math.sin(3 * angle) * ys) * float(2 * np.pi / rng.uniform(6, 40))
        image += (np.sin(phase) * float(rng.uniform(5, 25)))[..., None]
    elif texture == 1:  # blotchy noise
        blotches = cv2.GaussianBlur(rng.random((height, width), np.float32), (0, 0), rng.uniform(2, 6))
        image += ((blotches - blotches.mean()) * float(rng.uniform(5, 20) / (blotches.std() + 1e-6)))[
            ..., None
        ]
    for _ in range(int(rng.integers(0, 12))):  # distractors: lines and arcs that are not objects
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.6:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, start, end, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            axes = (int(rng.integers(5, width // 3)), int(rng.integers(5, height // 3)))
            cv2.ellipse(
                image, start, axes, 0, rng.uniform(0, 360), rng.uniform(30, 150), colour, 1, cv2.LINE_AA
            )
    return image


def _paint(image: np.ndarray, outline: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``outline`` with a colour that stands out locally, sometimes shaded, sometimes outlined.

    Works on the object's bounding rectangle only.
    """
    height, width = image.shape[:2]
    x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 1, [width, height])
    if x1 <= x0 or y1 <= y0:
        return
    roi = image[y0:y1, x0:x1]
    mask = np.zeros(roi.shape[:2], np.uint8)
    # cv2 puts pixel centres on integers, our continuous coordinates at +0.5; 4 fractional bits
    points = np.round((outline - [x0 + 0.5, y0 + 0.5]) * 16).astype(np.int32)
    cv2.fillPoly(mask, [points], 255, cv2.LINE_AA, shift=4)
    covered = mask > 127
    if not covered.any():
        return
    local = roi[covered].mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.abs(colour - local).sum() > 150:
            break
        colour = rng.uniform(0, 255, 3)
    fill = np.empty_like(roi)
    fill[...] = colour
    if rng.random() < 0.5:  # shading across the object
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        centre = outline.mean(axis=0)
        angle = rng.uniform(0, 2 * np.pi)
        extent = max(np.ptp(outline[:, 0]), np.ptp(outline[:, 1]), 1.0)
        along = (np.cos(angle) * (xs - centre[0]) + np.sin(angle) * (ys - centre[1])) / extent
        fill += (along * rng.uniform(40, 120))[..., None]
    alpha = (mask.astype(np.float32) / 255)[..., None]
    roi += alpha * (fill - roi)
    if rng.random() < 0.3:
        edge = tuple(float(c) for c in colour * rng.uniform(0.3, 0.6))
        cv2.polylines(roi, [points], True, edge, int(rng.integers(1, 3)), cv2.LINE_AA, shift=4)


def render_scene(
    width: int, height: int, rng: np.random.Generator, max_objects: int = 6
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One synthetic image (RGB uint8) and its objects as (class index, xyxy box in pixels)."""
    image = _background(width, height, rng)
    count = 0 if rng.random() < _EMPTY_IMAGE_P else int(rng.integers(1, max_objects + 1))
    placed: list[tuple[int, np.ndarray, np.ndarray]] = []
    for _ in range(count * 10):  # rejection sampling; gives up quietly on crowded images
        if len(placed) == count:
            break
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        outline = _place(SHAPE_CLASSES[kind], width, height, rng)
        full = np.concatenate([outline.min(axis=0), outline.max(axis=0)])
        box = np.clip(full, 0, [width, height, width, height])
        visible = np.prod(box[2:] - box[:2]) / np.prod(full[2:] - full[:2])
        if visible < _MIN_VISIBLE or min(box[2:] - box[:2]) < 4:
            continue
        others = torch.from_numpy(np.array([p[2] for p in placed]).reshape(-1, 4))
        if placed and box_iou(torch.from_numpy(box[None]), others).max() > _MAX_OVERLAP_IOU:
            continue
        placed.append((kind, outline, box))
    placed.sort(key=lambda p: -np.prod(p[2][2:] - p[2][:2]))  # big first, so small ones stay visible
    for _, outline, _ in placed:
        _paint(image, outline, rng)
    image += (rng.random(image.shape, np.float32) - 0.5) * float(rng.uniform(6, 24))  # sensor noise
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))
    return np.clip(image, 0, 255).astype(np.uint8), [(kind, box) for kind, _, box in placed]


def keyed_scene(
    key: Sequence[int], min_side: int, max_side: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The scene of rng key `key`: its size drawn in [min_side, max_side], then :func:`render_scene`. The one
    code path of the cached splits and of the online training scenes."""
    rng = np.random.default_rng(list(key))
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    return render_scene(width, height, rng, max_objects)


def _voc_xml(name: str, width: int, height: int, objects: Sequence[tuple[int, np.ndarray]]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = SHAPES_FOLDER
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for kind, box in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = SHAPE_CLASSES[kind]
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        # 1-based inclusive pixel indices enclosing the continuous box
        xmin, ymin = int(np.floor(box[0])) + 1, int(np.floor(box[1])) + 1
        xmax, ymax = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def _write_image(folder: Path, params: dict[str, Any], split_code: int, index: int) -> str:
    """Render image `index` of split `split_code` from its own rng key and write its JPEG and XML."""
    split = SPLITS[split_code]
    key = (params["seed"], split_code, index)
    image, objects = keyed_scene(key, params["min_side"], params["max_side"], params["max_objects"])
    height, width = image.shape[:2]
    name = f"{split}_{index:06d}"
    cv2.imwrite(str(folder / "JPEGImages" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    _voc_xml(name, width, height, objects).write(folder / "Annotations" / f"{name}.xml")
    return name


def _write_dataset(folder: Path, params: dict[str, Any]) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    split_ids: dict[str, list[str]] = {}
    # Threads, not processes: OpenCV and NumPy's bulk work release the GIL, and every image comes from its
    # own rng key, so the files are the same bytes in any order (about 1.7x faster on 2 cores).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for code, split in enumerate(SPLITS):
            count = params[f"num_{split}"]
            split_ids[split] = list(
                pool.map(_write_image, [folder] * count, [params] * count, [code] * count, range(count))
            )
    split_ids["trainval"] = split_ids["train"] + split_ids["val"]
    for split, names in split_ids.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in SHAPE_CLASSES))
    (folder / MANIFEST).write_text(json.dumps(params, indent=2))  # last: marks the folder complete


def _manifest_matches(folder: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()) == params
    except (OSError, ValueError):
        return False


def ensure_shapes_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 600,
    num_val: int = 100,
    num_test: int = 100,
    seed: int = 0,
    min_side: int = 240,
    max_side: int = 400,
    max_objects: int = 6,
) -> Path:
    """Generate the shapes dataset under ``root`` unless an identical one is there; return ``root``.

    ``root`` then holds ``VOCshapes/`` (load it with ``VOCDetection(root, [("shapes", "train")],
    SHAPE_CLASSES)``). A cache made with other parameters is replaced.
    """
    root = Path(root) if root is not None else default_shapes_root()
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "seed": int(seed),
        "min_side": int(min_side),
        "max_side": int(max_side),
        "max_objects": int(max_objects),
    }
    # num_train=0: a cache of the val/test splits only, for training on OnlineShapesDataset
    if (
        min(params["num_val"], params["num_test"]) < 1
        or params["num_train"] < 0
        or not 16 <= min_side <= max_side
    ):
        raise ValueError(
            "shapes dataset: need >= 1 image per split (train: >= 0, for online training) and"
            f" 16 <= min_side <= max_side, got {params}"
        )
    folder = root / SHAPES_FOLDER
    if _manifest_matches(folder, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".shapes.lock")):
        if _manifest_matches(folder, params):  # another process made it while we waited
            return root
        log.info("generating the shapes dataset into %s", folder)
        start = time.perf_counter()
        for stale in root.glob(".tmp-shapes-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-shapes-") as scratch:
            _write_dataset(Path(scratch) / SHAPES_FOLDER, params)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(Path(scratch) / SHAPES_FOLDER, folder)
        images = params["num_train"] + params["num_val"] + params["num_test"]
        log.info("generated %d images in %.1f s", images, time.perf_counter() - start)
    return root


#: rng key of the on-the-fly training scenes; 0, 1, 2 are the cached train, val and test splits, so
#: fresh scenes never repeat an image of the cache.
ONLINE_SPLIT_CODE = 3


def _stored_boxes(objects: Sequence[tuple[int, np.ndarray]], width: int, height: int) -> np.ndarray:
    """Boxes as the cache stores them (:func:`_voc_xml`) and the VOC loader reads them back: the
    enclosing whole pixels, 0-based continuous xyxy."""
    boxes = np.array([box for _, box in objects], np.float64).reshape(-1, 4)
    out = np.concatenate([np.floor(boxes[:, :2]), np.ceil(boxes[:, 2:])], axis=1)
    return np.minimum(out, [width, height, width, height]).astype(np.float32)


def render_training_scene(
    key: Sequence[int],
    *,
    min_side: int = 240,
    max_side: int = 400,
    max_objects: int = 6,
    jpeg_quality: int | None = 92,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene as the cache would hold it: (RGB uint8 image, boxes float32 [N,4] xyxy pixels, kinds [N]).

    Same code path as the cache (:func:`keyed_scene`), and the same JPEG round trip unless
    ``jpeg_quality`` is None, so a model sees the cache's compression artefacts in training too.
    """
    image, objects = keyed_scene(key, min_side, max_side, max_objects)
    height, width = image.shape[:2]
    if jpeg_quality is not None:
        ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
            raise RuntimeError("JPEG encoding failed")
        image = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    kinds = np.array([kind for kind, _ in objects], np.int64)
    return image, _stored_boxes(objects, width, height), kinds


class OnlineShapesDataset(Dataset):
    """Endless fresh training scenes of the shapes generator, rendered in the DataLoader workers.

    Every item is a new scene (the index only counts the epoch's length), so a run never sees an
    image twice and cannot memorise the training set; the val/test splits stay the cached ones.
    Each process draws from its own stream, seeded lazily from ``seed`` and ``torch.initial_seed()``
    (distinct per DataLoader worker, fixed by ``seed_everything(..., workers=True)``), so runs are
    reproducible for a seed and workers never repeat each other. Scene ``n`` of a stream is rendered
    from the rng key ``(seed, ONLINE_SPLIT_CODE, stream, n)``.

    Items are ``(image, target)`` exactly as :class:`~ssd_lightning.data.base.DetectionDataset` gives
    them (labels 1..C in the order of ``classes``, boxes in pixels before the transform).

    Args:
        length: scenes per epoch.
        classes: class names without background, a permutation or subset of :data:`SHAPE_CLASSES`;
            shapes of other classes are left out of the targets (they stay in the picture).
        seed, min_side, max_side, max_objects: generation settings, as for :func:`ensure_shapes_dataset`.
        jpeg_quality: JPEG round trip as in the cache; None skips it.
        transform: callable ``(image, target) -> (image, target)``, e.g. the training augmentation.
    """

    def __init__(
        self,
        length: int,
        classes: Sequence[str] = SHAPE_CLASSES,
        *,
        seed: int = 0,
        min_side: int = 240,
        max_side: int = 400,
        max_objects: int = 6,
        jpeg_quality: int | None = 92,
        transform: Callable[[np.ndarray, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
    ) -> None:
        if length < 1 or not 16 <= min_side <= max_side:
            raise ValueError(
                f"online shapes: need length >= 1 and 16 <= min_side <= max_side, got {length}, "
                f"{min_side}, {max_side}"
            )
        unknown = [c for c in classes if c not in SHAPE_CLASSES]
        if unknown or not classes:
            raise ValueError(f"online shapes: classes must be among {SHAPE_CLASSES}, got {list(classes)}")
        self.length = int(length)
        self.classes = list(classes)
        self.name = f"shapes online (seed {seed})"
        self.seed = int(seed)
        self.options = {"min_side": int(min_side), "max_side": int(max_side), "max_objects": int(max_objects)}
        self.jpeg_quality = jpeg_quality
        self.transform = transform
        # kind index -> label (0 drops the object)
        self._labels = np.array(
            [self.classes.index(c) + 1 if c in self.classes else 0 for c in SHAPE_CLASSES], np.int64
        )
        self._stream: int | None = None
        self._pid = -1
        self._drawn = 0

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def reseed(self, stream: int) -> None:
        """Restart this process's scenes as stream ``stream`` (otherwise chosen on first use)."""
        self._stream, self._pid, self._drawn = int(stream) % 2**63, os.getpid(), 0

    def next_key(self) -> tuple[int, int, int, int]:
        """The rng key of the next scene of this process's stream."""
        if self._stream is None or self._pid != os.getpid():  # first use in this process (worker)
            self.reseed(torch.initial_seed())
        assert self._stream is not None
        key = (self.seed, ONLINE_SPLIT_CODE, self._stream, self._drawn)
        self._drawn += 1
        return key

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        key = self.next_key()
        image, boxes, kinds = render_training_scene(key, jpeg_quality=self.jpeg_quality, **self.options)
        labels = self._labels[kinds]
        keep = labels > 0
        target = {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "difficult": np.zeros(int(keep.sum()), bool),
            "image_id": int(index),
            "orig_size": np.array(image.shape[:2], dtype=np.int64),
        }
        if self.transform is not None:
            return self.transform(image, target)
        return image, target
