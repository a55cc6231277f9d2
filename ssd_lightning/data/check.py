"""Report every problem of a dataset at once, without training: :func:`check_datamodule`.

The command (``ssd-check`` / ``python -m ssd_lightning.cli.check dataset=... dataset.root=...``) is in
:mod:`ssd_lightning.cli.check`. Every split is parsed, every box validated, every image header read and every
image fully decoded; each problem is printed on its own line naming its file.
"""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np

from .base import DatasetError, DetectionDataset, Problem, decode_rgb, map_in_threads
from .datamodule import SPLITS, DetectionDataModule


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


def check_datamodule(
    datamodule: DetectionDataModule,
    out: TextIO = sys.stdout,
    usable: dict[str, DetectionDataset] | None = None,
) -> tuple[int, int]:
    """Check the train, val and test splits of ``datamodule``; print problems; return (errors, warnings).

    ``usable``, when given, receives the usable part of each split read (every object kept, difficult ones
    flagged), for reports that follow the check without reading the annotations again.
    """
    seen: dict[str, str] = {}
    errors = warnings = 0
    for split in SPLITS:
        source = repr(datamodule.source.reads(split))
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
            if usable is not None:
                usable[split] = dataset
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
