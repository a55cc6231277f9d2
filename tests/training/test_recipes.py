"""The paper recipes on 1 to N devices, decided in the config: the model follows the data, precision follows
the hardware, the global batch stays the recipe's, the validation metric is the paper's for the data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from training_helpers import check_ok, compose_config, run_script

from ssd_lightning import build_ssd, generate_priors, prior_preset
from ssd_lightning.cli.build import (
    build_module,
    build_trainer,
    instantiate_datamodule,
    optimizer_factory,
    trainer_arguments,
)
from ssd_lightning.cli.build import resolve_precision as precision_for
from ssd_lightning.data import DetectionDataModule

EXPERIMENTS = ["ssd300_voc0712", "ssd512_voc0712", "ssd300_coco", "ssd512_coco"]
TRAINERS = ["default", "cpu", "gpu", "ddp"]


# 1. The model follows the data -----------------------------------------------------------------------


def test_the_card_command_composes_the_papers_ssd300_with_coco_priors(tmp_path: Path) -> None:
    """`python train.py dataset=coco trainer.devices=4 --cfg job` shows what runs: SSD300 VGG16, 300 px,
    COCO prior sizes, the paper's global batch 32 and COCO schedule, DDP, precision following the hardware."""
    stdout = check_ok(
        run_script(
            "train.py",
            ["dataset=coco", "dataset.root=/data/coco", "trainer.devices=4", "--cfg", "job", "--resolve"],
            cwd=tmp_path,
        )
    )
    for line in (
        "  name: ssd300",
        "  image_size: 300",
        "    arch: vgg16",
        "    prior_preset_name: coco",
        "  global_batch_size: 32",
        "  devices: 4",
        "  strategy: ddp",  # what Lightning's auto would pick for 4 devices, written out
        "  precision: auto",  # resolved at start from the GPU (bf16-mixed or 16-mixed), logged
        "  max_steps: 400000",  # the paper's COCO schedule, not the built-in data's 10 epochs
        "  val_check_interval: 20000",
        "  check_val_every_n_epoch: null",
        "  backbone_weights: IMAGENET1K_V1",  # has the fc6/fc7 the paper subsamples
        "monitor: val/map",
    ):
        assert f"\n{line}\n" in stdout, line


@pytest.mark.parametrize(
    ("overrides", "model", "arch", "priors"),
    [
        ([], "compact", "compact", None),  # the CPU demo on the built-in data
        (["dataset=voc"], "ssd300", "vgg16", "voc"),
        (["dataset=coco"], "ssd300", "vgg16", "coco"),
        (["dataset=voc", "dataset.classes=[cat,dog]"], "ssd300", "vgg16", "voc"),  # custom VOC-format data
        (["dataset=coco", "dataset.classes=null"], "ssd300", "vgg16", "coco"),  # custom COCO-format data
        (["model=ssd512", "dataset=coco"], "ssd512", "vgg16", "coco"),
        (["model=ssd512", "dataset=voc"], "ssd512", "vgg16", "voc"),
        (["model=compact", "dataset=coco"], "compact", "compact", None),  # an explicit model= wins
    ],
)
def test_the_model_follows_the_data(
    overrides: list[str], model: str, arch: str, priors: str | None, tmp_path: Path
) -> None:
    cfg = compose_config("train", [*overrides, "dataset.root=/data"], tmp_path)
    assert (cfg.model.name, cfg.model.net.arch) == (model, arch)
    if priors is not None:  # the network is built with the paper's prior sizes for that data
        assert cfg.model.net.prior_preset_name == priors
        net = build_ssd(num_classes=3, **OmegaConf.to_container(cfg.model.net, resolve=True))
        torch.testing.assert_close(net.priors, generate_priors(prior_preset(cfg.model.image_size, priors)))


# 1b. The schedule follows the data too -----------------------------------------------------------------

