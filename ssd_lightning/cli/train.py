"""`python train.py [overrides]`: train, save checkpoints, evaluate the best one, print and return the mAP."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ssd_lightning.cli.common import (
    CONF_DIR,
    HYDRA_VERSION_BASE,
    build_module,
    build_trainer,
    finish_wandb,
    format_results,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_loggers,
    report,
    write_json,
)
from ssd_lightning.cli.preflight import check_accelerator, check_resume_compatible, check_wandb_login
from ssd_lightning.training.checkpointing import (
    load_checkpoint,
    resolve_checkpoint,
    wandb_run_id,
)
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.weights import load_backbone_weights, load_detector_weights

log = logging.getLogger("ssd_lightning")

METRICS_FILE = "metrics.json"


def _initialise_weights(cfg: DictConfig, module: SSDLitModule) -> None:
    """Pretrained weights for a fresh run (a resumed run gets everything from its checkpoint)."""
    if cfg.model.get("weights"):
        load_detector_weights(module.net, cfg.model.weights, cfg.model.get("weights_source", "ssd_lightning"))
    elif cfg.model.get("backbone_weights"):
        load_backbone_weights(module.net, cfg.model.backbone_weights)
    elif cfg.model.net.arch == "vgg16":
        log.warning(
            "Training VGG16 SSD from scratch (model.backbone_weights=null); the paper starts from ImageNet "
            "weights: model.backbone_weights=IMAGENET1K_FEATURES"
        )


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the training task of `cfg` (composed from conf/train.yaml); returns the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    check_accelerator(cfg.trainer)
    check_wandb_login(cfg.get("logger"))
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name, output_dir)

    datamodule = instantiate_datamodule(cfg)
    module = build_module(cfg, datamodule)
    run_id = None
    if ckpt_path is None:
        _initialise_weights(cfg, module)
    else:
        checkpoint = load_checkpoint(ckpt_path)
        check_resume_compatible(checkpoint, module, ckpt_path)
        run_id = wandb_run_id(checkpoint)
        del checkpoint  # Lightning reads it again with the training state
    loggers = instantiate_loggers(cfg.get("logger"), wandb_run_id=run_id)
    try:
        trainer = build_trainer(cfg.trainer, instantiate_callbacks(cfg.get("callbacks")), loggers)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if ckpt_path is not None:
            log.info("Resuming from %s", ckpt_path)
        # Checkpoints hold the training state (optimiser, loops, callbacks), not only tensors.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        metrics = _scalars(trainer.callback_metrics)
        # Per-class tables need the evaluation in this process (not the case with ddp_spawn).
        if module.last_evaluation is not None:
            report(format_results(module.last_evaluation, "Last validation:"))

        if cfg.get("test") and not trainer.interrupted:
            module.last_evaluation = None
            best = _best_checkpoint(trainer)
            trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=False)
            metrics.update(_scalars(trainer.callback_metrics))
            if module.last_evaluation is not None:
                source = f"best checkpoint {best}" if best else "final weights"
                report(format_results(module.last_evaluation, f"Test ({source}):"))
        metrics["step"] = trainer.global_step
        write_json(output_dir / METRICS_FILE, metrics)
        final = {k: v for k, v in metrics.items() if k.endswith(("/map_voc07", "/map"))}
        report(
            "Final mAP: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())) + f"  ({output_dir})"
        )
        return metrics
    finally:
        finish_wandb(loggers)


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweep optimises (`optimized_metric`), NaN when the run produced no finite value."""
    if not name:
        return None
    value = metrics.get(name, math.nan)
    if name not in metrics:
        log.warning("optimized_metric=%s was not logged (no validation ran?); returning NaN", name)
    return value if math.isfinite(value) else math.nan


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point (`ssd-train` / `python train.py`)."""
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
