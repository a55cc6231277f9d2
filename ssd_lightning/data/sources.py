"""Data sources: what one data format knows, behind one small interface the DataModule and the checker use.

A source says whether its root holds its data, which class names it has, which images and boxes a split
holds (a validated :class:`DetectionDataset`) and which splits read the same images. VOC, COCO and the
built-in shapes are sources; a format of your own is a subclass of :class:`DataSource`, chosen in the config
(``dataset.source._target_=my_package.MySource``, its other keys its arguments) with the package untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .base import DatasetError, DetectionDataset, Problem, Transform
from .coco import COCODetection, check_coco_root, coco_annotation_file, read_coco_json, resolve_coco_classes
from .shapes import SHAPE_CLASSES, OnlineShapesDataset, default_shapes_root, ensure_shapes_dataset
from .voc import VOC_CLASSES, VOCDetection, check_voc_root, read_class_file, voc_folder
from .yolo import YOLODetection, find_data_yaml, read_data_yaml, split_images

SPLITS = ("train", "val", "test")


class DataSource(ABC):
    """One data format on disk under `root`.

    Subclasses implement `class_names` and `load`; the rest has defaults. `label_to_category_id` maps the
    contiguous labels (1..C-1) back to the data's own category ids where it has them (COCO), for results
    files.
    """

    def __init__(self, root: str | Path | None, name: str | None = None) -> None:
        if root is None:
            raise ValueError(
                f"dataset.root is required for {type(self).__name__} (the folder holding the data)"
            )
        self.root = Path(root)
        self.name = name or type(self).__name__.removesuffix("Source").lower()
        self.label_to_category_id: dict[int, int] | None = None

    def prepare(self) -> None:  # noqa: B027 (optional: most data exists already)
        """Make the data exist (the built-in data is generated); once per node, before `load`."""

    @abstractmethod
    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        """The class names to train on: `requested` checked against the data, or the data's own when None."""

    @abstractmethod
    def load(
        self,
        split: str,
        classes: Sequence[str],
        *,
        transform: Transform | None,
        keep_difficult: bool,
        skip_bad_samples: bool,
        verify_images: bool,
    ) -> DetectionDataset:
        """The validated images and boxes of `split` ("train", "val" or "test") for `classes`."""

    def reads(self, split: str) -> Hashable:
        """What `split` reads: two splits that read the same are the same images (validation = test)."""
        return split

    def training_images(self, classes: Sequence[str], transform: Transform | None) -> Dataset | None:
        """Training images made on the fly instead of `load("train")` (the online shapes), else None."""
        return None


def _image_set_pairs(sets: Sequence[Sequence[Any]], option: str) -> list[tuple[Any, str]]:
    pairs = [tuple(entry) for entry in sets]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"dataset.{option} must be a list of [year, image_set] pairs, got {sets!r}")
    return [(year, str(image_set)) for year, image_set in pairs]


class VOCSource(DataSource):
    """PASCAL VOC layout: `root/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`; each split is a list of
    `[year, image set]` pairs (a missing year is skipped with a warning)."""

    def __init__(
        self,
        root: str | Path | None,
        name: str | None = None,
        train_sets: Sequence[Sequence[Any]] = ((2007, "trainval"), (2012, "trainval")),
        val_sets: Sequence[Sequence[Any]] = ((2007, "test"),),
        test_sets: Sequence[Sequence[Any]] = ((2007, "test"),),
    ) -> None:
        super().__init__(root, name)
        given = {"train": train_sets, "val": val_sets, "test": test_sets}
        self.image_sets = {split: _image_set_pairs(sets, f"{split}_sets") for split, sets in given.items()}
        check_voc_root(self.root, [year for sets in self.image_sets.values() for year, _ in sets], self.name)

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        if requested is not None:
            return [str(name) for name in requested]
        # classes.txt of the first training year that has one, else VOC's 20
        found = [
            f
            for year, _ in self.image_sets["train"]
            if (f := voc_folder(self.root, year) / "classes.txt").is_file()
        ]
        return read_class_file(found[0]) if found else list(VOC_CLASSES)

    def load(self, split: str, classes: Sequence[str], **options: Any) -> DetectionDataset:
        # A class no training object has is a typo more often than not: checked on the training split.
        return VOCDetection(
            self.root, self.image_sets[split], classes, check_classes=split == "train", **options
        )

    def reads(self, split: str) -> Hashable:
        return tuple(self.image_sets[split])