PAPER_VOC = {"max_steps": 120000, "max_epochs": -1, "lr_steps": [80000, 100000], "val_steps": 10000}
PAPER_COCO = {"max_steps": 400000, "max_epochs": -1, "lr_steps": [280000, 360000], "val_steps": 20000}
QUICK = {"max_steps": -1, "max_epochs": 10, "lr_steps": [0.67, 0.83], "val_steps": None}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], QUICK),  # the built-in data's few-minute job
        (["dataset=voc"], PAPER_VOC),
        (["dataset=coco"], PAPER_COCO),
        (["dataset=coco", "model=ssd512", "trainer.devices=8", "trainer.num_nodes=2"], PAPER_COCO),
        (["dataset=voc", "dataset.classes=[cat,dog]"], PAPER_VOC),  # custom VOC-format data
        (["dataset=coco", "schedule=quick"], QUICK),  # an explicit schedule= wins
        (["dataset=voc", "schedule=paper_coco"], PAPER_COCO),
    ],
)
def test_the_schedule_follows_the_data(overrides: list[str], expected: dict, tmp_path: Path) -> None:
    """Length, lr steps and validation cadence reach the Trainer, the lr scheduler and the checkpoints."""
    cfg = compose_config("train", [*overrides, "dataset.root=/data", "scheduler=warmup_multistep"], tmp_path)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (expected["max_steps"], expected["max_epochs"])
    assert list(cfg.scheduler.milestones) == expected["lr_steps"]
    assert cfg.trainer.val_check_interval == expected["val_steps"]
    # Lightning refuses a step interval longer than an epoch unless epoch-based validation is off.
    assert (cfg.trainer.check_val_every_n_epoch is None) == (expected["val_steps"] is not None)
    every = cfg.callbacks.last_checkpoint.every_n_train_steps
    assert every == (2000 if expected["max_steps"] > 0 else 100)
    if expected is not QUICK:  # the paper's warmup of 500 iterations
        assert cfg.scheduler.warmup_steps == 500
    # What a user sets on the command line still wins over the schedule.
    mine = compose_config("train", [*overrides, "dataset.root=/data", "trainer.max_steps=77"], tmp_path)
    assert mine.trainer.max_steps == 77


def test_the_paper_schedule_drives_the_built_lr_scheduler(tmp_path: Path) -> None:
    """dataset=voc: warmup over the first 500 steps, then lr x0.1 at 80k and again at 100k of 120k."""
    cfg = compose_config("train", ["dataset=voc", "dataset.root=/data"], tmp_path)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=cfg.trainer.max_steps)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * cfg.scheduler.warmup_start_factor)
    for _ in range(500):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    multistep = torch.optim.lr_scheduler.MultiStepLR
    decays = [part for part in scheduler._schedulers if isinstance(part, multistep)]
    assert [sorted(decay.milestones) for decay in decays] == [[80000, 100000]]


