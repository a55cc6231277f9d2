"""The dataset checker: every problem on its own line naming its file, and the exit status."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

from script_runs import PROJECT_ROOT, run_module

from ssd_lightning.cli.check import main


def _check(*overrides: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = main(list(overrides), out=out)
    return status, out.getvalue().splitlines()


def test_coco128_passes_in_both_formats(coco128_root: Path) -> None:
    status, lines = _check(
        "dataset=voc",
        f"dataset.root={coco128_root / 'voc'}",
        "dataset.train_sets=[[2007,train]]",
        "dataset.val_sets=[[2007,val]]",
        "dataset.test_sets=[[2007,test]]",
    )
    assert status == 0 and lines[-1] == "OK: 0 error(s), 0 warning(s)"
    assert any(
        line.startswith("train (voc 2007/train): 0 error(s)") and "59 images" in line for line in lines
    )

    status, lines = _check(
        "dataset=coco", f"dataset.root={coco128_root / 'coco'}", "dataset.val_split=train2017"
    )
    assert status == 0
    assert any("128 images, 939 objects (10 difficult/crowd)" in line for line in lines)
    assert "val: same data as train" in lines
    # then how well the priors of the model (dataset=coco: SSD300, COCO sizes) reach the training boxes,
    # without the crowd boxes (not training targets), ending with sizes that reach more
    start = lines.index(
        "prior coverage of coco train2017 for model=ssd300: 929 boxes at 300x300 input, 8732 priors, "
        "matching IoU >= 0.5"
    )
    assert re.fullmatch(
        r"  reached by a prior: \d+ of 929 \(\d+\.\d%\), mean best IoU 0\.\d\d", lines[start + 1]
    )
    assert [
        line.split()[0] for line in lines[start + 3 : start + 9]
    ] == "38x38 19x19 10x10 5x5 3x3 1x1".split()
    assert re.fullmatch(r"  suggested prior sizes reach \d+\.\d% \(now \d+\.\d%\):", lines[-3])
    assert re.fullmatch(r"    model\.net\.min_sizes=\[[\d.,]+\] model\.net\.max_sizes=\[[\d.,]+\]", lines[-2])
    assert lines[-1] == "OK: 0 error(s), 0 warning(s)"


def test_every_problem_is_listed_with_its_file_and_the_status_is_1(make_voc: Callable[..., Path]) -> None:
    root = make_voc(
        {
            "ok": [("dog", (1, 1, 10, 10), 0)],
            "unknown": [("dragon", (1, 1, 10, 10), 0)],
            "inverted": [("dog", (20, 1, 10, 10), 0)],
            "zero_width": [("dog", (5, 1, 4, 10), 0), ("cat", (1, 1, 9, 9), 0)],
            "gone": [],
        }
    )
    (root / "VOC2007" / "JPEGImages" / "gone.jpg").unlink()
    status, lines = _check(
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.classes=[dog,cat]",
        "dataset.train_sets=[[2007,train]]",
        "dataset.val_sets=[[2007,val]]",
        "dataset.test_sets=[[2007,train]]",
    )
    annotations = root / "VOC2007" / "Annotations"
    assert status == 1
    assert (
        f"ERROR {annotations / 'unknown.xml'}: object 1 has unknown class name 'dragon' (known: dog, cat)"
        in lines
    )
    assert any(line.startswith(f"ERROR {annotations / 'inverted.xml'}: object 1 box") for line in lines)
    assert f"ERROR {root / 'VOC2007' / 'JPEGImages' / 'gone.jpg'}: image file is missing" in lines
    assert any(line.startswith(f"WARNING {annotations / 'zero_width.xml'}: object 1 box") for line in lines)
    missing_split = root / "VOC2007" / "ImageSets" / "Main" / "val.txt"
    assert f"ERROR {missing_split}: image set file is missing" in lines
    assert "val: unusable (1 error(s))" in lines
    assert lines[-1] == "FAILED: 4 error(s), 1 warning(s)"


def test_a_root_that_does_not_exist_fails_cleanly(tmp_path: Path) -> None:
    status, lines = _check("dataset=coco", f"dataset.root={tmp_path / 'nowhere'}")
    assert status == 1
    assert lines[0] == f"ERROR {tmp_path / 'nowhere'}: dataset root does not exist or is not a folder"
    assert lines[-1] == "FAILED: 1 error(s)"


def test_the_command_line_generates_and_checks_the_shapes_dataset(tmp_path: Path) -> None:
    args = [
        "dataset=shapes",
        f"dataset.root={tmp_path}",
        "dataset.shapes.num_train=4",
        "dataset.shapes.num_val=2",
        "dataset.shapes.num_test=2",
    ]
    result = run_module("ssd_lightning.cli.check", args, cwd=PROJECT_ROOT, env={"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train (voc shapes/train): 0 error(s), 0 warning(s); usable: 4 images" in result.stdout
    assert (tmp_path / "VOCshapes" / "manifest.json").is_file()
