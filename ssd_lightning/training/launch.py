"""What launched this process (a SLURM job, a torchrun job or a plain command) and whose run folder is whose.

A run folder holds `owner.json` while a training process works in it: written when training starts, removed
when it ends (kept when SLURM pre-empts and requeues the job, which comes back to it). `ckpt_path=last`
never resumes a run that another job may still be training, and a requeued SLURM job finds its own run.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

OWNER_FILE = "owner.json"
# SLURM job names of interactive allocations: Lightning does not treat those as SLURM-managed runs either.
_INTERACTIVE_SLURM_NAMES = ("bash", "interactive")


def slurm_managed() -> bool:
    """A task of a SLURM job step that Lightning's SLURM environment manages (not an interactive shell)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in _INTERACTIVE_SLURM_NAMES


def slurm_job_id() -> str | None:
    """`<job>` or `<array job>_<task>` of a SLURM-managed process, as `scontrol requeue` takes it."""
    if not slurm_managed() or not os.environ.get("SLURM_JOB_ID"):
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]


def requeued() -> bool:
    """This SLURM job was requeued (pre-emption, node failure) and runs again: SLURM_RESTART_COUNT >= 1."""
    return slurm_job_id() is not None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def job_stamp() -> str | None:
    """The run folder's name shared by every process of one job: `slurm-<job>[-<step>]` under SLURM,
    `torchrun-<id>` under torchrun; None for a plain command (its folder is new, see resolvers)."""
    job = slurm_job_id()
    if job is not None:
        step = os.environ.get("SLURM_STEP_ID")
        return f"slurm-{job}" + (f"-{step}" if step else "")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        # Without --rdzv-id torchrun says "none": the local agent, parent of all ranks of a node, names it.
        return f"torchrun-{run_id}" if run_id and run_id != "none" else f"torchrun-{os.getppid()}"
    return None


@dataclass(frozen=True)
class Owner:
    """The process training in a run folder."""

    host: str
    pid: int
    slurm_job: str | None = None

    def __str__(self) -> str:
        where = f"process {self.pid} on {self.host}"
        return f"SLURM job {self.slurm_job} ({where})" if self.slurm_job else where


def this_process() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), slurm_job_id())


def claim(run_folder: str | os.PathLike) -> None:
    """Mark `run_folder` as trained by this process (global rank 0 calls it)."""
    path = Path(run_folder) / OWNER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(this_process())) + "\n")


def release(run_folder: str | os.PathLike) -> None:
    """Training in `run_folder` ended (only the owner's own marker is removed)."""
    path = Path(run_folder) / OWNER_FILE
    if read_owner(run_folder) == this_process():
        path.unlink(missing_ok=True)


def read_owner(run_folder: str | os.PathLike) -> Owner | None:
    path = Path(run_folder) / OWNER_FILE
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def may_be_training(owner: Owner | None, me: Owner | None = None) -> bool:
    """Whether another job may still be training in the folder `owner` holds: another SLURM job (running or
    requeued: SLURM is not asked), a live process on this host, or any process on another host."""
    if owner is None:
        return False
    me = me or this_process()
    if owner.slurm_job is not None:
        return owner.slurm_job != me.slurm_job
    if owner.host == me.host:
        return owner.pid != me.pid and process_alive(owner.pid)
    return True
