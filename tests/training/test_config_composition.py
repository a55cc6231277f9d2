"""Every model x dataset x trainer of conf/ composes and instantiates; num_classes follows the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from training_helpers import CONF_DIR, TINY_SHAPES, compose_config

from ssd_lightning.cli.build import (
    build_module,
    build_trainer,
    instantiate_callbacks,
    instantiate_loggers,
    optimizer_factory,
)
from ssd_lightning.cli.build import instantiate_datamodule as make_datamodule
from ssd_lightning.conf_dir import HYDRA_VERSION_BASE
from ssd_lightning.training.wandb_logging import WandbDetectionImages

MODELS = ["compact", "ssd300", "ssd512"]
DATASETS = ["shapes", "voc", "coco"]
TRAINERS = ["default", "cpu", "gpu", "ddp"]
EXPERIMENTS = ["ssd300_voc0712", "ssd512_voc0712", "ssd300_coco", "ssd512_coco"]


def dataset_overrides(dataset: str, coco128: Path, shapes_root: Path) -> list[str]:
    roots = {"shapes": shapes_root, "voc": coco128 / "voc", "coco": coco128 / "coco"}
    overrides = [f"dataset={dataset}", f"dataset.root={roots[dataset]}"]
    if dataset == "coco":  # coco128 has only the train2017 split
        overrides += ["dataset.val_split=train2017"]
    if dataset == "shapes":
        overrides += ["dataset.shapes.num_train=4", "dataset.shapes.num_val=2", "dataset.shapes.num_test=2"]
    return overrides


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_combination_composes(model: str, dataset: str, trainer: str, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [f"model={model}", f"dataset={dataset}", f"trainer={trainer}", "dataset.root=/data"],
        tmp_path,
    )
    assert cfg.model.name == model and cfg.dataset.name == dataset
    # The data follows the model's input size and normalisation, passed when it is built: the dataset
    # config reads nothing of the model's (the model's reads the dataset's prior sizes).
    assert not {"image_size", "mean", "std"} & set(cfg.dataset)
    assert cfg.model.image_size == cfg.model.net.size
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert "num_classes" not in cfg.model.net


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_dataset_instantiate(
    model: str, dataset: str, coco128_root: Path, shapes_root: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "train", [f"model={model}", *dataset_overrides(dataset, coco128_root, shapes_root)], tmp_path
    )
    datamodule = make_datamodule(cfg)
    module = build_module(cfg, datamodule)
    # num_classes comes from the data: 5 shapes, VOC's 20, the 80 COCO categories (+ background).
    expected = {"shapes": 6, "voc": 21, "coco": 81}[dataset]
    assert datamodule.num_classes == module.num_classes == expected
    assert module.net.heads[0].conf.out_channels % expected == 0
    assert module.net.image_size == datamodule.image_size == cfg.model.image_size
    assert list(datamodule.mean) == list(cfg.model.pixel_mean)
    assert list(datamodule.std) == list(cfg.model.pixel_std)
    if dataset == "coco":
        assert module.hparams.category_ids[:3] == [1, 2, 3] and module.hparams.category_ids[-1] == 90


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_instantiates(trainer: str, tmp_path: Path) -> None:
    overrides = [f"trainer={trainer}"]
    if not torch.cuda.is_available() and trainer in ("gpu", "ddp"):
        # Same config on the CPU: what CI can build (the GPU settings themselves are checked below).
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    if trainer == "ddp":
        overrides += ["trainer.devices=2"]
    cfg = compose_config("train", overrides, tmp_path)
    callbacks = instantiate_callbacks(cfg.callbacks)
    built = build_trainer(cfg.trainer, callbacks, [])
    assert any(isinstance(c, WandbDetectionImages) for c in built.callbacks)
    assert built.default_root_dir == str(tmp_path)
    if trainer == "ddp":
        assert isinstance(built.strategy, DDPStrategy) and built.num_devices == 2


def test_gpu_trainers_ask_for_a_gpu(tmp_path: Path) -> None:
    assert compose_config("train", ["trainer=gpu"], tmp_path).trainer.accelerator == "gpu"
    ddp = compose_config(
        "train", ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"], tmp_path
    ).trainer
    assert (ddp.strategy, ddp.num_nodes, ddp.devices) == ("ddp", 2, 4)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_are_paper_recipes(experiment: str, coco128_root: Path, tmp_path: Path) -> None:
    dataset = "coco" if experiment.endswith("coco") else "voc"
    overrides = [f"experiment={experiment}", f"dataset.root={coco128_root / dataset}"]
    if dataset == "coco":
        overrides += ["dataset.train_split=train2017", "dataset.val_split=train2017"]
    cfg = compose_config("train", overrides, tmp_path)
    size = 300 if experiment.startswith("ssd300") else 512
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.accelerator) == (f"ssd{size}", dataset, "gpu")
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 5e-4
    # The paper's global batch, whatever the number of devices (the per-device batch is derived from it).
    assert cfg.dataset.global_batch_size == 32 and cfg.dataset.batch_size is None
    assert cfg.model.backbone_weights == "IMAGENET1K_V1"  # with fc6/fc7, subsampled into conv6/conv7
    if dataset == "voc":
        assert cfg.trainer.max_steps == 120000 and list(cfg.scheduler.milestones) == [80000, 100000]
        assert [list(s) for s in cfg.dataset.train_sets] == [[2007, "trainval"], [2012, "trainval"]]
    else:
        assert cfg.trainer.max_steps == 400000 and list(cfg.scheduler.milestones) == [280000, 360000]
        assert cfg.model.net.prior_preset_name == "coco"
    module = build_module(cfg, make_datamodule(cfg))
    assert module.net.priors.shape[0] == {300: 8732, 512: 24564}[size]


def test_num_classes_cannot_be_set_on_the_model(shapes_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"dataset.root={shapes_root}", "+model.net.num_classes=3"], tmp_path)
    with pytest.raises(ValueError, match="follows the dataset"):
        build_module(cfg, make_datamodule(cfg))


def test_custom_classes_set_num_classes(coco128_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        ["dataset=voc", f"dataset.root={coco128_root / 'voc'}", "dataset.classes=[person,dog,car]"],
        tmp_path,
    )
    assert build_module(cfg, make_datamodule(cfg)).num_classes == 4


def test_the_data_takes_the_models_input_size(shapes_root: Path, tmp_path: Path) -> None:
    overrides = [f"dataset.root={shapes_root}", *TINY_SHAPES, "model.image_size=128"]
    cfg = compose_config("train", overrides, tmp_path)
    datamodule = make_datamodule(cfg)
    image, _ = datamodule.build_dataset("test")[0]
    assert tuple(image.shape[-2:]) == (128, 128) == (datamodule.image_size,) * 2


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_loggers_instantiate(logger: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={logger}", "tags=[a,b]"], tmp_path)
    (built,) = instantiate_loggers(cfg.logger)
    assert type(built).__name__.lower().startswith(logger[:3])
    assert str(tmp_path) in str(built.save_dir)
    if logger == "tensorboard":  # writes real event files (W&B's run folder is checked in test_wandb.py)
        built.log_metrics({"train/loss": 1.5}, step=0)
        built.finalize("success")
        assert list(Path(built.log_dir).glob("events.out.tfevents.*"))


def test_several_loggers_at_once(tmp_path: Path) -> None:
    cfg = compose_config("train", ["logger=[csv,wandb]"], tmp_path)
    assert set(cfg.logger) == {"csv", "wandb"}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("scheduler", ["warmup_multistep", "cosine"])
def test_optimizer_and_scheduler_groups(optimizer: str, scheduler: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"optimizer={optimizer}", f"scheduler={scheduler}"], tmp_path)
    opt = optimizer_factory(cfg)([torch.nn.Parameter(torch.zeros(2))])
    sched = instantiate(cfg.scheduler)(opt, total_steps=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * cfg.scheduler.warmup_start_factor)
    for _ in range(100):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4  # decayed by the end of the run


#: What each `debug=` option sets (conf/debug/*.yaml), written out here: nothing more, nothing less.
DEBUG_SETTINGS = {
    "fast_dev_run": {"trainer.fast_dev_run": True, "test": False},
    "limit": {
        "trainer.max_epochs": 2,
        "trainer.limit_train_batches": 5,
        "trainer.limit_val_batches": 2,
        "trainer.limit_test_batches": 2,
        "trainer.check_val_every_n_epoch": 1,
        "schedule.max_epochs": 2,
        "schedule.val_every_n_epochs": 1,
    },
    "overfit": {
        "trainer.overfit_batches": 2,
        "trainer.max_epochs": 150,
        "trainer.check_val_every_n_epoch": 25,
        "schedule.max_epochs": 150,
        "schedule.val_every_n_epochs": 25,
        "test": False,
    },
}


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    """{"a.b": leaf} of a nested config container."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, object] = {}
    for key, value in node.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return flat


