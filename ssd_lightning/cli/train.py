"""`python train.py [overrides]`: train, save checkpoints, evaluate the test split, report the mAP."""

from __future__ import annotations

import logging
import math
import signal
import traceback
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from ssd_lightning.checkpoint_files import load_checkpoint
from ssd_lightning.cli.build import (
    ProcessLayout,
    build_module,
    build_trainer,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_loggers,
    learning_rate,
    process_layout,
)
from ssd_lightning.cli.preflight import (
    ConfigurationError,
    SweepError,
    check_accelerator,
    check_monitor,
    check_plugin_backbone,
    check_resume_compatible,
    in_multirun,
    user_errors_as_messages,
)
from ssd_lightning.cli.report import quiet_other_ranks, report, write_json
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.data.batch_plan import BatchPlan
from ssd_lightning.models.architectures import get_architecture
from ssd_lightning.models.initial_weights import (
    check_normalization,
    describe_initialisation,
    initial_normalization,
    load_backbone_weights,
    load_detector_weights,
    snapshot,
)
from ssd_lightning.sweeps.job import swept_values
from ssd_lightning.sweeps.pruning import trial_pruning
from ssd_lightning.training import launch
from ssd_lightning.training.callbacks import LastCheckpoint, TestDetectionsPicture
from ssd_lightning.training.checkpointing import (
    CHECKPOINT_FOLDER,
    LAST_CHECKPOINT,
    requeued_checkpoint,
    resolve_checkpoint,
)
from ssd_lightning.training.ema import EMAWeights
from ssd_lightning.training.interruption import RunInterrupted, StopOnSignal
from ssd_lightning.training.module import BEST_PREFIX, SSDLitModule, validation_metric_names
from ssd_lightning.training.scaling import STEP_KEYS, describe_scaling, scale_schedule, wants_sync_batchnorm
from ssd_lightning.training.wandb_logging import check_wandb_login, finish, run_id
from ssd_lightning.training.watchdog import StallWatchdog

log = logging.getLogger("ssd_lightning")

METRICS_FILE = "metrics.json"


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
        start = None if model.net.get("backbone") else get_architecture(arch).imagenet
        if start is not None:
            log.warning(
                "Training %s SSD from scratch (model.backbone_weights=null); the published recipes start "
                "from ImageNet weights: model.backbone_weights=%s",
                arch,
                start.default_weights,
            )
        log.info("Initial weights: all random (no pretrained weights)")
        return
    weights_source = str(model.get("weights_source", "ssd_lightning"))
    trust = bool(cfg.get("trust_checkpoint", False))
    expected = initial_normalization(arch, backbone_weights, weights, weights_source, trust)
    what = f"model.weights={weights}" if weights else f"model.backbone_weights={backbone_weights}"
    check_normalization(expected, model.pixel_mean, model.pixel_std, what)
    before = snapshot(module.net)
    if weights:
        load_detector_weights(module.net, weights, weights_source, trust)
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
    """The checkpoint this run resumes from: a requeued SLURM job's own, whatever `ckpt_path` says (it is
    newer than anything the job started from); else `ckpt_path` as a file (`last`: the newest run of this name
    that no other job may still be training)."""
    own = requeued_checkpoint(output_dir)
    if own is not None:
        given = cfg.get("ckpt_path")
        log.info(
            "Requeued SLURM job %s: resuming from its own checkpoint %s%s",
            launch.slurm_job_id(),
            own,
            f" (not ckpt_path={given}, which the job started from)"
            if given and Path(str(given)) != own
            else "",
        )
        return own
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), runs_folder(cfg), for_resume=True)
    if ckpt_path is not None and str(cfg.ckpt_path) == "last":
        log.info("ckpt_path=last: the newest run named %s is %s", cfg.get("run_name"), ckpt_path)
    return ckpt_path


def schedule_name() -> str:
    """`schedule=<name>` of the run (conf/schedule/), as the user would write it."""
    if HydraConfig.initialized():
        return f"schedule={HydraConfig.get().runtime.choices.get('schedule', '?')}"
    return "schedule"


def refuse_selection_on_test(cfg: DictConfig, same_images: bool) -> None:
    """A sweep whose validation images are the test split would choose its hyperparameters on the test set."""
    if not same_images or cfg.get("select_on_test") or not in_multirun() or not cfg.get("optimized_metric"):
        return
    raise SweepError(
        f"this sweep would choose hyperparameters on the test images: the validation of "
        f"dataset={cfg.dataset.name} is its test split, and each job returns its best "
        f"{cfg.optimized_metric}. "
        "Validate on images held out from training instead: dataset.val_holdout=0.05 (5% of the training "
        "images, the same on every run), or another dataset.val_sets / dataset.val_split; or accept it "
        "knowingly with select_on_test=true"
    )


