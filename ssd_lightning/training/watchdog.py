"""A DDP rank that stops (a stopped process, a stuck filesystem, a dead node) leaves the others waiting inside
a collective for the process group's timeout (30 minutes) or, with some backends, for ever, with no log line.

Each rank's `StallWatchdog` thread watches its own progress (a batch finished in training or validation). When
none comes for `timeout_s`, it asks every rank to check in on a separate gloo group (torch's
`monitored_barrier`, which names the ranks that do not), logs which rank stopped, stops the processes this one
started (Lightning's DDP launcher) and ends the process: the job ends within `timeout_s` plus the check's few
seconds, on gloo and NCCL alike. The thread reads a clock only; the training loop never waits for it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist

from ssd_lightning.training import launch

log = logging.getLogger("ssd_lightning")

#: Exit status of a process ended by the watchdog.
STALLED_EXIT_CODE = 75


def stalled_ranks(message: str) -> list[int] | None:
    """The ranks a failed `monitored_barrier` names (`Ranks 1, 3 failed to pass monitoredBarrier`)."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    return [int(rank) for rank in found.group(1).split(",") if rank.strip()] if found else None


class StallWatchdog(pl.Callback):
    """Ends a DDP job whose ranks stopped making progress, naming the rank (see the module docstring).

    Args:
        timeout_s: seconds without a finished batch (`trainer.stall_timeout_s`).
        checkpoint: the run's last.ckpt, named in the message (what to resume from).
        run_folder: released (`launch.release`) before the process ends, so that the run can be resumed.
        check_s: how long ranks get to check in once a stall is seen.
        clock: seconds, monotonic (tests pass their own).
        end: what ends the process, called with the exit status (tests pass their own).
    """

    def __init__(
        self,
        timeout_s: float,
        checkpoint: str | os.PathLike | None = None,
        run_folder: str | os.PathLike | None = None,
        check_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        end: Callable[[int], Any] = os._exit,
    ) -> None:
        super().__init__()
        if timeout_s <= 0:
            raise ValueError(f"trainer.stall_timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.check_s = float(timeout_s), min(float(check_s), float(timeout_s))
        self.checkpoint, self.run_folder = checkpoint, run_folder
        self.clock, self.end = clock, end
        self._group: Any = None
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._launcher: Any = None
        self.rank = 0

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks into its processes: threads, events and groups stay behind.
        state = dict(self.__dict__)
        state.update(_group=None, _stop=None, _thread=None, _launcher=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and dist.is_initialized() and self._group is None:
            # Every rank creates it here (a collective); a gloo group works beside an NCCL one.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.check_s))
        self.rank = trainer.global_rank
        self._launcher = getattr(trainer.strategy, "launcher", None)

    def progress(self) -> None:
        self._last = self.clock()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._group is None:
            return
        self.progress()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.progress()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.progress()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop.set()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if self.clock() - self._last >= self.timeout_s:
                self.stalled()
                return

    def stalled(self) -> None:
        """No progress for `timeout_s`: find the ranks that stopped, say so and end this process."""
        try:
            dist.monitored_barrier(
                group=self._group, timeout=timedelta(seconds=self.check_s), wait_all_ranks=True
            )
            who = "every rank answered: the ranks wait on each other or on a collective that never completes"
        except RuntimeError as error:
            ranks = stalled_ranks(str(error))
            who = f"rank {', '.join(map(str, ranks))} stopped" if ranks else "rank 0 did not answer"
        log.error(
            "DDP: rank %d finished no batch for %.0f s (trainer.stall_timeout_s): %s (a stopped process, a "
            "stuck filesystem, a dead node?). Ending the job; resume it with ckpt_path=%s",
            self.rank,
            self.timeout_s,
            who,
            self.checkpoint or "<run>/checkpoints/last.ckpt",
        )
        if self.run_folder is not None:
            launch.release(self.run_folder)
        for handler in logging.getLogger().handlers:  # the thread ends the process: flush the logs first
            handler.flush()
        if self._launcher is not None and hasattr(self._launcher, "kill"):
            self._launcher.kill(signal.SIGKILL)  # the ranks this process started, stopped ones included
        self.end(STALLED_EXIT_CODE)