@pytest.mark.parametrize("debug", sorted(DEBUG_SETTINGS))
def test_debug_configs_compose(debug: str, tmp_path: Path) -> None:
    plain = _flat(OmegaConf.to_container(compose_config("train", [], tmp_path), resolve=True))
    cfg = _flat(OmegaConf.to_container(compose_config("train", [f"debug={debug}"], tmp_path), resolve=True))
    expected = DEBUG_SETTINGS[debug]
    assert {key: cfg[key] for key in expected} == expected
    # Without debug= none of them holds (the trainer config has every key, so presence proves nothing) ...
    assert not {key for key, value in expected.items() if plain[key] == value}
    # ... and the option changes nothing else.
    assert {key for key in cfg.keys() | plain.keys() if cfg.get(key) != plain.get(key)} == set(expected)


@pytest.mark.parametrize("debug", ["limit", "overfit"])
@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_debug_options_shorten_the_papers_schedule(debug: str, dataset: str, tmp_path: Path) -> None:
    """dataset=voc|coco choose 120k/400k iterations validated every 10k/20k: a debug run must not inherit
    them (Lightning would also refuse a validation interval longer than its 5 batches)."""
    cfg = compose_config("train", [f"dataset={dataset}", "dataset.root=/data", f"debug={debug}"], tmp_path)
    settings = DEBUG_SETTINGS[debug]
    epochs, every = settings["schedule.max_epochs"], settings["schedule.val_every_n_epochs"]
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (-1, epochs)
    assert (cfg.trainer.val_check_interval, cfg.trainer.check_val_every_n_epoch) == (None, every)
    assert all(0 < step < 1 for step in [*cfg.scheduler.milestones, cfg.scheduler.warmup_steps])


def test_optuna_search_composes() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=HYDRA_VERSION_BASE):
        cfg = compose("train", overrides=["hparams_search=optuna_lr"], return_hydra_config=True)
        pruned = compose("train", ["hparams_search=optuna_lr", "hydra/sweeper/pruner=median"], True)
    assert cfg.hydra.sweeper._target_.endswith("SharedStudySweeper")  # a study several processes share
    # The built-in data's validation metric (VOC07 mAP), maximised.
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/map_voc07"
    assert "optimizer.lr" in cfg.hydra.sweeper.params
    assert cfg.hydra.sweeper.pruner is None and cfg.hydra.sweeper.sampler.seed == 1234
    assert pruned.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert pruned.hydra.sweeper.n_trials == 20  # the pruner changes nothing else