def follow_the_global_batch(cfg: DictConfig, plan: BatchPlan) -> None:
    """Say what the run's global batch means for the lr and the schedule, and with `scale_lr=true` make the
    schedule's step counts follow it (`training/scaling.py`)."""
    lr = learning_rate(cfg, plan.global_batch)
    base = cfg.optimizer.get("base_batch_size")
    if plan.rounded:
        if cfg.get("scale_lr"):
            lr_note = (
                f"lr {lr:g}: optimizer.lr={cfg.optimizer.lr:g} x {plan.global_batch} / {base} (scale_lr)"
            )
        else:
            lr_note = (
                f"lr {lr:g} as given (optimizer.lr, set for {base} images per step; scale_lr=true scales it)"
            )
        accumulated = f" x {plan.accumulate} accumulated batches" if plan.accumulate > 1 else ""
        log.warning(
            "dataset.global_batch_size=%d does not divide over %d processes%s: the run takes a global batch "
            "of %d (%d per device) at %s. To choose: dataset.global_batch_size=<a multiple of %d>, or "
            "dataset.batch_size=<images per device>",
            plan.requested,
            plan.processes,
            accumulated,
            plan.global_batch,
            plan.per_device,
            lr_note,
            plan.processes * plan.accumulate,
        )
    written_for = cfg.schedule.get("global_batch_size")
    if not written_for or int(written_for) == plan.global_batch:
        return
    factor = int(written_for) / plan.global_batch
    if cfg.get("scale_lr"):
        before = OmegaConf.to_container(cfg.schedule, resolve=True)
        after = scale_schedule(before, factor)
        changes = describe_scaling(before, after)
        if changes:
            for key in STEP_KEYS:
                cfg.schedule[key] = after[key]
            log.info(
                "scale_lr: the schedule counts steps of %d images; at %d per step: %s (the recipe's epochs)",
                written_for,
                plan.global_batch,
                changes,
            )
        return
    log.warning(
        "The schedule (%s) counts steps of %d images; this run takes %d per step, so its steps cover %.3gx "
        "the recipe's epochs at optimizer.lr=%g as given. scale_lr=true scales the lr and the step counts "
        "with the global batch",
        schedule_name(),
        written_for,
        plan.global_batch,
        1 / factor,
        lr,
    )


