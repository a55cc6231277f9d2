"""EMA weights (`callbacks=ema`): the test, eval.py, predict.py and export.py score the averaged weights of
the checkpoint they read, and every checkpoint keeps the raw weights beside them, so resuming is exact (the
augmentation's random stream included)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from probes import Recorder
from training_helpers import compose_config, shapes_as_voc

from ssd_lightning.cli.build import load_for_inference
from ssd_lightning.cli.train import train
from ssd_lightning.training.ema import RAW_WEIGHTS_KEY

KEY = "net.heads.0.conf.weight"
EMA = [
    "callbacks=ema",
    "callbacks.progress_bar=null",
    "callbacks.ema.update_starting_at_step=0",
    "callbacks.ema.decay=0.5",  # far from the raw weights after a few steps
    "+callbacks.recorder._target_=probes.Recorder",
]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.timeout(600)
def test_the_final_test_scores_the_ema_weights_of_the_best_checkpoint(
    fast: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        train(compose_config("train", [*fast, *EMA], tmp_path))
    (best_path,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    best = checkpoint(best_path)
    assert not torch.equal(best["state_dict"][KEY], best[RAW_WEIGHTS_KEY][KEY])
    torch.testing.assert_close(Recorder.test_weights, best["state_dict"][KEY], rtol=0, atol=0)
    assert "EMA weights" in caplog.text  # the test's title says which weights it scored
    # The final last.ckpt keeps the raw weights beside the average (a resumed run continues from them).
    last = checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not torch.equal(last["state_dict"][KEY], last[RAW_WEIGHTS_KEY][KEY])
    # eval.py / predict.py / export.py load the average too, and say so.
    eval_cfg = compose_config("eval", [f"ckpt_path={best_path}"], tmp_path / "eval")
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        module, _ = load_for_inference(eval_cfg)
    torch.testing.assert_close(module.state_dict()[KEY], best["state_dict"][KEY], rtol=0, atol=0)
    assert f"{best_path} holds EMA weights (callbacks=ema): using the average" in caplog.text


@pytest.mark.timeout(600)
def test_without_a_best_checkpoint_the_test_scores_the_final_ema_weights(
    shapes_root: Path, fast: list[str], tmp_path: Path
) -> None:
    same_images = shapes_as_voc(shapes_root, val_sets="[[shapes,test]]")  # validation is the test split
    keep = [a for a in fast if not a.startswith("dataset.")]
    train(
        compose_config(
            "train", [*same_images, "model=compact", *keep, *EMA, "dataset.batch_size=4"], tmp_path
        )
    )
    assert not list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    last = checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(Recorder.test_weights, last["state_dict"][KEY], rtol=0, atol=0)
    assert not torch.equal(Recorder.test_weights, last[RAW_WEIGHTS_KEY][KEY])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "without-ema"])
def test_resuming_a_finished_run_is_exact(ema: bool, fast: list[str], tmp_path: Path) -> None:
    """Two epochs straight, or one epoch then a resumed second: the same raw and averaged weights."""
    extra = [
        *(EMA if ema else []),
        "test=false",
        "trainer.check_val_every_n_epoch=1",
        # The same optimisation whatever the run's length: a constant lr (a cosine spans the run it is in).
        "scheduler=warmup_multistep",
        "schedule.lr_steps=[1000]",
        "schedule.warmup_steps=0",
    ]
    straight = tmp_path / "straight"
    train(compose_config("train", [*fast, *extra, "trainer.max_epochs=2"], straight))
    parts = tmp_path / "parts"
    train(compose_config("train", [*fast, *extra, "trainer.max_epochs=1"], parts))
    first = parts / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*fast, *extra, "trainer.max_epochs=2", f"ckpt_path={first}"], parts))
    expected, resumed = checkpoint(straight / "checkpoints" / "last.ckpt"), checkpoint(first)
    assert resumed["global_step"] == expected["global_step"] == 12
    slots = ("state_dict", RAW_WEIGHTS_KEY) if ema else ("state_dict",)
    for slot in slots:
        for name, value in expected[slot].items():
            torch.testing.assert_close(resumed[slot][name], value, rtol=0, atol=0, msg=f"{slot} {name}")
