"""Checkpoints written before the rooms were rearranged (#23) still evaluate, predict, export and resume:
their network arguments have no `head` or `backbone`, their DataModule arguments hold the model's input size
and normalisation and the retired `predict_root`, and their schedulers name `ssd_lightning.training.optim`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from training_helpers import FittedRun, compose_config

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.export import export
from ssd_lightning.cli.predict import predict
from ssd_lightning.cli.train import train


def _as_written_before(checkpoint: dict) -> dict:
    net = checkpoint["hyper_parameters"]["net"]
    assert "head" in net and "backbone" in net  # what the current code writes
    del net["head"], net["backbone"]
    data = checkpoint["datamodule_hyper_parameters"]
    data.update(image_size=96, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], predict_root=None)
    return checkpoint


def test_a_checkpoint_from_before_the_rearrangement_still_works(fitted_run: FittedRun, tmp_path: Path):
    old = tmp_path / "old.ckpt"
    torch.save(_as_written_before(torch.load(fitted_run.checkpoint, weights_only=True)), old)
    data = [o for o in fitted_run.overrides if o.startswith("dataset")]

    then = evaluate(compose_config("eval", [f"ckpt_path={fitted_run.checkpoint}", *data], tmp_path / "new"))
    now = evaluate(compose_config("eval", [f"ckpt_path={old}", *data], tmp_path / "eval"))
    assert now.map_voc07 == then.map_voc07 > 0  # the same network, rebuilt from the old arguments

    (tmp_path / "predict").mkdir()
    results = predict(compose_config("predict", [f"ckpt_path={old}"], tmp_path / "predict"))  # its test split
    assert json.loads(results.read_text())
    assert export(compose_config("export", [f"ckpt_path={old}", f"output={tmp_path / 'old.onnx'}"], tmp_path))

    longer = [*fitted_run.overrides, f"ckpt_path={old}", "trainer.limit_train_batches=1", "test=false"]
    epochs = torch.load(old, weights_only=True)["epoch"] + 2
    metrics = train(compose_config("train", [*longer, f"trainer.max_epochs={epochs}"], tmp_path / "resumed"))
    assert metrics["step"] > torch.load(old, weights_only=True)["global_step"]
