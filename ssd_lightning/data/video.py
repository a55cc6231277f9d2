"""Video in and out with OpenCV: the frames of a video file, a camera or a stream, and an annotated video.

`video_source` tells what an `input=` names: a camera index (`0`), a stream URL (rtsp://, rtmp://,
http(s)://...), a video file (by its extension, or, for an extension that is neither an image's nor a
video's, by OpenCV opening it as more than one frame), or None for an image or a folder. `VideoReader`
iterates every `vid_stride`-th frame as RGB with its index and time, and reports the frame rate, frame size
and (for files) frame count; anything OpenCV cannot open is a `VideoError` naming the input.
`VideoFileWriter` writes RGB frames to a video file of a given FourCC and frame rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from .base import IMAGE_SUFFIXES

log = logging.getLogger("ssd_lightning.data")

VIDEO_SUFFIXES = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp", ".asf",
)  # fmt: skip
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
#: The frame rate assumed when a camera or stream does not say its own (OpenCV then reports 0).
FALLBACK_FPS = 30.0
#: FourCC -> file suffix of the annotated video. mp4v and MJPG are in every opencv-python wheel; avc1 (H.264)
#: and XVID need an FFmpeg with those encoders.
VIDEO_CODECS = {"mp4v": ".mp4", "avc1": ".mp4", "MJPG": ".avi", "XVID": ".avi"}


class VideoError(ValueError):
    """A video, camera or stream that cannot be read or written; the message names it and says what to do."""


def video_source(value: Any) -> int | str | None:
    """What `input=value` names when it is not an image or a folder: a camera index (int), a stream URL or
    a video file path (str); None for an image, a folder or a path that does not exist (the image route's
    own message). Digits are a camera index: a file named `0` is `./0`."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in STREAM_SCHEMES:
            raise VideoError(
                f"input={text}: {scheme}:// is not a stream OpenCV reads; give a stream URL "
                f"({', '.join(s + '://' for s in STREAM_SCHEMES)}), a camera index (input=0), a video file, "
                "an image or a folder of images"
            )
        return text
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return str(path)  # a missing one is VideoReader's FileNotFoundError, naming it as a video
    if path.is_dir() or suffix in IMAGE_SUFFIXES or not path.is_file():
        return None
    return str(path) if _opens_as_video(path) else None


def _opens_as_video(path: Path) -> bool:
    """Whether OpenCV reads `path` as more than one frame (a still image opens too, as one frame or an
    unknown count)."""
    capture = cv2.VideoCapture(str(path))
    try:
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT) if capture.isOpened() else 0
        return math.isfinite(count) and count > 1
    finally:
        capture.release()


def describe_source(source: int | str) -> str:
    """How messages name a source: `camera 0`, the URL or the file."""
    return f"camera {source}" if isinstance(source, int) else str(source)


def open_capture(source: int | str) -> Any:
    """OpenCV's capture of `source` (tests replace it with a fake frame source)."""
    return cv2.VideoCapture(source)


def _cannot_open(source: int | str) -> VideoError:
    if isinstance(source, int):
        return VideoError(
            f"input={source}: OpenCV cannot open camera {source} (no camera with that index, or another "
            "program is using it). Cameras are numbered from 0 (on Linux /dev/video0, /dev/video1...; "
            "`v4l2-ctl --list-devices` lists them)"
        )
    if "://" in source:
        return VideoError(
            f"input={source}: OpenCV cannot open this stream (unreachable, a wrong address or credentials, "
            "or a protocol its FFmpeg lacks); check that it plays, e.g. with `ffplay <url>`"
        )
    return VideoError(
        f"input={source}: OpenCV cannot read this video (damaged, not a video, or a codec its FFmpeg "
        "lacks); re-encode it, e.g. `ffmpeg -i <file> -c:v libx264 out.mp4`"
    )


@dataclass(frozen=True)
class VideoFrame:
    """One frame read: its index in the source (counting skipped frames), its time in seconds (index /
    fps) and its pixels (RGB uint8 H x W x 3)."""

    index: int
    time_s: float
    rgb: np.ndarray


