"""YOLO-format data: the layouts Ultralytics accepts, every bad line named by file and line, and coco128's
YOLO copy reading the same boxes as its COCO original."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssd_lightning.cli.check import main as check_main
from ssd_lightning.data import DatasetError, DetectionDataModule
from ssd_lightning.data.sources import COCOSource, YOLOSource
from ssd_lightning.metrics.evaluation import DetectionEvaluator

OPTIONS = {"transform": None, "keep_difficult": True, "skip_bad_samples": False, "verify_images": True}


def _image(path: Path, width: int = 80, height: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))
    return path


def _labels(image: Path, text: str | None) -> None:
    if text is None:
        return
    parts = list(image.parts)
    parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    target = Path(*parts).with_suffix(".txt")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _dataset(root: Path, yaml_text: str, labels: dict[str, str | None]) -> Path:
    for name, text in labels.items():
        _labels(_image(root / name), text)
    (root / "data.yaml").write_text(yaml_text)
    return root


def _by_name(dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {record.name: (record.boxes, record.labels) for record in dataset.records}


def test_folders_lists_names_polygons_and_background(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        "path: .\ntrain: images/train\nval: val.txt\ntest: [images/extra, val.txt]\n"
        "names: {0: cat, 1: dog}\n",
        {
            # a box: centre (0.5, 0.5) of 80x40, 0.25 x 0.5 of it -> x 30..50, y 10..30
            "images/train/a.jpg": "1 0.5 0.5 0.25 0.5\n",
            # a polygon (segmentation label): its bounding box x 8..40, y 4..36
            "images/train/b.jpg": "0 0.1 0.1 0.5 0.2 0.3 0.9\n",
            "images/train/c.jpg": "",  # an empty label file: background
            "images/train/d.jpg": None,  # no label file: background
            "images/val/v.jpg": "0 0.25 0.25 0.5 0.5\n",
            "images/extra/e.jpg": "1 0.5 0.5 1 1\n",
        },
    )
    (root / "val.txt").write_text("./images/val/v.jpg\n")
    source = YOLOSource(root)
    assert source.class_names(None) == ["cat", "dog"]
    train = _by_name(source.load("train", ["cat", "dog"], **OPTIONS))
    assert sorted(train) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    np.testing.assert_allclose(train["a.jpg"][0], [[30, 10, 50, 30]], atol=1e-4)
    assert train["a.jpg"][1].tolist() == [2]  # dog: label 2 (1 is cat, 0 is background)
    np.testing.assert_allclose(train["b.jpg"][0], [[8, 4, 40, 36]], atol=1e-4)
    assert len(train["c.jpg"][0]) == 0 and len(train["d.jpg"][0]) == 0
    assert list(_by_name(source.load("val", ["cat", "dog"], **OPTIONS))) == ["v.jpg"]
    test = _by_name(source.load("test", ["cat", "dog"], **OPTIONS))
    assert sorted(test) == ["e.jpg", "v.jpg"]
    np.testing.assert_allclose(test["e.jpg"][0], [[0, 0, 80, 40]], atol=1e-4)
    # A subset of the classes: the others' lines are left out, labels follow dataset.classes' order.
    only_dog = _by_name(source.load("train", ["dog"], **OPTIONS))
    assert only_dog["a.jpg"][1].tolist() == [1] and len(only_dog["b.jpg"][1]) == 0


def test_test_split_defaults_to_val_and_names_may_be_a_list(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        "train: images/train\nval: images/val\nnames: [cat]\n",
        {"images/train/a.jpg": "0 0.5 0.5 0.5 0.5\n", "images/val/b.jpg": "0 0.5 0.5 0.5 0.5\n"},
    )
    source = YOLOSource(root / "data.yaml")  # the YAML itself, or its folder
    assert source.class_names(None) == ["cat"]
    assert source.reads("test") == source.reads("val") != source.reads("train")
    assert [r.name for r in source.load("test", ["cat"], **OPTIONS).records] == ["b.jpg"]


BAD_LINES = {
    "images/train/a.jpg": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n",  # line 2: class 7 of 2 names
    "images/train/b.jpg": "1 0.5 1.5 0.2 0.2\n",  # line 1: a coordinate beyond the image
    "images/train/c.jpg": "\n0 0.5 0.5 0.2\n",  # line 2: four numbers
    "images/train/d.jpg": "cat 0.5 0.5 0.2 0.2\n",  # line 1: a name, not an index
    "images/train/e.jpg": "0 0.5 0.5 0.2 0.2\n",  # good
}


def test_every_bad_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    root = _dataset(tmp_path, "train: images/train\nval: images/train\nnames: [cat, dog]\n", BAD_LINES)
    with pytest.raises(DatasetError) as raised:
        YOLOSource(root).load("train", ["cat", "dog"], **OPTIONS)
    found = {(Path(p.file).name, p.message.split(":")[0]) for p in raised.value.problems}
    assert found == {("a.txt", "line 2"), ("b.txt", "line 1"), ("c.txt", "line 2"), ("d.txt", "line 1")}
    messages = {Path(p.file).name: p.message for p in raised.value.problems}
    assert "class index 7 is not in names (0-1)" in messages["a.txt"]
    assert "fractions of the image in [0, 1]" in messages["b.txt"]
    # skip_bad_samples keeps the good image only
    kept = YOLOSource(root).load("train", ["cat", "dog"], **{**OPTIONS, "skip_bad_samples": True})
    assert [r.name for r in kept.records] == ["e.jpg"]

    # the checker lists them all and fails
    out = io.StringIO()
    status = check_main(["dataset=yolo", f"dataset.root={root}"], out=out)
    text = out.getvalue()
    assert status == 1
    for name, line in found:
        assert any(name in row and f"{line}:" in row for row in text.splitlines()), (name, line, text)


def test_a_repeated_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        "train: images/train\nval: images/train\nnames: [cat]\n",
        {"images/train/a.jpg": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n"},
    )
    dataset = YOLOSource(root).load("train", ["cat"], **OPTIONS)
    assert len(dataset.records[0].labels) == 1
    assert [p.message for p in dataset.problems] == ["line 2 repeats line 1; dropped"]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (None, "holds no YAML file"),
        ("train: images/train\nnames: [cat]\n", "needs `train` and `val`"),
        ("train: a\nval: a\n", "needs `names`"),
        ("train: a\nval: a\nnames: [cat]\nnc: 2\n", "nc is 2 but names has 1"),
        ("train: a\nval: a\nnames: {0: cat, 2: dog}\n", "indexed 0..1 without gaps"),
        ("train: nowhere\nval: nowhere\nnames: [cat]\n", "neither a folder nor a .txt list"),
    ],
)
def test_a_broken_data_yaml_is_named(tmp_path: Path, yaml_text: str | None, message: str) -> None:
    if yaml_text is not None:
        (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(DatasetError) as raised:
        YOLOSource(tmp_path).load("train", ["cat"], **OPTIONS)
    assert message in str(raised.value)


def test_labels_without_any_label_file_point_at_the_layout(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "a.jpg")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [cat]\n")
    with pytest.raises(DatasetError, match="none of its 1 images has a label file"):
        YOLOSource(tmp_path).load("train", ["cat"], **OPTIONS)


def test_unknown_class_names_are_an_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path, "train: images/t\nval: images/t\nnames: [cat]\n", {"images/t/a.jpg": ""})
    with pytest.raises(DatasetError, match="class 'dgo' is not in its names"):
        YOLOSource(root).class_names(["dgo"])


def test_coco128_yolo_and_coco_read_the_same_boxes(coco128_root: Path) -> None:
    yolo = YOLOSource(coco128_root / "yolo")
    coco = COCOSource(coco128_root / "coco", val_split="train2017")
    names = yolo.class_names(None)
    assert names == coco.class_names(None) and len(names) == 80
    # YOLO leaves crowd boxes out (as Ultralytics does); COCO keeps them flagged difficult.
    from_yolo = _by_name(yolo.load("train", names, **OPTIONS))
    from_coco = _by_name(coco.load("train", names, **{**OPTIONS, "keep_difficult": False}))
    assert from_yolo.keys() == from_coco.keys() and len(from_yolo) == 128
    compared = 0
    for name, (coco_boxes, coco_labels) in from_coco.items():
        yolo_boxes, yolo_labels = from_yolo[name]
        order_c = np.lexsort((*coco_boxes.T[::-1], coco_labels))
        order_y = np.lexsort((*yolo_boxes.T[::-1], yolo_labels))
        assert yolo_labels[order_y].tolist() == coco_labels[order_c].tolist(), name
        np.testing.assert_allclose(yolo_boxes[order_y], coco_boxes[order_c], rtol=0, atol=1e-3, err_msg=name)
        compared += len(coco_labels)
    assert compared == 929


def test_coco128_ground_truth_from_coco_scores_perfectly_on_yolo(coco128_root: Path) -> None:
    """The COCO boxes as detections against the YOLO targets: mAP 1 in every protocol, so the evaluation
    sees the same boxes whichever format the data comes in."""
    names = YOLOSource(coco128_root / "yolo").class_names(None)
    yolo = _by_name(YOLOSource(coco128_root / "yolo").load("train", names, **OPTIONS))
    coco_source = COCOSource(coco128_root / "coco", val_split="train2017")
    assert coco_source.class_names(None) == names
    coco = coco_source.load("train", names, **{**OPTIONS, "keep_difficult": False})
    evaluator = DetectionEvaluator(names)
    for record in coco.records:
        boxes, labels = yolo[record.name]
        evaluator.update(
            [
                {
                    "boxes": torch.from_numpy(record.boxes),
                    "scores": torch.ones(len(record.labels)),
                    "labels": torch.from_numpy(record.labels),
                }
            ],
            [
                {
                    "boxes": torch.from_numpy(boxes),
                    "labels": torch.from_numpy(labels),
                    "difficult": torch.zeros(len(labels), dtype=torch.bool),
                }
            ],
        )
    result = evaluator.compute()
    assert result.map_voc07 == pytest.approx(1.0) and result.map == pytest.approx(1.0)


def test_the_datamodule_takes_format_yolo(coco128_root: Path) -> None:
    datamodule = DetectionDataModule(
        format="yolo", root=str(coco128_root / "yolo"), image_size=64, batch_size=4, classes=["dog", "cat"]
    )
    assert datamodule.classes == ["dog", "cat"] and datamodule.num_classes == 3
    with pytest.raises(ValueError, match="dataset.train_split do not apply to format 'yolo'"):
        DetectionDataModule(format="yolo", root=str(coco128_root / "yolo"), batch_size=4, train_split="x")
