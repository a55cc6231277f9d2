"""`python predict.py ckpt_path=... [input=<image or folder>]`: drawn boxes + a COCO results JSON; without
`input=`, on the test split of the data the checkpoint was trained on. A video file, a camera index or a
stream URL as `input=`: an annotated video + detections.jsonl (ssd_lightning/cli/predict_video.py)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg

from ssd_lightning.cli.build import build_trainer
from ssd_lightning.cli.deploy import load_model, predict_batches
from ssd_lightning.cli.predict_video import checkpoint_step, predict_video, video_job
from ssd_lightning.cli.preflight import ConfigurationError, check_accelerator, user_errors_as_messages
from ssd_lightning.cli.report import report
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.data import (
    DatasetError,
    DetectionDataModule,
    DetectionDataset,
    DetectionTransform,
    ImageFolderDataset,
    ImageRecord,
    build_eval_transform,
    collate_detection,
    decode_rgb,
)
from ssd_lightning.metrics.thresholds import BEST_F1, resolve_display_threshold
from ssd_lightning.training.checkpointing import resolve_checkpoint
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.visualize import draw_detections


def image_dataset(
    source: str | Path, classes: list[str], transform: DetectionTransform, skip_bad_images: bool = True
) -> DetectionDataset:
    """`source` itself if it is an image file, else every image under the folder (recursively; unreadable
    ones skipped with a counted warning unless `skip_bad_images` is false)."""
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return ImageFolderDataset(path, classes, transform=transform, skip_bad_samples=skip_bad_images)
        except DatasetError as error:
            hint = "predict.py skips unreadable images with skip_bad_images=true (its default)"
            raise DatasetError(error.context, error.problems, hint=hint) from None
    if not path.is_file():
        raise FileNotFoundError(f"input={source}: no such file or folder")
    record = ImageRecord(path=path, annotation=path, name=path.name, image_id=0, width=0, height=0)
    return DetectionDataset([record], classes, name=str(path), transform=transform, exif_orientation=True)


def image_ids(records: list[ImageRecord]) -> list[int]:
    """The COCO image id of each record: the number its file is named by when every file is named by a
    different number (COCO's 000000000139.jpg), else its position (1.jpg and 001.jpg must not share an id).
    The results JSON keeps each file's name beside its id."""
    stems = [record.path.stem for record in records]
    if all(stem.isdigit() for stem in stems) and len({int(stem) for stem in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return [record.image_id for record in records]


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
                **({"file_name": Path(prediction["path"]).name} if "path" in prediction else {}),
                "category_id": category_ids[label - 1] if category_ids else int(label),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            }
        )
    return entries


def training_test_split(module: SSDLitModule, transform: DetectionTransform) -> DetectionDataset:
    """The test split of the data the checkpoint was trained on (Lightning keeps the DataModule's arguments
    in the checkpoint)."""
    arguments = module.datamodule_arguments
    if not arguments:
        raise ConfigurationError(
            "the checkpoint does not record its training data: pass input=<image or folder>"
        )
    # Checkpoints written before an option went away (dataset.predict_root) still name it: it reads nothing.
    known = inspect.signature(DetectionDataModule).parameters
    arguments = {key: value for key, value in arguments.items() if key in known}
    try:
        return DetectionDataModule(**arguments).build_dataset("test", transform=transform)
    except (DatasetError, FileNotFoundError) as error:
        raise ConfigurationError(
            f"predict.py without input= predicts on the test split of the checkpoint's training data "
            f"({arguments.get('format')} at {arguments.get('root')}), which cannot be read here "
            f"({str(error).splitlines()[0]}); pass input=<image or folder>"
        ) from error


def draw(prediction: dict[str, Any], class_names: list[str], display_threshold: float) -> torch.Tensor:
    """The input image (uint8 [3,H,W]) with the boxes scoring >= display_threshold and their captions."""
    image = torch.from_numpy(decode_rgb(prediction["path"], exif_orientation=True)).permute(2, 0, 1)
    return draw_detections(
        image, prediction["boxes"], prediction["scores"], prediction["labels"], class_names, display_threshold
    )


def display_threshold(cfg: DictConfig) -> float:
    """`display_threshold` as a score: a number, or `best_f1`: the all-class best-F1 threshold that the test
    pass of the checkpoint's run (or eval.py beside the file) wrote into thresholds.json."""
    setting = cfg.get("display_threshold", 0.4)
    if str(setting).strip().lower() != BEST_F1:
        return float(setting)
    source = cfg.get("model_path") or resolve_checkpoint(cfg.ckpt_path, f"{cfg.paths.log_dir}/train")
    threshold = resolve_display_threshold(setting, source)
    report(f"display_threshold=best_f1: {threshold:.4f}, the best-F1 threshold of {source}'s run")
    return threshold


def predict(cfg: DictConfig) -> Path:
    """Run the predict task of `cfg` (composed from conf/predict.yaml); returns the results JSON path."""
    check_accelerator(cfg.trainer)
    video = video_job(cfg)  # a video file, camera or stream input (its options checked before loading)
    module = load_model(cfg, "predict.py")  # ckpt_path=, or model_path= an exported model (cli/deploy.py)
    hparams = module.hparams
    threshold = display_threshold(cfg)
    transform = build_eval_transform(
        module.image_size, hparams.pixel_mean, hparams.pixel_std, normalize=False
    )
    if video is not None:
        video = dataclasses.replace(video, display_threshold=threshold)
        exported = not isinstance(module, SSDLitModule)  # model_path=: the runtime's step
        step = module.predict_step if exported else checkpoint_step(module, cfg.trainer)
        return predict_video(cfg, video, step, module.class_names, hparams.get("category_ids"), transform)
    if cfg.get("input"):
        dataset = image_dataset(
            cfg.input, module.class_names, transform, bool(cfg.get("skip_bad_images", True))
        )
    else:
        dataset = training_test_split(module, transform)
        report(f"No input=: predicting on {dataset.name}, the test split of the checkpoint's training data")
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_detection
    )
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=[])
    predictions = [p for batch in predict_batches(trainer, module, loader) for p in batch]
    by_id = {record.image_id: record for record in dataset.records}
    records = [by_id[p["image_id"]] for p in predictions]
    for prediction, record, image_id in zip(predictions, records, image_ids(records), strict=True):
        prediction["path"] = str(record.path)
        prediction["image_id"] = image_id

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
            drawn = draw(prediction, module.class_names, threshold)
            write_jpeg(drawn, str(drawn_dir / f"{name}.jpg"))
    report(f"{len(results)} detections on {len(predictions)} images -> {results_path}")
    return results_path


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="predict")
@user_errors_as_messages("predict.py")
def main(cfg: DictConfig) -> None:
    """Console entry point (`ssd-predict` / `python predict.py`)."""
    predict(cfg)


if __name__ == "__main__":
    main()
