"""A run killed with SIGKILL mid-epoch resumes from last.ckpt and ends after as many optimiser steps as an
unbroken run."""

from __future__ import annotations

import copy
import csv
import json
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from script_runs import run_script, start_script
from training_helpers import check_ok

EPOCHS = 10
STEPS_PER_EPOCH = 6  # 24 training images, batch 4


def checkpoint_step(path: Path) -> int | None:
    try:  # written atomically, so a file that exists is complete
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except FileNotFoundError:
        return None


@pytest.mark.timeout(900)
def test_sigkill_mid_epoch_then_resume(fast: list[str], tmp_path: Path) -> None:
    args = [
        *fast,
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.check_val_every_n_epoch={EPOCHS}",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "test=false",
        "logger=csv",
        "optimizer.lr=0.004",
        "scheduler=cosine",
        "scheduler.min_lr_factor=0.01",
    ]
    first = tmp_path / "first"
    last = first / "checkpoints" / "last.ckpt"
    killed_at = None
    with start_script("train.py", [*args, f"hydra.run.dir={first}"], cwd=tmp_path) as process:
        while process.poll() is None:
            step = checkpoint_step(last)
            # Mid-epoch, and well before the end of the run.
            if step is not None and step >= 8 and step % STEPS_PER_EPOCH != 0:
                process.send_signal(signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.02)
        code = process.wait(timeout=60)
        assert killed_at is not None, f"the run ended before it could be killed:\n{process.stderr()}"
    assert code == -signal.SIGKILL

    second = tmp_path / "second"
    stdout = check_ok(
        run_script("train.py", [*args, f"ckpt_path={last}", f"hydra.run.dir={second}"], cwd=tmp_path)
    )
    assert "Final mAP" in stdout
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["step"] == EPOCHS * STEPS_PER_EPOCH  # as many steps as an unbroken run

    final = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH and final["epoch"] == EPOCHS
    # The schedule continued where it was: the cosine reached its end (a restarted one would be midway).
    assert final["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.004 * 0.01)
    # The resumed process started at the killed step, it did not train from scratch.
    with open(second / "csv" / "version_0" / "metrics.csv") as stream:
        logged_steps = [int(row["step"]) for row in csv.DictReader(stream) if row.get("train/loss")]
    assert min(logged_steps) >= killed_at


class CaptureStart(pl.Callback):
    """Keeps the weights and optimiser state a fit starts from (after Lightning restored a checkpoint)."""

    captured: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        CaptureStart.captured = {
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),  # its tensors go on changing
            "step": trainer.global_step,
        }


def test_a_resumed_fit_starts_from_the_checkpoints_weights_and_optimiser_state(
    fast: list[str], tmp_path: Path
) -> None:
    from training_helpers import compose_config

    from ssd_lightning.cli.train import train

    common = [*fast, "test=false", "+callbacks.capture._target_=test_resume.CaptureStart"]
    train(compose_config("train", [*common, "trainer.max_epochs=1"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    train(
        compose_config("train", [*common, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "second")
    )
    start = CaptureStart.captured
    assert start["step"] == saved["global_step"] == STEPS_PER_EPOCH
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(start["state_dict"][key], value, rtol=0, atol=0, msg=key)
    (expected,) = saved["optimizer_states"]
    restored = start["optimizer"]
    assert restored["param_groups"] == expected["param_groups"]
    assert restored["state"].keys() == expected["state"].keys() and restored["state"]
    for index, state in expected["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(restored["state"][index][name], value, rtol=0, atol=0)
