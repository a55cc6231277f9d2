"""The VOC loader: coco128 in VOC layout through the voc config, and every kind of broken input."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.data import VOC_CLASSES, DatasetError, VOCDetection

COCO128_SETS = [
    "dataset.train_sets=[[2007,train]]",
    "dataset.val_sets=[[2007,val]]",
    "dataset.test_sets=[[2007,test]]",
]


@pytest.fixture(scope="module")
def voc_datamodule(compose_cfg, coco128_voc: Path):
    cfg = compose_cfg("dataset=voc", f"dataset.root={coco128_voc}", *COCO128_SETS, "dataset.num_workers=0")
    datamodule = instantiate_datamodule(cfg)
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def test_coco128_loads_through_the_voc_config(voc_datamodule) -> None:
    datasets = voc_datamodule.datasets
    assert voc_datamodule.classes == list(VOC_CLASSES) and voc_datamodule.num_classes == 21
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [59, 19, 19]
    assert all(not d.problems for d in datasets.values())


def test_boxes_convert_from_one_based_inclusive_pixels(voc_datamodule, coco128_voc: Path) -> None:
    dataset = voc_datamodule.datasets["val"]
    record = dataset.records[0]
    root = ET.parse(record.annotation).getroot()
    first = root.find("object/bndbox")
    xmin, ymin, xmax, ymax = (float(first.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax"))
    np.testing.assert_allclose(record.boxes[0], [xmin - 1, ymin - 1, xmax, ymax])
    assert record.labels[0] == VOC_CLASSES.index(root.find("object/name").text) + 1
    assert (record.width, record.height) == (
        int(root.find("size/width").text),
        int(root.find("size/height").text),
    )


def test_difficult_objects_are_left_out_of_training_and_flagged_for_evaluation(coco128_voc: Path) -> None:
    # 000000000544 (test) holds a difficult object; 000000000357 (val) too
    evaluation = VOCDetection(coco128_voc, [(2007, "test")], keep_difficult=True)
    training = VOCDetection(coco128_voc, [(2007, "test")], keep_difficult=False)
    flagged = sum(int(r.difficult.sum()) for r in evaluation.records)
    assert flagged >= 1
    assert sum(r.num_boxes for r in evaluation.records) - flagged == sum(
        r.num_boxes for r in training.records
    )
    assert not any(r.difficult.any() for r in training.records)


def test_grayscale_image_loads_as_rgb(coco128_voc: Path) -> None:
    dataset = VOCDetection(coco128_voc, [(2007, "trainval"), (2007, "test")])
    index = next(i for i, r in enumerate(dataset.records) if r.name == "000000000086")
    image, _ = dataset[index]
    assert image.ndim == 3 and image.shape[2] == 3


def test_absent_year_is_skipped_with_a_warning_and_no_year_is_an_error(
    make_voc: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = make_voc()
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        dataset = VOCDetection(root, [(2007, "train"), (2012, "train")], ["dog", "cat"])
    assert len(dataset) == 3
    assert "VOC2012 not found, skipping year 2012" in caplog.text
    with pytest.raises(DatasetError, match="holds no VOC2012/"):
        VOCDetection(root, [(2012, "train")], ["dog", "cat"])
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        VOCDetection(root / "nowhere", [(2007, "train")], ["dog", "cat"])


def test_custom_classes_and_labels(make_voc: Callable[..., Path]) -> None:
    dataset = VOCDetection(make_voc(), [(2007, "train")], ["cat", "dog"])
    record_a = dataset.records[0]
    assert record_a.labels.tolist() == [2, 1] and record_a.difficult.tolist() == [False, True]
    assert dataset.num_classes == 3
    assert dataset.records[2].num_boxes == 0  # an image without objects is a valid negative


def test_xml_without_size_takes_it_from_the_image(make_voc: Callable[..., Path]) -> None:
    root = make_voc()
    xml = root / "VOC2007" / "Annotations" / "a.xml"
    tree = ET.parse(xml)
    tree.getroot().remove(tree.getroot().find("size"))
    tree.write(xml)
    dataset = VOCDetection(root, [(2007, "train")], ["dog", "cat"])
    assert (dataset.records[0].width, dataset.records[0].height) == (64, 48)


def test_every_broken_input_is_reported_with_its_file(make_voc: Callable[..., Path]) -> None:
    root = make_voc(
        {
            "ok": [("dog", (1, 1, 10, 10), 0)],
            "unknown_class": [("dragon", (1, 1, 10, 10), 0)],
            "inverted": [("dog", (20, 1, 10, 10), 0)],
            "outside": [("dog", (1, 1, 200, 10), 0)],
            "no_image": [("dog", (1, 1, 10, 10), 0)],
            "bad_xml": [],
            "truncated": [],
        }
    )
    folder = root / "VOC2007"
    (folder / "JPEGImages" / "no_image.jpg").unlink()
    (folder / "Annotations" / "bad_xml.xml").write_text("<annotation><object>")
    jpeg = folder / "JPEGImages" / "truncated.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (folder / "ImageSets" / "Main" / "empty.txt").write_text("\n")

    with pytest.raises(DatasetError) as caught:
        VOCDetection(root, [(2007, "train"), (2007, "empty"), (2007, "absent")], ["dog", "cat"])

    report = {Path(p.file).name: p.message for p in caught.value.problems}
    assert "unknown class name 'dragon'" in report["unknown_class.xml"]
    assert "xmax < xmin" in report["inverted.xml"]
    assert "outside the 64x48 image" in report["outside.xml"]
    assert report["no_image.jpg"] == "image file is missing"
    assert "XML does not parse" in report["bad_xml.xml"]
    assert "truncated" in report["truncated.jpg"]
    assert report["empty.txt"] == "image set file lists no images"
    assert report["absent.txt"] == "image set file is missing"
    assert len(caught.value.problems) == 8


def test_skip_bad_samples_trains_on_the_rest(make_voc: Callable[..., Path]) -> None:
    root = make_voc({"ok": [("dog", (1, 1, 10, 10), 0)], "unknown_class": [("dragon", (1, 1, 10, 10), 0)]})
    dataset = VOCDetection(root, [(2007, "train")], ["dog"], skip_bad_samples=True)
    assert [r.name for r in dataset.records] == ["ok"]
    assert len(dataset.errors) == 1


def test_a_subset_of_the_voc_classes_trains_on_coco128(coco128_voc: Path) -> None:
    # conf/dataset/voc.yaml advertises dataset.classes=[cat,dog] (which reaches VOCDetection as is):
    # objects of the other VOC classes are left out of the targets, their images stay.
    train = VOCDetection(coco128_voc, [(2007, "train")], ["cat", "dog"])
    assert train.num_classes == 3 and len(train) == 59
    expected = {"cat": 0, "dog": 0}
    for record in train.records:
        names = [obj.findtext("name") for obj in ET.parse(record.annotation).getroot().iter("object")]
        expected["cat"] += names.count("cat")
        expected["dog"] += names.count("dog")
    labels = np.concatenate([r.labels for r in train.records])
    assert {"cat": int((labels == 1).sum()), "dog": int((labels == 2).sum())} == expected
    assert expected["cat"] > 0 and expected["dog"] > 0


def test_objects_of_other_known_classes_are_left_out_and_unknown_names_stay_errors(
    make_voc: Callable[..., Path],
) -> None:
    root = make_voc(
        {
            "a": [("cat", (1, 1, 10, 10), 0), ("dog", (5, 6, 30, 40), 0), ("dog", (1, 1, 100, 10), 0)],
            "b": [("person", (1, 1, 64, 48), 0)],
        }
    )
    with pytest.raises(DatasetError) as caught:
        VOCDetection(root, [(2007, "train")], ["dog"])
    # Only the box outside the image is a problem, named by its place in the XML (the cat was skipped).
    assert [p.message for p in caught.value.problems] == [
        "object 3 box (0, 0, 100, 10) lies outside the 64x48 image"
    ]
    (root / "VOC2007" / "classes.txt").write_text("dog\ncat\n")  # the data's own class list
    with pytest.raises(DatasetError, match="unknown class name 'person'"):
        VOCDetection(root, [(2007, "train")], ["dog"])
    dataset = VOCDetection(
        root, [(2007, "train")], ["dog"], data_classes=["cat", "dog", "person"], skip_bad_samples=True
    )
    assert [r.name for r in dataset.records] == ["b"] and dataset.records[0].num_boxes == 0
