"""`python eval.py ckpt_path=... [dataset=...] [split=test|val] [analysis=true]`: VOC07, VOC2010+, COCO mAP.

Prints the three mAPs and a per-class table and writes them as JSON. The network, its input size and
normalisation come from the checkpoint, so `model=` need not be repeated. `analysis=true` adds the false
positives by cause and the missed objects by size (`ssd_lightning.metrics.analysis`) to the printout and
the JSON, and draws precision-recall curves per class (a PNG in the run folder, and a W&B plot with
`logger=wandb`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssd_lightning.cli.build import build_trainer, finish_wandb, instantiate_datamodule, instantiate_loggers
from ssd_lightning.cli.preflight import check_accelerator, user_errors_as_messages
from ssd_lightning.cli.report import format_results, report, write_json
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.metrics.analysis import OUTCOMES, ErrorAnalysis, plot_pr_curves
from ssd_lightning.training.checkpointing import (
    CheckpointDamaged,
    last_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from ssd_lightning.training.evaluation import EvaluationResult
from ssd_lightning.training.module import SSDLitModule

SPLITS = ("val", "test")
log = logging.getLogger("ssd_lightning")


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


def check_classes(module: SSDLitModule, classes: list[str], where: str) -> None:
    if list(classes) != module.class_names:
        raise ValueError(
            f"the checkpoint was trained on classes {module.class_names} but {where} has {list(classes)}; "
            "pass the training class list (dataset.classes=[...]) or the matching dataset"
        )


def evaluate(cfg: DictConfig) -> EvaluationResult:
    """Run the eval task of `cfg` (composed from conf/eval.yaml)."""
    check_accelerator(cfg.trainer)
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: choose one of {SPLITS}")
    module, _ = load_for_inference(cfg)
    # The data must be prepared for the checkpoint's network, whatever `model=` says.
    cfg.model.image_size = module.image_size
    cfg.model.pixel_mean = list(module.hparams.pixel_mean)
    cfg.model.pixel_std = list(module.hparams.pixel_std)
    datamodule = instantiate_datamodule(cfg)
    check_classes(module, datamodule.classes, f"dataset={cfg.dataset.name}")
    if cfg.get("analysis", False):
        evaluator = module.val_evaluator if cfg.split == "val" else module.test_evaluator
        evaluator.error_analysis = True
        evaluator.analysis_score_threshold = float(cfg.analysis_score_threshold)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=loggers)
    run = trainer.validate if cfg.split == "val" else trainer.test
    run(module, datamodule=datamodule, verbose=False)
    result = module.last_evaluation
    report(format_results(result, f"{cfg.ckpt_path} on {cfg.dataset.name} {cfg.split}:"))
    if result.analysis is not None:
        report(result.analysis.format())
        save_analysis(result.analysis, cfg.pr_curves_png, f"{cfg.dataset.name} {cfg.split}", loggers)
    write_json(cfg.output_json, {"checkpoint": str(cfg.ckpt_path), "split": cfg.split, **result.to_dict()})
    report(f"Wrote {cfg.output_json}")
    finish_wandb(loggers)
    return result


@rank_zero_only
def save_analysis(analysis: ErrorAnalysis, png: str | Path, title: str, loggers: list[Logger]) -> None:
    """The precision-recall curves as a PNG and, for each W&B logger, as a plot with the breakdown table."""
    png = plot_pr_curves(analysis, png, title)
    report(f"Wrote {png}")
    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    names = list(analysis.curves)
    points = [analysis.curves[name].points() for name in names]
    columns = ["class", "scope", "detections", *OUTCOMES, "objects", "missed"]
    rows = []
    for scope, overall, per_class in (
        ("all detections", analysis.overall, analysis.per_class),
        (
            f"score >= {analysis.score_threshold:g}",
            analysis.overall_at_threshold,
            analysis.per_class_at_threshold,
        ),
    ):
        for name, b in {"all classes": overall, **per_class}.items():
            rows.append([name, scope, b.detections, *(getattr(b, o) for o in OUTCOMES), b.objects, b.missed])
    for logger in wandb_loggers:
        logger.experiment.log(
            {
                "analysis/pr_curves": wandb.plot.line_series(
                    xs=[recall for recall, _ in points],
                    ys=[precision for _, precision in points],
                    keys=names,
                    title=f"precision-recall per class, {title}",
                    xname="recall",
                ),
                "analysis/pr_curves_png": wandb.Image(str(png)),
                "analysis/errors": wandb.Table(columns=columns, data=rows),
            }
        )


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="eval")
@user_errors_as_messages("eval.py")
def main(cfg: DictConfig) -> float:
    """Console entry point (`ssd-eval` / `python eval.py`); returns the VOC07 mAP."""
    return evaluate(cfg).map_voc07


if __name__ == "__main__":
    main()
