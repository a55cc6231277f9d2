"""The objects of a run, built from the Hydra config: DataModule, LightningModule, callbacks, Trainer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.io import CheckpointIO

from ssd_lightning.checkpoint_files import CheckpointDamaged, load_checkpoint
from ssd_lightning.training.checkpointing import AtomicCheckpointIO, last_checkpoints, resolve_checkpoint
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.wandb_logging import continued_run

log = logging.getLogger("ssd_lightning")

#: Keys of conf/dataset/*.yaml that other configs read (`${dataset.monitor}`), not DataModule arguments.
DATASET_CONFIG_KEYS = ("monitor", "prior_sizes")
#: Key of conf/optimizer/*.yaml that is ours, not an argument of the torch optimiser.
BASE_BATCH_KEY = "base_batch_size"
GPU_ACCELERATORS = ("gpu", "cuda")
#: Keys of conf/trainer/*.yaml that are ours (StallWatchdog), not Trainer arguments.
OUR_TRAINER_KEYS = ("stall_timeout_s",)


def instantiate_plainly(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but our own input errors reach the user as written.

    Hydra wraps every constructor error in an `InstantiationException` holding the `repr` of the original,
    which turns a multi-line DatasetError into one escaped line; a ValueError of ours is re-raised as is.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise


def instantiate_datamodule(
    cfg: DictConfig,
    image_size: int | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> pl.LightningDataModule:
    """The DataModule of `cfg.dataset` for a network's input: its size and normalisation, `cfg.model`'s
    unless given (eval, predict: the checkpoint's). A plug-in `dataset.source` stays a spec (plain data)
    for the DataModule to build, so that checkpoints keep it."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    arguments = {k: v for k, v in node.items() if k not in DATASET_CONFIG_KEYS}
    return instantiate_plainly(
        OmegaConf.create(arguments),
        image_size=int(image_size if image_size is not None else cfg.model.image_size),
        mean=list(pixel_mean if pixel_mean is not None else cfg.model.pixel_mean),
        std=list(pixel_std if pixel_std is not None else cfg.model.pixel_std),
        _recursive_=False,
    )


def category_ids_of(datamodule: pl.LightningDataModule) -> list[int] | None:
    """COCO's original category id per contiguous label (label 1 first), when the data has them."""
    mapping: Mapping[int, int] | None = getattr(datamodule, "label_to_category_id", None)
    if not mapping:
        return None
    return [int(mapping[label]) for label in range(1, len(datamodule.classes) + 1)]


def learning_rate(cfg: DictConfig, global_batch: int | None) -> float:
    """The run's lr: `optimizer.lr`, times global batch / `optimizer.base_batch_size` with `scale_lr=true`
    (linear scaling rule)."""
    lr = float(cfg.optimizer.lr)
    if not cfg.get("scale_lr") or global_batch is None:
        return lr
    base = cfg.optimizer.get(BASE_BATCH_KEY)
    if not base:
        raise ValueError(
            f"scale_lr=true needs optimizer.{BASE_BATCH_KEY}: the global batch optimizer.lr is for"
        )
    return lr * global_batch / int(base)


def optimizer_factory(cfg: DictConfig, global_batch: int | None = None) -> functools.partial:
    """`params -> Optimizer` of `cfg.optimizer` at the run's `learning_rate`."""
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    factory = instantiate({k: v for k, v in node.items() if k != BASE_BATCH_KEY})
    lr = learning_rate(cfg, global_batch)
    if lr == float(factory.keywords["lr"]):
        return factory
    log.info(
        "scale_lr: lr %g x %d / %d = %g",
        factory.keywords["lr"],
        global_batch,
        cfg.optimizer[BASE_BATCH_KEY],
        lr,
    )
    return functools.partial(factory, lr=lr)


def build_module(
    cfg: DictConfig, datamodule: pl.LightningDataModule, global_batch: int | None = None
) -> SSDLitModule:
    """The LightningModule of `cfg.model` for the classes of `datamodule` (num_classes follows the data)."""
    scheduler = cfg.get("scheduler")
    return SSDLitModule(
        class_names=list(datamodule.classes),
        net=OmegaConf.to_container(cfg.model.net, resolve=True),
        pixel_mean=list(cfg.model.pixel_mean),
        pixel_std=list(cfg.model.pixel_std),
        loss=OmegaConf.to_container(cfg.model.loss, resolve=True),
        optimizer=optimizer_factory(cfg, global_batch),
        scheduler=instantiate(scheduler) if scheduler else None,
        channels_last=bool(cfg.model.get("channels_last", False)),
        category_ids=category_ids_of(datamodule),
        backbone_lr_mult=float(cfg.model.get("backbone_lr_mult", 1.0)),
        freeze_backbone=bool(cfg.model.get("freeze_backbone", False)),
        compile=bool(cfg.model.get("compile", False)),
    )


def _entries(group: DictConfig | None, kind: str) -> list[tuple[str, DictConfig]]:
    entries = []
    for name, entry in (group or {}).items():
        if entry is None:  # `callbacks.foo=null` switches one off
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{kind}.{name} must be a config with a _target_, got {entry!r}")
        entries.append((name, entry))
    return entries


def instantiate_callbacks(group: DictConfig | None, skip: tuple[str, ...] = ()) -> list[pl.Callback]:
    """Callbacks of `cfg.callbacks`, except those named in `skip`."""
    return [instantiate_plainly(entry) for name, entry in _entries(group, "callbacks") if name not in skip]


def native_bf16() -> bool:
    """Whether the CUDA GPU computes in bf16 natively: compute capability 8.0 (Ampere) or newer. Earlier GPUs
    (T4, V100) only emulate it, which `torch.cuda.is_bf16_supported()` counts as support by default."""
    if torch.version.hip:  # ROCm: torch knows which of its GPUs have bf16 units
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_precision(precision: Any, accelerator: str) -> tuple[Any, str]:
    """`auto`: bf16-mixed on a GPU with native bf16, 16-mixed on other GPUs, 32-true elsewhere; any other
    value is Lightning's own. Returns the precision and why (what the start of a run logs)."""
    if str(precision) != "auto":
        return precision, "as configured"
    uses_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    if not uses_gpu:
        return "32-true", "no GPU"
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"
    if native_bf16():
        return "bf16-mixed", f"{gpu}: native bf16"
    return "16-mixed", f"{gpu}: no native bf16 (it needs compute capability 8.0), fp16 with loss scaling"


@dataclass(frozen=True)
class ProcessLayout:
    """The devices per node and nodes a Trainer runs on, and whether they are GPUs."""

    devices: int
    nodes: int
    on_gpu: bool


def process_layout(trainer_cfg: DictConfig) -> ProcessLayout:
    """The processes the Trainer of `trainer_cfg` will run (Lightning decides `devices: auto` or -1), known
    before the run is built: its batch, lr, schedule and sync_batchnorm follow them. Found by building a
    Trainer with the same accelerator, devices, nodes and strategy (cheap: nothing starts before fit)."""
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    strategy = arguments.get("strategy", "auto")
    quiet = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "lightning")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the real Trainer says it all once
        logger.setLevel(logging.WARNING)
    try:
        probe = pl.Trainer(
            accelerator=arguments.get("accelerator", "auto"),
            devices=arguments.get("devices", "auto"),
            num_nodes=arguments.get("num_nodes", 1),
            strategy=strategy if isinstance(strategy, str) else "auto",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return ProcessLayout(probe.num_devices, probe.num_nodes, isinstance(probe.accelerator, CUDAAccelerator))


def trainer_arguments(trainer_cfg: DictConfig) -> dict[str, Any]:
    """`pytorch_lightning.Trainer` arguments of `cfg.trainer`: precision resolved (and logged), validation
    cadence in optimiser steps, our own keys left out."""
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    precision = arguments.get("precision", "auto")
    arguments["precision"], why = resolve_precision(precision, str(arguments.get("accelerator", "auto")))
    if str(precision) == "auto":
        log.info("trainer.precision=auto -> %s (%s)", arguments["precision"], why)
    for key in OUR_TRAINER_KEYS:  # read by the entry points, not Trainer arguments
        arguments.pop(key, None)
    if arguments.get("sync_batchnorm") == "auto":  # train.py decides it (training/scaling.py); not evaluation
        arguments["sync_batchnorm"] = False
    interval = arguments.get("val_check_interval")
    accumulate = int(arguments.get("accumulate_grad_batches") or 1)
    if isinstance(interval, int) and not isinstance(interval, bool) and accumulate > 1:
        # Lightning counts an int val_check_interval in batches; the schedule counts optimiser steps.
        arguments["val_check_interval"] = interval * accumulate
    return arguments


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    """The Trainer of `cfg.trainer` (`trainer_arguments`), the user's plugins merged with ours."""
    arguments = trainer_arguments(trainer_cfg)
    plugins = arguments.pop("plugins", None) or []
    plugins = [instantiate_plainly(p) if isinstance(p, Mapping) and "_target_" in p else p for p in plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # Lightning takes one checkpoint writer
        plugins.append(AtomicCheckpointIO())
    return instantiate_plainly(
        OmegaConf.create(arguments), callbacks=callbacks, logger=loggers or False, plugins=plugins
    )


def _newest_intact_last(search_dir: str, trust: bool) -> tuple[Path, dict]:
    """`ckpt_path=last` for reading: the newest last.ckpt that loads, skipping (and naming) damaged ones."""
    damaged = []
    for path in last_checkpoints(search_dir):
        try:
            checkpoint = load_checkpoint(path, "ckpt_path", trust)
        except CheckpointDamaged as error:
            damaged.append(str(error))
            continue
        for reason in damaged:
            log.warning("ckpt_path=last: skipped %s", reason)
        if damaged:
            log.warning("ckpt_path=last: using %s, the newest intact last.ckpt", path)
        return path, checkpoint
    raise CheckpointDamaged(
        "ckpt_path=last: no intact last.ckpt under " + search_dir + ":\n" + "\n".join(damaged)
    )


def load_for_inference(cfg: DictConfig) -> tuple[SSDLitModule, Path]:
    """The module of `cfg.ckpt_path` (a file, or `last`: the newest intact last.ckpt of the training runs)
    and the file it came from, read without running any code it may hold unless `trust_checkpoint=true`."""
    trust = bool(cfg.get("trust_checkpoint", False))
    if str(cfg.ckpt_path) == "last":
        ckpt_path, checkpoint = _newest_intact_last(f"{cfg.paths.log_dir}/train", trust)
    else:
        ckpt_path = resolve_checkpoint(cfg.ckpt_path, f"{cfg.paths.log_dir}/train")
        checkpoint = load_checkpoint(ckpt_path, "ckpt_path", trust)
    module = SSDLitModule.from_checkpoint(checkpoint)
    if module.loaded_ema_weights:
        log.info("%s holds EMA weights (callbacks=ema): using the average, not the raw weights", ckpt_path)
    return module, Path(ckpt_path)


def instantiate_loggers(group: DictConfig | None, wandb_run_id: str | None = None) -> list[Logger]:
    """Loggers of `cfg.logger`; a W&B logger continues run `wandb_run_id` unless the config names one."""
    entries = _entries(group, "logger")
    return [instantiate_plainly(entry, **continued_run(entry, wandb_run_id)) for _, entry in entries]
