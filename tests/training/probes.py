"""Callbacks the tests add to real runs (`+callbacks.<name>._target_=probes.<Class>`): faults to inject and
values to record. DDP ranks that Lightning starts as new interpreters import them too (PYTHONPATH)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class PoisonLossOnRank(pl.Callback):
    """At the given optimiser steps on one rank only, the localisation loss becomes NaN while every gradient
    stays finite (a NaN constant outside the graph): the one rank sees a non-finite loss, the others do not.
    At the end each rank writes the sum of its weights to `<run>/weights_rank<r>.pt`."""

    def __init__(self, rank: int, steps: Sequence[int]) -> None:
        self.rank, self.steps = rank, set(steps)
        self.trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        pl_module.criterion.register_forward_hook(self._poison)

    def _poison(self, module: torch.nn.Module, inputs: Any, outputs: tuple) -> tuple:
        trainer = self.trainer
        if trainer is None or trainer.global_rank != self.rank or not trainer.training:
            return outputs
        if trainer.global_step not in self.steps:
            return outputs
        loss_loc, loss_conf = outputs
        return loss_loc + torch.tensor(float("nan"), device=loss_loc.device), loss_conf

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = sum(p.detach().double().sum() for p in pl_module.parameters())
        torch.save(total, Path(trainer.default_root_dir) / f"weights_rank{trainer.global_rank}.pt")


class SignalAtStep(pl.Callback):
    """Sends `signum` to this process in the middle of optimiser step `step` (after backward, before the
    optimiser updates the weights): a signal at the worst moment, every time."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = int(signum), step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class Recorder(pl.Callback):
    """Records the optimiser step of every validation during fit and a head weight at the start of test."""

    validation_steps: list[int] = []
    test_weights: torch.Tensor | None = None

    def __init__(self) -> None:
        Recorder.validation_steps = []
        Recorder.test_weights = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            Recorder.validation_steps.append(trainer.global_step)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Recorder.test_weights = pl_module.state_dict()["net.heads.0.conf.weight"].detach().clone()


class TickingClock:
    """A clock one second later at every reading: what is timed does not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class StopRankAtStep(pl.Callback):
    """Rank `rank` stops itself (SIGSTOP: a hung process, a stuck filesystem) at optimiser step `step`, after
    writing its process id to `<run>/stopped_rank.pid`."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            (Path(trainer.default_root_dir) / "stopped_rank.pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


class FullDisk(pl.Callback):
    """Every checkpoint this process writes lands on a full disk: its temporary file is made a link to
    /dev/full, which refuses writes with ENOSPC (as a full filesystem does)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f".last.ckpt.{os.getpid()}.partial").symlink_to("/dev/full")


class SignalAtValidation(pl.Callback):
    """Sends `signum` to this process during the first validation batch after optimiser step `after_step`."""

    def __init__(self, signum: int, after_step: int) -> None:
        self.signum, self.after_step, self.sent = int(signum), after_step, False

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.sent and not trainer.sanity_checking and trainer.global_step >= self.after_step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _wait_for(condition: Any, what: str, deadline_s: float) -> None:
    """Poll `condition` until it holds; fail after `deadline_s` (generous: the machine may be loaded)."""
    import time

    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class MeetPeers(pl.Callback):
    """At the start of training, each job writes `<folder>/<pid>` and waits until `count` jobs have: the jobs
    of a sweep pass only if they run at the same time (one after another, the first waits in vain)."""

    def __init__(self, folder: str, count: int, deadline_s: float = 300.0) -> None:
        self.folder, self.count, self.deadline_s = Path(folder), count, deadline_s

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).write_text("")
        _wait_for(
            lambda: len(list(self.folder.iterdir())) >= self.count, f"{self.count} jobs", self.deadline_s
        )


class HoldTraining(pl.Callback):
    """At the start of training, writes `<folder>/<pid>` and waits there (until killed, or `deadline_s`): a
    job that is running, for a test that stops its process."""

    def __init__(self, folder: str, deadline_s: float = 300.0) -> None:
        self.folder, self.deadline_s = Path(folder), deadline_s

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).write_text("")
        _wait_for(lambda: False, "the test to stop this process", self.deadline_s)
