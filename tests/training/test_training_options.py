"""What users of Lightning and detection frameworks expect: EMA weights, torch.compile, the learning rate of
every parameter group, COCO AP by object size and AR@100, their own Trainer plugins, a backbone lr
multiplier and freezing."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.plugins.io import TorchCheckpointIO
from training_helpers import compose_config

from ssd_lightning.cli.build import build_module, build_trainer, instantiate_datamodule
from ssd_lightning.cli.train import train
from ssd_lightning.training.checkpointing import AtomicCheckpointIO


@pytest.mark.timeout(900)
def test_ema_lr_monitor_and_coco_sizes_in_one_run(
    fast: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_config(
        "train",
        [
            *fast,
            "callbacks=ema",
            "callbacks.progress_bar=null",
            "callbacks.ema.update_starting_at_step=0",
            "logger=csv",
            "model.backbone_lr_mult=0.5",
        ],
        tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        metrics = train(cfg)
    # EMA: checkpoints saved during training hold the averaged weights, and the raw ones beside them to
    # resume training; the final model is the average.
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    during = torch.load(best, weights_only=False)
    assert {"current_model_state", "averaging_state"} <= set(during)
    key = "net.heads.0.conf.weight"
    assert not torch.equal(during["state_dict"][key], during["current_model_state"][key])
    # The lr of every parameter group, named, at every logging step.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as stream:
        columns = set(next(csv.reader(stream)))
    groups = {c.removeprefix("lr-AdamW/") for c in columns if c.startswith("lr-AdamW/")}
    assert groups == {"weight", "norm_bias", "backbone_weight", "backbone_norm_bias"}, columns
    # COCO AP by object size and AR@100: logged, in metrics.json and printed.
    for name in ("map_small", "map_medium", "map_large", "mar_100"):
        assert f"val/{name}" in metrics and f"test/{name}" in metrics
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/mar_100"] == metrics["test/mar_100"]
    assert "AP COCO small / medium / large" in caplog.text and "AR COCO @100" in caplog.text


def test_backbone_lr_multiplier_and_freezing(fast: list[str], shapes_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", [*fast, "model.backbone_lr_mult=0.1", "~scheduler"], tmp_path)
    module = build_module(cfg, instantiate_datamodule(cfg))
    optimizer = module.configure_optimizers()
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    lr = cfg.optimizer.lr
    assert lrs == pytest.approx(
        {"weight": lr, "norm_bias": lr, "backbone_weight": 0.1 * lr, "backbone_norm_bias": 0.1 * lr}
    )
    backbone = {id(p) for p in module.net.backbone.parameters()}
    for group in optimizer.param_groups:
        assert all((id(p) in backbone) == group["name"].startswith("backbone") for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.net.parameters()))

    frozen_cfg = compose_config("train", [*fast, "model.freeze_backbone=true", "~scheduler"], tmp_path)
    frozen = build_module(frozen_cfg, instantiate_datamodule(frozen_cfg))
    trained = [p for g in frozen.configure_optimizers().param_groups for p in g["params"]]
    assert not {id(p) for p in frozen.net.backbone.parameters()} & {id(p) for p in trained}
    frozen.train()
    assert not frozen.net.backbone.training and frozen.net.heads.training  # BatchNorm statistics stay


def test_user_plugins_are_merged_with_ours(tmp_path: Path) -> None:
    environment = "lightning_fabric.plugins.environments.LightningEnvironment"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    cfg = compose_config("train", [*ddp, f"trainer.plugins=[{{_target_: {environment}}}]"], tmp_path)
    trainer = build_trainer(cfg.trainer, [], [])
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # ours is still there
    own_io = "pytorch_lightning.plugins.io.TorchCheckpointIO"
    cfg = compose_config("train", ["trainer=cpu", f"trainer.plugins=[{{_target_: {own_io}}}]"], tmp_path)
    io = build_trainer(cfg.trainer, [], []).strategy.checkpoint_io
    assert type(io) is TorchCheckpointIO  # a checkpoint writer of the user's replaces ours


@pytest.mark.timeout(900)
def test_compiled_network_trains_on_the_cpu(fast: list[str], tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [*fast, "model.compile=true", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false"],
        tmp_path,
    )
    reference = build_module(compose_config("train", fast, tmp_path), instantiate_datamodule(cfg))
    compiled = build_module(cfg, instantiate_datamodule(cfg))
    compiled.net.load_state_dict(reference.net.state_dict())  # same keys: compilation is in place
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size)
    for ours, theirs in zip(compiled.net.eval()(images), reference.net.eval()(images), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert train(cfg)["step"] == 2
