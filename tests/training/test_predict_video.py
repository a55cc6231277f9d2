"""predict.py on a video, a camera and a stream: the annotated video (size, frame count, frame rate), one line
of detections.jsonl per frame predicted (vid_stride), the image route's detections on the same decoded frames,
the moving shapes found where the test drew them, Ctrl-C from a camera, the inputs' parsing and messages.

The video is generated here: three of the built-in shapes' classes (an ellipse, a rectangle and a triangle of
fixed sizes and colours) moving across a plain background, with boxes known to the pixel. The detector is the
compact model trained once per test run (cached under the run's shared folder) on random placements of the
same shapes, never on the video's frames: the video's positions are new to it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, IterableDataset
from torchvision.ops import box_iou
from training_helpers import compose_config

import ssd_lightning.data.video as video_module
from ssd_lightning.cli.predict import predict
from ssd_lightning.cli.predict_video import FrameProgress, video_job
from ssd_lightning.data import SHAPE_CLASSES, build_eval_transform, collate_detection
from ssd_lightning.data.video import VideoError, VideoReader, video_source
from ssd_lightning.training.module import SSDLitModule

WIDTH, HEIGHT, FPS, FRAMES = 160, 120, 10.0, 12
BACKGROUND = (90.0, 90.0, 110.0)
# class index (label - 1), size (width, height) and RGB colour of each shape; the names are the built-in
# shapes' first three classes.
CLASSES = list(SHAPE_CLASSES[:3])  # ellipse, rectangle, triangle
SHAPES = {
    0: ((40, 30), (230.0, 40.0, 40.0)),
    1: ((34, 44), (30.0, 200.0, 60.0)),
    2: ((44, 36), (240.0, 220.0, 40.0)),
}
# Where each shape starts (top-left) and how many pixels it moves each frame: the three never overlap and
# never leave the 160x120 frame in the FRAMES frames.
MOVES = {0: ((8, 8), (4, 1)), 1: ((118, 8), (-2, 4)), 2: ((10, 76), (3, -1))}
# A shape is found in a frame when a detection of its class overlaps its box by IoU >= FOUND_IOU with a
# score >= FOUND_SCORE; no detection scoring >= SURE_SCORE may be off every shape of its class.
FOUND_IOU, FOUND_SCORE, SURE_SCORE = 0.5, 0.1, 0.5
# detections.jsonl and detections.json round boxes to 0.01 px and scores to 1e-5; the two routes run the
# same batches of the same pixels, so nothing else may differ.
BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.011, 1.1e-5


def _draw(image: np.ndarray, kind: int, box: list[int]) -> None:
    """Shape `kind` filling the pixels of `box` (xyxy, x2/y2 exclusive): its box is exactly `box`."""
    x1, y1, x2, y2 = box
    colour = SHAPES[kind][1]
    if kind == 0:
        centre, axes = ((x1 + x2 - 1) // 2, (y1 + y2 - 1) // 2), ((x2 - x1 - 1) // 2, (y2 - y1 - 1) // 2)
        cv2.ellipse(image, centre, axes, 0, 0, 360, colour, -1)
    elif kind == 1:
        cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), colour, -1)
    else:
        apex = [(x1 + x2 - 1) // 2, y1]
        cv2.fillPoly(image, [np.array([[x1, y2 - 1], [x2 - 1, y2 - 1], apex], np.int32)], colour)


def render(objects: list[tuple[int, list[int]]]) -> np.ndarray:
    """RGB uint8 frame with the shapes (class index, box) on the plain background."""
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[...] = BACKGROUND
    for kind, box in objects:
        _draw(image, kind, box)
    return image


def known_boxes(frame: int) -> list[tuple[int, list[int]]]:
    """The shapes of the test video's frame `frame`: (class index, xyxy box)."""
    objects = []
    for kind, ((x, y), (dx, dy)) in MOVES.items():
        (width, height), _ = SHAPES[kind]
        x1, y1 = x + dx * frame, y + dy * frame
        objects.append((kind, [x1, y1, x1 + width, y1 + height]))
    return objects


