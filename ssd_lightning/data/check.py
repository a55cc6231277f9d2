"""Report every problem of a dataset at once, without training.

    python -m ssd_lightning.data.check dataset=<shapes|voc|coco> dataset.root=<path> [more overrides]

Takes the same Hydra overrides as ``train.py`` (it composes ``conf/train.yaml``). Every split is
parsed, every box validated, every image header read and every image fully decoded; each problem is
printed on its own line naming its file. Exit status 1 if any error was found, else 0.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from .base import DatasetError, DetectionDataset, Problem, decode_rgb, map_in_threads
from .datamodule import SPLITS, DetectionDataModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _decode_problem(dataset: DetectionDataset, index: int) -> Problem | None:
    record = dataset.records[index]
    try:
        image = decode_rgb(record.path)
    except DatasetError as error:
        return error.problems[0]
    if image.shape[:2] != (record.height, record.width):
        size = f"{image.shape[1]}x{image.shape[0]}"
        return Problem(
            str(record.path), f"decodes to {size}, not the {record.width}x{record.height} expected"
        )
    return None


def _summary(dataset: DetectionDataset) -> str:
    labels = np.concatenate([r.labels for r in dataset.records]) if dataset.records else np.zeros(0, int)
    difficult = sum(int(r.difficult.sum()) for r in dataset.records)
    empty = sum(r.num_boxes == 0 for r in dataset.records)
    counts = np.bincount(labels, minlength=dataset.num_classes)[1:]
    per_class = ", ".join(f"{name} {count}" for name, count in zip(dataset.classes, counts, strict=True))
    text = (
        f"{len(dataset)} images, {len(labels)} objects ({difficult} difficult/crowd), "
        f"{empty} images without objects\n    per class: {per_class}"
    )
    absent = [name for name, count in zip(dataset.classes, counts, strict=True) if count == 0]
    return text + (f"\n    note: no objects of {', '.join(absent)}" if absent else "")


def check_datamodule(datamodule: DetectionDataModule, out: TextIO = sys.stdout) -> tuple[int, int]:
    """Check the train, val and test splits of ``datamodule``; print problems; return (errors, warnings)."""
    seen: dict[str, str] = {}
    errors = warnings = 0
    for split in SPLITS:
        source = repr(
            datamodule.coco_splits[split] if datamodule.format == "coco" else datamodule.image_sets[split]
        )
        if source in seen:
            print(f"{split}: same data as {seen[source]}", file=out)
            continue
        seen[source] = split
        try:
            dataset = datamodule.build_dataset(
                split, transform=None, skip_bad_samples=True, verify_images=True, keep_difficult=True
            )
        except DatasetError as error:  # nothing usable: a missing root, split file, annotation file...
            problems, dataset = error.problems, None
        else:
            decode = map_in_threads(lambda i, d=dataset: _decode_problem(d, i), range(len(dataset)))
            problems = dataset.problems + [p for p in decode if p is not None]
        for problem in problems:
            print(f"{problem.severity.upper()} {problem}", file=out)
        split_errors = sum(p.severity == "error" for p in problems)
        errors += split_errors
        warnings += len(problems) - split_errors
        if dataset is None:
            print(f"{split}: unusable ({split_errors} error(s))", file=out)
        else:
            status = f"{split_errors} error(s), {len(problems) - split_errors} warning(s)"
            print(f"{split} ({dataset.name}): {status}; usable: {_summary(dataset)}", file=out)
    return errors, warnings


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Compose ``conf/train.yaml`` with ``argv`` as overrides, check its dataset; the exit status."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    try:
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
    except Exception as error:  # a DatasetError may arrive wrapped by Hydra's instantiate
        cause = error if isinstance(error, DatasetError) else error.__cause__
        if not isinstance(cause, DatasetError):
            raise
        for problem in cause.problems:
            print(f"{problem.severity.upper()} {problem}", file=out)
        print(f"FAILED: {len(cause.problems)} error(s)", file=out)
        return 1
    print(f"dataset {datamodule.name} ({datamodule.format}) at {datamodule.root}", file=out)
    errors, warnings = check_datamodule(datamodule, out)
    print(f"{'FAILED' if errors else 'OK'}: {errors} error(s), {warnings} warning(s)", file=out)
    return 1 if errors else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
