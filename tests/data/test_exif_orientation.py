"""EXIF orientation: ignored (and explained) for annotated data, applied to photos to predict on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ssd_lightning.cli.predict import draw, image_dataset
from ssd_lightning.data import DatasetError, ImageFolderDataset, VOCDetection, decode_rgb


def write_turned_photo(path: Path, orientation: int = 6) -> np.ndarray:
    """A 64x48 (WxH) stored JPEG tagged to be shown turned; returns the pixels a viewer shows."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:12, :20] = (255, 0, 0)  # a red block at the stored top left
    pixels[30:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def test_size_mismatch_of_a_tagged_image_names_the_orientation(make_voc: Callable[..., Path]) -> None:
    # Annotated on the turned (48x64) view of a stored 64x48 photo: boxes would not fit the pixels.
    root = make_voc({"photo": [("dog", (5, 5, 40, 60), 0)]}, size=(48, 64))
    write_turned_photo(root / "VOC2007" / "JPEGImages" / "photo.jpg")
    with pytest.raises(DatasetError) as caught:
        VOCDetection(root, [(2007, "train")], ["dog"])
    (problem,) = caught.value.problems
    assert "image is 64x48 but photo.xml says 48x64" in problem.message
    assert "EXIF orientation tag (6: shown rotated 90 degrees clockwise)" in problem.message
    # Without a tag the message stays as it was.
    write_turned_photo(root / "VOC2007" / "JPEGImages" / "photo.jpg", orientation=1)
    with pytest.raises(DatasetError) as caught:
        VOCDetection(root, [(2007, "train")], ["dog"])
    assert "EXIF" not in caught.value.problems[0].message


def test_photos_to_predict_on_are_shown_as_tagged(tmp_path: Path) -> None:
    shown = write_turned_photo(tmp_path / "photos" / "turned.jpg")
    assert shown.shape == (64, 48, 3)
    assert decode_rgb(tmp_path / "photos" / "turned.jpg").shape == (48, 64, 3)  # training data: as stored
    for dataset in (
        ImageFolderDataset(tmp_path / "photos", ["dog"]),
        image_dataset(tmp_path / "photos" / "turned.jpg", ["dog"], transform=None),  # predict.py, one file
    ):
        image, target = dataset[0]
        assert np.abs(image.astype(int) - shown.astype(int)).max() <= 2  # same pixels (JPEG decoders)
        assert target["orig_size"].tolist() == [64, 48]
    prediction = {
        "path": str(tmp_path / "photos" / "turned.jpg"),
        "boxes": torch.tensor([[2.0, 2.0, 30.0, 60.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    assert draw(prediction, ["dog"], display_threshold=0.5).shape == (3, 64, 48)
