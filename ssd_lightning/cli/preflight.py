"""Checks run before any work starts, so that a new user's first mistakes end in one clear sentence
saying what to do, instead of a stack trace from deep inside Lightning, W&B or `load_state_dict`."""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.cli.report import configure_console
from ssd_lightning.models.initial_weights import detector_sources
from ssd_lightning.training.checkpointing import CheckpointWriteError
from ssd_lightning.training.interruption import RunInterrupted
from ssd_lightning.training.nonfinite import NonFiniteLossError

T = TypeVar("T")
log = logging.getLogger("ssd_lightning")

GPU_ACCELERATORS = ("gpu", "cuda")


class ConfigurationError(ValueError):
    """The run cannot start as configured; the message says what to change."""


class SweepError(ConfigurationError):
    """A mistake shared by every job of a sweep: it stops the whole sweep at its first job."""


# What each mandatory option (`???` in conf/) takes, for the one-line message when it is missing.
MANDATORY_OPTIONS = {
    "ckpt_path": "a checkpoint file, or `last` for the newest training run's last.ckpt: ckpt_path=last",
    "dataset.root": "the folder that holds the data: dataset.root=/data/VOCdevkit (dataset=voc), "
    "dataset.root=/data/coco (dataset=coco)",
}


# Values a user sets on the command line most, by entry point: (key, kind, example). Checked before anything
# loads, so that `optimizer.lr=abc` is one line, not a traceback from inside torch.
_NUMBER, _WHOLE, _WHOLE_OR_AUTO = "a number", "a whole number", "a whole number or auto"
_NUMBER_OR_BEST_F1 = "a number or best_f1"
CHECKED_VALUES = {
    "train.py": [
        ("seed", _WHOLE, "seed=42 (or seed=null)"),
        ("optimizer.lr", _NUMBER, "optimizer.lr=0.001"),
        ("optimizer.weight_decay", _NUMBER, "optimizer.weight_decay=0.0005"),
        ("optimizer.momentum", _NUMBER, "optimizer.momentum=0.9"),
        ("dataset.global_batch_size", _WHOLE, "dataset.global_batch_size=32"),
        ("dataset.batch_size", _WHOLE, "dataset.batch_size=8"),
        ("dataset.num_workers", _WHOLE_OR_AUTO, "dataset.num_workers=4"),
        ("trainer.max_epochs", _WHOLE, "trainer.max_epochs=10"),
        ("trainer.max_steps", _WHOLE, "trainer.max_steps=120000"),
        ("trainer.stall_timeout_s", _NUMBER, "trainer.stall_timeout_s=1800"),
    ],
    "eval.py": [("analysis_score_threshold", _NUMBER, "analysis_score_threshold=0.4")],
    "predict.py": [
        ("display_threshold", _NUMBER_OR_BEST_F1, "display_threshold=0.4 (or best_f1)"),
        ("batch_size", _WHOLE, "batch_size=8"),
    ],
    "export.py": [("opset", _WHOLE, "opset=18"), ("batch_size", _WHOLE, "batch_size=1 (or null)")],
}


def _is_kind(value: Any, kind: str) -> bool:
    if value is None:
        return True  # null: the option's own meaning (no seed, derived batch...)
    if isinstance(value, bool):
        return False
    if kind == _WHOLE_OR_AUTO:
        return value == "auto" or isinstance(value, int)
    if kind == _NUMBER_OR_BEST_F1:
        return value == "best_f1" or isinstance(value, (int, float))
    return isinstance(value, int) if kind == _WHOLE else isinstance(value, (int, float))


def check_values(cfg: DictConfig, command: str) -> None:
    """The options of CHECKED_VALUES hold numbers, else one line per option with an example."""
    wrong = []
    for key, kind, example in CHECKED_VALUES.get(command, []):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if not _is_kind(value, kind):
            wrong.append(f"{key}={value} is not {kind}: e.g. {example}")
    if wrong:
        raise ConfigurationError("\n".join(wrong))


def check_plugin_backbone(model_cfg: DictConfig) -> None:
    """A backbone of the user's own (`model.net.backbone`) brings its own weights: ours cannot go into it."""
    if model_cfg.net.get("backbone") and model_cfg.get("backbone_weights"):
        raise ConfigurationError(
            f"model.net.backbone ({model_cfg.net.backbone.get('_target_')}) replaces arch "
            f"{model_cfg.net.arch}, so model.backbone_weights={model_cfg.backbone_weights} has nowhere to "
            "go: set model.backbone_weights=null and load your backbone's weights in its constructor (set "
            "model.pixel_mean and model.pixel_std if they are not the ImageNet mean and std)"
        )


