"""Checkpoint plumbing: crash-safe writes, finding the last run's checkpoint, the W&B run id inside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssd_lightning.training import launch
from ssd_lightning.training.module import WANDB_RUN_ID_KEY

LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_FOLDER = "checkpoints"  # <run folder>/checkpoints/ (conf/callbacks/default.yaml)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it over the target.

    Lightning's own writer truncates the target first, so a process killed mid-save (pre-emption,
    SIGKILL) would leave a corrupt `last.ckpt`; with a rename the previous checkpoint survives intact.
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
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def find_last_checkpoint(search_dir: str | os.PathLike, for_resume: bool = False) -> Path:
    """The most recently written `last.ckpt` under `search_dir`.

    `for_resume`: a requeued SLURM job takes its own run's, and the newest run is refused while another job
    may still be training it (its `owner.json`), rather than two jobs writing one run folder."""
    root = Path(search_dir)
    candidates = list(root.rglob(LAST_CHECKPOINT))
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no {LAST_CHECKPOINT} under {root}; pass the checkpoint file instead, "
            "e.g. ckpt_path=outputs/train/runs/<name>/<time>/checkpoints/last.ckpt"
        )
    newest = max(candidates, key=lambda path: path.stat().st_mtime)
    if not for_resume:
        return newest
    me = launch.this_process()
    if launch.requeued():
        own = [c for c in candidates if _owner(c) is not None and _owner(c).slurm_job == me.slurm_job]
        if own:
            return max(own, key=lambda path: path.stat().st_mtime)
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


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of this project as a dict (on the CPU)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error


def wandb_run_id(checkpoint: dict[str, Any]) -> str | None:
    """The W&B run id a checkpoint was written under, if it was trained with the W&B logger."""
    return checkpoint.get(WANDB_RUN_ID_KEY)
