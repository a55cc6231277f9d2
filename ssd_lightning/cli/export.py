"""`python export.py ckpt_path=<file|last> [format=onnx|openvino|tensorrt|torchscript|safetensors] [int8=true]
[output=...]`: a deployable model file.

The file holds the network, the detection post-processing (NMS included) and, with input_format=uint8,
the input normalisation; what it takes and returns is described in `ssd_lightning.export`. openvino and
tensorrt files are converted from the ONNX file (`ssd_lightning.runtimes.conversion`); int8=true quantises
the convolutions (post-training static quantisation) on calibration_images images of the training split.
eval.py and predict.py run any of them with model_path=<file>.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.checkpoint_files import SAFETENSORS_SUFFIX, save_safetensors
from ssd_lightning.cli.build import load_for_inference
from ssd_lightning.cli.preflight import ConfigurationError, user_errors_as_messages
from ssd_lightning.cli.report import report
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.data import DatasetError, ImageFolderDataset, build_eval_transform
from ssd_lightning.export import INPUT_NAME, export_onnx, export_torchscript, read_metadata
from ssd_lightning.runtimes import calibration_pixels, data_split
from ssd_lightning.runtimes.conversion import (
    build_tensorrt_engine,
    check_tensorrt_builder,
    quantize_onnx,
    write_openvino,
)
from ssd_lightning.training.module import SSDLitModule

SUFFIXES = {
    "onnx": ".onnx",
    "openvino": ".xml",
    "tensorrt": ".engine",
    "torchscript": ".pt",
    "safetensors": SAFETENSORS_SUFFIX,
}
INT8_FORMATS = ("onnx", "openvino", "tensorrt")  # the formats converted from the ONNX file


def calibration_images(cfg: DictConfig, module: SSDLitModule) -> Any:
    """The INT8 calibration pixels (uint8 [N,S,S,3]): `calibration_images` images of the checkpoint's
    training split at the network's input, or of `calibration_dir` when given."""
    hparams = module.hparams
    transform = build_eval_transform(
        module.image_size, hparams.pixel_mean, hparams.pixel_std, normalize=False
    )
    count = int(cfg.calibration_images)
    if cfg.get("calibration_dir"):
        dataset = ImageFolderDataset(cfg.calibration_dir, module.class_names, transform=transform)
    else:
        arguments = module.datamodule_arguments or {}
        try:
            if not arguments:
                raise FileNotFoundError("the checkpoint does not record its training data")
            dataset = data_split(arguments, "train", transform)
        except (DatasetError, FileNotFoundError) as error:
            raise ConfigurationError(
                f"int8=true calibrates on calibration_images={count} images of the training split of the "
                f"checkpoint's data ({arguments.get('format')} at {arguments.get('root')}), which cannot be "
                f"read here ({str(error).splitlines()[0]}); pass calibration_dir=<a folder of images like "
                "the training images>"
            ) from error
    pixels = calibration_pixels(dataset, count)
    report(f"INT8 calibration on {len(pixels)} images of {getattr(dataset, 'name', cfg.calibration_dir)}")
    return pixels


def _check_options(cfg: DictConfig) -> None:
    if cfg.format not in SUFFIXES:
        raise ValueError(f"format={cfg.format!r}: choose one of {tuple(SUFFIXES)}")
    if cfg.format == "torchscript" and cfg.batch_size is not None:
        raise ValueError(
            "batch_size is an ONNX option: TorchScript files take any batch size; drop batch_size="
        )
    if cfg.get("int8") and cfg.format not in INT8_FORMATS:
        raise ValueError(f"int8=true applies to format={'|'.join(INT8_FORMATS)}, not format={cfg.format}")
    count = cfg.get("calibration_images")
    if cfg.get("int8") and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"calibration_images={count} is not a whole number >= 1 (e.g. 128)")
    if cfg.format == "tensorrt":
        check_tensorrt_builder()  # before the export: the package and a GPU
    if cfg.get("int8") and not cfg.include_postprocess:
        raise ValueError("int8=true quantises files with post-processing: drop include_postprocess=false")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def int8_quantizer(setting: str, file_format: str) -> str:
    """`int8_quantizer=auto`: NNCF for an OpenVINO file when installed (faster and more accurate than ONNX
    Runtime's quantiser on our trained SSDLite320 and compact checkpoints, experiments/benchmarks/), else ONNX
    Runtime's; TensorRT's explicit quantisation takes ONNX Runtime's symmetric Q/DQ pairs only."""
    if file_format == "tensorrt":
        chosen = "onnxruntime"
    elif setting == "auto":
        chosen = "nncf" if file_format == "openvino" and importlib.util.find_spec("nncf") else "onnxruntime"
    else:
        chosen = setting
    report(f"INT8 quantiser: {chosen}" + (f" (int8_quantizer={setting})" if chosen != setting else ""))
    return chosen