def check_monitor(cfg: DictConfig, logged: Sequence[str]) -> None:
    """`monitor` and `optimized_metric` name metrics the run logs (`logged`): a typo found now, not at the
    first validation hours in."""
    for key in ("monitor", "optimized_metric"):
        name = cfg.get(key)
        if not name or name in logged:
            continue
        close = difflib.get_close_matches(str(name), logged, n=2, cutoff=0.5)
        shown = ", ".join(n for n in logged if not n.startswith("val/ap_voc07/"))
        raise ConfigurationError(
            f"{key}={name} is not a metric this run logs"
            + (f"; did you mean {' or '.join(close)}?" if close else "")
            + f" Validation logs {shown} and val/ap_voc07/<class> per class"
        )


def check_mandatory(cfg: DictConfig, command: str) -> None:
    """Every `???` option of `cfg` is set, else one line per missing option with an example."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ConfigurationError(
            "\n".join(
                f"{command} needs {key}=...: {MANDATORY_OPTIONS.get(key, 'see ' + command + ' --cfg job')}"
                for key in missing
            )
        )


def in_multirun() -> bool:
    """Whether this is a job of a Hydra multirun (a sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def user_errors_as_messages(command: str) -> Callable[[Callable[[DictConfig], T]], Callable[[DictConfig], T]]:
    """Decorates a Hydra task: a missing mandatory option or a mistake in the configuration or the data
    ends the run with its message and exit status 1, not a traceback. HYDRA_FULL_ERROR=1 shows the
    traceback; in a multirun the error is raised, so the sweep records it for that job (a SweepError ends
    the sweep). A run stopped by a signal (after saving its checkpoint) exits with 128 + the signal number."""

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> T:
            configure_console()
            try:
                check_mandatory(cfg, command)
                check_values(cfg, command)
                return task(cfg)
            except RunInterrupted as stop:  # already logged with its checkpoint
                sys.exit(stop.exit_code)
            except (
                ValueError,
                FileNotFoundError,
                NonFiniteLossError,
                CheckpointWriteError,
            ) as error:  # for users
                stops_sweep = isinstance(error, SweepError) and in_multirun()
                if not stops_sweep and (os.environ.get("HYDRA_FULL_ERROR") == "1" or in_multirun()):
                    raise
                log.error("%s", error)
                sys.exit(1)

        return run

    return decorate


def check_accelerator(trainer_cfg: DictConfig | Mapping[str, Any]) -> None:
    """A GPU asked for on a machine without CUDA, or more GPUs than it has."""
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    if accelerator not in GPU_ACCELERATORS:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigurationError(
            f"trainer.accelerator={accelerator} but PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Train on the CPU with "
            "trainer=cpu (or trainer.accelerator=cpu; for DDP on CPUs: trainer=ddp trainer.accelerator=cpu), "
            "or install a CUDA build of PyTorch that matches this machine's driver."
        )
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, int) and devices > available:
        raise ConfigurationError(
            f"trainer.devices={devices} but this machine has {available} CUDA GPU(s); "
            f"use trainer.devices={available} (or trainer.devices=-1 for all of them)"
        )


def _describe(hparams: Mapping[str, Any]) -> str:
    net = hparams.get("net", {})
    classes = list(hparams.get("class_names", []))
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return f"{net.get('arch', 'vgg16')} SSD{net.get('size', '?')} with {len(classes)} classes ({shown})"


def check_resume_compatible(checkpoint: Mapping[str, Any], module: torch.nn.Module, path: str | Path) -> None:
    """Resuming `path` into a run whose network (size, architecture, class count) differs from its own."""
    saved_state = checkpoint.get("state_dict")
    saved_hparams = checkpoint.get("hyper_parameters")
    if saved_state is None or saved_hparams is None:
        raise ConfigurationError(
            f"ckpt_path={path} is not a training checkpoint of this project; to start from other weights "
            f"use model.weights=<file> model.weights_source={'|'.join(detector_sources())}"
        )
    own = module.state_dict()
    fits = set(saved_state) == set(own) and all(saved_state[k].shape == v.shape for k, v in own.items())
    if fits:
        return
    hparams = getattr(module, "hparams", {})
    raise ConfigurationError(
        f"ckpt_path={path} holds a {_describe(saved_hparams)}, but this run builds a {_describe(hparams)}. "
        "To resume, pass the same model= and dataset= (and dataset.classes) as the run that wrote it; "
        f"to start a new run from its weights instead, use model.weights={path} "
        "(class-score layers of another class count are re-initialised)."
    )
