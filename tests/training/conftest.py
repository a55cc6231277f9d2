"""Fixtures of the training tests: tiny fast runs on the built-in data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from training_helpers import (
    FITTED_EPOCHS,
    TINY_SHAPES,
    FittedRun,
    check_ok,
    ensure_tiny_shapes,
    run_script,
    shapes_as_voc,
)


@pytest.fixture(scope="session")
def shapes_root(shared_tmp_path: Path) -> Path:
    """Where the tiny shapes data is generated (once per test run: processes share the generated cache)."""
    return shared_tmp_path / "training_shapes"


@pytest.fixture
def fast(shapes_root: Path) -> list[str]:
    """Overrides for a run of seconds: the compact model at 96 px on the tiny shapes data, one CPU process."""
    return [
        f"dataset.root={shapes_root}",
        *TINY_SHAPES,
        "model.image_size=96",
        "model.net.width=16",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
    ]


@pytest.fixture(scope="session")
def fitted_run(shapes_root: Path, shared_tmp_path: Path) -> FittedRun:
    """One fitted run per test run, shared by the pytest-xdist workers (the first to need it trains it)."""
    with FileLock(shared_tmp_path / "fitted.lock"):
        return _fitted_run(shapes_root, shared_tmp_path / "fitted")


def _fitted_run(shapes_root: Path, cwd: Path) -> FittedRun:
    done = cwd / "stdout.txt"  # written last: a run that failed is run again (and fails again) by the next
    # Validation on the 24 fitted training images and the 8 held-out test images: a mAP well inside (0, 1) at
    # every IoU threshold, which any change of what evaluation counts moves (on the fitted images alone VOC07
    # mAP is 1.0).
    overrides = (
        *shapes_as_voc(shapes_root, val_sets="[[shapes,train],[shapes,test]]"),
        "model=compact",
        "model.image_size=96",
        "model.net.width=16",
        "dataset/augmentation=none",
        "dataset.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.max_epochs={FITTED_EPOCHS}",
        f"trainer.check_val_every_n_epoch={FITTED_EPOCHS}",
        "trainer.num_sanity_val_steps=0",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0",
        "logger=csv",
        "run_name=fitted",
    )
    if not done.exists():
        ensure_tiny_shapes(shapes_root)
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir()
        stdout = check_ok(run_script("train.py", overrides, cwd=cwd, env={"HYDRA_FULL_ERROR": "0"}))
        done.write_text(stdout)
    stdout = done.read_text()
    (folder,) = (cwd / "outputs" / "train" / "runs" / "fitted").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    return FittedRun(cwd, folder, stdout, metrics, overrides)
