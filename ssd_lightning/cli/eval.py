"""`python eval.py ckpt_path=... [dataset=...] [split=test|val] [analysis=true]`: VOC07, VOC2010+, COCO mAP.
`model_path=<exported .onnx|.xml|.engine|.pt> [runtime=auto]` instead of ckpt_path= evaluates the exported
model on its runtime (`cli/deploy.py`), with the same data, metrics and files.

Prints the three mAPs and a per-class table and writes them as JSON. The network, its input size and
normalisation come from the checkpoint, so `model=` need not be repeated. `analysis=true` adds the false
positives by cause and the missed objects by size (`ssd_lightning.metrics.analysis`) to the printout and
the JSON, and draws precision-recall curves per class (a PNG in the run folder, and a W&B plot with
`logger=wandb`). Always: the confusion matrix and precision/recall/F1 against the score threshold with the
threshold of best F1 (`confusion_matrix.{json,png}`, `thresholds.json`, `pr_f1_curves.png` in the output
folder; `training/run_plots.py`).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from ssd_lightning.cli.build import build_trainer, instantiate_datamodule, instantiate_loggers
from ssd_lightning.cli.deploy import evaluate_split, load_model, model_name, model_record
from ssd_lightning.cli.preflight import check_accelerator, user_errors_as_messages
from ssd_lightning.cli.report import report, write_json
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.metrics.analysis import plot_pr_curves
from ssd_lightning.metrics.evaluation import EvaluationResult
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.run_plots import write_evaluation_outputs
from ssd_lightning.training.wandb_logging import finish, log_error_analysis, log_png_files

SPLITS = ("val", "test")
log = logging.getLogger("ssd_lightning")


def check_classes(module: SSDLitModule, classes: list[str], where: str) -> None:
    if list(classes) != module.class_names:
        raise ValueError(
            f"the checkpoint was trained on classes {module.class_names} but {where} has {list(classes)}; "
            "pass the training class list (dataset.classes=[...]) or the matching dataset"
        )


def confusion_threshold(value: object) -> float | None:
    """`confusion_score_threshold`: a score in [0, 1], or null (the threshold of best F1)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"confusion_score_threshold={value!r}: give a score in [0, 1], or null (the threshold of best F1)"
        )
    return float(value)


def evaluate(cfg: DictConfig) -> EvaluationResult:
    """Run the eval task of `cfg` (composed from conf/eval.yaml)."""
    check_accelerator(cfg.trainer)
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: choose one of {SPLITS}")
    module = load_model(cfg, "eval.py")
    # The data is prepared for the checkpoint's network, whatever `model=` says.
    hparams = module.hparams
    datamodule = instantiate_datamodule(cfg, module.image_size, hparams.pixel_mean, hparams.pixel_std)
    check_classes(module, datamodule.classes, f"dataset={cfg.dataset.name}")
    evaluator = module.val_evaluator if cfg.split == "val" else module.test_evaluator
    evaluator.confusion_and_thresholds = True  # confusion_matrix.*, thresholds.json, pr_f1_curves.png
    evaluator.confusion_score_threshold = confusion_threshold(cfg.get("confusion_score_threshold"))
    if cfg.get("analysis", False):
        evaluator.error_analysis = True
        evaluator.analysis_score_threshold = float(cfg.analysis_score_threshold)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=loggers)
    evaluate_split(trainer, module, datamodule, cfg.split)
    result = module.last_evaluation
    report(result.format(f"{model_name(cfg)} on {cfg.dataset.name} {cfg.split}:"))
    if result.analysis is not None:
        report(result.analysis.format())
        title = f"{cfg.dataset.name} {cfg.split}"
        png = plot_pr_curves(result.analysis, cfg.pr_curves_png, title)
        report(f"Wrote {png}")
        if trainer.is_global_zero:
            log_error_analysis(result.analysis, png, title, loggers)
    if result.thresholds is not None:
        report(result.thresholds.format())
    if trainer.is_global_zero:
        pictures = write_evaluation_outputs(result, cfg.paths.output_dir, f"{cfg.dataset.name} {cfg.split}")
        log_png_files(loggers, pictures)
    report(f"Wrote the confusion matrix and the precision/recall/F1 curves in {cfg.paths.output_dir}")
    write_json(cfg.output_json, {**model_record(cfg, module), "split": cfg.split, **result.to_dict()})
    report(f"Wrote {cfg.output_json}")
    finish(loggers)
    return result


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="eval")
@user_errors_as_messages("eval.py")
def main(cfg: DictConfig) -> float:
    """Console entry point (`ssd-eval` / `python eval.py`); returns the VOC07 mAP."""
    return evaluate(cfg).map_voc07


if __name__ == "__main__":
    main()