@pytest.mark.parametrize(
    ("devices", "num_nodes", "accelerator", "expected"),
    [
        (4, 1, "gpu", "ddp"),
        ("4", 1, "auto", "ddp"),
        ([0, 1], 1, "gpu", "ddp"),
        ("'0,1'", 1, "gpu", "ddp"),  # Lightning's string of device indices
        (1, 2, "gpu", "ddp"),  # one device on each of two nodes
        (1, 1, "gpu", "auto"),
        ("auto", 1, "auto", "auto"),  # the hardware decides: Lightning's auto (DDP on several GPUs)
        (8, 1, "tpu", "auto"),  # XLA's own strategy
    ],
)
def test_the_strategy_is_written_out_where_the_config_decides_it(
    devices: object, num_nodes: int, accelerator: str, expected: str, tmp_path: Path
) -> None:
    overrides = [f"trainer.devices={devices}".replace(" ", ""), f"trainer.num_nodes={num_nodes}"]
    cfg = compose_config("train", [*overrides, f"trainer.accelerator={accelerator}"], tmp_path)
    assert cfg.trainer.strategy == expected


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_the_written_out_strategy_is_what_lightning_would_choose(devices: int, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    cfg = compose_config("train", [f"trainer.devices={devices}", "trainer.accelerator=cpu"], tmp_path)
    ours = pl.Trainer(accelerator="cpu", devices=devices, strategy=cfg.trainer.strategy, logger=False)
    lightnings = pl.Trainer(accelerator="cpu", devices=devices, strategy="auto", logger=False)
    assert type(ours.strategy) is type(lightnings.strategy)
    assert ours.world_size == lightnings.world_size == devices


# 2. Precision follows the hardware --------------------------------------------------------------------


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_leaves_precision_to_the_hardware(trainer: str, tmp_path: Path) -> None:
    assert compose_config("train", [f"trainer={trainer}"], tmp_path).trainer.precision == "auto"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_leaves_precision_to_the_hardware(experiment: str, tmp_path: Path) -> None:
    for trainer in TRAINERS:  # `experiment=... trainer=ddp` used to drop the recipe's mixed precision
        cfg = compose_config("train", [f"experiment={experiment}", f"trainer={trainer}"], tmp_path)
        assert cfg.trainer.precision == "auto", trainer


@pytest.mark.parametrize(
    ("cuda", "capability", "accelerator", "expected"),
    [
        (True, (8, 0), "gpu", "bf16-mixed"),  # A100: bf16 tensor cores
        (True, (9, 0), "auto", "bf16-mixed"),  # H100
        (True, (8, 6), "cuda", "bf16-mixed"),  # RTX 30xx
        (True, (7, 5), "gpu", "16-mixed"),  # T4: bf16 only emulated
        (True, (7, 0), "auto", "16-mixed"),  # V100
        (True, (8, 0), "cpu", "32-true"),  # a GPU machine told to use its CPU
        (False, None, "auto", "32-true"),
        (False, None, "cpu", "32-true"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(
    cuda: bool,
    capability: tuple[int, int] | None,
    accelerator: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla")
    # torch's own check counts emulated bf16 as support on every GPU: it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    precision, why = precision_for("auto", accelerator)
    assert precision == expected
    if expected == "16-mixed":
        assert f"compute capability {capability[0]}.{capability[1]}: no native bf16" in why
    assert precision_for("16-mixed", accelerator)[0] == "16-mixed"  # an explicit value wins


def test_the_precision_decision_is_logged_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-32GB")
    cfg = compose_config("train", [], tmp_path)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        arguments = trainer_arguments(cfg.trainer)
    assert arguments["precision"] == "16-mixed"
    assert (
        "trainer.precision=auto -> 16-mixed (Tesla V100-SXM2-32GB, compute capability 7.0: no native bf16"
        in caplog.text
    )


def test_the_built_trainer_gets_the_resolved_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_config("train", ["trainer=cpu"], tmp_path)
    assert build_trainer(cfg.trainer, [], []).precision == "32-true"
    explicit = compose_config("train", ["trainer=cpu", "trainer.precision=bf16-mixed"], tmp_path)
    assert build_trainer(explicit.trainer, [], []).precision == "bf16-mixed"


# 3. The global batch ---------------------------------------------------------------------------------


def datamodule(shapes_root: Path, **batch: int | None) -> DetectionDataModule:
    return DetectionDataModule(format="shapes", root=str(shapes_root), image_size=96, **batch)


@pytest.mark.parametrize(
    ("devices", "nodes", "accumulate", "per_device", "message"),
    [
        (1, 1, 1, 32, "global batch 32 = 1 device x 32 images"),
        (4, 1, 1, 8, "global batch 32 = 4 devices x 8 images"),
        (8, 2, 1, 2, "global batch 32 = 2 nodes x 8 devices x 2 images"),
        (4, 1, 2, 4, "global batch 32 = 4 devices x 2 accumulated batches x 4 images"),
    ],
)
def test_the_global_batch_is_kept_on_any_number_of_devices(
    devices: int,
    nodes: int,
    accumulate: int,
    per_device: int,
    message: str,
    shapes_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = datamodule(shapes_root, global_batch_size=32)
    with caplog.at_level(logging.INFO):
        assert data.resolve_batch_size(devices, nodes, accumulate).per_device == per_device
    assert data.batch_size == per_device and data.resolved_global_batch_size == 32
    assert message in caplog.text


@pytest.mark.parametrize(
    ("global_batch", "devices", "per_device", "rounded"),
    [
        (32, 3, 11, 33),  # 33 is nearer 32 than 30
        (32, 5, 6, 30),  # 30 is nearer than 35
        (32, 64, 1, 64),  # one image per device at least
        (100, 8, 13, 104),  # a tie (96 or 104): the larger
    ],
)
def test_a_global_batch_that_does_not_divide_is_rounded_and_says_so(
    global_batch: int,
    devices: int,
    per_device: int,
    rounded: int,
    shapes_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = datamodule(shapes_root, global_batch_size=global_batch)
    with caplog.at_level(logging.INFO):
        plan = data.resolve_batch_size(devices)
    assert (plan.per_device, plan.global_batch, plan.rounded) == (per_device, rounded, True)
    assert data.batch_size == per_device and data.resolved_global_batch_size == rounded
    images = f"{per_device} image{'s' if per_device > 1 else ''}"
    assert f"global batch {rounded} = {devices} devices x {images}" in caplog.text
    assert f"dataset.global_batch_size={global_batch} rounded" in caplog.text
    # Evaluation alone rounds up: every image is still evaluated once, the batch's size is all it changes.
    assert (
        datamodule(shapes_root, global_batch_size=32).resolve_batch_size(3, training=False).per_device == 11
    )


def test_the_per_device_batch_stays_available(shapes_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = datamodule(shapes_root, global_batch_size=32, batch_size=6)
    with caplog.at_level(logging.INFO):
        assert data.resolve_batch_size(4).per_device == 6
    assert data.resolved_global_batch_size == 24 and "global batch 24 = 4 devices x 6 images" in caplog.text


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_state_the_papers_global_batch_lr_and_schedule(experiment: str, tmp_path: Path) -> None:
    for devices in ("1", "4", "8"):
        cfg = compose_config(
            "train",
            [f"experiment={experiment}", f"trainer.devices={devices}", "trainer.num_nodes=2"],
            tmp_path,
        )
        assert cfg.dataset.global_batch_size == 32 and cfg.dataset.batch_size is None
        assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.base_batch_size == 32
        paper = PAPER_VOC if "voc" in experiment else PAPER_COCO
        assert cfg.trainer.max_steps == paper["max_steps"] and cfg.run_name == experiment
        assert list(cfg.scheduler.milestones) == paper["lr_steps"]
        assert cfg.trainer.val_check_interval == paper["val_steps"]


def test_the_lr_changes_with_the_batch_only_when_asked(tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=ssd300_voc0712"], tmp_path)
    assert optimizer_factory(cfg, global_batch=64).keywords["lr"] == 1e-3  # scale_lr=false: as given
    scaled = compose_config("train", ["experiment=ssd300_voc0712", "scale_lr=true"], tmp_path)
    assert optimizer_factory(scaled, global_batch=64).keywords["lr"] == pytest.approx(2e-3)
    assert optimizer_factory(scaled, global_batch=8).keywords["lr"] == pytest.approx(2.5e-4)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_factory(scaled, global_batch=64)(params).param_groups[0]["lr"] == pytest.approx(2e-3)


# 5. Honest evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "monitor"), [("voc", "val/map_voc07"), ("coco", "val/map"), ("shapes", "val/map_voc07")]
)
def test_each_dataset_monitors_its_papers_metric(dataset: str, monitor: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"dataset={dataset}", "dataset.root=/data"], tmp_path)
    assert cfg.monitor == cfg.optimized_metric == cfg.callbacks.best_checkpoint.monitor == monitor


def test_validation_on_the_test_images_is_recognised(coco128_root: Path, tmp_path: Path) -> None:
    voc = compose_config("train", ["dataset=voc", f"dataset.root={coco128_root / 'voc'}"], tmp_path)
    assert instantiate_datamodule(voc).validation_is_test()  # VOC2007 test for both, as in the paper
    coco = compose_config("train", ["dataset=coco", f"dataset.root={coco128_root / 'coco'}"], tmp_path)
    assert instantiate_datamodule(coco).validation_is_test()  # val2017 for both
    shapes = compose_config("train", [], tmp_path)
    assert not instantiate_datamodule(shapes).validation_is_test()


def test_a_held_out_validation_split_is_disjoint_from_training(coco128_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            "dataset=voc",
            f"dataset.root={coco128_root / 'voc'}",
            "dataset.train_sets=[[2007,trainval]]",
            "dataset.val_holdout=0.25",
            "dataset.num_workers=0",
        ],
        tmp_path,
    )
    data = instantiate_datamodule(cfg)
    assert not data.validation_is_test()
    data.setup("fit")
    train_names = {r.name for r in data.datasets["train"].records}
    val_names = {r.name for r in data.datasets["val"].records}
    whole = cfg.copy()
    whole.dataset.val_holdout = 0.0
    everything = {r.name for r in instantiate_datamodule(whole).build_dataset("train").records}
    assert train_names.isdisjoint(val_names) and train_names | val_names == everything
    assert 0.1 < len(val_names) / len(everything) < 0.4
    # The same images on every run (by name, not by a random draw).
    again = instantiate_datamodule(cfg)
    again.setup("fit")
    assert {r.name for r in again.datasets["val"].records} == val_names
    # Validation images keep their difficult flags and get no augmentation.
    assert data.datasets["val"].transform is not data.datasets["train"].transform


def test_modules_build_with_the_resolved_global_batch(shapes_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train", [f"dataset.root={shapes_root}", "scale_lr=true", "dataset.batch_size=16"], tmp_path
    )
    assert cfg.optimizer.base_batch_size == 16
    data = instantiate_datamodule(cfg)
    data.resolve_batch_size(2)  # 16 per device on 2 devices: 32, twice the batch the compact lr is for
    module = build_module(cfg, data, data.resolved_global_batch_size)
    assert module.optimizer_factory.keywords["lr"] == pytest.approx(2 * cfg.optimizer.lr)
