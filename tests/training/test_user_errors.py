"""The first mistakes of a new user end in one message that names the problem and what to do next."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from training_helpers import compose_config, ensure_tiny_shapes, run_script, shapes_as_voc

from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.predict import predict
from ssd_lightning.cli.preflight import ConfigurationError, check_accelerator
from ssd_lightning.cli.train import train
from ssd_lightning.data import DatasetError
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.training.wandb_logging import check_wandb_login

COCO_SPLITS = ["dataset.train_split=train2017", "dataset.val_split=train2017"]


def _data_only(fast: list[str]) -> list[str]:
    """The tiny built-in data of the `fast` overrides, without its model and trainer settings."""
    return [o for o in fast if o.startswith("dataset.")]


def _train_error(overrides: list[str], tmp_path: Path, error: type[Exception] = DatasetError) -> str:
    with pytest.raises(error) as caught:
        train(compose_config("train", overrides, tmp_path / "run"))
    return str(caught.value)


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_no_data_at_the_root_says_what_the_root_must_hold(dataset: str, tmp_path: Path) -> None:
    root = tmp_path / "data" / "VOCdevkit"
    message = _train_error([f"dataset={dataset}", f"dataset.root={root}"], tmp_path)
    assert f"{root}: dataset root does not exist or is not a folder" in message
    expected = "VOC2007/" if dataset == "voc" else "annotations/instances_"
    assert "dataset.root must be the folder that holds" in message and expected in message
    assert "skip_bad_samples" not in message  # not a problem of individual images


@pytest.mark.parametrize(
    ("dataset", "given", "meant"),
    [
        ("voc", "voc/VOC2007", "voc"),  # one level too deep
        ("voc", "voc/VOC2007/JPEGImages", "voc"),  # two levels too deep
        ("voc", ".", "voc"),  # one level too high
        ("coco", "coco/annotations", "coco"),
        ("coco", "coco/train2017", "coco"),
        ("coco", ".", "coco"),
    ],
)
def test_a_root_at_the_wrong_folder_level_suggests_the_right_one(
    dataset: str, given: str, meant: str, coco128_root: Path, tmp_path: Path
) -> None:
    splits = COCO_SPLITS if dataset == "coco" else []
    overrides = [f"dataset={dataset}", f"dataset.root={coco128_root / given}", *splits]
    message = _train_error(overrides, tmp_path)
    assert f"Did you mean dataset.root={(coco128_root / meant).absolute()} ? That folder holds" in message


def test_a_bad_root_fails_the_command_line_with_the_suggestion_and_no_worker_trace(
    coco128_root: Path, tmp_path: Path
) -> None:
    root = coco128_root / "voc" / "VOC2007"
    result = run_script("train.py", ["dataset=voc", f"dataset.root={root}"], tmp_path)
    assert result.returncode != 0
    assert f"Did you mean dataset.root={coco128_root / 'voc'} ?" in result.stderr
    assert "DataLoader worker" not in result.stderr


def _without_wandb_credentials(tmp_path: Path) -> dict[str, str]:
    """An environment in which W&B finds no API key: empty home, config dir and netrc, online mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path / "home"),
        NETRC=str(tmp_path / "home" / ".netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_MODE="online",
    )
    return env


def test_wandb_without_login_stops_before_training_and_says_how_to_log_in(tmp_path: Path) -> None:
    env = _without_wandb_credentials(tmp_path)
    result = run_script("train.py", ["logger=wandb", "trainer.max_epochs=1"], tmp_path, timeout=120, env=env)
    assert result.returncode != 0
    assert "W&B has no API key on this machine" in result.stderr
    assert "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_wandb_check_passes_offline_or_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = {"wandb": {"_target_": "pytorch_lightning.loggers.WandbLogger", "offline": False}}
    monkeypatch.setattr("ssd_lightning.training.wandb_logging.wandb_has_credentials", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_login(logger)  # offline by environment
    monkeypatch.setenv("WANDB_MODE", "online")
    check_wandb_login({"wandb": {**logger["wandb"], "offline": True}})  # offline by config
    check_wandb_login({"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger"}})  # no W&B at all
    with pytest.raises(ValueError, match="wandb login"):
        check_wandb_login(logger)
    monkeypatch.setattr("ssd_lightning.training.wandb_logging.wandb_has_credentials", lambda: True)
    check_wandb_login(logger)


