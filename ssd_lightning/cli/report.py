"""What the entry points print and write: result tables, the final line, JSON files (rank 0 only)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

from ssd_lightning.training.evaluation import EvaluationResult


def format_results(result: EvaluationResult, title: str) -> str:
    """The three protocols' mAP, COCO's per-size AP and recall, and a per-class AP table, as text."""
    lines = [
        f"{title} ({result.num_images} images)",
        f"  mAP VOC07 (11-point, IoU 0.5): {result.map_voc07:.4f}",
        f"  mAP VOC2010+ (area, IoU 0.5):  {result.map_voc12:.4f}",
        f"  mAP COCO @[.5:.95]:            {result.map:.4f}",
        f"  mAP COCO @.5 / @.75:           {result.map_50:.4f} / {result.map_75:.4f}",
        f"  AP COCO small / medium / large: {result.map_small:.4f} / {result.map_medium:.4f} / "
        f"{result.map_large:.4f}",
        f"  AR COCO @100:                  {result.mar_100:.4f}",
    ]
    if result.per_class_ap_voc07:
        width = max(len(name) for name in result.per_class_ap_voc07)
        lines.append(f"  {'class':<{width}}  AP VOC07  AP VOC2010+")
        for name, ap07 in result.per_class_ap_voc07.items():
            lines.append(
                f"  {name:<{width}}  {ap07:8.4f}  {result.per_class_ap_voc12.get(name, float('nan')):11.4f}"
            )
    return "\n".join(lines)


def quiet_other_ranks() -> None:
    """Our log lines and Python warnings from rank 0 only: every process of a DDP job runs the entry point."""
    if rank_zero_only.rank != 0:
        logging.getLogger("ssd_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")


@rank_zero_only
def report(text: str) -> None:
    """Print on the main process only (every DDP rank runs the entry point)."""
    print(text, flush=True)


@rank_zero_only
def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
