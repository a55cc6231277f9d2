"""One evaluation pass: VOC07 / VOC2010+ AP (difficult-aware) and COCO-style mAP, in original image pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.detection import MeanAveragePrecision

from ssd_lightning.metrics import VOCMeanAveragePrecision
from ssd_lightning.metrics.analysis import ErrorAnalysis, analyze_errors
from ssd_lightning.metrics.confusion import ConfusionMatrix, confusion_matrix
from ssd_lightning.metrics.thresholds import ThresholdCurves, threshold_curves
from ssd_lightning.metrics.voc import match_detections
from ssd_lightning.visualize import DISPLAY_THRESHOLD

# COCO's protocol scores at most 100 detections per image; passing more only makes torchmetrics warn.
COCO_MAX_DETECTIONS = 100


def to_pixels(boxes: Tensor, orig_size: Tensor) -> Tensor:
    """Boxes xyxy normalised to [0, 1] -> pixels of an image of `orig_size` = (height, width)."""
    height, width = orig_size.to(boxes.dtype).unbind(-1)
    return boxes * torch.stack([width, height, width, height])


def detections_in_pixels(
    detections: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Detections and ground truth of a batch, scaled to each image's original size (target["orig_size"])."""
    preds, truths = [], []
    for det, target in zip(detections, targets, strict=True):
        orig_size = target["orig_size"]
        preds.append(
            {
                "boxes": to_pixels(det["boxes"].float(), orig_size),
                "scores": det["scores"].float(),
                "labels": det["labels"],
            }
        )
        boxes = target["boxes"]
        difficult = target.get("difficult", torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device))
        truths.append(
            {"boxes": to_pixels(boxes.float(), orig_size), "labels": target["labels"], "difficult": difficult}
        )
    return preds, truths


@dataclass
class EvaluationResult:
    """Scalars of one evaluation pass plus VOC07 AP per class name."""

    map_voc07: float
    map_voc12: float
    map: float  # COCO mAP@[.5:.95]
    map_50: float  # COCO mAP@.5
    map_75: float
    map_small: float  # COCO AP of objects below 32x32 pixels (-1 when the split has none)
    map_medium: float  # 32x32 to 96x96
    map_large: float  # above 96x96
    mar_100: float  # COCO average recall with 100 detections per image
    num_images: int  # over all processes: under DDP, the evaluation covered the whole split
    per_class_ap_voc07: dict[str, float] = field(default_factory=dict)
    per_class_ap_voc12: dict[str, float] = field(default_factory=dict)
    # Errors by cause and misses by size, when the evaluator was asked for them (eval.py analysis=true).
    analysis: ErrorAnalysis | None = field(default=None, repr=False)
    # Precision/recall/F1 against the score threshold and the confusion matrix, when asked for
    # (`DetectionEvaluator.confusion_and_thresholds`: the final test pass, eval.py).
    thresholds: ThresholdCurves | None = field(default=None, repr=False)
    confusion: ConfusionMatrix | None = field(default=None, repr=False)

    def format(self, title: str) -> str:
        """The three protocols' mAP, COCO's per-size AP and recall, and a per-class AP table, as text."""
        lines = [
            f"{title} ({self.num_images} images)",
            f"  mAP VOC07 (11-point, IoU 0.5): {self.map_voc07:.4f}",
            f"  mAP VOC2010+ (area, IoU 0.5):  {self.map_voc12:.4f}",
            f"  mAP COCO @[.5:.95]:            {self.map:.4f}",
            f"  mAP COCO @.5 / @.75:           {self.map_50:.4f} / {self.map_75:.4f}",
            f"  AP COCO small / medium / large: {self.map_small:.4f} / {self.map_medium:.4f} / "
            f"{self.map_large:.4f}",
            f"  AR COCO @100:                  {self.mar_100:.4f}",
        ]
        if self.per_class_ap_voc07:
            width = max(len(name) for name in self.per_class_ap_voc07)
            lines.append(f"  {'class':<{width}}  AP VOC07  AP VOC2010+")
            for name, ap07 in self.per_class_ap_voc07.items():
                lines.append(
                    f"  {name:<{width}}  {ap07:8.4f}  {self.per_class_ap_voc12.get(name, float('nan')):11.4f}"
                )
        return "\n".join(lines)

    @classmethod
    def scalar_names(cls) -> list[str]:
        """The names `scalars()` has (map_voc07, map, ... num_images)."""
        return [f.name for f in fields(cls) if f.type in ("float", "int")]

    def scalars(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.to_dict().items() if isinstance(v, (int, float))}

    def to_dict(self) -> dict:
        # The analysis, curves and matrix hold arrays: their own to_dict (the curves in thresholds.json)
        data = asdict(replace(self, analysis=None, thresholds=None, confusion=None))
        for key in ("analysis", "thresholds", "confusion"):
            data.pop(key)
        if self.analysis is not None:
            data["analysis"] = self.analysis.to_dict()
        if self.thresholds is not None:
            data["best_f1"] = self.thresholds.summary()
        return data


