"""OmegaConf resolvers of conf/ (`${ssd.<name>:...}`), registered when `ssd_lightning.cli` is imported.

- `ssd.run_stamp`: the run folder's name. Every process of one SLURM job step or torchrun job gets the same
  one (they all run the entry point and compose the config themselves), so they share one run folder, and a
  SLURM job requeued after pre-emption finds its folder (and Lightning's HPC checkpoint) again.
- `ssd.run_dir` / `ssd.hydra_subdir`: resuming (`ckpt_path=`) continues the checkpoint's own run folder.
- `ssd.pixel_mean` / `ssd.pixel_std`: the input normalisation that the initial weights were trained with.
- `ssd.reduced_tail`: SSDLite's MobileNetV3 tail, the one the initial weights have (torchvision's rule).
- `ssd.strategy`: `trainer.strategy: auto` written out as what Lightning picks for the devices asked for, so
  that `--cfg job --resolve` shows `ddp` for `trainer.devices=4`.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime

from omegaconf import ListConfig, OmegaConf

from ssd_lightning.training.checkpointing import resolve_checkpoint, run_folder_of
from ssd_lightning.training.weights import (
    DEFAULT_NORMALIZATION,
    initial_normalization,
    mobilenet_reduced_tail,
)

# SLURM job names of interactive allocations: Lightning does not treat those as SLURM-managed runs either.
_INTERACTIVE_SLURM_NAMES = ("bash", "interactive")


def _slurm_managed() -> bool:
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in _INTERACTIVE_SLURM_NAMES


def run_stamp() -> str:
    """`slurm-<job>[_<array task>]-<step>` under SLURM, `torchrun-<id>` under torchrun, else the time."""
    if _slurm_managed() and os.environ.get("SLURM_JOB_ID"):
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        stamp = f"slurm-{job}" + (f"_{array_task}" if array_task else "")
        return stamp + (f"-{os.environ['SLURM_STEP_ID']}" if os.environ.get("SLURM_STEP_ID") else "")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        # Without --rdzv-id torchrun says "none": the local agent, parent of all ranks of a node, names it.
        return f"torchrun-{run_id}" if run_id and run_id != "none" else f"torchrun-{os.getppid()}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_dir(runs: str, ckpt_path: str | None) -> str:
    """The run folder: the resumed checkpoint's own (`<run>/checkpoints/*.ckpt`, or for `last` the newest
    last.ckpt under `runs`), else a new one under `runs`."""
    if ckpt_path:
        try:
            found = resolve_checkpoint(str(ckpt_path), runs)
        except FileNotFoundError:
            found = None  # the run says so itself, with what to do
        folder = run_folder_of(found) if found is not None else None
        if folder is not None:
            return str(folder)
    return f"{runs}/{run_stamp()}"


def hydra_subdir(ckpt_path: str | None) -> str | None:
    """Where Hydra writes the composed config: `.hydra`, `.hydra/resume-<stamp>` when resuming (the run's own
    config stays), nothing in the other processes of a distributed job (rank 0 writes it)."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if _slurm_managed() else None)
    if rank not in (None, "0"):
        return None
    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}" if ckpt_path else ".hydra"


def _normalization(arch: str, backbone_weights: str | None, weights: str | None, weights_source: str | None):
    found = initial_normalization(arch, backbone_weights, weights, weights_source or "ssd_lightning")
    if found is None and (backbone_weights or weights):
        raise ValueError(
            f"cannot tell which input normalisation {weights or backbone_weights} was trained with; "
            "state it: model.pixel_mean=[r,g,b] model.pixel_std=[r,g,b] (0-255 scale)"
        )
    return found or DEFAULT_NORMALIZATION


# ListConfig, not list: `--cfg job --resolve` (OmegaConf.resolve) can only write a container into the config.
def pixel_mean(
    arch: str, backbone_weights: str | None, weights: str | None, source: str | None
) -> ListConfig:
    return ListConfig(list(_normalization(arch, backbone_weights, weights, source).pixel_mean))


def pixel_std(arch: str, backbone_weights: str | None, weights: str | None, source: str | None) -> ListConfig:
    return ListConfig(list(_normalization(arch, backbone_weights, weights, source).pixel_std))


def reduced_tail(backbone_weights: str | None, weights: str | None = None, source: str | None = None) -> bool:
    """`model.net.reduced_tail` of SSDLite: the tail of the detector weights `weights` when given, else
    reduced from scratch and full on ImageNet backbone weights (which exist for the full tail only)."""
    return mobilenet_reduced_tail(backbone_weights, weights, source or "ssd_lightning")


def _process_count(devices: object) -> int | None:
    """Processes per node that `trainer.devices` asks for; None where the hardware decides (auto, -1)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # "0,1": device indices
        return len([part for part in text.split(",") if part.strip()])
    return int(text) if text.isdigit() else None


def strategy(devices: object, num_nodes: object, accelerator: object = "auto") -> str:
    """`ddp` where more than one process is asked for (several devices or nodes), as Lightning's `auto` does
    outside notebooks; `auto` where Lightning must decide (devices=auto, TPUs, an interactive session)."""
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    if interactive or str(accelerator) in ("tpu", "xla"):
        return "auto"
    processes = _process_count(devices)
    if int(num_nodes) > 1 or (processes is not None and processes > 1):
        return "ddp"
    return "auto"


def register() -> None:
    """Register the resolvers (again: replacing is harmless, a test may have cleared them)."""
    OmegaConf.register_new_resolver("ssd.run_stamp", run_stamp, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("ssd.hydra_subdir", hydra_subdir, replace=True, use_cache=True)
    # Cached per arguments: reading the weights' convention may open a file.
    OmegaConf.register_new_resolver("ssd.pixel_mean", pixel_mean, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.pixel_std", pixel_std, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.reduced_tail", reduced_tail, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.strategy", strategy, replace=True)
