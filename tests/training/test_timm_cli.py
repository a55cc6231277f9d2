"""README's timm lines end to end: `model=ssd300 model.net.arch=timm:<name> model.backbone_weights=null`
(SSD heads at 300) and `model=ssdlite320 model.net.arch=timm:<name>` (SSDLite heads at 320) train a few
steps on the built-in data and on coco128's VOC layout, then evaluate and export from their checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import compose_config

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.export import export
from ssd_lightning.cli.train import train

STEPS = [
    "dataset.batch_size=2",
    "dataset.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_steps=2",
    "trainer.max_epochs=null",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("model", "arch", "size"),
    [("ssd300", "timm:resnet18", 300), ("ssdlite320", "timm:convnext_atto", 320)],
    ids=["ssd300", "ssdlite320"],
)
@pytest.mark.parametrize("data", ["built-in", "coco128-voc"])
def test_a_timm_backbone_trains_evaluates_and_exports(
    model: str,
    arch: str,
    size: int,
    data: str,
    shapes_root: Path,
    fast: list[str],
    coco128_root: Path,
    tmp_path: Path,
) -> None:
    if data == "built-in":
        dataset = [a for a in fast if a.startswith("dataset.") and "batch_size" not in a]
    else:
        splits = [f"dataset.{split}_sets=[[2007,trainval]]" for split in ("train", "val", "test")]
        dataset = ["dataset=voc", f"dataset.root={coco128_root / 'voc'}", *splits]
    overrides = [*dataset, f"model={model}", f"model.net.arch={arch}", "model.backbone_weights=null", *STEPS]
    metrics = train(compose_config("train", overrides, tmp_path / "train"))
    assert metrics["step"] == 2 and metrics["test/map_voc07"] == metrics["test/map_voc07"]  # not NaN
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["net"]["arch"] == arch and hparams["net"]["size"] == size

    evaluation = [f"ckpt_path={checkpoint}", *dataset, "dataset.batch_size=2", "trainer.limit_test_batches=2"]
    result = evaluate(compose_config("eval", evaluation, tmp_path / "eval"))
    assert result.map_voc07 == pytest.approx(metrics["test/map_voc07"], abs=1e-6)  # the same weights
    onnx = tmp_path / "model.onnx"
    assert export(compose_config("export", [f"ckpt_path={checkpoint}", f"output={onnx}"], tmp_path)) == onnx
    assert onnx.stat().st_size > 1_000_000
