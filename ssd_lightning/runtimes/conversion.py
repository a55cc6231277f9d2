"""From the exported ONNX file (network + NMS, `ssd_lightning.export.export_onnx`) to the other runtimes'
formats: OpenVINO IR, INT8 by post-training static quantisation (ONNX Runtime's quantiser or OpenVINO's
NNCF), TensorRT engines. Every output carries the ONNX file's metadata (class names, normalisation,
thresholds) plus what the conversion did (`precision`, `quantizer`, `calibration_images`, `kept_float`).

INT8 is applied to the convolutions only: the post-processing (decode, softmax, top-k, NMS, gathers) stays
in float, where quantising it would move boxes and scores for no speed. `keep_float` leaves chosen
convolutions in float too: "depthwise" (grouped convolutions, e.g. MobileNet's; INT8 kernels for them gain
little and lose accuracy) and "heads" (the box and class predictors, whose outputs are the detections).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssd_lightning.export import INPUT_NAME, read_metadata
from ssd_lightning.runtimes.backends import OPENVINO_METADATA_KEY, TENSORRT_METADATA_SUFFIX
from ssd_lightning.runtimes.base import RuntimeUnavailable, normalise, require_package

KEEP_FLOAT_CHOICES = ("depthwise", "heads")
QUANTIZERS = ("onnxruntime", "nncf")
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")
HEAD_WEIGHT_PREFIX = "model.heads."  # initializer names of the head convolutions in the exported graph


def graph_inputs(metadata: Mapping[str, Any], pixels: np.ndarray) -> np.ndarray:
    """Calibration pixels (uint8 [N,S,S,3] RGB at the network's size) as the graph takes them."""
    if metadata.get("input_format") == "float":
        return normalise(pixels, metadata["pixel_mean"], metadata["pixel_std"])
    return np.ascontiguousarray(pixels)


def _check_keep_float(keep_float: Iterable[str]) -> list[str]:
    keep = list(keep_float)
    unknown = sorted(set(keep) - set(KEEP_FLOAT_CHOICES))
    if unknown:
        raise ValueError(f"int8_keep_float={unknown}: choose from {list(KEEP_FLOAT_CHOICES)}")
    return keep


def float_convolutions(model: Any, keep_float: Iterable[str]) -> list[str]:
    """Names of the Conv nodes of an ONNX model that `keep_float` keeps in float."""
    keep = _check_keep_float(keep_float)
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        weight = node.input[1] if len(node.input) > 1 else ""
        if ("depthwise" in keep and group > 1) or ("heads" in keep and weight.startswith(HEAD_WEIGHT_PREFIX)):
            names.append(node.name)
    return names


def _write_onnx_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    onnx = require_package("onnx", "export.py int8=true")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.extend(
        onnx.StringStringEntryProto(key=key, value=json.dumps(value)) for key, value in metadata.items()
    )
    onnx.save(model, str(path))


def quantize_onnxruntime(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: np.ndarray,
    *,
    keep_float: Sequence[str] = (),
    symmetric: bool = True,
) -> Path:
    """INT8 ONNX (QDQ) by ONNX Runtime's `quantize_static`: the convolutions get per-channel int8 weights
    and activations with min-max ranges over the `calibration` pixels (uint8 [N,S,S,3] RGB).

    `symmetric=True` (int8 activations, zero point 0) is the file OpenVINO and TensorRT run as INT8
    (OpenVINO takes 36 ms for SSD300 on one core with it, 61 ms with uint8 asymmetric activations);
    ONNX Runtime alone runs the asymmetric uint8 file (`False`) about 20% faster.
    """
    require_package("onnxruntime", "export.py int8=true")
    onnx = require_package("onnx", "export.py int8=true")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    metadata = read_metadata(onnx_path)
    inputs = graph_inputs(metadata, calibration)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(inputs[i : i + 1] for i in range(len(inputs)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # No quant_pre_process: its fusions left a file that OpenVINO ran in float (6x slower than this one).
    quantize_static(
        str(onnx_path),
        str(output),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=float_convolutions(onnx.load(str(onnx_path)), keep_float),
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    _write_onnx_metadata(output, _int8_metadata(metadata, "onnxruntime", calibration, keep_float))
    return output


def _int8_metadata(
    metadata: Mapping[str, Any], quantizer: str, calibration: np.ndarray, keep_float: Sequence[str]
) -> dict[str, Any]:
    return {
        **metadata,
        "precision": "int8",
        "quantizer": quantizer,
        "calibration_images": len(calibration),
        "kept_float": list(keep_float),
    }


def quantize_nncf(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: np.ndarray,
    *,
    keep_float: Sequence[str] = (),
) -> Path:
    """INT8 ONNX (QDQ) by NNCF's post-training quantisation (min-max ranges, fast bias correction) with its
    ONNX backend: quantisers where OpenVINO's CPU plugin fuses them. (NNCF on the OpenVINO model instead
    ran SSDLite320 slower here: 18.6 ms against 14.1 ms on one core.)"""
    onnx = require_package("onnx", "export.py int8=true")
    nncf = require_package("nncf", "export.py int8_quantizer=nncf")
    metadata = read_metadata(onnx_path)
    model = onnx.load(str(onnx_path))
    inputs = graph_inputs(metadata, calibration)
    ignored = float_convolutions(model, keep_float)
    quantized = nncf.quantize(
        model,
        nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))], lambda batch: {INPUT_NAME: batch}),
        subset_size=len(inputs),
        ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(output))
    _write_onnx_metadata(output, _int8_metadata(metadata, "nncf", calibration, keep_float))
    return output


