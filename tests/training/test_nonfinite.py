"""A non-finite loss stops the run with a report that says where and why (or its step is undone and counted),
checked on the device and read only every few steps and before checkpoints; under DDP every rank takes the
same decision, whichever rank saw the bad loss."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from training_helpers import compose_config, on_two_cpu_processes, probes_env, run_script

from ssd_lightning.cli.train import train
from ssd_lightning.training.nonfinite import NonFiniteLossError

STEPS = 12  # 2 epochs of 6 steps (the `fast` overrides)


class PoisonSteps(pl.Callback):
    """Makes the localisation predictions infinite at the given optimiser steps (an fp16-overflow stand-in),
    and keeps the weights seen at the start of every step."""

    weights: dict[int, torch.Tensor] = {}

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = set(steps)
        self.trainer: pl.Trainer | None = None
        PoisonSteps.weights = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        pl_module.net.register_forward_hook(self._poison)

    def _poison(self, module: torch.nn.Module, inputs: object, outputs: tuple) -> tuple:
        if not module.training or self.trainer is None or self.trainer.global_step not in self.steps:
            return outputs
        loc, conf = outputs
        return torch.full_like(loc, float("inf")), conf

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        PoisonSteps.weights[trainer.global_step] = pl_module.net.heads[0].loc.weight.detach().clone()


def run(fast: list[str], tmp_path: Path, steps: Sequence[int], *extra: str) -> dict[str, float]:
    poison = [
        "+callbacks.poison._target_=test_nonfinite.PoisonSteps",
        f"+callbacks.poison.steps={list(steps)}",
    ]
    cfg = compose_config(
        "train",
        [*fast, *poison, "callbacks.last_checkpoint.every_n_train_steps=2", "test=false", *extra],
        tmp_path,
    )
    return train(cfg)


@pytest.mark.timeout(600)
def test_a_non_finite_loss_stops_with_a_report(fast: list[str], tmp_path: Path) -> None:
    # Checked every 5 steps: the bad step 7 is found at step 8, where a checkpoint is due (and not written).
    with pytest.raises(NonFiniteLossError) as caught:
        run(fast, tmp_path, [7], "trainer.log_every_n_steps=5")
    report = str(caught.value)
    assert report.startswith("Non-finite training loss or gradient at step 7 (epoch 2)")
    assert "loss_loc=inf" in report and "loss_loc went bad" in report
    assert "largest |loc| prediction inf" in report
    assert "learning rate: weight " in report
    # The batch of step 7 (the second of epoch 2): its images with their files and boxes.
    images = [line for line in report.splitlines() if line.startswith("    image ")]
    assert len(images) == 4 and all("VOCshapes/JPEGImages/train_" in line for line in images)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"last finite checkpoint: {last} (step 6)" in report
    assert "callbacks.nonfinite.mode=skip" in report and "a learning rate too high" in report
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 6  # nothing written after the bad step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.timeout(600)
def test_skipped_steps_are_undone_and_counted(fast: list[str], tmp_path: Path) -> None:
    metrics = run(fast, tmp_path, [3, 9], "callbacks.nonfinite.mode=skip", "trainer.log_every_n_steps=4")
    assert metrics["step"] == STEPS and metrics["train/nonfinite_steps"] == 2
    weights = PoisonSteps.weights
    torch.testing.assert_close(weights[4], weights[3], rtol=0, atol=0)  # step 3 changed nothing
    assert not torch.equal(weights[3], weights[2])  # the steps around it did train
    assert torch.isfinite(weights[STEPS - 1]).all()


def test_too_many_skipped_steps_in_a_row_stop_the_run(fast: list[str], tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteLossError, match=r"at step 2 \(epoch 1\): 3 non-finite steps in a row"
    ) as caught:
        run(fast, tmp_path, [2, 3, 4], "callbacks.nonfinite.mode=skip", "callbacks.nonfinite.skip_limit=3")
    assert len([line for line in str(caught.value).splitlines() if line.startswith("    image ")]) == 4


def ddp_run(fast: list[str], tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """2 gloo ranks; rank 1 alone sees a NaN loss at step 2 (its gradients stay finite)."""
    run_dir = tmp_path / "run"
    args = [
        *on_two_cpu_processes(fast),
        "+callbacks.poison._target_=probes.PoisonLossOnRank",
        "+callbacks.poison.rank=1",
        "+callbacks.poison.steps=[2]",
        "test=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    # A rank that stopped alone would leave the other waiting for it: the timeout bounds the test.
    return run_script("train.py", args, cwd=tmp_path, env=probes_env(), timeout=300), run_dir


@pytest.mark.timeout(600)
def test_under_ddp_one_rank_s_bad_loss_stops_every_rank(fast: list[str], tmp_path: Path) -> None:
    result, _ = ddp_run(fast, tmp_path, "trainer.log_every_n_steps=1")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Non-finite training loss or gradient at step 2 on rank 1 of 2" in output
    assert "loss_loc=nan" in output  # rank 1's own report names its loss
    assert "finite on rank 0" in output  # rank 0's says the batch to look at is rank 1's


@pytest.mark.timeout(600)
def test_under_ddp_one_rank_s_bad_step_is_undone_on_every_rank(fast: list[str], tmp_path: Path) -> None:
    result, run_dir = ddp_run(fast, tmp_path, "callbacks.nonfinite.mode=skip", "trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stdout + result.stderr
    weights = [torch.load(run_dir / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert torch.equal(weights[0], weights[1])  # both ranks undid step 2: they never drifted apart
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/nonfinite_steps"] == 1