class COCOSource(DataSource):
    """COCO layout: `root/annotations/instances_<split>.json` beside `root/<split>/`; the test split is the
    val split unless named."""

    def __init__(
        self,
        root: str | Path | None,
        name: str | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
    ) -> None:
        super().__init__(root, name)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        check_coco_root(self.root, list(self.splits.values()), self.name)

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        source = coco_annotation_file(self.root, self.splits["val"])
        if not source.is_file():
            source = coco_annotation_file(self.root, self.splits["train"])
        names, self.label_to_category_id = resolve_coco_classes(
            read_coco_json(source)["categories"], requested, source
        )
        return names

    def load(self, split: str, classes: Sequence[str], **options: Any) -> DetectionDataset:
        dataset = COCODetection(self.root, self.splits[split], classes, **options)
        if dataset.label_to_category_id != self.label_to_category_id:
            source = str(coco_annotation_file(self.root, self.splits[split]))
            raise DatasetError(dataset.name, [Problem(source, "categories differ from the other splits'")])
        return dataset

    def reads(self, split: str) -> Hashable:
        return self.splits[split]


class ShapesSource(DataSource):
    """The built-in synthetic shapes, generated on first use into a cache in VOC layout (`shapes`: the
    generator's settings; `online: true` renders fresh training scenes in the loader workers instead)."""

    def __init__(
        self, root: str | Path | None = None, name: str | None = None, shapes: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(root if root is not None else default_shapes_root(), name or "shapes")
        self.options = dict(shapes or {})
        self.online = bool(self.options.pop("online", False))

    def _cache_options(self) -> dict[str, Any]:
        # online training renders its own scenes: the cache then needs the val/test splits only
        return {**self.options, "num_train": 0} if self.online else dict(self.options)

    def prepare(self) -> None:
        ensure_shapes_dataset(self.root, **self._cache_options())

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        return [str(name) for name in requested] if requested is not None else list(SHAPE_CLASSES)

    def load(self, split: str, classes: Sequence[str], **options: Any) -> DetectionDataset:
        self.prepare()
        return VOCDetection(self.root, [("shapes", split)], classes, **options)

    def training_images(self, classes: Sequence[str], transform: Transform | None) -> Dataset | None:
        if not self.online:
            return None
        generation = {
            k: self.options[k] for k in ("seed", "min_side", "max_side", "max_objects") if k in self.options
        }
        length = int(self.options.get("num_train", 600))
        return OnlineShapesDataset(length, classes, transform=transform, **generation)


class YOLOSource(DataSource):
    """Ultralytics YOLO layout: `root` is the dataset's YAML (or its folder) naming `train`, `val`, optional
    `test` (else the val split) and `names`; see :mod:`ssd_lightning.data.yolo`."""

    def __init__(self, root: str | Path | None, name: str | None = None) -> None:
        super().__init__(root, name)
        self.config = find_data_yaml(self.root)
        self.data = read_data_yaml(self.config)
        self.splits = {split: self.data.get(split) or self.data["val"] for split in SPLITS}

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        names = self.data["names"]
        if requested is None:
            return list(names)
        unknown = [str(n) for n in requested if str(n) not in names]
        if unknown:
            problems = [Problem(str(self.config), f"class {n!r} is not in its names") for n in unknown]
            raise DatasetError("yolo classes", problems)
        return [str(n) for n in requested]

    def load(self, split: str, classes: Sequence[str], **options: Any) -> DetectionDataset:
        images, problems = split_images(self.splits[split], self.data["path"], self.config)
        if not images:
            problems.append(
                Problem(str(self.config), f"{split} split {self.splits[split]!r} holds no images")
            )
            raise DatasetError(f"{self.name} {split}", problems)
        return YOLODetection(
            images, self.data["names"], classes, name=f"{self.name} {split}", problems=problems, **options
        )

    def reads(self, split: str) -> Hashable:
        entry = self.splits[split]
        return tuple(entry) if isinstance(entry, list) else entry


#: The data formats by name (`dataset.format`); a format of your own needs no entry: `dataset.source`.
SOURCES: dict[str, type[DataSource]] = {
    "voc": VOCSource,
    "coco": COCOSource,
    "yolo": YOLOSource,
    "shapes": ShapesSource,
}
