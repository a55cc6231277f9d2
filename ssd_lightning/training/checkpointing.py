"""Checkpoint plumbing: crash-safe writes, finding the last run's checkpoint.
Reading checkpoint files safely is `ssd_lightning.checkpoint_files`."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssd_lightning.training import launch

LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_FOLDER = "checkpoints"  # <run folder>/checkpoints/ (conf/callbacks/default.yaml)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the previous one is intact."""


def _checkpoint_bytes(checkpoint: Any) -> int:
    """The bytes of the tensors in `checkpoint`: about what its file takes."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.nelement() * checkpoint.element_size()
    if isinstance(checkpoint, dict):
        return sum(_checkpoint_bytes(value) for value in checkpoint.values())
    if isinstance(checkpoint, (list, tuple)):
        return sum(_checkpoint_bytes(value) for value in checkpoint)
    return 0


def _write_failure(target: Path, checkpoint: dict[str, Any], error: Exception) -> str:
    # torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos", not as ENOSPC.
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)
    if not full:
        return f"cannot write checkpoint {target}: {error}; the checkpoint written before it is intact"
    free = shutil.disk_usage(target.parent).free
    return (
        f"no space left to write checkpoint {target}: it needs about "
        f"{_checkpoint_bytes(checkpoint) / 2**20:.0f} MiB, {target.parent} has {free / 2**20:.0f} MiB free. "
        "Free space there or write runs elsewhere (paths.log_dir=/a/larger/disk); the checkpoint written "
        "before it is intact"
    )


def remove_stale_partials(folder: Path) -> None:
    """Temporary files of saves that a killed process never finished (`.<name>.<pid>.partial`)."""
    for partial in folder.glob(".*.partial"):
        pid = partial.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not launch.process_alive(int(pid)):
            partial.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it over the target.

    Lightning's own writer truncates the target first, so a process killed mid-save (pre-emption,
    SIGKILL) would leave a corrupt `last.ckpt`; with a rename the previous checkpoint survives intact, and the
    next save removes the killed one's temporary file. A failed write (a full disk) is a CheckpointWriteError
    that says how much space it needs.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote file systems: no rename semantics to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, target)
        except (OSError, RuntimeError) as error:
            raise CheckpointWriteError(_write_failure(target, checkpoint, error)) from error
        finally:
            partial.unlink(missing_ok=True)


def last_checkpoints(search_dir: str | os.PathLike) -> list[Path]:
    """Every `last.ckpt` under `search_dir`, the most recently written first."""
    root = Path(search_dir)
    candidates = sorted(root.rglob(LAST_CHECKPOINT), key=lambda path: path.stat().st_mtime, reverse=True)
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no {LAST_CHECKPOINT} under {root}; pass the checkpoint file instead, "
            "e.g. ckpt_path=outputs/train/runs/<name>/<time>/checkpoints/last.ckpt"
        )
    return candidates


def find_last_checkpoint(search_dir: str | os.PathLike, for_resume: bool = False) -> Path:
    """The most recently written `last.ckpt` under `search_dir`.

    `for_resume`: a requeued SLURM job takes its own run's, and the newest run is refused while another job
    may still be training it (its `owner.json`), rather than two jobs writing one run folder."""
    candidates = last_checkpoints(search_dir)
    newest = candidates[0]
    if not for_resume:
        return newest
    me = launch.this_process()
    if launch.requeued():
        own = [c for c in candidates if _owner(c) is not None and _owner(c).slurm_job == me.slurm_job]
        if own:
            return own[0]
    owner = _owner(newest)
    if launch.may_be_training(owner, me):
        folder = run_folder_of(newest) or newest.parent
        raise ValueError(
            f"ckpt_path=last: the newest run, {folder}, may still be training ({owner} holds "
            f"{folder / launch.OWNER_FILE}); two jobs must not write one run. To resume it anyway once that "
            f"job has ended, pass its checkpoint: ckpt_path={newest}"
        )
    return newest


def _owner(checkpoint: Path) -> launch.Owner | None:
    folder = run_folder_of(checkpoint)
    return launch.read_owner(folder) if folder is not None else None


def requeued_checkpoint(run_folder: str | os.PathLike) -> Path | None:
    """The `last.ckpt` this SLURM job wrote in `run_folder` before it was requeued, if any: what the job
    resumes from whatever `ckpt_path` says."""
    path = Path(run_folder) / CHECKPOINT_FOLDER / LAST_CHECKPOINT
    if not launch.requeued() or not path.is_file():
        return None
    owner = launch.read_owner(run_folder)
    return path if owner is not None and owner.slurm_job == launch.slurm_job_id() else None


def run_folder_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint was written in (`<run>/checkpoints/<file>`), None for a file elsewhere."""
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == CHECKPOINT_FOLDER else None


def resolve_checkpoint(
    ckpt_path: str | None, search_dir: str | os.PathLike, for_resume: bool = False
) -> Path | None:
    """`ckpt_path` from the config as a file: None stays None, `last` means the newest last.ckpt under
    `search_dir` (see `find_last_checkpoint` for `for_resume`)."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        return find_last_checkpoint(search_dir, for_resume)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no such checkpoint file (looked at {path.resolve()})"
        )
    return path
