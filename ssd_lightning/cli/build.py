"""The objects of a run, built from the Hydra config: DataModule, LightningModule, callbacks, Trainer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO

from ssd_lightning.training.checkpointing import AtomicCheckpointIO
from ssd_lightning.training.module import SSDLitModule

log = logging.getLogger("ssd_lightning")

#: Keys of conf/dataset/*.yaml that other configs read (`${dataset.monitor}`), not DataModule arguments.
DATASET_CONFIG_KEYS = ("monitor", "prior_sizes")
#: Key of conf/optimizer/*.yaml that is ours, not an argument of the torch optimiser.
BASE_BATCH_KEY = "base_batch_size"
GPU_ACCELERATORS = ("gpu", "cuda")
#: Keys of conf/trainer/*.yaml that are ours (NonFiniteGuard), not Trainer arguments.
OUR_TRAINER_KEYS = ("on_nonfinite", "nonfinite_skip_limit")


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


def instantiate_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The DataModule of `cfg.dataset`, checked against the model's input size."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    arguments = {k: v for k, v in node.items() if k not in DATASET_CONFIG_KEYS}
    datamodule = instantiate_plainly(OmegaConf.create(arguments))
    if int(datamodule.image_size) != int(cfg.model.image_size):
        raise ValueError(
            f"dataset.image_size={datamodule.image_size} but the model takes {cfg.model.image_size}px input "
            f"(model.image_size); leave dataset.image_size at its default ${{model.image_size}}"
        )
    return datamodule


def category_ids_of(datamodule: pl.LightningDataModule) -> list[int] | None:
    """COCO's original category id per contiguous label (label 1 first), when the data has them."""
    mapping: Mapping[int, int] | None = getattr(datamodule, "label_to_category_id", None)
    if not mapping:
        return None
    return [int(mapping[label]) for label in range(1, len(datamodule.classes) + 1)]


def optimizer_factory(cfg: DictConfig, global_batch: int | None = None) -> functools.partial:
    """`params -> Optimizer` of `cfg.optimizer`; with `scale_lr` its lr is scaled by global batch / the
    optimiser's `base_batch_size` (linear scaling rule)."""
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    factory = instantiate({k: v for k, v in node.items() if k != BASE_BATCH_KEY})
    if not cfg.get("scale_lr") or global_batch is None:
        return factory
    base = cfg.optimizer.get(BASE_BATCH_KEY)
    if not base:
        raise ValueError(
            f"scale_lr=true needs optimizer.{BASE_BATCH_KEY}: the global batch optimizer.lr is for"
        )
    lr = float(factory.keywords["lr"]) * global_batch / int(base)
    log.info("scale_lr: lr %g x %d / %d = %g", factory.keywords["lr"], global_batch, int(base), lr)
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


def instantiate_loggers(group: DictConfig | None, wandb_run_id: str | None = None) -> list[Logger]:
    """Loggers of `cfg.logger`; a W&B logger continues run `wandb_run_id` unless the config names one."""
    loggers = []
    for _, entry in _entries(group, "logger"):
        if wandb_run_id and entry._target_.endswith("WandbLogger") and not entry.get("id"):
            log.info("Continuing W&B run %s", wandb_run_id)
            loggers.append(instantiate_plainly(entry, id=wandb_run_id, resume="allow"))
        else:
            loggers.append(instantiate_plainly(entry))
    return loggers


def resolve_precision(precision: Any, accelerator: str) -> str:
    """`auto`: bf16-mixed on a GPU that supports bf16, 16-mixed on other GPUs, 32-true elsewhere; any other
    value is Lightning's own."""
    if str(precision) != "auto":
        return precision
    uses_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    if not uses_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    """The Trainer of `cfg.trainer`: precision resolved, the user's plugins merged with ours."""
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    precision = arguments.get("precision", "auto")
    arguments["precision"] = resolve_precision(precision, str(arguments.get("accelerator", "auto")))
    if str(precision) == "auto":
        log.info("trainer.precision=auto -> %s", arguments["precision"])
    for key in OUR_TRAINER_KEYS:  # read by the entry points, not Trainer arguments
        arguments.pop(key, None)
    plugins = arguments.pop("plugins", None) or []
    plugins = [instantiate_plainly(p) if isinstance(p, Mapping) and "_target_" in p else p for p in plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # Lightning takes one checkpoint writer
        plugins.append(AtomicCheckpointIO())
    return instantiate_plainly(
        OmegaConf.create(arguments), callbacks=callbacks, logger=loggers or False, plugins=plugins
    )


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run, so that the next job of a multirun starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
