"""On-the-fly training scenes of the shapes generator (OnlineShapesDataset) and the cache they leave alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssd_lightning.data import DetectionDataModule, VOCDetection, build_train_transform, collate_detection
from ssd_lightning.data.datamodule import seed_worker
from ssd_lightning.data.shapes import (
    SHAPE_CLASSES,
    SHAPES_FOLDER,
    OnlineShapesDataset,
    ensure_shapes_dataset,
    render_training_scene,
)

SMALL = {"min_side": 64, "max_side": 96}
#: sha256 of the 100 test images and annotations of the default cache (seed 0, 240-400 px), as generated
#: before the online scenes existed (commit 00455f4): evaluation data must never change.
DEFAULT_TEST_SPLIT_SHA256 = "cf6bd6f3d7c12f80c157f780b78ca2dc0f4803a9909ca497975cd27bda1cc87c"


def _split_hash(folder: Path, split: str, count: int) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        for sub, suffix in (("JPEGImages", "jpg"), ("Annotations", "xml")):
            digest.update((folder / sub / f"{split}_{index:06d}.{suffix}").read_bytes())
    return digest.hexdigest()


def test_default_test_split_is_byte_for_byte_unchanged(tmp_path: Path) -> None:
    # num_train=0 (the cache of an online run) must not move the test images either
    root = ensure_shapes_dataset(tmp_path, num_train=0, num_val=1, num_test=100)
    folder = root / SHAPES_FOLDER
    assert _split_hash(folder, "test", 100) == DEFAULT_TEST_SPLIT_SHA256
    assert (folder / "ImageSets" / "Main" / "train.txt").read_text() == ""


def test_a_scene_is_rendered_exactly_as_the_cache_stores_it(tmp_path: Path) -> None:
    root = ensure_shapes_dataset(tmp_path, num_train=4, num_val=1, num_test=1, seed=3, **SMALL)
    cached = VOCDetection(root, [("shapes", "train")], SHAPE_CLASSES)
    for index in range(4):
        image, boxes, kinds = render_training_scene((3, 0, index), **SMALL)  # split code 0: train
        np.testing.assert_array_equal(image, cached.load_image(index))
        np.testing.assert_array_equal(boxes, cached.records[index].boxes)
        np.testing.assert_array_equal(kinds + 1, cached.records[index].labels)


def _images(dataset: OnlineShapesDataset, count: int) -> list[np.ndarray]:
    return [dataset[i][0] for i in range(count)]


def test_scenes_are_fresh_every_draw_and_reproducible_for_a_seed_and_stream() -> None:
    first = OnlineShapesDataset(4, seed=1, **SMALL)
    first.reseed(11)
    epoch1, epoch2 = _images(first, 4), _images(first, 4)
    # a second epoch over the same indices sees new scenes
    assert not any(np.array_equal(a, b) for a in epoch1 for b in epoch2)
    again = OnlineShapesDataset(4, seed=1, **SMALL)
    again.reseed(11)
    assert all(np.array_equal(a, b) for a, b in zip(epoch1 + epoch2, _images(again, 8), strict=True))
    other_stream = OnlineShapesDataset(4, seed=1, **SMALL)
    other_stream.reseed(12)
    other_seed = OnlineShapesDataset(4, seed=2, **SMALL)
    other_seed.reseed(11)
    for other in (other_stream, other_seed):
        assert not any(np.array_equal(a, b) for a in epoch1 for b in _images(other, 4))


def test_fresh_scenes_never_repeat_a_cached_image(tmp_path: Path) -> None:
    # key (seed, 3, stream, n): the cached splits use (seed, split 0-2, index)
    dataset = OnlineShapesDataset(2, seed=0, **SMALL)
    dataset.reseed(0)
    assert dataset.next_key() == (0, 3, 0, 0)
    root = ensure_shapes_dataset(tmp_path, num_train=2, num_val=2, num_test=2, **SMALL)
    cached = [VOCDetection(root, [("shapes", s)], SHAPE_CLASSES) for s in ("train", "val", "test")]
    online = _images(dataset, 2)
    assert not any(np.array_equal(o, d.load_image(i)) for o in online for d in cached for i in range(2))


def test_items_look_like_the_cached_datasets_and_follow_the_class_order() -> None:
    # a subset in another order: labels follow it, the other shapes leave the targets
    classes = ["star", "ellipse"]
    dataset, keys = (OnlineShapesDataset(40, classes, seed=5, **SMALL) for _ in range(2))
    dataset.reseed(0)
    keys.reseed(0)  # the same stream: its keys name the scenes dataset[i] renders
    kinds_seen: set[int] = set()
    for index in range(40):
        image, target = dataset[index]
        _, boxes, kinds = render_training_scene(keys.next_key(), **SMALL)
        names = [SHAPE_CLASSES[k] for k in kinds]
        expected = np.array([classes.index(n) + 1 for n in names if n in classes], np.int64)
        np.testing.assert_array_equal(target["labels"], expected)
        np.testing.assert_array_equal(target["boxes"], boxes[[n in classes for n in names]])
        assert target["boxes"].dtype == np.float32 and target["difficult"].shape == expected.shape
        assert tuple(target["orig_size"]) == image.shape[:2] and target["image_id"] == index
        kinds_seen |= set(kinds.tolist())
    assert len(kinds_seen) == len(SHAPE_CLASSES)  # the other classes were drawn, then left out
    with pytest.raises(ValueError, match="classes must be among"):
        OnlineShapesDataset(4, ["dog"])


def _batches(dataset: OnlineShapesDataset, epochs: int) -> list[torch.Tensor]:
    torch.manual_seed(123)  # seed_everything(workers=True) does the same for the worker seeds
    loader = DataLoader(
        dataset,
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        collate_fn=collate_detection,
        worker_init_fn=seed_worker,
    )
    return [images for _ in range(epochs) for images, _ in loader]


def test_loader_workers_render_distinct_scenes_each_epoch_reproducibly() -> None:
    transform = build_train_transform(64, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
    dataset = OnlineShapesDataset(8, seed=0, transform=transform, **SMALL)
    run = _batches(dataset, epochs=2)  # 2 epochs x 4 batches; each worker makes whole batches
    assert len(run) == 8 and run[0].shape == (2, 3, 64, 64)
    flat = [image for batch in run for image in batch]
    assert not any(torch.equal(flat[i], flat[j]) for i in range(16) for j in range(i + 1, 16))
    again = _batches(OnlineShapesDataset(8, seed=0, transform=transform, **SMALL), epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(run, again, strict=True))


def test_datamodule_online_trains_on_fresh_scenes_and_caches_val_test_only(tmp_path: Path) -> None:
    shapes = {"num_train": 12, "num_val": 3, "num_test": 3, "seed": 4, **SMALL, "online": True}
    datamodule = DetectionDataModule(
        root=str(tmp_path), image_size=64, batch_size=4, num_workers=0, shapes=shapes
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.datasets["train"]
    assert isinstance(train, OnlineShapesDataset) and len(train) == 12 and train.seed == 4
    assert train.options == {"min_side": 64, "max_side": 96, "max_objects": 6}
    images, targets = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and len(targets) == 4
    assert len(datamodule.datasets["val"]) == 3
    assert (tmp_path / SHAPES_FOLDER / "ImageSets" / "Main" / "train.txt").read_text() == ""
    # the val/test images are those of the cache an offline run makes
    offline = ensure_shapes_dataset(
        tmp_path / "offline", **{k: v for k, v in shapes.items() if k != "online"}
    )
    for split in ("val", "test"):
        assert _split_hash(tmp_path / SHAPES_FOLDER, split, 3) == _split_hash(
            offline / SHAPES_FOLDER, split, 3
        )