def convert(cfg: DictConfig, module: SSDLitModule, onnx_path: Path, output: Path) -> Path:
    """The ONNX file of `onnx_path` as `cfg.format` (INT8 with `cfg.int8`), written to `output`."""
    quantizer, keep_float = str(cfg.int8_quantizer), list(cfg.int8_keep_float or [])
    trt = cfg.tensorrt
    with tempfile.TemporaryDirectory(prefix="ssd_export_") as scratch:
        source = onnx_path
        if cfg.int8:
            pixels = calibration_images(cfg, module)
            quantizer = int8_quantizer(quantizer, str(cfg.format))
            target = output if cfg.format == "onnx" else Path(scratch) / "int8.onnx"
            source = quantize_onnx(onnx_path, target, pixels, quantizer=quantizer, keep_float=keep_float)
        if cfg.format == "openvino":
            return write_openvino(source, output)
        if cfg.format == "tensorrt":
            precision = "int8" if cfg.int8 else str(trt.precision)
            return build_tensorrt_engine(
                source,
                output,
                precision=precision,
                max_batch_size=int(trt.max_batch_size),
                opt_batch_size=int(trt.opt_batch_size),
                workspace_gib=float(trt.workspace_gib),
            )
        return source


def export(cfg: DictConfig) -> Path:
    """Run the export task of `cfg` (composed from conf/export.yaml); returns the file written."""
    _check_options(cfg)
    module, source = load_for_inference(cfg)
    stem = "model_int8" if cfg.get("int8") else "model"
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / f"{stem}{SUFFIXES[cfg.format]}"
    if cfg.format in INT8_FORMATS and output.suffix != SUFFIXES[cfg.format]:  # model_path= reads the suffix
        raise ValueError(f"output={cfg.output}: format={cfg.format} files end in {SUFFIXES[cfg.format]}")
    if output.expanduser().resolve() == source.resolve():
        raise ValueError(f"output={cfg.output} is the checkpoint being exported: choose another file")
    if cfg.format == "safetensors":  # the weights alone, for sharing: nothing in the file can run code
        checkpoint = {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": module.datamodule_arguments,
        }
        path = save_safetensors(checkpoint, output)
        report(f"Wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): weights and network description")
        return path
    net = module.net.eval()
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.detection).items() if v is not None}
    net.detection = dataclasses.replace(net.detection, **overrides)

    hparams = module.hparams
    common = {
        "include_postprocess": bool(cfg.include_postprocess),
        "input_format": cfg.input_format,
        "pixel_mean": list(hparams.pixel_mean),
        "pixel_std": list(hparams.pixel_std),
        "class_names": module.class_names,
        "metadata": {
            "checkpoint": str(cfg.ckpt_path),
            "net": dict(hparams.net),
            "category_ids": hparams.get("category_ids"),
            # predict.py model_path=<file> without input= predicts on the test split of this data.
            "datamodule_arguments": _json_safe(module.datamodule_arguments),
            "precision": "fp32",
        },
    }
    if cfg.format == "torchscript":
        path = export_torchscript(net, output, **common)
        info = read_metadata(path)
    else:
        # Hydra logs at INFO; the exporter's graph-rewrite chatter is not for users (failures raise).
        for name in ("onnxscript", "onnx_ir", "nncf"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(prefix="ssd_export_") as scratch:
            direct = cfg.format == "onnx" and not cfg.int8
            onnx_path = output if direct else Path(scratch) / "model.onnx"
            export_onnx(net, onnx_path, batch_size=cfg.batch_size, opset=int(cfg.opset), **common)
            info = read_metadata(onnx_path)
            path = onnx_path if direct else convert(cfg, module, onnx_path, output)
    sizes = sum(p.stat().st_size for p in {path, path.with_suffix(".bin") if path.suffix == ".xml" else path})
    report(
        f"Wrote {path} ({sizes / 2**20:.1f} MiB{', INT8' if cfg.get('int8') else ''})\n"
        f"  input `{INPUT_NAME}`: {info['input']}\n"
        f"  outputs: {', '.join(info['outputs'])} ({info['box_format']})\n"
        f"  {len(module.class_names)} classes; thresholds {dataclasses.asdict(net.detection)}\n"
        f"  run it: python predict.py model_path={path} input=<image or folder>; "
        f"python eval.py model_path={path}"
    )
    return path


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="export")
@user_errors_as_messages("export.py")
def main(cfg: DictConfig) -> None:
    """Console entry point (`python export.py`)."""
    export(cfg)


if __name__ == "__main__":
    main()