def test_cuda_asked_for_on_a_machine_without_it(
    monkeypatch: pytest.MonkeyPatch, fast: list[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _train_error(["trainer=gpu", *_data_only(fast)], tmp_path, ConfigurationError)
    assert "trainer.accelerator=gpu but PyTorch sees no CUDA GPU" in message and "trainer=cpu" in message
    for task, run in (("eval", evaluate), ("predict", predict)):  # checked before the checkpoint is read
        cfg = compose_config(task, ["trainer=gpu", "ckpt_path=missing.ckpt"], tmp_path / task)
        with pytest.raises(ConfigurationError, match="sees no CUDA GPU"):
            run(cfg)
    check_accelerator({"accelerator": "cpu", "devices": 4})
    check_accelerator({"accelerator": "auto", "devices": "auto"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_accelerator({"accelerator": "cuda", "devices": 2})
    with pytest.raises(ConfigurationError, match="trainer.devices=4 but this machine has 2 CUDA GPU"):
        check_accelerator({"accelerator": "gpu", "devices": 4})


def _checkpoint_of(module: SSDLitModule, path: Path) -> Path:
    """A checkpoint of `module` as Lightning writes one (weights and hyper-parameters)."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": "2.6.0",
    }
    torch.save(checkpoint, path)
    return path


def _module(net: dict, classes: list[str]) -> SSDLitModule:
    return SSDLitModule(classes, net, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)


def test_resuming_a_checkpoint_of_another_class_count(fast: list[str], tmp_path: Path) -> None:
    net = {"arch": "compact", "size": 96, "width": 16}
    ckpt = _checkpoint_of(_module(net, ["dog", "cat"]), tmp_path / "two_classes.ckpt")
    message = _train_error([*fast, f"ckpt_path={ckpt}"], tmp_path, ConfigurationError)
    assert "holds a compact SSD96 with 2 classes (dog, cat)" in message
    assert "this run builds a compact SSD96 with 5 classes" in message
    assert f"model.weights={ckpt}" in message and "same model= and dataset=" in message


def test_resuming_a_checkpoint_of_another_model_size(fast: list[str], tmp_path: Path) -> None:
    classes = ["ellipse", "rectangle", "triangle", "star", "cross"]
    ckpt = _checkpoint_of(_module({"arch": "vgg16", "size": 300}, classes), tmp_path / "ssd300.ckpt")
    overrides = ["model=ssd512", f"ckpt_path={ckpt}", *_data_only(fast)]
    message = _train_error(overrides, tmp_path, ConfigurationError)
    assert "holds a vgg16 SSD300 with 5 classes" in message and "builds a vgg16 SSD512" in message


def test_resuming_under_a_schedule_of_another_shape(fast: list[str], tmp_path: Path) -> None:
    run = [*fast, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false"]
    train(compose_config("train", [*run, "scheduler=cosine", "scheduler.warmup_steps=0"], tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    longer = [*run, "trainer.max_epochs=3", "scheduler=cosine", "scheduler.warmup_steps=2"]
    longer.append(f"ckpt_path={ckpt}")
    message = _train_error(longer, tmp_path / "b", ConfigurationError)
    assert "holds a learning-rate schedule of another shape than this config's" in message
    assert f"model.weights={ckpt}" in message


def test_eval_of_a_checkpoint_on_data_with_other_classes(fast: list[str], tmp_path: Path) -> None:
    net = {"arch": "compact", "size": 96, "width": 16}
    ckpt = _checkpoint_of(_module(net, ["dog", "cat"]), tmp_path / "dog_cat.ckpt")
    overrides = [*_data_only(fast), f"ckpt_path={ckpt}", "trainer.accelerator=cpu"]
    cfg = compose_config("eval", overrides, tmp_path / "eval")
    with pytest.raises(ValueError, match=r"trained on classes \['dog', 'cat'\] but dataset=shapes has"):
        evaluate(cfg)


def test_an_epoch_run_on_voc_format_data_under_the_papers_schedule_says_how_to_count_epochs(
    shapes_root: Path, fast: list[str], tmp_path: Path
) -> None:
    """dataset=voc brings the paper's 120k iterations validated every 10k; asking for validation every epoch
    of a small dataset is Lightning's error, completed with the schedule that set the interval and the fix."""
    ensure_tiny_shapes(shapes_root)
    data = [o for o in shapes_as_voc(shapes_root) if o != "schedule=quick"]
    model_and_trainer = [o for o in fast if not o.startswith("dataset.")]
    message = _train_error([*data, "model=compact", *model_and_trainer], tmp_path, ConfigurationError)
    assert "`val_check_interval` (10000)" in message and "schedule=paper_voc" in message
    assert "add schedule=quick" in message
