"""`python export.py ckpt_path=<file|last> [format=onnx|torchscript] [output=...]`: a deployable model file.

The file holds the network, the detection post-processing (NMS included) and, with input_format=uint8,
the input normalisation; what it takes and returns is described in `ssd_lightning.export`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.checkpoint_files import SAFETENSORS_SUFFIX, save_safetensors
from ssd_lightning.cli.build import load_for_inference
from ssd_lightning.cli.preflight import user_errors_as_messages
from ssd_lightning.cli.report import report
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir
from ssd_lightning.export import INPUT_NAME, export_onnx, export_torchscript, read_metadata

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": SAFETENSORS_SUFFIX}


def export(cfg: DictConfig) -> Path:
    """Run the export task of `cfg` (composed from conf/export.yaml); returns the file written."""
    if cfg.format not in SUFFIXES:
        raise ValueError(f"format={cfg.format!r}: choose one of {tuple(SUFFIXES)}")
    if cfg.format == "torchscript" and cfg.batch_size is not None:
        raise ValueError(
            "batch_size is an ONNX option: TorchScript files take any batch size; drop batch_size="
        )
    module, source = load_for_inference(cfg)
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / f"model{SUFFIXES[cfg.format]}"
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
        },
    }
    if cfg.format == "onnx":
        # Hydra logs at INFO; the exporter's graph-rewrite chatter is not for users (failures raise).
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        path = export_onnx(net, output, batch_size=cfg.batch_size, opset=int(cfg.opset), **common)
    else:
        path = export_torchscript(net, output, **common)

    info = read_metadata(path)
    report(
        f"Wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)\n  input `{INPUT_NAME}`: {info['input']}\n"
        f"  outputs: {', '.join(info['outputs'])} ({info['box_format']})\n"
        f"  {len(module.class_names)} classes; thresholds {dataclasses.asdict(net.detection)}"
    )
    return path


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(config_dir()), config_name="export")
@user_errors_as_messages("export.py")
def main(cfg: DictConfig) -> None:
    """Console entry point (`python export.py`)."""
    export(cfg)


if __name__ == "__main__":
    main()
