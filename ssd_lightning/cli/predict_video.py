"""predict.py on a video file, a camera or a stream (`input=clip.mp4`, `input=0`, `input=rtsp://...`).

Every `vid_stride`-th frame goes through the network in batches of `batch_size`, with the image route's
transform and prediction step, so a frame gets the detections its decoded pixels would get as an image.
Written into the run folder: the annotated video (drawn as the image route draws, `save_images=true`) with
the frames predicted, at the input's frame rate / `vid_stride`, so that it lasts as long as the input; and
`detections.jsonl`, one line per frame predicted. Ctrl-C stops reading, predicts the frames already read, and
closes both files (the video plays), then predict.py ends normally: for a camera it is the way to stop.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ssd_lightning.cli.build import build_trainer
from ssd_lightning.cli.preflight import ConfigurationError
from ssd_lightning.cli.report import report
from ssd_lightning.data import DetectionTransform, collate_detection
from ssd_lightning.data.video import (
    VideoError,
    VideoFileWriter,
    VideoFrame,
    VideoReader,
    codec_suffix,
    describe_source,
    video_source,
)
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.visualize import draw_detections

log = logging.getLogger("ssd_lightning")

#: A batch (uint8 images [B,3,S,S], their metadata) -> per image what `SSDLitModule.predict_step` gives:
#: boxes in the frame's pixels (xyxy), scores, labels, names.
PredictStep = Callable[[tuple[torch.Tensor, list[dict[str, Any]]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class VideoJob:
    """A video prediction as conf/predict.yaml's options ask for it (checked)."""

    source: int | str  # a camera index, a stream URL or a video file
    vid_stride: int
    batch_size: int
    codec: str
    max_frames: int | None
    log_every_n_frames: int
    save_video: bool
    display_threshold: float = 0.4  # predict.py sets the configured one (best_f1 is read once loaded)

    @property
    def name(self) -> str:
        return describe_source(self.source)

    def video_name(self) -> str:
        """The annotated video's file name: the input file's stem, `camera<index>` or `stream`."""
        if isinstance(self.source, int):
            stem = f"camera{self.source}"
        else:
            stem = "stream" if "://" in self.source else Path(self.source).stem
        return stem + codec_suffix(self.codec)[1]


def _whole(cfg: DictConfig, key: str, default: Any, example: str, nullable: bool = False) -> int | None:
    value = cfg.get(key, default)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = " or null" if nullable else ""
        raise ConfigurationError(f"{key}={value} must be a whole number >= 1{also}: e.g. {example}")
    return value


def video_job(cfg: DictConfig) -> VideoJob | None:
    """The video prediction `cfg.input` names, its options checked (before any checkpoint loads); None when
    the input is an image, a folder or absent (the image route)."""
    value = cfg.get("input")
    source = video_source(value) if value not in (None, "") else None
    if source is None:
        return None
    codec = codec_suffix(cfg.get("video_codec", "mp4v"))[0]  # an unknown one: a message listing them
    return VideoJob(
        source=source,
        vid_stride=_whole(cfg, "vid_stride", 1, "vid_stride=2 (every other frame)"),
        batch_size=_whole(cfg, "batch_size", 8, "batch_size=8"),
        codec=codec,
        max_frames=_whole(cfg, "max_frames", None, "max_frames=300", nullable=True),
        log_every_n_frames=_whole(cfg, "log_every_n_frames", 100, "log_every_n_frames=100"),
        save_video=bool(cfg.get("save_images", True)),
    )


