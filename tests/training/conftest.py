"""Fixtures of the training tests: tiny fast runs on the built-in data."""

from __future__ import annotations

from pathlib import Path

import pytest

# The built-in dataset at a tiny size (generated once per session, away from the user's cache).
TINY_SHAPES = [
    "dataset.shapes.num_train=24",
    "dataset.shapes.num_val=8",
    "dataset.shapes.num_test=8",
    "dataset.shapes.min_side=96",
    "dataset.shapes.max_side=160",
]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shapes")


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
def trained_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of the compact model fitted to the tiny shapes training images (a real mAP on them), for
    tests that compare evaluations: near-zero mAPs would hide differences."""
    from training_helpers import compose_config

    from ssd_lightning.cli.train import train

    folder = tmp_path_factory.mktemp("trained")
    overrides = [
        f"dataset.root={shapes_root}",
        *TINY_SHAPES,
        "model.image_size=96",
        "model.net.width=16",
        "dataset/augmentation=none",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.max_epochs={TRAINED_EPOCHS}",
        f"trainer.check_val_every_n_epoch={TRAINED_EPOCHS}",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0",
        "test=false",
    ]
    train(compose_config("train", overrides, folder))
    return folder / "checkpoints" / "last.ckpt"


TRAINED_EPOCHS = 40
