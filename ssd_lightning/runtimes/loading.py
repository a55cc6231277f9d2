"""`load_detector(path, runtime="auto", device="auto")`: the detector for a model file, on the runtime that
runs that file fastest on the device.

The rule of `runtime=auto` (measured with `python -m ssd_lightning.benchmark formats`, see README):
- the file decides when only one runtime reads it: .xml OpenVINO IR -> openvino, .engine/.plan TensorRT
  engine -> tensorrt, .pt TorchScript -> torchscript, .ckpt/.safetensors checkpoint -> pytorch;
- an .onnx file on the CPU -> openvino when installed (as fast as ONNX Runtime on fp32 files, faster on
  their INT8 QDQ files), else onnxruntime; on a CUDA GPU -> onnxruntime's CUDA provider (for TensorRT's
  speed export an engine: export.py format=tensorrt).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ssd_lightning.runtimes.backends import (
    OnnxRuntimeDetector,
    OpenVINODetector,
    PyTorchDetector,
    TensorRTDetector,
    TorchScriptDetector,
)
from ssd_lightning.runtimes.base import Detector, RuntimeUnavailable

RUNTIMES = ("auto", "pytorch", "torchscript", "onnxruntime", "openvino", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
# File suffix -> the runtimes that read it, fastest first on the CPU.
SUFFIX_RUNTIMES = {
    ".ckpt": ("pytorch",),
    ".safetensors": ("pytorch",),
    ".pt": ("torchscript",),
    ".onnx": ("openvino", "onnxruntime"),
    ".xml": ("openvino",),
    ".engine": ("tensorrt",),
    ".plan": ("tensorrt",),
}
# The Python package each runtime needs.
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def installed(runtime: str) -> bool:
    """Whether the package of `runtime` can be imported (PyTorch-based ones always)."""
    package = PACKAGES.get(runtime)
    return package is None or importlib.util.find_spec(package) is not None


def resolve_device(device: str) -> str:
    """auto -> cuda when PyTorch sees a GPU, else cpu; gpu is cuda."""
    device = str(device).lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        return "cuda"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device}: choose one of {DEVICES} (or cuda:N)")
    return device


def choose_runtime(path: str | os.PathLike, device: str) -> str:
    """The runtime `runtime=auto` uses for `path` on `device` (the rule in this module's docstring)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_RUNTIMES:
        raise ValueError(
            f"model_path={path}: not a model file this project writes; expected one of "
            f"{', '.join(SUFFIX_RUNTIMES)} (export.py format=onnx|openvino|tensorrt|torchscript)"
        )
    candidates = SUFFIX_RUNTIMES[suffix]
    if suffix == ".onnx" and device.startswith("cuda"):
        candidates = ("onnxruntime",)
    for runtime in candidates:
        if installed(runtime):
            return runtime
    return candidates[-1]  # its constructor says which extra to install


def load_detector(
    path: str | os.PathLike, runtime: str = "auto", device: str = "auto", trust_checkpoint: bool = False
) -> Detector:
    """The `Detector` of a model file: an exported ONNX, OpenVINO IR (.xml), TensorRT engine, TorchScript
    file, or a checkpoint (PyTorch eager). `runtime` one of RUNTIMES; `device` cpu | cuda | auto."""
    path = Path(path).expanduser()
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime}: choose one of {RUNTIMES}")
    if not path.is_file():
        raise FileNotFoundError(f"model_path={path}: no such file")
    device = resolve_device(device)
    chosen = choose_runtime(path, device) if runtime == "auto" else runtime
    suffix = path.suffix.lower()
    readers = SUFFIX_RUNTIMES.get(suffix, ())
    if chosen not in readers and not (chosen == "onnxruntime" and suffix == ".onnx"):
        raise ValueError(
            f"runtime={chosen} cannot read {path} ({suffix} files: runtime={' or '.join(readers) or '?'}); "
            "export the format it reads with export.py format=..."
        )
    builders: dict[str, Callable[[], Detector]] = {
        "pytorch": lambda: PyTorchDetector.from_checkpoint(path, device, trust_checkpoint),
        "torchscript": lambda: TorchScriptDetector(path, device),
        "onnxruntime": lambda: OnnxRuntimeDetector(path, device),
        "openvino": lambda: OpenVINODetector(path, device),
        "tensorrt": lambda: TensorRTDetector(path, device),
    }
    return builders[chosen]()


__all__ = ["RUNTIMES", "RuntimeUnavailable", "choose_runtime", "installed", "load_detector", "resolve_device"]
