"""Checkpoint plumbing: crash-safe writes, finding the last run's checkpoint, the W&B run id inside it."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssd_lightning.training import launch
from ssd_lightning.training.module import WANDB_RUN_ID_KEY

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


class CheckpointError(ValueError):
    """A file given as a checkpoint or as weights cannot be used; the message names it and says what to do."""


class CheckpointDamaged(CheckpointError):
    """The file is empty or cut off: a save that did not finish, or an incomplete copy."""


TRUST_OPTION = "trust_checkpoint=true"
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK", b"\x80"


def _refused_global(message: str) -> str:
    found = re.search(r"unsupported GLOBAL ([\w.]+)", message)
    return f"a Python object ({found.group(1)})" if found else "Python objects other than tensors and numbers"


SAFETENSORS_SUFFIX = ".safetensors"
_SAFETENSORS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")  # JSON in the file's metadata


def save_safetensors(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """The weights of a training checkpoint (`state_dict`, the EMA average when it holds one) with its network
    description and training data as JSON metadata, as safetensors: a file for sharing that can hold nothing
    but tensors and text. `read_checkpoint` reads it back as a checkpoint (eval, predict, model.weights)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {key: json.dumps(checkpoint.get(key), default=str) for key in _SAFETENSORS_KEYS}
    tensors = {name: value.detach().contiguous() for name, value in checkpoint["state_dict"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read_safetensors(path: Path, option: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
            state = {name: stream.get_tensor(name) for name in stream.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise CheckpointDamaged(f"{option}={path} is not a readable safetensors file ({error})") from None
    checkpoint: dict[str, Any] = {"state_dict": state}
    checkpoint.update({key: json.loads(metadata[key]) for key in _SAFETENSORS_KEYS if key in metadata})
    return checkpoint


def read_checkpoint(path: str | os.PathLike, option: str = "ckpt_path", trust: bool = False) -> Any:
    """A checkpoint or weight file, loaded by torch's weights-only unpickler: tensors, numbers, strings and
    containers only, so nothing in the file can run code. `trust=True` (`trust_checkpoint=true`, for a file
    whose source the user trusts) loads any pickle. Every way a file can be unusable (empty, cut off, an
    exported model, code inside) is a CheckpointError naming `option`, the file and what to do."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{option}={path}: no such file (looked at {path.resolve()})")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointDamaged(
            f"{option}={path} is empty (0 bytes): its save was cut off (a killed or full-disk write) or it "
            "is not a checkpoint"
        )
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, option)
    with open(path, "rb") as stream:
        head = stream.read(4)
    if path.suffix.lower() in (".onnx", ".xml", ".engine") or not head.startswith(
        (_ZIP_MAGIC, _PICKLE_MAGIC)
    ):
        raise CheckpointError(
            f"{option}={path} is not a PyTorch checkpoint (an exported model or another file): pass a "
            "checkpoint written by train.py (<run>/checkpoints/*.ckpt)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{option}={path} does not unpickle: {error}") from None
        raise CheckpointError(
            f"{option}={path} holds {_refused_global(str(error))}, which a weights-only load refuses: "
            f"unpickling it could run any code. Load it only if you trust where it came from: {TRUST_OPTION}"
        ) from None
    except RuntimeError as error:
        if "TorchScript" in str(error):
            raise CheckpointError(
                f"{option}={path} is an exported TorchScript model, not a training checkpoint: pass a "
                "checkpoint written by train.py (<run>/checkpoints/*.ckpt)"
            ) from None
        raise CheckpointDamaged(
            f"{option}={path} is cut off or damaged ({size} bytes; torch: {str(error).splitlines()[0]}): its "
            "save was interrupted or the copy is incomplete"
        ) from None
    except EOFError:
        raise CheckpointDamaged(
            f"{option}={path} ends too early ({size} bytes): its save was cut off"
        ) from None


def training_checkpoint(
    checkpoint: Any, path: str | os.PathLike, option: str = "ckpt_path"
) -> dict[str, Any]:
    """`checkpoint` if it is one that train.py wrote (network description and weights), else a CheckpointError
    saying what the file is instead."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
        return checkpoint
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ):
        raise CheckpointError(
            f"{option}={path} holds tensors only (a bare state dict, with no record of the network they "
            "belong to): this needs a checkpoint written by train.py (<run>/checkpoints/*.ckpt); to train "
            f"from these weights use model.weights={path}"
        )
    raise CheckpointError(
        f"{option}={path} is not a checkpoint written by train.py (it has no state_dict and hyper_parameters)"
    )


def load_checkpoint(
    path: str | os.PathLike, option: str = "ckpt_path", trust: bool = False
) -> dict[str, Any]:
    """A training checkpoint of this project (`read_checkpoint`, then `training_checkpoint`)."""
    return training_checkpoint(read_checkpoint(path, option, trust), path, option)


def wandb_run_id(checkpoint: dict[str, Any]) -> str | None:
    """The W&B run id a checkpoint was written under, if it was trained with the W&B logger."""
    return checkpoint.get(WANDB_RUN_ID_KEY)
