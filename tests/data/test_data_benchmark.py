"""ssd_lightning.data.benchmark (named apart from tests/test_benchmark.py): runs end to end on coco128
and reports a rate; no timing is asserted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssd_lightning.data.benchmark import main


def _rates(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"([0-9.]+) images/s", text)]


def test_benchmark_on_coco128_coco(coco128_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(coco128_root / "coco"), "--passes", "1", "--size", "128"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("coco train2017: 128 images, decode + SSD augmentation at 128px")
    assert all(rate > 0 for rate in _rates(output)) and "per worker by CPU time" in output


def test_benchmark_on_coco128_voc_with_a_dataloader(
    coco128_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = [
        "--root",
        str(coco128_root / "voc"),
        "--format",
        "voc",
        "--split",
        "2007/val",
        "--passes",
        "1",
    ]
    assert main([*arguments, "--workers", "1"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("voc 2007/val: 19 images") and "DataLoader, 1 workers" in output
    assert len(_rates(output)) == 2 and all(rate > 0 for rate in _rates(output))
