"""The COCO loader: coco128 through the coco config, category mapping, crowd, and broken input."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.data import COCODetection, DatasetError


@pytest.fixture(scope="module")
def coco_datamodule(compose_cfg, coco128_coco: Path):
    cfg = compose_cfg(
        "dataset=coco", f"dataset.root={coco128_coco}", "dataset.val_split=train2017", "dataset.num_workers=0"
    )
    return instantiate_datamodule(cfg)


def test_coco128_loads_through_the_coco_config(coco_datamodule, coco128_coco: Path) -> None:
    raw = json.loads((coco128_coco / "annotations" / "instances_train2017.json").read_text())
    # set on construction, before setup: 80 categories with sparse ids map to labels 1..80
    assert coco_datamodule.num_classes == 81
    assert coco_datamodule.label_to_category_id[1] == 1 and coco_datamodule.label_to_category_id[80] == 90
    by_id = {c["id"]: c["name"] for c in raw["categories"]}
    for label, category_id in coco_datamodule.label_to_category_id.items():
        assert coco_datamodule.classes[label - 1] == by_id[category_id]

    coco_datamodule.setup("validate")
    dataset = coco_datamodule.datasets["val"]
    assert len(dataset) == 128 and not dataset.problems
    assert sum(r.num_boxes for r in dataset.records) == 939
    assert sum(int(r.difficult.sum()) for r in dataset.records) == 10  # the crowd boxes, flagged


def test_boxes_labels_and_ids_match_the_json(coco_datamodule, coco128_coco: Path) -> None:
    raw = json.loads((coco128_coco / "annotations" / "instances_train2017.json").read_text())
    coco_datamodule.setup("validate")
    dataset = coco_datamodule.datasets["val"]
    record = dataset.records[0]
    anns = [a for a in raw["annotations"] if a["image_id"] == record.image_id]
    assert sorted(record.object_ids.tolist()) == sorted(a["id"] for a in anns)
    for box, label, ann_id in zip(record.boxes, record.labels, record.object_ids, strict=True):
        ann = next(a for a in anns if a["id"] == ann_id)
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(box, [x, y, x + w, y + h], rtol=1e-5)
        assert dataset.label_to_category_id[int(label)] == ann["category_id"]
    image_entry = next(i for i in raw["images"] if i["id"] == record.image_id)
    assert dataset[0][1]["orig_size"].tolist() == [image_entry["height"], image_entry["width"]]


def test_crowd_boxes_are_not_training_targets(coco128_coco: Path) -> None:
    training = COCODetection(coco128_coco, "train2017", keep_difficult=False)
    assert sum(r.num_boxes for r in training.records) == 929
    assert not any(r.difficult.any() for r in training.records)


def test_grayscale_image_loads_as_rgb(coco128_coco: Path) -> None:
    dataset = COCODetection(coco128_coco, "train2017")
    index = next(i for i, r in enumerate(dataset.records) if r.name == "000000000086.jpg")
    image, _ = dataset[index]
    assert image.shape[2] == 3 and image.dtype == np.uint8


def test_custom_class_subset_maps_back_to_category_ids(make_coco: Callable[..., Path], caplog) -> None:
    root = make_coco()
    with caplog.at_level(logging.INFO, logger="ssd_lightning.data"):
        dataset = COCODetection(root, "train", ["dog", "car"])
    assert dataset.label_to_category_id == {1: 18, 2: 3}
    assert [r.labels.tolist() for r in dataset.records] == [[1], [2]]  # the toothbrush is left out
    assert "left out 1 annotation(s)" in caplog.text
    with pytest.raises(DatasetError, match="class 'unicorn' is not a category"):
        COCODetection(root, "train", ["dog", "unicorn"])


def test_all_categories_by_default_ordered_by_id(make_coco: Callable[..., Path]) -> None:
    dataset = COCODetection(make_coco(), "train")
    assert dataset.classes == ["car", "dog", "toothbrush"]
    assert dataset.label_to_category_id == {1: 3, 2: 18, 3: 90}
    first = dataset.records[0]
    assert first.labels.tolist() == [2, 3] and first.difficult.tolist() == [False, True]


def test_zero_height_box_is_dropped_with_a_warning_negative_size_is_an_error(
    make_coco: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    # COCO train2017 itself holds two zero-height boxes, so those must not stop training
    root = make_coco(
        [
            {"image_id": 1, "category_id": 3, "bbox": [4, 5, 10, 0]},
            {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]},
        ]
    )
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        dataset = COCODetection(root, "train")
    assert [r.num_boxes for r in dataset.records] == [0, 1]
    assert "dropped 1 degenerate box(es)" in caplog.text and "annotation id 1" in caplog.text

    root = make_coco([{"image_id": 1, "category_id": 3, "bbox": [40, 5, -10, 8]}])
    with pytest.raises(
        DatasetError, match=r"instances_train.json: image 000000000001.jpg: annotation id 1 box"
    ):
        COCODetection(root, "train")


def test_every_broken_annotation_is_reported(make_coco: Callable[..., Path]) -> None:
    root = make_coco(
        [
            {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
            {"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
            {"image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},
            {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5]},
        ],
        num_images=3,
    )
    (root / "train" / "000000000003.jpg").unlink()
    with pytest.raises(DatasetError) as caught:
        COCODetection(root, "train")
    messages = [str(p) for p in caught.value.problems]
    assert any("annotation id 2 (image id 1) has unknown category_id 7" in m for m in messages)
    assert any("annotation id 3 (image id 99) refers to an image that is not listed" in m for m in messages)
    assert any("annotation id 4 needs image_id, category_id and a bbox of 4 numbers" in m for m in messages)
    assert any(m.endswith("000000000003.jpg: image file is missing") for m in messages)
    assert len(messages) == 4


def test_unparseable_or_missing_json_and_missing_folders(make_coco: Callable[..., Path]) -> None:
    root = make_coco()
    annotation = root / "annotations" / "instances_train.json"
    annotation.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances_train.json: JSON does not parse"):
        COCODetection(root, "train")
    annotation.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="has no annotations / categories list"):
        COCODetection(root, "train")
    annotation.unlink()
    with pytest.raises(DatasetError, match="instances_train.json: annotation file is missing"):
        COCODetection(root, "train")
    with pytest.raises(DatasetError, match="val: image folder is missing"):
        COCODetection(root, "val")
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        COCODetection(root / "nowhere", "train")


def test_pycocotools_api_of_the_split_uses_the_original_ids(coco128_coco: Path) -> None:
    dataset = COCODetection(coco128_coco, "train2017")
    api = dataset.coco_api()
    assert api is dataset.coco_api()  # loaded once
    record = dataset.records[0]
    anns = api.loadAnns(api.getAnnIds(imgIds=[record.image_id]))
    assert sorted(a["id"] for a in anns) == sorted(record.object_ids.tolist())
    assert {a["category_id"] for a in anns} == {dataset.label_to_category_id[int(v)] for v in record.labels}