class DetectionEvaluator(nn.Module):
    """Accumulates a pass over a dataset; both metrics are torchmetrics `Metric`s, so DDP ranks are synced
    when `compute()` runs.

    With `error_analysis` set, `compute()` also breaks the errors down (`ssd_lightning.metrics.analysis`,
    from the VOC metric's gathered state; counted over all detections and over those scoring at least
    `analysis_score_threshold`); off by default, when it costs nothing. With `confusion_and_thresholds`
    set, `compute()` adds precision/recall/F1 against the score threshold
    (`ssd_lightning.metrics.thresholds`) and the confusion matrix (`ssd_lightning.metrics.confusion`) of the
    detections scoring >= `confusion_score_threshold` (None: the threshold of best F1 over all classes, or
    `DISPLAY_THRESHOLD` when there is none).
    """

    def __init__(
        self, class_names: Sequence[str], error_analysis: bool = False, analysis_score_threshold: float = 0.4
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.error_analysis = error_analysis
        self.analysis_score_threshold = analysis_score_threshold
        self.confusion_and_thresholds = False
        self.confusion_score_threshold: float | None = None
        # Two instances because the metric reports per-class AP for its chosen protocol only.
        self.voc07 = VOCMeanAveragePrecision(
            iou_threshold=0.5, use_07_metric=True, class_names=self.class_names
        )
        self.voc12 = VOCMeanAveragePrecision(
            iou_threshold=0.5, use_07_metric=False, class_names=self.class_names
        )
        self.coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.images = SumMetric()

    def update(self, preds: Sequence[Mapping[str, Tensor]], truths: Sequence[Mapping[str, Tensor]]) -> None:
        """`preds`/`truths` as returned by `detections_in_pixels`."""
        self.images.update(len(preds))
        self.voc07.update(preds, truths)
        self.voc12.update(preds, truths)
        # COCO treats crowd boxes as "ignore" regions: the closest equivalent of VOC's difficult flag.
        self.coco.update(
            [{k: v[:COCO_MAX_DETECTIONS] for k, v in p.items()} for p in preds],
            [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()} for t in truths],
        )

    def _equalise_coco_images_across_ranks(self) -> None:
        """torchmetrics' COCO metric gathers its per-image states one image at a time, so ranks holding
        different numbers of images (an exact, unpadded distributed split) would run different collectives.
        Ranks with fewer images add images without objects or detections, which change no AP or recall."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count = torch.tensor(len(self.coco.groundtruth_labels), device=self.coco.device)
        most = count.clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        missing = int(most - count)
        if missing:
            device = self.coco.device
            nothing = {
                "boxes": torch.zeros(0, 4, device=device),
                "labels": torch.zeros(0, dtype=torch.long, device=device),
            }
            self.coco.update(
                [{**nothing, "scores": torch.zeros(0, device=device)}] * missing,
                [{**nothing, "iscrowd": torch.zeros(0, dtype=torch.long, device=device)}] * missing,
            )

    def compute(self) -> EvaluationResult:
        self._equalise_coco_images_across_ranks()
        voc07 = self.voc07.compute()
        voc12 = self.voc12.compute()
        coco = self.coco.compute()
        thresholds, confusion = (
            self._confusion_and_thresholds() if self.confusion_and_thresholds else (None, None)
        )
        return EvaluationResult(
            map_voc07=float(voc07["map"]),
            map_voc12=float(voc12["map"]),
            map=float(coco["map"]),
            map_50=float(coco["map_50"]),
            map_75=float(coco["map_75"]),
            map_small=float(coco["map_small"]),
            map_medium=float(coco["map_medium"]),
            map_large=float(coco["map_large"]),
            mar_100=float(coco["mar_100"]),
            num_images=int(self.images.compute()),
            per_class_ap_voc07=self.voc07.per_class_ap(voc07),
            per_class_ap_voc12=self.voc12.per_class_ap(voc12),
            analysis=self._analyze() if self.error_analysis else None,
            thresholds=thresholds,
            confusion=confusion,
        )

    def _confusion_and_thresholds(self) -> tuple[ThresholdCurves, ConfusionMatrix]:
        # One more gather of the VOC rows under DDP, as for the analysis (every rank gets here).
        rows = self.voc12.accumulated()
        matching = match_detections(*rows, iou_threshold=self.voc12.iou_threshold)
        curves = threshold_curves(*rows, self.class_names, self.voc12.iou_threshold, matching)
        threshold = self.confusion_score_threshold
        if threshold is None:
            best = curves.overall.best
            threshold = best.threshold if best is not None else DISPLAY_THRESHOLD
        confusion = confusion_matrix(
            *rows, self.class_names, float(threshold), self.voc12.iou_threshold, matching
        )
        return curves, confusion

    def _analyze(self) -> ErrorAnalysis:
        # One more gather of the VOC rows under DDP (every rank gets here, as for compute()).
        return analyze_errors(
            *self.voc12.accumulated(),
            class_names=self.class_names,
            score_threshold=self.analysis_score_threshold,
        )

    def reset(self) -> None:
        self.images.reset()
        self.voc07.reset()
        self.voc12.reset()
        self.coco.reset()
