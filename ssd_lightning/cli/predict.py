"""`python predict.py ckpt_path=... input=<image or folder>`: drawn boxes + a COCO results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg
from torchvision.utils import draw_bounding_boxes

from ssd_lightning.cli.build import build_trainer
from ssd_lightning.cli.eval import load_for_inference
from ssd_lightning.cli.preflight import check_accelerator
from ssd_lightning.cli.report import report
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.data import (
    DetectionDataset,
    DetectionTransform,
    ImageFolderDataset,
    ImageRecord,
    build_eval_transform,
    collate_detection,
    decode_rgb,
)


def image_dataset(source: str | Path, classes: list[str], transform: DetectionTransform) -> DetectionDataset:
    """`source` itself if it is an image file, else every image under the folder (recursively)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path, classes, transform=transform)
    if not path.is_file():
        raise FileNotFoundError(f"input={source}: no such file or folder")
    record = ImageRecord(path=path, annotation=path, name=path.name, image_id=0, width=0, height=0)
    return DetectionDataset([record], classes, name=str(path), transform=transform, exif_orientation=True)


def _coco_image_id(record: ImageRecord) -> int:
    # COCO file names are the image id (000000000139.jpg); other files get their position.
    return int(record.path.stem) if record.path.stem.isdigit() else record.image_id


def coco_results(prediction: dict[str, Any], category_ids: list[int] | None) -> list[dict[str, Any]]:
    """COCO "results" entries of one image: bbox as [x, y, width, height] in pixels."""
    entries = []
    for box, score, label in zip(
        prediction["boxes"].tolist(),
        prediction["scores"].tolist(),
        prediction["labels"].tolist(),
        strict=True,
    ):
        x1, y1, x2, y2 = box
        entries.append(
            {
                "image_id": int(prediction["image_id"]),
                "category_id": category_ids[label - 1] if category_ids else int(label),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            }
        )
    return entries


def draw(prediction: dict[str, Any], min_score: float) -> torch.Tensor:
    """The input image (uint8 [3,H,W]) with the boxes scoring >= min_score and their captions."""
    image = torch.from_numpy(decode_rgb(prediction["path"], exif_orientation=True)).permute(2, 0, 1)
    keep = prediction["scores"] >= min_score
    captions = [
        f"{name} {score:.2f}"
        for name, score, k in zip(
            prediction["names"], prediction["scores"].tolist(), keep.tolist(), strict=True
        )
        if k
    ]
    if not captions:
        return image
    return draw_bounding_boxes(image, prediction["boxes"][keep], labels=captions, colors="red", width=2)


def predict(cfg: DictConfig) -> Path:
    """Run the predict task of `cfg` (composed from conf/predict.yaml); returns the results JSON path."""
    check_accelerator(cfg.trainer)
    module = load_for_inference(cfg)
    hparams = module.hparams
    transform = build_eval_transform(
        module.image_size, hparams.pixel_mean, hparams.pixel_std, normalize=False
    )
    dataset = image_dataset(cfg.input, module.class_names, transform)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_detection
    )
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=[])
    predictions = [p for batch in trainer.predict(module, dataloaders=loader) for p in batch]
    records = [dataset.records[p["image_id"]] for p in predictions]
    for prediction, record in zip(predictions, records, strict=True):
        prediction["path"] = str(record.path)
        prediction["image_id"] = _coco_image_id(record)

    output_dir = Path(cfg.paths.output_dir)
    results = [entry for p in predictions for entry in coco_results(p, hparams.get("category_ids"))]
    results_path = output_dir / "detections.json"
    results_path.write_text(json.dumps(results) + "\n")
    (output_dir / "image_ids.json").write_text(
        json.dumps({p["path"]: p["image_id"] for p in predictions}, indent=1) + "\n"
    )
    if cfg.save_images:
        drawn_dir = output_dir / "images"
        drawn_dir.mkdir(parents=True, exist_ok=True)
        stems = [record.path.stem for record in records]
        for prediction, record, stem in zip(predictions, records, stems, strict=True):
            # Same name in two subfolders: prefix the position so neither overwrites the other.
            name = stem if stems.count(stem) == 1 else f"{record.image_id:05d}_{stem}"
            write_jpeg(draw(prediction, cfg.draw_min_score), str(drawn_dir / f"{name}.jpg"))
    report(f"{len(results)} detections on {len(predictions)} images -> {results_path}")
    return results_path


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Console entry point (`ssd-predict` / `python predict.py`)."""
    predict(cfg)


if __name__ == "__main__":
    main()
