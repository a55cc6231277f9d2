"""A DDP rank that stops (SIGSTOP: a hung process, a stuck filesystem) ends the job within the configured
time, with a line naming the rank, instead of leaving the other ranks waiting for ever."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from training_helpers import on_two_cpu_processes, probes_env, run_script

from ssd_lightning.training import launch
from ssd_lightning.training.watchdog import STALLED_EXIT_CODE, StallWatchdog, stalled_ranks


@pytest.mark.timeout(300)
def test_a_stopped_rank_ends_the_job_and_is_named(fast: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *on_two_cpu_processes(fast),
        "+callbacks.stop._target_=probes.StopRankAtStep",
        "+callbacks.stop.rank=1",
        "+callbacks.stop.step=3",
        "trainer.stall_timeout_s=5",
        f"hydra.run.dir={run_dir}",
    ]
    # Bounded: without the watchdog rank 0 would wait in its all-reduce for the process group's 30 minutes.
    result = run_script("train.py", args, cwd=tmp_path, env=probes_env(), timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == STALLED_EXIT_CODE, output
    assert "DDP: rank 0 finished no batch for 5 s (trainer.stall_timeout_s): rank 1 stopped" in output
    assert f"resume it with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in output
    stopped = int((run_dir / "stopped_rank.pid").read_text())
    deadline = time.monotonic() + 60
    while launch.process_alive(stopped) and not _zombie(stopped):  # the launcher killed the stopped rank
        assert time.monotonic() < deadline, f"rank 1 (pid {stopped}) still runs"
        time.sleep(0.1)
    assert launch.read_owner(run_dir) is None  # the run can be resumed with ckpt_path=last


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_the_watchdog_fires_after_the_timeout_without_progress_and_not_before() -> None:
    now = [0.0]
    fired = threading.Event()
    watchdog = StallWatchdog(0.5, clock=lambda: now[0])
    watchdog.stalled = fired.set  # the check-in itself needs ranks (the test above)
    watchdog._group = object()  # as under DDP
    watchdog.on_train_start(None, None)  # starts the thread; progress at 0.0
    now[0] = 0.4  # the clock is the test's: the thread sees 0.4 s without progress however long it polls
    assert not fired.wait(0.3)
    watchdog.progress()  # a batch finished at 0.4
    now[0] = 0.85
    assert not fired.wait(0.3)
    now[0] = 0.9  # 0.5 s after the last batch
    assert fired.wait(30)
    assert stalled_ranks("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms") == [1, 3]
    assert stalled_ranks("Rank 2 failed to pass monitoredBarrier in 5000 ms") == [2]
    assert stalled_ranks("something else") is None
