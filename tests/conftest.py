"""Shared fixtures: the real coco128 data that lives beside the project (never inside it), and the rule for
missing test inputs: a failure in CI (`CI` set, as .ci/run does), a skip elsewhere that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
from inputs import IN_CI, require

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every CI run, so a CI failure reproduces and a green run stays
# green; elsewhere they explore new examples each run.
settings.register_profile("ci", derandomize=True)
if IN_CI:
    settings.load_profile("ci")


def _coco128_path() -> Path:
    env = os.environ.get("SSD_COCO128")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def coco128_root() -> Path:
    """Path of the coco128 folder (holding `coco/` and `voc/`)."""
    path = _coco128_path()
    require(
        (path / "coco").is_dir(),
        f"coco128 at {path}",
        "put the coco128 folder (COCO train2017's first 128 images, coco/ and voc/ layouts) there, "
        "or set SSD_COCO128 to where it is",
    )
    return path
