"""Past 32 GPUs: a global batch that does not divide is rounded and the warning says what that means for
the lr; with scale_lr=true the lr and every step count of the schedule follow the global batch (the recipe's
epochs); BatchNorm is synchronised where each GPU sees a few images; validation and checkpoints count
optimiser steps; one run, one folder."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from probes import Recorder
from training_helpers import check_ok, compose_config, on_two_cpu_processes, run_script

from ssd_lightning import build_ssd
from ssd_lightning.cli import resolvers
from ssd_lightning.cli.build import build_module, instantiate_datamodule, trainer_arguments
from ssd_lightning.cli.train import follow_the_global_batch, train
from ssd_lightning.data.batch_plan import plan_batch
from ssd_lightning.training.scaling import SYNC_BATCHNORM_BELOW, scale_schedule, wants_sync_batchnorm


def paper_recipe(coco128_root: Path, tmp_path: Path, *extra: str):
    return compose_config(
        "train",
        [
            "experiment=ssd300_coco",
            f"dataset.root={coco128_root / 'coco'}",
            "dataset.val_split=train2017",
            "model.backbone_weights=null",
            *extra,
        ],
        tmp_path,
    )


def test_step_counts_scale_and_fractions_stay() -> None:
    schedule = {
        "global_batch_size": 32,
        "max_epochs": -1,
        "max_steps": 120000,
        "lr_steps": [80000, 100000],
        "warmup_steps": 500,
        "val_every_n_epochs": None,
        "val_every_n_steps": 10000,
        "checkpoint_every_n_steps": 2000,
    }
    assert scale_schedule(schedule, 0.5) == {
        **schedule,
        "max_steps": 60000,
        "lr_steps": [40000, 50000],
        "warmup_steps": 250,
        "val_every_n_steps": 5000,
        "checkpoint_every_n_steps": 1000,
    }
    fractions = {"max_steps": -1, "max_epochs": 65, "lr_steps": [0.66, 0.83], "warmup_steps": 0.05}
    assert (
        scale_schedule(fractions, 0.25) == fractions
    )  # epochs and fractions of the run follow by themselves


def test_at_64_gpus_with_scale_lr_the_paper_recipe_keeps_its_epochs(
    coco128_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = paper_recipe(
        coco128_root,
        tmp_path,
        "scale_lr=true",
        "dataset.global_batch_size=64",
        "trainer.precision=bf16-mixed",
    )
    plan = plan_batch(64, None, devices=8, nodes=8)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        follow_the_global_batch(cfg, plan)
    # 400k steps of 32 images = 200k steps of 64: the same epochs, every step count halved.
    assert (cfg.schedule.max_steps, list(cfg.schedule.lr_steps)) == (200000, [140000, 180000])
    assert (cfg.schedule.warmup_steps, cfg.schedule.val_every_n_steps) == (250, 10000)
    assert cfg.schedule.checkpoint_every_n_steps == 1000
    assert "max_steps 400000 -> 200000, lr_steps [280000, 360000] -> [140000, 180000]" in caplog.text
    arguments = trainer_arguments(cfg.trainer)
    assert arguments["max_steps"] == 200000 and arguments["val_check_interval"] == 10000
    data = instantiate_datamodule(cfg)
    data.resolve_batch_size(8, 8)
    module = build_module(cfg, data, plan.global_batch)
    assert module.optimizer_factory.keywords["lr"] == pytest.approx(2e-3)  # 1e-3 x 64 / 32
    scheduler = module.scheduler_factory(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 1)
    assert scheduler._schedulers[1].milestones == {140000: 1, 180000: 1}


def test_without_scale_lr_a_larger_batch_says_it_trains_more_epochs(
    coco128_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = paper_recipe(coco128_root, tmp_path, "dataset.global_batch_size=64")
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        follow_the_global_batch(cfg, plan_batch(64, None, devices=64))
    assert cfg.schedule.max_steps == 400000  # as configured...
    assert (
        "its steps cover 2x the recipe's epochs at optimizer.lr=0.001 as given" in caplog.text
    )  # ...and said


@pytest.mark.parametrize(
    ("scale_lr", "lr_text"),
    [
        ("false", "at lr 0.001 as given (optimizer.lr, set for 32 images per step; scale_lr=true scales it)"),
        ("true", "at lr 0.002: optimizer.lr=0.001 x 64 / 32 (scale_lr)"),
    ],
)
def test_a_batch_rounded_for_64_gpus_says_the_new_batch_and_its_lr(
    scale_lr: str, lr_text: str, coco128_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = paper_recipe(coco128_root, tmp_path, f"scale_lr={scale_lr}")
    plan = plan_batch(int(cfg.dataset.global_batch_size), None, devices=8, nodes=8)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        follow_the_global_batch(cfg, plan)
    assert (
        "dataset.global_batch_size=32 does not divide over 64 processes: the run takes a global batch of 64 "
        f"(1 per device) {lr_text}. To choose: dataset.global_batch_size=<a multiple of 64>" in caplog.text
    )


@pytest.mark.parametrize(
    ("arch", "processes", "per_device", "on_gpu", "wanted"),
    [
        ("compact", 64, 3, True, True),  # BatchNorm, 3 images per GPU
        ("compact", 8, SYNC_BATCHNORM_BELOW, True, False),  # enough images per GPU
        ("compact", 1, 3, True, False),  # one process: nothing to synchronise
        ("compact", 2, 4, False, False),  # CPU processes: torch's SyncBatchNorm needs GPUs
        ("vgg16", 64, 1, True, False),  # the paper's VGG16 has no BatchNorm
    ],
)
def test_batchnorm_is_synchronised_where_each_gpu_sees_few_images(
    arch: str, processes: int, per_device: int, on_gpu: bool, wanted: bool
) -> None:
    network = build_ssd(size=96 if arch == "compact" else 300, num_classes=3, arch=arch)
    decision, why = wants_sync_batchnorm(network, processes, per_device, on_gpu)
    assert decision is wanted, why
    frozen = build_ssd(size=96, num_classes=3, arch="compact").requires_grad_(False)
    assert wants_sync_batchnorm(frozen, 64, 3, True)[0] is False  # no BatchNorm that trains


@pytest.mark.timeout(600)
def test_validation_and_checkpoints_count_optimiser_steps_when_accumulating(
    fast: list[str], tmp_path: Path
) -> None:
    cfg = compose_config(
        "train",
        [
            *fast,
            "trainer.accumulate_grad_batches=2",  # 6 batches of 4 per epoch: 3 optimiser steps
            "trainer.max_epochs=null",
            "trainer.max_steps=6",
            "trainer.check_val_every_n_epoch=null",
            "schedule.val_every_n_steps=2",
            "callbacks.last_checkpoint.every_n_train_steps=3",
            "+callbacks.recorder._target_=probes.Recorder",
            "test=false",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["step"] == 6
    assert Recorder.validation_steps == [2, 4, 6]  # every 2 optimiser steps, not every 2 batches
    written = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert written["global_step"] == 6


def test_a_run_folder_is_taken_once_and_kept_however_often_it_is_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Clock:  # a second later at every reading: DDP's launcher re-reads hydra.run.dir seconds later
        now_ = datetime(2026, 12, 6, 12, 0, 0)

        @classmethod
        def now(cls) -> datetime:
            cls.now_ += timedelta(seconds=1)
            return cls.now_

    monkeypatch.setattr(resolvers, "datetime", Clock)
    monkeypatch.setattr(resolvers, "_claimed", {})
    for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    runs = str(tmp_path / "runs")
    hydra = OmegaConf.create({"runs": runs, "dir": "${ssd.run_dir:${runs},null}"})
    first = hydra.dir
    assert OmegaConf.create({"runs": runs, "dir": "${ssd.run_dir:${runs},null}"}).dir == first
    assert [p.name for p in Path(runs).iterdir()] == ["2026-12-06_12-00-01"]
    # Another launch in the same second (a frozen clock here) gets a folder of its own.
    monkeypatch.setattr(resolvers, "_claimed", {})
    Clock.now_ = datetime(2026, 12, 6, 12, 0, 0)
    assert resolvers.new_folder(runs) == f"{runs}/2026-12-06_12-00-01_2"


@pytest.mark.timeout(900)
def test_every_rank_of_a_ddp_run_writes_into_one_folder(fast: list[str], tmp_path: Path) -> None:
    args = [*on_two_cpu_processes(fast), "trainer.max_epochs=1"]
    check_ok(run_script("train.py", [*args, "test=false"], cwd=tmp_path))  # no hydra.run.dir
    (run,) = (tmp_path / "outputs" / "train" / "runs" / "compact_shapes").iterdir()
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1's log beside rank 0's
    assert json.loads((run / "metrics.json").read_text())["step"] == 3
