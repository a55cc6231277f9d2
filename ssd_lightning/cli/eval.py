"""`python eval.py ckpt_path=... [dataset=...] [split=test|val]`: VOC07, VOC2010+ and COCO mAP.

Prints the three mAPs and a per-class table and writes them as JSON. The network, its input size and
normalisation come from the checkpoint, so `model=` need not be repeated.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssd_lightning.cli.build import build_trainer, instantiate_datamodule
from ssd_lightning.cli.preflight import check_accelerator, user_errors_as_messages
from ssd_lightning.cli.report import format_results, report, write_json
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.training.checkpointing import resolve_checkpoint
from ssd_lightning.training.evaluation import EvaluationResult
from ssd_lightning.training.module import SSDLitModule

SPLITS = ("val", "test")


def load_for_inference(cfg: DictConfig) -> SSDLitModule:
    """The module of `cfg.ckpt_path` (a file, or `last`: the newest last.ckpt of the training runs)."""
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, f"{cfg.paths.log_dir}/train")
    return SSDLitModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)


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
    module = load_for_inference(cfg)
    # The data must be prepared for the checkpoint's network, whatever `model=` says.
    cfg.model.image_size = module.image_size
    cfg.model.pixel_mean = list(module.hparams.pixel_mean)
    cfg.model.pixel_std = list(module.hparams.pixel_std)
    datamodule = instantiate_datamodule(cfg)
    check_classes(module, datamodule.classes, f"dataset={cfg.dataset.name}")
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=[])
    run = trainer.validate if cfg.split == "val" else trainer.test
    run(module, datamodule=datamodule, verbose=False)
    result = module.last_evaluation
    report(format_results(result, f"{cfg.ckpt_path} on {cfg.dataset.name} {cfg.split}:"))
    write_json(cfg.output_json, {"checkpoint": str(cfg.ckpt_path), "split": cfg.split, **result.to_dict()})
    report(f"Wrote {cfg.output_json}")
    return result


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="eval")
@user_errors_as_messages("eval.py")
def main(cfg: DictConfig) -> float:
    """Console entry point (`ssd-eval` / `python eval.py`); returns the VOC07 mAP."""
    return evaluate(cfg).map_voc07


if __name__ == "__main__":
    main()
