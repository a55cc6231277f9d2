"""Functions shared by the training tests: composing the real conf/ tree and running the scripts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from script_runs import PROJECT_ROOT, run_script

from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir

CONF_DIR = str(config_dir())

__all__ = ["PROJECT_ROOT", "run_script"]  # re-exported for the training tests


def compose_config(config_name: str, overrides: Sequence[str], output_dir: Path | None = None) -> DictConfig:
    """`conf/<config_name>.yaml` with `overrides`, as `@hydra.main` would see it, writing to `output_dir`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=HYDRA_VERSION_BASE):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` interpolations resolve against it
    with open_dict(cfg):
        del cfg.hydra
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir.parent / "outputs")
    return cfg


def check_ok(result: subprocess.CompletedProcess) -> str:
    """stdout of a script run that must have succeeded (its output is shown when it did not)."""
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"exit {result.returncode}\n{output}"
    return result.stdout


@dataclass(frozen=True)
class FittedRun:
    """A real `python train.py` run (forked, default run folder under `cwd`) that fitted the compact model to
    the tiny shapes training images, validating on those and the held-out test images: a real mAP to
    compare."""

    cwd: Path
    folder: Path
    stdout: str
    metrics: dict[str, float]
    overrides: tuple[str, ...]

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"


FITTED_EPOCHS = 30


# The built-in dataset at a tiny size (generated once per session, away from the user's cache).
TINY_SHAPES = [
    "dataset.shapes.num_train=24",
    "dataset.shapes.num_val=8",
    "dataset.shapes.num_test=8",
    "dataset.shapes.min_side=96",
    "dataset.shapes.max_side=160",
]


def ensure_tiny_shapes(root: Path) -> None:
    """The tiny shapes data of TINY_SHAPES in `root` (generated once, then found in place)."""
    from ssd_lightning.data.shapes import ensure_shapes_dataset

    settings = {option.split("=")[0].split(".")[-1]: int(option.split("=")[1]) for option in TINY_SHAPES}
    ensure_shapes_dataset(root, **settings)


def shapes_as_voc(root: Path, val_sets: str = "[[shapes,train]]") -> list[str]:
    """The tiny shapes data read through dataset=voc, so that validation can use the training images (or the
    `val_sets` given); a short run counted in epochs (schedule=quick), as on any small custom dataset."""
    from ssd_lightning.data.shapes import SHAPE_CLASSES

    return [
        "dataset=voc",
        "schedule=quick",
        f"dataset.root={root}",
        f"dataset.classes=[{','.join(SHAPE_CLASSES)}]",
        "dataset.train_sets=[[shapes,train]]",
        f"dataset.val_sets={val_sets}",
        "dataset.test_sets=[[shapes,test]]",
        "dataset.num_workers=0",
    ]


def on_two_cpu_processes(fast: Sequence[str]) -> list[str]:
    """The `fast` overrides as a DDP run of two CPU processes (gloo)."""
    single = [a for a in fast if not a.startswith(("trainer.devices", "trainer.accelerator"))]
    return ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *single]


def probes_env() -> dict[str, str]:
    """The environment in which the other DDP ranks (new interpreters) import tests/training/probes.py."""
    here = str(Path(__file__).resolve().parent)
    return {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