def checkpoint_step(module: SSDLitModule, trainer_cfg: DictConfig) -> PredictStep:
    """`module.predict_step` on the device and in the precision of predict.py's trainer config (Lightning's
    strategy and precision plugin, as `trainer.predict` runs it), called per batch: `trainer.predict` would
    turn Ctrl-C into `sys.exit(1)` and ignore Ctrl-C from then on."""
    trainer = build_trainer(trainer_cfg, callbacks=[], loggers=[])
    device, precision = trainer.strategy.root_device, trainer.precision_plugin
    module = precision.convert_module(module).to(device).eval()

    def step(batch: tuple[torch.Tensor, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        images, metas = batch
        with torch.inference_mode(), precision.predict_step_context():
            return module.predict_step((images.to(device), metas), 0)

    return step


class FrameProgress:
    """Frames per second on the console: tqdm's bar in a terminal, else (a log file: CI, nohup, SLURM) a line
    every `every` frames. `clock` gives seconds (tests pass their own)."""

    def __init__(
        self,
        total: int | None,
        every: int,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ) -> None:
        self.total, self.every, self.clock = total, every, clock
        self.done, self.start = 0, clock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True) if terminal else None

    def update(self, count: int) -> None:
        before, self.done = self.done, self.done + count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done // self.every > before // self.every or self.done == self.total:
            log.info(
                "frame %d%s, %.1f frames/s", self.done, f"/{self.total}" if self.total else "", self.rate
            )

    @property
    def rate(self) -> float:
        return self.done / max(self.clock() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def frame_line(
    frame: VideoFrame, prediction: dict[str, Any], category_ids: Sequence[int] | None
) -> dict[str, Any]:
    """One line of detections.jsonl: the frame's index and time, and its detections with detections.json's
    `category_id` and `score` (5 decimals), the class name and the box in pixels as x1, y1, x2, y2 (2
    decimals; detections.json's `bbox` is COCO's x, y, width, height)."""
    detections = [
        {
            "category_id": category_ids[label - 1] if category_ids else int(label),
            "class_name": name,
            "xyxy": [round(v, 2) for v in box],
            "score": round(float(score), 5),
        }
        for box, score, label, name in zip(
            prediction["boxes"].tolist(),
            prediction["scores"].tolist(),
            prediction["labels"].tolist(),
            prediction["names"],
            strict=True,
        )
    ]
    return {"frame": frame.index, "time_s": round(frame.time_s, 4), "detections": detections}


def _sample(frame: VideoFrame, transform: DetectionTransform) -> tuple[torch.Tensor, dict[str, Any]]:
    """The frame as the image route's dataset gives an image without annotations."""
    height, width = frame.rgb.shape[:2]
    target = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "difficult": np.zeros(0, bool),
        "image_id": frame.index,
        "orig_size": np.array([height, width], np.int64),
    }
    return transform(frame.rgb, target)


def predict_video(
    cfg: DictConfig,
    job: VideoJob,
    step: PredictStep,
    class_names: Sequence[str],
    category_ids: Sequence[int] | None,
    transform: DetectionTransform,
) -> Path:
    """Run `job` (see the module docstring); returns the path of detections.jsonl."""
    output_dir = Path(cfg.paths.output_dir)
    jsonl_path = output_dir / "detections.jsonl"
    video_path = output_dir / job.video_name()
    with ExitStack() as stack:
        reader = stack.enter_context(VideoReader(job.source, job.vid_stride))
        fps = reader.fps / job.vid_stride
        size = f"{reader.width}x{reader.height}" if reader.width else "size unknown"
        count = f", {reader.frame_count} frames" if reader.frame_count else ""
        which = "every frame" if job.vid_stride == 1 else f"one frame in {job.vid_stride}"
        most = f", at most {job.max_frames}" if job.max_frames else ""
        batches = f"{job.batch_size} a batch"
        report(f"{reader.name}: {size}, {reader.fps:g} fps{count}; predicting {which}{most}, {batches}")
        writer = stack.enter_context(VideoFileWriter(video_path, job.codec, fps)) if job.save_video else None
        lines = stack.enter_context(jsonl_path.open("w"))
        total = reader.frames_to_predict
        if job.max_frames:
            total = min(total, job.max_frames) if total else job.max_frames
        progress = FrameProgress(total, job.log_every_n_frames)
        stack.callback(progress.close)

        def predict_frames(frames: list[VideoFrame]) -> None:
            predictions = step(collate_detection([_sample(frame, transform) for frame in frames]))
            for frame, prediction in zip(frames, predictions, strict=True):
                if writer is not None:
                    image = torch.from_numpy(frame.rgb).permute(2, 0, 1)
                    drawn = draw_detections(
                        image,
                        prediction["boxes"],
                        prediction["scores"],
                        prediction["labels"],
                        class_names,
                        job.display_threshold,
                    )
                    writer.write(np.ascontiguousarray(drawn.permute(1, 2, 0).numpy()))
                lines.write(json.dumps(frame_line(frame, prediction, category_ids)) + "\n")
            lines.flush()  # a reader of the file (tail -f) sees each batch as it is done
            progress.update(len(frames))

        pending: list[VideoFrame] = []
        taken, interrupted = 0, False
        try:
            for frame in reader:
                pending.append(frame)
                taken += 1
                if len(pending) == job.batch_size:
                    batch, pending = pending, []
                    predict_frames(batch)
                if job.max_frames and taken >= job.max_frames:
                    break
        except KeyboardInterrupt:
            interrupted = True  # a Ctrl-C while a batch was predicted: that batch is cut short
        if pending:  # read before the end or the Ctrl-C: predicted too
            predict_frames(pending)
    done = progress.done
    if done == 0 and not interrupted:
        raise VideoError(f"input={job.source}: OpenCV opened {reader.name} but read no frame from it")
    outputs = f"{video_path} ({fps:g} fps) and {jsonl_path}" if writer is not None else str(jsonl_path)
    if interrupted and done == 0:
        report(f"Stopped by Ctrl-C before a frame of {reader.name} was predicted: nothing written")
    elif interrupted:
        report(
            f"Stopped by Ctrl-C after {done} frames of {reader.name}: {outputs} hold them (the video plays)"
        )
    else:
        report(f"{done} frames of {reader.name} -> {outputs}")
    return jsonl_path