def write_video(path: Path) -> list[np.ndarray]:
    """The test video (Motion-JPEG in .avi, in every opencv-python); returns its frames as OpenCV decodes
    them back (RGB)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for frame in range(FRAMES):
        writer.write(cv2.cvtColor(render(known_boxes(frame)), cv2.COLOR_RGB2BGR))
    writer.release()
    return read_frames(path)


def read_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


# The detector ------------------------------------------------------------------------------------------

IMAGE_SIZE, MEAN, STD = 96, [127.0] * 3, [64.0] * 3
TRAIN_STEPS, TRAIN_BATCH = 300, 16


class RandomPlacements(IterableDataset):
    """Endless training frames: the three shapes at random places (not overlapping), JPEG-compressed as the
    video's frames are, through the evaluation transform (what predict.py feeds the network)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        rng = np.random.default_rng(0)
        transform = build_eval_transform(IMAGE_SIZE, MEAN, STD, normalize=False)
        while True:
            objects: list[tuple[int, list[int]]] = []
            for kind in rng.permutation(len(SHAPES)).tolist():
                (width, height), _ = SHAPES[kind]
                for _ in range(20):
                    x1, y1 = int(rng.integers(0, WIDTH - width)), int(rng.integers(0, HEIGHT - height))
                    box = [x1, y1, x1 + width, y1 + height]
                    if not any(_overlap(box, other) for _, other in objects):
                        objects.append((kind, box))
                        break
            encoded = cv2.imencode(".jpg", render(objects), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)  # RGB stays RGB: no colour conversion
            target = {
                "boxes": np.array([box for _, box in objects], np.float32).reshape(-1, 4),
                "labels": np.array([kind + 1 for kind, _ in objects], np.int64),
                "difficult": np.zeros(len(objects), bool),
                "image_id": 0,
                "orig_size": np.array([HEIGHT, WIDTH], np.int64),
            }
            yield transform(image, target)


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _one_cycle(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)


@pytest.fixture(scope="session")
def shapes_detector(shared_tmp_path: Path) -> Path:
    """A Lightning checkpoint of the compact model (96 px, width 16) that finds the three shapes anywhere:
    trained once per test run (about 20 s of one core), shared by the pytest-xdist workers."""
    path = shared_tmp_path / "video_shapes_detector.ckpt"
    with FileLock(shared_tmp_path / "video_shapes_detector.lock"):
        if path.is_file():
            return path
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a shared machine, spinning OpenMP threads cost more than they give
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                module = SSDLitModule(
                    CLASSES,
                    {"arch": "compact", "size": IMAGE_SIZE, "width": 16},
                    MEAN,
                    STD,
                    optimizer=functools.partial(torch.optim.AdamW, lr=6e-3, weight_decay=0.0),
                    scheduler=_one_cycle,
                    channels_last=True,
                )
                trainer = pl.Trainer(
                    accelerator="cpu",
                    devices=1,
                    max_steps=TRAIN_STEPS,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    default_root_dir=shared_tmp_path,
                )
                loader = DataLoader(RandomPlacements(), batch_size=TRAIN_BATCH, collate_fn=collate_detection)
                trainer.fit(module, train_dataloaders=loader)
        finally:
            torch.set_num_threads(threads)
        partial = path.with_suffix(".part")
        trainer.save_checkpoint(partial)
        os.replace(partial, path)  # whole or absent: a worker never reads a half-written file
    return path


@pytest.fixture(scope="module")
def test_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("video") / "moving_shapes.avi"
    frames = write_video(path)
    assert len(frames) == FRAMES
    return path, frames


CPU = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _predict(tmp_path: Path, name: str, options: list[str]) -> Path:
    output = tmp_path / name
    output.mkdir()  # Hydra's run folder
    return predict(compose_config("predict", [*CPU, *options], output))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _video_properties(path: Path) -> tuple[int, int, float, int]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return width, height, fps, len(read_frames(path))


