"""Shared fixtures: the real coco128 data that lives beside the project (never inside it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _coco128_path() -> Path:
    env = os.environ.get("SSD_COCO128")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def coco128_root() -> Path:
    """Path of the coco128 folder (holding `coco/` and `voc/`); skips when it is absent."""
    path = _coco128_path()
    if not (path / "coco").is_dir():
        pytest.skip(f"coco128 not found at {path} (set SSD_COCO128)")
    return path
