"""OmegaConf resolvers of conf/ (`${ssd.<name>:...}`), registered when `ssd_lightning.cli` is imported.

- `ssd.new_folder`: a run (or sweep) folder of its own. Every process of one SLURM job step or torchrun job
  gets the same one (they all run the entry point and compose the config themselves), so they share one run
  folder, and a SLURM job requeued after pre-emption finds its folder again. A plain command gets a new folder
  named by the time, created at once so that no other launch gets it, and the same one however often it is
  resolved in this process (Lightning's DDP launcher reads `hydra.run.dir` again to start the other ranks).
  `ssd.run_folder` is the same for `hydra.run.dir`, except while a sweep composes its jobs' configs: a sweep
  job never uses `hydra.run.dir`, and composing resolves it (a merge over an interpolation does).
- `ssd.run_dir` / `ssd.hydra_subdir`: resuming (`ckpt_path=`) continues the checkpoint's own run folder.
- `ssd.pixel_mean` / `ssd.pixel_std`: the input normalisation that the initial weights were trained with.
- `ssd.reduced_tail`: SSDLite's MobileNetV3 tail, the one the initial weights have (torchvision's rule).
- `ssd.strategy`: `trainer.strategy: auto` written out as what Lightning picks for the devices asked for, so
  that `--cfg job --resolve` shows `ddp` for `trainer.devices=4`.
- `ssd.job_*`: what a sweep job asks its scheduler for (conf/hydra/launcher/), from its trainer config.
- `ssd.sweep_group`: the W&B group of a sweep job (its sweep folder's name), null outside sweeps.
"""

from __future__ import annotations

import itertools
import os
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import ListConfig, OmegaConf

from ssd_lightning.models.initial_weights import (
    DEFAULT_NORMALIZATION,
    initial_normalization,
    mobilenet_reduced_tail,
)
from ssd_lightning.sweeps import resources
from ssd_lightning.sweeps.job import sweep_group
from ssd_lightning.training import launch
from ssd_lightning.training.checkpointing import resolve_checkpoint, run_folder_of

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
_claimed: dict[str, str] = {}  # parent folder -> the folder this process took there


def new_folder(parent: str) -> str:
    """`<parent>/<job stamp>` for the processes of a SLURM or torchrun job; else a folder named by the time,
    created here (`<time>_2`, `<time>_3` ... when another launch took that name first), the same one for every
    later call in this process."""
    stamp = launch.job_stamp()
    if stamp is not None:
        return f"{parent}/{stamp}"
    key = os.path.abspath(parent)
    if key not in _claimed:
        Path(parent).mkdir(parents=True, exist_ok=True)
        base = datetime.now().strftime(TIME_FORMAT)
        for count in itertools.count(1):
            folder = Path(parent) / (base if count == 1 else f"{base}_{count}")
            try:
                folder.mkdir()  # atomic: of two launches only one creates it
            except FileExistsError:
                continue
            _claimed[key] = str(folder)
            break
    return _claimed[key]


def new_run_folder(parent: str) -> str:
    """`new_folder` for `hydra.run.dir`; nothing is claimed while Hydra's config is a sweep's (the sweep
    composes each job's whole config, whose `hydra.run.dir` no job uses)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{parent}/unused-in-sweeps"
    return new_folder(parent)


def run_dir(runs: str, ckpt_path: str | None) -> str:
    """The run folder: the resumed checkpoint's own (`<run>/checkpoints/*.ckpt`, or for `last` the newest
    last.ckpt under `runs`), else a new one under `runs`."""
    if ckpt_path:
        try:
            found = resolve_checkpoint(str(ckpt_path), runs, for_resume=True)
        except (FileNotFoundError, ValueError):
            found = None  # the run says so itself, with what to do
        folder = run_folder_of(found) if found is not None else None
        if folder is not None:
            return str(folder)
    return new_run_folder(runs)


def hydra_subdir(ckpt_path: str | None) -> str | None:
    """Where Hydra writes the composed config: `.hydra`, `.hydra/resume-<stamp>` when resuming (the run's own
    config stays), nothing in the other processes of a distributed job (rank 0 writes it)."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if launch.slurm_managed() else None)
    if rank not in (None, "0"):
        return None
    return f".hydra/resume-{datetime.now():{TIME_FORMAT}}" if ckpt_path else ".hydra"


def _normalization(
    arch: str, backbone_weights: str | None, weights: str | None, weights_source: str | None, trust: bool
):
    found = initial_normalization(
        arch, backbone_weights, weights, weights_source or "ssd_lightning", bool(trust)
    )
    if found is None and (backbone_weights or weights):
        raise ValueError(
            f"cannot tell which input normalisation {weights or backbone_weights} was trained with; "
            "state it: model.pixel_mean=[r,g,b] model.pixel_std=[r,g,b] (0-255 scale)"
        )
    return found or DEFAULT_NORMALIZATION


# ListConfig, not list: `--cfg job --resolve` (OmegaConf.resolve) can only write a container into the config.
# `trust`: trust_checkpoint (read_checkpoint), for weights files that hold more than tensors.
def pixel_mean(
    arch: str, backbone_weights: str | None, weights: str | None, source: str | None, trust: bool = False
) -> ListConfig:
    return ListConfig(list(_normalization(arch, backbone_weights, weights, source, trust).pixel_mean))


def pixel_std(
    arch: str, backbone_weights: str | None, weights: str | None, source: str | None, trust: bool = False
) -> ListConfig:
    return ListConfig(list(_normalization(arch, backbone_weights, weights, source, trust).pixel_std))


def reduced_tail(
    backbone_weights: str | None, weights: str | None = None, source: str | None = None, trust: bool = False
) -> bool:
    """`model.net.reduced_tail` of SSDLite: the tail of the detector weights `weights` when given, else
    reduced from scratch and full on ImageNet backbone weights (which exist for the full tail only)."""
    return mobilenet_reduced_tail(backbone_weights, weights, source or "ssd_lightning", bool(trust))


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
    # Cached per config too: Hydra copies the cache into each job's config (submitit: into other processes).
    OmegaConf.register_new_resolver("ssd.new_folder", new_folder, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.run_folder", new_run_folder, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.run_dir", run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.hydra_subdir", hydra_subdir, replace=True, use_cache=True)
    # Cached per arguments: reading the weights' convention may open a file.
    OmegaConf.register_new_resolver("ssd.pixel_mean", pixel_mean, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.pixel_std", pixel_std, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.reduced_tail", reduced_tail, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ssd.strategy", strategy, replace=True)
    OmegaConf.register_new_resolver("ssd.job_tasks_per_node", resources.job_tasks_per_node, replace=True)
    OmegaConf.register_new_resolver("ssd.job_gpus_per_node", resources.job_gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("ssd.job_cpus_per_task", resources.job_cpus_per_task, replace=True)
    OmegaConf.register_new_resolver("ssd.sweep_group", sweep_group, replace=True)
