"""`model_path=<exported file>` in eval.py and predict.py: the same data, metrics and output files as
`ckpt_path=`, with the network run by a deployment runtime (`ssd_lightning.runtimes`).

`load_model` gives the Lightning module of a checkpoint or a `DetectorModel` (which stands in for it) of an
exported ONNX, OpenVINO IR, TensorRT engine or TorchScript file; `evaluate_split` and `predict_batches` run
either. The runtime is `runtime=` (auto: the fastest installed one for the file and device, see
`ssd_lightning.runtimes.loading`), the device `trainer.accelerator` (cpu | gpu | auto).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ssd_lightning.cli.build import load_for_inference
from ssd_lightning.cli.preflight import MANDATORY_OPTIONS, ConfigurationError
from ssd_lightning.cli.report import report
from ssd_lightning.runtimes import DetectorModel, load_detector
from ssd_lightning.training.module import SSDLitModule

Model = SSDLitModule | DetectorModel


def inference_device(trainer_cfg: DictConfig) -> str:
    """The runtimes' device of `trainer.accelerator`: cpu, cuda (gpu | cuda) or auto."""
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    return {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(accelerator, "auto")


def load_model(cfg: DictConfig, command: str) -> Model:
    """The model of `ckpt_path=` (its Lightning module) or of `model_path=` (a `DetectorModel` on
    `runtime=`); exactly one of the two must be given."""
    ckpt_path, model_path = cfg.get("ckpt_path"), cfg.get("model_path")
    if ckpt_path and model_path:
        raise ConfigurationError(
            f"ckpt_path={ckpt_path} and model_path={model_path}: pass one (ckpt_path= runs the checkpoint in "
            "PyTorch, model_path= an exported file on runtime=)"
        )
    if not ckpt_path and not model_path:
        raise ConfigurationError(f"{command} needs ckpt_path=...: {MANDATORY_OPTIONS['ckpt_path']}")
    if ckpt_path:
        module, _ = load_for_inference(cfg)
        return module
    runtime = str(cfg.get("runtime") or "auto")
    detector = load_detector(
        model_path, runtime, inference_device(cfg.trainer), bool(cfg.get("trust_checkpoint", False))
    )
    report(f"model_path: {detector.describe()}" + (" (runtime=auto)" if runtime == "auto" else ""))
    return DetectorModel(detector)


def model_name(cfg: DictConfig) -> str:
    """The file the results are of (for titles)."""
    return str(cfg.get("model_path") or cfg.get("ckpt_path"))


def model_record(cfg: DictConfig, model: Model) -> dict[str, Any]:
    """What the results JSON says about the model: the checkpoint, or the file, runtime and precision."""
    if not isinstance(model, DetectorModel):
        return {"checkpoint": str(cfg.ckpt_path)}
    detector = model.detector
    return {
        "model_path": str(cfg.model_path),
        "runtime": detector.runtime,
        "device": detector.device,
        "precision": detector.info.precision,
        "checkpoint": detector.info.metadata.get("checkpoint"),
    }


def evaluate_split(trainer: pl.Trainer, model: Model, datamodule: pl.LightningDataModule, split: str) -> None:
    """trainer.validate / trainer.test for a checkpoint; the same pass with the runtime for an exported
    model (its result in `model.last_evaluation` either way)."""
    if isinstance(model, DetectorModel):
        datamodule.prepare_data()
        datamodule.resolve_batch_size(training=False)  # one process: the global batch
        stage = "validate" if split == "val" else "test"
        datamodule.setup(stage)
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        model.evaluate(loader, split)
        return
    run = trainer.validate if split == "val" else trainer.test
    run(model, datamodule=datamodule, verbose=False)


def predict_batches(trainer: pl.Trainer, model: Model, loader: DataLoader) -> Iterable[list[dict[str, Any]]]:
    """Per batch, per image predictions (`SSDLitModule.predict_step`'s) of a checkpoint or exported model."""
    if isinstance(model, DetectorModel):
        return (model.predict_step(batch, index) for index, batch in enumerate(loader))
    return trainer.predict(model, dataloaders=loader)