def decide_sync_batchnorm(
    cfg: DictConfig, module: SSDLitModule, plan: BatchPlan, layout: ProcessLayout
) -> None:
    """`trainer.sync_batchnorm: auto` decided for this network and batch (logged)."""
    if str(cfg.trainer.get("sync_batchnorm", False)) != "auto":
        return
    wanted, why = wants_sync_batchnorm(module.net, plan.processes, plan.per_device, layout.on_gpu)
    cfg.trainer.sync_batchnorm = wanted
    if plan.processes > 1:
        log.info("trainer.sync_batchnorm=auto -> %s (%s)", str(wanted).lower(), why)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the training task of `cfg` (composed from conf/train.yaml); returns the final metrics."""
    quiet_other_ranks()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    check_accelerator(cfg.trainer)
    check_plugin_backbone(cfg.model)
    check_wandb_login(cfg.get("logger"))
    ckpt_path = _checkpoint_to_resume(cfg, output_dir)
    trust = bool(cfg.get("trust_checkpoint", False))

    datamodule = instantiate_datamodule(cfg)
    check_monitor(cfg, validation_metric_names(datamodule.classes))
    same_images = datamodule.validation_is_test()
    refuse_selection_on_test(cfg, same_images)
    skip = ()
    if same_images and cfg.get("callbacks") and cfg.callbacks.get("best_checkpoint"):
        skip = ("best_checkpoint",)
        log.info(
            "Validation and test are the same images here: no best checkpoint is kept (nothing is selected "
            "on the test split); hold out validation images with dataset.val_holdout=0.05 to select one"
        )
    layout = process_layout(cfg.trainer)
    plan = datamodule.resolve_batch_size(
        layout.devices, layout.nodes, int(cfg.trainer.accumulate_grad_batches)
    )
    follow_the_global_batch(cfg, plan)
    module = build_module(cfg, datamodule, plan.global_batch)
    module.track_best_validation = not same_images or bool(cfg.get("select_on_test"))
    decide_sync_batchnorm(cfg, module, plan, layout)
    wandb_run = None
    checkpoint = None
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path, "ckpt_path", trust)
        wandb_run = run_id(checkpoint)
    loggers = instantiate_loggers(cfg.get("logger"), wandb_run_id=wandb_run)
    interrupted: RunInterrupted | None = None
    owns_folder = False
    try:
        callbacks = instantiate_callbacks(cfg.get("callbacks"), skip)
        if not loggers:  # the lr monitor writes to loggers only (train/lr is still in metrics.json)
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        check_every = int(cfg.trainer.get("log_every_n_steps", 50))
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        last_path = Path(last.dirpath if last else output_dir / CHECKPOINT_FOLDER) / LAST_CHECKPOINT
        callbacks.append(
            StopOnSignal(
                last_path,
                check_every_n_steps=check_every,
                requeue_signal=signal.SIGUSR1 if launch.slurm_job_id() else None,
            )
        )
        callbacks.append(
            StallWatchdog(float(cfg.trainer.get("stall_timeout_s", 1800)), last_path, output_dir)
        )
        pruning = trial_pruning(cfg)  # an Optuna sweep's job with a pruner
        if pruning is not None:
            callbacks.append(pruning)
        trainer = build_trainer(cfg.trainer, callbacks, loggers)
        if checkpoint is None:
            initialise_weights(cfg, module)
        else:
            check_resume_compatible(checkpoint, module, ckpt_path)
            checkpoint = None  # Lightning reads it again with the training state
            log.info("Resuming from %s", ckpt_path)
        if trainer.is_global_zero:
            launch.claim(output_dir)
            owns_folder = True
        for logger in loggers:  # a sweep job's swept values side by side (W&B groups them by sweep)
            logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **swept_values()})
        try:
            # Read by the weights-only unpickler like every file we load, unless trust_checkpoint=true.
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
        except RunInterrupted as stop:
            interrupted = stop
        except KeyError as error:  # torch's scheduler load_state_dict on another kind of scheduler
            frames = traceback.extract_tb(error.__traceback__)
            if not any(frame.name == "restore_lr_schedulers" for frame in frames):
                raise
            raise ConfigurationError(
                f"ckpt_path={ckpt_path} holds a learning-rate schedule of another shape than this config's "
                f"(e.g. warmup in one and not in the other: scheduler.warmup_steps, the run's length). To "
                "resume, pass the schedule settings of the run that wrote it (its .hydra/overrides.yaml); "
                f"to start a new run from its weights instead, use model.weights={ckpt_path}"
            ) from error
        except ValueError as error:
            if "`val_check_interval`" not in str(error):
                raise
            raise ConfigurationError(
                f"{str(error).strip()} The schedule ({schedule_name()}) validates every "
                f"trainer.val_check_interval={cfg.trainer.val_check_interval} steps; for a run counted in "
                "epochs add schedule=quick (then trainer.max_epochs=N trainer.check_val_every_n_epoch=M)"
            ) from error
        metrics = _scalars(trainer.callback_metrics)
        if module.track_best_validation:
            metrics.update({f"{BEST_PREFIX}{k}": v for k, v in module.best_validation.items()})
        else:  # logged nowhere: nothing is "best" on the test images
            metrics = {k: v for k, v in metrics.items() if not k.startswith(BEST_PREFIX)}
        if interrupted is not None:
            metrics["step"] = trainer.global_step
            write_json(output_dir / METRICS_FILE, metrics)
            log.warning("%s", interrupted)
            raise interrupted
        if pruning is not None and pruning.pruned_at is not None:  # no test: the sweeper records it
            metrics["step"] = trainer.global_step
            write_json(output_dir / METRICS_FILE, metrics)
            raise pruning.pruned()
        # Per-class tables need the evaluation in this process (not the case with ddp_spawn).
        if module.last_evaluation is not None:
            report(module.last_evaluation.format("Last validation:"))

        if cfg.get("test") and not trainer.interrupted:
            module.last_evaluation = None
            best = None if same_images else _best_checkpoint(trainer)
            trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
            metrics.update(_scalars(trainer.callback_metrics))
            if module.last_evaluation is not None:
                if best:
                    source = f"best checkpoint by {cfg.get('monitor')}: {best}"
                elif same_images:
                    source = "final weights; validation used the same images, so nothing was selected on them"
                else:
                    source = "final weights"
                if any(isinstance(c, EMAWeights) for c in trainer.callbacks):
                    source += ", EMA weights"
                report(module.last_evaluation.format(f"Test ({source}):"))
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
        finish(loggers)
        # A requeued job comes back to this folder: it stays the job's.
        if owns_folder and not (interrupted is not None and interrupted.requeued):
            launch.release(output_dir)


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
