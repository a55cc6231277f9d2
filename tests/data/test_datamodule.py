"""DetectionDataModule from the Hydra dataset configs: attributes, batches, workers, options."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from torch.utils.data import RandomSampler, SequentialSampler

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.data import SHAPE_CLASSES, DatasetError, DetectionDataModule, collate_detection


@pytest.fixture(scope="module")
def shapes_datamodule(compose_cfg, shapes_overrides) -> DetectionDataModule:
    cfg = compose_cfg(
        *shapes_overrides, "dataset.batch_size=4", "dataset.num_workers=0", "model.image_size=96"
    )
    datamodule = instantiate_datamodule(cfg)
    datamodule.prepare_data()
    return datamodule


def test_attributes_are_known_before_setup(shapes_datamodule: DetectionDataModule, compose_cfg) -> None:
    cfg = compose_cfg("dataset=shapes")
    assert shapes_datamodule.classes == list(SHAPE_CLASSES) and shapes_datamodule.num_classes == 6
    assert shapes_datamodule.image_size == 96
    assert shapes_datamodule.mean == tuple(cfg.model.pixel_mean) and shapes_datamodule.std == tuple(
        cfg.model.pixel_std
    )
    assert shapes_datamodule.label_to_category_id is None


def test_train_batches_follow_the_contract(shapes_datamodule: DetectionDataModule) -> None:
    shapes_datamodule.setup("fit")
    loader = shapes_datamodule.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)  # Lightning swaps in a DistributedSampler under DDP
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.uint8  # normalised on the device
    assert len(targets) == 4
    for target in targets:
        assert set(target) == {"boxes", "labels", "difficult", "image_id", "orig_size"}
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert ((target["labels"] >= 1) & (target["labels"] <= 5)).all() and target[
            "labels"
        ].dtype == torch.int64
        assert target["difficult"].dtype == torch.bool and isinstance(target["image_id"], int)
        assert target["orig_size"].dtype == torch.int64 and target["orig_size"].shape == (2,)


def test_val_batches_are_resized_originals(shapes_datamodule: DetectionDataModule) -> None:
    shapes_datamodule.setup("validate")
    loader = shapes_datamodule.val_dataloader()
    assert isinstance(loader.sampler, SequentialSampler)
    images, targets = next(iter(loader))
    dataset = shapes_datamodule.datasets["val"]
    record = dataset.records[0]
    expected = record.boxes / np.array([record.width, record.height, record.width, record.height])
    np.testing.assert_allclose(targets[0]["boxes"].numpy(), expected, rtol=1e-5)
    assert targets[0]["orig_size"].tolist() == [record.height, record.width]


def test_workers_draw_different_augmentations(compose_cfg, shapes_overrides) -> None:
    cfg = compose_cfg(
        *shapes_overrides, "dataset.batch_size=1", "dataset.num_workers=2", "model.image_size=64"
    )
    datamodule = instantiate_datamodule(cfg)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    dataset.records = [dataset.records[0]] * 8  # the same image, so only the augmentation differs
    torch.manual_seed(0)  # fixes the workers' base seed
    images = torch.cat([batch[0] for batch in datamodule.train_dataloader()])
    assert images.shape == (8, 3, 64, 64)
    # batches alternate between the two workers; seeded alike, items 2k and 2k+1 would be equal
    assert not any(torch.equal(images[k], images[k + 1]) for k in range(0, 8, 2))


def test_coco_mapping_and_test_split_default_to_val(compose_cfg, coco128_coco: Path) -> None:
    cfg = compose_cfg("dataset=coco", f"dataset.root={coco128_coco}", "dataset.val_split=train2017")
    datamodule = instantiate_datamodule(cfg)
    assert datamodule.source.splits == {"train": "train2017", "val": "train2017", "test": "train2017"}
    assert len(datamodule.label_to_category_id) == 80


def test_voc_classes_txt_is_read_when_classes_is_null(compose_cfg, coco128_voc: Path) -> None:
    cfg = compose_cfg(
        "dataset=voc",
        f"dataset.root={coco128_voc}",
        "dataset.classes=null",
        "dataset.train_sets=[[2007,train]]",
    )
    datamodule = instantiate_datamodule(cfg)
    assert datamodule.classes == (coco128_voc / "VOC2007" / "classes.txt").read_text().split()


def test_data_problems_surface_in_setup_before_training(compose_cfg, make_voc: Callable[..., Path]) -> None:
    root = make_voc({"ok": [("dog", (1, 1, 10, 10), 0)], "bad": [("dragon", (1, 1, 10, 10), 0)]})
    overrides = [
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.classes=[dog]",
        "dataset.train_sets=[[2007,train]]",
    ]
    datamodule = instantiate_datamodule(compose_cfg(*overrides))
    with pytest.raises(DatasetError, match="bad.xml: object 1 has unknown class name 'dragon'"):
        datamodule.setup("fit")
    skipping = instantiate_datamodule(
        compose_cfg(*overrides, "dataset.skip_bad_samples=true", "dataset.val_sets=[[2007,train]]")
    )
    skipping.setup("fit")
    assert len(skipping.datasets["train"]) == 1


@pytest.mark.parametrize(
    ("overrides", "raised", "cause", "message"),
    [
        (["dataset.format=lmdb"], ValueError, None, "dataset.format must be one of"),
        (
            ["+dataset.train_split=train2017"],
            ValueError,
            None,
            "dataset.train_split do not apply to format 'shapes'",
        ),
        # A misspelt augmentation key (`+`: Hydra itself refuses a key the config does not have) reaches
        # build_train_transform in the constructor, whose TypeError Hydra wraps.
        (
            ["+dataset.augmentation.flip=0.5"],
            InstantiationException,
            TypeError,
            r"build_train_transform\(\) got an unexpected keyword argument 'flip'",
        ),
        (["model.pixel_std=[1,0,1]"], ValueError, None, "std > 0"),
    ],
    ids=["format", "split", "flip", "std"],
)
def test_config_mistakes_fail_on_construction(
    compose_cfg, overrides: list[str], raised: type, cause: type | None, message: str
) -> None:
    cfg = compose_cfg("dataset=shapes", *overrides)  # composes: the mistake is ours to catch
    with pytest.raises(raised) as caught:
        instantiate_datamodule(cfg)
    error = caught.value if cause is None else caught.value.__cause__
    assert type(error) is (cause or raised) and re.search(message, str(error)), repr(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset/augmentation=ssd"],
        ["dataset/augmentation=none"],
        ["dataset/augmentation=ssd", "dataset.augmentation.hflip_p=0"],
        [],  # the built-in data's own: light
    ],
    ids=["ssd", "none", "hflip_p=0", "light"],
)
def test_augmentation_configs_have_their_effect(compose_cfg, shapes_overrides, overrides: list[str]) -> None:
    cfg = compose_cfg(*shapes_overrides, "model.image_size=64", "dataset.num_workers=0", *overrides)
    transform = instantiate_datamodule(cfg).build_dataset("train").transform  # what training applies
    transform.reseed(0)
    # A 64x48 image whose pixels hold their coordinates, a box on the left (label 1) and one on the right (2).
    ys, xs = np.mgrid[0:48, 0:64]
    image = np.stack([4 * xs, 5 * ys, np.full_like(xs, 100)], axis=-1).astype(np.uint8)
    target = {
        "boxes": np.array([[2, 10, 20, 40], [44, 6, 62, 30]], np.float32),
        "labels": np.array([1, 2]),
        "difficult": np.zeros(2, bool),
        "image_id": 0,
        "orig_size": np.array([48, 64]),
    }
    resized = target["boxes"] / [64, 48, 64, 48]
    unchanged = flipped = moved = 0
    for _ in range(60):
        pixels, out = transform(image, target)
        boxes = dict(zip(out["labels"].tolist(), out["boxes"].numpy(), strict=True))
        as_given = sorted(boxes) == [1, 2] and np.allclose([boxes[1], boxes[2]], resized, atol=1e-5)
        difference = pixels.permute(1, 2, 0).numpy().astype(int) - cv2.resize(image, (64, 64))
        unchanged += as_given and np.abs(difference).mean() < 1
        flipped += sorted(boxes) == [1, 2] and boxes[1][0] > boxes[2][0]  # left and right objects swapped
        mirrored = resized[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0]
        moved += not as_given and not (
            sorted(boxes) == [1, 2] and np.allclose([boxes[1], boxes[2]], mirrored)
        )
    if overrides == ["dataset/augmentation=none"]:  # every draw: the image resized, nothing else
        assert unchanged == 60
    elif not overrides:  # light: whole images, flipped or not, colours distorted in some draws
        assert moved == 0 and flipped > 5 and unchanged < 50
    else:  # zoom-out and crops move the objects; the flip swaps left and right unless hflip_p=0
        assert moved > 20 and unchanged < 20
        assert flipped == 0 if len(overrides) == 2 else flipped > 5


def test_collate_stacks_images_and_lists_targets() -> None:
    batch = [(torch.zeros(3, 8, 8), {"image_id": 1}), (torch.ones(3, 8, 8), {"image_id": 2})]
    images, targets = collate_detection(batch)
    assert images.shape == (2, 3, 8, 8) and [t["image_id"] for t in targets] == [1, 2]


def test_an_image_broken_after_setup_fails_in_the_worker_with_its_name(
    compose_cfg, make_voc: Callable[..., Path]
) -> None:
    root = make_voc({"ok": [("dog", (1, 1, 10, 10), 0)], "later": [("dog", (2, 2, 20, 20), 0)]})
    overrides = [
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.classes=[dog]",
        "dataset.num_workers=1",
        "dataset.persistent_workers=false",
    ]
    datamodule = instantiate_datamodule(compose_cfg(*overrides, "dataset.val_sets=[[2007,train]]"))
    datamodule.setup("validate")
    broken = root / "VOC2007" / "JPEGImages" / "later.jpg"
    broken.write_bytes(b"overwritten after the checks")
    with pytest.raises(Exception, match=f"{broken}: OpenCV cannot decode this image"):
        list(datamodule.val_dataloader())
