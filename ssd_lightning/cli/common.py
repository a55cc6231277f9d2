"""What the train / eval / predict entry points share: building objects from the Hydra config, reports."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssd_lightning.training.checkpointing import AtomicCheckpointIO
from ssd_lightning.training.evaluation import EvaluationResult
from ssd_lightning.training.module import SSDLitModule

log = logging.getLogger("ssd_lightning")

#: The Hydra config tree of this repository (the package is installed in editable mode).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
HYDRA_VERSION_BASE = "1.3"


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
    datamodule = instantiate_plainly(cfg.dataset)
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


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> SSDLitModule:
    """The LightningModule of `cfg.model` for the classes of `datamodule` (num_classes follows the data)."""
    scheduler = cfg.get("scheduler")
    return SSDLitModule(
        class_names=list(datamodule.classes),
        net=OmegaConf.to_container(cfg.model.net, resolve=True),
        pixel_mean=list(cfg.model.pixel_mean),
        pixel_std=list(cfg.model.pixel_std),
        loss=OmegaConf.to_container(cfg.model.loss, resolve=True),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        channels_last=bool(cfg.model.get("channels_last", False)),
        category_ids=category_ids_of(datamodule),
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


def instantiate_callbacks(group: DictConfig | None) -> list[pl.Callback]:
    return [instantiate_plainly(entry) for _, entry in _entries(group, "callbacks")]


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


def build_trainer(trainer_cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    return instantiate_plainly(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run, so that the next job of a multirun starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def format_results(result: EvaluationResult, title: str) -> str:
    """The three protocols' mAP and a per-class AP table, as text."""
    lines = [
        f"{title} ({result.num_images} images)",
        f"  mAP VOC07 (11-point, IoU 0.5): {result.map_voc07:.4f}",
        f"  mAP VOC2010+ (area, IoU 0.5):  {result.map_voc12:.4f}",
        f"  mAP COCO @[.5:.95]:            {result.map:.4f}",
        f"  mAP COCO @.5 / @.75:           {result.map_50:.4f} / {result.map_75:.4f}",
    ]
    if result.per_class_ap_voc07:
        width = max(len(name) for name in result.per_class_ap_voc07)
        lines.append(f"  {'class':<{width}}  AP VOC07  AP VOC2010+")
        for name, ap07 in result.per_class_ap_voc07.items():
            lines.append(
                f"  {name:<{width}}  {ap07:8.4f}  {result.per_class_ap_voc12.get(name, float('nan')):11.4f}"
            )
    return "\n".join(lines)


@rank_zero_only
def report(text: str) -> None:
    """Print on the main process only (every DDP rank runs the entry point)."""
    print(text, flush=True)


@rank_zero_only
def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