def quantize_onnx(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: np.ndarray,
    *,
    quantizer: str = "onnxruntime",
    keep_float: Sequence[str] = (),
) -> Path:
    """INT8 QDQ ONNX of `onnx_path` by `quantizer` ("onnxruntime" | "nncf"), calibrated on `calibration`
    (uint8 [N,S,S,3] RGB pixels at the network's size)."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"int8_quantizer={quantizer}: choose one of {QUANTIZERS}")
    if len(calibration) == 0:
        raise ValueError("INT8 quantisation needs calibration images: calibration_images must be >= 1")
    if quantizer == "nncf":
        return quantize_nncf(onnx_path, output, calibration, keep_float=keep_float)
    return quantize_onnxruntime(onnx_path, output, calibration, keep_float=keep_float)


def write_openvino(
    onnx_path: str | os.PathLike, output: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """An OpenVINO IR (`output`, .xml, and its .bin beside it) of an ONNX file (fp32, or INT8 QDQ: OpenVINO
    turns Q/DQ pairs into its INT8 FakeQuantize), with the file's metadata (and `metadata`) in its rt_info.
    Weights keep their type (OpenVINO's default would store float weights as fp16)."""
    ov = require_package("openvino", "export.py format=openvino")
    output = Path(output)
    if output.suffix != ".xml":
        raise ValueError(f"output={output}: an OpenVINO IR is an .xml file (its weights go beside it, .bin)")
    info = {**read_metadata(onnx_path), **(metadata or {})}
    model = ov.Core().read_model(str(onnx_path))
    model.set_rt_info(json.dumps(info), [OPENVINO_METADATA_KEY])
    output.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(output), compress_to_fp16=False)
    return output


def check_tensorrt_builder() -> Any:
    """The tensorrt package, when an engine can be built here (the package, a CUDA GPU), else why not."""
    trt = require_package("tensorrt", "export.py format=tensorrt")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailable(
            "export.py format=tensorrt builds the engine on the GPU it will run on, and PyTorch sees no CUDA "
            "GPU here: run the export on that machine (format=onnx or openvino run on CPUs)"
        )
    return trt


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    precision: str = "fp16",
    max_batch_size: int = 16,
    opt_batch_size: int = 1,
    workspace_gib: float = 4.0,
) -> Path:
    """A TensorRT engine (`output`, metadata in `<output>.json`) from an ONNX file, on this machine's GPU.

    NMS stays the graph's: TensorRT's ONNX parser maps NonMaxSuppression to its own NMS layer. `precision`
    "fp16" (fp16 where faster, fp32 elsewhere) or "fp32"; for "int8" pass the symmetric QDQ file of
    `quantize_onnxruntime(..., symmetric=True)`: TensorRT runs its Q/DQ pairs in INT8 (explicit
    quantisation; TensorRT 10 deprecated its own calibrators) and the rest in fp16. A file with a fixed
    batch gets that batch; a dynamic one is built for 1..`max_batch_size`, tuned for `opt_batch_size`.
    An engine runs only on the TensorRT version and GPU model that built it.
    """
    trt = check_tensorrt_builder()
    if precision not in TENSORRT_PRECISIONS:
        raise ValueError(f"tensorrt precision={precision!r}: choose one of {TENSORRT_PRECISIONS}")
    import torch

    metadata = read_metadata(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: TensorRT 10's only kind
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    size = int(metadata["image_size"])
    per_image = (size, size, 3) if metadata.get("input_format") == "uint8" else (3, size, size)
    fixed = metadata.get("batch_size")
    profile = builder.create_optimization_profile()
    low, high = (fixed, fixed) if fixed else (1, max_batch_size)
    opt = fixed or min(opt_batch_size, max_batch_size)
    profile.set_shape(INPUT_NAME, (low, *per_image), (opt, *per_image), (high, *per_image))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(bytes(serialized))
    info = {
        **metadata,
        "precision": metadata.get("precision") if precision == "int8" else precision,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "max_batch_size": high,
    }
    output.with_name(output.name + TENSORRT_METADATA_SUFFIX).write_text(json.dumps(info, indent=1) + "\n")
    return output
