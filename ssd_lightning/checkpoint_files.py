"""Checkpoint and weight files, read safely: torch's weights-only unpickler for everything (nothing in a file
can run code unless the user trusts it), one-line errors for files that are empty, cut off, exported models
or bare state dicts, and safetensors files (weights to share, with their network described as JSON)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch


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
