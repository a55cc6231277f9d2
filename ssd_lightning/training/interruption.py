"""Signals end a run at a step boundary, with a checkpoint it resumes from.

SIGTERM (what schedulers and `kill` send), SIGINT (Ctrl-C) and SLURM's pre-emption warning
(`#SBATCH --signal=USR1@90`) only set a flag in their handler. After the optimiser step in flight, every
rank agrees on it (under DDP a one-number all-reduce every `check_every_n_steps` steps, so no step waits on
the host otherwise), `last.ckpt` is written, a pre-empted SLURM job is requeued (`scontrol requeue`), and the
run stops with `RunInterrupted`: train.py exits with 128 + the signal number and a line naming the checkpoint.
A second Ctrl-C stops at once.

Lightning's own handlers are replaced while training runs: its SLURM handler saves inside the handler,
mid-step (under DDP with a collective inside a signal handler), and its SIGTERM handling exits 0 without a
checkpoint.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssd_lightning.training import launch
from ssd_lightning.training.distributed import all_ranks_max

log = logging.getLogger("ssd_lightning")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path, requeued: bool) -> None:
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        name = signal.Signals(signum).name
        then = (
            "SLURM requeues the job, which resumes from it"
            if requeued
            else "resume with ckpt_path=" + str(checkpoint)
        )
        super().__init__(f"{name}: stopped after the step in flight and saved {checkpoint}; {then}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(pl.Callback):
    """Turns SIGTERM, SIGINT and (under SLURM, `requeue_signal`) pre-emption into a checkpoint at the next
    step boundary and a clean stop (see the module docstring).

    Args:
        checkpoint: the file to write (the run's `last.ckpt`, what `ckpt_path=` resumes from).
        check_every_n_steps: under DDP, how often the ranks agree on a signal (a small all-reduce); a single
            process looks after every step (no cost).
        requeue_signal: SLURM's warning before pre-emption; None outside SLURM.
    """

    def __init__(
        self, checkpoint: str | Path, check_every_n_steps: int = 10, requeue_signal: int | None = None
    ) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.checkpoint = Path(checkpoint)
        self.check_every_n_steps = check_every_n_steps
        self.requeue_signal = requeue_signal
        self.received = 0  # the first signal number, 0 for none
        self._last_checked = -1

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler: remembers the signal, nothing more (a second Ctrl-C interrupts at once)."""
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or int(signum)
        log.warning(
            "%s received: saving a checkpoint after the step in flight, then stopping",
            signal.Signals(signum).name,
        )

    def _install(self) -> None:
        for signum in (*STOP_SIGNALS, *([self.requeue_signal] if self.requeue_signal else [])):
            signal.signal(signum, self.handle)  # Lightning restores the previous handlers at teardown

    # Lightning installs its own handlers just before the sanity check and training: ours go in after.
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_checked:  # accumulating: the optimiser has not stepped
            return
        self._last_checked = step
        if trainer.world_size > 1:
            if step % self.check_every_n_steps:
                return
            agreed = all_ranks_max(torch.tensor(self.received, device=pl_module.device))
            signum = int(agreed)  # the host reads it here only, every check_every_n_steps steps
        else:
            signum = self.received
        if signum:
            self._stop(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during the last validation: no step follows it, the run still stops here, not in a test.
        signum = int(all_ranks_max(torch.tensor(self.received, device=pl_module.device)))
        if signum:
            self._stop(trainer, signum)

    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        requeued = signum == self.requeue_signal and _requeue_slurm_job(trainer)
        raise RunInterrupted(signum, self.checkpoint, requeued)


def _requeue_slurm_job(trainer: pl.Trainer) -> bool:
    """Ask SLURM to requeue this job (rank 0); whether it said yes."""
    job = launch.slurm_job_id()
    if job is None:
        return False
    if not trainer.is_global_zero:
        return True
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.error("SLURM pre-emption: no scontrol on this node, job %s is not requeued", job)
        return False
    if result.returncode:
        log.error("SLURM pre-emption: `scontrol requeue %s` failed: %s", job, result.stderr.strip())
        return False
    log.info("SLURM pre-emption: requeued job %s", job)
    return True
