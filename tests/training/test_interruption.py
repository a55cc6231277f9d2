"""Signals: SIGTERM, Ctrl-C and SLURM's pre-emption warning end a run after the optimiser step in flight, with
a checkpoint of that step, a non-zero exit status and a line saying where it is; the handler itself does
nothing else."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from script_runs import start_script
from training_helpers import check_ok, compose_config, run_script

from ssd_lightning.cli.train import train
from ssd_lightning.training.interruption import RunInterrupted, StopOnSignal


def test_the_handler_only_remembers_the_signal(tmp_path: Path) -> None:
    stop = StopOnSignal(tmp_path / "last.ckpt")
    stop.handle(signal.SIGTERM)
    stop.handle(signal.SIGINT)  # a later, different signal does not replace the first
    assert stop.received == signal.SIGTERM and not list(tmp_path.iterdir())
    impatient = StopOnSignal(tmp_path / "last.ckpt")
    impatient.handle(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        impatient.handle(signal.SIGINT)


@pytest.mark.timeout(600)
def test_a_signal_in_the_middle_of_a_step_saves_that_step_whole(fast: list[str], tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *fast,
            "+callbacks.signal._target_=probes.SignalAtStep",
            f"+callbacks.signal.signum={int(signal.SIGTERM)}",
            "+callbacks.signal.step=3",  # after the backward pass of step 4, before its weights change
            "callbacks.last_checkpoint.every_n_train_steps=100",
        ],
        tmp_path,
    )
    with pytest.raises(RunInterrupted) as caught:
        train(cfg)
    assert caught.value.exit_code == 128 + signal.SIGTERM
    saved = torch.load(caught.value.checkpoint, weights_only=False)
    assert caught.value.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert saved["global_step"] == 4  # the step in flight finished, then the run stopped
    progress = saved["loops"]["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]
    assert progress["optimizer"]["step"]["total"]["completed"] == 4
    assert not list((tmp_path / "checkpoints").glob("best-*"))  # no validation was started on the way out


@pytest.mark.timeout(900)
def test_sigterm_saves_exits_143_and_the_run_resumes(fast: list[str], tmp_path: Path) -> None:
    args = [*fast, "trainer.max_epochs=20", "callbacks.last_checkpoint.every_n_train_steps=5", "test=false"]
    runs = tmp_path / "outputs" / "train" / "runs" / "compact_shapes"
    with start_script("train.py", args, cwd=tmp_path) as process:
        deadline = time.time() + 600
        while not list(runs.glob("*/checkpoints/last.ckpt")):  # training: the handler is installed
            assert process.poll() is None and time.time() < deadline, process.stderr()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends
        code = process.wait(timeout=120)
        output = process.stdout() + process.stderr()
    assert code == 143, output  # not 0: `train.py && eval.py` stops here
    (run,) = runs.iterdir()
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert (
        f"SIGTERM: stopped after the step in flight and saved {checkpoint}; resume with ckpt_path=" in output
    )
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 0 < step < 20 * 6
    check_ok(
        run_script("train.py", [*args, "trainer.max_epochs=21", f"ckpt_path={checkpoint}"], cwd=tmp_path)
    )
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 21 * 6
