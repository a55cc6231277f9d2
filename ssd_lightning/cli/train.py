"""`python train.py [overrides]`: train, save checkpoints, evaluate the test split, report the mAP."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from ssd_lightning.cli.build import (
    build_module,
    build_trainer,
    finish_wandb,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_loggers,
)
from ssd_lightning.cli.preflight import (
    ConfigurationError,
    check_accelerator,
    check_resume_compatible,
    check_wandb_login,
    user_errors_as_messages,
)
from ssd_lightning.cli.report import format_results, quiet_other_ranks, report, write_json
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.training.callbacks import TestDetectionsPicture
from ssd_lightning.training.checkpointing import (
    latest_hpc_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    wandb_run_id,
)
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.nonfinite import NonFiniteGuard
from ssd_lightning.training.weights import (
    check_normalization,
    describe_initialisation,
    initial_normalization,
    load_backbone_weights,
    load_detector_weights,
    snapshot,
)

log = logging.getLogger("ssd_lightning")

METRICS_FILE = "metrics.json"
BEST_PREFIX = "best/"  # metrics.json: the best value of each validation metric over the run
PRETRAINED_ARCHS = ("vgg16", "mobilenet_v3_large", "resnet50")


def runs_folder(cfg: DictConfig) -> Path:
    """Where the runs of this name live (what `ckpt_path=last` searches)."""
    return Path(cfg.paths.log_dir) / cfg.task_name / "runs" / str(cfg.get("run_name", ""))


def initialise_weights(cfg: DictConfig, module: SSDLitModule) -> None:
    """Pretrained weights for a fresh run (a resumed run gets everything from its checkpoint), after checking
    that the configured input normalisation is the one they were trained with; logs what came from where."""
    model = cfg.model
    arch = str(model.net.arch)
    weights, backbone_weights = model.get("weights"), model.get("backbone_weights")
    source = weights or backbone_weights
    if not source:
        if arch in PRETRAINED_ARCHS:
            log.warning(
                "Training %s SSD from scratch (model.backbone_weights=null); the published recipes start "
                "from ImageNet weights: model.backbone_weights=IMAGENET1K_V1 (ResNet-50: IMAGENET1K_V2)",
                arch,
            )
        log.info("Initial weights: all random (no pretrained weights)")
        return
    weights_source = str(model.get("weights_source", "ssd_lightning"))
    expected = initial_normalization(arch, backbone_weights, weights, weights_source)
    what = f"model.weights={weights}" if weights else f"model.backbone_weights={backbone_weights}"
    check_normalization(expected, model.pixel_mean, model.pixel_std, what)
    before = snapshot(module.net)
    if weights:
        load_detector_weights(module.net, weights, weights_source)
    else:
        load_backbone_weights(module.net, backbone_weights)
    log.info("Initial weights (network parts):\n%s", describe_initialisation(module.net, before, str(source)))
    log.info("Input normalisation: pixel_mean=%s pixel_std=%s", list(model.pixel_mean), list(model.pixel_std))


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> Path | None:
    """`ckpt_path` as a file; with none given, the HPC checkpoint Lightning wrote in this run folder when
    SLURM pre-empted it (the requeued job comes back to the same folder)."""
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), runs_folder(cfg))
    if ckpt_path is None:
        ckpt_path = latest_hpc_checkpoint(output_dir)
        if ckpt_path is not None:
            log.info("Requeued run: resuming from %s", ckpt_path)
    elif str(cfg.ckpt_path) == "last":
        log.info("ckpt_path=last: the newest run named %s is %s", cfg.get("run_name"), ckpt_path)
    return ckpt_path


def schedule_name() -> str:
    """`schedule=<name>` of the run (conf/schedule/), as the user would write it."""
    if HydraConfig.initialized():
        return f"schedule={HydraConfig.get().runtime.choices.get('schedule', '?')}"
    return "schedule"


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the training task of `cfg` (composed from conf/train.yaml); returns the final metrics."""
    quiet_other_ranks()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    check_accelerator(cfg.trainer)
    check_wandb_login(cfg.get("logger"))
    ckpt_path = _checkpoint_to_resume(cfg, output_dir)

    datamodule = instantiate_datamodule(cfg)
    same_images = datamodule.validation_is_test()
    skip = ()
    if same_images and cfg.get("callbacks") and cfg.callbacks.get("best_checkpoint"):
        skip = ("best_checkpoint",)
        log.info(
            "Validation and test are the same images here: no best checkpoint is kept (nothing is selected "
            "on the test split); hold out validation images with dataset.val_holdout=0.05 to select one"
        )
    run_id = None
    checkpoint = None
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path)
        run_id = wandb_run_id(checkpoint)
    loggers = instantiate_loggers(cfg.get("logger"), wandb_run_id=run_id)
    try:
        callbacks = instantiate_callbacks(cfg.get("callbacks"), skip)
        if not loggers:  # the lr monitor writes to loggers only (train/lr is still in metrics.json)
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        callbacks.append(
            NonFiniteGuard(
                cfg.trainer.get("on_nonfinite", "stop"),
                int(cfg.trainer.get("nonfinite_skip_limit", 10)),
                check_every_n_steps=int(cfg.trainer.get("log_every_n_steps", 50)),
            )
        )
        trainer = build_trainer(cfg.trainer, callbacks, loggers)
        datamodule.resolve_batch_size(trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches)
        module = build_module(cfg, datamodule, datamodule.resolved_global_batch_size)
        if checkpoint is None:
            initialise_weights(cfg, module)
        else:
            check_resume_compatible(checkpoint, module, ckpt_path)
            checkpoint = None  # Lightning reads it again with the training state
            log.info("Resuming from %s", ckpt_path)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        # Checkpoints hold the training state (optimiser, loops, callbacks), not only tensors.
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        except ValueError as error:
            if "`val_check_interval`" not in str(error):
                raise
            raise ConfigurationError(
                f"{str(error).strip()} The schedule ({schedule_name()}) validates every "
                f"trainer.val_check_interval={cfg.trainer.val_check_interval} steps; for a run counted in "
                "epochs add schedule=quick (then trainer.max_epochs=N trainer.check_val_every_n_epoch=M)"
            ) from error
        metrics = _scalars(trainer.callback_metrics)
        metrics.update({f"{BEST_PREFIX}{k}": v for k, v in module.best_validation.items()})
        # Per-class tables need the evaluation in this process (not the case with ddp_spawn).
        if module.last_evaluation is not None:
            report(format_results(module.last_evaluation, "Last validation:"))

        if cfg.get("test") and not trainer.interrupted:
            module.last_evaluation = None
            best = None if same_images else _best_checkpoint(trainer)
            trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=False)
            metrics.update(_scalars(trainer.callback_metrics))
            if module.last_evaluation is not None:
                if best:
                    source = f"best checkpoint by {cfg.get('monitor')}: {best}"
                elif same_images:
                    source = "final weights; validation used the same images, so nothing was selected on them"
                else:
                    source = "final weights"
                report(format_results(module.last_evaluation, f"Test ({source}):"))
        metrics["step"] = trainer.global_step
        write_json(output_dir / METRICS_FILE, metrics)
        for callback in trainer.callbacks:
            if isinstance(callback, TestDetectionsPicture) and callback.path is not None:
                report(f"Detections on test images: {callback.path}")
        final = {
            k: v
            for k, v in metrics.items()
            if k.endswith(("/map_voc07", "/map")) and not k.startswith(BEST_PREFIX)
        }
        report(
            "Final mAP: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())) + f"  ({output_dir})"
        )
        return metrics
    finally:
        finish_wandb(loggers)


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweep optimises (`optimized_metric`): its best over the run's validations, NaN when the
    run produced no finite value."""
    if not name:
        return None
    value = metrics.get(f"{BEST_PREFIX}{name}", metrics.get(name, math.nan))
    if f"{BEST_PREFIX}{name}" not in metrics and name not in metrics:
        log.warning("optimized_metric=%s was not logged (no validation ran?); returning NaN", name)
    return value if math.isfinite(value) else math.nan


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="train")
@user_errors_as_messages("train.py")
def main(cfg: DictConfig) -> float | None:
    """Console entry point (`ssd-train` / `python train.py`)."""
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
