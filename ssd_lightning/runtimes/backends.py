"""The runtimes behind `Detector`: PyTorch (a checkpoint), TorchScript, ONNX Runtime, OpenVINO, TensorRT.

Every optional package is imported when a detector is built, never at module import, so that this module
loads with the base install; a missing one is a `RuntimeUnavailable` naming the extra that installs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_lightning.export import INPUT_NAME, read_metadata
from ssd_lightning.runtimes.base import (
    Detections,
    Detector,
    ModelInfo,
    RuntimeUnavailable,
    require_package,
)

#: Key of the OpenVINO IR's rt_info that holds `export_metadata` as JSON.
OPENVINO_METADATA_KEY = "ssd_lightning"
#: TensorRT engines cannot carry metadata: it goes beside the engine as <engine>.json.
TENSORRT_METADATA_SUFFIX = ".json"
OUTPUTS = ("boxes", "scores", "labels", "num_detections")


def _check_cuda(runtime: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeUnavailable(
            f"runtime={runtime} on device=cuda, but PyTorch sees no CUDA GPU here: use device=cpu "
            "(trainer.accelerator=cpu) with runtime=onnxruntime or openvino"
        )


class PyTorchDetector(Detector):
    """The checkpoint path itself: the Lightning module's normalisation, network and `detect`, in eager
    PyTorch (what eval.py and predict.py run with ckpt_path=)."""

    runtime = "pytorch"

    def __init__(self, module: Any, source: str | Path, device: str = "cpu") -> None:
        hparams = module.hparams
        net = module.net
        info = ModelInfo(
            image_size=int(module.image_size),
            class_names=list(module.class_names),
            pixel_mean=[float(v) for v in hparams["pixel_mean"]],
            pixel_std=[float(v) for v in hparams["pixel_std"]],
            detection=net.detection,
            input_format="uint8",
            category_ids=hparams.get("category_ids"),
            metadata={"net": dict(hparams["net"]), "datamodule_arguments": module.datamodule_arguments},
        )
        super().__init__(info, source, device)
        if device.startswith("cuda"):
            _check_cuda(self.runtime)
        self.module = module.eval().to(device)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str = "cpu", trust: bool = False
    ) -> PyTorchDetector:
        """A training checkpoint (.ckpt) or `export.py format=safetensors` file, read weights-only."""
        from ssd_lightning.checkpoint_files import load_checkpoint
        from ssd_lightning.training.module import SSDLitModule

        module = SSDLitModule.from_checkpoint(load_checkpoint(Path(path), "model_path", trust))
        return cls(module, path, device)

    def run(self, prepared: np.ndarray) -> list[Detections]:
        with torch.inference_mode():
            images = torch.from_numpy(prepared).to(self.device).permute(0, 3, 1, 2).contiguous()
            loc, conf = self.module(images)
            detections = self.module.net.detect(loc.float(), conf.float())
        return [{key: value.cpu().numpy() for key, value in d.items()} for d in detections]


class TorchScriptDetector(Detector):
    """A TorchScript file of `export.py format=torchscript` (network + NMS traced into it)."""

    runtime = "torchscript"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", raw: bool = False) -> None:
        import torchvision  # noqa: F401  (registers the NMS op the file calls)

        super().__init__(ModelInfo.from_metadata(read_metadata(path), path, raw), path, device)
        if device.startswith("cuda"):
            _check_cuda(self.runtime)
        self.module = torch.jit.load(str(path), map_location=device).eval()

    def outputs(self, prepared: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(prepared).to(self.device))
        return [output.cpu().numpy() for output in outputs]


class OnnxRuntimeDetector(Detector):
    """An ONNX file (fp32 or the INT8 QDQ file of `export.py int8=true`) in ONNX Runtime; device=cuda uses
    its CUDA execution provider (the onnxruntime-gpu package). `allow_spinning=False` stops its idle
    threads spinning (ONNX Runtime's default), which would slow other work sharing the cores."""

    runtime = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        session_options: Mapping[str, Any] | None = None,
        raw: bool = False,
        allow_spinning: bool = True,
    ) -> None:
        ort = require_package("onnxruntime", "runtime=onnxruntime")
        require_package("onnx", "runtime=onnxruntime (reading the file's metadata)")
        super().__init__(ModelInfo.from_metadata(read_metadata(path), path, raw), path, device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailable(
                    "runtime=onnxruntime on device=cuda needs the onnxruntime-gpu package (this onnxruntime "
                    f"has {ort.get_available_providers()}): pip install onnxruntime-gpu, or use device=cpu"
                )
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        options = ort.SessionOptions()
        for key, value in (session_options or {}).items():
            setattr(options, key, value)
        if not allow_spinning:  # idle threads sleep instead of spinning on the cores other work needs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.output_names = list(self.info.metadata.get("outputs", OUTPUTS))

    def outputs(self, prepared: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {INPUT_NAME: prepared})


def openvino_metadata(model: Any) -> dict[str, Any]:
    """`export_metadata` stored in an OpenVINO model's rt_info (see `write_openvino`)."""
    if not model.has_rt_info([OPENVINO_METADATA_KEY]):
        return {}
    return json.loads(model.get_rt_info([OPENVINO_METADATA_KEY]).astype(str))


class OpenVINODetector(Detector):
    """An OpenVINO IR (.xml beside its .bin), fp32 or the INT8 one of `export.py format=openvino int8=true`;
    also reads ONNX files directly. On the CPU.

    `inference_precision`: OpenVINO's INFERENCE_PRECISION_HINT. "f32" (default) computes what the file says;
    OpenVINO's own default on CPUs with bf16 units (AMX, AVX512-BF16) is "bf16", faster and less exact.
    """

    runtime = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        inference_precision: str = "f32",
        performance_hint: str = "LATENCY",
        raw: bool = False,
    ) -> None:
        ov = require_package("openvino", "runtime=openvino")
        path = Path(path)
        if device.startswith("cuda"):
            raise RuntimeUnavailable(
                "runtime=openvino runs on the CPU (device=cpu): for an NVIDIA GPU use runtime=tensorrt "
                "(export.py format=tensorrt) or runtime=onnxruntime"
            )
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"{path} needs its weights file {path.with_suffix('.bin')} beside it")
        core = ov.Core()
        model = core.read_model(str(path))
        metadata = read_metadata(path) if path.suffix == ".onnx" else openvino_metadata(model)
        super().__init__(ModelInfo.from_metadata(metadata, path, raw), path, device)
        config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": performance_hint}
        self.compiled = core.compile_model(model, "CPU", config)
        self.inference_precision = inference_precision
        self.request = self.compiled.create_infer_request()
        self.ports = [self.compiled.output(name) for name in self.info.metadata.get("outputs", OUTPUTS)]

    def describe(self) -> str:
        return f"{super().describe()[:-1]}, computing in {self.inference_precision})"

    def outputs(self, prepared: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer({0: prepared})
        return [results[port] for port in self.ports]


class TensorRTDetector(Detector):
    """A TensorRT engine of `export.py format=tensorrt` (fp16 or INT8; NMS in the engine, from the ONNX
    graph's NonMaxSuppression), on a CUDA GPU. Its metadata is the JSON file beside it (<engine>.json).
    Input and outputs live in PyTorch CUDA tensors (no pycuda needed)."""

    runtime = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", raw: bool = False) -> None:
        trt = require_package("tensorrt", "runtime=tensorrt")
        path = Path(path)
        if not device.startswith("cuda"):
            raise RuntimeUnavailable(
                f"runtime=tensorrt runs on an NVIDIA GPU (device=cuda), not device={device}: on the CPU "
                "use the ONNX or OpenVINO file (export.py format=onnx|openvino)"
            )
        _check_cuda(self.runtime)
        side = path.with_name(path.name + TENSORRT_METADATA_SUFFIX)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        if not side.is_file():
            raise FileNotFoundError(
                f"{path} needs its metadata file {side} beside it (export.py writes both)"
            )
        super().__init__(ModelInfo.from_metadata(json.loads(side.read_text()), path, raw), path, device)
        self.torch_device = torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"TensorRT cannot load {path}: an engine only runs on the TensorRT version and GPU model "
                "that built it; build it again here with export.py format=tensorrt"
            )
        self.context = self.engine.create_execution_context()
        self.trt = trt

    def _dtype(self, name: str) -> torch.dtype:
        return {
            self.trt.DataType.FLOAT: torch.float32,
            self.trt.DataType.HALF: torch.float16,
            self.trt.DataType.INT32: torch.int32,
            self.trt.DataType.INT64: torch.int64,
            self.trt.DataType.UINT8: torch.uint8,
            self.trt.DataType.BOOL: torch.bool,
        }[self.engine.get_tensor_dtype(name)]

    def outputs(self, prepared: np.ndarray) -> list[np.ndarray]:
        images = torch.from_numpy(prepared).to(self.torch_device, self._dtype(INPUT_NAME)).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(images.shape))
        self.context.set_tensor_address(INPUT_NAME, images.data_ptr())
        outputs = {}
        names = list(self.info.metadata.get("outputs", OUTPUTS))
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtype(name), device=self.torch_device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.torch_device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.source}")
        stream.synchronize()
        return [outputs[name].cpu().numpy() for name in names]
