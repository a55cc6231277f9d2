"""Data that contradicts itself is never trained on silently: a COCO image id or file listed twice is an error
(naming both), a repeated annotation is dropped and counted, a class name no object has is an error naming
the closest real ones, and predicted image ids are unique and keep their file names."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from script_runs import run_module
from training_helpers import FittedRun, check_ok, compose_config, run_script

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.data import COCODetection, DatasetError
from ssd_lightning.data.check import check_datamodule


def coco_copy(coco128_root: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    """coco128's COCO tree with an edited annotation file (the photos linked, not copied)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(coco128_root / "coco" / "train2017")
    data = json.loads((coco128_root / "coco" / "annotations" / "instances_train2017.json").read_text())
    edit(data)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


def test_an_image_id_listed_twice_is_an_error_naming_both_files(coco128_root: Path, tmp_path: Path) -> None:
    def duplicate_id(data: dict) -> None:
        data["images"][1]["id"] = data["images"][0]["id"]  # the boxes of one would train the other

    root = coco_copy(coco128_root, tmp_path, duplicate_id)
    first, second = (
        json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"][i]
        for i in (0, 1)
    )
    with pytest.raises(DatasetError) as caught:
        COCODetection(root, "train2017")
    assert f"image id {first['id']} is listed twice ({first['file_name']}, {second['file_name']})" in str(
        caught.value
    )


def test_a_file_listed_twice_is_an_error(coco128_root: Path, tmp_path: Path) -> None:
    def duplicate_file(data: dict) -> None:
        data["images"][1]["file_name"] = data["images"][0]["file_name"]

    root = coco_copy(coco128_root, tmp_path, duplicate_file)
    with pytest.raises(DatasetError, match=r"file \S+\.jpg is listed twice \(image ids \d+ and \d+\)"):
        COCODetection(root, "train2017")


def test_a_repeated_annotation_is_dropped_counted_and_reported(
    coco128_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repeated: dict = {}

    def repeat_one(data: dict) -> None:
        repeated.update(data["annotations"][0])
        data["annotations"].append({**data["annotations"][0], "id": 999999})

    root = coco_copy(coco128_root, tmp_path, repeat_one)
    with caplog.at_level(logging.WARNING):
        dataset = COCODetection(root, "train2017")
    assert sum(r.num_boxes for r in dataset.records) == 939  # as many as coco128 has, not 940
    assert "dropped 1 duplicate annotation(s)" in caplog.text
    # The checker lists it as a warning.
    cfg = compose_config(
        "train", ["dataset=coco", f"dataset.root={root}", "dataset.val_split=train2017"], tmp_path
    )
    out = io.StringIO()
    errors, warnings = check_datamodule(instantiate_datamodule(cfg), out)
    assert errors == 0 and warnings >= 1
    assert (
        f"annotation id 999999 (image id {repeated['image_id']}) repeats annotation id {repeated['id']}"
        in out.getvalue()
    )


@pytest.mark.timeout(600)
def test_a_misspelt_class_on_voc_data_is_an_error_naming_the_real_one(
    coco128_root: Path, tmp_path: Path
) -> None:
    voc = [
        f"dataset.root={coco128_root / 'voc'}",
        "dataset.train_sets=[[2007,train]]",
        "dataset.num_workers=0",
    ]
    result = run_module(
        "ssd_lightning.cli.check", ["dataset=voc", *voc, "dataset.classes=[cat,dgo]"], cwd=tmp_path
    )
    assert result.returncode == 1
    assert "dataset.classes has 'dgo', but no object here has that class" in result.stdout
    assert "did you mean 'dog'?" in result.stdout
    # Spelt right, it is a subset of the data's classes: fine, dog's objects train as dog.
    check_ok(
        run_module(
            "ssd_lightning.cli.check", ["dataset=voc", *voc, "dataset.classes=[cat,dog]"], cwd=tmp_path
        )
    )


@pytest.mark.timeout(600)
def test_predicted_image_ids_are_unique_and_keep_their_file_names(
    fitted_run: FittedRun, shapes_root: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    source = shapes_root / "VOCshapes" / "JPEGImages" / "test_000000.jpg"
    for name in ("1.jpg", "001.jpg"):  # both are "image 1" by their numbers
        shutil.copy(source, images / name)
    (images / "broken.jpg").write_bytes(b"not an image")  # skipped, counted
    out = tmp_path / "predict"
    result = run_script(
        "predict.py",
        [f"ckpt_path={fitted_run.checkpoint}", f"input={images}", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    output = check_ok(result) + result.stderr
    assert "skipped 1 problem(s)" in output and "broken.jpg" in output
    results = json.loads((out / "detections.json").read_text())
    ids = {entry["file_name"]: entry["image_id"] for entry in results}
    assert set(ids) == {"1.jpg", "001.jpg"} and len(set(ids.values())) == 2
    # Told not to skip, it stops, and its advice is an option predict.py takes.
    stopped = run_script(
        "predict.py",
        [
            f"ckpt_path={fitted_run.checkpoint}",
            f"input={images}",
            "skip_bad_images=false",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    assert stopped.returncode == 1 and "skip_bad_images=true" in stopped.stdout + stopped.stderr
