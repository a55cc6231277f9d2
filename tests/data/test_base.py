"""Image decoding, the up-front file checks and the box validation shared by every loader."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssd_lightning.data.base import (
    DatasetError,
    DetectionDataset,
    ImageFolderDataset,
    ImageRecord,
    Problem,
    decode_rgb,
    read_image_size,
)


def _jpeg(path: Path, width: int = 40, height: int = 30) -> Path:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return path


def _record(path: Path, boxes: list[list[float]], width: int = 40, height: int = 30, **kwargs) -> ImageRecord:
    count = len(boxes)
    return ImageRecord(
        path=path,
        annotation=path.with_suffix(".xml"),
        name=path.stem,
        image_id=kwargs.pop("image_id", 0),
        width=width,
        height=height,
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=np.arange(1, count + 1, dtype=np.int64),
        difficult=np.array(kwargs.pop("difficult", [False] * count), bool),
    )


def test_grayscale_rgba_png_and_16bit_decode_as_rgb(tmp_path: Path) -> None:
    gray = np.full((12, 10), 77, np.uint8)
    cv2.imwrite(str(tmp_path / "gray.jpg"), gray)
    rgba = np.zeros((12, 10, 4), np.uint8)
    rgba[..., 2] = 200  # red in OpenCV's BGRA order
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((12, 10, 3), 65535, np.uint16))

    decoded_gray = decode_rgb(tmp_path / "gray.jpg")
    decoded_rgba = decode_rgb(tmp_path / "rgba.png")
    decoded_deep = decode_rgb(tmp_path / "deep.png")

    assert decoded_gray.shape == (12, 10, 3) and decoded_gray.dtype == np.uint8
    assert np.abs(decoded_gray.astype(int) - 77).max() <= 2
    assert decoded_rgba.shape == (12, 10, 3)
    assert decoded_rgba[0, 0].tolist() == [200, 0, 0]  # channel order is RGB
    assert decoded_deep.dtype == np.uint8 and decoded_deep.max() == 255


def test_undecodable_file_error_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="bad.jpg: OpenCV cannot decode"):
        decode_rgb(bad)


def test_read_image_size_reports_missing_corrupt_and_truncated(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    trailing = tmp_path / "trailing.jpg"  # bytes after the end marker: still a valid JPEG
    trailing.write_bytes(good.read_bytes() + b"\x00" * 10000)

    assert read_image_size(good) == (40, 30)
    assert read_image_size(trailing) == (40, 30)
    assert read_image_size(tmp_path / "absent.jpg") == "image file is missing"
    assert "truncated" in read_image_size(truncated)
    assert "not a readable image" in read_image_size(garbage)


def test_boxes_slightly_outside_are_clipped_and_degenerate_ones_dropped_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _jpeg(tmp_path / "img.jpg")
    boxes = [[-1.5, 2, 10, 31], [5, 5, 5, 20], [38, 3, 41, 9], [40, 10, 41, 12]]
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        dataset = DetectionDataset([_record(path, boxes)], ["a", "b", "c", "d"])

    record = dataset.records[0]
    # kept: the first (clipped to the image) and the third; the zero-width one and the one that is
    # zero-width once clipped are dropped, with their labels
    np.testing.assert_allclose(record.boxes, [[0, 2, 10, 30], [38, 3, 40, 9]])
    assert record.labels.tolist() == [1, 3]
    assert [p.severity for p in dataset.problems] == ["warning", "warning"]
    assert "dropped 2 degenerate box(es)" in caplog.text
    assert "img.xml" in caplog.text


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([30, 5, 10, 20], "xmax < xmin or ymax < ymin"),
        ([5, 25, 10, 20], "xmax < xmin or ymax < ymin"),
        ([5, 5, 60, 20], "lies outside the 40x30 image"),
        ([-20, -20, -10, -10], "lies outside the 40x30 image"),
        ([5, float("nan"), 10, 20], "missing or non-numeric"),
    ],
)
def test_broken_boxes_are_errors_naming_the_annotation_file(
    tmp_path: Path, box: list[float], message: str
) -> None:
    path = _jpeg(tmp_path / "img.jpg")
    with pytest.raises(DatasetError) as caught:
        DetectionDataset([_record(path, [[1, 1, 8, 8], box])], ["a", "b"])
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "img.xml")
    assert message in problem.message and "object 2" in problem.message
    assert message in str(caught.value)


def test_every_problem_is_reported_at_once_before_any_item_is_read(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    wrong_size = _jpeg(tmp_path / "wrong_size.jpg", width=50)
    records = [
        _record(good, [[1, 1, 5, 5]], image_id=0),
        _record(tmp_path / "missing.jpg", [], image_id=1),
        _record(wrong_size, [], image_id=2),
        _record(_jpeg(tmp_path / "box.jpg"), [[9, 9, 1, 1]], image_id=3),
    ]
    with pytest.raises(DatasetError) as caught:
        DetectionDataset(records, ["a"], problems=[Problem("split.txt", "from the parser")], name="mine")

    lines = [str(p) for p in caught.value.problems]
    assert lines[0] == "split.txt: from the parser"
    assert any(line.startswith(str(tmp_path / "missing.jpg")) and "missing" in line for line in lines)
    assert any(line.startswith(str(wrong_size)) and "is 50x30" in line and "40x30" in line for line in lines)
    assert any(line.startswith(str(tmp_path / "box.xml")) for line in lines)
    assert len(lines) == 4
    assert str(caught.value).startswith("mine: 4 problem(s)")


def test_skip_bad_samples_keeps_the_good_images_and_logs_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [
        _record(_jpeg(tmp_path / "good.jpg"), [[1, 1, 5, 5]], image_id=7),
        _record(tmp_path / "missing.jpg", [], image_id=8),
        _record(_jpeg(tmp_path / "box.jpg"), [[9, 9, 1, 1]], image_id=9),
    ]
    with caplog.at_level(logging.WARNING, logger="ssd_lightning.data"):
        dataset = DetectionDataset(records, ["a"], skip_bad_samples=True, name="mine")

    assert [r.image_id for r in dataset.records] == [7]
    assert len(dataset.errors) == 2
    assert "mine: skipped 2 problem(s)" in caplog.text


def test_unknown_sizes_are_read_from_the_header_and_checked_without_header_reads(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "img.jpg", width=33, height=21)
    record = _record(path, [[1, 1, 30, 20]], width=0, height=0)
    dataset = DetectionDataset([record], ["a"], verify_images=False)
    assert (dataset.records[0].width, dataset.records[0].height) == (33, 21)
    with pytest.raises(DatasetError, match="image file is missing"):
        DetectionDataset([_record(tmp_path / "gone.jpg", [])], ["a"], verify_images=False)


def test_item_without_transform_is_rgb_array_and_pixel_target(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "img.jpg")
    dataset = DetectionDataset([_record(path, [[1, 2, 10, 20]], image_id=5, difficult=[True])], ["a"])
    image, target = dataset[0]
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(target["boxes"], [[1, 2, 10, 20]])
    assert target["labels"].tolist() == [1] and target["difficult"].tolist() == [True]
    assert target["image_id"] == 5 and target["orig_size"].tolist() == [30, 40]


def test_dropping_difficult_objects_can_leave_a_valid_empty_image(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "img.jpg")
    record = _record(path, [[1, 2, 10, 20], [3, 3, 9, 9]], difficult=[True, True])
    dataset = DetectionDataset([record], ["a", "b"], keep_difficult=False)
    _, target = dataset[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_image_changed_after_validation_fails_with_its_name(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "img.jpg")
    dataset = DetectionDataset([_record(path, [])], ["a"])
    _jpeg(path, width=20)
    with pytest.raises(DatasetError, match="img.jpg: decoded image is 20x30, annotation says 40x30"):
        dataset[0]


def test_image_folder_dataset_lists_images_recursively(tmp_path: Path) -> None:
    _jpeg(tmp_path / "b.jpg")
    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "a.png"), np.zeros((8, 6, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, ["a"])
    assert [r.path.name for r in dataset.records] == ["b.jpg", "a.png"]
    image, target = dataset[1]
    assert image.shape == (8, 6, 3) and target["boxes"].shape == (0, 4) and target["image_id"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: holds no images"):
        ImageFolderDataset(tmp_path / "empty", ["a"])
    with pytest.raises(DatasetError, match="absent: folder does not exist"):
        ImageFolderDataset(tmp_path / "absent", ["a"])
