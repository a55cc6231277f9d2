"""Every problem of a dataset at once, without training:

    python -m ssd_lightning.cli.check dataset=<shapes|voc|coco|yolo> dataset.root=<path> [overrides]
    ssd-check dataset=...  # the same, installed as a console script

Takes the same Hydra overrides as ``train.py`` (it composes ``conf/train.yaml``); each problem is printed
on its own line naming its file. Then, for the model those overrides select, how well its priors reach the
training boxes, with prior sizes that would reach more (:mod:`ssd_lightning.coverage`). Exit status 1 if
any error was found, else 0.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.coverage import normalised_boxes, prior_coverage
from ssd_lightning.data import DatasetError, DetectionDataModule, DetectionDataset
from ssd_lightning.data.check import check_datamodule
from ssd_lightning.models.ssd import ssd_prior_spec


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Compose ``conf/train.yaml`` with ``argv`` as overrides, check its dataset; the exit status."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(config_dir()), version_base=HYDRA_VERSION_BASE):
        cfg = compose(config_name="train", overrides=overrides)
    try:
        datamodule = instantiate_datamodule(cfg)
        datamodule.prepare_data()
    except DatasetError as error:
        for problem in error.problems:
            print(f"{problem.severity.upper()} {problem}", file=out)
        print(f"FAILED: {len(error.problems)} error(s)", file=out)
        return 1
    print(f"dataset {datamodule.name} ({datamodule.format}) at {datamodule.root}", file=out)
    usable: dict[str, DetectionDataset] = {}
    errors, warnings = check_datamodule(datamodule, out, usable)
    print(coverage_report(cfg, datamodule, usable.get("train")), file=out)
    print(f"{'FAILED' if errors else 'OK'}: {errors} error(s), {warnings} warning(s)", file=out)
    return 1 if errors else 0


def coverage_report(cfg: DictConfig, datamodule: DetectionDataModule, train: DetectionDataset | None) -> str:
    """How well the priors of `cfg.model` reach the boxes of the training split `train`, as text."""
    records = getattr(train, "records", None)
    if records is None:
        return (
            "prior coverage: no training boxes to measure (the train split is unusable or generated online)"
        )
    spec = ssd_prior_spec(**OmegaConf.to_container(cfg.model.net, resolve=True))
    boxes = normalised_boxes(records, keep_difficult=datamodule.keep_difficult_in_train)
    report = prior_coverage(boxes, spec, float(cfg.model.loss.get("iou_threshold", 0.5)))
    return report.format(f"prior coverage of {train.name} for model={cfg.model.name}")


def run() -> None:
    """Console entry point: exits with `main`'s status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())


if __name__ == "__main__":
    run()