class VideoReader:
    """Every `vid_stride`-th frame of a video file, a camera or a stream (`video_source`'s values), read
    with OpenCV; skipped frames are grabbed, not decoded. A context manager (releases the capture).

    Attributes: `fps` (the source's; FALLBACK_FPS when it does not say), `width`, `height` (None when the
    source does not say before its first frame), `frame_count` (None for cameras and streams),
    `frames_read` (so far, skipped ones included).
    """

    def __init__(self, source: int | str, vid_stride: int = 1) -> None:
        if isinstance(vid_stride, bool) or not isinstance(vid_stride, int) or vid_stride < 1:
            raise ValueError(f"vid_stride={vid_stride} must be a whole number >= 1 (1: every frame)")
        self.source, self.vid_stride = source, vid_stride
        self.name = describe_source(source)
        if isinstance(source, str) and "://" not in source and not Path(source).is_file():
            raise FileNotFoundError(
                f"input={source}: no such video file (looked at {Path(source).resolve()})"
            )
        self.capture = open_capture(source)
        if not self.capture.isOpened():
            self.capture.release()
            raise _cannot_open(source)
        fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps_known = math.isfinite(fps) and 0 < fps <= 1000
        self.fps = fps if self.fps_known else FALLBACK_FPS
        if not self.fps_known:
            log.warning("%s does not say its frame rate: times assume %g fps", self.name, FALLBACK_FPS)
        width, height = (
            int(self.capture.get(p) or 0) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT)
        )
        self.width, self.height = (width, height) if width > 0 and height > 0 else (None, None)
        count = float(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        is_file = isinstance(source, str) and "://" not in source
        self.frame_count = int(count) if is_file and math.isfinite(count) and 0 < count < 2**31 else None
        self.frames_read = 0

    @property
    def frames_to_predict(self) -> int | None:
        """How many frames `vid_stride` keeps of `frame_count` (None when unknown)."""
        return None if self.frame_count is None else -(-self.frame_count // self.vid_stride)

    def __iter__(self) -> Iterator[VideoFrame]:
        while True:
            index = self.frames_read
            if index % self.vid_stride:
                if not self.capture.grab():
                    return
                self.frames_read += 1
                continue
            ok, bgr = self.capture.read()
            if not ok or bgr is None:
                return
            self.frames_read += 1
            if self.width is None:
                self.height, self.width = bgr.shape[:2]
            yield VideoFrame(index, index / self.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def codec_suffix(codec: str) -> tuple[str, str]:
    """The FourCC as VIDEO_CODECS spells it and its file suffix; anything else is a VideoError."""
    for known, suffix in VIDEO_CODECS.items():
        if str(codec).lower() == known.lower():
            return known, suffix
    raise VideoError(
        f"video_codec={codec} is not one predict.py writes: "
        + ", ".join(f"{name} ({suffix})" for name, suffix in VIDEO_CODECS.items())
    )


class VideoFileWriter:
    """RGB frames into the video file `path` with FourCC `codec` at `fps`; the frame size is the first
    frame's (the file is created with it). A context manager: `close` finalises a playable file whatever
    stopped the writing. `frames_written` counts them."""

    def __init__(self, path: str | Path, codec: str, fps: float) -> None:
        self.codec, _ = codec_suffix(codec)
        self.path, self.fps = Path(path), float(fps)
        self.writer: Any = None
        self.size: tuple[int, int] | None = None
        self.frames_written = 0

    def write(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*self.codec)
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            self.size = (width, height)
            if not self.writer.isOpened():
                raise VideoError(
                    f"video_codec={self.codec}: OpenCV cannot write {self.path} with it (its FFmpeg lacks "
                    "the encoder); video_codec=mp4v (.mp4) and MJPG (.avi) work with every opencv-python"
                )
        if (width, height) != self.size:
            raise VideoError(
                f"{self.path}: a frame of {width}x{height} in a video of {self.size[0]}x{self.size[1]}"
            )
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None

    def __enter__(self) -> VideoFileWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