# The tests ---------------------------------------------------------------------------------------------


def test_a_video_gives_an_annotated_video_and_the_detections_of_each_frame_it_predicts(
    shapes_detector: Path,
    test_video: tuple[Path, list[np.ndarray]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    video, decoded = test_video
    stride, batch = 2, 4  # 6 frames of 12: a batch of 4 and the last 2
    common = [f"ckpt_path={shapes_detector}", f"batch_size={batch}", "display_threshold=0.3"]
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        results = _predict(
            tmp_path, "video", [*common, f"input={video}", f"vid_stride={stride}", "log_every_n_frames=4"]
        )
    assert results == tmp_path / "video" / "detections.jsonl"

    # The annotated video: the input's frame size, the frames predicted, at the input's rate / vid_stride
    # (it lasts as long as the input).
    predicted = list(range(0, FRAMES, stride))
    assert _video_properties(tmp_path / "video" / "moving_shapes.mp4") == (WIDTH, HEIGHT, FPS / stride, 6)
    lines = _jsonl(results)
    assert [line["frame"] for line in lines] == predicted
    assert [line["time_s"] for line in lines] == pytest.approx([frame / FPS for frame in predicted])
    # Progress in a log (not a terminal): a line at every 4 frames and at the end, with the rate.
    progress = [r.getMessage() for r in caplog.records if "frames/s" in r.getMessage()]
    assert [p.split(",")[0] for p in progress] == ["frame 4/6", "frame 6/6"], progress
    assert "6 frames of" in caplog.text and "moving_shapes.mp4 (5 fps)" in caplog.text

    # The moving shapes are found where they were drawn, and nothing else is sure.
    for line in lines:
        truth = known_boxes(line["frame"])
        found = line["detections"]
        assert all(d["class_name"] == CLASSES[d["category_id"] - 1] for d in found)
        boxes = torch.tensor([d["xyxy"] for d in found]).reshape(-1, 4)
        ious = box_iou(torch.tensor([box for _, box in truth], dtype=torch.float32), boxes)
        for (kind, box), overlaps in zip(truth, ious, strict=True):
            hits = [
                (round(float(iou), 2), d["score"])
                for iou, d in zip(overlaps, found, strict=True)
                if d["class_name"] == CLASSES[kind] and iou >= FOUND_IOU and d["score"] >= FOUND_SCORE
            ]
            assert hits, f"frame {line['frame']}: the {CLASSES[kind]} at {box} not found in {found}"
        for d, overlaps in zip(found, ious.T, strict=True):
            same_class = [
                iou
                for (kind, _), iou in zip(truth, overlaps, strict=True)
                if CLASSES[kind] == d["class_name"]
            ]
            assert d["score"] < SURE_SCORE or max(same_class) >= FOUND_IOU, f"frame {line['frame']}: {d}"

    # The image route on the same decoded frames (PNG: lossless) gives the same detections.
    images = tmp_path / "frames"
    images.mkdir()
    for frame in predicted:
        assert cv2.imwrite(
            str(images / f"frame_{frame:03d}.png"), cv2.cvtColor(decoded[frame], cv2.COLOR_RGB2BGR)
        )
    as_images = json.loads(_predict(tmp_path, "images", [*common, f"input={images}"]).read_text())
    for line in lines:
        expected = [r for r in as_images if r["file_name"] == f"frame_{line['frame']:03d}.png"]
        assert len(line["detections"]) == len(expected) > 0
        for got, want in zip(line["detections"], expected, strict=True):
            x, y, w, h = want["bbox"]
            assert got["category_id"] == want["category_id"]
            assert got["score"] == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
            assert got["xyxy"] == pytest.approx([x, y, x + w, y + h], abs=BOX_TOLERANCE_PX)

    # Drawn as the image route draws: the annotated video changes the frame where the image route's picture
    # does (mp4v's compression blurs 2-pixel lines: most of those pixels) and nowhere else.
    annotated = read_frames(tmp_path / "video" / "moving_shapes.mp4")
    for index, frame in enumerate(predicted):
        picture = cv2.imread(str(tmp_path / "images" / "images" / f"frame_{frame:03d}.jpg"))
        drawn = _changed(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB), decoded[frame])
        near = cv2.dilate(drawn.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        changed = _changed(annotated[index], decoded[frame])
        assert drawn.sum() > 500 and changed[drawn].mean() > 0.5 and changed[~near].mean() < 0.01, frame


def _changed(image: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Where `image` differs from `original` by more than lossy compression does."""
    return np.abs(image.astype(int) - original).sum(axis=-1) > 60


class FakeCamera:
    """A camera as OpenCV's capture shows it (no frame count, 10 fps) serving the test video's frames, whose
    read after `frames` frames raises KeyboardInterrupt, as Ctrl-C would while waiting for a frame."""

    def __init__(self, frames: list[np.ndarray], interrupt_after: int) -> None:
        self.frames, self.interrupt_after = frames, interrupt_after
        self.reads, self.released = 0, False

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def get(self, prop: int) -> float:
        return {
            cv2.CAP_PROP_FPS: FPS,
            cv2.CAP_PROP_FRAME_WIDTH: WIDTH,
            cv2.CAP_PROP_FRAME_HEIGHT: HEIGHT,
        }.get(prop, -1.0)

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.reads == self.interrupt_after:
            raise KeyboardInterrupt
        self.reads += 1
        return True, cv2.cvtColor(self.frames[(self.reads - 1) % len(self.frames)], cv2.COLOR_RGB2BGR)

    def grab(self) -> bool:
        return self.read()[0]

    def release(self) -> None:
        self.released = True


def test_ctrl_c_closes_a_video_that_plays_with_the_frames_read(
    shapes_detector: Path,
    test_video: tuple[Path, list[np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, decoded = test_video
    cameras: list[FakeCamera] = []

    def open_camera(source: int | str) -> FakeCamera:
        assert source == 0  # input=0: camera 0
        cameras.append(FakeCamera(decoded, interrupt_after=6))
        return cameras[-1]

    monkeypatch.setattr(video_module, "open_capture", open_camera)
    options = [f"ckpt_path={shapes_detector}", "input=0", "batch_size=4"]
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        results = _predict(tmp_path, "camera", options)  # returns: Ctrl-C is how a camera stops

    # 6 frames read: a batch of 4 predicted, then Ctrl-C while reading the 7th; the 2 read are predicted too.
    assert [line["frame"] for line in _jsonl(results)] == list(range(6))
    assert _video_properties(tmp_path / "camera" / "camera0.mp4") == (WIDTH, HEIGHT, FPS, 6)
    assert cameras[0].released
    assert "Stopped by Ctrl-C after 6 frames of camera 0" in caplog.text

    # max_frames stops a camera without Ctrl-C; save_images=false writes the detections only.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        results = _predict(tmp_path, "counted", [*options, "max_frames=5", "save_images=false"])
    assert [line["frame"] for line in _jsonl(results)] == list(range(5))
    assert cameras[1].reads == 5 and cameras[1].released
    assert not list((tmp_path / "counted").glob("*.mp4")) and "Ctrl-C" not in caplog.text


def test_inputs_are_told_apart_and_a_missing_camera_or_stream_is_named(
    test_video: tuple[Path, list[np.ndarray]], tmp_path: Path
) -> None:
    video, _ = test_video
    assert video_source(0) == 0 and video_source("0") == 0 and video_source(" 12 ") == 12
    for url in ("rtsp://camera.local:554/stream1", "HTTP://example.com/live.mjpg", "rtmp://host/app/key"):
        assert video_source(url) == url
    with pytest.raises(VideoError, match=r"input=ftp://host/clip.mp4: ftp:// is not a stream"):
        video_source("ftp://host/clip.mp4")
    assert video_source(str(video)) == str(video)
    assert video_source(str(tmp_path / "not_yet.mp4")) == str(tmp_path / "not_yet.mp4")  # named as a video
    renamed = tmp_path / "clip.data"  # an extension of neither kind: OpenCV decides
    renamed.write_bytes(video.read_bytes())
    assert video_source(str(renamed)) == str(renamed)
    (tmp_path / "notes.data").write_text("not a video")
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), render(known_boxes(0)))
    for image_route in (still, tmp_path, tmp_path / "notes.data", tmp_path / "missing.jpg"):
        assert video_source(str(image_route)) is None, image_route
    assert video_source(True) is None and video_source(-1) is None

    with pytest.raises(
        VideoError, match=r"^input=99: OpenCV cannot open camera 99 \(no camera with that index"
    ):
        VideoReader(99)
    with pytest.raises(VideoError, match=r"^input=http://127.0.0.1:1/live: OpenCV cannot open this stream"):
        VideoReader("http://127.0.0.1:1/live")  # nothing listens on port 1: refused at once
    with pytest.raises(FileNotFoundError, match="input=.*not_yet.mp4: no such video file"):
        VideoReader(str(tmp_path / "not_yet.mp4"))
    with pytest.raises(VideoError, match="cannot read this video"):
        VideoReader(str(tmp_path / "notes.data"))

    reader = VideoReader(str(video), vid_stride=5)
    with reader:
        assert (reader.fps, reader.width, reader.height, reader.frame_count) == (FPS, WIDTH, HEIGHT, FRAMES)
        assert reader.frames_to_predict == 3
        frames = list(reader)
    assert [(f.index, f.time_s) for f in frames] == [(0, 0.0), (5, 0.5), (10, 1.0)]
    assert reader.frames_read == FRAMES


def test_video_options_are_checked_before_the_checkpoint_loads(
    test_video: tuple[Path, list[np.ndarray]], tmp_path: Path
) -> None:
    video, _ = test_video
    base = ["ckpt_path=missing.ckpt", f"input={video}"]
    wrong = {
        "vid_stride=0": "vid_stride=0 must be a whole number >= 1: e.g. vid_stride=2",
        "vid_stride=1.5": "vid_stride=1.5 must be a whole number >= 1",
        "vid_stride=abc": "vid_stride=abc must be a whole number >= 1",
        "max_frames=0": "max_frames=0 must be a whole number >= 1 or null",
        "log_every_n_frames=-1": "log_every_n_frames=-1 must be a whole number >= 1",
        "batch_size=0": "batch_size=0 must be a whole number >= 1",
        "video_codec=H265": "video_codec=H265 is not one predict.py writes: mp4v (.mp4), avc1 (.mp4)",
    }
    for option, message in wrong.items():
        cfg = compose_config("predict", [*CPU, *base, option], tmp_path / "out")
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            predict(cfg)  # not the missing checkpoint's FileNotFoundError: options come first
    job = video_job(compose_config("predict", [*base, "video_codec=mjpg", "max_frames=20", "vid_stride=3"]))
    assert job is not None and (job.codec, job.max_frames, job.vid_stride) == ("MJPG", 20, 3)
    assert job.video_name() == "moving_shapes.avi"
    assert video_job(compose_config("predict", ["ckpt_path=x", f"input={tmp_path}"])) is None  # a folder


def test_progress_in_a_log_is_a_line_every_n_frames_with_the_rate(caplog: pytest.LogCaptureFixture) -> None:
    ticks = iter([100.0, 102.0, 104.0, 105.0])  # start, then one reading per line
    progress = FrameProgress(total=10, every=4, clock=lambda: next(ticks), terminal=False)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        for count in (3, 2, 4, 1):  # 3, 5 (line), 9 (line), 10 (the end: line)
            progress.update(count)
    assert [r.getMessage() for r in caplog.records] == [
        "frame 5/10, 2.5 frames/s",
        "frame 9/10, 2.2 frames/s",
        "frame 10/10, 2.0 frames/s",
    ]
