"""Nothing is lost: a signal at any point of training leaves a checkpoint the run resumes from and a non-zero
exit status; a full disk says where and how much space is needed (console and train.log) and keeps the
checkpoint written before; a save killed half-way leaves no temporary file behind."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
from training_helpers import compose_config, run_script

from ssd_lightning.cli.train import train
from ssd_lightning.training.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from ssd_lightning.training.interruption import RunInterrupted

STEPS_PER_EPOCH = 6


def _draws() -> list[tuple[str, int, str]]:
    """Signals at seeded random points: mid-step (after backward, before the weights change) or during a
    validation, with SIGTERM or Ctrl-C."""
    rng = random.Random(20)
    return [
        (
            rng.choice(["step", "validation"]),
            rng.randrange(1, 2 * STEPS_PER_EPOCH - 1),
            rng.choice(["TERM", "INT"]),
        )
        for _ in range(3)
    ] + [("validation", 2 * STEPS_PER_EPOCH, "TERM")]  # during the last validation: no step follows it


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("where", "step", "name"), _draws())
def test_a_signal_anywhere_leaves_a_checkpoint_to_resume_from(
    where: str, step: int, name: str, fast: list[str], tmp_path: Path
) -> None:
    signum = int(getattr(signal, f"SIG{name}"))
    probe = (
        ["+callbacks.signal._target_=probes.SignalAtStep", f"+callbacks.signal.step={step}"]
        if where == "step"
        else ["+callbacks.signal._target_=probes.SignalAtValidation", f"+callbacks.signal.after_step={step}"]
    )
    cfg = compose_config("train", [*fast, *probe, f"+callbacks.signal.signum={signum}"], tmp_path)
    with pytest.raises(RunInterrupted) as caught:
        train(cfg)
    assert caught.value.exit_code == 128 + signum
    saved = torch.load(caught.value.checkpoint, weights_only=True)
    progress = saved["loops"]["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]
    assert progress["optimizer"]["step"]["total"]["completed"] == saved["global_step"] > 0
    assert not list(caught.value.checkpoint.parent.glob(".*.partial"))
    # The run resumes from it and finishes.
    resumed = compose_config("train", [*fast, f"ckpt_path={caught.value.checkpoint}", "test=false"], tmp_path)
    assert train(resumed)["step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.timeout(600)
def test_a_full_disk_names_the_folder_and_the_space_needed(fast: list[str], tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    args = [
        *fast,
        "+callbacks.full._target_=probes.FullDisk",
        f"+callbacks.full.dirpath={checkpoints}",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_script("train.py", args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    expected = f"no space left to write checkpoint {checkpoints / 'last.ckpt'}: it needs about "
    assert expected in output and f"{checkpoints} has " in output and "paths.log_dir=" in output, output
    assert "Traceback" not in output and "unexpected pos" not in output
    assert expected in (tmp_path / "run" / "train.log").read_text()  # the log says it too


def test_a_save_killed_half_way_leaves_no_temporary_file(tmp_path: Path) -> None:
    # What a SIGKILL during torch.save leaves: the killed process's temporary file (its pid is gone).
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    leftover = tmp_path / f".last.ckpt.{gone}.partial"
    leftover.write_bytes(b"")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.ckpt")
    assert not leftover.exists() and torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 1


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)
    (tmp_path / f".last.ckpt.{os.getpid()}.partial").symlink_to("/dev/full")
    with pytest.raises(CheckpointWriteError, match="no space left to write checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2), "big": torch.zeros(10**5)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
